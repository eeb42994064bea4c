"""IMTL-G: the gradient half of Liu, Li, Kuang, Xue, Chen, Yang, Liao, Zhang, "Towards
Impartial Multi-task Learning", ICLR 2021 (Section 3.2).

The update d = sum_i alpha_i g_i with sum_i alpha_i = 1 has equal projections on every
task's unit gradient u_i = g_i / ||g_i|| (d . u_1 = d . u_i); in closed form, with
D = [g_1 - g_2, ..., g_1 - g_T]^T and U = [u_1 - u_2, ..., u_1 - u_T]^T,

    alpha_{2:T} = g_1 U^T (D U^T)^{-1},   alpha_1 = 1 - sum_{i >= 2} alpha_i,

all in terms of the Gram matrix (``lossbalance._rules.imtl_g_weights``). The loss-scale half,
IMTL-L, is ``lossbalance.IMTLL``; the paper's full IMTL combines both.
"""

from __future__ import annotations

from torch import Tensor

from .._rules import imtl_g_weights
from .aggregator import Aggregator


class IMTLG(Aggregator):
    """Impartial multi-task learning's gradient balancing (IMTL-G, closed form).

    Args: those of ``Aggregator`` (``num_tasks``, ``task_names``, ``on_nonfinite``,
    ``distributed``, ``accumulation_steps``, ``general_path``, ``caller_divides``); the
    method has no option.
    ``weights``: the last alpha (summing to 1).
    """

    def _coefficients(self, gram: Tensor, values: Tensor) -> Tensor:
        return imtl_g_weights(gram)
