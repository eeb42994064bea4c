"""The Gram matrix every aggregation rule starts from: checked, in float64 on the CPU.

Each rule maps the tasks' Gram matrix G_ij = <g_i, g_j> ([T, T], symmetric positive
semi-definite) to coefficients c ([T]) with the update direction d = sum_i c_i g_i. The rules
compute in float64 on the CPU (T is small) and hand c back in the Gram matrix's dtype and device.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def check_gram(gram: object, rule: str) -> Tensor:
    """The Gram matrix as a float64 CPU tensor, after checking it is one.

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
    g = gram.detach().to(device="cpu", dtype=torch.float64)
    bad = (~torch.isfinite(g)).nonzero()
    if len(bad):
        i, j = bad[0].tolist()
        raise ValueError(f"{rule}: gram[{i}, {j}] is not finite: {g[i, j].item()}")
    diag = g.diagonal()
    if bool((diag < 0).any()):
        i = int((diag < 0).nonzero()[0])
        raise ValueError(
            f"{rule}: gram[{i}, {i}] = {diag[i].item()} is a squared norm and cannot be negative"
        )
    tol = math.sqrt(torch.finfo(gram.dtype).eps) * float(diag.max())
    asym = (g - g.T).abs()
    if float(asym.max()) > tol:
        i, j = divmod(int(asym.argmax()), g.shape[0])
        raise ValueError(
            f"{rule}: gram is not symmetric: gram[{i}, {j}] = {g[i, j].item()} but "
            f"gram[{j}, {i}] = {g[j, i].item()}"
        )
    return (g + g.T) / 2


def gram_factor(gram: Tensor) -> Tensor:
    """L [T, r] with L L^T = G, r = rank(G): the tasks' gradients in an orthonormal basis.

    From the eigen-decomposition G = V diag(lambda) V^T: L = V_r diag(sqrt(lambda_r)) over the
    eigenvalues above T * eps * max(lambda) (float64 eps; the rest is rounding). Row i of L is
    g_i written in r coordinates, so <l_i, l_j> = G_ij and every rule that needs the vectors
    themselves can work on L instead.
    """
    lam, vec = torch.linalg.eigh(gram)
    tol = float(lam.max().clamp_min(0)) * gram.shape[0] * torch.finfo(torch.float64).eps
    keep = lam > tol
    return vec[:, keep] * lam[keep].sqrt()


def like(c: Tensor, gram: Tensor) -> Tensor:
    """The coefficients in ``gram``'s dtype and on its device."""
    return c.to(device=gram.device, dtype=gram.dtype)
