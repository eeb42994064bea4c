"""What DWA, RLW, GLS, FAMO and IMTL-L share: tasks in another order, non-finite losses, bad
input to ``backward`` (``bal.loss`` is in test_loss.py)."""

import copy

import pytest
import torch
from literal import ToyNet, assert_same_state
from torch.nn import functional as F

import lossbalance as lb

T = 3
MAKERS = {
    "dwa": lambda: lb.DWA(T, period=2),
    "rlw": lambda: lb.RLW(T, seed=0),
    "gls": lambda: lb.GLS(T),
    "famo": lambda: lb.FAMO(T),
    "imtl-l": lambda: lb.IMTLL(T),
}


@pytest.mark.parametrize("name", ["dwa", "gls", "famo", "imtl-l"])  # RLW's draws are random
def test_permuting_the_tasks_permutes_the_weights(name):
    torch.manual_seed(0)
    net = ToyNet(T).double()
    x = torch.randn(16, 8, dtype=torch.float64)
    ys = [torch.randn(16, 4, dtype=torch.float64) * s for s in (1, 10, 100)]
    perm = [2, 0, 1]
    out = []
    for order in ([0, 1, 2], perm):
        model = copy.deepcopy(net)
        bal = MAKERS[name]().double()
        opt = torch.optim.SGD([*model.parameters(), *bal.parameters()], lr=1e-4)
        trace = []
        for _ in range(8):
            opt.zero_grad()
            h = model.trunk(x)
            losses = [F.mse_loss(model.heads[i](h), ys[i]) for i in range(T)]
            bal.backward([losses[i] for i in order])
            trace.append(bal.stats["weight"])
            opt.step()
        out.append(trace)
    for w, w_perm in zip(*out, strict=True):
        torch.testing.assert_close(w_perm, w[perm], rtol=1e-9, atol=0)
    assert not torch.allclose(out[0][-1], out[0][-1][perm])  # the weights do differ by task


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_bad_input_and_non_finite_losses(name):
    p = torch.tensor(1.5, requires_grad=True)
    bal = MAKERS[name]()
    bal.backward([p * 1.0, p * 2.0, p * 3.0])
    before = copy.deepcopy(bal.state_dict())
    p.grad = None
    with pytest.raises(ValueError, match="expected 3 losses"):
        bal.backward([p * 1.0, p * 2.0])
    with pytest.raises(ValueError, match=r"task 2.*non-finite"):
        bal.backward([p * 1.0, p * 2.0, p * float("inf")])
    with pytest.raises(TypeError, match="unexpected"):
        bal.backward([p * 1.0, p * 2.0, p * 3.0], kpis=[0.5] * T)
    with pytest.raises(ValueError, match="does not require grad"):
        bal.backward([p * 1.0, p * 2.0, torch.tensor(3.0)])
    assert p.grad is None
    assert_same_state(before, bal.state_dict())

    skip = MAKERS[name]()
    skip.on_nonfinite = "skip"
    skip.load_state_dict(before)
    total = skip.backward([p * 1.0, p * float("nan"), p * 3.0])
    assert skip.last_step_skipped and p.grad is None and total.dim() == 0
    assert_same_state(before, skip.state_dict())
    skip.backward([p * 1.0, p * 2.0, p * 3.0])
    assert not skip.last_step_skipped and p.grad is not None
