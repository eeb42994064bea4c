"""UPGrad's rule (Quinton & Rey 2024, torchjd's default aggregator)."""

from __future__ import annotations

import numpy as np
from torch import Tensor

from ._gram import check_gram, gram_factor, like
from ._qp import dual_cone_weights


def upgrad_weights(gram: Tensor) -> Tensor:
    """UPGrad's coefficients from the Gram matrix G = J J^T.

    Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization" (2024), Eq. 5 with the
    uniform preference: each row g_i of J is projected onto the dual cone of the rows,
    pi_J(g_i) = argmin_{x : J x >= 0} ||x - g_i||^2 (Eq. 3), and the projections are averaged,
        A_UPGrad(J) = 1/m sum_i pi_J(g_i).
    By their Prop. 1, pi_J(J^T u) = J^T v with v = argmin_{v >= u} v^T G v, so the coefficients
    are c = 1/m sum_i v_i with v_i the dual-cone weights of e_i (``_qp.dual_cone_weights``, one
    exact QP per task as NNLS, none where e_i's projection is itself, i.e. G e_i >= 0; no Gram
    normalisation or regularisation added).

    Returns c [m] in ``gram``'s dtype and device; the direction is d = sum_i c_i g_i.
    """
    G = check_gram(gram, "UPGrad")
    L = gram_factor(G)
    m = G.shape[0]
    eye = np.eye(m)
    c = sum(dual_cone_weights(L, eye[i], "UPGrad") for i in range(m)) / m
    return like(c, gram)
