"""MGDA's rule against Sener & Koltun's formulas written on the gradient vectors."""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from literal_aggregation import (
    jacobian_cases,
    mgda_faces,
    mgda_frank_wolfe,
    mgda_two_tasks,
    rel_err,
)

from lossbalance._rules import mgda_weights

from ._common import bad_grams, jacobians, permutation


@pytest.mark.parametrize("seed", [0, 1])
def test_direction_is_the_min_norm_point_of_the_hull(seed):
    for name, J in jacobian_cases(seed):
        alpha = mgda_weights(J @ J.T)
        d = alpha @ J
        assert (alpha >= 0).all() and abs(float(alpha.sum()) - 1) < 1e-12, name
        # the face enumeration on the vectors (exact), and for T = 2 Algorithm 1's closed form
        assert rel_err(d, mgda_faces(J), J) < 1e-5, name
        if J.shape[0] == 2:
            assert rel_err(d, mgda_two_tasks(J), J) < 1e-6, name
        # optimality certificate: <g_i, d> >= ||d||^2 for every i (d is the hull's min-norm point)
        scale = float(J.norm(dim=1).max()) ** 2
        assert float((J @ d).min()) >= float(d @ d) - 1e-9 * scale, name


def test_frank_wolfe_of_the_paper_approaches_it():
    """Algorithm 2's Frank-Wolfe on the vectors converges to the same point: after 1000
    iterations it is there to rounding where the answer is a vertex or T = 2, and 7e-5 away on
    the conflicting T = 3 case (sublinear convergence; the rule is exact)."""
    worst = 0.0
    for name, J in jacobian_cases(3):
        if J.shape[0] > 3:
            continue
        d = mgda_weights(J @ J.T) @ J
        err = rel_err(d, mgda_frank_wolfe(J, 1000), J)
        worst = max(worst, err)
        assert err < 1e-3, name
    assert worst > 1e-6  # FW is not exact: the comparison is a real one


def test_l2_normalisation_as_the_official_code():
    g = torch.Generator().manual_seed(5)
    scales = torch.tensor([[0.01], [1], [3], [100]], dtype=torch.float64)
    J = torch.randn(4, 9, generator=g, dtype=torch.float64) * scales
    alpha = mgda_weights(J @ J.T, normalize="l2")
    Jn = J / J.norm(dim=1, keepdim=True)
    assert rel_err(alpha @ Jn, mgda_faces(Jn), Jn) < 1e-6
    # alpha is the weight of the un-normalised gradients (d = sum alpha_t g_t), as in that code
    assert torch.allclose(alpha, mgda_weights(Jn @ Jn.T), atol=1e-9)


def test_zero_gradient_and_zero_gram():
    J = torch.tensor([[1.0, 2.0], [0.0, 0.0], [3.0, -1.0]], dtype=torch.float64)
    zero = torch.zeros(2, dtype=torch.float64)
    assert torch.allclose(mgda_weights(J @ J.T) @ J, zero, atol=1e-12)
    assert torch.allclose(mgda_weights(J @ J.T, normalize="l2") @ J, zero, atol=1e-12)
    assert torch.equal(mgda_weights(torch.zeros(3, 3)), torch.full((3,), 1 / 3))


@settings(max_examples=30, deadline=None)
@given(J=jacobians(), seed=st.integers(0, 1000))
def test_permuting_tasks_permutes_the_direction_and_weights(J, seed):
    perm = permutation(J.shape[0], seed)
    alpha, alpha_p = mgda_weights(J @ J.T), mgda_weights(J[perm] @ J[perm].T)
    assert torch.isfinite(alpha).all()
    assert rel_err(alpha_p @ J[perm], alpha @ J, J) < 1e-6
    if J.shape[1] >= J.shape[0]:  # independent gradients: alpha is unique
        assert torch.allclose(alpha_p, alpha[perm], atol=1e-7)


@settings(max_examples=20, deadline=None)
@given(J=jacobians(), s=st.floats(1e-3, 1e3))
def test_global_scale_leaves_the_weights(J, s):
    """The min-norm point of s * conv{g_i} is s times the one of conv{g_i}."""
    a, b = mgda_weights(J @ J.T) @ J, mgda_weights((s * J) @ (s * J).T) @ J
    assert rel_err(b, a, J) < 1e-6


def test_dtype_device_and_bad_input():
    G = torch.eye(3, dtype=torch.float32)
    out = mgda_weights(G)
    assert out.dtype == torch.float32 and out.device == G.device
    for gram, fragment in bad_grams():
        with pytest.raises(ValueError, match=re.escape(fragment)):
            mgda_weights(gram)
    with pytest.raises(ValueError, match="normalize"):
        mgda_weights(G, normalize="loss")
    with pytest.raises(TypeError, match="floating"):
        mgda_weights(torch.eye(3, dtype=torch.int64))
