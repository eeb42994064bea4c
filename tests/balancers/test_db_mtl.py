"""DB-MTL against a literal implementation of its Algorithm 1 written here.

The literal step: per-task ``autograd.grad`` of log(L_i + eps) at the shared parameters, the
EMA ghat_i = beta_t ghat_i + (1 - beta_t) g_i (beta_t = beta / t^sigma, from zero), alpha_i =
max_j ||ghat_j|| / (||ghat_i|| + eps), d = sum_i alpha_i ghat_i written into the shared
parameters' ``.grad`` by hand, every other parameter the backward of sum_i log(L_i + eps).
Every ``.grad`` and parameter must agree over 20 Adam steps in float64.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from test_aggregator import make, shared_params
from torch.nn import functional as F

import lossbalance as lb

F64 = {"rtol": 1e-6, "atol": 1e-10}


class Literal:
    """Algorithm 1 as the paper (and the official code's defaults) state it."""

    def __init__(self, num_tasks, beta=0.9, sigma=0.0, eps=1e-8):
        self.beta, self.sigma, self.eps = beta, sigma, eps
        self.t, self.ema = 0, None

    def step(self, net, x, ys, where, order=None):
        order = list(range(len(ys))) if order is None else order
        h = net.trunk(x)
        logs = [torch.log(F.mse_loss(net.heads[i](h), ys[i]) + self.eps) for i in order]
        shared = shared_params(net, where)
        g = torch.stack([
            torch.cat([p.reshape(-1) for p in torch.autograd.grad(lg, shared,
                                                                   retain_graph=True)])
            for lg in logs])
        self.t += 1
        beta_t = self.beta / self.t ** self.sigma
        self.ema = (1 - beta_t) * g if self.ema is None else beta_t * self.ema + (1 - beta_t) * g
        norms = self.ema.norm(dim=1)
        alpha = norms.max() / (norms + self.eps)
        d = sum(alpha[i] * self.ema[i] for i in range(len(logs)))
        torch.stack(logs).sum().backward()
        start = 0
        for p in shared:
            p.grad = d[start:start + p.numel()].view_as(p).clone()
            start += p.numel()
        return alpha


def balancer_step(bal, net, x, ys, where, order=None, way="backward"):
    order = list(range(len(ys))) if order is None else order
    feats = bal.tap(net.trunk(x))  # changes nothing: the runner's loop taps every balancer
    losses = [F.mse_loss(net.heads[i](feats[k]), ys[i]) for k, i in enumerate(order)]
    shared = shared_params(net, where)
    if way == "backward":
        return bal.backward(losses, shared)
    total = bal.loss(losses, shared)
    total.backward()
    return total.detach()


@pytest.mark.parametrize(("where", "options"), [
    ("W", {}),  # the official defaults: beta 0.9, sigma 0, eps 1e-8
    ("Wb", {"beta": 0.5, "sigma": 0.5}),  # beta_t = beta / sqrt(t)
    ("trunk", {"eps": 0.0}),
])
def test_matches_the_literal_algorithm(where, options):
    net, x, ys = make(3)
    net_a, net_b = copy.deepcopy(net), copy.deepcopy(net)
    opt_a = torch.optim.Adam(net_a.parameters(), lr=1e-2)
    opt_b = torch.optim.Adam(net_b.parameters(), lr=1e-2)
    bal, literal = lb.DBMTL(3, **options).double(), Literal(3, **options)
    for _ in range(20):
        opt_a.zero_grad()
        opt_b.zero_grad()
        total = balancer_step(bal, net_a, x, ys, where)
        alpha = literal.step(net_b, x, ys, where)
        torch.testing.assert_close(bal.weights, alpha, **F64)
        torch.testing.assert_close(bal.grad_ema, literal.ema, **F64)
        for pa, pb in zip(net_a.parameters(), net_b.parameters(), strict=True):
            torch.testing.assert_close(pa.grad, pb.grad, **F64)
        opt_a.step()
        opt_b.step()
    for pa, pb in zip(net_a.parameters(), net_b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, **F64)
    assert int(bal.num_steps) == 20
    # the value returned is the paper's objective, sum_i log(L_i + eps) of the last step
    assert torch.isfinite(total) and total.shape == ()
    # the scales differ 100x; alpha pulls the smaller smoothed gradients up to the largest
    assert float(bal.weights.max()) > 1 and float(bal.weights.min()) == pytest.approx(1)


def test_loss_equals_backward_bit_for_bit():
    net, x, ys = make(3)
    net_a, net_b = copy.deepcopy(net), copy.deepcopy(net)
    opt_a = torch.optim.Adam(net_a.parameters(), lr=1e-2)
    opt_b = torch.optim.Adam(net_b.parameters(), lr=1e-2)
    bal_a, bal_b = lb.DBMTL(3).double(), lb.DBMTL(3).double()
    for _ in range(5):
        opt_a.zero_grad()
        opt_b.zero_grad()
        ta = balancer_step(bal_a, net_a, x, ys, "Wb")
        tb = balancer_step(bal_b, net_b, x, ys, "Wb", way="loss")
        assert torch.equal(ta, tb)
        assert torch.equal(bal_a.weights, bal_b.weights)
        assert torch.equal(bal_a.grad_ema, bal_b.grad_ema)
        for pa, pb in zip(net_a.parameters(), net_b.parameters(), strict=True):
            assert torch.equal(pa.grad, pb.grad)
        opt_a.step()
        opt_b.step()


def test_a_total_never_backpropagated_changes_nothing():
    net, x, ys = make(3)
    bal = lb.DBMTL(3).double()
    h = net.trunk(x)
    bal.loss([F.mse_loss(net.heads[i](h), ys[i]) for i in range(3)], shared_params(net, "W"))
    assert int(bal.num_steps) == 0 and bal.grad_ema.shape == (3, 0) and bal.stats == {}
    assert all(p.grad is None for p in net.parameters())


def test_permuting_the_tasks_permutes_alpha_and_leaves_every_grad():
    net, x, ys = make(3)
    net_a, net_b = copy.deepcopy(net), copy.deepcopy(net)
    order = [2, 0, 1]
    bal_a, bal_b = lb.DBMTL(3).double(), lb.DBMTL(3).double()
    opt_a = torch.optim.Adam(net_a.parameters(), lr=1e-2)
    opt_b = torch.optim.Adam(net_b.parameters(), lr=1e-2)
    for _ in range(3):
        opt_a.zero_grad()
        opt_b.zero_grad()
        balancer_step(bal_a, net_a, x, ys, "W")
        balancer_step(bal_b, net_b, x, ys, "W", order=order)
        torch.testing.assert_close(bal_b.weights, bal_a.weights[order], **F64)
        torch.testing.assert_close(bal_b.grad_ema, bal_a.grad_ema[order], **F64)
        for pa, pb in zip(net_a.parameters(), net_b.parameters(), strict=True):
            torch.testing.assert_close(pa.grad, pb.grad, **F64)
        opt_a.step()
        opt_b.step()


def test_accumulation_window_sums_the_micro_batches_log_gradients():
    # the window's g_i is the mean over its micro-batches of grad log(L_i^(m) + eps): the
    # literal step on the mean of the micro-batches' log losses
    net, x, ys = make(3, batch=16)
    net_a, net_b = copy.deepcopy(net), copy.deepcopy(net)
    opt_a = torch.optim.SGD(net_a.parameters(), lr=1e-2)
    opt_b = torch.optim.SGD(net_b.parameters(), lr=1e-2)
    bal = lb.DBMTL(3, accumulation_steps=2).double()
    ema, eps = None, 1e-8
    shared_b = shared_params(net_b, "W")
    for _ in range(4):
        opt_a.zero_grad()
        opt_b.zero_grad()
        for m in range(2):
            rows = slice(8 * m, 8 * m + 8)
            balancer_step(bal, net_a, x[rows], [y[rows] for y in ys], "W")
        h = [net_b.trunk(x[:8]), net_b.trunk(x[8:])]
        logs = torch.stack([sum(torch.log(F.mse_loss(net_b.heads[i](h[m]), ys[i][8 * m:8 * m + 8])
                                          + eps) for m in range(2)) / 2 for i in range(3)])
        g = torch.stack([torch.autograd.grad(lg, shared_b, retain_graph=True)[0].reshape(-1)
                         for lg in logs])
        ema = 0.1 * g if ema is None else 0.9 * ema + 0.1 * g
        norms = ema.norm(dim=1)
        d = (norms.max() / (norms + eps)) @ ema
        logs.sum().backward()
        shared_b[0].grad = d.view_as(shared_b[0]).clone()
        torch.testing.assert_close(bal.grad_ema, ema, **F64)
        for pa, pb in zip(net_a.parameters(), net_b.parameters(), strict=True):
            torch.testing.assert_close(pa.grad, pb.grad, **F64)
        opt_a.step()
        opt_b.step()
    assert int(bal.num_steps) == 4


def _losses(net, x, ys, scale=(1.0, 1.0, 1.0)):
    h = net.trunk(x)
    return [F.mse_loss(net.heads[i](h), ys[i]) * scale[i] for i in range(3)]


def test_bad_input_is_refused_before_any_state_changes():
    net, x, ys = make(3)
    bal = lb.DBMTL(3, task_names=["a", "b", "c"]).double()
    w = shared_params(net, "W")
    with pytest.raises(ValueError, match=r"loss of task 1 \('b'\) is -1\.0"):
        losses = _losses(net, x, ys)
        bal.backward([losses[0], losses[1] * 0 - 1, losses[2]], w)
    with pytest.raises(ValueError, match=r"shared= the shared parameters.*rep_grad"):
        bal.backward(_losses(net, x, ys))
    h = net.trunk(x)
    feats = bal.tap(h)
    with pytest.raises(ValueError, match="not a parameter"):
        bal.backward([F.mse_loss(net.heads[i](feats[i]), ys[i]) for i in range(3)], h)
    with pytest.raises(ValueError, match="does not reach"):
        losses = _losses(net, x, ys)
        bal.backward([losses[0], losses[1], (net.heads[2].weight ** 2).sum()], w)
    with pytest.raises(TypeError, match="unexpected arguments"):
        bal.backward(_losses(net, x, ys), w, kpis=[1, 2, 3])
    assert int(bal.num_steps) == 0 and bal.grad_ema.shape == (3, 0) and bal.stats == {}
    assert all(p.grad is None for p in net.parameters())
    bal.backward(_losses(net, x, ys), w)
    ema = bal.grad_ema.clone()
    with pytest.raises(ValueError, match="same shared= every step"):
        bal.backward(_losses(net, x, ys), shared_params(net, "Wb"))
    assert torch.equal(bal.grad_ema, ema) and int(bal.num_steps) == 1


def test_a_zero_loss_takes_eps_and_is_refused_without():
    net, x, ys = make(3)
    w = shared_params(net, "W")
    losses = _losses(net, x, ys)
    zero = [losses[0], losses[1], losses[2] * 0]  # log(0 + 1e-8): finite, as in the official code
    lb.DBMTL(3).double().backward(zero, w)
    net.zero_grad()
    bal = lb.DBMTL(3, eps=0.0).double()
    with pytest.raises(ValueError, match=r"task 2 is 0\.0.*eps=0"):
        bal.backward([*_losses(net, x, ys)[:2], _losses(net, x, ys)[2] * 0], w)
    assert int(bal.num_steps) == 0


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"beta": 1.0}, "beta"), ({"beta": -0.1}, "beta"), ({"beta": "0.9"}, "beta"),
    ({"sigma": -1.0}, "sigma"), ({"eps": -1e-8}, "eps"), ({"accumulation_steps": 0}, "accum"),
    ({"general_path": "vmap"}, "general_path"), ({"distributed": "yes"}, "distributed"),
])
def test_bad_options(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        lb.DBMTL(3, **kwargs)


def _nan_gradient_losses(net, x, ys):
    """Finite losses whose gradient at W is NaN for task 0 (sqrt(|x|)'s slope at 0)."""
    losses = _losses(net, x, ys)
    w = net.trunk[2].weight
    return [losses[0] + (w - w.detach()).abs().sqrt().sum(), losses[1], losses[2]]


@pytest.mark.parametrize("way", ["backward", "loss"])
def test_nonfinite_gradient_raises_or_skips_with_nothing_changed(way):
    net, x, ys = make(3)
    w = shared_params(net, "W")
    bal = lb.DBMTL(3, task_names=["a", "b", "c"]).double()
    bal.backward(_losses(net, x, ys), w)
    net.zero_grad(set_to_none=True)
    state = copy.deepcopy(bal.state_dict())
    with pytest.raises(ValueError, match=r"of task 0 \('a'\) is non-finite"):
        bal.backward(_nan_gradient_losses(net, x, ys), w)
    skip = lb.DBMTL(3, on_nonfinite="skip").double()
    skip.load_state_dict(state)
    if way == "backward":
        skip.backward(_nan_gradient_losses(net, x, ys), w)
    else:
        skip.loss(_nan_gradient_losses(net, x, ys), w).backward()
    assert skip.last_step_skipped
    for name, value in state.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(skip.state_dict()[name], value), name
            assert torch.equal(bal.state_dict()[name], value), name
    assert all(p.grad is None for p in net.parameters())
    # an infinite loss follows on_nonfinite too (the base class's check)
    inf = _losses(net, x, ys)
    skip.backward([inf[0], inf[1] * float("inf"), inf[2]], w)
    assert skip.last_step_skipped and int(skip.num_steps) == 1
    with pytest.raises(ValueError, match="non-finite"):
        bal.backward([inf[0], inf[1] * float("inf"), inf[2]], w)


def test_state_dict_round_trip_is_bit_exact():
    net, x, ys = make(3)
    w = shared_params(net, "Wb")
    bal = lb.DBMTL(3, sigma=0.5).double()
    for _ in range(3):
        net.zero_grad()
        bal.backward(_losses(net, x, ys), w)
    buffer = io.BytesIO()
    torch.save(bal.state_dict(), buffer)
    resumed = lb.DBMTL(3, sigma=0.5).double()
    resumed.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    assert torch.equal(resumed.grad_ema, bal.grad_ema) and int(resumed.num_steps) == 3
    grads = []
    for b in (bal, resumed):
        net.zero_grad()
        b.backward(_losses(net, x, ys), w)
        grads.append([p.grad.clone() for p in net.parameters()])
    assert torch.equal(resumed.grad_ema, bal.grad_ema)
    assert torch.equal(resumed.weights, bal.weights)
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)


