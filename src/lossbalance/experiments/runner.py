"""One runner for every study: methods, seeds, the static retrain, the grid, the alpha sweep.

A study (``experiments.study.Study``) says what is trained and measured; this module trains it
with every method asked for and hands the records to ``experiments.report`` and ``plots``.

Methods (``--methods``):

- ``single``: one network per task (the study's model with that task's head alone), trained on
  that task's loss; the baselines of delta_m. Added automatically where the study's summary
  needs it.
- ``equal``: w_i = 1. ``gradnorm``: ``lb.GradNorm(T, alpha, lr=weight_lr)`` with norms at the
  study's shared tensor (the paper's update of w). ``gradnorm-log``: the same with
  ``log_weights=True`` (the weights' optimizer steps log w: multiplicative steps).
- ``uncertainty``: ``lb.UncertaintyWeighting`` with the study's task kinds.
- ``dtp``: ``lb.DynamicTaskPrioritization(T, gamma=dtp_gamma)`` fed the study's KPIs from the
  training batch (``Study.kpis``).
- ``static``: ``lb.StaticWeighting`` holding the final weights of the ``gradnorm`` run (at the
  main alpha) of the same seed, retrained from scratch with the same initialisation and batches.
- ``grid``: ``lb.StaticWeighting`` at every point of ``experiments.grid.make_grid``, per seed.
- ``dwa``: ``lb.DWA(T)`` (temperature 2), ``bal.epoch_end()`` after each of the study's
  epochs (``Study.steps_per_epoch``).
- ``rlw``: ``lb.RLW(T, seed=seed)``, softmax of N(0, I) draws.
- ``gls``: ``lb.GLS(T)``, the geometric mean of the losses.
- ``famo``: ``lb.FAMO(T, update="explicit")`` driven as the official code: after the optimizer
  step the batch is evaluated again (no grad) and ``bal.update(new_losses)`` steps the logits.
  ``famo-next``: ``lb.FAMO(T)``, the logits stepped from the next step's losses (no extra
  forward).
- ``imtl-l``: ``lb.IMTLL(T)``, learned loss scales trained by the model's optimizer.
- ``mgda``, ``pcgrad`` (seed = the run's), ``cagrad``, ``imtl-g``, ``nash-mtl``, ``aligned-mtl``,
  ``upgrad``: the aggregation methods with their papers' defaults, the tap taken and the Gram
  matrix formed at the study's shared tensor (their weight columns are the coefficients c).
- ``db-mtl``: ``lb.DBMTL(T)`` at the study's shared tensor (the paper's and official code's
  defaults); its weight columns are alpha_i = max_j ||ghat_j|| / ||ghat_i||, its grad_norm
  columns ||grad_W log L_i|| = ||grad_W (w_i L_i)|| with w_i = 1 / L_i.

Each method is one :class:`Method` in ``METHOD_SPECS``: how its balancer is built and how a
step drives it (``backward`` with ``shared=``/``kpis=``, and a call after the optimizer step).
A method measured at the study's shared tensor is one line there, e.g.
``"mgda": Method(lambda study, run, options: lb.MGDA(study.num_tasks), shared=True)``.

The alpha sweep trains ``gradnorm`` at every ``--alphas`` value (one run per alpha and seed;
the main alpha's run is shared with the method comparison).

Determinism: seed s seeds torch's global generator before the model is built, and the study
draws its batches from s; every run trains with one intra-op thread, in this process or in a
worker process (``concurrent.futures.ProcessPoolExecutor``: forked on CPU, spawned for CUDA),
so the same settings give the same metrics.csv whatever ``workers`` is. (The thread count
matters: a 2000 x 100 matmul rounds differently on one thread and on two.)
"""

from __future__ import annotations

import copy
import dataclasses
import math
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import lossbalance as lb
from lossbalance._taps import per_task_norms

from . import grid as gridlib
from .study import Study, check_methods


@dataclass(frozen=True)
class StepContext:
    """What a method's ``after_step`` sees, after the optimizer step of ``step``."""

    study: Study
    model: torch.nn.Module
    batch: Any
    tasks: tuple[int, ...]
    step: int


