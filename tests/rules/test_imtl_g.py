"""IMTL-G's rule against Liu et al.'s closed form written on the gradient vectors."""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from literal_aggregation import imtl_g, jacobian_cases, rel_err

from lossbalance._rules import imtl_g_weights

from ._common import bad_grams, jacobians, permutation


@pytest.mark.parametrize("seed", [0, 1])
def test_direction_is_the_closed_form(seed):
    for name, J in jacobian_cases(seed):
        alpha = imtl_g_weights(J @ J.T)
        d = alpha @ J
        assert abs(float(alpha.sum()) - 1) < 1e-9, name
        assert rel_err(d, imtl_g(J), J) < 1e-5, name
        if J.shape[1] >= J.shape[0]:  # impartial: equal projections on every unit gradient
            proj = (J / J.norm(dim=1, keepdim=True)) @ d
            assert float(proj.max() - proj.min()) <= 1e-6 * float(proj.abs().max()), name


def test_against_torchjd():
    """torchjd 0.18's IMTL-G, alpha = pinv(G) n / sum (n_t = ||g_t||), is the same solution
    for independent gradients (equal projections g . u_t and sum alpha = 1)."""
    jd = pytest.importorskip("torchjd.aggregation")
    weighting = jd.IMTLGWeighting()
    for name, J in jacobian_cases(5):
        if J.shape[1] < J.shape[0] or name.startswith("collinear"):
            continue
        G = J @ J.T
        assert rel_err(weighting(G) @ J, imtl_g_weights(G) @ J, J) < 1e-8, name


def test_zero_gradient_gets_no_weight():
    J = torch.tensor([[1.0, 0.0], [0.0, 0.0], [-0.5, 1.0]], dtype=torch.float64)
    alpha = imtl_g_weights(J @ J.T)
    assert alpha[1] == 0
    assert torch.allclose(alpha @ J, imtl_g(J[[0, 2]]), atol=1e-12)
    assert torch.equal(imtl_g_weights(torch.zeros(2, 2)), torch.full((2,), 0.5))


@settings(max_examples=25, deadline=None)
@given(J=jacobians(), seed=st.integers(0, 1000))
def test_permuting_tasks_permutes_the_weights(J, seed):
    perm = permutation(J.shape[0], seed)
    alpha, alpha_p = imtl_g_weights(J @ J.T), imtl_g_weights(J[perm] @ J[perm].T)
    assert torch.isfinite(alpha).all()
    if J.shape[1] >= J.shape[0]:
        assert torch.allclose(alpha_p, alpha[perm], rtol=1e-6, atol=1e-8)


@settings(max_examples=25, deadline=None)
@given(J=jacobians(), seed=st.integers(0, 1000))
def test_scaling_a_task_leaves_the_direction(J, seed):
    """The unit vectors u_t, hence the line of d (the one on which g . u_t is equal for all t),
    do not change when each g_t is scaled by s_t > 0; the length, and the sign, of d follow
    from sum_t alpha_t = 1 and may change (the common projection can turn negative)."""
    if J.shape[1] < J.shape[0]:
        return
    s = torch.exp(4 * torch.rand(J.shape[0], 1, generator=torch.Generator().manual_seed(seed),
                                 dtype=torch.float64) - 2)
    d, d_s = imtl_g_weights(J @ J.T) @ J, imtl_g_weights((s * J) @ (s * J).T) @ (s * J)
    cos = float(d_s @ d) / float(d_s.norm() * d.norm())
    assert abs(abs(cos) - 1) < 1e-9


def test_bad_input():
    for gram, fragment in bad_grams():
        with pytest.raises(ValueError, match=re.escape(fragment)):
            imtl_g_weights(gram)

