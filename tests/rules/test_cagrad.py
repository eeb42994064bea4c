"""CAGrad's rule against the official CAGrad step written on the gradient vectors."""

from __future__ import annotations

import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from literal_aggregation import cagrad, jacobian_cases, rel_err

from lossbalance._rules import cagrad_weights, mgda_weights

from ._common import bad_grams, jacobians, permutation


def dual_certificate(J: torch.Tensor, coefficients: torch.Tensor, c: float) -> tuple[float, float]:
    """On the vectors, with rescale=0: w* = (coefficients - 1/K) / sum(...), and the dual's
    optimality over the simplex, min_i dF/dw_i >= w*^T dF/dw, where
    dF/dw_i = <g_i, g_0> + c ||g_0|| <g_i, g_w> / ||g_w||. Returns (gap, scale)."""
    K = J.shape[0]
    g0 = J.mean(dim=0)
    w = coefficients - 1.0 / K
    w = w / w.sum()
    gw = w @ J
    grad = J @ g0 + c * g0.norm() * (J @ gw) / gw.norm()
    return float(w @ grad - grad.min()), float(J.norm(dim=1).max()) ** 2


def degenerate(J: torch.Tensor) -> bool:
    """0 in the hull of the g_i: the dual's g_w* = 0 (the official code's 1e-8 case)."""
    d = mgda_weights(J @ J.T) @ J
    return float(d.norm()) <= 1e-9 * float(J.norm(dim=1).max())


@pytest.mark.parametrize("seed", [0, 1])
def test_direction_is_the_official_step(seed):
    for name, J in jacobian_cases(seed):
        if degenerate(J) or name.startswith("norms"):
            continue  # norms spread 1e-2..1e2: SLSQP stops early (next test)
        assert rel_err(cagrad_weights(J @ J.T) @ J, cagrad(J), J) < 1e-5, name


@pytest.mark.parametrize("seed", [0, 1])
def test_dual_is_solved_to_optimality(seed):
    """The KKT condition of the dual on the vectors holds to rounding in every case, also where
    SLSQP (the official solver) stops early: there the rule's dual value is the lower one."""
    for name, J in jacobian_cases(seed):
        if degenerate(J):
            continue
        for c in (0.2, 0.5, 0.9):
            coefficients = cagrad_weights(J @ J.T, c=c, rescale=0)
            gap, scale = dual_certificate(J, coefficients, c)
            assert gap <= 1e-9 * scale, (name, c, gap)


def test_degenerate_cases_give_the_mean_gradient():
    J = torch.tensor([[1.0, 0.0], [-2.0, 0.0], [0.0, 1.0], [0.0, -1.0]], dtype=torch.float64)
    assert degenerate(J)
    for rescale, divisor in ((0, 1.0), (1, 1.25), (2, 1.5)):
        out = cagrad_weights(J @ J.T, c=0.5, rescale=rescale)
        assert torch.allclose(out, torch.full((4,), 0.25 / divisor, dtype=torch.float64))
    G = torch.randn(3, 5, dtype=torch.float64)
    third = torch.full((3,), 1 / 3, dtype=torch.float64)
    assert torch.allclose(cagrad_weights(G @ G.T, c=0.0), third)
    assert torch.equal(cagrad_weights(torch.zeros(2, 2), rescale=0), torch.full((2,), 0.5))


def test_rescale_conventions():
    J = torch.randn(3, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    G = J @ J.T
    raw = cagrad_weights(G, c=0.4, rescale=0)
    assert torch.allclose(cagrad_weights(G, c=0.4, rescale=1), raw / 1.16)
    assert torch.allclose(cagrad_weights(G, c=0.4, rescale=2), raw / 1.4)
    # the radius: ||d - g_0|| = c ||g_0|| before the rescale
    g0 = J.mean(dim=0)
    assert math.isclose(float((raw @ J - g0).norm()), 0.4 * float(g0.norm()), rel_tol=1e-9)


@settings(max_examples=20, deadline=None)
@given(J=jacobians(), seed=st.integers(0, 1000))
def test_permuting_tasks_permutes_the_weights(J, seed):
    perm = permutation(J.shape[0], seed)
    c, c_p = cagrad_weights(J @ J.T), cagrad_weights(J[perm] @ J[perm].T)
    assert torch.isfinite(c).all()
    assert rel_err(c_p @ J[perm], c @ J, J) < 1e-6
    if J.shape[1] >= J.shape[0]:
        assert torch.allclose(c_p, c[perm], rtol=1e-6, atol=1e-8)


@settings(max_examples=20, deadline=None)
@given(J=jacobians(), s=st.floats(1e-3, 1e3))
def test_global_scale_leaves_the_weights(J, s):
    a, b = cagrad_weights(J @ J.T), cagrad_weights((s * J) @ (s * J).T)
    assert rel_err(b @ J, a @ J, J) < 1e-6


def test_bad_input():
    for gram, fragment in bad_grams():
        with pytest.raises(ValueError, match=re.escape(fragment)):
            cagrad_weights(gram)
    for c in (-0.1, float("nan"), "0.5"):
        with pytest.raises(ValueError, match="c must be"):
            cagrad_weights(torch.eye(2), c=c)
    with pytest.raises(ValueError, match="rescale"):
        cagrad_weights(torch.eye(2), rescale=3)
