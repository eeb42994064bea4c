"""CAGrad's rule (Liu et al., NeurIPS 2021, "Conflict-Averse Gradient Descent")."""

from __future__ import annotations

import math

import numpy as np
from torch import Tensor

from ._gram import check_gram, gram_factor, like
from ._qp import min_norm_simplex, project_polyhedron

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
    P(v) = {d : <g_i, d> >= v for all i}, and d* = the projection of g_0 onto P(v*) =
    g_0 + sum_i mu_i g_i (least-distance programming by NNLS, ``_qp.project_polyhedron``), so
    coefficients = 1/K + mu. The distance grows with v; on each piece where the set A of the
    active constraints (mu_i > 0) is fixed, the projection is onto the affine set
    {d : <g_i, d> = v, i in A}, so dist^2 is a quadratic in v. The root search keeps a bracket
    [lo, hi] (dist <= r at lo, > r or P(v) empty at hi) and tries, from the A of the end
    nearer to the root (in |dist - r|), the root of that quadratic (exact when A is the active
    set at v*), bisecting when it falls outside the bracket, until |dist - r| <= 1e-12 r, the
    quadratic's root is an end of the bracket to rounding, or the bracket is 1e-12 of |v|'s
    range (then its lower end).
    Wherever the dual's minimiser has g_w* != 0 this is its d* (mu = r w* / ||g_w*||), also
    when 0 lies in the hull of the g_i. Where g_w* = 0 (0 in the hull and r large enough, e.g.
    c >= 1) every d in the ball with min_i <g_i, d> = 0 is optimal: d* is then the one nearest
    g_0 (the official code returns g_0 itself there, through its 1e-8 guards, which need not be
    optimal; torchjd returns 0). c = 0 or g_0 = 0 give d = g_0.

    Returns the coefficients [K] in ``gram``'s dtype and device.
    """
    G = check_gram(gram, "CAGrad")
    if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c) or c < 0:
        raise ValueError(f"CAGrad: c must be a finite number >= 0, got {c!r}")
    if rescale not in RESCALES or isinstance(rescale, bool):
        raise ValueError(f"CAGrad: rescale must be one of {RESCALES}, got {rescale!r}")
    K = G.shape[0]
    divisor = {0: 1.0, 1: 1.0 + c**2, 2: 1.0 + c}[rescale]
    b = np.full(K, 1.0 / K)
    L = gram_factor(G)                # row i: g_i in r = rank(G) coordinates
    g0 = L.T @ b
    radius = c * float(np.linalg.norm(g0))
    if radius <= 0:
        return like(b / divisor, gram)
    mu = _max_min_projection(L, g0, radius)
    return like((b + mu) / divisor, gram)


def _max_min_projection(L: np.ndarray, g0: np.ndarray, radius: float) -> np.ndarray:
    """mu >= 0 with g_0 + L^T mu the projection of g_0 onto P(v*), v* = max{v : dist(g_0, P(v))
    <= radius}: the root search of ``cagrad_weights``'s docstring."""
    K = L.shape[0]
    ones = np.ones(K)
    norms = np.linalg.norm(L, axis=1)
    a = L @ g0                              # <g_i, g_0>

    def project(v: float) -> tuple[float, np.ndarray | None]:  # (dist - r, mu); P(v) empty: inf
        mu = project_polyhedron(L, g0, v * ones, "CAGrad")
        return (math.inf, None) if mu is None else (float(np.linalg.norm(L.T @ mu)) - radius, mu)

    lo = float(a.min())                     # d = g_0 reaches v = min_i <g_i, g_0>
    # <g_i, d> <= <g_i, g_0> + r ||g_i|| in the ball, for each i: a tighter hi than the old
    # max_i <g_i, g_0> + r max_i ||g_i|| (T = 10: 3-8 projections a call -> 2-3)
    hi = float((a + radius * norms).min())
    # 0 in the hull: min_i <g_i, d> <= 0 for every d (only possible when some <g_i, g_0> <= 0,
    # which skips MGDA's NNLS call otherwise)
    if lo <= 0 and float(np.linalg.norm(L.T @ min_norm_simplex(L, "CAGrad"))) \
            <= 1e-12 * float(norms.max()):
        hi = min(hi, 0.0)
    gap, mu = project(hi)
    if gap <= 0:
        return mu
    span = max(abs(lo), abs(hi), 1e-300)
    ends = {"lo": (-radius, np.zeros(K), lo), "hi": (gap, mu, hi)}  # (dist - r, mu, v)
    # the affine-piece root instead of Brent's method: per call 1-2 / 2-3 / 3-4 projections at
    # T = 2 / 10 / 64 instead of 8-18 / 10-11 / 12-21 (benchmarks/rules_speed.py's matrices)
    for step in range(300):
        v = None
        if step % 4 != 3:  # every 4th step bisects: the bracket halves at least that often
            for _, end_mu, end_v in sorted(ends.values(), key=lambda e: abs(e[0])):
                root = None if end_mu is None else _piece_root(L, a, end_mu, radius)
                if root is not None and abs(root - end_v) <= 1e-14 * span:
                    return end_mu  # that end is the root already, to rounding
                if root is not None and lo < root < hi:
                    v = root
                    break
        if v is None:
            v = 0.5 * (lo + hi)
        gap, mu = project(v)
        if abs(gap) <= 1e-12 * radius:
            return mu
        if gap < 0:
            lo, ends["lo"] = v, (gap, mu, v)
        else:
            hi, ends["hi"] = v, (gap, mu, v)
        if hi - lo <= 1e-12 * span:  # closer to an empty P(v) NNLS loses digits (0 in the hull)
            break
    return ends["lo"][1]


def _piece_root(L: np.ndarray, a: np.ndarray, mu: np.ndarray, radius: float) -> float | None:
    """The v at which the projection of g_0 onto {d : <g_i, d> = v, i in A} (A = {i : mu_i >
    0}) lies at distance ``radius``: with e = d - g_0 the min-norm solution of L_A e = v 1 - a_A,
    e = v e_1 - e_2 (e_1 = L_A^+ 1, e_2 = L_A^+ a_A) and ||e||^2 = radius^2 is a quadratic in v,
    whose larger root is taken (the distance grows with v). None when A is empty or there is no
    root."""
    active = mu > 0
    if not active.any():
        return None
    rhs = np.stack([np.ones(int(active.sum())), a[active]], axis=1)
    e = np.linalg.lstsq(L[active], rhs, rcond=None)[0]
    qa, qb, qc = e[:, 0] @ e[:, 0], e[:, 0] @ e[:, 1], e[:, 1] @ e[:, 1] - radius**2
    disc = qb * qb - qa * qc
    if qa <= 0 or disc < 0:
        return None
    return float((qb + math.sqrt(disc)) / qa)
