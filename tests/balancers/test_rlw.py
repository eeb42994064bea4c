"""RLW against softmax of seeded N(0, I) (or U(0, 1)) draws written out (tests/literal.py)."""

import copy

import pytest
import torch
from literal import ToyNet, literal_rlw_weights
from torch.nn import functional as F

import lossbalance as lb

T = 3


@pytest.mark.parametrize("distribution", ["normal", "uniform"])
def test_matches_the_draws_over_training(distribution):
    torch.manual_seed(0)
    net = ToyNet(T).double()
    ref_net = copy.deepcopy(net)
    x = torch.randn(16, 8, dtype=torch.float64)
    ys = [torch.randn(16, 4, dtype=torch.float64) * s for s in (1, 10, 100)]
    bal = lb.RLW(T, distribution, seed=7).double()
    expected = literal_rlw_weights(7, 21, T, distribution)
    opt = torch.optim.SGD(net.parameters(), lr=1e-4)
    ref_opt = torch.optim.SGD(ref_net.parameters(), lr=1e-4)
    for step in range(20):
        opt.zero_grad()
        ref_opt.zero_grad()
        w = torch.tensor(expected[step], dtype=torch.float64)
        torch.testing.assert_close(bal.weights, w, rtol=1e-6, atol=0)  # drawn in advance
        h = net.trunk(x)
        bal.backward([F.mse_loss(net.heads[i](h), ys[i]) for i in range(T)])
        torch.testing.assert_close(bal.stats["weight"], w, rtol=1e-6, atol=0)
        hr = ref_net.trunk(x)
        sum(w[i] * F.mse_loss(ref_net.heads[i](hr), ys[i]) for i in range(T)).backward()
        for p, q in zip(net.parameters(), ref_net.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-12)
        opt.step()
        ref_opt.step()
    torch.testing.assert_close(bal.weights, torch.tensor(expected[20], dtype=torch.float64))


def test_seeding():
    a = [lb.RLW(4, seed=3).weights for _ in range(2)]
    assert torch.equal(a[0], a[1])
    assert not torch.equal(a[0], lb.RLW(4, seed=4).weights)
    torch.manual_seed(11)
    b = lb.RLW(4).weights
    torch.manual_seed(11)
    assert torch.equal(b, lb.RLW(4).weights)  # seed=None: from torch's default generator


def test_weights_are_positive_sum_to_one_and_centre_on_one_over_t():
    bal = lb.RLW(4, seed=0)
    p = torch.tensor(1.0, requires_grad=True)
    drawn = []
    for _ in range(2000):
        bal.backward([p * 1.0] * 4)
        drawn.append(bal.stats["weight"])
    w = torch.stack(drawn)
    assert (w > 0).all()
    torch.testing.assert_close(w.sum(1), torch.ones(2000, dtype=w.dtype))
    # exchangeable draws: every task's mean weight is 1/T (to 3 standard errors)
    se = w.std(0) / 2000**0.5
    assert ((w.mean(0) - 0.25).abs() < 3 * se + 1e-3).all()


def test_bad_arguments_and_skip():
    with pytest.raises(ValueError, match="distribution"):
        lb.RLW(2, "dirichlet")
    for seed in (-1, 1.5, True):
        with pytest.raises(ValueError, match="seed"):
            lb.RLW(2, seed=seed)
    bal = lb.RLW(2, seed=0, on_nonfinite="skip")
    before = bal.weights
    p = torch.tensor(1.0, requires_grad=True)
    bal.backward([p * float("inf"), p * 1.0])
    assert bal.last_step_skipped and torch.equal(bal.weights, before)  # no draw used up
