"""The aggregation plumbing (``Aggregator``) against a literal implementation written here.

The literal step: per-task ``torch.autograd.grad`` at h or at the shared parameters, the
Gram matrix of those vectors, c = rule(G), and the update applied by hand: at h, each head
gets its own loss's gradient and the trunk the backward of sum_i c_i g_i from h; at
parameters, the backward of sum_i c_i L_i. The model's ``.grad`` everywhere, c and G must
agree over 20 optimizer steps. The rules here are small functions of G written for the test
(one that is not scale-invariant, so that a gradient scaler's scale left in G would show);
the real methods' rules are checked in tests/rules and by test_aggregation_methods.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
from literal import ToyNet, assert_equal_states
from torch import nn
from torch.nn import functional as F

import lossbalance as lb

F64 = {"rtol": 1e-6, "atol": 1e-10}


def cosine_rule(gram):
    """c_i = (1 + mean_j cos(g_i, g_j) / 2) / ||g_i||: uses every entry of G, and d is not
    proportional to the gradients' scale (so the scale must be divided out before it)."""
    n = gram.diagonal().sqrt()
    cos = gram / (n[:, None] * n[None, :])
    return (1 + 0.5 * cos.mean(1)) / n


def mgda2_rule(gram):
    """MGDA's closed form for two tasks (Sener & Koltun, Algorithm 1)."""
    g11, g12, g22 = gram[0, 0], gram[0, 1], gram[1, 1]
    a = ((g22 - g12) / (g11 + g22 - 2 * g12)).clamp(0, 1)
    return torch.stack([a, 1 - a])


class RuleAggregator(lb.Aggregator):
    def __init__(self, num_tasks, rule=cosine_rule, **kwargs):
        super().__init__(num_tasks, **kwargs)
        self.rule = rule

    def _coefficients(self, gram, values):
        return self.rule(gram)


class NormTrunk(nn.Module):
    """A trunk that is not Linear -> activation at its end (LayerNorm): the per-task VJP."""

    def __init__(self, width=16):
        super().__init__()
        self.lin = nn.Linear(8, width)
        self.norm = nn.LayerNorm(width)

    def forward(self, x):
        return self.norm(torch.tanh(self.lin(x))) * 2


class TwiceHead(nn.Module):
    """A head that reads h twice (two consumer nodes of h for one task)."""

    def __init__(self, width=16):
        super().__init__()
        self.a, self.b = nn.Linear(width, 4), nn.Linear(width, 4)

    def forward(self, h):
        return self.a(h) + self.b(torch.sin(h))


def make(num_tasks=3, trunk="toy", heads="linear", batch=16, seed=0):
    torch.manual_seed(seed)
    net = ToyNet(num_tasks)
    if trunk == "norm":
        net.trunk = NormTrunk()
    if heads == "twice":
        net.heads = nn.ModuleList(TwiceHead() for _ in range(num_tasks))
    net = net.double()
    x = torch.randn(batch, 8, dtype=torch.float64)
    ys = [torch.randn(batch, 4, dtype=torch.float64) * (1.0, 10.0, 100.0)[i % 3]
          for i in range(num_tasks)]
    return net, x, ys


def shared_params(net, where):
    if where == "trunk":
        return list(net.trunk.parameters())
    return {"W": [net.trunk[2].weight], "Wb": list(net.trunk[2].parameters())}[where]


def shared_for(net, where, h):
    """What the balancer is given as ``shared`` for each ``where``."""
    if where == "h":
        return None
    if where == "general-h":
        return h
    return shared_params(net, where.removeprefix("tap-"))


def literal_step(net, x, ys, where, rule, order=None):
    """One step of the literal aggregation; ``where``: "h" (at h, no shared), "tap-W"/"tap-Wb"/
    "tap-trunk" (c from the Gram matrix at those, replacement at h), "W"/"trunk" (at the
    parameters, backward of sum c_i L_i), "general-h" (at h without tap: backward of
    sum c_i L_i). Returns c and G."""
    T = len(ys)
    order = list(range(T)) if order is None else order
    h = net.trunk(x)
    losses = [F.mse_loss(net.heads[i](h), ys[i]) for i in order]
    at = [h] if where in ("h", "general-h") else shared_params(net, where.removeprefix("tap-"))
    vectors = torch.stack([
        torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, at, retain_graph=True)])
        for loss in losses])
    gram = vectors @ vectors.T
    c = rule(gram)
    if where in ("W", "Wb", "trunk", "general-h"):
        (torch.stack(losses) @ c).backward()
        return c, gram
    g_h = [torch.autograd.grad(loss, h, retain_graph=True)[0] for loss in losses]
    for k, i in enumerate(order):
        head = list(net.heads[i].parameters())
        for p, g in zip(head, torch.autograd.grad(losses[k], head, retain_graph=True),
                        strict=True):
            p.grad = g if p.grad is None else p.grad + g
    h.backward(sum(ci * g for ci, g in zip(c, g_h, strict=True)))
    return c, gram