def test_float32_agrees_with_float64():
    net, x, ys = make(3)
    net32 = copy.deepcopy(net).float()
    bal64, bal32 = lb.DBMTL(3).double(), lb.DBMTL(3)
    for _ in range(3):
        net.zero_grad()
        net32.zero_grad()
        bal64.backward(_losses(net, x, ys), shared_params(net, "W"))
        bal32.backward(_losses(net32, x.float(), [y.float() for y in ys]),
                       shared_params(net32, "W"))
    assert bal32.grad_ema.dtype == torch.float32
    for a, b in zip(net.parameters(), net32.parameters(), strict=True):
        torch.testing.assert_close(b.grad.double(), a.grad, rtol=1e-4, atol=1e-6)


def test_grad_scaler_scale_is_divided_out():
    # a scaler's scale reaches .grad (the optimizer step divides it out), the EMA is unscaled
    net, x, ys = make(3)
    net_s = copy.deepcopy(net)
    bal, scaled = lb.DBMTL(3).double(), lb.DBMTL(3).double()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    bal.backward(_losses(net, x, ys), shared_params(net, "W"))
    scaled.backward(_losses(net_s, x, ys), shared_params(net_s, "W"), grad_scaler=scaler)
    torch.testing.assert_close(scaled.grad_ema, bal.grad_ema, rtol=0, atol=0)
    for a, b in zip(net.parameters(), net_s.parameters(), strict=True):
        torch.testing.assert_close(b.grad / 2.0 ** 10, a.grad, **F64)


def test_caller_divides_loss_over_k_equals_backward_bit_for_bit():
    # a trainer's accumulation backpropagates bal.loss(...) / k (k = 2: 1/k exact)
    net, x, ys = make(3)
    net_a, net_b = copy.deepcopy(net), copy.deepcopy(net)
    bal_a = lb.DBMTL(3, accumulation_steps=2).double()
    bal_b = lb.DBMTL(3, accumulation_steps=2, caller_divides=True).double()
    for _ in range(3):
        net_a.zero_grad()
        net_b.zero_grad()
        for m in range(2):
            rows = slice(8 * m, 8 * m + 8)
            bal_a.backward(_losses(net_a, x[rows], [y[rows] for y in ys]),
                           shared_params(net_a, "W"))
            total = bal_b.loss(_losses(net_b, x[rows], [y[rows] for y in ys]),
                               shared_params(net_b, "W"))
            (total / 2).backward()
        assert torch.equal(bal_a.grad_ema, bal_b.grad_ema)
        assert torch.equal(bal_a.weights, bal_b.weights)
        for pa, pb in zip(net_a.parameters(), net_b.parameters(), strict=True):
            assert torch.equal(pa.grad, pb.grad)
    assert int(bal_b.num_steps) == 3