@dataclass(frozen=True)
class Method:
    """How the runner builds one method's balancer and drives it, as a user would.

    ``make(study, run, options)``: the balancer. ``shared``: ``backward(losses,
    shared=study.shared(model))`` (methods that measure gradients there). ``kpis``:
    ``backward(losses, kpis=study.kpis(...))``. ``after_step(bal, context)``: called after each
    optimizer step. ``needs_epochs``: the study must have ``steps_per_epoch``.
    ``reports_grad_norms``: the balancer's ``stats["grad_norm"]`` fills metrics.csv's grad_norm
    columns (the runner measures ||grad_W (w_i L_i)|| for the others).
    """

    make: Callable[[Study, Run, Options], lb.Balancer]
    shared: bool = False
    kpis: bool = False
    after_step: Callable[[lb.Balancer, StepContext], None] | None = None
    needs_epochs: bool = False
    reports_grad_norms: bool = False


def _static(study: Study, run: Run, options: Options) -> lb.Balancer:
    if run.weights is None:
        raise ValueError(f"a {run.method} run needs its weights")
    return lb.StaticWeighting(run.weights)


def _epoch_end(bal: lb.Balancer, ctx: StepContext) -> None:
    """DWA: close the epoch after its last step."""
    if (ctx.step + 1) % ctx.study.steps_per_epoch == 0:
        bal.epoch_end()


def _famo_update(bal: lb.Balancer, ctx: StepContext) -> None:
    """FAMO as the official code drives it: the same batch's losses after the step."""
    with torch.no_grad():
        preds = ctx.study.forward(ctx.model, ctx.batch, lambda h: (h,) * len(ctx.tasks))
        bal.update([ctx.study.task_loss(t, p, ctx.batch)
                    for t, p in zip(ctx.tasks, preds, strict=True)])


#: Every method but ``single`` (no balancer), by its ``--methods`` name.
METHOD_SPECS: dict[str, Method] = {
    "equal": Method(lambda study, run, options: lb.EqualWeighting(study.num_tasks)),
    "gradnorm": Method(lambda study, run, options: lb.GradNorm(
        study.num_tasks, alpha=run.alpha, lr=options.weight_lr), shared=True,
        reports_grad_norms=True),
    "gradnorm-log": Method(lambda study, run, options: lb.GradNorm(
        study.num_tasks, alpha=run.alpha, lr=options.weight_lr, log_weights=True),
        shared=True, reports_grad_norms=True),
    "uncertainty": Method(lambda study, run, options: lb.UncertaintyWeighting(
        study.num_tasks, list(study.task_kinds))),
    "dtp": Method(lambda study, run, options: lb.DynamicTaskPrioritization(
        study.num_tasks, gamma=options.dtp_gamma), kpis=True),
    "static": Method(_static),
    "grid": Method(_static),
    "dwa": Method(lambda study, run, options: lb.DWA(study.num_tasks), after_step=_epoch_end,
                  needs_epochs=True),
    "rlw": Method(lambda study, run, options: lb.RLW(study.num_tasks, seed=run.seed)),
    "gls": Method(lambda study, run, options: lb.GLS(study.num_tasks)),
    "famo": Method(lambda study, run, options: lb.FAMO(study.num_tasks, update="explicit"),
                   after_step=_famo_update),
    "famo-next": Method(lambda study, run, options: lb.FAMO(study.num_tasks)),
    "imtl-l": Method(lambda study, run, options: lb.IMTLL(study.num_tasks)),
    "db-mtl": Method(lambda study, run, options: lb.DBMTL(study.num_tasks), shared=True,
                     reports_grad_norms=True),
    # the aggregation methods, with the tap and the Gram matrix at the study's shared tensor
    "mgda": Method(lambda study, run, options: lb.MGDA(study.num_tasks), shared=True),
    "pcgrad": Method(lambda study, run, options: lb.PCGrad(study.num_tasks, seed=run.seed),
                     shared=True),
    "cagrad": Method(lambda study, run, options: lb.CAGrad(study.num_tasks), shared=True),
    "imtl-g": Method(lambda study, run, options: lb.IMTLG(study.num_tasks), shared=True),
    "nash-mtl": Method(lambda study, run, options: lb.NashMTL(study.num_tasks), shared=True),
    "aligned-mtl": Method(lambda study, run, options: lb.AlignedMTL(study.num_tasks),
                          shared=True),
    "upgrad": Method(lambda study, run, options: lb.UPGrad(study.num_tasks), shared=True),
}

METHODS = ("single", *METHOD_SPECS)


