"""combine: what *measure* found, over micro-batches (accumulation) and processes (DDP).

The step's second stage: ``over_processes`` turns one process's ``Measurement`` into that of
all processes together, ``Window`` sums the calls of an accumulation window, so that the
update sees what one process would measure on the whole batch.

Two kinds of tensors carry the norms. At per-sample tensors (the tapped h, or any non-leaf
tensor) each micro-batch or process holds the gradient of its own samples, so the norm of the
whole is the root of the summed squares: with L = (1/P) sum_p L_p, the gradient at the stacked
h is (1/P) [dL_p/dh_p]_p and ||.|| = sqrt(sum_p ||dL_p/dh_p||^2) / P, exact. At parameters
every part holds a gradient of the same tensor, and the norm of their mean needs the T
gradients themselves: with ``parameter_norms="exact"`` each part keeps its T per-task
gradients v_i at the shared parameters ([T, P], see ``_taps.per_task_vectors``), the window
sums them (its calls backpropagate 1/k of the weighted loss, so the sum is the gradient of the
window's mean loss) and the processes average them (one all-reduce of T x P numbers), and
G_i = ||v_i|| of the whole, exact. With ``"mean"`` only the parts' norms travel: the mean
(processes) or the sum of the 1/k-scaled norms (micro-batches), an upper bound of the exact
G_i by the triangle inequality, at no memory or communication cost.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor
from torch import distributed as dist

from ._taps import Measurement, row_norms


def is_process_group(group: object) -> bool:
    """Whether ``group`` is a torch.distributed process group."""
    return dist.is_available() and isinstance(group, dist.ProcessGroup)


def check_distributed(distributed: object) -> object:
    """The ``distributed`` option, checked: None, True, False or a process group (TypeError
    otherwise)."""
    if not (distributed is None or isinstance(distributed, bool)
            or is_process_group(distributed)):
        raise TypeError(
            "distributed must be None, True, False or a torch.distributed process group, got "
            f"{type(distributed).__name__}"
        )
    return distributed


def is_synced(distributed: object) -> bool:
    """Whether a step synchronises over processes: ``distributed`` True or a group; None (the
    default) when torch.distributed is initialised with more than one process."""
    if distributed is None:
        return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    return distributed is not False


def process_group(distributed: object, owner_name: str) -> Any:
    """The process group to synchronise over (None: the default group); a ValueError naming
    ``owner_name`` when ``distributed`` asks for processes that torch.distributed lacks."""
    if distributed is None or distributed is False:
        return None
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            f"{owner_name}(distributed=...) needs torch.distributed to be initialised "
            "(torch.distributed.init_process_group) before backward"
        )
    return None if distributed is True else distributed


def mean_over_processes(values: Tensor, group: Any, *, in_place: bool = False) -> Tensor:
    """The mean of ``values`` over the processes of ``group`` (one all-reduce); ``in_place``
    overwrites ``values`` (a scratch tensor) instead of a copy."""
    values = values if in_place else values.clone()
    dist.all_reduce(values, group=group)
    return values.div_(dist.get_world_size(group))


def norms_over_processes(norms: Tensor, per_sample: bool, group: Any) -> Tensor:
    """G_i over the processes: root of the summed squares / P at h, the mean at parameters."""
    size = dist.get_world_size(group)
    if per_sample:
        squares = norms.square()
        dist.all_reduce(squares, group=group)
        return squares.sqrt_().div_(size)
    return mean_over_processes(norms, group)


def over_processes(measured: Measurement, group: Any, window: bool) -> Measurement:
    """The Measurement of all processes of ``group`` together (one all-reduce).

    Kept per-task gradients are averaged and their norms taken (the exact G_i) when each call
    makes an update; within an accumulation window (``window``) the processes average the
    window's sums once, at its end, and each call all-reduces its T norms only (root of the
    summed squares / P at per-sample tensors, the mean at parameters), so that every process
    agrees on a non-finite one.
    """
    if measured.vectors is not None and not window:
        vectors = mean_over_processes(measured.vectors, group, in_place=True)
        return measured._replace(norms=row_norms(vectors), vectors=vectors)
    return measured._replace(norms=norms_over_processes(measured.norms, measured.per_sample,
                                                        group))


class Window:
    """Sums over a gradient-accumulation window: L_i, G_i (squares at h, plain at W) and,
    for exact norms at parameters, the per-task gradients v_i [T, P]."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.reset()

    def reset(self) -> None:
        self.count, self.finite = 0, True
        self.per_sample: bool | None = None
        self.values: Tensor | None = None
        self.norms: Tensor | None = None
        self.vectors: Tensor | None = None

    def check(self, per_sample: bool, vector_shape: tuple[int, ...] | None = None) -> None:
        """Every call of a window measures in the same place (h or parameters) and keeps
        per-task gradients of the same shape, or none (checked before a call changes state)."""
        if self.per_sample is None:  # no call measured anything yet
            return
        if per_sample != self.per_sample:
            raise ValueError(
                "the gradient norms of this accumulation window were measured at "
                f"{'h' if self.per_sample else 'parameters'}; a call in the same window "
                "cannot measure them elsewhere"
            )
        before = None if self.vectors is None else tuple(self.vectors.shape)
        if vector_shape != before:
            raise ValueError(
                "the shared tensors changed within an accumulation window (per-task gradients "
                f"of shape {before} before, {vector_shape} now): pass the same shared= to "
                "every call of a window"
            )

    def add(self, values: Tensor, norms: Tensor, per_sample: bool, finite: bool,
            vectors: Tensor | None = None
            ) -> tuple[Tensor, Tensor, bool, Tensor | None] | None:
        """Add one call; at the window's last call return (mean L, G, finite, summed v) and
        reset. G is the combination of the calls' norms (exact at h; at parameters the sum,
        which the caller replaces by the norms of the summed v when it kept them)."""
        part = norms.square() if per_sample else norms
        self.values = values.clone() if self.values is None else self.values + values
        self.norms = part.clone() if self.norms is None else self.norms + part
        if vectors is not None:
            self.vectors = (vectors.clone() if self.vectors is None
                            else self.vectors.add_(vectors))
        self.count += 1
        self.finite &= finite
        self.per_sample = per_sample
        if self.count < self.size:
            return None
        out = (self.values / self.size,
               self.norms.sqrt() if per_sample else self.norms, self.finite, self.vectors)
        self.reset()
        return out

    def add_skipped(self) -> None:
        """A call that measured nothing: it still counts, and the window makes no update."""
        self.count += 1
        self.finite = False
        if self.count >= self.size:
            self.reset()

    def apply(self, fn: Any) -> None:
        """Map the window's tensors with ``fn`` (the balancer's ``.to()``, ``.double()``...)."""
        for name in ("values", "norms", "vectors"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, fn(value))

    def state(self) -> dict[str, Any]:
        return {"count": self.count, "finite": self.finite, "per_sample": self.per_sample,
                "values": self.values, "norms": self.norms, "vectors": self.vectors}

    def load(self, state: dict[str, Any]) -> None:
        self.count, self.finite = state["count"], state["finite"]
        self.per_sample, self.values, self.norms = (
            state["per_sample"], state["values"], state["norms"])
        self.vectors = state.get("vectors")
