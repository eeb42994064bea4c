"""CAGrad's rule (Liu et al., NeurIPS 2021, "Conflict-Averse Gradient Descent")."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._gram import check_gram, gram_factor, like
from ._qp import min_norm_simplex, require

RESCALES = (0, 1, 2)


def cagrad_weights(gram: Tensor, *, c: float = 0.5, rescale: int = 1) -> Tensor:
    """CAGrad's coefficients (called ``coefficients`` below, ``c`` being the paper's radius),
    d = sum_i coefficients_i g_i, from G_ij = <g_i, g_j>.

    Liu et al. (2021), Algorithm 1 and its dual (Eq. 4 / the official code): with
    g_0 = 1/K sum_i g_i and phi = c^2 ||g_0||^2,
        w* = argmin_{w in the simplex} g_w^T g_0 + sqrt(phi) ||g_w||,   g_w = sum_i w_i g_i,
        d = g_0 + sqrt(phi) / ||g_w*|| g_w*,
    divided by 1 + c^2 (``rescale=1``, the official default), by 1 + c (``rescale=2``) or not
    (``rescale=0``). So coefficients = (1/K + sqrt(phi) / ||g_w*|| w*) / rescale.

    The dual is solved exactly rather than with the official code's SLSQP: its optimality
    conditions are those of the min-norm point of the shifted hull conv{g_i + lambda g_0} with
    lambda = ||g_w*|| / sqrt(phi), i.e. w* = w(lambda) := MGDA on g_i + lambda g_0 (exact NNLS,
    ``_qp.min_norm_simplex``); ||g_w(lambda)|| grows with lambda, so lambda is the single root
    of ||g_w(lambda)|| = lambda sqrt(phi) (Brent's method, scipy), and then
    sqrt(phi) / ||g_w*|| = 1 / lambda. Degenerate cases, as the official code's 1e-8 guards
    make them: c = 0 or g_0 = 0 give d = g_0; 0 in the hull of the g_i (then g_w* = 0) gives
    d = g_0 (the radius term vanishes).

    Returns the coefficients [K] in ``gram``'s dtype and device.
    """
    G = check_gram(gram, "CAGrad")
    if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c) or c < 0:
        raise ValueError(f"CAGrad: c must be a finite number >= 0, got {c!r}")
    if rescale not in RESCALES or isinstance(rescale, bool):
        raise ValueError(f"CAGrad: rescale must be one of {RESCALES}, got {rescale!r}")
    K = G.shape[0]
    divisor = {0: 1.0, 1: 1.0 + c**2, 2: 1.0 + c}[rescale]
    b = torch.full((K,), 1.0 / K, dtype=torch.float64)
    L = gram_factor(G)
    l0 = L.T @ b
    sqrt_phi = c * float(l0.norm())
    scale = float(L.norm(dim=1).max()) if L.numel() else 0.0
    if sqrt_phi <= 0 or scale == 0:
        return like(b / divisor, gram)

    def w_of(lam: float) -> Tensor:
        return min_norm_simplex(L + lam * l0[None, :], "CAGrad")

    def h(lam: float) -> float:
        return float((L.T @ w_of(lam)).norm()) - lam * sqrt_phi

    if h(0.0) <= 1e-12 * scale:  # 0 in the hull: g_w* = 0, the radius term vanishes
        return like(b / divisor, gram)
    brentq = require("scipy.optimize", "CAGrad").brentq
    hi = scale / sqrt_phi  # ||g_w|| <= max_i ||g_i||, so h(hi) <= 0
    lam = brentq(h, 0.0, hi, xtol=1e-15 * hi, rtol=4 * 2.0**-52, maxiter=200)
    coefficients = b + w_of(lam) / lam
    return like(coefficients / divisor, gram)
