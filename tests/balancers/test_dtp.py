"""DynamicTaskPrioritization against Guo et al.'s focal weights on smoothed KPIs."""

import copy
import math

import pytest
import torch
from literal import ToyNet, literal_dtp_weights
from torch.nn import functional as F

import lossbalance as lb


@pytest.mark.parametrize("gamma,decay", [(1.0, 0.9), (2.0, 0.5), (0.0, 0.0)])
def test_matches_formula(gamma, decay):
    torch.manual_seed(0)
    net = ToyNet(3).double()
    x = torch.randn(16, 8, dtype=torch.float64)
    ys = [torch.randn(16, 4, dtype=torch.float64) for _ in range(3)]
    bal = lb.DynamicTaskPrioritization(3, gamma=gamma, kpi_decay=decay)
    history = []
    for step in range(12):
        kpis = [0.1 + 0.05 * step, 0.9 - 0.03 * step, 0.5]
        history.append(kpis)
        net.zero_grad()
        h = net.trunk(x)
        losses = [F.mse_loss(net.heads[i](h), ys[i]) for i in range(3)]
        total = bal.backward(losses, kpis=kpis)
        expected = literal_dtp_weights(history, gamma, decay)
        torch.testing.assert_close(bal.stats["weight"], torch.tensor(expected).float())
        ref = sum(w * loss.detach() for w, loss in zip(expected, losses, strict=True))
        assert math.isclose(float(total), float(ref), rel_tol=1e-5)
    # model gradient = gradient of sum_i w_i L_i with the (detached) weights
    got = [p.grad.clone() for p in net.parameters()]
    net2 = copy.deepcopy(net)
    net2.zero_grad()
    h = net2.trunk(x)
    sum(w * F.mse_loss(net2.heads[i](h), ys[i]) for i, w in enumerate(expected)).backward()
    for g, p in zip(got, net2.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-7)


def test_harder_task_weighs_more_and_zero_kpi_is_finite():
    w = lb.DynamicTaskPrioritization.focal_weights(torch.tensor([0.1, 0.9, 0.0, 1.0]), 1.0,
                                                   1e-6)
    assert w[0] > w[1] > 0
    assert torch.isfinite(w[2]) and w[2] > w[0]
    assert w[3] == 0


def test_state_round_trip_and_dict_kpis():
    torch.manual_seed(0)
    net = ToyNet(2).double()
    x = torch.randn(4, 8, dtype=torch.float64)
    bal = lb.DynamicTaskPrioritization(2, task_names=["seg", "depth"])
    h = net.trunk(x)
    losses = {"seg": net.heads[0](h).pow(2).mean(), "depth": net.heads[1](h).pow(2).mean()}
    bal.backward(losses, kpis={"seg": 0.2, "depth": 0.7})
    other = lb.DynamicTaskPrioritization(2, task_names=["seg", "depth"])
    other.load_state_dict(bal.state_dict())
    assert torch.equal(other.weights, bal.weights)
    assert int(other.num_steps) == 1
