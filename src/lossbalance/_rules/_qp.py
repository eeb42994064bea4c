"""Shared quadratic programs of the aggregation rules, solved exactly as non-negative least squares.

The rules' QPs are posed over task weights w with the Gram matrix G as Hessian, which is only
positive SEMI-definite when the gradients are linearly dependent (fewer coordinates than tasks,
duplicated or collinear tasks). Each QP below is rewritten as a non-negative least-squares
problem in the r = rank(G) coordinates of L (L L^T = G, ``_gram.gram_factor``) and solved
with Lawson & Hanson's active-set algorithm (``scipy.optimize.nnls``): exact to rounding, no
regularisation added, and well defined when G is singular. (``quadprog``, which needs a
strictly convex program, declares e.g. the projection of two opposite 1-d gradients onto
their dual cone {0} "inconsistent"; torchjd avoids that by adding 1e-4 * I to the
trace-normalised G, which moves the answer.) Everything here is float64 numpy arrays.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import numpy as np

EXTRA_HINT = 'pip install "lossbalance[solvers]"'


def require(module: str, rule: str) -> ModuleType:
    """Import ``module`` for ``rule``, or an ImportError naming the package and the extra."""
    package = module.split(".")[0]
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"{rule} needs the package '{package}', which is not installed; install the "
            f"solvers extra: {EXTRA_HINT}"
        ) from err


def nnls(A: np.ndarray, b: np.ndarray, rule: str) -> np.ndarray:
    """argmin_{x >= 0} ||A x - b||^2 (float64), by ``scipy.optimize.nnls``."""
    optimize = require("scipy.optimize", rule)
    x, _ = optimize.nnls(A, b, maxiter=100 * max(A.shape[1], 1))
    return x


def min_norm_simplex(L: np.ndarray, rule: str = "MGDA") -> np.ndarray:
    """w* in argmin_{w >= 0, sum w = 1} ||L^T w||^2: the weights of the min-norm point of
    conv{l_i} (the rows of L, i.e. the gradients g_i in r coordinates).

    As Lawson & Hanson's least-distance programming (1974, ch. 23) reduces to NNLS:
        u* = argmin_{u >= 0} ||L^T u||^2 + (1^T u - 1)^2,   w* = u* / 1^T u*.
    Writing u = t w (w in the simplex, t >= 0), the objective is t^2 q + (t - 1)^2 with
    q = ||L^T w||^2, minimal at t = 1 / (1 + q) with value q / (1 + q), increasing in q: so
    u*'s direction minimises q over the simplex. When 0 is in the hull (q* = 0), t = 1 and w*
    is a convex combination with L^T w* = 0. G = 0 gives the uniform w.
    """
    T, r = L.shape
    scale = np.abs(L).max() if L.size else 0.0
    if r == 0 or scale == 0:
        return np.full(T, 1.0 / T)
    # w* does not change with the gradients' scale; NNLS's tolerance does: solve at unit scale
    # (at ||g|| ~ 1e-8 the ones row dominated and d came out 1e-5 of ||g|| off the min norm)
    L = L / scale
    A = np.vstack([L.T, np.ones((1, T))])
    b = np.zeros(r + 1)
    b[-1] = 1.0
    u = nnls(A, b, rule)
    return u / u.sum()


def dual_cone_weights(L: np.ndarray, u: np.ndarray, rule: str = "UPGrad") -> np.ndarray:
    """v with L^T v = the projection of L^T u onto the dual cone K = {x : L x >= 0}.

    Quinton & Rey (2024), Prop. 1: pi_J(J^T u) = J^T v with v = argmin_{v >= u} v^T G v.
    With v = u + mu, mu >= 0, that is the NNLS problem mu* = argmin_{mu >= 0} ||L^T mu + L^T u||^2
    (Moreau's decomposition: -L^T mu* is the projection onto the polar cone), so v = u + mu*.
    The direction L^T v is unique; v is unique when G is invertible. When L L^T u >= 0 already
    (L^T u is in K) mu* = 0 satisfies the KKT conditions and no QP is solved.
    """
    if L.shape[1] == 0:
        return u.copy()
    x = L.T @ u
    if (L @ x).min() >= 0:  # already in the cone: skips the NNLS call (26 us at T = 10)
        return u.copy()
    return u + nnls(L.T, -x, rule)


def project_polyhedron(L: np.ndarray, x0: np.ndarray, h: np.ndarray,
                       rule: str) -> np.ndarray | None:
    """mu >= 0 with x0 + L^T mu = the projection of x0 onto {x : L x >= h} (None when empty).

    Least-distance programming (Lawson & Hanson 1974, ch. 23): with e = x - x0 the problem is
    min ||e|| s.t. L e >= h - L x0 =: f; u* = argmin_{u >= 0} ||L^T u||^2 + (f^T u - 1)^2 (NNLS),
    and when the residual is non-zero (1 - f^T u* > 0) e = L^T u* / (1 - f^T u*), so
    mu = u* / (1 - f^T u*) (the KKT multipliers: e = L^T mu). A zero residual means the set is
    empty.
    """
    f = h - L @ x0
    A = np.vstack([L.T, f[None, :]])
    b = np.zeros(A.shape[0])
    b[-1] = 1.0
    u = nnls(A, b, rule)
    slack = 1.0 - float(f @ u)
    if slack <= 1e-12 * max(1.0, float(np.abs(f).max()) * float(u.sum())):
        return None
    return u / slack
