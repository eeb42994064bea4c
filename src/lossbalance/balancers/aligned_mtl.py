"""Aligned-MTL: Senushkin, Patakin, Kuznetsov, Konushin, "Independent Component Alignment
for Multi-Task Learning", CVPR 2023 (Algorithm 1).

With G = [g_1, ..., g_T] the gradient matrix and M = G^T G (the Gram matrix) = V Lambda V^T,
the balance transformation B = sqrt(lambda_min) V Lambda^{-1/2} V^T makes the aligned
gradients G B orthogonal, of equal norm sigma_min (the condition number of the aligned
system is 1), and the update sums them (the official code's unit task weights):

    d = G B 1 = sum_i c_i g_i,   c = B 1

(``lossbalance._rules.aligned_mtl_weights``; eigenvalues below max(lambda) T eps_float32
count as zero, as in the official code).
"""

from __future__ import annotations

from torch import Tensor

from .._rules import aligned_mtl_weights
from .aggregator import Aggregator


class AlignedMTL(Aggregator):
    """Aligned multi-task learning (Algorithm 1), from the Gram matrix.

    Args: those of ``Aggregator`` (``num_tasks``, ``task_names``, ``on_nonfinite``,
    ``distributed``, ``accumulation_steps``, ``general_path``, ``caller_divides``); the
    method has no option (unit task weights, as the official code). ``weights``: the last
    c = B 1.
    """

    def _coefficients(self, gram: Tensor, values: Tensor) -> Tensor:
        return aligned_mtl_weights(gram)