@dataclass
class Options:
    """What the runner does with a study (the flags every study command shares).

    ``alpha`` None takes the study's ``default_alpha``; ``alphas`` None the study's
    ``default_alphas``; the grid settings None the study's ``grid`` defaults; ``workers`` None
    one worker per available CPU (at most one per run); ``workers`` 1 trains in this process.
    """

    methods: tuple[str, ...] = ("equal", "gradnorm", "uncertainty", "static", "dtp")
    seeds: int = 3
    alpha: float | None = None
    alphas: tuple[float, ...] | None = None
    weight_lr: float = 0.025
    dtp_gamma: float = 1.0
    grid_range: tuple[float, float] | None = None
    grid_levels: int | None = None
    grid_max_points: int | None = None
    workers: int | None = None
    device: str = "cpu"

    def resolved(self, study: Study) -> Options:
        """A copy with every None filled from the study; ValueError naming a bad setting."""
        opts = dataclasses.replace(
            self,
            methods=tuple(self.methods),
            alpha=self.alpha if self.alpha is not None else study.default_alpha,
            alphas=tuple(self.alphas if self.alphas is not None else study.default_alphas),
            grid_range=tuple(self.grid_range if self.grid_range is not None
                             else study.grid.range),
            grid_levels=self.grid_levels if self.grid_levels is not None else study.grid.levels,
            grid_max_points=(self.grid_max_points if self.grid_max_points is not None
                             else study.grid.max_points),
        )
        opts.validate(study)
        return opts

    def validate(self, study: Study) -> None:
        """Raise ValueError naming the first bad setting (nothing has run yet)."""
        check_methods(self.methods, METHODS)
        for m in self.methods:
            if m != "single" and METHOD_SPECS[m].needs_epochs and not study.steps_per_epoch:
                raise ValueError(f"method {m!r} needs epochs; the {study.name} study has no "
                                 "steps_per_epoch")
        if isinstance(self.seeds, bool) or not isinstance(self.seeds, int) or self.seeds < 1:
            raise ValueError(f"--seeds must be an integer >= 1, got {self.seeds}")
        for a in (self.alpha, *self.alphas):
            if not isinstance(a, int | float) or not math.isfinite(a) or a < 0:
                raise ValueError(f"alpha must be a finite number >= 0, got {a}")
        if not math.isfinite(self.weight_lr) or self.weight_lr <= 0:
            raise ValueError(f"--weight-lr must be > 0, got {self.weight_lr}")
        if not math.isfinite(self.dtp_gamma) or self.dtp_gamma < 0:
            raise ValueError(f"--dtp-gamma must be >= 0, got {self.dtp_gamma}")
        if self.workers is not None and (isinstance(self.workers, bool)
                                         or not isinstance(self.workers, int)
                                         or self.workers < 1):
            raise ValueError(f"--workers must be an integer >= 1, got {self.workers}")
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"--device {self.device!r} is not a torch device: {exc}") from None
        if "grid" in self.methods:
            gridlib.check_settings(study.num_tasks, self.grid_range, self.grid_levels,
                                   self.grid_max_points)

    def config(self) -> dict[str, Any]:
        """JSON-ready settings (merged into summary.json's "config")."""
        d = dataclasses.asdict(self)
        d["methods"] = list(self.methods)
        d["alphas"] = list(self.alphas or ())
        d["grid_range"] = list(self.grid_range) if self.grid_range is not None else None
        return d


@dataclass(frozen=True)
class Run:
    """One training run. ``variant``: the grid point's position (``grid``) or the task
    (``single``); ``weights``: the static weights (``static``, ``grid``)."""

    method: str
    seed: int
    alpha: float | None = None
    variant: int | None = None
    weights: tuple[float, ...] | None = None

    def tasks(self, num_tasks: int) -> tuple[int, ...]:
        return (self.variant,) if self.method == "single" else tuple(range(num_tasks))


def study_grid(study: Study, options: Options) -> gridlib.Grid | None:
    """The grid the study trains (None without ``grid``)."""
    if "grid" not in options.methods:
        return None
    return gridlib.make_grid(study.num_tasks, options.grid_range, options.grid_levels,
                             options.grid_max_points)


