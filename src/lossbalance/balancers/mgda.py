"""MGDA: Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018.

The update is the min-norm point of the convex hull of the tasks' gradients (Eq. 3):

    c = argmin_{c >= 0, sum_i c_i = 1} || sum_i c_i g_i ||^2,    d = sum_i c_i g_i,

a quadratic program in T variables over the Gram matrix G_ij = <g_i, g_j>
(``lossbalance._rules.mgda_weights``, solved exactly). Taken at the representation h
(``tap``) it is the paper's MGDA-UB (Section 3.3: the gradients w.r.t. the shared
representation Z, which upper-bound the ones at the shared parameters); at ``shared``
parameters it is the paper's exact MGDA.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from .._rules import mgda_weights
from .._rules._qp import require
from .aggregator import Aggregator

NORMALIZATIONS = ("none", "l2")


class MGDA(Aggregator):
    """Multiple-gradient descent: the min-norm point of the tasks' gradients (Eq. 3).

    Args:
        num_tasks: T >= 2.
        normalize: "none" (default: the paper) or "l2", the official code's optional
            normalisation (not in the paper): c solved for g_i / ||g_i||, applied to the
            g_i themselves.
        **kwargs: ``task_names``, ``on_nonfinite``, ``distributed``, ``accumulation_steps``,
            ``general_path``, ``caller_divides``: see ``Aggregator``.

    Needs the ``solvers`` extra (scipy). ``weights``/``stats["weight"]``: the last c (on the
    simplex); ``stats["gram"]``: G.
    """

    def __init__(self, num_tasks: int, *, normalize: str = "none",
                 task_names: Sequence[str] | None = None, **kwargs: Any) -> None:
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"MGDA: normalize must be one of {NORMALIZATIONS}, "
                             f"got {normalize!r}")
        require("scipy.optimize", "MGDA")  # the solver: refused now, not mid-backward
        super().__init__(num_tasks, task_names=task_names, **kwargs)
        self.normalize = normalize

    def _coefficients(self, gram: Tensor, values: Tensor) -> Tensor:
        return mgda_weights(gram, normalize=self.normalize)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, normalize={self.normalize!r}"
