"""Shared helpers of the rules' tests: random Gram matrices for the invariants, the checks."""

from __future__ import annotations

import torch
from hypothesis import strategies as st


@st.composite
def jacobians(draw, min_tasks: int = 2, max_tasks: int = 8):
    """A random float64 Jacobian [T, P] (P from 1 to 12, so P < T happens)."""
    T = draw(st.integers(min_tasks, max_tasks))
    P = draw(st.integers(1, 12))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    scales = torch.exp(3 * torch.rand(T, 1, generator=g, dtype=torch.float64) - 1.5)
    return torch.randn(T, P, generator=g, dtype=torch.float64) * scales


def permutation(T: int, seed: int) -> torch.Tensor:
    return torch.randperm(T, generator=torch.Generator().manual_seed(seed))


def bad_grams():
    """(gram, message fragment) pairs every rule must refuse."""
    ok = torch.eye(3)
    nan = ok.clone()
    nan[1, 2] = float("nan")
    asym = ok.clone()
    asym[0, 1] = 0.5
    neg = ok.clone()
    neg[2, 2] = -1.0
    return [
        (torch.ones(2, 3), "square"),
        (torch.ones(3), "square"),
        (torch.ones(0, 0), "square"),
        (nan, "gram[1, 2] is not finite"),
        (asym, "not symmetric"),
        (neg, "gram[2, 2] = -1.0"),
    ]
