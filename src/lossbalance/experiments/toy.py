"""The GradNorm paper's synthetic study (Chen et al., ICML 2018, Section 4).

T regression tasks share one input x in R^250 and predict

    f_i(x) = sigma_i * tanh((B + eps_i) x)  in R^100,

with B (100 x 250) drawn once with entries N(0, 10^2) (shared by all tasks) and eps_i
(100 x 250) drawn once per task with entries N(0, 3.5^2); x has entries U(0, 1). The scales
sigma_i differ by orders of magnitude, so an unweighted sum of the tasks' MSE losses is ruled
by the largest sigma. The model is the paper's: a 4 x 100 ReLU trunk and one affine head per
task; GradNorm measures gradient norms at the last shared layer's weight.

Everything random (the problem, the model's initialisation, the batches) comes from seeded
``torch.Generator``s, so the same configuration gives the same metrics.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn
from torch.nn import functional as F

import lossbalance as lb
from lossbalance._taps import per_task_norms

METHODS = ("equal", "gradnorm", "uncertainty", "static", "dtp")
PAPER_ALPHAS = (0.0, 0.12, 0.5, 1.0, 1.5, 2.0, 3.0)


def task_sigmas(num_tasks: int) -> list[float]:
    """The paper's (1, 100) for T = 2; for T > 2, sigma_i log-spaced over [1, 100]."""
    if num_tasks < 2:
        raise ValueError(f"the toy study needs at least 2 tasks, got {num_tasks}")
    return [10 ** (2 * i / (num_tasks - 1)) for i in range(num_tasks)]


