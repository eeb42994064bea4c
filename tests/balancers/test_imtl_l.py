"""IMTL-L against the literal total sum_t e^{s_t} L_t - s_t, trained with the model."""

import copy

import torch
from literal import ToyNet, literal_imtl_l_total
from torch.nn import functional as F

import lossbalance as lb

T = 3


def test_matches_the_scaled_losses_over_training():
    torch.manual_seed(0)
    net = ToyNet(T).double()
    ref_net = copy.deepcopy(net)
    x = torch.randn(16, 8, dtype=torch.float64)
    ys = [torch.randn(16, 4, dtype=torch.float64) * s for s in (1, 10, 100)]
    bal = lb.IMTLL(T).double()
    s = torch.zeros(T, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([*net.parameters(), *bal.parameters()], lr=1e-2)
    ref_opt = torch.optim.Adam([*ref_net.parameters(), s], lr=1e-2)
    for _ in range(30):
        opt.zero_grad()
        ref_opt.zero_grad()
        h = net.trunk(x)
        total = bal.backward([F.mse_loss(net.heads[i](h), ys[i]) for i in range(T)])
        hr = ref_net.trunk(x)
        ref = literal_imtl_l_total([F.mse_loss(ref_net.heads[i](hr), ys[i]) for i in range(T)],
                                   s)
        ref.backward()
        torch.testing.assert_close(total, ref.detach(), rtol=1e-6, atol=1e-12)
        torch.testing.assert_close(bal.loss_scales.grad, s.grad, rtol=1e-6, atol=1e-12)
        torch.testing.assert_close(bal.stats["weight"], torch.exp(s.detach()), rtol=1e-6,
                                   atol=0)
        for p, q in zip(net.parameters(), ref_net.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-12)
        opt.step()
        ref_opt.step()
    torch.testing.assert_close(bal.weights, torch.exp(s.detach()), rtol=1e-6, atol=0)
    # the largest loss gets the smallest scale
    assert int(bal.weights.argmin()) == 2
    assert set(bal.stats) == {"loss_scale", "weight"}


def test_scale_gradient_is_each_tasks_own():
    """ds_t = e^{s_t} L_t - 1: one task's loss in other units moves no other task's s."""
    bal = lb.IMTLL(3).double()
    with torch.no_grad():
        bal.loss_scales.copy_(torch.tensor([0.3, -0.2, 1.0]))
    grads = []
    for k in (1.0, 1000.0):
        bal.zero_grad()
        p = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
        bal.backward([p * 1.5, p * 0.5 * k, p * 3.0])
        grads.append(bal.loss_scales.grad.clone())
    s = torch.tensor([0.3, -0.2, 1.0], dtype=torch.float64)
    torch.testing.assert_close(grads[0], torch.exp(s) * torch.tensor([3.0, 1.0, 6.0]) - 1)
    torch.testing.assert_close(grads[1][[0, 2]], grads[0][[0, 2]], rtol=0, atol=0)
