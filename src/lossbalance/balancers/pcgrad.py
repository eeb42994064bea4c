"""PCGrad: Yu, Kumar, Gupta, Levine, Hausman, Finn, "Gradient Surgery for Multi-Task
Learning", NeurIPS 2020 (Algorithm 1).

For each task i, in a random order of the other tasks j: when g_i^PC . g_j < 0 (a conflict),
project g_i^PC onto the normal plane of g_j,

    g_i^PC <- g_i^PC - (g_i^PC . g_j / ||g_j||^2) g_j,

and the update is d = sum_i g_i^PC. Every projection is a combination of the original
gradients, so d = sum_i c_i g_i with c a function of the Gram matrix and of the drawn orders
(``lossbalance._rules.pcgrad_weights``). The orders come from this balancer's own seeded
``torch.Generator``, whose state is part of ``state_dict``: a resumed run draws what an
uninterrupted one would, and the global random stream is not touched.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .._rules import pcgrad_weights
from .aggregator import Aggregator, Commit


class PCGrad(Aggregator):
    """Projecting conflicting gradients (Algorithm 1), with seeded task orders.

    Args:
        num_tasks: T >= 2.
        seed: the generator's seed (an int >= 0); None draws one from torch's default
            generator (``torch.manual_seed`` before construction makes the run repeatable).
            Under DDP give every process the same seed: the orders must agree.
        **kwargs: ``task_names``, ``on_nonfinite``, ``distributed``, ``accumulation_steps``,
            ``general_path``, ``caller_divides``: see ``Aggregator``.

    ``weights``: the last c (1 where a task's gradient was not projected and nothing was
    projected onto it).
    """

    def __init__(self, num_tasks: int, *, seed: int | None = None,
                 task_names: Sequence[str] | None = None, **kwargs: Any) -> None:
        super().__init__(num_tasks, task_names=task_names, **kwargs)
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()).item())
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be None or an int >= 0, got {seed!r}")
        self.seed = seed
        self._generator = torch.Generator().manual_seed(seed)

    def _prepare(self, gram: Tensor, values: Tensor) -> tuple[Tensor, Commit]:
        # draw from a copy: the balancer's generator advances only when the step commits
        generator = torch.Generator().set_state(self._generator.get_state())
        c = pcgrad_weights(gram, generator=generator)
        return c, lambda: self._generator.set_state(generator.get_state())

    def _rule_state(self) -> dict[str, Any]:
        return {"generator": self._generator.get_state()}

    def _load_rule_state(self, state: dict[str, Any]) -> None:
        self._generator.set_state(state["generator"].cpu())

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, seed={self.seed}"
