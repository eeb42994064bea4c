"""CAGrad: Liu, Liu, Jin, Stone, Liu, "Conflict-Averse Gradient Descent for Multi-task
Learning", NeurIPS 2021 (Algorithm 1).

With g_0 = (1/T) sum_i g_i the average gradient and radius c, the update maximises the worst
task's improvement within a ball around g_0 (Eq. 3); through its dual,

    w* = argmin_{w in the simplex} g_w . g_0 + sqrt(phi) ||g_w||,   phi = c^2 ||g_0||^2,
    d  = (g_0 + sqrt(phi) / ||g_w*|| g_w*) / (1 + c^2),

with g_w = sum_i w_i g_i; d = sum_i c_i g_i with coefficients from the Gram matrix alone
(``lossbalance._rules.cagrad_weights``, solved exactly). The division by 1 + c^2 is the
official code's default rescaling (``rescale=1``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from torch import Tensor

from .._rules import cagrad_weights
from .._rules._qp import require
from .aggregator import Aggregator

RESCALES = (0, 1, 2)


class CAGrad(Aggregator):
    """Conflict-averse gradient descent (Algorithm 1).

    Args:
        num_tasks: T >= 2.
        c: the radius c >= 0 of the ball around the average gradient (0.5: the paper's and
            the official code's default for its multi-task experiments; c = 0 is the plain
            average gradient).
        rescale: 1 (default, the official code's): d divided by 1 + c^2; 2: by 1 + c;
            0: not divided.
        **kwargs: ``task_names``, ``on_nonfinite``, ``distributed``, ``accumulation_steps``,
            ``general_path``, ``caller_divides``: see ``Aggregator``.

    Needs the ``solvers`` extra (scipy). ``weights``: the last coefficients of d.
    """

    def __init__(self, num_tasks: int, c: float = 0.5, *, rescale: int = 1,
                 task_names: Sequence[str] | None = None, **kwargs: Any) -> None:
        if not isinstance(c, (int, float)) or isinstance(c, bool) or not math.isfinite(c) \
                or c < 0:
            raise ValueError(f"CAGrad: c must be a finite number >= 0, got {c!r}")
        if rescale not in RESCALES or isinstance(rescale, bool):
            raise ValueError(f"CAGrad: rescale must be one of {RESCALES}, got {rescale!r}")
        require("scipy.optimize", "CAGrad")  # the solver: refused now, not mid-backward
        super().__init__(num_tasks, task_names=task_names, **kwargs)
        self.c, self.rescale = float(c), rescale

    def _coefficients(self, gram: Tensor, values: Tensor) -> Tensor:
        return cagrad_weights(gram, c=self.c, rescale=self.rescale)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, c={self.c}, rescale={self.rescale}"
