"""CAGrad's rule (Liu et al., NeurIPS 2021, "Conflict-Averse Gradient Descent")."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._gram import check_gram, gram_factor, like
from ._qp import min_norm_simplex, project_polyhedron, require

RESCALES = (0, 1, 2)


def cagrad_weights(gram: Tensor, *, c: float = 0.5, rescale: int = 1) -> Tensor:
    """CAGrad's coefficients (called ``coefficients`` below, ``c`` being the paper's radius),
    d = sum_i coefficients_i g_i, from G_ij = <g_i, g_j>.

    Liu et al. (2021), Eq. 3 / Algorithm 1: with g_0 = 1/K sum_i g_i and r = c ||g_0||,
        d* = argmax_{||d - g_0|| <= r} min_i <g_i, d>,
    whose dual (the official code's problem) is
        w* = argmin_{w in the simplex} <g_w, g_0> + r ||g_w||,  g_w = sum_i w_i g_i,
        d* = g_0 + r g_w* / ||g_w*||,
    and the update is d* divided by 1 + c^2 (``rescale=1``, the official default), by 1 + c
    (``rescale=2``) or not (``rescale=0``).

    Solved exactly on the primal side: v* = max{v : dist(g_0, P(v)) <= r} with the polyhedron
    P(v) = {d : <g_i, d> >= v for all i} (the distance grows with v; Brent's method, scipy),
    and d* = the projection of g_0 onto P(v*) = g_0 + sum_i mu_i g_i (least-distance
    programming by NNLS, ``_qp.project_polyhedron``), so coefficients = 1/K + mu. Wherever the
    dual's minimiser has g_w* != 0 this is its d* (mu = r w* / ||g_w*||), also when 0 lies in the
    hull of the g_i. Where g_w* = 0 (0 in the hull and r large enough, e.g. c >= 1) every d in
    the ball with min_i <g_i, d> = 0 is optimal: d* is then the one nearest g_0 (the official
    code returns g_0 itself there, through its 1e-8 guards, which need not be optimal; torchjd
    returns 0). c = 0 or g_0 = 0 give d = g_0.

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
    L = gram_factor(G)                      # row i: g_i in r = rank(G) coordinates
    g0 = L.T @ b
    radius = c * float(g0.norm())
    if radius <= 0:
        return like(b / divisor, gram)
    norms = L.norm(dim=1)
    ones = torch.ones(K, dtype=torch.float64)

    def mu_at(v: float) -> Tensor | None:
        return project_polyhedron(L, g0, v * ones, "CAGrad")

    def gap(v: float) -> float:  # dist(g_0, P(v)) - r, +inf when P(v) is empty
        mu = mu_at(v)
        return math.inf if mu is None else float((L.T @ mu).norm()) - radius

    lo = float((L @ g0).min())              # d = g_0 reaches v = min_i <g_i, g_0>
    hi = float((L @ g0).max()) + radius * float(norms.max())  # no d in the ball does better
    if float((L.T @ min_norm_simplex(L, "CAGrad")).norm()) <= 1e-12 * float(norms.max()):
        hi = min(hi, 0.0)                   # 0 in the hull: min_i <g_i, d> <= 0 for every d
    if gap(hi) <= 0:
        v = hi
    else:
        brentq = require("scipy.optimize", "CAGrad").brentq
        span = max(abs(lo), abs(hi), 1e-300)
        v = brentq(lambda t: min(gap(t), 1e300), lo, hi, xtol=1e-15 * span, rtol=4 * 2.0**-52,
                   maxiter=200)
    mu = mu_at(v)
    if mu is None:  # rounding at the edge of feasibility: the dual's w* from the shifted hull
        mu = torch.zeros(K, dtype=torch.float64)
    return like((b + mu) / divisor, gram)
