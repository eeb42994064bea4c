"""UncertaintyWeighting against Kendall et al.'s formulas, written with sigma."""

import copy

import torch
from literal import ToyNet, literal_uncertainty_total
from torch.nn import functional as F

import lossbalance as lb

TYPES = ["regression", "classification", "regression"]


def test_matches_formula_over_training():
    torch.manual_seed(0)
    net = ToyNet(3).double()
    ref_net = copy.deepcopy(net)
    x = torch.randn(16, 8, dtype=torch.float64)
    ys = [torch.randn(16, 4, dtype=torch.float64) * s for s in (1, 10, 100)]
    bal = lb.UncertaintyWeighting(3, TYPES).double()
    log_vars = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([*net.parameters(), *bal.parameters()], lr=1e-2)
    ref_opt = torch.optim.Adam([*ref_net.parameters(), log_vars], lr=1e-2)
    for _ in range(30):
        opt.zero_grad()
        ref_opt.zero_grad()
        h = net.trunk(x)
        total = bal.backward([F.mse_loss(net.heads[i](h), ys[i]) for i in range(3)])
        hr = ref_net.trunk(x)
        ref = literal_uncertainty_total(
            [F.mse_loss(ref_net.heads[i](hr), ys[i]) for i in range(3)], log_vars, TYPES)
        ref.backward()
        torch.testing.assert_close(total, ref.detach())
        torch.testing.assert_close(bal.log_vars.grad, log_vars.grad)
        opt.step()
        ref_opt.step()
    torch.testing.assert_close(bal.log_vars.detach(), log_vars.detach())
    scale = torch.tensor([0.5, 1.0, 0.5], dtype=torch.float64)
    torch.testing.assert_close(bal.weights, scale * torch.exp(-log_vars.detach()))
    # the task with the largest loss gets the largest variance, so the smallest weight
    assert int(bal.weights.argmin()) == 2
    assert set(bal.stats) == {"log_var", "weight"}


def test_state_dict_round_trip():
    bal = lb.UncertaintyWeighting(2, ["regression", "classification"])
    with torch.no_grad():
        bal.log_vars.copy_(torch.tensor([0.3, -0.2]))
    other = lb.UncertaintyWeighting(2, ["regression", "classification"])
    other.load_state_dict(bal.state_dict())
    assert torch.equal(other.weights, bal.weights)
