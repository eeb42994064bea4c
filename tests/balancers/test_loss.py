"""``bal.loss(...)``: a total whose ordinary backward does what ``bal.backward(...)`` does."""

from __future__ import annotations

import copy

import pytest
import torch
from literal import toy_problem
from torch import Tensor
from torch.nn import functional as F

import lossbalance as lb

T = 3


problem = toy_problem


def kpis(step):
    return [0.1 + 0.05 * step, 0.9 - 0.03 * step, 0.5]


def run(bal, net, way, *, path="fast", shared="W", steps=4, scaler=None, signals=None):
    """Train ``steps`` optimizer steps of ``bal.accumulation_steps`` micro-batches, each
    micro-batch through ``bal.backward`` (way "backward") or ``bal.loss(...).backward()``
    (way "loss"). Returns, per step, the weights, the stats, the totals and the model's
    gradients."""
    _, x, ys = problem()
    opt = torch.optim.SGD(list(net.parameters()) + list(bal.parameters()), lr=1e-3)
    micro = getattr(bal, "accumulation_steps", 1)
    trace = []
    for step in range(steps):
        opt.zero_grad()
        totals = []
        for m in range(micro):
            rows = slice(m * len(x) // micro, (m + 1) * len(x) // micro)
            h = net.trunk(x[rows])
            feats = bal.tap(h) if path == "fast" else (h,) * T
            losses = [F.mse_loss(net.heads[i](feats[i]), ys[i][rows]) for i in range(T)]
            where = net.last_shared if shared == "W" else (None if path == "fast" else h)
            extra = signals(step) if signals else {}
            if way == "backward":
                totals.append(bal.backward(losses, where, grad_scaler=scaler, **extra))
            else:
                total = bal.loss(losses, where, **extra)
                (total if scaler is None else scaler.scale(total)).backward()
                totals.append(total.detach())
        grads = [p.grad.clone() for p in list(net.parameters()) + list(bal.parameters())]
        if scaler is None:
            opt.step()
        else:
            scaler.step(opt)
            scaler.update()
        trace.append((bal.weights, dict(bal.stats), totals, grads, bal.last_step_skipped))
    return trace


def assert_same(a, b):
    assert len(a) == len(b)
    for (wa, sa, ta, ga, ka), (wb, sb, tb, gb, kb) in zip(a, b, strict=True):
        assert torch.equal(wa, wb)
        assert sa.keys() == sb.keys()
        for key in sa:
            assert torch.equal(sa[key], sb[key]), key
        for u, v in zip(ta, tb, strict=True):
            assert torch.equal(u, v)
        for u, v in zip(ga, gb, strict=True):
            assert torch.equal(u, v)
        assert ka == kb


LOSS_ONLY = {
    "equal": (lambda: lb.EqualWeighting(T), None),
    "static": (lambda: lb.StaticWeighting([1.0, 2.0, 5.0]), None),
    "uncertainty": (lambda: lb.UncertaintyWeighting(T, ["regression", "classification",
                                                        "regression"]), None),
    "dtp": (lambda: lb.DynamicTaskPrioritization(T, gamma=2.0, kpi_decay=0.5),
            lambda step: {"kpis": kpis(step)}),
    "dwa": (lambda: lb.DWA(T, period=2), None),  # weights move after the second epoch
    "rlw": (lambda: lb.RLW(T, seed=0), None),
    "gls": (lambda: lb.GLS(T), None),
    "famo": (lambda: lb.FAMO(T), None),  # update="next": the logits move in each call
    "imtl-l": (lambda: lb.IMTLL(T), None),
}


@pytest.mark.parametrize("name", sorted(LOSS_ONLY))
@pytest.mark.parametrize("scaled", [False, True])
def test_loss_only_balancers_match_backward_bit_for_bit(name, scaled):
    make, signals = LOSS_ONLY[name]
    net0 = problem()[0]
    out = []
    for way in ("backward", "loss"):
        bal = make()
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8) if scaled else None
        out.append((run(bal, copy.deepcopy(net0), way, steps=5, scaler=scaler,
                        signals=signals), bal.state_dict()))
    assert_same(out[0][0], out[1][0])
    for key, value in out[0][1].items():
        assert same_value(value, out[1][1][key]), key


