"""What a study is: the part of an experiment that is not the runner.

A study supplies the data, the model (a shared trunk, one head per task, and the shared tensor
where GradNorm measures gradient norms), one loss and one or more test metrics per task, and a
scalar summary used to rank methods. The runner (``experiments.runner``) supplies everything
else: the methods and their balancers, seeds, the static retrain, the grid of static weights,
the alpha sweep, the training loop, worker processes, the files and the plots.

A new study is a subclass of :class:`Study` with its ``__init__`` (the settings, validated)
and the seven abstract methods; the toy study (``experiments.toy``) is the worked example.

The multi-task summary that compares against single-task baselines is

    delta_m% = 100 / T * sum_i (1 / K_i) sum_k s_ik (M_ik - B_ik) / B_ik,

with M the multi-task model's metrics, B the single-task baselines' (one network per task),
K_i the number of metrics of task i and s = +1 where higher is better, -1 where lower is better:
positive is better than single-task learning (Maninis, Radosavovic, Kokkinos, "Attentive
Single-Tasking of Multiple Tasks", CVPR 2019, Eq. 5, with a task's several metrics averaged
first so that every task counts once).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

TASK_KINDS = ("regression", "classification")

#: A batch as the runner sees it: the input and one target per task (in the study's task order).
Batch = tuple[Tensor, Sequence[Tensor]]


@dataclass(frozen=True)
class Metric:
    """One test metric of one task.

    ``name`` is shared by the tasks that report the same quantity ("loss", "accuracy"); the
    value's key is ``f"{name}_{task}"`` and its metrics.csv column ``f"{split}_{key}"``
    (``test_loss_0``).
    """

    name: str
    task: int
    higher_is_better: bool
    label: str = ""

    @property
    def key(self) -> str:
        return f"{self.name}_{self.task}"


@dataclass(frozen=True)
class Summary:
    """The scalar that ranks methods (one value per trained model).

    key: its name in summary.json and in each run's record ("normalized_test_loss").
    label: a short table heading ("total (normalised)"); axis: the plots' axis label.
    higher_is_better: its direction. stem: the summary plots' file-name stem
    (``{stem}_by_method.png``, ``{stem}_vs_alpha.png``).
    needs_single: the value compares against the single-task baselines (delta_m); the runner
    then trains them (method ``single``) even where ``--methods`` does not name it.
    decimals: summary.md prints the value (mean, std and gaps) with this many decimals
    (delta_m%: 1, so that ``-16.6 ± 0.7`` and a mean of 0 read as such); None: 4
    significant digits.
    """

    key: str
    label: str
    axis: str
    higher_is_better: bool
    stem: str
    needs_single: bool = False
    decimals: int | None = None


@dataclass(frozen=True)
class GridDefaults:
    """A study's default grid of static weights (see ``experiments.grid``): the free
    log10 weight ratios log10(w_0 / w_i) on ``levels`` values evenly spaced over ``range``,
    at most ``max_points`` points."""

    range: tuple[float, float]
    levels: int
    max_points: int


class Study(ABC):
    """One multi-task problem: data, model, per-task losses and metrics, a ranking scalar.

    Attributes a subclass sets (class attributes or in ``__init__``):

    - ``name``: the study's command name ("toy"); ``title``: summary.md's heading.
    - ``task_names``: one short name per task; ``task_labels``: longer legend labels.
    - ``task_kinds``: "regression" or "classification" per task (Uncertainty Weighting's form:
      1/(2 sigma^2) L + log sigma, or 1/sigma^2 L + log sigma).
    - ``metrics``: the test metrics (:class:`Metric`), in the order of their columns.
    - ``summary``: the ranking scalar (:class:`Summary`).
    - ``steps``: optimizer steps in one run; ``log_every``/``eval_every``: steps between rows
      of metrics.csv and between evaluations (the last step always logs and evaluates).
    - ``steps_per_epoch``: the steps of one pass over the training data, where the study has
      epochs (DWA closes an epoch after each); None where it has none.
    - ``eval_splits``: the splits evaluated (and logged) every ``eval_every`` steps.
    - ``selection_split``: None to keep the last step's model; a split name ("val") to keep
      the model of the evaluation with the best :meth:`selection_score` on that split. The
      final test metrics are always those of the kept model on the "test" split.
    - ``grid``: the default grid (:class:`GridDefaults`); ``default_alpha``: GradNorm's alpha
      for the method comparison; ``default_alphas``: the alpha sweep.

    Everything random must come from ``seed`` (the runner seeds ``torch``'s global generator
    with it before :meth:`build_model`), so that the same settings give the same metrics in
    any process.
    """

    name: str = "study"
    title: str = "Study"
    task_names: tuple[str, ...] = ()
    task_labels: tuple[str, ...] = ()
    task_kinds: tuple[str, ...] = ()
    metrics: tuple[Metric, ...] = ()
    summary: Summary
    grid: GridDefaults
    default_alpha: float = 1.5
    default_alphas: tuple[float, ...] = (0.0, 0.12, 0.5, 1.0, 1.5, 2.0, 3.0)
    steps: int = 1
    steps_per_epoch: int | None = None
    log_every: int = 10
    eval_every: int = 100
    eval_splits: tuple[str, ...] = ("test",)
    selection_split: str | None = None

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    # ------------------------------------------------------------------ what a study must say
    @abstractmethod
    def config(self) -> dict[str, Any]:
        """The study's settings as JSON-ready data (summary.json's "config")."""

    @abstractmethod
    def make_data(self) -> Any:
        """Build the data once (a worker process calls it once for all its runs)."""

    @abstractmethod
    def build_model(self, tasks: Sequence[int]) -> nn.Module:
        """A fresh model with one head per task in ``tasks`` (all of them, or one for the
        single-task baseline). By default the runner uses ``model.trunk``, ``model.heads``
        (in the order of ``tasks``) and ``model.shared`` (see :meth:`forward`,
        :meth:`shared`)."""

    @abstractmethod
    def batches(self, data: Any, seed: int) -> Iterable[Batch]:
        """Exactly ``self.steps`` training batches ``(x, targets)``, their order drawn from
        ``seed`` alone; ``targets[i]`` is task i's target (every task's, whatever the run)."""

    @abstractmethod
    def task_loss(self, task: int, prediction: Tensor, batch: Batch) -> Tensor:
        """Task ``task``'s scalar training loss on ``batch``."""

    @abstractmethod
    def evaluate(self, model: nn.Module, data: Any, split: str,
                 tasks: Sequence[int]) -> dict[str, float]:
        """The metrics of ``tasks`` on ``split``, keyed by :attr:`Metric.key` (``loss_0``).
        The runner calls it under ``torch.no_grad()`` with the model in eval mode."""

    @abstractmethod
    def summary_value(self, metrics: Mapping[str, float],
                      baseline: Mapping[str, float] | None) -> float:
        """The ranking scalar of one model from its test metrics (all tasks' keys);
        ``baseline`` is the single-task models' mean metrics where ``summary.needs_single``."""

    # ------------------------------------------------------------------ hooks with defaults
    def forward(self, model: nn.Module, batch: Batch,
                tap: Callable[[Tensor], Sequence[Tensor]]) -> list[Tensor]:
        """Predictions, one per head: ``heads[j](tap(trunk(x))[j])``. ``tap`` is the
        balancer's (GradNorm's fast path sees each head's read of the shared h)."""
        feats = tap(model.trunk(batch[0]))
        return [head(f) for head, f in zip(model.heads, feats, strict=True)]

    def shared(self, model: nn.Module) -> list[Tensor]:
        """The shared tensors where GradNorm measures ||grad (w_i L_i)|| (``model.shared``)."""
        shared = model.shared
        if isinstance(shared, Tensor):
            return [shared]
        if isinstance(shared, nn.Module):
            return [p for p in shared.parameters() if p.requires_grad]
        return list(shared)

    def make_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        """The model's optimizer (it also trains Uncertainty Weighting's log-variances)."""
        return torch.optim.Adam(params, lr=getattr(self, "lr", 1e-3))

    def kpis(self, values: Tensor, initial: Tensor, predictions: Sequence[Tensor],
             batch: Batch) -> Tensor:
        """DTP's key performance indicators in [0, 1], from training batches only. Default:
        kappa_i = 1 - min(1, L_i(t) / L_i(0)), the fraction of the first batch's loss
        removed (``values`` and ``initial`` are the T detached losses)."""
        return (1 - torch.clamp(values / initial, max=1.0)).clamp(0, 1)

    def selection_score(self, metrics: Mapping[str, float], tasks: Sequence[int]) -> float:
        """Higher is better; ranks evaluations on ``selection_split`` (``tasks``' metrics).
        Default: the mean over ``tasks``' metrics of s * value (s = +1 where higher is
        better, -1 where lower is) -- a study with metrics of different scales overrides it."""
        chosen = [m for m in self.metrics if m.task in tasks]
        return sum((1 if m.higher_is_better else -1) * metrics[m.key] for m in chosen) / len(
            chosen)

    def describe(self, config: Mapping[str, Any]) -> list[str]:
        """Lines (Markdown) under summary.md's heading: the setting, what the summary means."""
        return []

    def to_device(self, batch: Batch, device: torch.device) -> Batch:
        """Move a batch to the training device."""
        if device.type == "cpu":
            return batch
        return batch[0].to(device), [t.to(device) for t in batch[1]]