def balancer_step(bal, net, x, ys, where, order=None, way="backward"):
    T = len(ys)
    order = list(range(T)) if order is None else order
    h = net.trunk(x)
    tapped = where in ("h",) or where.startswith("tap-")
    feats = bal.tap(h) if tapped else (h,) * T
    losses = [F.mse_loss(net.heads[i](feats[k]), ys[i]) for k, i in enumerate(order)]
    shared = shared_for(net, where, h)
    if way == "backward":
        return bal.backward(losses, shared)
    total = bal.loss(losses, shared)
    total.backward()
    return total.detach()


def run_both(where, rule=cosine_rule, steps=20, num_tasks=3, optimizer=torch.optim.Adam,
             balancer=None, instance=None, **problem):
    """``steps`` optimizer steps of a balancer (``instance``, or a RuleAggregator of ``rule``
    with the keyword arguments ``balancer``) beside the literal step of ``rule``: the same
    weights, Gram matrix, gradients and parameters (float64)."""
    net, x, ys = make(num_tasks, **problem)
    net_a, net_b = copy.deepcopy(net), copy.deepcopy(net)
    opt_a = optimizer(net_a.parameters(), lr=1e-3)
    opt_b = optimizer(net_b.parameters(), lr=1e-3)
    bal = instance if instance is not None else RuleAggregator(num_tasks, rule,
                                                               **(balancer or {})).double()
    for _ in range(steps):
        opt_a.zero_grad()
        opt_b.zero_grad()
        balancer_step(bal, net_a, x, ys, where)
        c, gram = literal_step(net_b, x, ys, where, rule)
        torch.testing.assert_close(bal.weights, c, **F64)
        torch.testing.assert_close(bal.stats["gram"], gram, **F64)
        for pa, pb in zip(net_a.parameters(), net_b.parameters(), strict=True):
            torch.testing.assert_close(pa.grad, pb.grad, **F64)
        opt_a.step()
        opt_b.step()
    for pa, pb in zip(net_a.parameters(), net_b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, **F64)
    assert int(bal.num_steps) == steps
    return bal


@pytest.mark.parametrize("where", ["h", "tap-W", "tap-Wb", "tap-trunk", "W", "trunk",
                                   "general-h"])
def test_matches_literal_aggregation(where):
    run_both(where)


def test_batched_general_path_matches_literal():
    run_both("trunk", steps=5, balancer={"general_path": "batched"})


@pytest.mark.parametrize("where", ["tap-W", "tap-Wb"])
def test_matches_literal_when_the_layer_is_wider_than_the_batch(where):
    # batch 8 < 16 inputs: <dW_i, dW_j> from K = x x^T and delta_i, dW_i never formed
    run_both(where, batch=8, optimizer=torch.optim.SGD)


@pytest.mark.parametrize("where", ["h", "tap-trunk", "trunk"])
def test_a_trunk_that_is_not_one_linear(where):
    run_both(where, trunk="norm", steps=5)


@pytest.mark.parametrize("where", ["h", "tap-W"])
def test_heads_reading_h_twice(where):
    run_both(where, heads="twice", steps=5)


@pytest.mark.parametrize("where", ["h", "W"])
def test_two_tasks_with_mgda_closed_form(where):
    bal = run_both(where, rule=mgda2_rule, num_tasks=2)
    assert torch.isclose(bal.weights.sum(), torch.tensor(1.0, dtype=torch.float64))


@pytest.mark.parametrize("where", ["h", "tap-W", "W"])
def test_ten_tasks(where):
    run_both(where, num_tasks=10, steps=5)


