"""PCGrad's rule against Yu et al.'s Algorithm 1 written on the gradient vectors."""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from literal_aggregation import jacobian_cases, pcgrad, rel_err

from lossbalance._rules import pcgrad_weights
from lossbalance._rules.pcgrad import pcgrad_coefficients, pcgrad_orders

from ._common import bad_grams, jacobians, permutation


@pytest.mark.parametrize("seed", [0, 1])
def test_direction_is_the_sum_of_the_projected_gradients(seed):
    for name, J in jacobian_cases(seed):
        c = pcgrad_weights(J @ J.T, generator=torch.Generator().manual_seed(seed))
        orders = pcgrad_orders(J.shape[0], torch.Generator().manual_seed(seed))
        assert rel_err(c @ J, pcgrad(J, orders), J) < 1e-5, name


def test_seeded_and_global_generator():
    J = torch.randn(6, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    G = J @ J.T
    a = pcgrad_weights(G, generator=torch.Generator().manual_seed(7))
    b = pcgrad_weights(G, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    draws = {tuple(pcgrad_weights(G, generator=torch.Generator().manual_seed(s)).tolist())
             for s in range(20)}
    assert len(draws) > 1  # the order matters for these conflicting gradients
    torch.manual_seed(11)
    c = pcgrad_weights(G)
    same_orders = pcgrad_orders(6, torch.Generator().manual_seed(11))
    assert torch.equal(c, pcgrad_coefficients(G, same_orders))


def test_without_conflict_it_is_the_sum():
    J = torch.tensor([[1.0, 0.1], [0.5, 1.0], [1.0, 1.0]], dtype=torch.float64)
    assert torch.equal(pcgrad_weights(J @ J.T, generator=torch.Generator()),
                       torch.ones(3, dtype=torch.float64))


def test_against_torchjd_same_seed():
    """torchjd 0.18's PCGrad draws one torch.randperm(T) per task from the global generator,
    as pcgrad_orders does: from the same seed the two agree to rounding."""
    jd = pytest.importorskip("torchjd.aggregation")
    weighting = jd.PCGradWeighting()
    for seed, (name, J) in enumerate(jacobian_cases(4)):
        G = J @ J.T
        torch.manual_seed(seed)
        theirs = weighting(G)
        ours = pcgrad_weights(G, generator=torch.Generator().manual_seed(seed))
        assert rel_err(theirs @ J, ours @ J, J) < 1e-12, name


@settings(max_examples=25, deadline=None)
@given(J=jacobians(), seed=st.integers(0, 1000))
def test_permuting_tasks_with_their_orders_permutes_the_weights(J, seed):
    T = J.shape[0]
    perm = permutation(T, seed)
    inv = torch.argsort(perm)
    orders = pcgrad_orders(T, torch.Generator().manual_seed(seed + 1))
    # new task a is old task perm[a]; its order is the old one, renamed through inv
    orders_p = [inv[orders[int(perm[a])]] for a in range(T)]
    c = pcgrad_coefficients(J @ J.T, orders)
    c_p = pcgrad_coefficients(J[perm] @ J[perm].T, orders_p)
    assert torch.isfinite(c).all()
    assert torch.allclose(c_p, c[perm], rtol=1e-9, atol=1e-12)


@settings(max_examples=20, deadline=None)
@given(J=jacobians(), s=st.floats(1e-3, 1e3))
def test_global_scale_leaves_the_weights(J, s):
    orders = pcgrad_orders(J.shape[0], torch.Generator().manual_seed(0))
    assert torch.allclose(pcgrad_coefficients((s * J) @ (s * J).T, orders),
                          pcgrad_coefficients(J @ J.T, orders), rtol=1e-9, atol=1e-12)


def test_bad_input():
    for gram, fragment in bad_grams():
        with pytest.raises(ValueError, match=re.escape(fragment)):
            pcgrad_weights(gram)
    with pytest.raises(TypeError, match="generator"):
        pcgrad_weights(torch.eye(2), generator=3)
    with pytest.raises(ValueError, match="permutation"):
        pcgrad_coefficients(torch.eye(2), [torch.tensor([0, 0]), torch.tensor([0, 1])])
