"""GradNorm with gradient accumulation: k micro-batches per optimizer step."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from literal import ToyNet
from torch.nn import functional as F

import lossbalance as lb
from lossbalance._taps import per_task_norms

T, BATCH = 3, 32


def problem(seed=0):
    torch.manual_seed(seed)
    net = ToyNet(T).double()
    x = torch.randn(BATCH, 8, dtype=torch.float64)
    ys = [torch.randn(BATCH, 4, dtype=torch.float64) * s for s in (1.0, 10.0, 100.0)]
    return net, x, ys


def step(net, bal, x, ys, path, where):
    h = net.trunk(x)
    feats = bal.tap(h) if path == "fast" else (h,) * T
    losses = [F.mse_loss(net.heads[i](feats[i]), ys[i]) for i in range(T)]
    shared = None if where == "h" and path == "fast" else h if where == "h" else net.last_shared
    return bal.backward(losses, shared=shared)


def train(net, bal, x, ys, path, where, micro, windows=12):
    opt = torch.optim.SGD(net.parameters(), lr=1e-2)
    trace = []
    for _ in range(windows):
        opt.zero_grad()
        for m in range(micro):
            rows = slice(m * BATCH // micro, (m + 1) * BATCH // micro)
            step(net, bal, x[rows], [y[rows] for y in ys], path, where)
        opt.step()
        trace.append(bal.weights)
    return torch.stack(trace)


@pytest.mark.parametrize("path", ["fast", "general"])
@pytest.mark.parametrize("micro", [2, 4])
def test_norms_at_h_match_the_whole_batch(path, micro):
    # the window's loss is the mean of the micro-batches' = the whole batch's; G_i at h exact
    net, x, ys = problem()
    whole_net, acc_net = copy.deepcopy(net), copy.deepcopy(net)
    whole = train(whole_net, lb.GradNorm(T).double(), x, ys, path, "h", 1)
    bal = lb.GradNorm(T, accumulation_steps=micro).double()
    acc = train(acc_net, bal, x, ys, path, "h", micro)
    torch.testing.assert_close(acc, whole, rtol=1e-10, atol=1e-10)
    for p, q in zip(acc_net.parameters(), whole_net.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    assert int(bal.num_steps) == 12


@pytest.mark.parametrize("path", ["fast", "general"])
def test_norms_at_a_parameter_sum_the_micro_batches(path):
    net, x, ys = problem()
    bal = lb.GradNorm(T, accumulation_steps=2).double()
    w = bal.weights
    halves = [slice(0, BATCH // 2), slice(BATCH // 2, BATCH)]
    expected = 0
    for rows in halves:
        before = bal.weights
        h = net.trunk(x[rows])
        losses = [F.mse_loss(net.heads[i](h), ys[i][rows]) for i in range(T)]
        expected = expected + w.double() / 2 * per_task_norms(losses, [net.last_shared])
        step(net, bal, x[rows], [y[rows] for y in ys], path, "W")
        if rows is halves[0]:
            assert torch.equal(bal.weights, before) and int(bal.num_steps) == 0
    assert int(bal.num_steps) == 1 and not torch.equal(bal.weights, w)
    torch.testing.assert_close(bal.stats["grad_norm"], expected)


def test_a_window_cut_by_a_checkpoint_resumes_exactly():
    net, x, ys = problem()
    bal = lb.GradNorm(T, accumulation_steps=3).double()
    for rows in (slice(0, 8), slice(8, 16), slice(16, 24), slice(24, 32)):  # 1 window + 1
        step(net, bal, x[rows], [y[rows] for y in ys], "fast", "W")
    buffer = io.BytesIO()
    torch.save(bal.state_dict(), buffer)
    resumed = lb.GradNorm(T, accumulation_steps=3).double()
    resumed.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=False))
    net2 = copy.deepcopy(net)
    for b, model in ((bal, net), (resumed, net2)):
        for rows in (slice(0, 8), slice(8, 16)):  # closes the window begun before the save
            step(model, b, x[rows], [y[rows] for y in ys], "fast", "W")
    assert int(bal.num_steps) == int(resumed.num_steps) == 2
    assert torch.equal(bal.weights, resumed.weights)


def test_measuring_elsewhere_inside_a_window_is_an_error():
    net, x, ys = problem()
    bal = lb.GradNorm(T, accumulation_steps=2).double()
    step(net, bal, x[:16], [y[:16] for y in ys], "fast", "W")
    with pytest.raises(ValueError, match="measured at parameters"):
        step(net, bal, x[16:], [y[16:] for y in ys], "fast", "h")


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_bad_accumulation_steps(bad):
    with pytest.raises(ValueError, match="accumulation_steps"):
        lb.GradNorm(T, accumulation_steps=bad)


def test_a_skipped_call_still_counts_in_its_window():
    net, x, ys = problem()
    bal = lb.GradNorm(T, accumulation_steps=2, on_nonfinite="skip").double()
    h = net.trunk(x[:16])
    feats = bal.tap(h)
    losses = [F.mse_loss(net.heads[i](feats[i]), ys[i][:16]) for i in range(T)]
    losses[1] = losses[1] * float("nan")
    bal.backward(losses, shared=net.last_shared)  # skipped, but the first call of its window
    assert bal.last_step_skipped
    step(net, bal, x[16:], [y[16:] for y in ys], "fast", "W")  # closes it: no update
    assert bal.last_step_skipped and int(bal.num_steps) == 0
    for rows in (slice(0, 16), slice(16, 32)):  # the next window is whole again
        step(net, bal, x[rows], [y[rows] for y in ys], "fast", "W")
    assert not bal.last_step_skipped and int(bal.num_steps) == 1
