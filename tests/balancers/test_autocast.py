"""A balancer called inside an autocast region (a trainer's training_step under bf16-mixed)
computes its total and its step as outside it: sum_i w_i L_i in the losses' dtype."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

import lossbalance as lb
from tests.literal import toy_problem

BALANCERS = {
    "gradnorm-tap": lambda: lb.GradNorm(3, alpha=1.5, lr=0.025),
    "gradnorm-general": lambda: lb.GradNorm(3, alpha=1.5, lr=0.025),
    "static": lambda: lb.StaticWeighting([0.3, 1.1, 2.7]),
}


def run(name, call_inside, via_loss, steps=3):
    net, x, ys = toy_problem()
    bal = BALANCERS[name]()
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    totals = []
    for _ in range(steps):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = net.trunk(x)
            feats = bal.tap(h) if name == "gradnorm-tap" else (h,) * 3
            losses = [F.mse_loss(net.heads[i](feats[i]).float(), ys[i]) for i in range(3)]
            if call_inside:
                total = bal.loss(losses, shared=net.last_shared) if via_loss else None
        if not call_inside:
            total = bal.loss(losses, shared=net.last_shared) if via_loss else None
        if via_loss:
            totals.append(total.detach())
            total.backward()
        else:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=call_inside):
                totals.append(bal.backward(losses, shared=net.last_shared))
        opt.step()
    return bal.weights, [p.detach().clone() for p in net.parameters()], torch.stack(totals)


@pytest.mark.parametrize("via_loss", [True, False], ids=["loss", "backward"])
@pytest.mark.parametrize("name", sorted(BALANCERS))
def test_inside_autocast_is_as_outside(name, via_loss):
    w_in, params_in, totals_in = run(name, True, via_loss)
    w_out, params_out, totals_out = run(name, False, via_loss)
    assert totals_in.dtype == torch.float32
    assert torch.equal(totals_in, totals_out)
    assert torch.equal(w_in, w_out)
    for a, b in zip(params_in, params_out, strict=True):
        assert torch.equal(a, b)
    if name != "static":
        assert (w_in - 1).abs().max() > 1e-3  # the weights moved