@pytest.mark.parametrize("where", ["h", "tap-W", "W"])
def test_permuting_tasks_permutes_c(where):
    net, x, ys = make(4)
    order = [2, 0, 3, 1]
    nets = [copy.deepcopy(net), copy.deepcopy(net)]
    bals = [RuleAggregator(4).double(), RuleAggregator(4).double()]
    for _ in range(3):
        for k, o in enumerate((None, order)):
            nets[k].zero_grad()
            balancer_step(bals[k], nets[k], x, ys, where, order=o)
        torch.testing.assert_close(bals[1].weights, bals[0].weights[order], **F64)
        torch.testing.assert_close(bals[1].stats["gram"],
                                   bals[0].stats["gram"][order][:, order], **F64)
        for pa, pb in zip(nets[0].parameters(), nets[1].parameters(), strict=True):
            torch.testing.assert_close(pa.grad, pb.grad, **F64)


def run_way(way, where, steps=4, accumulation=1, scaler=None, rule=cosine_rule):
    """``steps`` optimizer steps of ``accumulation`` micro-batches through ``bal.backward``
    or ``bal.loss(...).backward()`` (scaled when ``scaler``); per step the weights, stats,
    totals and every gradient."""
    net, x, ys = make(3)
    bal = RuleAggregator(3, rule, accumulation_steps=accumulation).double()
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    trace = []
    for _ in range(steps):
        opt.zero_grad()
        totals = []
        for m in range(accumulation):
            rows = slice(m * len(x) // accumulation, (m + 1) * len(x) // accumulation)
            h = net.trunk(x[rows])
            tapped = where == "h" or where.startswith("tap-")
            feats = bal.tap(h) if tapped else (h,) * 3
            losses = [F.mse_loss(net.heads[i](feats[i]), ys[i][rows]) for i in range(3)]
            shared = shared_for(net, where, h)
            if way == "backward":
                totals.append(bal.backward(losses, shared, grad_scaler=scaler))
            else:
                total = bal.loss(losses, shared)
                (total if scaler is None else scaler.scale(total)).backward()
                totals.append(total.detach())
        grads = [p.grad.clone() for p in net.parameters()]
        if scaler is None:
            opt.step()
        else:
            scaler.step(opt)
            scaler.update()
        trace.append((bal.weights, dict(bal.stats), totals, grads, bal.last_step_skipped))
    return trace, bal, net


def assert_same(a, b):
    for (wa, sa, ta, ga, ka), (wb, sb, tb, gb, kb) in zip(a, b, strict=True):
        assert torch.equal(wa, wb)
        assert sa.keys() == sb.keys()
        for key in sa:
            assert torch.equal(sa[key], sb[key]), key
        for u, v in zip(ta + ga, tb + gb, strict=True):
            assert torch.equal(u, v)
        assert ka == kb


@pytest.mark.parametrize("where", ["h", "tap-W", "W", "general-h"])
@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("accumulation", [1, 2])
def test_loss_matches_backward_bit_for_bit(where, scaled, accumulation):
    out = []
    for way in ("backward", "loss"):
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if scaled else None
        trace, bal, _ = run_way(way, where, accumulation=accumulation, scaler=scaler)
        out.append((trace, bal))
    assert_same(out[0][0], out[1][0])
    assert int(out[0][1].num_steps) == int(out[1][1].num_steps) > 0
    assert_equal_states(out[0][1].state_dict(), out[1][1].state_dict())


@pytest.mark.parametrize("where", ["h", "tap-W", "W"])
def test_the_scalers_scale_is_divided_out(where):
    # the test rule is not scale-invariant: c with a scaler (2^10) equals c without
    plain, _, net_a = run_way("backward", where)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    scaled, _, net_b = run_way("backward", where, scaler=scaler)
    for (wa, sa, *_), (wb, sb, *_) in zip(plain, scaled, strict=True):
        torch.testing.assert_close(wa, wb, rtol=1e-12, atol=0)
        torch.testing.assert_close(sa["gram"], sb["gram"], rtol=1e-12, atol=0)
    for pa, pb in zip(net_a.parameters(), net_b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("where", ["h", "tap-W", "W"])
def test_a_total_never_backpropagated_changes_nothing(where):
    net, x, ys = make(3)
    bal = RuleAggregator(3).double()
    before = copy.deepcopy(bal.state_dict())
    h = net.trunk(x)
    feats = bal.tap(h) if where != "W" else (h,) * 3
    losses = [F.mse_loss(net.heads[i](feats[i]), ys[i]) for i in range(3)]
    bal.loss(losses, None if where == "h" else shared_params(net, where.removeprefix("tap-")))
    assert_equal_states(before, bal.state_dict())
    assert bal.stats == {}
    # the next step is an ordinary one
    net_b = copy.deepcopy(net)
    balancer_step(bal, net, x, ys, where)
    c, _ = literal_step(net_b, x, ys, where, cosine_rule)
    torch.testing.assert_close(bal.weights, c, **F64)


def nan_grad_losses(net, feats, ys, bad=1):
    """Finite losses; task ``bad``'s gradient is NaN (sqrt at 0 times a zero)."""
    losses = []
    for i in range(len(ys)):
        out = net.heads[i](feats[i])
        loss = F.mse_loss(out, ys[i])
        losses.append(loss + torch.sqrt((out * 0).sum()) if i == bad else loss)
    return losses


@pytest.mark.parametrize("where", ["h", "tap-W", "W"])
def test_nonfinite_gradient_raises_naming_the_task(where):
    net, x, ys = make(3)
    bal = RuleAggregator(3, task_names=["a", "b", "c"]).double()
    before = copy.deepcopy(bal.state_dict())
    h = net.trunk(x)
    feats = bal.tap(h) if where != "W" else (h,) * 3
    shared = None if where == "h" else shared_params(net, where.removeprefix("tap-"))
    with pytest.raises(ValueError, match=r"task 1 \('b'\).*non-finite"):
        bal.backward(nan_grad_losses(net, feats, ys), shared)
    assert_equal_states(before, bal.state_dict())
    if where == "W":  # known before the backward: .grad untouched
        assert all(p.grad is None for p in net.parameters())


@pytest.mark.parametrize("where", ["h", "tap-W", "W"])
def test_nonfinite_gradient_skips_with_skip(where):
    net, x, ys = make(3)
    bal = RuleAggregator(3, on_nonfinite="skip").double()
    balancer_step(bal, net, x, ys, where)
    before = copy.deepcopy(bal.state_dict())
    net.zero_grad()
    h = net.trunk(x)
    feats = bal.tap(h) if where != "W" else (h,) * 3
    shared = None if where == "h" else shared_params(net, where.removeprefix("tap-"))
    bal.backward(nan_grad_losses(net, feats, ys), shared)
    assert bal.last_step_skipped
    assert_equal_states(before, bal.state_dict())
    if where == "W":
        assert all(p.grad is None for p in net.parameters())
    balancer_step(bal, net, x, ys, where)
    assert not bal.last_step_skipped and int(bal.num_steps) == 2


def test_bad_input_is_refused_before_anything_changes():
    net, x, ys = make(3)
    bal = RuleAggregator(3).double()
    before = copy.deepcopy(bal.state_dict())

    def losses(feats):
        return [F.mse_loss(net.heads[i](feats[i]), ys[i]) for i in range(3)]

    h = net.trunk(x)
    with pytest.raises(ValueError, match="expected 3 losses"):
        bal.backward(losses((h,) * 3)[:2], net.trunk)
    with pytest.raises(ValueError, match=r"bal\.tap"):
        bal.backward(losses((h,) * 3))
    with pytest.raises(ValueError, match="mixes parameters"):
        bal.backward(losses((h,) * 3), [h, net.trunk[2].weight])
    with pytest.raises(ValueError, match="task 2 does not reach the tapped"):
        feats = bal.tap(h)
        bal.backward(losses((feats[0], feats[1], net.trunk(x))))  # another forward's h
    with pytest.raises(ValueError, match="task 0 does not reach any"):
        bal.backward([ys[0].sum().requires_grad_(), *losses((h,) * 3)[1:]], net.trunk[2])
    with pytest.raises(ValueError, match="does not require grad"):
        bal.tap(h.detach())
    with pytest.raises(TypeError, match="unexpected"):
        bal.backward(losses((h,) * 3), net.trunk, kpis=[0.5] * 3)
    assert_equal_states(before, bal.state_dict())
    assert all(p.grad is None for p in net.parameters())
    with pytest.raises(ValueError, match="accumulation_steps"):
        RuleAggregator(3, accumulation_steps=0)
    with pytest.raises(TypeError, match="distributed must be"):
        RuleAggregator(3, distributed="yes")
    with pytest.raises(ValueError, match="general_path"):
        RuleAggregator(3, general_path="fast")


def literal_window_at_parameters(net, x, ys, where, rule, w, k):
    """One window of k micro-batches at the shared parameters, as the docs state it: the
    micro-batches backpropagate (1/k) sum_i w_i L_i; at the end the shared parameters hold
    sum_i c_i v_i, v_i the gradient of the window's mean loss i, c = rule(Gram of v)."""
    shared = shared_params(net, where)
    v = 0
    for m in range(k):
        rows = slice(m * len(x) // k, (m + 1) * len(x) // k)
        h = net.trunk(x[rows])
        losses = [F.mse_loss(net.heads[i](h), ys[i][rows]) for i in range(len(ys))]
        v = v + torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(
            loss, shared, retain_graph=True)]) for loss in losses]) / k
        (torch.stack(losses) @ w / k).backward()
    c = rule(v @ v.T)
    update = c @ v
    start = 0
    for p in shared:
        p.grad = update[start:start + p.numel()].view_as(p).clone()
        start += p.numel()
    return c


