"""Literal implementations of the gradient-aggregation methods, on the gradient VECTORS.

Each function takes the Jacobian J [T, P] (row i is task i's gradient g_i) and returns the
method's update direction d [P], written from its paper (and, where the paper leaves a step
to its code, from the official code) without the Gram-matrix shortcuts of
``lossbalance._rules``: the tests check that sum_i c_i g_i with the rules' c equals these.
Everything is float64 numpy/torch, plain loops, no speed concerns.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch
from scipy.optimize import minimize, nnls

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


# ---------------------------------------------------------------- PCGrad (Yu et al. 2020)


def pcgrad(J: torch.Tensor, orders) -> torch.Tensor:
    """Yu et al., Algorithm 1 on the vectors: each g_i is projected, in orders[i] (skipping i),
    onto the normal plane of every g_j it conflicts with; the projected gradients are summed."""
    out = torch.zeros(J.shape[1], dtype=J.dtype)
    for i in range(J.shape[0]):
        g = J[i].clone()
        for j in orders[i].tolist():
            if j == i:
                continue
            inner = g @ J[j]
            if inner < 0:
                g = g - inner / (J[j] @ J[j]) * J[j]
        out += g
    return out


# ---------------------------------------------------------------- IMTL-G (Liu et al. 2021)


def imtl_g(J: torch.Tensor) -> torch.Tensor:
    """Liu et al. (ICLR 2021), IMTL-G's closed form on the vectors: u_t = g_t / ||g_t||,
    D = [g_1 - g_t]_{t>=2}, U = [u_1 - u_t]_{t>=2}, alpha_{2:T} = g_1 U^T (D U^T)^{-1}
    (pseudo-inverse when singular), alpha_1 = 1 - sum alpha_{2:T}; d = sum_t alpha_t g_t."""
    u = J / J.norm(dim=1, keepdim=True)
    D = J[0] - J[1:]
    U = u[0] - u[1:]
    rest = (J[0] @ U.T) @ torch.linalg.pinv(D @ U.T)
    alpha = torch.cat([(1 - rest.sum()).reshape(1), rest])
    return alpha @ J


# ---------------------------------------------------------------- CAGrad (Liu et al. 2021)


def cagrad(J: torch.Tensor, c: float = 0.5, rescale: int = 1) -> torch.Tensor:
    """The official CAGrad step on the vectors: GG = J J^T, g_0 = mean of the g_i,
    w = argmin_{w in simplex} w^T GG b + c ||g_0|| sqrt(w^T GG w) by scipy's SLSQP (as that
    code, from the uniform start; here with ftol 1e-14 and the exact gradient so that it
    converges), g_w = J^T w, d = g_0 + c ||g_0|| / ||g_w|| g_w, divided by 1 + c^2."""
    K = J.shape[0]
    Jn = J.numpy()
    GG = Jn @ Jn.T
    b = np.full(K, 1.0 / K)
    g0 = Jn.T @ b
    sqrt_phi = c * np.linalg.norm(g0)

    def obj(w):
        return w @ GG @ b + sqrt_phi * math.sqrt(max(w @ GG @ w, 0.0))

    def jac(w):
        n = math.sqrt(max(w @ GG @ w, 1e-300))
        return GG @ b + sqrt_phi * (GG @ w) / n

    res = minimize(obj, b.copy(), jac=jac, bounds=[(0, 1)] * K, method="SLSQP",
                   constraints=[{"type": "eq", "fun": lambda w: 1 - w.sum(),
                                 "jac": lambda w: -np.ones(K)}],
                   options={"ftol": 1e-14, "maxiter": 1000})
    gw = Jn.T @ res.x
    d = g0 + sqrt_phi / np.linalg.norm(gw) * gw
    return torch.from_numpy(d / {0: 1.0, 1: 1 + c**2, 2: 1 + c}[rescale])


# ---------------------------------------------------------------- Aligned-MTL (Senushkin 2023)


def aligned_mtl(J: torch.Tensor) -> torch.Tensor:
    """Senushkin et al., Algorithm 1 via the SVD of the gradient matrix G = J^T = U S V^T:
    the aligned gradients are G_hat = sigma_min U V^T (singular values at or below
    sqrt(T eps_float32) sigma_max dropped, as the official rank cut on sigma^2), and the
    update is G_hat 1 (the official code sums them)."""
    U, S, Vh = torch.linalg.svd(J.T, full_matrices=False)
    keep = (S[0] ** 2) * J.shape[0] * torch.finfo(torch.float32).eps < S**2
    U, S, Vh = U[:, keep], S[keep], Vh[keep]
    return (S.min() * U @ Vh).sum(dim=1)


# ---------------------------------------------------------------- Nash-MTL (Navon et al. 2022)


def nash_mtl(J: torch.Tensor, iters: int = 100) -> torch.Tensor:
    """Navon et al.'s sequence of convex problems as the official code poses them, on
    GTG = J J^T normalised by its Frobenius norm n: from alpha_p, minimise
        sum(GTG alpha) + phi'(alpha_p) . (alpha - alpha_p) / n,
        phi'(alpha_p) = 1/alpha_p + GTG^T (1 / (GTG alpha_p)),
    subject to -log(n alpha_i) - log((GTG alpha)_i) <= 0 (the same set as
    alpha_i (J J^T alpha)_i >= 1, written so here), until alpha stops moving. The official code
    solves each problem with cvxpy/ECOS; here SLSQP (ftol 1e-15), in the variables
    beta_i = ||g_i|| alpha_i so that it converges when the gradients' norms spread."""
    G = (J @ J.T).numpy()
    n = np.linalg.norm(G)
    Gp = G / n
    norms = np.sqrt(np.diag(G))
    alpha = 1 / norms
    for _ in range(iters):
        prev = alpha.copy()
        dphi = 1 / prev + (1 / (Gp @ prev)) @ Gp
        cost = (Gp.sum(axis=0) + dphi / n) / norms  # linear cost in beta
        Gb = G / norms[:, None] / norms[None, :]    # constraints in beta: beta_i (Gb beta)_i >= 1
        constraint = {"type": "ineq", "fun": lambda beta, Gb=Gb: beta * (Gb @ beta) - 1,
                      "jac": lambda beta, Gb=Gb: np.diag(Gb @ beta) + beta[:, None] * Gb}
        res = minimize(lambda beta, cost=cost: cost @ beta, prev * norms,
                       jac=lambda beta, cost=cost: cost, bounds=[(0, None)] * len(G),
                       method="SLSQP", options={"ftol": 1e-15, "maxiter": 500},
                       constraints=[constraint])
        alpha = res.x / norms
        if np.linalg.norm(alpha - prev) <= 1e-12 * np.linalg.norm(alpha):
            break
    return torch.from_numpy(alpha) @ J
