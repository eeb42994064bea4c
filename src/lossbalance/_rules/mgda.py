"""MGDA's rule (Sener & Koltun, NeurIPS 2018): the min-norm point of the tasks' gradients."""

from __future__ import annotations

import numpy as np
from torch import Tensor

from ._gram import check_gram, gram_factor, like
from ._qp import min_norm_simplex

NORMALIZATIONS = ("none", "l2")


def mgda_weights(gram: Tensor, *, normalize: str = "none") -> Tensor:
    """MGDA's coefficients alpha from the Gram matrix G_ij = <g_i, g_j>.

    Sener & Koltun (2018), Eq. 3 (and Algorithm 2, the Frank-Wolfe solver for it):
        alpha = argmin_{alpha >= 0, sum_t alpha^t = 1} || sum_t alpha^t g_t ||^2,
    the min-norm point of the convex hull of the gradients; the update direction is
    d = sum_t alpha^t g_t. Solved exactly (``_qp.min_norm_simplex``: a least-distance QP as
    NNLS), not with Frank-Wolfe's finite iterations, so d is the min-norm point to
    rounding. When several alpha give the same point (linearly dependent gradients) one of them
    is returned; d is unique.

    ``normalize``: "none" (the paper) or "l2", the official code's optional normalisation
    ("not included in the paper"): alpha is solved on g_t / ||g_t|| (Gram G_ij / (n_i n_j),
    n_i = sqrt(G_ii); a zero gradient stays zero) and, as in that code, applied to the
    un-normalised gradients, d = sum_t alpha^t g_t. The loss-based normalisations of that code
    need the losses and are not rules of G.

    Returns alpha [T] in ``gram``'s dtype and device.
    """
    G = check_gram(gram, "MGDA")
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"MGDA: normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    if normalize == "l2":
        n = np.sqrt(np.diagonal(G))
        inv = np.divide(1.0, n, out=np.zeros_like(n), where=n > 0)
        G = G * inv[:, None] * inv[None, :]
    alpha = min_norm_simplex(gram_factor(G), "MGDA")
    return like(alpha, gram)
