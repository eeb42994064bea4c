"""Aligned-MTL's rule against Senushkin et al.'s Algorithm 1 via the SVD of the gradients."""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from literal_aggregation import aligned_mtl, jacobian_cases, rel_err

from lossbalance._rules import aligned_mtl_weights

from ._common import bad_grams, jacobians, permutation


@pytest.mark.parametrize("seed", [0, 1])
def test_direction_is_the_sum_of_the_aligned_gradients(seed):
    for name, J in jacobian_cases(seed):
        assert rel_err(aligned_mtl_weights(J @ J.T) @ J, aligned_mtl(J), J) < 1e-5, name


def test_aligned_gradients_are_orthogonal_with_equal_norms():
    """G_hat = G B has G_hat^T G_hat = B M B = lambda_min I (full rank)."""
    J = torch.randn(4, 9, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    M = J @ J.T
    lam, V = torch.linalg.eigh(M)
    B = lam.min().sqrt() * (V / lam.sqrt()) @ V.T
    assert torch.allclose(aligned_mtl_weights(M), B.sum(dim=1), atol=1e-12)
    assert torch.allclose(B @ M @ B, lam.min() * torch.eye(4, dtype=torch.float64), atol=1e-10)


def test_against_torchjd():
    """torchjd 0.18's AlignedMTL weights the aligned gradients by the mean (1/T), the official
    code (and LibMTL) by the sum: the same direction, T times shorter. Its rank cut uses the
    Gram matrix's dtype eps (float64 here) instead of the official float32 eps: where an
    eigenvalue lies between the two cuts, torchjd keeps a direction the official code drops."""
    jd = pytest.importorskip("torchjd.aggregation")
    weighting = jd.AlignedMTLWeighting()
    between = 0
    for name, J in jacobian_cases(6):
        G = J @ J.T
        lam = torch.linalg.eigvalsh(G)
        cut32, cut64 = (float(lam.max()) * J.shape[0] * torch.finfo(t).eps
                        for t in (torch.float32, torch.float64))
        err = rel_err(J.shape[0] * weighting(G) @ J, aligned_mtl_weights(G) @ J, J)
        if bool(((lam > cut64) & (lam <= cut32)).any()):
            between += 1
            assert err > 1e-3, name
        else:
            assert err < 1e-8, name
    assert between >= 1


def test_zero_gram():
    assert torch.equal(aligned_mtl_weights(torch.zeros(3, 3)), torch.ones(3))


@settings(max_examples=25, deadline=None)
@given(J=jacobians(), seed=st.integers(0, 1000))
def test_permuting_tasks_permutes_the_weights(J, seed):
    perm = permutation(J.shape[0], seed)
    c, c_p = aligned_mtl_weights(J @ J.T), aligned_mtl_weights(J[perm] @ J[perm].T)
    assert torch.isfinite(c).all()
    assert rel_err(c_p @ J[perm], c @ J, J) < 1e-6


@settings(max_examples=25, deadline=None)
@given(J=jacobians(), s=st.floats(1e-3, 1e3))
def test_global_scale_leaves_the_weights(J, s):
    """B is invariant to a common scale of the gradients (sqrt(lambda_min) / sigma)."""
    a, b = aligned_mtl_weights(J @ J.T), aligned_mtl_weights((s * J) @ (s * J).T)
    assert rel_err(b @ J, a @ J, J) < 1e-6


def test_bad_input():
    for gram, fragment in bad_grams():
        with pytest.raises(ValueError, match=re.escape(fragment)):
            aligned_mtl_weights(gram)
