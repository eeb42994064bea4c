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


def duality_gap(J: torch.Tensor, coefficients: torch.Tensor, c: float) -> tuple[float, float]:
    """On the vectors, with rescale=0: the primal value min_i <g_i, d> of d = sum coef_i g_i
    against the dual value <g_w, g_0> + r ||g_w|| (r = c ||g_0||), the lower of two simplex
    points: w = (coef - 1/K) / sum(...) and MGDA's w (g_w = 0 when 0 is in the hull). Weak
    duality makes the gap >= 0 for any pair; 0 proves both optimal. Also checks that d lies in
    the ball. Returns (|gap|, scale)."""
    K = J.shape[0]
    g0 = J.mean(dim=0)
    r = c * g0.norm()
    d = coefficients @ J
    assert float((d - g0).norm()) <= float(r) * (1 + 1e-9) + 1e-12
    mu = coefficients - 1.0 / K
    candidates = [mgda_weights(J @ J.T)] + ([mu / mu.sum()] if float(mu.sum()) > 1e-12 else [])
    dual = min(float((w @ J) @ g0 + r * (w @ J).norm()) for w in candidates)
    gap = dual - float((J @ d).min())
    return abs(gap), float(J.norm(dim=1).max()) ** 2


@pytest.mark.parametrize("seed", [0, 1])
def test_direction_is_the_official_step(seed):
    for name, J in jacobian_cases(seed):
        if name.startswith("norms"):
            continue  # norms spread 1e-2..1e2: SLSQP stops early (next test)
        assert rel_err(cagrad_weights(J @ J.T) @ J, cagrad(J), J) < 1e-5, name


@pytest.mark.parametrize(("seed", "radii"), [(0, (0.2, 0.9)), (1, (0.5, 1.5))])
def test_primal_and_dual_meet(seed, radii):
    """The duality gap on the vectors is 0 to rounding in every case and radius, also where
    SLSQP (the official solver) stops early and where 0 is in the hull of the gradients."""
    for name, J in jacobian_cases(seed):
        for c in radii:
            gap, scale = duality_gap(J, cagrad_weights(J @ J.T, c=c, rescale=0), c)
            assert gap <= 1e-9 * scale, (name, c, gap)


def test_zero_in_the_hull():
    """0 inside the hull of 2-d gradients: the polyhedron {d : <g_i, d> >= 0} is {0}. With
    c = 0.5 the dual's g_w* is not 0 and the official step is reproduced; with c = 1.5 the
    ball holds 0, the only d with min_i <g_i, d> = 0 (the best possible), where the official
    code's guards return g_0 (min_i <g_i, g_0> < 0)."""
    J = torch.tensor([[1.0, 0.0], [-2.0, 0.0], [0.0, 1.0], [0.0, -1.0]], dtype=torch.float64)
    assert rel_err(cagrad_weights(J @ J.T, c=0.5) @ J, cagrad(J, c=0.5), J) < 1e-6
    d = cagrad_weights(J @ J.T, c=1.5) @ J
    assert float(d.norm()) < 1e-12
    assert float((J @ J.mean(dim=0)).min()) < 0


def test_degenerate_inputs_give_the_mean_gradient():
    G = torch.randn(3, 5, dtype=torch.float64)
    third = torch.full((3,), 1 / 3, dtype=torch.float64)
    assert torch.allclose(cagrad_weights(G @ G.T, c=0.0), third)
    assert torch.equal(cagrad_weights(torch.zeros(2, 2), rescale=0), torch.full((2,), 0.5))
    J = torch.tensor([[1.0, 2.0], [-1.0, -2.0]], dtype=torch.float64)  # g_0 = 0
    assert torch.allclose(cagrad_weights(J @ J.T, rescale=2), torch.full((2,), 0.5 / 1.5,
                                                                        dtype=torch.float64))


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
