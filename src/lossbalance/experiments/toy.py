"""The GradNorm paper's synthetic study (Chen et al., ICML 2018, Section 4).

T regression tasks share one input x in R^250 and predict

    f_i(x) = sigma_i * tanh((B + eps_i) x)  in R^100,

with B (100 x 250) drawn once with entries N(0, 10^2) (shared by all tasks) and eps_i
(100 x 250) drawn once per task with entries N(0, 3.5^2); x has entries U(0, 1). The scales
sigma_i differ by orders of magnitude, so an unweighted sum of the tasks' MSE losses is ruled
by the largest sigma. The model is the paper's: a 4 x 100 ReLU trunk and one affine head per
task; GradNorm measures gradient norms at the last shared layer's weight. Methods are ranked by
the normalised test loss sum_i MSE_i / sigma_i^2 (lower is better), so that the sigma = 100
task does not hide the others; the model of the last step is kept (no validation split).

Everything random (the problem, the model's initialisation, the batches) comes from seeded
``torch.Generator``s, so the same configuration gives the same metrics.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from . import runner
from .study import Batch, GridDefaults, Metric, Study, Summary

PAPER_ALPHAS = (0.0, 0.12, 0.5, 1.0, 1.5, 2.0, 3.0)
METHODS = runner.METHODS


def task_sigmas(num_tasks: int) -> list[float]:
    """The paper's (1, 100) for T = 2; for T > 2, sigma_i log-spaced over [1, 100]."""
    if num_tasks < 2:
        raise ValueError(f"the toy study needs at least 2 tasks, got {num_tasks}")
    return [10 ** (2 * i / (num_tasks - 1)) for i in range(num_tasks)]


@dataclass
class ToyData:
    """Train and test sets of the synthetic problem (targets per task)."""

    x_train: Tensor
    y_train: list[Tensor]
    x_test: Tensor
    y_test: list[Tensor]
    sigmas: list[float]


def make_toy_data(tasks: int, sigmas: Sequence[float], train_size: int, test_size: int,
                  data_seed: int) -> ToyData:
    """Draw B, eps_i and the inputs once from ``data_seed``."""
    gen = torch.Generator().manual_seed(data_seed)
    B = torch.randn(100, 250, generator=gen) * 10.0
    eps = [torch.randn(100, 250, generator=gen) * 3.5 for _ in range(tasks)]
    x = torch.rand(train_size + test_size, 250, generator=gen)
    ys = [s * torch.tanh(x @ (B + e).T) for s, e in zip(sigmas, eps, strict=True)]
    n = train_size
    return ToyData(x[:n], [y[:n] for y in ys], x[n:], [y[n:] for y in ys], list(sigmas))


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

    @property
    def shared(self) -> nn.Parameter:
        return self.last_shared


def _batch_indices(n: int, batch: int, steps: int, gen: torch.Generator) -> Iterator[Tensor]:
    """``steps`` batches of indices: epochs of a random permutation, short batches dropped."""
    done = 0
    while done < steps:
        for idx in torch.randperm(n, generator=gen).split(batch):
            if len(idx) < batch:
                continue
            yield idx
            done += 1
            if done == steps:
                return


def _positive_int(name: str, value: Any, least: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"--{name.replace('_', '-')} must be an integer >= {least}, got {value}")