@dataclass
class ToyConfig:
    """One study: which methods, how long, with what data. Defaults are the README's run."""

    tasks: int = 2
    methods: tuple[str, ...] = METHODS
    seeds: int = 3
    steps: int = 2000
    alpha: float = 0.12
    alphas: tuple[float, ...] = PAPER_ALPHAS
    batch_size: int = 100
    train_size: int = 8000
    test_size: int = 2000
    lr: float = 1e-3
    weight_lr: float = 0.025
    dtp_gamma: float = 1.0
    log_every: int = 10
    eval_every: int = 100
    data_seed: int = 0
    sigmas: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.validate()
        if not self.sigmas:
            self.sigmas = task_sigmas(self.tasks)

    def validate(self) -> None:
        """Raise ValueError naming the first bad setting."""
        if isinstance(self.tasks, bool) or not isinstance(self.tasks, int) or self.tasks < 2:
            raise ValueError(f"--tasks must be an integer >= 2, got {self.tasks}")
        if not self.methods:
            raise ValueError("--methods must name at least one method")
        for m in self.methods:
            if m not in METHODS:
                raise ValueError(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
        for name in ("seeds", "steps", "batch_size", "train_size", "test_size", "log_every",
                     "eval_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be an integer >= 1, got {value}")
        for name in ("lr", "weight_lr"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {value}")
        for a in (self.alpha, *self.alphas):
            if not math.isfinite(a) or a < 0:
                raise ValueError(f"alpha must be a finite number >= 0, got {a}")
        if not math.isfinite(self.dtp_gamma) or self.dtp_gamma < 0:
            raise ValueError(f"--dtp-gamma must be >= 0, got {self.dtp_gamma}")
        if self.sigmas and len(self.sigmas) != self.tasks:
            raise ValueError(f"{len(self.sigmas)} sigmas for {self.tasks} tasks")


@dataclass
class ToyData:
    """Train and test sets of the synthetic problem (targets per task)."""

    x_train: Tensor
    y_train: list[Tensor]
    x_test: Tensor
    y_test: list[Tensor]
    sigmas: list[float]


def make_data(cfg: ToyConfig) -> ToyData:
    """Draw B, eps_i and the inputs once from ``cfg.data_seed``."""
    gen = torch.Generator().manual_seed(cfg.data_seed)
    B = torch.randn(100, 250, generator=gen) * 10.0
    eps = [torch.randn(100, 250, generator=gen) * 3.5 for _ in range(cfg.tasks)]
    x = torch.rand(cfg.train_size + cfg.test_size, 250, generator=gen)
    ys = [s * torch.tanh(x @ (B + e).T) for s, e in zip(cfg.sigmas, eps, strict=True)]
    n = cfg.train_size
    return ToyData(x[:n], [y[:n] for y in ys], x[n:], [y[n:] for y in ys], list(cfg.sigmas))


class ToyNet(nn.Module):
    """The paper's model: 250 -> 4 x 100 ReLU trunk, one 100 -> 100 affine head per task."""

    def __init__(self, num_tasks: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = 250
        for _ in range(4):
            layers += [nn.Linear(width, 100), nn.ReLU()]
            width = 100
        self.trunk = nn.Sequential(*layers)
        self.heads = nn.ModuleList(nn.Linear(100, 100) for _ in range(num_tasks))

    @property
    def last_shared(self) -> nn.Parameter:
        """The weight of the last shared layer, where GradNorm measures gradient norms."""
        return self.trunk[-2].weight


@dataclass
class Run:
    """One training run's identity."""

    method: str
    seed: int
    alpha: float | None = None
    static_weights: list[float] | None = None


def _batches(n: int, batch: int, steps: int, gen: torch.Generator) -> Iterator[Tensor]:
    done = 0
    while done < steps:
        for idx in torch.randperm(n, generator=gen).split(batch):
            if len(idx) < batch:
                continue
            yield idx
            done += 1
            if done == steps:
                return


def _balancer(run: Run, cfg: ToyConfig) -> lb.Balancer:
    T = cfg.tasks
    if run.method == "equal":
        return lb.EqualWeighting(T)
    if run.method == "gradnorm":
        return lb.GradNorm(T, alpha=run.alpha if run.alpha is not None else cfg.alpha,
                           lr=cfg.weight_lr)
    if run.method == "uncertainty":
        return lb.UncertaintyWeighting(T, ["regression"] * T)
    if run.method == "static":
        assert run.static_weights is not None
        return lb.StaticWeighting(run.static_weights)
    if run.method == "dtp":
        return lb.DynamicTaskPrioritization(T, gamma=cfg.dtp_gamma)
    raise ValueError(run.method)


def test_losses(model: ToyNet, data: ToyData) -> list[float]:
    """Per-task MSE on the held-out test set."""
    with torch.no_grad():
        h = model.trunk(data.x_test)
        return [float(F.mse_loss(head(h), y)) for head, y in
                zip(model.heads, data.y_test, strict=True)]


def train_run(run: Run, cfg: ToyConfig, data: ToyData,
              on_step: Callable[[], None] | None = None) -> tuple[list[dict], dict]:
    """Train one model with one balancer; returns (metric rows, final summary)."""
    T = cfg.tasks
    torch.manual_seed(run.seed)  # model initialisation
    model = ToyNet(T)
    bal = _balancer(run, cfg)
    opt = torch.optim.Adam([*model.parameters(), *bal.parameters()], lr=cfg.lr)
    gen = torch.Generator().manual_seed(10_000 + run.seed)  # batch order
    rows: list[dict] = []
    initial: Tensor | None = None
    started = time.perf_counter()
    for step, idx in enumerate(_batches(cfg.train_size, cfg.batch_size, cfg.steps, gen)):
        x = data.x_train[idx]
        opt.zero_grad(set_to_none=True)
        h = model.trunk(x)
        feats = bal.tap(h)
        losses = [F.mse_loss(model.heads[i](feats[i]), data.y_train[i][idx]) for i in range(T)]
        values = torch.stack([loss.detach() for loss in losses])
        if initial is None:
            initial = values.clone()
        logging = step % cfg.log_every == 0 or step == cfg.steps - 1
        weights = bal.weights
        grad_norms = None
        if logging and run.method != "gradnorm":
            # ||grad_W (w_i L_i)|| for the other methods too, so the columns compare.
            grad_norms = per_task_norms(losses, [model.last_shared]) * weights
        if run.method == "dtp":
            kpis = (1 - torch.clamp(values / initial, max=1.0)).clamp(0, 1)
            bal.backward(losses, kpis=kpis)
            weights = bal.stats["weight"]
        elif run.method == "gradnorm":
            bal.backward(losses, shared=model.last_shared)
            grad_norms = bal.stats["grad_norm"]
        else:
            bal.backward(losses)
            weights = bal.stats["weight"]
        opt.step()
        if on_step is not None:
            on_step()
        if logging:
            row: dict = {"method": run.method, "alpha": "" if run.alpha is None else run.alpha,
                         "seed": run.seed, "step": step}
            ratio = values / initial
            for i in range(T):
                row[f"loss_{i}"] = float(values[i])
                row[f"weight_{i}"] = float(weights[i])
                row[f"loss_ratio_{i}"] = float(ratio[i])
                row[f"grad_norm_{i}"] = float(grad_norms[i]) if grad_norms is not None else ""
            evaluating = step % cfg.eval_every == 0 or step == cfg.steps - 1
            tl = test_losses(model, data) if evaluating else None
            for i in range(T):
                row[f"test_loss_{i}"] = tl[i] if tl is not None else ""
            rows.append(row)
    final = test_losses(model, data)
    summary = {
        "method": run.method,
        "alpha": run.alpha,
        "seed": run.seed,
        "test_loss": final,
        "normalized_test_loss": sum(t / s ** 2 for t, s in zip(final, data.sigmas, strict=True)),
        "final_weights": [float(w) for w in bal.weights],
        "wall_time_s": time.perf_counter() - started,
    }
    return rows, summary


def plan_runs(cfg: ToyConfig) -> list[Run]:
    """The runs a study makes; static runs come after the GradNorm run of the same seed."""
    runs: list[Run] = []
    for seed in range(cfg.seeds):
        gradnorm_alphas: set[float] = set()

        def add_gradnorm(alpha: float, seed: int = seed, seen: set = gradnorm_alphas) -> None:
            if alpha not in seen:
                seen.add(alpha)
                runs.append(Run("gradnorm", seed, alpha))

        for m in cfg.methods:
            if m == "gradnorm":
                add_gradnorm(cfg.alpha)
            elif m == "static":
                add_gradnorm(cfg.alpha)  # its final weights are what static holds fixed
                runs.append(Run("static", seed))
            else:
                runs.append(Run(m, seed))
        for a in cfg.alphas:
            add_gradnorm(a)
    # a static run needs the GradNorm run of its seed first
    return sorted(runs, key=lambda r: (r.seed, r.method == "static"))


def run_study(cfg: ToyConfig, on_step: Callable[[], None] | None = None
              ) -> tuple[list[dict], list[dict]]:
    """Run every planned run; returns (all metric rows, per-run summaries)."""
    data = make_data(cfg)
    rows: list[dict] = []
    summaries: list[dict] = []
    final_weights: dict[int, list[float]] = {}
    for run in plan_runs(cfg):
        if run.method == "static":
            run.static_weights = final_weights[run.seed]
        r, s = train_run(run, cfg, data, on_step)
        if run.method == "gradnorm" and run.alpha == cfg.alpha:
            final_weights[run.seed] = s["final_weights"]
        rows.extend(r)
        summaries.append(s)
    return rows, summaries


def config_dict(cfg: ToyConfig) -> dict:
    """The configuration as JSON-ready data."""
    d = asdict(cfg)
    d["methods"] = list(cfg.methods)
    d["alphas"] = list(cfg.alphas)
    return d
