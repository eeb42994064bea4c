"""Dynamic Task Prioritization: Guo, Haque, Huang, Yeung, Fei-Fei, ECCV 2018 (Eq. 3-4).

Each task reports a key performance indicator kappa_i(t) in [0, 1] (accuracy, say), smoothed
as an exponential moving average

    k_i(t) = kpi_decay * k_i(t-1) + (1 - kpi_decay) * kappa_i(t),   k_i(first) = kappa_i(first)

and weighted by the focal term of that KPI (harder tasks, low k_i, weigh more):

    w_i(t) = -(1 - k_i(t))^gamma * log(k_i(t)),   detached.

The total is sum_i w_i L_i. ``log`` is taken of max(k_i, kpi_floor) so that a KPI of 0 gives
a large finite weight instead of infinity.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .. import _checks
from .base import Balancer, SharedLike


class DynamicTaskPrioritization(Balancer):
    """DTP weights from smoothed KPIs: ``backward(losses, kpis=[...])``.

    Args:
        num_tasks: T >= 2.
        gamma: focusing exponent (>= 0).
        kpi_decay: weight of the past in the KPI moving average, in [0, 1).
        kpi_floor: lower clamp of k_i inside the log (> 0).

    ``stats`` after a step: ``kpi`` (smoothed k_i) and ``weight`` (w_i used).
    """

    def __init__(
        self,
        num_tasks: int,
        gamma: float = 1.0,
        kpi_decay: float = 0.9,
        *,
        kpi_floor: float = 1e-6,
        task_names: Sequence[str] | None = None,
        on_nonfinite: str = "raise",
    ) -> None:
        super().__init__(num_tasks, task_names=task_names, on_nonfinite=on_nonfinite)
        self.gamma = _checks.check_nonnegative("gamma", gamma)
        self.kpi_decay = _checks.check_fraction("kpi_decay", kpi_decay)
        self.kpi_floor = _checks.check_positive("kpi_floor", kpi_floor)
        # Before the first step no KPI is known: every task weighs -log(1/2) * (1/2)^gamma.
        self.register_buffer("kpi", torch.full((num_tasks,), 0.5))
        self.register_buffer("num_steps", torch.zeros((), dtype=torch.long))

    @staticmethod
    def focal_weights(kpi: Tensor, gamma: float, floor: float) -> Tensor:
        """w = -(1 - k)^gamma * log(max(k, floor))."""
        return -((1 - kpi).pow(gamma)) * torch.log(kpi.clamp(min=floor))

    @property
    def weights(self) -> Tensor:
        return self.focal_weights(self.kpi, self.gamma, self.kpi_floor).detach().clone()

    def backward(
        self,
        losses: _checks.LossesLike,
        shared: SharedLike = None,
        *,
        kpis: Sequence[float] | Tensor | dict[str, float] | None = None,
        grad_scaler: Any = None,
    ) -> Tensor:
        """Update the smoothed KPIs with ``kpis`` (T values in [0, 1]), then backpropagate
        sum_i w_i L_i with the weights they give (through ``grad_scaler`` when given).
        Returns the weighted total (detached)."""
        return super().backward(losses, shared, grad_scaler=grad_scaler, kpis=kpis)

    def _step(self, losses: list[Tensor], stacked: Tensor, values: Tensor,
              shared: SharedLike, **signals: Any) -> Tensor:
        kpis = _checks.check_kpis(signals.pop("kpis", None), self.num_tasks, self.task_names)
        self._no_signals(signals)
        kpis = kpis.to(self.kpi)
        if int(self.num_steps) == 0:
            smoothed = kpis
        else:
            smoothed = self.kpi_decay * self.kpi + (1 - self.kpi_decay) * kpis
        weights = self.focal_weights(smoothed, self.gamma, self.kpi_floor)
        total = self._weighted_backward(stacked, weights)
        self.kpi.copy_(smoothed)
        self.num_steps.add_(1)
        self.stats = {"kpi": smoothed.clone(), "weight": weights}
        return total


