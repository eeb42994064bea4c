"""GradNorm with gradient accumulation: k micro-batches per optimizer step."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from literal import toy_problem
from torch.nn import functional as F

import lossbalance as lb
from lossbalance._taps import per_task_norms

T, BATCH = 3, 32


def problem(seed=0):
    return toy_problem(seed, BATCH, torch.float64)


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


def shared_of(net, which):
    """The shared parameters of each case: one weight (the batched nn.Linear shortcut), its
    weight and bias, or every trunk parameter (one vector-Jacobian product a task)."""
    layer = net.trunk[-2]
    return {"W": [layer.weight], "Wb": [layer.weight, layer.bias],
            "trunk": list(net.trunk.parameters())}[which]


def train_at(net, bal, x, ys, path, which, micro, windows=12):
    opt = torch.optim.SGD(net.parameters(), lr=1e-2)
    trace, norms = [], []
    for _ in range(windows):
        opt.zero_grad()
        for m in range(micro):
            rows = slice(m * BATCH // micro, (m + 1) * BATCH // micro)
            h = net.trunk(x[rows])
            feats = bal.tap(h) if path == "fast" else (h,) * T
            losses = [F.mse_loss(net.heads[i](feats[i]), ys[i][rows]) for i in range(T)]
            bal.backward(losses, shared=shared_of(net, which))
        opt.step()
        trace.append(bal.weights)
        norms.append(bal.stats["grad_norm"])
    return torch.stack(trace), torch.stack(norms)


@pytest.mark.parametrize("path", ["fast", "general", "batched"])
@pytest.mark.parametrize("which", ["W", "Wb", "trunk"])
@pytest.mark.parametrize("micro", [2, 4])
def test_exact_norms_at_parameters_match_the_whole_batch(path, which, micro):
    # G_i = || sum over the window of grad_W (w_i L_i / k) ||: one process on the whole batch
    net, x, ys = problem()
    whole_net, acc_net = copy.deepcopy(net), copy.deepcopy(net)
    kind = "batched" if path == "batched" else "loop"
    path = "general" if path == "batched" else path
    whole = train_at(whole_net, lb.GradNorm(T, general_path=kind).double(), x, ys, path, which,
                     1)
    bal = lb.GradNorm(T, accumulation_steps=micro, general_path=kind).double()
    acc = train_at(acc_net, bal, x, ys, path, which, micro)
    torch.testing.assert_close(acc[1], whole[1], rtol=1e-10, atol=1e-12)  # G_i
    torch.testing.assert_close(acc[0], whole[0], rtol=1e-10, atol=1e-10)  # weights
    for p, q in zip(acc_net.parameters(), whole_net.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_exact_norms_in_float32_match_the_whole_batch():
    net, x, ys = problem()
    net, x, ys = net.float(), x.float(), [y.float() for y in ys]
    whole = train_at(copy.deepcopy(net), lb.GradNorm(T), x, ys, "fast", "Wb", 1)
    acc = train_at(copy.deepcopy(net), lb.GradNorm(T, accumulation_steps=2), x, ys, "fast",
                   "Wb", 2)
    torch.testing.assert_close(acc[1], whole[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(acc[0], whole[0], rtol=1e-5, atol=1e-5)


def test_exact_and_mean_norms_differ_by_the_triangle_inequality():
    # the micro-batches' gradients point different ways: the sum of their norms is larger
    net, x, ys = problem()
    exact = train_at(copy.deepcopy(net), lb.GradNorm(T, accumulation_steps=4).double(), x, ys,
                     "fast", "W", 4, windows=1)[1]
    mean = train_at(copy.deepcopy(net),
                    lb.GradNorm(T, accumulation_steps=4, parameter_norms="mean").double(),
                    x, ys, "fast", "W", 4, windows=1)[1]
    assert (mean > exact * (1 + 1e-6)).all()


def test_changing_the_shared_parameters_inside_a_window_is_an_error():
    net, x, ys = problem()
    bal = lb.GradNorm(T, accumulation_steps=2).double()
    def losses():
        feats = bal.tap(net.trunk(x))
        return [F.mse_loss(net.heads[i](feats[i]), ys[i]) for i in range(T)]

    bal.backward(losses(), shared=shared_of(net, "W"))  # the first half of a window
    weights, grads = bal.weights, [p.grad.clone() for p in net.parameters()]
    with pytest.raises(ValueError, match="shared tensors changed within an accumulation"):
        bal.backward(losses(), shared=shared_of(net, "Wb"))
    assert torch.equal(bal.weights, weights)
    for p, g in zip(net.parameters(), grads, strict=True):
        assert torch.equal(p.grad, g)


@pytest.mark.parametrize("bad", ["sum", None, "EXACT"])
def test_bad_parameter_norms(bad):
    with pytest.raises(ValueError, match="parameter_norms must be"):
        lb.GradNorm(T, parameter_norms=bad)


@pytest.mark.parametrize("path", ["fast", "general"])
def test_mean_norms_at_a_parameter_sum_the_micro_batches(path):
    net, x, ys = problem()
    bal = lb.GradNorm(T, accumulation_steps=2, parameter_norms="mean").double()
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


def test_a_window_in_progress_moves_with_the_balancer():
    # .double() inside a window: the window's sums follow (on a GPU, .to(device) moves them
    # as it moves the weights), and the window closes with one update
    net, x, ys = problem()
    bal = lb.GradNorm(T, accumulation_steps=2)
    step(net.float(), bal, x[:16].float(), [y[:16].float() for y in ys], "fast", "W")
    bal.double()
    window = bal._window
    assert window.values.dtype == window.norms.dtype == window.vectors.dtype == torch.float64
    step(net.double(), bal, x[16:], [y[16:] for y in ys], "fast", "W")
    assert int(bal.num_steps) == 1 and bal.weights.dtype == torch.float64


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 10_000), micro=st.sampled_from([2, 4, 8]),
       path=st.sampled_from(["fast", "general"]), which=st.sampled_from(["W", "Wb", "trunk"]),
       alpha=st.floats(0, 3))
def test_any_equal_split_gives_the_whole_batch_norms(seed, micro, path, which, alpha):
    # invariant: k equal micro-batches and one whole batch give the same G_i and weights
    net, x, ys = problem(seed)
    whole = train_at(copy.deepcopy(net), lb.GradNorm(T, alpha=alpha).double(), x, ys, path,
                     which, 1, windows=3)
    acc = train_at(copy.deepcopy(net),
                   lb.GradNorm(T, alpha=alpha, accumulation_steps=micro).double(), x, ys, path,
                   which, micro, windows=3)
    torch.testing.assert_close(acc[1], whole[1], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(acc[0], whole[0], rtol=1e-9, atol=1e-10)


def inf_grad_losses(net, bal, x, ys, path):
    """Finite losses whose gradient at the shared layer is infinite (sqrt at 0, task 1)."""
    h = net.trunk(x)
    feats = bal.tap(h) if path == "fast" else (h,) * T
    losses = [F.mse_loss(net.heads[i](feats[i]), ys[i]) for i in range(T)]
    u = net.heads[1](feats[1])
    losses[1] = losses[1] + torch.sqrt(u[0, 0] - u[0, 0].detach())
    return losses


@pytest.mark.parametrize("path", ["fast", "general"])
def test_a_nonfinite_gradient_inside_an_exact_window_leaves_the_window_as_it_was(path):
    net, x, ys = problem()
    bal = lb.GradNorm(T, accumulation_steps=3).double()
    step(net, bal, x[:8], [y[:8] for y in ys], path, "W")  # the window's first call
    before = copy.deepcopy(bal.state_dict())
    with pytest.raises(ValueError, match=r"gradient norm of task 1 is (inf|nan)"):
        bal.backward(inf_grad_losses(net, bal, x[8:16], [y[8:16] for y in ys], path),
                     shared=net.last_shared)
    after = bal.state_dict()
    window, window_after = before.pop("_extra_state")["window"], after.pop("_extra_state")["window"]
    assert window["count"] == window_after["count"] == 1
    assert torch.equal(window["vectors"], window_after["vectors"])  # the summed dW_i
    for key, value in before.items():  # L(0) is still nan: the window has not closed
        torch.testing.assert_close(after[key], value, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("path", ["fast", "general"])
def test_skip_mode_skips_an_exact_window_with_a_nonfinite_gradient(path):
    net, x, ys = problem()
    bal = lb.GradNorm(T, accumulation_steps=2, on_nonfinite="skip").double()
    step(net, bal, x[:16], [y[:16] for y in ys], path, "W")
    bal.backward(inf_grad_losses(net, bal, x[16:], [y[16:] for y in ys], path),
                 shared=net.last_shared)
    assert bal.last_step_skipped and int(bal.num_steps) == 0
    assert torch.equal(bal.weights, torch.ones(T, dtype=torch.float64))
    for rows in (slice(0, 16), slice(16, 32)):  # the next window updates as usual
        step(net, bal, x[rows], [y[rows] for y in ys], path, "W")
    assert not bal.last_step_skipped and int(bal.num_steps) == 1
