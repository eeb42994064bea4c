"""GradNorm(log_weights=True): the optimizer on s = log w, against the literal algorithm with
the optimizer on log w, its invariants, and the small weight that the paper's update bounces
on the floor."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from literal import LiteralGradNorm, ToyNet
from torch.nn import functional as F

import lossbalance as lb

SCALES = (1.0, 10.0, 100.0)


def make_problem(num_tasks=3, scales=SCALES, seed=0, batch=32):
    torch.manual_seed(seed)
    net = ToyNet(num_tasks).double()
    x = torch.randn(batch, 8, dtype=torch.float64)
    ys = [torch.randn(batch, 4, dtype=torch.float64) * scales[i % len(scales)]
          for i in range(num_tasks)]
    return net, x, ys


def train(bal, net, x, ys, steps, where="W", lr_model=1e-3, trace=None):
    T = len(ys)
    opt = torch.optim.SGD(net.parameters(), lr=lr_model)
    for _ in range(steps):
        opt.zero_grad()
        f = bal.tap(net.trunk(x))
        bal.backward([F.mse_loss(net.heads[i](f[i]), ys[i]) for i in range(T)],
                     shared=net.last_shared if where == "W" else None)
        opt.step()
        if trace is not None:
            trace.append(bal.weights)
    return bal


@pytest.mark.parametrize("path,where", [("fast", "W"), ("fast", "h"), ("fast", "Wb"),
                                        ("general", "W"), ("batched", "W"),
                                        ("general", "trunk")])
def test_matches_literal_algorithm_on_log_weights(path, where):
    net, x, ys = make_problem()
    net_b = copy.deepcopy(net)
    opt_a = torch.optim.SGD(net.parameters(), lr=1e-3)
    opt_b = torch.optim.SGD(net_b.parameters(), lr=1e-3)
    bal = lb.GradNorm(3, alpha=1.5, lr=0.1, log_weights=True,
                      general_path="batched" if path == "batched" else "loop").double()
    lit = LiteralGradNorm(3, 1.5, 0.1, dtype=torch.float64, optimizer_kwargs={"fused": True},
                          log_weights=True)

    def shared(model, h):
        return {"W": [model.last_shared], "Wb": [model.trunk[-2].weight, model.trunk[-2].bias],
                "trunk": list(model.trunk.parameters()), "h": [h]}[where]

    for _ in range(50):
        opt_a.zero_grad()
        opt_b.zero_grad()
        h = net.trunk(x)
        feats = bal.tap(h) if path == "fast" else (h,) * 3
        at = None if (where == "h" and path == "fast") else shared(net, h)
        bal.backward([F.mse_loss(net.heads[i](feats[i]), ys[i]) for i in range(3)], shared=at)
        hb = net_b.trunk(x)
        g_lit, target_lit = lit.step([F.mse_loss(net_b.heads[i](hb), ys[i]) for i in range(3)],
                                     shared(net_b, hb))
        torch.testing.assert_close(bal.stats["grad_norm"], g_lit, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(bal.stats["target"], target_lit, rtol=1e-10, atol=1e-12)
        for pa, pb in zip(net.parameters(), net_b.parameters(), strict=True):
            torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-10, atol=1e-12)
        opt_a.step()
        opt_b.step()
        torch.testing.assert_close(bal.weights, lit.weights, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(bal.task_log_weights, lit.s.detach(), rtol=0, atol=1e-10)
    assert bal.weights.min() < 0.5  # the run did move the weights


@pytest.mark.parametrize("where", ["W", "h"])
def test_log_weights_with_the_cpp_capture_use_the_python_update(where, monkeypatch):
    # with LOSSBALANCE_NATIVE=1 the capture may run in C++, but the C++ update (the paper's
    # rule on w) must not: the weights follow the Python update of s = log w
    def run(native):
        monkeypatch.setenv("LOSSBALANCE_NATIVE", "1" if native else "0")
        net, x, ys = make_problem()
        return train(lb.GradNorm(3, lr=0.1, log_weights=True).double(), net, x, ys, 20,
                     where=where)

    native, python = run(True), run(False)
    assert native._capture._native is not None and python._capture._native is None
    torch.testing.assert_close(native.weights, python.weights, rtol=1e-12, atol=0)
    if where == "W":  # the capture's norms at a weight are the same operations
        assert torch.equal(native.weights, python.weights)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), alpha=st.floats(0, 3), lr=st.floats(1e-3, 0.5),
       log_scales=st.lists(st.floats(-3, 3), min_size=2, max_size=5),
       where=st.sampled_from(["W", "h"]))
def test_log_weights_positive_and_sum_to_num_tasks(seed, alpha, lr, log_scales, where):
    scales = tuple(10.0 ** s for s in log_scales)
    T = len(scales)
    bal = lb.GradNorm(T, alpha=alpha, lr=lr, log_weights=True).double()
    net, x, ys = make_problem(T, scales=scales, seed=seed)
    trace = []
    train(bal, net, x, ys, 20, where=where, trace=trace)
    for w in trace:
        assert (w > 0).all(), w
        torch.testing.assert_close(w.sum(), torch.tensor(float(T), dtype=w.dtype))
    torch.testing.assert_close(bal.task_log_weights.exp(), bal.weights, rtol=0, atol=0)


@settings(max_examples=10, deadline=None)
@given(perm=st.permutations(range(4)), seed=st.integers(0, 10_000),
       alpha=st.sampled_from([0.0, 0.5, 1.5]))
def test_log_weights_permuting_tasks_permutes_weights(perm, seed, alpha):
    scales = (1.0, 3.0, 10.0, 30.0)
    net, x, ys = make_problem(4, scales=scales, seed=seed)
    net_b = copy.deepcopy(net)
    bal_a = train(lb.GradNorm(4, alpha=alpha, log_weights=True).double(), net, x, ys, 15)
    bal_b = lb.GradNorm(4, alpha=alpha, log_weights=True).double()
    opt = torch.optim.SGD(net_b.parameters(), lr=1e-3)
    for _ in range(15):
        opt.zero_grad()
        f = bal_b.tap(net_b.trunk(x))
        losses = [F.mse_loss(net_b.heads[i](f[j]), ys[i]) for j, i in enumerate(perm)]
        bal_b.backward(losses, shared=net_b.last_shared)
        opt.step()
    torch.testing.assert_close(bal_b.weights, bal_a.weights[list(perm)], rtol=1e-9, atol=1e-12)


def _weight_trace(log_weights, steps=600):
    """Task 1's loss (and gradient) 1e4 times task 0's on a fixed network: GradNorm drives
    w_1 / w_0 towards 1e-4, a weight of ~2e-4, far below Adam's steps of ~lr = 0.025."""
    net, x, ys = make_problem(2, scales=(1.0, 1.0))
    bal = lb.GradNorm(2, alpha=1.5, lr=0.025, log_weights=log_weights).double()
    trace = []
    for _ in range(steps):
        f = bal.tap(net.trunk(x))
        losses = [F.mse_loss(net.heads[0](f[0]), ys[0]),
                  1e4 * F.mse_loss(net.heads[1](f[1]), ys[1])]
        bal.backward(losses, shared=net.last_shared)
        trace.append(bal.weights)
    return torch.stack(trace), bal


