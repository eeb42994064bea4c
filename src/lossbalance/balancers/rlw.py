"""Random Loss Weighting: Lin, Ye, Zhang, Tsang, "Reasonable Effectiveness of Random
Weighting: A Litmus Test for Multi-Task Learning", TMLR 2022 (RLW).

Each step draws fresh weights, independent of the losses and of the past:

    lambda~ ~ p(lambda~),   lambda = softmax(lambda~),   total = sum_i lambda_i L_i

with p the standard normal N(0, I) by default (the paper's default; LibMTL's ``Normal``), or
the uniform U(0, 1)^T. The weights sum to 1. The draws come from the balancer's own
``torch.Generator`` (seeded by ``seed``), whose state is part of ``state_dict``: a resumed run
draws the same weights as an uninterrupted one, and the global random stream is not touched
after construction.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .base import Balancer, SharedLike

DISTRIBUTIONS = ("normal", "uniform")


class RLW(Balancer):
    """Random loss weights lambda = softmax(lambda~), lambda~ drawn each step.

    Args:
        num_tasks: T >= 2.
        distribution: "normal" (lambda~ ~ N(0, I), the default) or "uniform" (U(0, 1)).
        seed: the generator's seed (an int >= 0); None draws one from torch's default
            generator, so ``torch.manual_seed`` before construction makes the run repeatable.

    ``weights`` are the weights the next ``backward`` uses (drawn in advance); ``stats``
    after a step: ``weight`` (the lambda used).
    """

    def __init__(
        self,
        num_tasks: int,
        distribution: str = "normal",
        *,
        seed: int | None = None,
        task_names: Sequence[str] | None = None,
        on_nonfinite: str = "raise",
    ) -> None:
        super().__init__(num_tasks, task_names=task_names, on_nonfinite=on_nonfinite)
        if distribution not in DISTRIBUTIONS:
            raise ValueError(
                f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()).item())
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be None or an int >= 0, got {seed!r}")
        self.distribution = distribution
        self.seed = seed
        self._generator = torch.Generator().manual_seed(seed)
        # float64, as drawn (``.float()`` may cast it): a float64 model gets the draw unrounded
        self.register_buffer("task_weights", self._draw())

    def _draw(self) -> Tensor:
        """lambda = softmax(lambda~) for one draw of lambda~ (float64, on the CPU)."""
        shape, gen = (self.num_tasks,), self._generator
        if self.distribution == "normal":
            z = torch.randn(shape, generator=gen, dtype=torch.float64)
        else:
            z = torch.rand(shape, generator=gen, dtype=torch.float64)
        return torch.softmax(z, dim=0)

    @property
    def weights(self) -> Tensor:
        return self.task_weights.detach().clone()

    def _step(self, losses: list[Tensor], stacked: Tensor, values: Tensor,
              shared: SharedLike, **signals: Any) -> Tensor:
        self._no_signals(signals)
        used = self.task_weights.detach().clone()
        total = self._weighted_backward(stacked, used)
        self.task_weights.copy_(self._draw())  # the next step's
        self.stats = {"weight": used}
        return total

    def get_extra_state(self) -> dict[str, Any]:
        return {"generator": self._generator.get_state()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self._generator.set_state(state["generator"].cpu())

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, distribution={self.distribution!r}, seed={self.seed}"