def same_value(a, b):
    """Tensors bit for bit; dicts and lists (a module's extra state) entry by entry."""
    if isinstance(a, Tensor):  # NaN equal to NaN (a loss history not filled yet)
        return (isinstance(b, Tensor) and a.shape == b.shape and a.dtype == b.dtype
                and bool((a == b).logical_or(a.isnan() & b.isnan()).all()))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_value(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same_value(u, v) for u, v in zip(a, b, strict=True))
    return a == b


@pytest.mark.parametrize("name", sorted(LOSS_ONLY))
def test_loss_checks_like_backward(name):
    make, signals = LOSS_ONLY[name]
    bal = make()
    before = copy.deepcopy(bal.state_dict())
    good = [torch.tensor(1.0, requires_grad=True) for _ in range(T)]
    extra = signals(0) if signals else {}
    with pytest.raises(ValueError, match=r"expected 3|3 losses|got 2"):
        bal.loss(good[:2], **extra)
    with pytest.raises(ValueError, match=r"task 1.*non-finite"):
        bal.loss([good[0], torch.tensor(float("nan"), requires_grad=True), good[2]], **extra)
    with pytest.raises(TypeError, match="unexpected"):
        bal.loss(good, nonsense=1, **extra)
    for key, value in before.items():
        assert same_value(value, bal.state_dict()[key]), key
    total = bal.loss(good, **extra)
    assert total.requires_grad and total.dim() == 0


def test_skipped_loss_backpropagates_nothing():
    bal = lb.EqualWeighting(T, on_nonfinite="skip")
    ok = torch.tensor(2.0, requires_grad=True)
    total = bal.loss([ok, torch.tensor(float("inf"), requires_grad=True), ok])
    assert bal.last_step_skipped
    total.backward()
    assert ok.grad is None


@pytest.mark.parametrize("path,shared", [("fast", "h"), ("fast", "W"), ("general", "W"),
                                         ("general", "h")])
@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("accumulation", [1, 2])
def test_gradnorm_loss_matches_backward_bit_for_bit(path, shared, scaled, accumulation):
    net0 = problem()[0]
    out = []
    for way in ("backward", "loss"):
        bal = lb.GradNorm(T, alpha=1.0, lr=0.05, accumulation_steps=accumulation)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if scaled else None
        out.append((run(bal, copy.deepcopy(net0), way, path=path, shared=shared, steps=4,
                        scaler=scaler), bal))
    assert_same(out[0][0], out[1][0])
    a, b = out[0][1], out[1][1]
    assert int(a.num_steps) == int(b.num_steps) == 4
    for key, value in a.state_dict().items():
        if isinstance(value, Tensor):
            assert torch.equal(value, b.state_dict()[key]), key
    sa, sb = a.optimizer.state_dict()["state"][0], b.optimizer.state_dict()["state"][0]
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def snapshot(bal):
    state = copy.deepcopy(bal.state_dict())
    return state, copy.deepcopy(bal.optimizer.state_dict()), copy.deepcopy(bal._window.state())


def assert_snapshot(bal, snap):
    state, opt, window = snapshot(bal)
    for key, value in snap[0].items():
        if isinstance(value, Tensor):
            torch.testing.assert_close(value, state[key], rtol=0, atol=0, equal_nan=True)
        else:  # the extra state: the optimizer's and the window's, compared below
            assert value["initialized"] == state[key]["initialized"]
    assert repr(opt) == repr(snap[1])
    assert repr(window) == repr(snap[2])


