"""IMTL-L, the loss-balance half of Impartial Multi-Task Learning: Liu, Li, Kuang, Xue, Chen,
Yang, Liao, Zhang, "Towards Impartial Multi-task Learning", ICLR 2021 (Section 3.2).

Each task t has a learnable loss scale s_t, starting at 0, and the total is

    sum_t ( e^{s_t} L_t - s_t ).

The model gets the gradient of sum_t e^{s_t} L_t (weights e^{s_t}); s_t gets
e^{s_t} L_t - 1, which is zero where the scaled loss e^{s_t} L_t equals 1: gradient descent
on s drives every task's scaled loss towards 1, whatever the loss's scale. The s_t are
parameters of this module that train with the model: give ``balancer.parameters()`` to the
model's optimizer (the paper updates s with the network, by the same gradient descent).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .base import Balancer, SharedLike


class IMTLL(Balancer):
    """Learned loss scales: total sum_t (e^{s_t} L_t - s_t); ``weights`` reports e^{s_t}.

    Args:
        num_tasks: T >= 2.

    ``stats`` after a step: ``loss_scale`` (s_t) and ``weight`` (e^{s_t}) used.
    """

    def __init__(
        self,
        num_tasks: int,
        *,
        task_names: Sequence[str] | None = None,
        on_nonfinite: str = "raise",
    ) -> None:
        super().__init__(num_tasks, task_names=task_names, on_nonfinite=on_nonfinite)
        self.loss_scales = nn.Parameter(torch.zeros(num_tasks))

    @property
    def weights(self) -> Tensor:
        return torch.exp(self.loss_scales).detach()

    def _step(self, losses: list[Tensor], stacked: Tensor, values: Tensor,
              shared: SharedLike, **signals: Any) -> Tensor:
        self._no_signals(signals)
        s = self.loss_scales.to(stacked)
        scale = torch.exp(s)
        total = (scale * stacked).sum() - s.sum()
        self._backward(total)
        self.stats = {"loss_scale": self.loss_scales.detach().clone(),
                      "weight": scale.detach()}
        return total.detach()