def plan_runs(study: Study, options: Options) -> list[Run]:
    """Every run of the study, in the order of metrics.csv (by seed; a seed's static run
    last, after the GradNorm run whose final weights it holds)."""
    grid = study_grid(study, options)
    methods = list(options.methods)
    if study.summary.needs_single and "single" not in methods:
        methods.insert(0, "single")
    runs: list[Run] = []
    for seed in range(options.seeds):
        alphas: set[float] = set()

        def add_gradnorm(alpha: float, seed: int = seed, seen: set = alphas) -> None:
            if alpha not in seen:
                seen.add(alpha)
                runs.append(Run("gradnorm", seed, alpha))

        for m in methods:
            if m == "gradnorm":
                add_gradnorm(options.alpha)
            elif m == "static":
                add_gradnorm(options.alpha)
                runs.append(Run("static", seed))
            elif m == "gradnorm-log":
                runs.append(Run(m, seed, options.alpha))
            elif m == "single":
                runs.extend(Run(m, seed, variant=t) for t in range(study.num_tasks))
            elif m == "grid":
                assert grid is not None
                runs.extend(Run(m, seed, variant=k, weights=p.weights)
                            for k, p in enumerate(grid.points))
            else:
                runs.append(Run(m, seed))
        for a in options.alphas:
            add_gradnorm(a)
    return sorted(runs, key=lambda r: (r.seed, r.method == "static"))


def total_steps(study: Study, runs: Sequence[Run]) -> int:
    """Optimizer steps over the whole study (the progress bar's total)."""
    return len(runs) * study.steps


def make_balancer(study: Study, run: Run, options: Options) -> lb.Balancer | None:
    """The run's balancer (None for a single-task run)."""
    if run.method == "single":
        return None
    if run.method not in METHOD_SPECS:
        raise ValueError(f"unknown method {run.method!r}")
    return METHOD_SPECS[run.method].make(study, run, options)


def columns(study: Study, with_variant: bool) -> list[str]:
    """metrics.csv's columns, in order."""
    cols = ["method", "alpha", "seed", *(["variant"] if with_variant else []), "step"]
    for i in range(study.num_tasks):
        cols += [f"loss_{i}", f"weight_{i}", f"loss_ratio_{i}", f"grad_norm_{i}"]
    for split in study.eval_splits:
        cols += [f"{split}_{m.key}" for m in study.metrics]
    return cols


def _evaluate(study: Study, model: torch.nn.Module, data: Any, split: str,
              tasks: Sequence[int]) -> dict[str, float]:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return study.evaluate(model, data, split, tasks)
    finally:
        model.train(was_training)


