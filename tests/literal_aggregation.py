"""Literal implementations of the gradient-aggregation methods, on the gradient VECTORS.

Each function takes the Jacobian J [T, P] (row i is task i's gradient g_i) and returns the
method's update direction d [P], written from its paper (and, where the paper leaves a step
to its code, from the official code) without the Gram-matrix shortcuts of
``lossbalance._rules``: the tests check that sum_i c_i g_i with the rules' c equals these.
Everything is float64 numpy/torch, plain loops, no speed concerns.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
from scipy.optimize import nnls

# ---------------------------------------------------------------- random Jacobians for the tests


def jacobian_cases(seed: int) -> list[tuple[str, torch.Tensor]]:
    """Named random Jacobians [T, P] in float64: T = 2, 3, 10; P > T and P < T; gradients of
    very different norms, near-collinear, conflicting (pairs nearly opposite)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    cases = []
    for T in (2, 3, 10):
        cases.append((f"random T={T}", randn(T, T + 7)))
        norms = torch.logspace(-2, 2, T, dtype=torch.float64)[:, None]
        cases.append((f"norms T={T}", randn(T, 20) * norms))
        stretch = 1 + torch.rand(T, 1, generator=g, dtype=torch.float64)
        cases.append((f"collinear T={T}", randn(1, 30) * stretch + 1e-3 * randn(T, 30)))
        half = randn((T + 1) // 2, 25)
        conflict = torch.cat([half, -half + 0.3 * randn(*half.shape)])[:T]
        cases.append((f"conflicting T={T}", conflict))
        P = max(1, T - 2) if T > 2 else 1
        cases.append((f"P<T T={T} P={P}", randn(T, P)))
    return cases


def rel_err(d: torch.Tensor, d_ref: torch.Tensor, J: torch.Tensor) -> float:
    """||d - d_ref|| / ||d_ref||, with ||d_ref|| floored at 1e-7 max_i ||g_i|| (a zero
    reference direction, e.g. MGDA with 0 in the hull, is compared at the gradients' scale)."""
    scale = max(float(d_ref.norm()), 1e-7 * float(J.norm(dim=1).max()), 1e-300)
    return float((d - d_ref).norm()) / scale


# ---------------------------------------------------------------- MGDA (Sener & Koltun 2018)


def mgda_two_tasks(J: torch.Tensor) -> torch.Tensor:
    """Sener & Koltun, Algorithm 1 (two tasks, closed form):
    gamma = clip([(theta_bar - theta) . theta_bar] / ||theta - theta_bar||^2, 0, 1),
    d = gamma theta + (1 - gamma) theta_bar."""
    theta, theta_bar = J[0], J[1]
    diff = theta - theta_bar
    if float(diff @ diff) == 0:
        return theta.clone()
    gamma = float(((theta_bar - theta) @ theta_bar) / (diff @ diff))
    gamma = min(max(gamma, 0.0), 1.0)
    return gamma * theta + (1 - gamma) * theta_bar


def mgda_frank_wolfe(J: torch.Tensor, iters: int = 2000) -> torch.Tensor:
    """Sener & Koltun, Algorithm 2 (Frank-Wolfe) on the vectors: alpha = 1/T; repeat
    t_hat = argmin_r <g_r, sum_t alpha^t g_t>, gamma_hat from Algorithm 1 for the pair
    (sum_t alpha^t g_t, g_t_hat), alpha = (1 - gamma_hat) alpha + gamma_hat e_t_hat."""
    T = J.shape[0]
    alpha = torch.full((T,), 1.0 / T, dtype=J.dtype)
    for _ in range(iters):
        d = alpha @ J
        t_hat = int(torch.argmin(J @ d))
        pair = torch.stack([J[t_hat], d])
        point = mgda_two_tasks(pair)
        diff = J[t_hat] - d
        gamma = 0.0 if float(diff @ diff) == 0 else float(((point - d) @ diff) / (diff @ diff))
        e = torch.zeros(T, dtype=J.dtype)
        e[t_hat] = 1.0
        alpha = (1 - gamma) * alpha + gamma * e
    return alpha @ J


def mgda_faces(J: torch.Tensor) -> torch.Tensor:
    """The min-norm point of conv{g_i} by enumerating the hull's faces: for every subset S of
    the tasks, the min-norm point of the affine hull of {g_i : i in S} (least squares on the
    vectors); the answer is the shortest of those whose barycentric weights are >= 0."""
    Jn = J.numpy()
    T = Jn.shape[0]
    best = None
    for k in range(1, T + 1):
        for S in itertools.combinations(range(T), k):
            g0 = Jn[S[0]]
            A = (Jn[list(S[1:])] - g0).T  # [P, k-1]
            z = np.linalg.lstsq(A, -g0, rcond=None)[0] if k > 1 else np.zeros(0)
            w = np.concatenate([[1 - z.sum()], z])
            if (w < -1e-12).any():
                continue
            d = g0 + A @ z
            if best is None or d @ d < best @ best:
                best = d
    return torch.from_numpy(best)


# ---------------------------------------------------------------- UPGrad (Quinton & Rey 2024)


def project_dual_cone(J: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """pi_J(g) = argmin_{x : J x >= 0} ||x - g||^2 (Quinton & Rey, Eq. 3), by Moreau's
    decomposition: g = pi_K(g) + pi_K°(g) with the polar cone K° = {-J^T mu : mu >= 0}, and
    pi_K°(g) = -J^T mu* with mu* = argmin_{mu >= 0} ||J^T mu + g||^2 (scipy's NNLS)."""
    mu = nnls(J.numpy().T, -g.numpy(), maxiter=50 * J.shape[0])[0]
    return g + J.T @ torch.from_numpy(mu)


def upgrad(J: torch.Tensor) -> torch.Tensor:
    """A_UPGrad(J) = 1/m sum_i pi_J(g_i) (Quinton & Rey, Eq. 5, uniform preference)."""
    return sum(project_dual_cone(J, J[i]) for i in range(J.shape[0])) / J.shape[0]


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm()
