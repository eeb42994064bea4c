"""Aligned-MTL's rule (Senushkin et al., CVPR 2023, "Independent Component Alignment")."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ._gram import check_gram, like

#: the official code's rank cut-off: eigenvalues <= max(lambda) * T * float32 eps are dropped
RANK_EPS = torch.finfo(torch.float32).eps


def aligned_mtl_weights(gram: Tensor) -> Tensor:
    """Aligned-MTL's coefficients c, d = sum_t c_t g_t, from the Gram matrix M = G^T G.

    Senushkin et al. (2023), Algorithm 1, with G = [g_1, ..., g_T] the [P, T] gradient matrix:
    the eigen-decomposition M = V Lambda V^T (Lambda = Sigma^2, the squared singular values of
    G), the balance transformation
        B = sqrt(lambda_min) V Sigma^{-1} V^T,
    the aligned gradients G_hat = G B (= sigma_min U V^T for G = U Sigma V^T: orthogonal
    columns of equal norm sigma_min, the Procrustes solution) and the update G_hat w with the
    task weights w = 1 (the official code sums the aligned gradients): c = B 1.
    As in the official code the eigenvalues at or below max(lambda) * T * eps_float32 count as
    zero (rank-deficient G: V and Sigma restricted to the rank, lambda_min the smallest kept).
    G = 0 gives c = 1 (d = 0).

    Scale: c is invariant to a common scale of the gradients (d scales with it).
    Returns c [T] in ``gram``'s dtype and device.
    """
    M = check_gram(gram, "Aligned-MTL")  # numpy ops: see _gram
    T = M.shape[0]
    # torch's eigh: numpy's LAPACK starts its own threads at T ~ 64 (see _gram.gram_factor)
    lam, V = (t.numpy() for t in torch.linalg.eigh(torch.from_numpy(M)))
    tol = float(lam.max()) * T * RANK_EPS
    keep = lam > tol
    if not keep.any():
        return like(np.ones(T), gram)
    lam, V = lam[keep], V[:, keep]
    B = np.sqrt(lam.min()) * (V / np.sqrt(lam)) @ V.T
    return like(B.sum(axis=1), gram)
