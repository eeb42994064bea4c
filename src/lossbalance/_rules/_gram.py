"""The Gram matrix every aggregation rule starts from: checked, in float64 on the CPU.

Each rule maps the tasks' Gram matrix G_ij = <g_i, g_j> ([T, T], symmetric positive
semi-definite) to coefficients c ([T]) with the update direction d = sum_i c_i g_i. The rules
compute in float64 numpy arrays on the CPU (T is small) and hand c back as a tensor in the
Gram matrix's dtype and device.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

# The rules' arithmetic runs in numpy: on a 10 x 10 float64 matrix an add costs 0.4 us and a
# matrix-vector product 1.0 us against torch's 1.2 and 4.4 us (idle machine, 1 thread).


def check_gram(gram: object, rule: str) -> np.ndarray:
    """The Gram matrix as a float64 numpy array, after checking it is one.

    Refused, naming ``rule`` and the value: a non-tensor (TypeError), a non-float dtype
    (TypeError), anything but a square [T, T] matrix with T >= 1, a non-finite entry, a negative
    diagonal entry (a squared norm), an asymmetry larger than the rounding of ``gram``'s dtype
    allows (|G_ij - G_ji| > sqrt(eps) * max_k G_kk). The result is symmetrised, (G + G^T) / 2.
    """
    if not isinstance(gram, Tensor):
        raise TypeError(f"{rule}: gram must be a torch.Tensor, got {type(gram).__name__}")
    if not gram.is_floating_point():
        raise TypeError(f"{rule}: gram must have a floating dtype, got {gram.dtype}")
    if gram.dim() != 2 or gram.shape[0] != gram.shape[1] or gram.shape[0] < 1:
        raise ValueError(
            f"{rule}: gram must be a square [T, T] matrix with T >= 1, got shape "
            f"{list(gram.shape)}"
        )
    g = gram.detach().to(device="cpu", dtype=torch.float64).numpy()
    finite = np.isfinite(g)
    if not finite.all():
        i, j = np.argwhere(~finite)[0]
        raise ValueError(f"{rule}: gram[{i}, {j}] is not finite: {float(g[i, j])}")
    diag = np.diagonal(g)
    if diag.min() < 0:
        i = int(np.argmax(diag < 0))
        raise ValueError(
            f"{rule}: gram[{i}, {i}] = {float(diag[i])} is a squared norm and cannot be negative"
        )
    tol = math.sqrt(torch.finfo(gram.dtype).eps) * float(diag.max())
    asym = np.abs(g - g.T)
    if asym.max() > tol:
        i, j = divmod(int(asym.argmax()), g.shape[0])
        raise ValueError(
            f"{rule}: gram is not symmetric: gram[{i}, {j}] = {float(g[i, j])} but "
            f"gram[{j}, {i}] = {float(g[j, i])}"
        )
    return (g + g.T) / 2


def gram_factor(gram: np.ndarray) -> np.ndarray:
    """L [T, r] with L L^T = G, r = rank(G): the tasks' gradients in an orthonormal basis.

    From the eigen-decomposition G = V diag(lambda) V^T: L = V_r diag(sqrt(lambda_r)) over the
    eigenvalues above T * eps * max(lambda) (float64 eps; the rest is rounding). Row i of L is
    g_i written in r coordinates, so <l_i, l_j> = G_ij and every rule that needs the vectors
    themselves can work on L instead.
    """
    # torch's eigh: numpy's LAPACK (OpenBLAS) starts its own threads for larger T (idle:
    # 751 us against torch's 189 us at T = 32; busy: MGDA at T = 64 went from 1.0 to 52 ms);
    # torch keeps to torch.get_num_threads()
    lam, vec = (t.numpy() for t in torch.linalg.eigh(torch.from_numpy(gram)))
    tol = max(float(lam.max()), 0.0) * gram.shape[0] * np.finfo(np.float64).eps
    keep = lam > tol
    return vec[:, keep] * np.sqrt(lam[keep])


def like(c: np.ndarray, gram: Tensor) -> Tensor:
    """The coefficients (a float64 numpy array) as a tensor in ``gram``'s dtype and device."""
    return torch.from_numpy(np.ascontiguousarray(c, dtype=np.float64)).to(
        device=gram.device, dtype=gram.dtype)
