"""UPGrad: Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024
(torchjd's default aggregator).

Each task's gradient is projected onto the dual cone of all of them, {x : <g_j, x> >= 0 for
every j} (Eq. 3), and the projections are averaged (Eq. 5, uniform preference):

    d = (1/T) sum_i pi(g_i),    pi(g_i) = argmin_{x : J x >= 0} || x - g_i ||^2,

so d conflicts with no task. By their Prop. 1 each projection is J^T v_i with
v_i = argmin_{v >= e_i} v^T G v, so d = sum_i c_i g_i with c = (1/T) sum_i v_i, a function
of the Gram matrix G = J J^T alone (``lossbalance._rules.upgrad_weights``, exact QPs, no
regularisation).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from .._rules import upgrad_weights
from .._rules._qp import require
from .aggregator import Aggregator


class UPGrad(Aggregator):
    """Unconflicting projection of gradients (Eq. 5), from the Gram matrix.

    Args: those of ``Aggregator`` (``num_tasks``, ``task_names``, ``on_nonfinite``,
    ``distributed``, ``accumulation_steps``, ``general_path``, ``caller_divides``); the
    method has no option.
    Needs the ``solvers`` extra (scipy). ``weights``: the last c.
    """

    def __init__(self, num_tasks: int, **kwargs: Any) -> None:
        require("scipy.optimize", "UPGrad")  # the solver: refused now, not mid-backward
        super().__init__(num_tasks, **kwargs)

    def _coefficients(self, gram: Tensor, values: Tensor) -> Tensor:
        return upgrad_weights(gram)
