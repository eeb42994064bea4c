"""Every balancer's state dict loads with ``torch.load(..., weights_only=True)`` and resumes.

``weights_only=True`` refuses to unpickle anything but tensors and plain containers, so a
checkpoint of a balancer never needs ``weights_only=False`` (which runs arbitrary code from
the file). Checked mid-run, including inside a GradNorm accumulation window with the exact
per-task gradients at a weight kept, and with an SGD or log-weights optimizer.
"""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import lossbalance as lb

T = 3

MAKERS = {
    "equal": lambda: lb.EqualWeighting(T),
    "static": lambda: lb.StaticWeighting([3.0, 2.0, 1.0]),
    "uncertainty": lambda: lb.UncertaintyWeighting(T, ["regression", "classification",
                                                       "regression"]),
    "dtp": lambda: lb.DynamicTaskPrioritization(T, gamma=2.0),
    "gradnorm": lambda: lb.GradNorm(T),
    "gradnorm-sgd": lambda: lb.GradNorm(T, optimizer=torch.optim.SGD,
                                        optimizer_kwargs={"momentum": 0.9}),
    "gradnorm-log": lambda: lb.GradNorm(T, log_weights=True),
    "gradnorm-window": lambda: lb.GradNorm(T, accumulation_steps=2),
    "dwa": lambda: lb.DWA(T, period=2),  # saved mid-epoch, resumed across two epoch ends
    "rlw": lambda: lb.RLW(T, seed=5),  # the generator's state travels
    "gls": lambda: lb.GLS(T),
    "famo": lambda: lb.FAMO(T),  # the logits' Adam state and the pending losses travel
    "imtl-l": lambda: lb.IMTLL(T),
    "mgda": lambda: lb.MGDA(T),  # tap + W: c from the Gram matrix at W, replaced at h
    "upgrad": lambda: lb.UPGrad(T),
    "pcgrad": lambda: lb.PCGrad(T, seed=1),  # the generator's state travels
    "nash-mtl": lambda: lb.NashMTL(T),  # the warm start travels
    # no tap: an exact window at W, saved mid-window with its per-task gradients
    "mgda-window": lambda: _without_tap(lb.MGDA(T, accumulation_steps=2)),
    "db-mtl": lambda: lb.DBMTL(T),  # the gradients' EMA [T, P] travels (sized on load)
    "db-mtl-window": lambda: lb.DBMTL(T, accumulation_steps=2),  # saved mid-window
}


def _without_tap(bal):
    bal.tap = lambda h: (h,) * T  # the heads read h itself: the general path at shared
    return bal


def step(bal, net, x, ys, k):
    feats = bal.tap(net[0](x))
    losses = [F.mse_loss(net[1 + i](feats[i]), ys[i]) for i in range(T)]
    kwargs = {"kpis": [0.2 + 0.1 * k, 0.5, 0.9]} if isinstance(
        bal, lb.DynamicTaskPrioritization) else {}
    bal.backward(losses, shared=net[0][0].weight, **kwargs)


@pytest.mark.parametrize("name", list(MAKERS))
def test_state_dict_loads_weights_only_and_resumes(name):
    torch.manual_seed(0)
    net = nn.ModuleList([nn.Sequential(nn.Linear(5, 8), nn.Tanh()),
                         *(nn.Linear(8, 1) for _ in range(T))]).double()
    batches = [(torch.randn(12, 5, dtype=torch.float64),
                [torch.randn(12, 1, dtype=torch.float64) * s for s in (1, 10, 100)])
               for _ in range(6)]
    bal = MAKERS[name]().double()
    for k in range(3):  # an odd number of calls: mid-window for accumulation_steps=2
        step(bal, net, *batches[k], k)

    buffer = io.BytesIO()
    torch.save(bal.state_dict(), buffer)
    state = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    resumed = MAKERS[name]().double()
    resumed.load_state_dict(state)
    torch.testing.assert_close(resumed.weights, bal.weights, rtol=0, atol=0)

    for k in range(3, 6):  # the same next steps, from the same model state
        saved = [p.detach().clone() for p in net.parameters()]
        step(bal, net, *batches[k], k)
        after = bal.weights
        with torch.no_grad():
            for p, s in zip(net.parameters(), saved, strict=True):
                p.copy_(s)
        step(resumed, net, *batches[k], k)
        torch.testing.assert_close(resumed.weights, after, rtol=0, atol=0)
    if name.startswith("gradnorm"):
        assert not torch.equal(bal.weights, torch.ones(T, dtype=torch.float64))