def train_run(study: Study, run: Run, data: Any, options: Options,
              on_step: Callable[[], None] | None = None) -> tuple[list[dict], dict]:
    """Train one model; returns (its metrics.csv rows, its record).

    The record: method, alpha, seed, variant, weights (static/grid), tasks, ``test`` (the
    kept model's test metrics by key), final_weights, selected_step, wall_time_s.
    """
    T = study.num_tasks
    tasks = run.tasks(T)
    device = torch.device(options.device)
    torch.manual_seed(run.seed)  # model initialisation
    model = study.build_model(tasks).to(device)
    bal = make_balancer(study, run, options)
    if bal is not None:
        bal.to(device)
    params = [*model.parameters(), *(bal.parameters() if bal is not None else ())]
    opt = study.make_optimizer(params)
    shared = study.shared(model)
    rows: list[dict] = []
    initial: Tensor | None = None
    best_score, best_state, best_step = -math.inf, None, -1
    last = study.steps - 1
    spec = METHOD_SPECS.get(run.method)
    ones = torch.ones(len(tasks))
    started = time.perf_counter()
    step = -1
    for step, raw in enumerate(study.batches(data, run.seed)):
        if step > last:
            raise ValueError(f"{study.name}.batches gave more than steps = {study.steps} batches")
        batch = study.to_device(raw, device)
        opt.zero_grad(set_to_none=True)
        tap = bal.tap if bal is not None else (lambda h: (h,))
        preds = study.forward(model, batch, tap)
        losses = [study.task_loss(t, p, batch) for t, p in zip(tasks, preds, strict=True)]
        values = torch.stack([loss.detach() for loss in losses])
        if initial is None:
            initial = values.clone()
        evaluating = step % study.eval_every == 0 or step == last
        logging = step % study.log_every == 0 or evaluating
        grad_norms = None
        if bal is None:
            weights = ones
            if logging:
                grad_norms = per_task_norms(losses, shared)
            losses[0].backward()
        else:
            assert spec is not None
            norms = None
            if logging and not spec.reports_grad_norms:
                # ||grad_W L_i||, times |w_i| of the step below: ||grad_W (w_i L_i)|| for
                # every method, so the columns compare (IMTL-G's c_i may be negative).
                norms = per_task_norms(losses, shared)
            kwargs: dict[str, Any] = {}
            if spec.shared:
                kwargs["shared"] = shared
            if spec.kpis:
                kwargs["kpis"] = study.kpis(values, initial, preds, batch)
            bal.backward(losses, **kwargs)
            weights = bal.stats.get("weight", bal.weights)
            if spec.reports_grad_norms:
                grad_norms = bal.stats["grad_norm"]
            elif norms is not None:
                grad_norms = norms * weights.to(values).abs()
        opt.step()
        if spec is not None and spec.after_step is not None:
            spec.after_step(bal, StepContext(study, model, batch, tasks, step))
        if on_step is not None:
            on_step()
        if not logging:
            continue
        row: dict = {"method": run.method, "alpha": "" if run.alpha is None else run.alpha,
                     "seed": run.seed}
        if run.variant is not None:
            row["variant"] = run.variant
        row["step"] = step
        ratio = values / initial
        for i in range(T):
            j = tasks.index(i) if i in tasks else None
            for name, vec in (("loss", values), ("weight", weights), ("loss_ratio", ratio),
                              ("grad_norm", grad_norms)):
                row[f"{name}_{i}"] = float(vec[j]) if j is not None and vec is not None else ""
        if evaluating:
            measured = {split: _evaluate(study, model, data, split, tasks)
                        for split in study.eval_splits}
            for split, values_ in measured.items():
                for key, v in values_.items():
                    row[f"{split}_{key}"] = v
            if study.selection_split is not None:
                split = study.selection_split
                sel = measured.get(split) or _evaluate(study, model, data, split, tasks)
                score = study.selection_score(sel, tasks)
                if score > best_score:
                    best_score, best_step = score, step
                    best_state = copy.deepcopy(model.state_dict())
        rows.append(row)
    if step != last:
        raise ValueError(f"{study.name}.batches gave {step + 1} batches, expected {study.steps}")
    if best_state is not None:
        model.load_state_dict(best_state)
    record = {
        "method": run.method,
        "alpha": run.alpha,
        "seed": run.seed,
        "variant": run.variant,
        "weights": list(run.weights) if run.weights is not None else None,
        "tasks": list(tasks),
        "test": _evaluate(study, model, data, "test", tasks),
        "final_weights": [float(w) for w in (bal.weights if bal is not None else ones)],
        "selected_step": best_step if study.selection_split is not None else last,
        "wall_time_s": time.perf_counter() - started,
    }
    return rows, record


# ---------------------------------------------------------------------- the whole study
_WORKER: dict[str, Any] = {}


def _init_worker(study: Study, counter: Any, data: Any = None) -> None:
    torch.set_num_threads(1)
    _WORKER.update(study=study, data=study.make_data() if data is None else data,
                   counter=counter)


def _work(run: Run, options: Options) -> tuple[list[dict], dict]:
    counter = _WORKER["counter"]

    def tick() -> None:
        with counter.get_lock():
            counter.value += 1

    return train_run(_WORKER["study"], run, _WORKER["data"], options, on_step=tick)


