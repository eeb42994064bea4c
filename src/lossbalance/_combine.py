"""How GradNorm's L_i and G_i combine over micro-batches (accumulation) and processes (DDP).

Two kinds of tensors carry the norms. At per-sample tensors (the tapped h, or any non-leaf
tensor) each micro-batch or process holds the gradient of its own samples, so the norm of the
whole is the root of the summed squares: with L = (1/P) sum_p L_p, the gradient at the stacked
h is (1/P) [dL_p/dh_p]_p and ||.|| = sqrt(sum_p ||dL_p/dh_p||^2) / P, exact. At parameters
every part holds a gradient of the same tensor, and the norm of their mean needs the T
gradients themselves; the mean (processes) or the sum of the 1/k-scaled norms (micro-batches)
of the parts' norms is used instead: an upper bound of it, by the triangle inequality.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor
from torch import distributed as dist


def mean_over_processes(values: Tensor, group: Any) -> Tensor:
    """The mean of ``values`` over the processes of ``group`` (one all-reduce)."""
    values = values.clone()
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


class Window:
    """Sums over a gradient-accumulation window: L_i, and G_i (squares at h, plain at W)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.reset()

    def reset(self) -> None:
        self.count, self.finite = 0, True
        self.per_sample: bool | None = None
        self.values: Tensor | None = None
        self.norms: Tensor | None = None

    def check(self, per_sample: bool) -> None:
        if self.per_sample is not None and per_sample != self.per_sample:
            raise ValueError(
                "the gradient norms of this accumulation window were measured at "
                f"{'h' if self.per_sample else 'parameters'}; a call in the same window "
                "cannot measure them elsewhere"
            )

    def add(self, values: Tensor, norms: Tensor, per_sample: bool, finite: bool
            ) -> tuple[Tensor, Tensor, bool] | None:
        """Add one call; at the window's last call return (mean L, G, finite) and reset."""
        part = norms.square() if per_sample else norms
        self.values = values.clone() if self.values is None else self.values + values
        self.norms = part.clone() if self.norms is None else self.norms + part
        self.count += 1
        self.finite &= finite
        self.per_sample = per_sample
        if self.count < self.size:
            return None
        out = (self.values / self.size,
               self.norms.sqrt() if per_sample else self.norms, self.finite)
        self.reset()
        return out

    def add_skipped(self) -> None:
        """A call that measured nothing: it still counts, and the window makes no update."""
        self.count += 1
        self.finite = False
        if self.count >= self.size:
            self.reset()

    def state(self) -> dict[str, Any]:
        return {"count": self.count, "finite": self.finite, "per_sample": self.per_sample,
                "values": self.values, "norms": self.norms}

    def load(self, state: dict[str, Any]) -> None:
        self.count, self.finite = state["count"], state["finite"]
        self.per_sample, self.values, self.norms = (
            state["per_sample"], state["values"], state["norms"])
