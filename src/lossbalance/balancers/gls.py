"""Geometric Loss Strategy: Chennupati, Sistu, Yogamani, Rawashdeh, "MultiNet++: Multi-Stream
Feature Aggregation and Geometric Loss Strategy for Multi-Task Learning", CVPR Workshops 2019.

The total is the geometric mean of the T task losses,

    L_GLS = (prod_i L_i)^(1/T).

Its gradient is

    grad L_GLS = sum_i (L_GLS / (T L_i)) grad L_i,

so GLS is a loss weighting with this step's weights w_i = L_GLS / (T L_i), computed from the
step's own loss values and held constant in the backward: the model gets exactly the gradient
of the geometric mean (one ordinary backward of sum_i w_i L_i, whose value is L_GLS). A task
whose loss is small weighs more; multiplying one loss by k multiplies every w_i L_i, hence the
gradient, by k^(1/T). L_GLS is computed as exp(mean_i log L_i), which neither overflows nor
underflows where the product would. Every L_i must be > 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .. import _checks
from .base import Balancer, SharedLike


class GLS(Balancer):
    """The geometric mean of the losses (module docstring), as the weighting
    w_i = L_GLS / (T L_i) of this step's losses.

    ``weights`` are the last step's w (1/T each before the first step: equal losses give
    1/T); ``stats`` after a step: ``weight`` (w) and ``geometric_mean`` (L_GLS).
    """

    def __init__(
        self,
        num_tasks: int,
        *,
        task_names: Sequence[str] | None = None,
        on_nonfinite: str = "raise",
    ) -> None:
        super().__init__(num_tasks, task_names=task_names, on_nonfinite=on_nonfinite)
        self.register_buffer("task_weights", torch.full((num_tasks,), 1.0 / num_tasks))

    @staticmethod
    def weights_from(losses: Tensor) -> tuple[Tensor, Tensor]:
        """(w, L_GLS) for T positive loss values: L_GLS = exp(mean log L), w = L_GLS / (T L)."""
        gls = torch.exp(torch.log(losses).mean())
        return gls / (losses.numel() * losses), gls

    @property
    def weights(self) -> Tensor:
        return self.task_weights.detach().clone()

    def _step(self, losses: list[Tensor], stacked: Tensor, values: Tensor,
              shared: SharedLike, **signals: Any) -> Tensor:
        self._no_signals(signals)
        for i, value in enumerate(values.tolist()):
            if not value > 0:
                raise ValueError(
                    f"the loss of {_checks.task_label(i, self.task_names)} is {value}: the "
                    "geometric mean of the losses needs every loss > 0"
                )
        weights, gls = self.weights_from(values)
        total = self._weighted_backward(stacked, weights)
        self.task_weights.copy_(weights)
        self.stats = {"weight": weights, "geometric_mean": gls}
        return total