def default_workers(num_runs: int) -> int:
    """One worker per CPU this process may use, at most one per run."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, num_runs))


def _needs(run: Run, alpha: float) -> tuple[str, int, float] | None:
    return ("gradnorm", run.seed, alpha) if run.method == "static" else None


def run_study(study: Study, options: Options,
              on_steps: Callable[[int], None] | None = None
              ) -> tuple[list[dict], list[dict]]:
    """Train every planned run; returns (metrics.csv rows, run records), both in plan order.

    ``options`` must be resolved (:meth:`Options.resolved`). ``on_steps(n)`` is called as
    training advances by n steps (the progress bar).
    """
    runs = plan_runs(study, options)
    workers = options.workers or default_workers(len(runs))
    if workers == 1:
        return _run_here(study, options, runs, on_steps)
    return _run_pool(study, options, runs, min(workers, len(runs)), on_steps)


def _with_static(run: Run, done: dict[tuple, dict], alpha: float) -> Run:
    need = _needs(run, alpha)
    if need is None:
        return run
    return dataclasses.replace(run, weights=tuple(done[need]["final_weights"]))


def _key(run: Run) -> tuple:
    return (run.method, run.seed, run.alpha)


def _run_here(study: Study, options: Options, runs: list[Run],
              on_steps: Callable[[int], None] | None) -> tuple[list[dict], list[dict]]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = study.make_data()
        done: dict[tuple, dict] = {}
        results = []
        tick = (lambda: on_steps(1)) if on_steps is not None else None
        for run in runs:
            rows, record = train_run(study, _with_static(run, done, options.alpha), data,
                                     options, tick)
            done.setdefault(_key(run), record)
            results.append((rows, record))
    finally:
        torch.set_num_threads(threads)
    return [r for rows, _ in results for r in rows], [rec for _, rec in results]


def _run_pool(study: Study, options: Options, runs: list[Run], workers: int,
              on_steps: Callable[[int], None] | None) -> tuple[list[dict], list[dict]]:
    # fork on CPU: the workers start in milliseconds and share the parent's data (as
    # DataLoader's workers do); spawn where CUDA is in use (it does not survive a fork).
    fork = (torch.device(options.device).type == "cpu"
            and "fork" in multiprocessing.get_all_start_methods())
    ctx = multiprocessing.get_context("fork" if fork else "spawn")
    counter = ctx.Value("q", 0)
    data = study.make_data() if fork else None
    results: dict[int, tuple[list[dict], dict]] = {}
    done: dict[tuple, dict] = {}
    waiting = {k: r for k, r in enumerate(runs) if _needs(r, options.alpha) is not None}
    # runs that others wait on go first
    ready = sorted((k for k in range(len(runs)) if k not in waiting),
                   key=lambda k: (runs[k].method != "gradnorm", k))
    shown = 0
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                             initargs=(study, counter, data)) as pool:
        pending: dict[Future, int] = {pool.submit(_work, runs[k], options): k for k in ready}
        try:
            while pending:
                finished, _ = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                for fut in finished:
                    k = pending.pop(fut)
                    results[k] = fut.result()
                    done.setdefault(_key(runs[k]), results[k][1])
                for k, run in list(waiting.items()):
                    if _needs(run, options.alpha) in done:
                        del waiting[k]
                        pending[pool.submit(_work, _with_static(run, done, options.alpha),
                                            options)] = k
                if on_steps is not None:
                    now = counter.value
                    if now > shown:
                        on_steps(now - shown)
                        shown = now
        except BaseException:
            for fut in pending:
                fut.cancel()
            raise
    if waiting:
        raise RuntimeError(f"runs never started: {sorted(waiting)}")
    ordered = [results[k] for k in range(len(runs))]
    return [r for rows, _ in ordered for r in rows], [rec for _, rec in ordered]


# ---------------------------------------------------------------------- to a folder
def check_out(out: Path, force: bool) -> None:
    """Refuse an ``--out`` that is a file, or a non-empty folder without ``force``."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not force:
        raise ValueError(f"--out {out} is not empty (pass --force to replace it)")


def run_to_folder(study: Study, options: Options, out: Path, *, force: bool = False,
                  quiet: bool = False) -> tuple[dict, float]:
    """Check everything, train the whole study, then write metrics.csv, summary.json,
    summary.md and the plots to ``out`` (all at once, from a staging folder beside it).

    A bad setting raises ValueError before anything is trained or written. Returns the
    summary and the seconds it took.
    """
    from tqdm import tqdm

    from .. import plots
    from . import report

    options = options.resolved(study)
    check_out(out, force)
    grid = study_grid(study, options)
    runs = plan_runs(study, options)
    started = time.perf_counter()
    with tqdm(total=total_steps(study, runs), disable=quiet, unit="step",
              desc=f"{study.name} study", file=sys.stderr, mininterval=1.0) as bar:
        rows, records = run_study(study, options, on_steps=bar.update)
    config = {**study.config(), **options.config()}
    summary = report.summarize(study, config, records, grid)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}-") as tmp:
        staging = Path(tmp)
        with_variant = any(r.variant is not None for r in runs)
        report.write_metrics(rows, staging / "metrics.csv", columns(study, with_variant))
        report.write_summary(summary, staging, study.describe(config))
        plots.plot_study(staging)
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(staging, out)
    return summary, time.perf_counter() - started
