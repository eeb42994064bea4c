"""NYUv2 (segmentation, depth, normals) with every balancer: the GradNorm paper's benchmark.

One study trains, per seed and method, a SegNet-style network (``nyuv2_model``) on the
preprocessed NYUv2 copy (``nyuv2_data``) with the literature's losses and evaluates the
validation split after every epoch (``nyuv2_metrics``). Methods:

    single       one network per task (the delta_m baselines: three runs a seed)
    equal        w = (1, 1, 1)
    gradnorm     GradNorm (Chen et al., ICML 2018) with alpha = 1.5, the paper's NYUv2 value;
                 norms G_i at the last shared conv's weight W (``SegNet.last_shared``), read
                 from the tapped decoder output h: one ordinary backward, then per task one
                 vector-Jacobian product from h back to W through that last conv-BN-ReLU
                 (``--gradnorm-at h`` measures at h itself instead)
    gradnorm-log GradNorm with ``log_weights=True``: the same alpha, lr and norms, but the
                 weights' optimizer steps s = log w (multiplicative steps: a small weight
                 does not overshoot onto the floor); not in the default --methods
    uncertainty  Kendall et al. (CVPR 2018), kinds classification / regression / regression
    dtp          Guo et al. (ECCV 2018); KPIs from each training batch, see
                 ``nyuv2_metrics.kpis``: pixel accuracy, depth delta < 1.25, normals within
                 22.5 degrees
    static       fixed weights: ``static_weights`` if given, else the final weights of the
                 GradNorm run of the same seed (retrained from scratch, the paper's Sec. 5.4)

Schedule (MTAN's, Liu et al., CVPR 2019): Adam, lr 1e-4 halved every 100 epochs, batch 2,
200 epochs. Every epoch ends with a checkpoint (model, optimizer, scheduler, balancer, grad
scaler, RNG state, the rows so far); the batch order of an epoch comes from a generator
seeded by (seed, epoch), so a resumed run continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

import lossbalance as lb

from . import nyuv2_metrics as nm
from . import report
from .nyuv2_data import Layout, NYUv2, check_layout
from .nyuv2_model import TASKS, SegNet
from .study import check_methods

METHODS = ("single", "equal", "gradnorm", "gradnorm-log", "uncertainty", "dtp", "static")
#: The default --methods (gradnorm-log is asked for by name).
DEFAULT_METHODS = ("single", "equal", "gradnorm", "uncertainty", "dtp", "static")
#: The methods that are GradNorm (tapped h, norms at ``--gradnorm-at``).
GRADNORM_METHODS = ("gradnorm", "gradnorm-log")
UNCERTAINTY_KINDS = ("classification", "regression", "regression")
AMP = ("none", "bf16", "fp16")
GRADNORM_AT = ("weight", "h")
#: Settings a resumed study may change (the rest must equal the study's config.json).
RESUMABLE = ("data", "epochs", "device", "workers")
CHECKPOINT_VERSION = 1
#: summary.json's baseline_source where the baselines are this study's single runs.
SINGLE_SOURCE = "single-task runs of this study"


@dataclass
class NYUv2Config:
    """One study. Defaults follow MTAN's NYUv2 recipe and the GradNorm paper's alpha."""

    data: str
    methods: tuple[str, ...] = DEFAULT_METHODS
    seeds: int = 1
    epochs: int = 200
    batch_size: int = 2
    lr: float = 1e-4
    lr_step: int = 100
    lr_gamma: float = 0.5
    width: int = 64
    limit: int | None = None
    alpha: float = 1.5
    weight_lr: float = 0.025
    gradnorm_at: str = "weight"
    dtp_gamma: float = 1.0
    static_weights: tuple[float, ...] | None = None
    device: str = "cpu"
    amp: str = "none"
    workers: int = 0

    def __post_init__(self) -> None:
        self.methods = tuple(self.methods)
        if self.static_weights is not None:
            self.static_weights = tuple(float(w) for w in self.static_weights)
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first bad setting."""
        check_methods(self.methods, METHODS)
        for name in ("seeds", "epochs", "batch_size", "lr_step", "width"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be an integer >= 1, got {value}")
        if self.limit is not None and (isinstance(self.limit, bool)
                                       or not isinstance(self.limit, int) or self.limit < 1):
            raise ValueError(f"--limit must be an integer >= 1, got {self.limit}")
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) \
                or self.workers < 0:
            raise ValueError(f"--workers must be an integer >= 0, got {self.workers}")
        for name in ("lr", "weight_lr", "lr_gamma"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {value}")
        for name in ("alpha", "dtp_gamma"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {value}")
        if self.gradnorm_at not in GRADNORM_AT:
            raise ValueError(f"--gradnorm-at must be one of {', '.join(GRADNORM_AT)}, "
                             f"got {self.gradnorm_at!r}")
        if self.amp not in AMP:
            raise ValueError(f"--amp must be one of {', '.join(AMP)}, got {self.amp!r}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"--device must be cpu or cuda, got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is available to torch here")
        if self.static_weights is not None:
            if len(self.static_weights) != len(TASKS):
                raise ValueError(f"--static-weights needs {len(TASKS)} values ("
                                 f"{', '.join(TASKS)}), got {len(self.static_weights)}")
            for task, w in zip(TASKS, self.static_weights, strict=True):
                if not math.isfinite(w) or w <= 0:
                    raise ValueError(f"--static-weights: the weight of {task} is {w}; "
                                     "static weights must be finite and > 0")
            if "static" not in self.methods:
                raise ValueError("--static-weights is given but --methods has no static")


def config_dict(cfg: NYUv2Config) -> dict[str, Any]:
    """The configuration as JSON-ready data."""
    d = asdict(cfg)
    d["methods"] = list(cfg.methods)
    d["static_weights"] = None if cfg.static_weights is None else list(cfg.static_weights)
    return d


@dataclass(frozen=True)
class Run:
    """One training run: a method and a seed (and, for ``single``, its task)."""

    method: str
    seed: int
    task: str | None = None

    @property
    def name(self) -> str:
        if self.task is not None:
            return f"{self.method}-{self.task}-seed{self.seed}"
        return f"{self.method}-seed{self.seed}"

    @property
    def tasks(self) -> tuple[str, ...]:
        return TASKS if self.task is None else (self.task,)


def plan_runs(cfg: NYUv2Config) -> list[Run]:
    """The runs of a study; a static run without --static-weights follows the GradNorm run
    of its seed (added when --methods lacks it)."""
    runs: list[Run] = []
    for seed in range(cfg.seeds):
        mine: list[Run] = []
        for m in cfg.methods:
            if m == "single":
                mine += [Run("single", seed, t) for t in TASKS]
            elif m != "static":
                mine.append(Run(m, seed))
        if "static" in cfg.methods:
            if cfg.static_weights is None and Run("gradnorm", seed) not in mine:
                mine.append(Run("gradnorm", seed))
            mine.append(Run("static", seed))
        runs += mine
    return runs


def _balancer(run: Run, cfg: NYUv2Config, static: Sequence[float] | None) -> lb.Balancer | None:
    T = len(TASKS)
    if run.method == "single":
        return None
    if run.method == "equal":
        return lb.EqualWeighting(T, task_names=TASKS)
    if run.method == "gradnorm":
        return lb.GradNorm(T, alpha=cfg.alpha, lr=cfg.weight_lr, task_names=TASKS)
    if run.method == "gradnorm-log":
        return lb.GradNorm(T, alpha=cfg.alpha, lr=cfg.weight_lr, log_weights=True,
                           task_names=TASKS)
    if run.method == "uncertainty":
        return lb.UncertaintyWeighting(T, UNCERTAINTY_KINDS, task_names=TASKS)
    if run.method == "dtp":
        return lb.DynamicTaskPrioritization(T, gamma=cfg.dtp_gamma, task_names=TASKS)
    if run.method == "static":
        if static is None:
            raise ValueError(f"{run.name}: no static weights (no GradNorm run of seed "
                             f"{run.seed} and no --static-weights)")
        return lb.StaticWeighting(static, task_names=TASKS)
    raise ValueError(f"unknown method {run.method!r}")


def _autocast(cfg: NYUv2Config) -> Any:
    if cfg.amp == "none":
        return nullcontext()
    dtype = torch.bfloat16 if cfg.amp == "bf16" else torch.float16
    return torch.autocast(device_type=cfg.device, dtype=dtype)


def _to(batch: Sequence[torch.Tensor], device: torch.device) -> tuple[torch.Tensor, dict]:
    image, label, depth, normal = (t.to(device, non_blocking=True) for t in batch)
    return image, {"segmentation": label, "depth": depth, "normal": normal}


@torch.no_grad()
def evaluate(model: SegNet, loader: DataLoader, cfg: NYUv2Config) -> dict[str, float]:
    """The validation metrics of ``model``'s tasks over the whole loader (eval mode)."""
    device = torch.device(cfg.device)
    model.eval()
    acc = nm.Metrics(model.tasks, device)
    for batch in loader:
        image, targets = _to(batch, device)
        with _autocast(cfg):
            preds = model(image)
        acc.update({t: p.float() for t, p in preds.items()}, targets)
    model.train()
    return acc.compute()


def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The training order of one epoch: a permutation drawn from (seed, epoch) alone."""
    gen = torch.Generator().manual_seed(1_000_003 * seed + epoch)
    return torch.randperm(n, generator=gen).tolist()


def _columns() -> list[str]:
    cols = ["run", "method", "seed", "task", "epoch", "lr"]
    cols += [f"train_loss_{t}" for t in TASKS] + [f"weight_{t}" for t in TASKS]
    cols += [name for name, _, _ in nm.METRICS] + ["epoch_time_s"]
    return cols


def _save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _load_checkpoint(path: Path, device: str | None = None, mmap: bool = False) -> dict:
    try:
        return torch.load(path, map_location=device, weights_only=True, mmap=mmap)
    except Exception as exc:
        raise ValueError(f"checkpoint {path} cannot be read ({exc})") from None


def checkpoint_path(out: Path, run: Run) -> Path:
    return out / "checkpoints" / f"{run.name}.pt"


def train_run(run: Run, cfg: NYUv2Config, layout: Layout, out: Path,
              static: Sequence[float] | None = None,
              on_step: Callable[[], None] | None = None,
              on_epoch: Callable[[list[dict]], None] | None = None) -> tuple[list[dict], dict]:
    """Train (or continue from its checkpoint in ``out``) one run to ``cfg.epochs``;
    returns (its rows of metrics.csv, its summary). ``on_step()`` follows every training
    step, ``on_epoch(rows)`` every epoch's checkpoint."""
    device = torch.device(cfg.device)
    train_set = NYUv2(layout, "train", cfg.limit)
    val_set = NYUv2(layout, "val", cfg.limit)
    pin = device.type == "cuda"
    val_loader = DataLoader(val_set, batch_size=cfg.batch_size, shuffle=False,
                            num_workers=cfg.workers, pin_memory=pin)

    torch.manual_seed(run.seed)  # initialisation: the same for every method of a seed
    model = SegNet(cfg.width, run.tasks).to(device)
    bal = _balancer(run, cfg, static)
    params = list(model.parameters())
    if bal is not None:
        bal.to(device)
        params += list(bal.parameters())  # Uncertainty Weighting's log-variances
    opt = torch.optim.Adam(params, lr=cfg.lr)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.lr_step, gamma=cfg.lr_gamma)
    scaler = torch.amp.GradScaler(cfg.device) if cfg.amp == "fp16" else None

    rows: list[dict] = []
    start_epoch = 0
    wall = 0.0
    path = checkpoint_path(out, run)
    if path.exists():
        state = _load_checkpoint(path, cfg.device)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if bal is not None:
            bal.load_state_dict(state["balancer"])
        if scaler is not None:
            scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"]["cpu"])
        if device.type == "cuda" and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        rows, start_epoch, wall = list(state["rows"]), int(state["epoch"]), float(state["wall"])

    for epoch in range(start_epoch, cfg.epochs):
        started = time.perf_counter()
        loader = DataLoader(train_set, batch_size=cfg.batch_size,
                            sampler=_epoch_order(len(train_set), run.seed, epoch),
                            num_workers=cfg.workers, pin_memory=pin)
        loss_sum = torch.zeros(len(run.tasks), dtype=torch.float64, device=device)
        weight_sum = torch.zeros(len(run.tasks), dtype=torch.float64, device=device)
        steps = 0
        lr = opt.param_groups[0]["lr"]
        for batch in loader:
            image, targets = _to(batch, device)
            opt.zero_grad(set_to_none=True)
            with _autocast(cfg):
                h = model.trunk(image)
                tap = bal is not None and run.method in GRADNORM_METHODS
                feats = bal.tap(h) if tap else (h,) * len(run.tasks)
                preds = {t: model.head(t, f) for t, f in zip(run.tasks, feats, strict=True)}
            losses = [nm.LOSSES[t](preds[t], targets[t]) for t in run.tasks]
            if bal is None:
                (losses[0] if scaler is None else scaler.scale(losses[0])).backward()
                weights = torch.ones(1, device=device)
            else:
                if run.method in GRADNORM_METHODS:
                    shared = model.last_shared if cfg.gradnorm_at == "weight" else None
                    bal.backward(losses, shared=shared, grad_scaler=scaler)
                elif run.method == "dtp":
                    bal.backward(losses, kpis=nm.kpis(preds, targets), grad_scaler=scaler)
                else:
                    bal.backward(losses, grad_scaler=scaler)
                weights = bal.stats.get("weight", bal.weights)
            if scaler is None:
                opt.step()
            else:
                scaler.step(opt)
                scaler.update()
            loss_sum += torch.stack([loss.detach() for loss in losses]).double()
            weight_sum += weights.detach().to(weight_sum)
            steps += 1
            if on_step is not None:
                on_step()
        with warnings.catch_warnings():
            # a GradScaler skips the optimizer step on an overflow (the first steps, while
            # it finds its scale), which PyTorch mistakes for steps in the wrong order
            warnings.filterwarnings("ignore", re.escape("Detected call of `lr_scheduler.step()`"))
            sched.step()
        metrics = evaluate(model, val_loader, cfg)
        elapsed = time.perf_counter() - started
        wall += elapsed
        row: dict[str, Any] = dict.fromkeys(_columns(), "")
        row.update(run=run.name, method=run.method, seed=run.seed, task=run.task or "",
                   epoch=epoch + 1, lr=lr, epoch_time_s=round(elapsed, 3))
        for t, loss, w in zip(run.tasks, (loss_sum / steps).tolist(),
                              (weight_sum / steps).tolist(), strict=True):
            row[f"train_loss_{t}"] = loss
            if bal is not None:
                row[f"weight_{t}"] = w
        row.update(metrics)
        rows.append(row)
        _save({
            "version": CHECKPOINT_VERSION,
            "run": run.name,
            "epoch": epoch + 1,
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "balancer": None if bal is None else bal.state_dict(),
            "scaler": None if scaler is None else scaler.state_dict(),
            "rng": {"cpu": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else None},
            "rows": rows,
            "wall": wall,
            "final_weights": None if bal is None else bal.weights.tolist(),
        }, path)
        if on_epoch is not None:
            on_epoch(rows)

    final = rows[-1]
    summary = {
        "run": run.name,
        "method": run.method,
        "seed": run.seed,
        "task": run.task,
        "epochs": cfg.epochs,
        "metrics": {name: final[name] for name, task, _ in nm.METRICS if task in run.tasks},
        "final_weights": None if bal is None else [float(w) for w in bal.weights],
        "wall_time_s": wall,
    }
    return rows, summary


def check_resume(cfg: NYUv2Config, out: Path) -> None:
    """Before anything trains: the study in ``out`` has the same settings (but those of
    ``RESUMABLE``) and no checkpoint beyond ``cfg.epochs``."""
    saved_path = out / "config.json"
    if not saved_path.is_file():
        raise ValueError(f"--resume: {saved_path} is missing, so {out} holds no NYUv2 study")
    saved = json.loads(saved_path.read_text())
    now = config_dict(cfg)
    for f in fields(NYUv2Config):
        if f.name in RESUMABLE:
            continue
        if saved.get(f.name) != now[f.name]:
            raise ValueError(
                f"--resume: --{f.name.replace('_', '-')} is {now[f.name]!r} but the study in "
                f"{out} ran with {saved.get(f.name)!r} (only {', '.join(RESUMABLE)} may change)"
            )
    for run in plan_runs(cfg):
        path = checkpoint_path(out, run)
        if path.exists():
            epoch = int(_load_checkpoint(path, "cpu", mmap=True)["epoch"])
            if epoch > cfg.epochs:
                raise ValueError(f"--resume: {path} is at epoch {epoch}, beyond --epochs "
                                 f"{cfg.epochs}")


def total_steps(cfg: NYUv2Config, layout: Layout, out: Path | None = None) -> int:
    """Training steps still to run (for a progress bar), given the checkpoints in ``out``."""
    n = layout.sizes["train"] if cfg.limit is None else min(cfg.limit, layout.sizes["train"])
    per_epoch = math.ceil(n / cfg.batch_size)
    total = 0
    for run in plan_runs(cfg):
        done = 0
        if out is not None and checkpoint_path(out, run).exists():
            done = int(_load_checkpoint(checkpoint_path(out, run), "cpu", mmap=True)["epoch"])
        total += per_epoch * max(cfg.epochs - done, 0)
    return total


def write_metrics(rows: list[dict], path: Path) -> None:
    """metrics.csv: one row per run and epoch (written to a temporary file, then moved)."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=_columns())
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def run_study(cfg: NYUv2Config, layout: Layout, out: Path,
              on_step: Callable[[], None] | None = None) -> tuple[list[dict], list[dict]]:
    """Train every planned run (continuing from ``out``'s checkpoints); metrics.csv is
    rewritten after every epoch. Returns (all rows, per-run summaries)."""
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    summaries: list[dict] = []
    gradnorm_final: dict[int, list[float]] = {}
    for run in plan_runs(cfg):
        static = None
        if run.method == "static":
            static = cfg.static_weights or gradnorm_final.get(run.seed)
        done = list(rows)
        r, s = train_run(run, cfg, layout, out, static, on_step,
                         lambda mine, done=done: write_metrics(done + mine, out / "metrics.csv"))
        if run.method == "gradnorm":
            gradnorm_final[run.seed] = s["final_weights"]
        rows += r
        summaries.append(s)
        write_metrics(rows, out / "metrics.csv")
    return rows, summaries


# ---------------------------------------------------------------------------- summary
def _mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}


def load_baseline(path: str | Path) -> dict[str, float]:
    """The single-task means of an earlier study's summary.json (``--baseline``)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        single = data["methods"]["single"]["metrics"]
        baseline = {name: float(single[name]["mean"]) for name, _, _ in nm.METRICS}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"--baseline {path}: not a NYUv2 summary.json with single-task "
                         f"metrics ({type(exc).__name__}: {exc})") from None
    for name, value in baseline.items():
        if not math.isfinite(value) or value == 0:
            raise ValueError(f"--baseline {path}: its single-task {name} is {value}")
    return baseline


def summarize(summaries: list[dict], cfg: NYUv2Config, layout: Layout,
              baseline: dict[str, float] | None = None,
              baseline_source: str | None = None) -> dict:
    """Mean and std over seeds per method of the final-epoch metrics, and delta_m% against
    the single-task runs of this study (or ``baseline``)."""
    per_method: dict[str, list[dict]] = {}
    for s in summaries:
        if s["method"] == "single":
            # one entry a seed: the metrics of its three single-task runs together
            seeds = per_method.setdefault("single", [])
            entry = next((e for e in seeds if e["seed"] == s["seed"]), None)
            if entry is None:
                entry = {"seed": s["seed"], "metrics": {}, "final_weights": None,
                         "wall_time_s": 0.0}
                seeds.append(entry)
            entry["metrics"].update(s["metrics"])
            entry["wall_time_s"] += s["wall_time_s"]
        else:
            per_method.setdefault(s["method"], []).append(s)
    if baseline is None and "single" in per_method:
        single = per_method["single"]
        baseline = {name: statistics.fmean(e["metrics"][name] for e in single)
                    for name, _, _ in nm.METRICS}
        baseline_source = SINGLE_SOURCE
    methods: dict[str, dict] = {}
    order = [m for m in METHODS if m in per_method]
    for method in order:
        runs = per_method[method]
        entry: dict[str, Any] = {
            "metrics": {name: _mean_std([r["metrics"][name] for r in runs])
                        for name, _, _ in nm.METRICS},
            "wall_time_s": _mean_std([r["wall_time_s"] for r in runs]),
            "final_weights": None, "delta_m": None, "delta_m_task": None,
        }
        if runs[0]["final_weights"] is not None:
            entry["final_weights"] = [_mean_std([r["final_weights"][i] for r in runs])
                                      for i in range(len(TASKS))]
        if baseline is not None:
            ok = all(math.isfinite(r["metrics"][n]) for r in runs for n, _, _ in nm.METRICS)
            if ok and all(v != 0 for v in baseline.values()):
                entry["delta_m"] = _mean_std([nm.delta_m(r["metrics"], baseline)
                                              for r in runs])
                entry["delta_m_task"] = {
                    task: _mean_std([nm.delta_m(r["metrics"], baseline, tuple(
                        n for n, t, _ in nm.METRICS if t == task)) for r in runs])
                    for task in TASKS
                }
        methods[method] = entry
    return {
        "config": config_dict(cfg),
        "data": {"root": str(layout.root), "train": layout.sizes["train"],
                 "val": layout.sizes["val"], "height": layout.height, "width": layout.width},
        "baseline": baseline,
        "baseline_source": baseline_source,
        "methods": methods,
        "runs": summaries,
    }


_HEAD = {"miou": "mIoU %", "pixel_acc": "pix acc %", "abs_err": "abs err",
         "rel_err": "rel err", "angle_mean": "angle mean", "angle_median": "angle median",
         "within_11.25": "< 11.25° %", "within_22.5": "< 22.5° %", "within_30": "< 30° %"}


def _cell(ms: dict | None, digits: int = 4, std: bool = True,
          decimals: int | None = None) -> str:
    """mean ± std (``report.mean_std_text``), the mean alone over one seed."""
    if ms is None:
        return ""
    if not math.isfinite(ms["mean"]):
        return "nan"
    text = report.mean_std_text(ms, digits, decimals)
    return text if std and ms["n"] > 1 else text.split(" ± ")[0]


def write_summary(summary: dict, out: Path) -> None:
    """summary.json (everything) and summary.md (the table)."""
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "summary.md").write_text(summary_markdown(summary))


def is_summary(summary: Any) -> bool:
    """Whether ``summary`` (summary.json read back) is one this module wrote."""
    return isinstance(summary, dict) and {"config", "data", "baseline_source",
                                          "methods"} <= set(summary)


def summary_markdown(summary: dict) -> str:
    """summary.md's text from a summary (:func:`summarize`'s or summary.json read back):
    metrics with 4 significant digits, delta_m % with 2 decimals."""
    cfg, data = summary["config"], summary["data"]
    n_train = data["train"] if cfg["limit"] is None else min(cfg["limit"], data["train"])
    n_val = data["val"] if cfg["limit"] is None else min(cfg["limit"], data["val"])
    source = summary["baseline_source"] or "none: run single or pass --baseline"
    lines = [
        "# NYUv2 study",
        "",
        f"Data: {n_train} train / {n_val} val samples at {data['height']} x {data['width']} "
        f"from `{data['root']}`. SegNet width {cfg['width']}; {cfg['epochs']} epoch(s), batch "
        f"{cfg['batch_size']}, Adam lr {cfg['lr']:g} x {cfg['lr_gamma']:g} every "
        f"{cfg['lr_step']} epochs; AMP {cfg['amp']}; {cfg['seeds']} seed(s), mean ± std over "
        f"seeds. GradNorm alpha {cfg['alpha']:g} (norms at the "
        f"{'last shared conv weight' if cfg['gradnorm_at'] == 'weight' else 'shared feature map h'}"
        f"), weights' lr {cfg['weight_lr']:g}.",
        "",
        "Metrics of the last epoch on the val split. delta_m % is the mean over the 9 metrics "
        "of the relative change against the single-task baselines, signed so that higher is "
        f"better (baselines: {source}).",
        "",
    ]
    head = ["method", *(_HEAD[n] for n, _, _ in nm.METRICS), "delta_m %",
            "final w (seg, depth, normal)"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, m in summary["methods"].items():
        cells = [method] + [_cell(m["metrics"][n]) for n, _, _ in nm.METRICS]
        cells.append(_cell(m["delta_m"], decimals=2))
        w = m["final_weights"]
        cells.append("" if w is None else ", ".join(f"{x['mean']:.3g}" for x in w))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    single = summary["methods"].get("single")
    if single is not None and single["delta_m"] is not None and summary["baseline"] is not None \
            and summary["baseline_source"] == SINGLE_SOURCE:
        lines += [f"`single`: each seed's single-task networks scored against the baselines, "
                  f"their own mean over the {single['delta_m']['n']} seed(s), so its delta_m "
                  "is 0 on average by construction (printed as 0; summary.json keeps its "
                  "floating-point rounding); its ± is their spread over seeds.", ""]
    return "\n".join(lines)



def prepare_out(cfg: NYUv2Config, out: Path, *, force: bool = False, resume: bool = False,
                baseline_path: str | Path | None = None
                ) -> tuple[Layout, dict[str, float] | None]:
    """Every check that can refuse the command, then (only then) the output folder: emptied
    with ``force``, kept with ``resume``; config.json written. Returns the checked layout and
    the ``--baseline`` metrics. Raises ValueError with nothing written."""
    if force and resume:
        raise ValueError("--force and --resume contradict each other: pass one")
    layout = check_layout(cfg.data)
    baseline = None
    if baseline_path is not None:
        if "single" in cfg.methods:
            raise ValueError("--baseline is given and --methods has single: choose one source "
                             "of single-task baselines")
        baseline = load_baseline(baseline_path)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    nonempty = out.exists() and any(out.iterdir())
    if resume:
        if not nonempty:
            raise ValueError(f"--resume: {out} holds no study to continue")
        check_resume(cfg, out)
    elif nonempty and not force:
        raise ValueError(f"--out {out} is not empty (pass --force to replace it, or --resume "
                         "to continue the study in it)")
    if nonempty and force:
        for p in out.iterdir():
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config_dict(cfg), indent=2))
    return layout, baseline


def run_prepared(cfg: NYUv2Config, out: Path, layout: Layout,
                 baseline: dict[str, float] | None = None,
                 baseline_path: str | Path | None = None, quiet: bool = False) -> str:
    """After :func:`prepare_out`: train every run (a progress bar on stderr), then write
    summary.json and summary.md. Returns the closing line."""
    from tqdm import tqdm

    started = time.perf_counter()
    with tqdm(total=total_steps(cfg, layout, out), disable=quiet, unit="step",
              desc="nyuv2 study", file=sys.stderr, mininterval=1.0) as bar:
        _, summaries = run_study(cfg, layout, out, on_step=lambda: bar.update(1))
    summary = summarize(summaries, cfg, layout, baseline,
                        None if baseline_path is None else str(baseline_path))
    write_summary(summary, out)
    files = ", ".join(sorted(p.name for p in out.iterdir()))
    return f"nyuv2 study done in {time.perf_counter() - started:.0f} s: wrote {files} to {out}"
