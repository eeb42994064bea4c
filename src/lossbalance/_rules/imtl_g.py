"""IMTL-G's rule (Liu et al., ICLR 2021, "Towards Impartial Multi-task Learning")."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ._gram import check_gram, like


def imtl_g_weights(gram: Tensor) -> Tensor:
    """IMTL-G's coefficients alpha, d = sum_t alpha_t g_t, from G_ij = <g_i, g_j>.

    Liu et al. (2021), Sec. 3.2 (the closed form of IMTL-G): the aggregated gradient
    g = sum_t alpha_t g_t with sum_t alpha_t = 1 has equal projections on every task's unit
    gradient u_t = g_t / ||g_t||, g . u_1 = g . u_t; with
        D = [g_1 - g_2, ..., g_1 - g_T]^T,   U = [u_1 - u_2, ..., u_1 - u_T]^T,
        alpha_{2:T} = g_1 U^T (D U^T)^{-1},   alpha_1 = 1 - sum_{t >= 2} alpha_t.
    In Gram terms, with n_t = sqrt(G_tt): (D U^T)_ab = G_11/n_1 - G_1b/n_b - G_a1/n_1 + G_ab/n_b
    and (g_1 U^T)_b = G_11/n_1 - G_1b/n_b (a, b = 2..T). When D U^T is singular (linearly
    dependent gradients) its pseudo-inverse is used (the least-norm solution; the paper assumes
    independent gradients). A task with a zero gradient has no unit vector: it gets
    alpha_t = 0 and the rule runs on the others (all zero: the uniform alpha, d = 0).

    Returns alpha [T] in ``gram``'s dtype and device.
    """
    G = check_gram(gram, "IMTL-G")  # numpy ops: see _gram
    T = G.shape[0]
    alpha = np.zeros(T)
    live = np.flatnonzero(np.diagonal(G) > 0)
    if len(live) == 0:
        return like(np.full(T, 1.0 / T), gram)
    Gl = G[np.ix_(live, live)]
    n = np.sqrt(np.diagonal(Gl))
    # columns of G / n: <g_a, u_b> = G_ab / n_b
    P = Gl / n[None, :]
    g1U = P[0, 0] - P[0, 1:]                                       # g_1 . (u_1 - u_b)
    DU = P[0, 0] - P[0, 1:][None, :] - P[1:, 0][:, None] + P[1:, 1:]  # (g_1 - g_a).(u_1 - u_b)
    rest = g1U @ torch.linalg.pinv(torch.from_numpy(DU)).numpy()  # torch's cut-off, threads
    alpha[live] = np.concatenate([[1 - rest.sum()], rest])
    return like(alpha, gram)