def delta_m(metrics: Mapping[str, float], baseline: Mapping[str, float],
            specs: Sequence[Metric]) -> float:
    """delta_m% against single-task baselines (module docstring), higher is better.

    ``metrics`` and ``baseline`` map :attr:`Metric.key` to values; each task's metrics are
    averaged first, then the tasks.
    """
    per_task: dict[int, list[float]] = {}
    for m in specs:
        base = baseline[m.key]
        if base == 0:
            raise ValueError(f"the single-task baseline of {m.key} is 0: delta_m is undefined")
        sign = 1.0 if m.higher_is_better else -1.0
        per_task.setdefault(m.task, []).append(sign * (metrics[m.key] - base) / base)
    if not per_task:
        raise ValueError("delta_m needs at least one metric")
    return 100.0 * sum(sum(v) / len(v) for v in per_task.values()) / len(per_task)


def check_methods(methods: Sequence[str], known: Sequence[str]) -> None:
    """Raise ValueError unless ``methods`` names at least one method, each of ``known``, once."""
    if not methods:
        raise ValueError("--methods must name at least one method")
    for m in methods:
        if m not in known:
            raise ValueError(f"unknown method {m!r}; choose from {', '.join(known)}")
    if len(set(methods)) != len(methods):
        raise ValueError(f"--methods names a method twice: {', '.join(methods)}")