def test_small_weight_bounces_on_the_floor_with_the_papers_update_but_not_on_log_weights():
    paper, bal = _weight_trace(False)
    small = paper[:, 1]
    floor = bal.min_weight
    hits = small <= 1.01 * floor
    # the paper's update overshoots below zero: clamped to the floor, then back up, repeatedly
    assert hits.sum() >= 100, int(hits.sum())  # 284 of the 600 steps here
    after_hit = small[1:][hits[:-1]]
    assert (after_hit > 100 * floor).any()  # it bounces off the floor
    logw, bal = _weight_trace(True)
    small = logw[:, 1]
    assert small.min() > 10 * floor, small.min()  # strictly above the floor, every step
    steps = small.log().diff().abs()
    assert steps.max() < 0.08, steps.max()  # multiplicative steps of at most ~e^(3 lr)
    # and it does reach the small weight the norms ask for (w_1 / w_0 ~ 1e-4)
    assert small[-100:].max() < 1e-3, small[-100:]


def test_state_dict_round_trip_resumes_bit_exactly_with_log_weights(tmp_path):
    net, x, ys = make_problem()
    bal = train(lb.GradNorm(3, lr=0.1, log_weights=True).double(), net, x, ys, 10)
    path = tmp_path / "bal.pt"
    torch.save(bal.state_dict(), path)
    state = torch.load(path, weights_only=True)
    assert set(state) >= {"task_weights", "task_log_weights"}
    resumed = lb.GradNorm(3, lr=0.1, log_weights=True).double()
    resumed.load_state_dict(state)
    copied = copy.deepcopy(bal)
    net_b, net_c = copy.deepcopy(net), copy.deepcopy(net)
    traces = [[], [], []]
    for b, model, trace in zip((bal, resumed, copied), (net, net_b, net_c), traces, strict=True):
        train(b, model, x, ys, 10, trace=trace)
    assert torch.equal(torch.stack(traces[0]), torch.stack(traces[1]))
    assert torch.equal(torch.stack(traces[0]), torch.stack(traces[2]))
    assert torch.equal(bal.task_log_weights, resumed.task_log_weights)
    with pytest.raises(RuntimeError, match="task_log_weights"):
        lb.GradNorm(3).double().load_state_dict(bal.state_dict())  # the other update


def test_to_dtype_moves_log_weights_and_their_optimizer_state():
    net, x, ys = make_problem()
    bal = train(lb.GradNorm(3, log_weights=True).double(), net, x, ys, 3)
    bal.float()
    assert bal.task_log_weights.dtype == torch.float32
    assert bal.optimizer.param_groups[0]["params"][0] is bal.task_log_weights
    assert bal.optimizer.state_dict()["state"][0]["exp_avg"].dtype == torch.float32
    train(bal.double(), net, x, ys, 2)
    torch.testing.assert_close(bal.weights.sum(), torch.tensor(3.0, dtype=torch.float64))


def test_log_weights_must_be_a_bool():
    with pytest.raises(TypeError, match="log_weights must be True or False, got 'yes'"):
        lb.GradNorm(2, log_weights="yes")
    assert "log_weights=True" in repr(lb.GradNorm(2, log_weights=True))
    assert math.isclose(float(lb.GradNorm(2, log_weights=True).weights.sum()), 2.0)
