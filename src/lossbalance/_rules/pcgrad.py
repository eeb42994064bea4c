"""PCGrad's rule (Yu et al., NeurIPS 2020), with the projections tracked in the Gram space."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from ._gram import check_gram, like


def pcgrad_orders(num_tasks: int, generator: torch.Generator | None = None) -> list[Tensor]:
    """The random task orders of one PCGrad step: for each task i = 0..T-1 in turn, one
    ``torch.randperm(T, generator=generator)`` (task i itself is skipped when it comes up).
    ``generator=None`` draws from torch's global generator, as torchjd's PCGrad does, so both
    draw the same orders from the same seed."""
    return [torch.randperm(num_tasks, generator=generator) for _ in range(num_tasks)]


def pcgrad_coefficients(gram: Tensor, orders: Sequence[Tensor]) -> Tensor:
    """PCGrad's coefficients for given task orders (``orders[i]``: the order task i's gradient
    meets the others in). Yu et al. (2020), Algorithm 1:
        g_i^PC = g_i;  for j in orders[i], j != i:  if g_i^PC . g_j < 0:
            g_i^PC = g_i^PC - (g_i^PC . g_j) / ||g_j||^2 g_j
        d = sum_i g_i^PC.
    Every g_i^PC stays a combination sum_k w_ik g_k, so only w_i changes:
    g_i^PC . g_j = (G w_i)_j, and a projection subtracts (G w_i)_j / G_jj from w_ij.
    Returns c = sum_i w_i (float64, CPU); a zero gradient g_j (G_jj = 0) is never projected on.
    """
    G = check_gram(gram, "PCGrad")
    T = G.shape[0]
    if len(orders) != T:
        raise ValueError(f"PCGrad: {len(orders)} task orders for T = {T} tasks")
    table = np.empty((T, T), dtype=np.int64)
    for i in range(T):
        order = orders[i].tolist() if isinstance(orders[i], Tensor) else [int(j) for j in orders[i]]
        if sorted(order) != list(range(T)):
            raise ValueError(
                f"PCGrad: orders[{i}] must be a permutation of 0..{T - 1}, got {order}"
            )
        table[i] = order
    return torch.from_numpy(_coefficients(G, table))


def _coefficients(G: np.ndarray, table: np.ndarray) -> np.ndarray:
    """c = sum_i w_i for the task orders ``table[i]`` (checked permutations), in numpy.

    The T tasks' projection sequences are independent, so step k runs for all of them at
    once (task i meets j = table[i, k]): T vectorised steps instead of T (T - 1) scalar ones
    (T = 10: 1650 -> 239 us a call, T = 64: 124 -> 1.1 ms; benchmarks/rules_speed.py).
    """
    T = G.shape[0]
    rows = np.arange(T)
    diag = np.diagonal(G)
    inverse = np.divide(1.0, diag, out=np.zeros(T), where=diag > 0)
    # scale[i, k] = 1 / G_jj for j = table[i, k]; 0 where no projection may happen (j = i:
    # task i itself; G_jj = 0: a zero gradient)
    scale = np.where(table == rows[:, None], 0.0, inverse[table])
    flat = rows[:, None] * T + table  # the position of W[i, table[i, k]] in W's storage
    W = np.eye(T)  # row i: w_i, g_i^PC = sum_k W_ik g_k
    w = W.reshape(-1)  # a view: writing w writes W
    for k in range(T):
        inner = np.einsum("ij,ij->i", G[table[:, k]], W)  # g_i^PC . g_j = (G w_i)_j, each i
        w[flat[:, k]] -= np.minimum(inner, 0.0) * scale[:, k]  # only the conflicts move
    return W.sum(axis=0)


def pcgrad_weights(gram: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
    """PCGrad's coefficients c with d = sum_i c_i g_i (Yu et al., NeurIPS 2020, Algorithm 1).

    Each task's gradient is projected onto the normal plane of every other task's gradient it
    conflicts with (g_i^PC . g_j < 0), the others taken in a random order drawn for that task
    from ``generator`` (``pcgrad_orders``), and the projected gradients are summed, as the paper
    does. The projections are tracked as coefficients over the original gradients
    (``pcgrad_coefficients``), so c follows from the Gram matrix alone.

    Returns c [T] in ``gram``'s dtype and device.
    """
    G = check_gram(gram, "PCGrad")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"PCGrad: generator must be a torch.Generator or None, got {generator!r}")
    orders = pcgrad_orders(G.shape[0], generator)  # randperm's permutations: no check needed
    return like(_coefficients(G, torch.stack(orders).numpy()), gram)
