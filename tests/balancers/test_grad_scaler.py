"""Mixed precision: every balancer's backward through a torch.amp.GradScaler."""

from __future__ import annotations

import copy

import pytest
import torch
from literal import toy_problem
from torch.nn import functional as F

import lossbalance as lb

T = 3


problem = toy_problem


def run(bal, path, steps, scaler=None, net=None):
    """Train ``steps`` steps of ``bal.accumulation_steps`` micro-batches each; returns the
    weights after each and the final model."""
    net, x, ys = (net, *problem()[1:]) if net is not None else problem()
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    micro = getattr(bal, "accumulation_steps", 1)
    trace = []
    for _ in range(steps):
        opt.zero_grad()
        for m in range(micro):
            rows = slice(m * len(x) // micro, (m + 1) * len(x) // micro)
            h = net.trunk(x[rows])
            feats = bal.tap(h) if path == "fast" else (h,) * T
            losses = [F.mse_loss(net.heads[i](feats[i]), ys[i][rows]) for i in range(T)]
            bal.backward(losses, shared=net.last_shared, grad_scaler=scaler)
        if scaler is None:
            opt.step()
        else:
            scaler.step(opt)
            scaler.update()
        trace.append(bal.weights)
    return torch.stack(trace), net


@pytest.mark.parametrize("path", ["fast", "general"])
def test_gradnorm_under_a_scaler_follows_the_unscaled_run_exactly(path):
    # a power-of-two scale multiplies every gradient exactly: the same run, bit for bit
    plain = lb.GradNorm(T)
    plain_w, plain_net = run(plain, path, 20)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    bal = lb.GradNorm(T)
    scaled_w, scaled_net = run(bal, path, 20, scaler)
    assert torch.equal(plain_w, scaled_w)
    for p, q in zip(plain_net.parameters(), scaled_net.parameters(), strict=True):
        assert torch.equal(p, q)
    for key, value in plain.stats.items():  # G_i, targets... with the scale divided out
        assert torch.equal(value, bal.stats[key]), key


@pytest.mark.parametrize("path", ["fast", "general"])
def test_overflowing_scaled_gradients_skip_the_update_without_error(path):
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127, backoff_factor=2.0**-80,
                                  growth_interval=1000)
    bal = lb.GradNorm(T)  # on_nonfinite="raise": an overflow under a scaler is not an error
    net0 = problem()[0]
    weights, net = run(bal, path, 1, scaler, net=copy.deepcopy(net0))
    assert bal.last_step_skipped
    assert torch.equal(weights[0], torch.ones(T))
    assert int(bal.num_steps) == 0 and torch.isnan(bal.initial_losses).all()
    for p, q in zip(net0.parameters(), net.parameters(), strict=True):
        assert torch.equal(p, q)  # the scaler skipped the optimizer step
    assert scaler.get_scale() < 2.0**127
    for _ in range(10):  # the scaler backs off until the gradients fit
        run(bal, path, 1, scaler, net=net)
        if not bal.last_step_skipped:
            break
    assert not bal.last_step_skipped and int(bal.num_steps) == 1


@pytest.mark.parametrize("make", [
    lambda: lb.EqualWeighting(T),
    lambda: lb.StaticWeighting([1.0, 2.0, 3.0]),
    lambda: lb.UncertaintyWeighting(T, task_types=["regression"] * T),
    lambda: lb.DynamicTaskPrioritization(T),
], ids=["equal", "static", "uncertainty", "dtp"])
def test_other_balancers_backpropagate_the_scaled_total(make):
    grads = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0**8)):
        net, x, ys = problem()
        bal = make()
        f = bal.tap(net.trunk(x))
        losses = [F.mse_loss(net.heads[i](f[i]), ys[i]) for i in range(T)]
        kwargs = {"kpis": [0.5, 0.6, 0.7]} if isinstance(bal, lb.DynamicTaskPrioritization) else {}
        total = bal.backward(losses, grad_scaler=scaler, **kwargs)
        grads.append((total, net.last_shared.grad.clone()))
    (total_a, grad_a), (total_b, grad_b) = grads
    assert torch.equal(total_a, total_b)  # the returned total is unscaled
    assert torch.equal(grad_a * 2.0**8, grad_b)


def test_a_disabled_scaler_is_no_scaler_and_a_wrong_object_is_an_error():
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    plain_w, _ = run(lb.GradNorm(T), "fast", 3)
    assert torch.equal(run(lb.GradNorm(T), "fast", 3, scaler)[0], plain_w)
    net, x, ys = problem()
    bal = lb.GradNorm(T)
    f = bal.tap(net.trunk(x))
    with pytest.raises(TypeError, match=r"grad_scaler must be a torch\.amp\.GradScaler"):
        bal.backward([F.mse_loss(net.heads[i](f[i]), ys[i]) for i in range(T)],
                     shared=net.last_shared, grad_scaler=2.0)


@pytest.mark.parametrize("path", ["fast", "general"])
def test_exact_window_norms_under_a_scaler_follow_the_unscaled_run(path):
    # two micro-batches a step, G_i from the per-task gradients at W summed over the window:
    # the scale divides out of them as out of the norms (a power of two: bit for bit)
    plain, scaled = lb.GradNorm(T, accumulation_steps=2), lb.GradNorm(T, accumulation_steps=2)
    run(plain, path, 10)
    run(scaled, path, 10, torch.amp.GradScaler("cpu", init_scale=2.0**12))
    assert int(scaled.num_steps) == 10
    assert torch.equal(plain.weights, scaled.weights)
    assert torch.equal(plain.stats["grad_norm"], scaled.stats["grad_norm"])
