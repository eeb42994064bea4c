"""EqualWeighting and StaticWeighting: a plain weighted sum, nothing learned."""

import copy

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from literal import ToyNet
from torch.nn import functional as F

import lossbalance as lb


def grads_of(net, bal, x, ys):
    net.zero_grad()
    h = net.trunk(x)
    feats = bal.tap(h)
    total = bal.backward([F.mse_loss(net.heads[i](feats[i]), ys[i]) for i in range(len(ys))])
    return total, [p.grad.clone() for p in net.parameters()]


def test_equal_weighting_is_the_plain_sum():
    torch.manual_seed(0)
    net = ToyNet(3).double()
    x = torch.randn(8, 8, dtype=torch.float64)
    ys = [torch.randn(8, 4, dtype=torch.float64) for _ in range(3)]
    total, grads = grads_of(net, lb.EqualWeighting(3), x, ys)
    net.zero_grad()
    h = net.trunk(x)
    ref = sum(F.mse_loss(net.heads[i](h), ys[i]) for i in range(3))
    ref.backward()
    torch.testing.assert_close(total, ref.detach())
    for g, p in zip(grads, net.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad)
    assert torch.equal(lb.EqualWeighting(3).weights, torch.ones(3))


@settings(max_examples=20, deadline=None)
@given(st.lists(st.floats(1e-3, 1e3), min_size=2, max_size=6))
def test_static_weights_are_normalised_to_sum_t(raw):
    bal = lb.StaticWeighting(raw)
    w = bal.weights
    assert (w > 0).all()
    torch.testing.assert_close(w.sum(), torch.tensor(float(len(raw))))
    expected = torch.tensor(raw) / torch.tensor(raw).sum() * len(raw)
    torch.testing.assert_close(w, expected.float())


def test_static_weighting_from_gradnorm_weights_and_backward():
    torch.manual_seed(0)
    net = ToyNet(2).double()
    x = torch.randn(8, 8, dtype=torch.float64)
    ys = [torch.randn(8, 4, dtype=torch.float64) for _ in range(2)]
    gn = lb.GradNorm(2, initial_losses=[1.0, 1.0])
    gn.task_weights.copy_(torch.tensor([1.5, 0.5]))
    bal = lb.StaticWeighting(gn.weights)
    net2 = copy.deepcopy(net)
    total, grads = grads_of(net, bal, x, ys)
    h = net2.trunk(x)
    ref = 1.5 * F.mse_loss(net2.heads[0](h), ys[0]) + 0.5 * F.mse_loss(net2.heads[1](h), ys[1])
    ref.backward()
    torch.testing.assert_close(total, ref.detach())
    for g, p in zip(grads, net2.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad)
    assert bal.state_dict()["task_weights"].tolist() == [1.5, 0.5]