class ToyStudy(Study):
    """The synthetic study on the runner (module docstring). Defaults are the README's run."""

    name = "toy"
    title = "GradNorm toy study"
    summary = Summary(key="normalized_test_loss", label="total (normalised)",
                      axis="test loss  Σ MSE_i / σ_i²", higher_is_better=False,
                      stem="test_loss")
    default_alpha = 0.12
    default_alphas = PAPER_ALPHAS

    def __init__(self, tasks: int = 2, steps: int = 2000, batch_size: int = 100,
                 train_size: int = 8000, test_size: int = 2000, lr: float = 1e-3,
                 log_every: int = 10, eval_every: int = 100, data_seed: int = 0,
                 sigmas: Sequence[float] | None = None) -> None:
        _positive_int("tasks", tasks, 2)
        for name, value in (("steps", steps), ("batch_size", batch_size),
                            ("train_size", train_size), ("test_size", test_size),
                            ("log_every", log_every), ("eval_every", eval_every)):
            _positive_int(name, value)
        if not isinstance(lr, int | float) or not math.isfinite(lr) or lr <= 0:
            raise ValueError(f"--lr must be > 0, got {lr}")
        if batch_size > train_size:
            raise ValueError(f"--batch-size {batch_size} is larger than the training set "
                             f"({train_size})")
        sigmas = list(sigmas) if sigmas else task_sigmas(tasks)
        if len(sigmas) != tasks:
            raise ValueError(f"{len(sigmas)} sigmas for {tasks} tasks")
        if not all(math.isfinite(s) and s > 0 for s in sigmas):
            raise ValueError(f"every sigma must be finite and > 0, got {sigmas}")
        self.tasks, self.steps, self.batch_size = tasks, steps, batch_size
        self.steps_per_epoch = train_size // batch_size  # short batches are dropped
        self.train_size, self.test_size, self.lr = train_size, test_size, lr
        self.log_every, self.eval_every, self.data_seed = log_every, eval_every, data_seed
        self.sigmas = sigmas
        self.task_names = tuple(f"task {i}" for i in range(tasks))
        self.task_labels = tuple(f"task {i} (σ={s:.3g})" for i, s in enumerate(sigmas))
        self.task_kinds = ("regression",) * tasks
        self.metrics = tuple(Metric("loss", i, higher_is_better=False, label="MSE")
                             for i in range(tasks))
        # T = 2: the ratio w_0/w_1 over 10^-1 .. 10^8, half a decade apart (at 2000 steps
        # the normalised test loss is lowest near 10^6 and rises again by 10^7 and 10^8);
        # T > 2: log10(w_0/w_i) in {0, 2, 4} (the larger sigma_i, the smaller w_i should
        # be), equal weights and a uniform sample of 9 more of the 3^(T-1) lattice points.
        self.grid = (GridDefaults(range=(-1.0, 8.0), levels=19, max_points=64) if tasks == 2
                     else GridDefaults(range=(0.0, 4.0), levels=3, max_points=10))

    def config(self) -> dict[str, Any]:
        return {"tasks": self.tasks, "steps": self.steps, "batch_size": self.batch_size,
                "train_size": self.train_size, "test_size": self.test_size, "lr": self.lr,
                "log_every": self.log_every, "eval_every": self.eval_every,
                "data_seed": self.data_seed, "sigmas": list(self.sigmas)}

    def describe(self, config: Mapping[str, Any]) -> list[str]:
        sig = ", ".join(f"{s:.3g}" for s in self.sigmas)
        return [
            f"T = {self.tasks} tasks, sigma = ({sig}), {self.steps} steps, batch "
            f"{self.batch_size}, {config['seeds']} seed(s); GradNorm alpha = "
            f"{config['alpha']}. Mean ± std over seeds.",
            "",
            "`total` is the sum over tasks of test MSE / sigma_i^2, so that the sigma = 100 "
            "task does not hide the others.",
        ]

    def make_data(self) -> ToyData:
        return make_toy_data(self.tasks, self.sigmas, self.train_size, self.test_size,
                             self.data_seed)

    def build_model(self, tasks: Sequence[int]) -> ToyNet:
        return ToyNet(len(tasks))

    def batches(self, data: ToyData, seed: int) -> Iterator[Batch]:
        gen = torch.Generator().manual_seed(10_000 + seed)  # batch order
        for idx in _batch_indices(self.train_size, self.batch_size, self.steps, gen):
            yield data.x_train[idx], [y[idx] for y in data.y_train]

    def task_loss(self, task: int, prediction: Tensor, batch: Batch) -> Tensor:
        return F.mse_loss(prediction, batch[1][task])

    def evaluate(self, model: nn.Module, data: ToyData, split: str,
                 tasks: Sequence[int]) -> dict[str, float]:
        """Per-task MSE on the held-out test set (the toy has no other split)."""
        if split != "test":
            raise ValueError(f"the toy study has a test split only, not {split!r}")
        h = model.trunk(data.x_test)
        return {f"loss_{t}": float(F.mse_loss(head(h), data.y_test[t]))
                for head, t in zip(model.heads, tasks, strict=True)}

    def summary_value(self, metrics: Mapping[str, float],
                      baseline: Mapping[str, float] | None) -> float:
        """sum_i test MSE_i / sigma_i^2."""
        return sum(metrics[f"loss_{i}"] / s ** 2 for i, s in enumerate(self.sigmas))


# ---------------------------------------------------------------------- in-process use
@dataclass
class ToyConfig:
    """A toy study and the runner's options in one object (for notebooks and scripts)."""

    tasks: int = 2
    methods: tuple[str, ...] = ("equal", "gradnorm", "uncertainty", "static", "dtp")
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
    grid_range: tuple[float, float] | None = None
    grid_levels: int | None = None
    grid_max_points: int | None = None
    workers: int = 1

    def __post_init__(self) -> None:
        self.options()  # validates
        if not self.sigmas:
            self.sigmas = list(self.study().sigmas)

    def study(self) -> ToyStudy:
        return ToyStudy(self.tasks, self.steps, self.batch_size, self.train_size,
                        self.test_size, self.lr, self.log_every, self.eval_every,
                        self.data_seed, self.sigmas or None)

    def options(self) -> runner.Options:
        return runner.Options(
            methods=tuple(self.methods), seeds=self.seeds, alpha=self.alpha,
            alphas=tuple(self.alphas), weight_lr=self.weight_lr, dtp_gamma=self.dtp_gamma,
            grid_range=self.grid_range, grid_levels=self.grid_levels,
            grid_max_points=self.grid_max_points, workers=self.workers,
        ).resolved(self.study())


def run_study(cfg: ToyConfig, on_step: Callable[[], None] | None = None
              ) -> tuple[list[dict], list[dict]]:
    """Run every planned run; returns (metrics rows, per-run records with ``test_loss``
    (per task) and ``normalized_test_loss``)."""
    study, options = cfg.study(), cfg.options()
    rows, records = runner.run_study(
        study, options, None if on_step is None else (lambda n: [on_step() for _ in range(n)]))
    for r in records:
        r["test_loss"] = [r["test"].get(f"loss_{i}") for i in range(study.tasks)]
        if r["method"] != "single":
            r["normalized_test_loss"] = study.summary_value(r["test"], None)
    return rows, records


def config_dict(cfg: ToyConfig) -> dict:
    """The configuration as JSON-ready data."""
    d = asdict(cfg)
    d["methods"] = list(cfg.methods)
    d["alphas"] = list(cfg.alphas)
    return d
