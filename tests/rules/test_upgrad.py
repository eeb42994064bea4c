"""UPGrad's rule against Quinton & Rey's projections written on the gradient vectors."""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from literal_aggregation import jacobian_cases, project_dual_cone, rel_err, upgrad

from lossbalance._rules import upgrad_weights

from ._common import bad_grams, jacobians, permutation


@pytest.mark.parametrize("seed", [0, 1])
def test_direction_is_the_mean_of_the_projections(seed):
    for name, J in jacobian_cases(seed):
        c = upgrad_weights(J @ J.T)
        d = c @ J
        assert rel_err(d, upgrad(J), J) < 1e-5, name
        # the direction does not conflict with any task: J d >= 0 (Quinton & Rey, Prop. 2)
        assert float((J @ d).min()) >= -1e-12 * float(J.norm(dim=1).max()) ** 2, name


def test_without_conflict_it_is_the_mean():
    """Rows that already lie in the dual cone (pairwise non-negative products) are kept."""
    J = torch.tensor([[1.0, 0.2, 0.0], [0.3, 1.0, 0.1], [0.5, 0.5, 0.5]], dtype=torch.float64)
    assert torch.allclose(upgrad_weights(J @ J.T), torch.full((3,), 1 / 3, dtype=torch.float64),
                          atol=1e-12)
    for i in range(3):
        assert torch.allclose(project_dual_cone(J, J[i]), J[i], atol=1e-12)


def test_against_torchjd_exact_projector():
    """torchjd 0.18's UPGrad with its quadprog projector un-regularised (reg_eps=0) solves the
    same QPs; with independent gradients (G invertible) the weights agree to rounding."""
    jd = pytest.importorskip("torchjd.aggregation")
    from torchjd.linalg import QuadprogProjector

    exact = jd.UPGradWeighting(projector=QuadprogProjector(norm_eps=0.0, reg_eps=0.0))
    default = jd.UPGradWeighting()
    deviations = {}
    for name, J in jacobian_cases(2):
        if J.shape[1] < J.shape[0] or name.startswith("collinear"):
            continue
        G = J @ J.T
        c = upgrad_weights(G)
        assert rel_err(exact(G) @ J, c @ J, J) < 1e-8, name
        deviations[name] = rel_err(default(G) @ J, c @ J, J)
    # torchjd's default adds 1e-4 * I to the trace-normalised Gram matrix: a real shift, small
    # for gradients of similar norms, large (and conflicting with a task) when norms spread
    assert 1e-7 < deviations["random T=10"] < 1e-2
    assert deviations["norms T=10"] > 0.1


def direction_tol(J):
    """1e-6 when the gradients are independent; 1e-5 when P < T: the dual-cone NNLS is then
    underdetermined, its multipliers are not unique and reach 1e2-1e3 (found by hypothesis:
    T = 8, P = 3 and 4), and the solver's tolerance on them shows in d at ~1e-6."""
    return 1e-6 if J.shape[1] >= J.shape[0] else 1e-5


@settings(max_examples=25, deadline=None)
@given(J=jacobians(), seed=st.integers(0, 1000))
def test_permuting_tasks_permutes_the_weights(J, seed):
    perm = permutation(J.shape[0], seed)
    c, c_p = upgrad_weights(J @ J.T), upgrad_weights(J[perm] @ J[perm].T)
    assert torch.isfinite(c).all()
    assert rel_err(c_p @ J[perm], c @ J, J) < direction_tol(J)
    if J.shape[1] >= J.shape[0]:
        assert torch.allclose(c_p, c[perm], atol=1e-6)


@settings(max_examples=20, deadline=None)
@given(J=jacobians(), s=st.floats(1e-3, 1e3))
def test_scaling_all_gradients_scales_the_direction(J, s):
    """The weights are invariant to a common scale s of the gradients (the QPs are)."""
    d_s, d = upgrad_weights((s * J) @ (s * J).T) @ J, upgrad_weights(J @ J.T) @ J
    assert rel_err(d_s, d, J) < direction_tol(J)


def test_dtype_and_bad_input():
    out = upgrad_weights(torch.eye(2, dtype=torch.float32) * 3)
    assert out.dtype == torch.float32
    assert torch.allclose(out, torch.full((2,), 0.5))
    for gram, fragment in bad_grams():
        with pytest.raises(ValueError, match=re.escape(fragment)):
            upgrad_weights(gram)
