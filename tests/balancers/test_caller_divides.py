"""``caller_divides=True``: the caller divides ``bal.loss(...)`` by k itself.

In an accumulation window of k micro-batches a trainer (Lightning's ``accumulate_grad_batches``,
Accelerate's ``gradient_accumulation_steps``) backpropagates ``total / k``. With
``caller_divides=True`` the balancer returns the undivided total and takes k times the arriving
gradient for the scale, so that ``(bal.loss(...) / k).backward()`` gives what
``bal.backward(...)`` gives: the model's ``.grad``, the weights, ``stats`` and the optimizers'
states bit for bit (k = 2, a power of two, so that 1/k is exact), with and without a scaler.
"""

from __future__ import annotations

import pytest
import torch
from literal import assert_equal_states, toy_problem
from torch.nn import functional as F

import lossbalance as lb
from lossbalance.balancers.gradnorm import arrived_scale

T, K, WINDOWS = 3, 2, 3


def make_gradnorm(k, caller_divides):
    return lb.GradNorm(T, alpha=1.0, lr=0.05, accumulation_steps=k,
                       caller_divides=caller_divides)


def make_aggregator(k, caller_divides):
    return lb.IMTLG(T, accumulation_steps=k, caller_divides=caller_divides)


def train(make, way, where, *, scaled=False, k=K, windows=WINDOWS):
    """``windows`` Adam steps of k micro-batches each, every micro-batch through
    ``bal.backward(...)`` (way "backward") or ``(bal.loss(...) / k).backward()`` with
    ``caller_divides=True`` (way "loss"), scaled by a GradScaler when ``scaled``. ``where``:
    "h" (tap, shared None), "tap-W" (tap, G at the last shared weight), "W" (no tap: the
    general path at the weight). Returns a trace per window (weights, stats, totals, .grad),
    the balancer and the model's optimizer."""
    net, x, ys = toy_problem()
    bal = make(k, way == "loss")
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if scaled else None
    trace = []
    for _ in range(windows):
        opt.zero_grad()
        totals = []
        for m in range(k):
            rows = slice(m * len(x) // k, (m + 1) * len(x) // k)
            h = net.trunk(x[rows])
            feats = (h,) * T if where == "W" else bal.tap(h)
            losses = [F.mse_loss(net.heads[i](feats[i]), ys[i][rows]) for i in range(T)]
            shared = None if where == "h" else net.last_shared
            if way == "backward":
                totals.append(bal.backward(losses, shared, grad_scaler=scaler))
            else:
                divided = bal.loss(losses, shared) / k  # what the trainer does
                (divided if scaler is None else scaler.scale(divided)).backward()
                totals.append(divided.detach())
        grads = [p.grad.clone() for p in net.parameters()]
        if scaler is None:
            opt.step()
        else:
            scaler.step(opt)
            scaler.update()
        trace.append((bal.weights, dict(bal.stats), totals, grads, bal.last_step_skipped))
    return trace, bal, opt


def assert_same_runs(make, where, scaled):
    (ta, bal_a, opt_a), (tb, bal_b, opt_b) = (train(make, way, where, scaled=scaled)
                                              for way in ("backward", "loss"))
    for (wa, sa, xa, ga, ka), (wb, sb, xb, gb, kb) in zip(ta, tb, strict=True):
        assert torch.equal(wa, wb)
        assert sa.keys() == sb.keys() and sa
        for key in sa:
            assert torch.equal(sa[key], sb[key]), key
        for u, v in zip(xa + ga, xb + gb, strict=True):  # totals (1/k of sum w_i L_i), .grad
            assert torch.equal(u, v)
        assert ka == kb
    # an aggregator at h takes c per micro-batch (see aggregator.py), the rest one step a window
    steps = WINDOWS * K if isinstance(bal_a, lb.Aggregator) and where == "h" else WINDOWS
    assert int(bal_a.num_steps) == int(bal_b.num_steps) == steps
    assert_equal_states(bal_a.state_dict(), bal_b.state_dict())
    assert_equal_states(opt_a.state_dict(), opt_b.state_dict())  # the model's Adam state
    if isinstance(bal_a, lb.GradNorm):  # the weights' Adam state
        assert_equal_states(bal_a.optimizer.state_dict(), bal_b.optimizer.state_dict())
        assert (bal_a.weights - 1).abs().max() > 0.01  # the weights moved


@pytest.mark.parametrize("where", ["h", "tap-W", "W"])
@pytest.mark.parametrize("scaled", [False, True], ids=["unscaled", "scaler"])
def test_gradnorm_loss_divided_by_the_caller_is_backward(where, scaled):
    assert_same_runs(make_gradnorm, where, scaled)


@pytest.mark.parametrize("where", ["h", "W"])
@pytest.mark.parametrize("scaled", [False, True], ids=["unscaled", "scaler"])
def test_aggregator_loss_divided_by_the_caller_is_backward(where, scaled):
    assert_same_runs(make_aggregator, where, scaled)


@pytest.mark.parametrize("make", [make_gradnorm, make_aggregator], ids=["gradnorm", "imtlg"])
def test_loss_is_undivided_and_without_accumulation_nothing_changes(make):
    net, x, ys = toy_problem()
    feats = (net.trunk(x),) * T
    losses = [F.mse_loss(net.heads[i](feats[i]), ys[i]) for i in range(T)]
    windowed = make(K, True).loss(losses, net.last_shared)
    assert torch.equal(windowed.detach(), torch.stack(losses).detach().sum())  # w = c = ones
    halved = make(K, False).loss(losses, net.last_shared)
    assert torch.equal(halved.detach() * K, windowed.detach())
    alone = make(1, True).loss(losses, net.last_shared)  # k = 1: the option changes nothing
    assert torch.equal(alone.detach(), make(1, False).loss(losses, net.last_shared).detach())


def test_three_micro_batches_match_backward_to_rounding():
    """k = 3: 1/3 is not exact, so fl(1/3) w_i against fl(w_i / 3): equal to rounding."""
    (ta, bal_a, _), (tb, bal_b, _) = (train(make_gradnorm, way, "tap-W", k=3, windows=2)
                                      for way in ("backward", "loss"))
    for (wa, sa, _, ga, _), (wb, sb, _, gb, _) in zip(ta, tb, strict=True):
        torch.testing.assert_close(wa, wb, rtol=1e-6, atol=0)
        torch.testing.assert_close(sa["grad_norm"], sb["grad_norm"], rtol=1e-6, atol=0)
        for u, v in zip(ga, gb, strict=True):
            torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-7)
    assert int(bal_a.num_steps) == int(bal_b.num_steps) == 2


@pytest.mark.parametrize("k", [3, 41, 47, 55])
def test_the_scale_of_an_unscaled_total_is_exactly_one(k):
    # fl(fl(1/k) * k) is 1 + 1 ulp for k = 41, 47, 55 in float32: taken as exactly 1
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        arriving = torch.ones((), dtype=dtype) / k
        assert torch.equal(arrived_scale(arriving, k), torch.ones((), dtype=dtype))
    scaled = arrived_scale(torch.tensor(2.0**10) / k, k)
    torch.testing.assert_close(scaled, torch.tensor(2.0**10), rtol=1e-6, atol=0)
    assert torch.equal(arrived_scale(torch.tensor(2.0**10), 1), torch.tensor(2.0**10))


@pytest.mark.parametrize("make", [lb.GradNorm, lb.IMTLG, lb.PCGrad])
@pytest.mark.parametrize("bad", [1, 0, None, "yes"])
def test_caller_divides_must_be_a_bool(make, bad):
    with pytest.raises(TypeError, match=r"caller_divides must be True or False, got"):
        make(T, caller_divides=bad)