def literal_micro_batches_at_h(net, x, ys, rule, k):
    """A window at h: each micro-batch m takes c_m from its own (unscaled) Gram matrix at h
    and hands (1/k) sum_i c_m,i g_i,m into the trunk; the heads get (1/k) their own."""
    cs = []
    for m in range(k):
        rows = slice(m * len(x) // k, (m + 1) * len(x) // k)
        h = net.trunk(x[rows])
        losses = [F.mse_loss(net.heads[i](h), ys[i][rows]) for i in range(len(ys))]
        g = torch.stack([torch.autograd.grad(loss, h, retain_graph=True)[0] for loss in losses])
        c = rule(g.flatten(1) @ g.flatten(1).T)
        for i, head in enumerate(net.heads):
            params = list(head.parameters())
            for p, gp in zip(params, torch.autograd.grad(losses[i] / k, params,
                                                         retain_graph=True), strict=True):
                p.grad = gp if p.grad is None else p.grad + gp
        h.backward(torch.einsum("i,i...->...", c, g) / k)
        cs.append(c)
    return cs


@pytest.mark.parametrize("where", ["W", "trunk", "h"])
def test_accumulation_window_matches_literal(where):
    k = 2
    net, x, ys = make(3)
    net_a, net_b = copy.deepcopy(net), copy.deepcopy(net)
    opt_a = torch.optim.Adam(net_a.parameters(), lr=1e-3)
    opt_b = torch.optim.Adam(net_b.parameters(), lr=1e-3)
    bal = RuleAggregator(3, accumulation_steps=k).double()
    w = torch.ones(3, dtype=torch.float64)
    for _ in range(5):
        opt_a.zero_grad()
        opt_b.zero_grad()
        for m in range(k):
            rows = slice(m * len(x) // k, (m + 1) * len(x) // k)
            balancer_step(bal, net_a, x[rows], [y[rows] for y in ys], where)
            if where == "h":  # c of each micro-batch
                assert int(bal.num_steps) % k == (m + 1) % k
        if where == "h":
            c = literal_micro_batches_at_h(net_b, x, ys, cosine_rule, k)[-1]
        else:
            c = literal_window_at_parameters(net_b, x, ys, where, cosine_rule, w, k)
            # exact: the window's c is that of one step on the whole batch
            whole = copy.deepcopy(net_a)
            whole.zero_grad()
            c_whole, _ = literal_step(whole, x, ys, where, cosine_rule)
            torch.testing.assert_close(c, c_whole, **F64)
            w = c
        torch.testing.assert_close(bal.weights, c, **F64)
        for pa, pb in zip(net_a.parameters(), net_b.parameters(), strict=True):
            torch.testing.assert_close(pa.grad, pb.grad, **F64)
        opt_a.step()
        opt_b.step()


def test_a_window_at_parameters_cannot_move_to_h():
    net, x, ys = make(3)
    bal = RuleAggregator(3, accumulation_steps=2).double()
    balancer_step(bal, net, x, ys, "W")
    with pytest.raises(ValueError, match="window at parameters is in progress"):
        balancer_step(bal, net, x, ys, "h")
    with pytest.raises(ValueError, match="shared tensors changed"):
        balancer_step(bal, net, x, ys, "trunk")
    balancer_step(bal, net, x, ys, "W")  # the window's end
    assert int(bal.num_steps) == 1


@pytest.mark.parametrize("where", ["h", "tap-W"])
def test_an_overflow_under_a_scaler_skips_the_step(where):
    # scale 2^100: the scaled gradients are finite (float32) but their Gram matrix is not;
    # the trunk gets NaN, so the scaler skips the optimizer step and lowers the scale
    net, x, ys = make(3)
    net, x, ys = net.float(), x.float(), [y.float() for y in ys]
    bal = RuleAggregator(3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**100)
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in net.parameters()]
    h = net.trunk(x)
    feats = bal.tap(h)
    losses = [F.mse_loss(net.heads[i](feats[i]), ys[i]) for i in range(3)]
    bal.backward(losses, shared_for(net, where, h), grad_scaler=scaler)
    assert bal.last_step_skipped and int(bal.num_steps) == 0
    assert torch.isnan(net.trunk[0].weight.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in net.heads.parameters())  # only G overflowed
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() < 2.0**100
    for p, q in zip(net.parameters(), before, strict=True):
        assert torch.equal(p, q)


def test_float32_matches_literal():
    net, x, ys = make(3)
    net = net.float()
    x, ys = x.float(), [y.float() for y in ys]
    net_b = copy.deepcopy(net)
    bal = RuleAggregator(3)
    for where in ("h", "tap-W", "W"):
        net.zero_grad()
        net_b.zero_grad()
        balancer_step(bal, net, x, ys, where)
        c, gram = literal_step(net_b, x, ys, where, cosine_rule)
        assert bal.weights.dtype == bal.stats["gram"].dtype == torch.float32
        torch.testing.assert_close(bal.weights, c, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(bal.stats["gram"], gram, rtol=1e-5, atol=1e-5)
        for pa, pb in zip(net.parameters(), net_b.parameters(), strict=True):
            torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-5, atol=1e-6)


def test_a_skipped_call_in_a_window_at_parameters_skips_the_window():
    net, x, ys = make(3)
    bal = RuleAggregator(3, accumulation_steps=2, on_nonfinite="skip").double()
    h = net.trunk(x)
    bal.backward([F.mse_loss(net.heads[i](h), ys[i]) for i in range(3)], net.trunk[2].weight)
    bal.backward(nan_grad_losses(net, (net.trunk(x),) * 3, ys), net.trunk[2].weight)
    assert bal.last_step_skipped and int(bal.num_steps) == 0
    assert torch.equal(bal.weights, torch.ones(3, dtype=torch.float64))
    net.zero_grad()
    net_b = copy.deepcopy(net)
    for m in range(2):  # the next window is whole again
        rows = slice(m * 8, (m + 1) * 8)
        balancer_step(bal, net, x[rows], [y[rows] for y in ys], "W")
    c = literal_window_at_parameters(net_b, x, ys, "W", cosine_rule,
                                     torch.ones(3, dtype=torch.float64), 2)
    torch.testing.assert_close(bal.weights, c, **F64)
    for pa, pb in zip(net.parameters(), net_b.parameters(), strict=True):
        torch.testing.assert_close(pa.grad, pb.grad, **F64)


@pytest.mark.parametrize("where", ["h", "tap-W"])
@pytest.mark.parametrize("way", ["backward", "loss", "loss never backpropagated"])
def test_the_step_keeps_no_reference_to_h(where, way):
    # the hook on h holds the pending step weakly: no cycle h -> hook -> step -> h through
    # autograd's C++ nodes, which the garbage collector could not free (a leak of h a step)
    import gc
    import weakref

    net, x, ys = make(3)
    bal = RuleAggregator(3).double()
    h = net.trunk(x)
    feats = bal.tap(h)
    losses = [F.mse_loss(net.heads[i](feats[i]), ys[i]) for i in range(3)]
    if way == "backward":
        bal.backward(losses, shared_for(net, where, h))
    else:
        total = bal.loss(losses, shared_for(net, where, h))
        if way == "loss":
            total.backward()
        del total
    ref = weakref.ref(h)
    del h, feats, losses
    gc.collect()
    assert ref() is None


@pytest.mark.parametrize("where", ["h", "W"])
def test_caller_divides_leaves_backward_unchanged(where):
    # caller_divides concerns loss() only: backward on such a balancer divides as always
    out = []
    for caller_divides in (False, True):
        net, x, ys = make(3)
        bal = RuleAggregator(3, accumulation_steps=2, caller_divides=caller_divides).double()
        for m in range(4):
            rows = slice((m % 2) * 8, (m % 2 + 1) * 8)
            balancer_step(bal, net, x[rows], [y[rows] for y in ys], where)
        out.append((bal.weights, [p.grad for p in net.parameters()]))
    assert torch.equal(out[0][0], out[1][0])
    for u, v in zip(out[0][1], out[1][1], strict=True):
        assert torch.equal(u, v)
