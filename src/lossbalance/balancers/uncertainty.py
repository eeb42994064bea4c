"""Uncertainty Weighting: Kendall, Gal, Cipolla, "Multi-Task Learning Using Uncertainty to
Weigh Losses for Scene Geometry and Semantics", CVPR 2018 (Eq. 7 and 10).

Each task has a learned log-variance s_i = log sigma_i^2, starting at 0. The total is

    regression:      0.5 * exp(-s_i) * L_i + 0.5 * s_i      (1/(2 sigma^2) L + log sigma)
    classification:        exp(-s_i) * L_i + 0.5 * s_i      (1/sigma^2 L + log sigma)

summed over tasks. The s_i are parameters of this module that train with the model: give
``balancer.parameters()`` to the model's optimizer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .. import _checks
from .base import Balancer, SharedLike

TASK_TYPES = ("regression", "classification")


class UncertaintyWeighting(Balancer):
    """Homoscedastic-uncertainty weights; ``weights`` reports the multipliers c_i exp(-s_i).

    Args:
        num_tasks: T >= 2.
        task_types: "regression" (c_i = 1/2) or "classification" (c_i = 1) per task; all
            regression by default.

    ``stats`` after a step: ``log_var`` (s_i) and ``weight`` (c_i exp(-s_i)) used.
    """

    def __init__(
        self,
        num_tasks: int,
        task_types: Sequence[str] | None = None,
        *,
        task_names: Sequence[str] | None = None,
        on_nonfinite: str = "raise",
    ) -> None:
        super().__init__(num_tasks, task_names=task_names, on_nonfinite=on_nonfinite)
        types = tuple(task_types) if task_types is not None else ("regression",) * num_tasks
        if len(types) != num_tasks:
            raise ValueError(f"task_types has {len(types)} entries, expected {num_tasks}")
        for i, kind in enumerate(types):
            if kind not in TASK_TYPES:
                raise ValueError(
                    f"the task type of {_checks.task_label(i, self.task_names)} is {kind!r}; "
                    f"expected one of {TASK_TYPES}"
                )
        self.task_types = types
        self.log_vars = nn.Parameter(torch.zeros(num_tasks))
        self.register_buffer(
            "scale", torch.tensor([0.5 if k == "regression" else 1.0 for k in types])
        )

    @property
    def weights(self) -> Tensor:
        return (self.scale * torch.exp(-self.log_vars)).detach()

    def _step(self, losses: list[Tensor], stacked: Tensor, values: Tensor,
              shared: SharedLike, **signals: Any) -> Tensor:
        self._no_signals(signals)
        s = self.log_vars
        multipliers = self.scale.to(s) * torch.exp(-s)
        total = (multipliers.to(stacked) * stacked).sum() + 0.5 * s.sum().to(stacked)
        self._backward(total)
        self.stats = {"log_var": s.detach().clone(), "weight": multipliers.detach()}
        return total.detach()
