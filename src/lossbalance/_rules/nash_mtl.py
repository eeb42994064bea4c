"""Nash-MTL's rule (Navon et al., ICML 2022, "Multi-Task Learning as a Bargaining Game")."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from ._gram import check_gram, like


class NoSolution(ValueError):
    """G alpha = 1/alpha has no positive solution for this Gram matrix (or none was reached)."""


def nash_mtl_weights(gram: Tensor, *, previous: Tensor | None = None, max_norm: float = 1.0,
                     optim_niter: int = 20) -> Tensor:
    """Nash-MTL's coefficients alpha, d = sum_i alpha_i g_i, from G_ij = <g_i, g_j>.

    Navon et al. (2022), Eq. 2 / Algorithm 1: the Nash bargaining solution is the alpha > 0 with
        G alpha = 1 / alpha   (elementwise),
    i.e. alpha_i <g_i, d> = 1 for every task. The paper (Sec. 3.2) approaches it with a
    sequence of convex problems (min sum_i beta_i + phi-linearisation s.t.
    -phi_i(alpha) = -log alpha_i - log beta_i <= 0, beta = G alpha; the official code, cvxpy
    and ECOS, 20 problems at most). Every constraint is tight at the solution, so that
    sequence stops at the same alpha; here it is found directly: alpha is the unique minimiser
    of the strictly convex F(alpha) = 1/2 alpha^T G alpha - sum_i log alpha_i (its gradient is
    G alpha - 1/alpha), by Newton's method with a backtracking line search that keeps
    alpha > 0, started from ``previous`` (the last step's alpha, the warm start the official
    code keeps; uniform when None) scaled to the minimiser along its ray, at most
    ``optim_niter`` Newton steps, stopping when the Newton decrement^2 falls under 1e-24 T
    (float64 rounding). Random Gram matrices converge in 5-15 steps from a cold start.

    ``max_norm`` > 0: as the official code clips the combined gradient's norm to ``max_norm``
    after the backward, alpha is scaled down when ||d|| = sqrt(alpha^T G alpha) exceeds it
    (the norm in the space G was measured in). 0 disables it.

    No solution exists when some non-negative, non-zero v has G v = 0 (0 in the cone of the
    gradients, e.g. two opposite gradients, or a zero gradient): then a ValueError.
    Returns alpha [T] in ``gram``'s dtype and device.
    """
    G = check_gram(gram, "Nash-MTL")
    T = G.shape[0]
    if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)) \
            or not math.isfinite(max_norm) or max_norm < 0:
        raise ValueError(f"Nash-MTL: max_norm must be a finite number >= 0, got {max_norm!r}")
    if isinstance(optim_niter, bool) or not isinstance(optim_niter, int) or optim_niter < 1:
        raise ValueError(f"Nash-MTL: optim_niter must be an int >= 1, got {optim_niter!r}")
    if previous is None:
        alpha = np.ones(T)
    else:
        if not isinstance(previous, Tensor) or previous.shape != (T,):
            shape = list(previous.shape) if isinstance(previous, Tensor) else type(previous)
            raise ValueError(f"Nash-MTL: previous must be a tensor of shape [{T}], got {shape}")
        alpha = previous.detach().to(device="cpu", dtype=torch.float64).numpy().copy()
        if not np.isfinite(alpha).all() or (alpha <= 0).any():
            raise ValueError(f"Nash-MTL: previous must be finite and > 0, got {alpha.tolist()}")
    zero = np.flatnonzero(np.diagonal(G) <= 0)
    if len(zero):
        raise NoSolution(
            f"Nash-MTL: task {int(zero[0])} has a zero gradient (gram[{int(zero[0])}, "
            f"{int(zero[0])}] = 0): G alpha = 1/alpha has no solution"
        )

    # numpy instead of torch (see _gram): T = 10, 888 -> 344 us a call (busy machine)
    def F(a: np.ndarray) -> float:
        return float(0.5 * a @ G @ a - np.log(a).sum())

    quad = float(alpha @ G @ alpha)
    if quad <= 0:
        raise NoSolution("Nash-MTL: G alpha = 1/alpha has no solution (previous^T G previous = 0)")
    alpha = alpha * math.sqrt(T / quad)  # argmin_k F(k alpha)
    for _ in range(optim_niter):
        grad = G @ alpha - 1 / alpha
        hess = G + np.diag(1 / alpha**2)
        step = np.linalg.solve(hess, grad)
        decrement2 = float(grad @ step)
        if decrement2 <= 1e-24 * T:
            break
        t = 1.0
        while (alpha - t * step <= 0).any():
            t *= 0.5
        if decrement2 > 0.1:  # damped phase: backtracking (Armijo) on F
            f0 = F(alpha)
            while F(alpha - t * step) > f0 - 0.25 * t * decrement2 and t > 1e-10:
                t *= 0.5
        alpha = alpha - t * step
    if not np.isfinite(alpha).all() or float(np.abs((G @ alpha) * alpha - 1).max()) > 1e-3:
        raise NoSolution(
            "Nash-MTL: G alpha = 1/alpha has no solution for this Gram matrix (0 lies in the "
            "cone of the gradients) or was not reached in optim_niter steps"
        )
    return like(clip_norm(alpha, G, max_norm), gram)


def clip_norm(alpha: np.ndarray, G: np.ndarray, max_norm: float) -> np.ndarray:
    """alpha scaled so that ||d|| = sqrt(alpha^T G alpha) <= max_norm (0: no clip), as the
    official code clips the combined gradient."""
    if max_norm > 0:
        norm = math.sqrt(max(float(alpha @ G @ alpha), 0.0))
        if norm > max_norm:
            alpha = alpha * (max_norm / norm)
    return alpha
