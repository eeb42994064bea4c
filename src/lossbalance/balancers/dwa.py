"""Dynamic Weight Average: Liu, Johns, Davison, "End-to-End Multi-Task Learning with
Attention", CVPR 2019 (Eq. 7).

With K tasks, L_k(t) the average training loss of task k over epoch t, and temperature T:

    w_k(t - 1) = L_k(t - 1) / L_k(t - 2)
    lambda_k(t) = K exp(w_k(t - 1) / T) / sum_i exp(w_i(t - 1) / T)

for t >= 3, and lambda_k(t) = 1 in the first two epochs. A task whose loss fell less over the
last epoch weighs more; the weights sum to K. The total each step is sum_k lambda_k L_k, with
lambda fixed during the epoch.

The epoch is the caller's: ``bal.epoch_end()`` after an epoch's last step closes it (the
average of the losses of every ``backward`` since the last ``epoch_end``) and sets the weights
of the next. ``period=n`` closes an epoch by itself after every n steps instead (``period=1``:
the ratio of consecutive steps' losses, a per-step DWA that is not the paper's).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .. import _checks
from .base import Balancer, SharedLike


class DWA(Balancer):
    """Dynamic Weight Average (module docstring): ``backward`` each step, ``epoch_end()``
    after each epoch (or ``period=`` steps).

    Args:
        num_tasks: K >= 2.
        temperature: the softmax temperature T (> 0); the paper's 2.
        period: None (the default): epochs end where the caller calls ``epoch_end()``; an int
            n >= 1: an epoch ends by itself after every n ``backward`` calls.

    ``stats`` after a step: ``weight`` (the lambda used). ``epoch_losses()`` gives the two
    last epochs' average losses [L(t-2), L(t-1)] (NaN before they exist).
    """

    def __init__(
        self,
        num_tasks: int,
        temperature: float = 2.0,
        *,
        period: int | None = None,
        task_names: Sequence[str] | None = None,
        on_nonfinite: str = "raise",
    ) -> None:
        super().__init__(num_tasks, task_names=task_names, on_nonfinite=on_nonfinite)
        self.temperature = _checks.check_positive("temperature", temperature)
        self.period = _checks.check_int_at_least("period", period, 1, allow_none=True)
        self.register_buffer("task_weights", torch.ones(num_tasks))
        # The running sum of this epoch's losses and its number of steps.
        self.register_buffer("epoch_loss_sum", torch.zeros(num_tasks))
        self.register_buffer("epoch_steps", torch.zeros((), dtype=torch.long))
        # Rows: L(t-2), L(t-1), the average losses of the two last closed epochs.
        self.register_buffer("history", torch.full((2, num_tasks), float("nan")))
        self.register_buffer("num_epochs", torch.zeros((), dtype=torch.long))

    @staticmethod
    def weights_from(before_last: Tensor, last: Tensor, temperature: float) -> Tensor:
        """lambda = K softmax(w / T) with w = L(t-1) / L(t-2) (Eq. 7)."""
        ratio = last / before_last
        return last.numel() * torch.softmax(ratio / temperature, dim=0)

    @property
    def weights(self) -> Tensor:
        return self.task_weights.detach().clone()

    def epoch_losses(self) -> Tensor:
        """[L(t-2), L(t-1)]: the average losses of the two last closed epochs [2, K]."""
        return self.history.detach().clone()

    def _step(self, losses: list[Tensor], stacked: Tensor, values: Tensor,
              shared: SharedLike, **signals: Any) -> Tensor:
        self._no_signals(signals)
        new_sum = self.epoch_loss_sum + values.to(self.epoch_loss_sum)
        new_steps = int(self.epoch_steps) + 1
        closes = self.period is not None and new_steps == self.period
        if closes:  # refuse a bad epoch average before anything changes
            self._check_average(new_sum / new_steps)
        weights = self.task_weights.clone()  # ``loss``'s graph keeps it past epoch_end
        total = self._weighted_backward(stacked, weights)
        self.stats = {"weight": weights}
        self.epoch_loss_sum.copy_(new_sum)
        self.epoch_steps.fill_(new_steps)
        if closes:
            self.epoch_end()
        return total

    def _check_average(self, average: Tensor) -> None:
        for i, value in enumerate(average.tolist()):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(
                    f"the epoch's average loss of {_checks.task_label(i, self.task_names)} is "
                    f"{value}: DWA's ratio L(t-1)/L(t-2) needs average losses that are finite "
                    "and > 0"
                )

    def epoch_end(self) -> None:
        """Close the epoch: its average losses become L(t-1) and the weights of the next
        epoch follow Eq. 7 (1 while fewer than two epochs are closed). ValueError, with
        nothing changed, when no ``backward`` ran since the last ``epoch_end`` or an average
        loss is not finite and > 0."""
        steps = int(self.epoch_steps)
        if steps == 0:
            raise ValueError(
                "DWA.epoch_end: no backward since the last epoch_end (an epoch needs at least "
                "one step to average its losses)"
            )
        average = self.epoch_loss_sum / steps
        self._check_average(average)
        self.history[0].copy_(self.history[1])
        self.history[1].copy_(average)
        self.num_epochs.add_(1)
        if int(self.num_epochs) >= 2:
            self.task_weights.copy_(
                self.weights_from(self.history[0], self.history[1], self.temperature))
        self.epoch_loss_sum.zero_()
        self.epoch_steps.zero_()

    def extra_repr(self) -> str:
        period = f", period={self.period}" if self.period is not None else ""
        return f"{super().extra_repr()}, temperature={self.temperature}{period}"
