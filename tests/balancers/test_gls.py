"""GLS against autograd of the literal geometric mean (prod_i L_i)^(1/T) over 20 steps."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from literal import ToyNet, literal_gls_total
from torch.nn import functional as F

import lossbalance as lb

T = 3


def test_gradient_is_the_geometric_means():
    torch.manual_seed(0)
    net = ToyNet(T).double()
    ref_net = copy.deepcopy(net)
    x = torch.randn(16, 8, dtype=torch.float64)
    ys = [torch.randn(16, 4, dtype=torch.float64) * s for s in (1, 10, 100)]
    bal = lb.GLS(T).double()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    ref_opt = torch.optim.Adam(ref_net.parameters(), lr=1e-2)
    for _ in range(20):
        opt.zero_grad()
        ref_opt.zero_grad()
        h = net.trunk(x)
        losses = [F.mse_loss(net.heads[i](h), ys[i]) for i in range(T)]
        total = bal.backward(losses)
        hr = ref_net.trunk(x)
        ref = literal_gls_total([F.mse_loss(ref_net.heads[i](hr), ys[i]) for i in range(T)])
        ref.backward()
        torch.testing.assert_close(total, ref.detach(), rtol=1e-6, atol=0)
        torch.testing.assert_close(bal.stats["geometric_mean"], ref.detach(), rtol=1e-6, atol=0)
        values = torch.stack(losses).detach()
        torch.testing.assert_close(bal.weights, ref.detach() / (T * values), rtol=1e-6, atol=0)
        for p, q in zip(net.parameters(), ref_net.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-12)
        opt.step()
        ref_opt.step()


def test_a_loss_not_above_zero_is_refused_before_the_backward():
    bal = lb.GLS(2, task_names=["seg", "depth"])
    p = torch.tensor(1.0, requires_grad=True)
    before = bal.weights
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match=r"task 1 \('depth'\).*> 0"):
            bal.backward([p * 2.0, p * bad])
        assert p.grad is None and torch.equal(bal.weights, before)
    assert torch.equal(before, torch.full((2,), 0.5))


positive = st.floats(1e-6, 1e6)


@settings(max_examples=50, deadline=None)
@given(st.lists(positive, min_size=2, max_size=8), st.randoms(use_true_random=False),
       st.floats(1e-3, 1e3))
def test_weights_invariants(values, rnd, k):
    L = torch.tensor(values, dtype=torch.float64)
    w, gls = lb.GLS.weights_from(L)
    n = len(values)
    assert (w > 0).all()
    torch.testing.assert_close((w * L).sum(), gls)  # the weighted total is the geometric mean
    perm = list(range(n))
    rnd.shuffle(perm)
    torch.testing.assert_close(lb.GLS.weights_from(L[perm])[0], w[perm])
    # one loss times k: every w_i L_i, so the gradient, times k^(1/T); the direction is kept
    scaled = L.clone()
    scaled[0] *= k
    w2, _ = lb.GLS.weights_from(scaled)
    torch.testing.assert_close(w2 * scaled, k ** (1 / n) * w * L)
