"""Fixed weights: the baselines GradNorm is compared with.

``EqualWeighting``: w_i = 1, the plain sum of losses.
``StaticWeighting``: w_i = T * c_i / sum_j c_j for user weights c, e.g. GradNorm's final weights
when retraining from scratch with them held fixed (Chen et al., ICML 2018, Section 5.4).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .. import _checks
from .base import Balancer, SharedLike


class StaticWeighting(Balancer):
    """Constant weights w_i = T c_i / sum_j c_j, with every c_i finite and > 0.

    ``backward`` computes sum_i w_i L_i and backpropagates it once; nothing is learned.
    """

    def __init__(
        self,
        weights: Sequence[float] | Tensor,
        *,
        task_names: Sequence[str] | None = None,
        on_nonfinite: str = "raise",
    ) -> None:
        raw = torch.as_tensor(
            weights.detach().cpu() if isinstance(weights, Tensor) else list(weights),
            dtype=torch.float32,
        ).reshape(-1)
        super().__init__(raw.numel(), task_names=task_names, on_nonfinite=on_nonfinite)
        ok = torch.isfinite(raw) & (raw > 0)
        if not bool(ok.all()):
            i = int((~ok).nonzero()[0, 0])
            raise ValueError(
                f"the weight of {_checks.task_label(i, self.task_names)} is {float(raw[i])}: "
                "static weights must be finite and > 0"
            )
        self.register_buffer("task_weights", raw * (self.num_tasks / raw.sum()))

    @property
    def weights(self) -> Tensor:
        return self.task_weights.detach().clone()

    def _step(self, losses: list[Tensor], stacked: Tensor, values: Tensor,
              shared: SharedLike, **signals: Any) -> Tensor:
        self._no_signals(signals)
        total = self._weighted_backward(stacked, self.task_weights)
        self.stats = {"weight": self.task_weights.detach().clone()}
        return total


class EqualWeighting(StaticWeighting):
    """w_i = 1 for every task: ``backward`` is ``sum(losses).backward()``."""

    def __init__(
        self,
        num_tasks: int,
        *,
        task_names: Sequence[str] | None = None,
        on_nonfinite: str = "raise",
    ) -> None:
        _checks.check_num_tasks(num_tasks)
        super().__init__([1.0] * num_tasks, task_names=task_names, on_nonfinite=on_nonfinite)