@pytest.mark.parametrize("path", ["fast", "general"])
def test_gradnorm_loss_never_backpropagated_changes_nothing_and_is_released(path):
    import gc
    import weakref

    net, x, ys = problem()
    bal = lb.GradNorm(T, accumulation_steps=2)
    for _ in range(2):  # a window's worth of ordinary steps, so there is state to keep
        h = net.trunk(x)
        feats = bal.tap(h) if path == "fast" else (h,) * T
        bal.backward([F.mse_loss(net.heads[i](feats[i]), ys[i]) for i in range(T)],
                     net.last_shared)
    h = net.trunk(x)
    feats = bal.tap(h) if path == "fast" else (h,) * T
    losses = [F.mse_loss(net.heads[i](feats[i]), ys[i]) for i in range(T)]
    snap = snapshot(bal)
    total = bal.loss(losses, net.last_shared)
    assert_snapshot(bal, snap)
    alive = weakref.ref(h)
    del h, feats, losses, total
    gc.collect()
    assert alive() is None  # nothing of the abandoned graph is kept
    assert_snapshot(bal, snap)
    # the next loss works, and matches backward from the same state
    twin = copy.deepcopy(bal)
    net.zero_grad()
    grads = []
    for b, way in ((bal, "loss"), (twin, "backward")):
        net.zero_grad()
        for _ in range(2):
            h = net.trunk(x)
            feats = b.tap(h) if path == "fast" else (h,) * T
            losses = [F.mse_loss(net.heads[i](feats[i]), ys[i]) for i in range(T)]
            if way == "loss":
                b.loss(losses, net.last_shared).backward()
            else:
                b.backward(losses, net.last_shared)
        grads.append([p.grad.clone() for p in net.parameters()])
    assert torch.equal(bal.weights, twin.weights)
    assert int(bal.num_steps) == int(twin.num_steps) == 2
    for u, v in zip(*grads, strict=True):
        assert torch.equal(u, v)


@pytest.mark.parametrize("path", ["fast", "general"])
def test_gradnorm_second_backward_through_the_same_total_updates_once(path):
    net, x, ys = problem()
    bal = lb.GradNorm(T)
    twin = copy.deepcopy(bal)
    h = net.trunk(x)
    feats = bal.tap(h) if path == "fast" else (h,) * T
    total = bal.loss([F.mse_loss(net.heads[i](feats[i]), ys[i]) for i in range(T)],
                     net.last_shared)
    total.backward(retain_graph=True)
    after_one = snapshot(bal)
    total.backward()
    assert_snapshot(bal, after_one)
    assert int(bal.num_steps) == 1
    h = net.trunk(x)
    feats = twin.tap(h) if path == "fast" else (h,) * T
    twin.backward([F.mse_loss(net.heads[i](feats[i]), ys[i]) for i in range(T)],
                  net.last_shared)
    assert torch.equal(bal.weights, twin.weights)


def test_gradnorm_loss_checks_before_anything_changes():
    net, x, ys = problem()
    bal = lb.GradNorm(T)
    snap = snapshot(bal)
    h = net.trunk(x)
    losses = [F.mse_loss(net.heads[i](h), ys[i]) for i in range(T)]
    with pytest.raises(ValueError, match="shared=None"):
        bal.loss(losses)
    with pytest.raises(TypeError, match="unexpected"):
        bal.loss(losses, net.last_shared, kpis=[0.5] * T)
    assert_snapshot(bal, snap)


@pytest.mark.parametrize("path", ["fast", "general"])
def test_gradnorm_loss_under_an_overflowing_scaler_skips_the_update(path):
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127, backoff_factor=2.0**-80,
                                  growth_interval=1000)
    bal = lb.GradNorm(T)  # on_nonfinite="raise": an overflow under a scaler is not an error
    net0 = problem()[0]
    net = copy.deepcopy(net0)
    run(bal, net, "loss", path=path, steps=1, scaler=scaler)
    assert bal.last_step_skipped
    assert torch.equal(bal.weights, torch.ones(T))
    assert int(bal.num_steps) == 0 and torch.isnan(bal.initial_losses).all()
    for p, q in zip(net0.parameters(), net.parameters(), strict=True):
        assert torch.equal(p, q)  # the scaler skipped the optimizer step
    for _ in range(10):  # the scaler backs off until the gradients fit
        run(bal, net, "loss", path=path, steps=1, scaler=scaler)
        if not bal.last_step_skipped:
            break
    assert not bal.last_step_skipped and int(bal.num_steps) == 1
