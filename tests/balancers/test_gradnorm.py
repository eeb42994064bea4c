"""GradNorm against the paper's literal double-backward Algorithm 1, and its invariants."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from literal import LiteralGradNorm, ToyNet
from torch import nn
from torch.nn import functional as F

import lossbalance as lb

SCALES = (1.0, 10.0, 100.0)


def make_problem(num_tasks=3, dtype=torch.float64, seed=0, act=nn.ReLU, scales=SCALES, batch=32):
    torch.manual_seed(seed)
    net = ToyNet(num_tasks, act=act).to(dtype)
    x = torch.randn(batch, 8, dtype=dtype)
    ys = [torch.randn(batch, 4, dtype=dtype) * scales[i % len(scales)] for i in range(num_tasks)]
    return net, x, ys


def shared_of(net, where, h):
    return {
        "W": net.last_shared,
        "Wb": [net.trunk[-2].weight, net.trunk[-2].bias],
        "trunk": list(net.trunk.parameters()),
        "h": None,
    }[where] if h is None else {"W": [net.last_shared],
                                 "Wb": [net.trunk[-2].weight, net.trunk[-2].bias],
                                 "trunk": list(net.trunk.parameters()), "h": [h]}[where]


def literal_like(bal, alpha, lr, dtype, optimizer=torch.optim.Adam):
    """The literal algorithm with the same kind of weights' update as ``bal`` (fused or not:
    the two Adam kernels round differently in the last bit)."""
    fused = {"fused": True} if bal.optimizer.defaults.get("fused") else {}
    return LiteralGradNorm(bal.num_tasks, alpha, lr, optimizer=optimizer, dtype=dtype,
                           optimizer_kwargs=fused)


# float64 agrees with the literal algorithm to ~1e-14 (rounding only); float32 to its rounding
F64 = {"rtol": 1e-10, "atol": 1e-12}
F32 = {"rtol": 1e-5, "atol": 1e-6}


def run_both(path, where, optimizer, dtype, steps=50, act=nn.ReLU, alpha=1.5, lr=0.025,
             batch=32, rtol=None):
    tol = dict(F64 if dtype == torch.float64 else F32)
    if rtol is not None:
        tol["rtol"] = rtol
    weight_atol = 1e-12 if dtype == torch.float64 else 1e-5
    general_path = "batched" if path == "batched" else "loop"
    path = "general" if path == "batched" else path
    net, x, ys = make_problem(dtype=dtype, act=act, batch=batch)
    T = len(ys)
    net_a, net_b = copy.deepcopy(net), copy.deepcopy(net)
    opt_a = torch.optim.SGD(net_a.parameters(), lr=1e-3)
    opt_b = torch.optim.SGD(net_b.parameters(), lr=1e-3)
    bal = lb.GradNorm(T, alpha=alpha, lr=lr, optimizer=optimizer,
                      general_path=general_path).to(dtype)
    lit = literal_like(bal, alpha, lr, dtype, optimizer)
    for _ in range(steps):
        opt_a.zero_grad()
        opt_b.zero_grad()
        h = net_a.trunk(x)
        feats = bal.tap(h) if path == "fast" else (h,) * T
        losses = [F.mse_loss(net_a.heads[i](feats[i]), ys[i]) for i in range(T)]
        shared = (None if path == "fast" else h) if where == "h" else shared_of(net_a, where, None)
        bal.backward(losses, shared=shared)
        hb = net_b.trunk(x)
        losses_b = [F.mse_loss(net_b.heads[i](hb), ys[i]) for i in range(T)]
        g_lit, target_lit = lit.step(losses_b, shared_of(net_b, where, hb))
        torch.testing.assert_close(bal.stats["grad_norm"], g_lit, **tol)
        torch.testing.assert_close(bal.stats["target"], target_lit, **tol)
        for pa, pb in zip(net_a.parameters(), net_b.parameters(), strict=True):
            torch.testing.assert_close(pa.grad, pb.grad, **(F64 if dtype == torch.float64
                                                             else {"rtol": 1e-5, "atol": 1e-5}))
        opt_a.step()
        opt_b.step()
        torch.testing.assert_close(bal.weights, lit.w.detach(), rtol=0, atol=weight_atol)
    for pa, pb in zip(net_a.parameters(), net_b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=0, atol=weight_atol)
    return bal


@pytest.mark.parametrize("optimizer", [torch.optim.SGD, torch.optim.Adam], ids=["sgd", "adam"])
@pytest.mark.parametrize("path,where", [
    ("fast", "W"), ("fast", "Wb"), ("fast", "h"), ("fast", "trunk"),
    ("general", "W"), ("general", "h"), ("general", "trunk"),
    ("batched", "W"), ("batched", "trunk"),
])
def test_matches_literal_algorithm(path, where, optimizer, backend):
    bal = run_both(path, where, optimizer, torch.float64)
    assert not torch.allclose(bal.weights, torch.ones(3, dtype=torch.float64))


@pytest.mark.parametrize("path", ["fast", "general"])
def test_matches_literal_in_float32(path, backend):
    # the C++ update (lossbalance._native) computes the T-vector arithmetic and the Adam
    # step in double and rounds the results once, where the literal rounds every float32
    # operation: the weights differ by ~1e-7, and a weight that falls to 6e-3 here (step 34)
    # turns that into 2.4e-5 relative in G_i = w_i ||grad L_i|| (the weights themselves still
    # agree to 1e-5 absolute below)
    run_both(path, "W", torch.optim.Adam, torch.float32, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_literal_when_the_layer_is_wider_than_the_batch(dtype):
    # batch 8 < 16 inputs of the last shared layer: norms from the batch's Gram matrix
    # in float32 one weight falls to ~2.5e-4 here, where the two runs' ~1e-8 rounding
    # differences in it are 5e-5 relative, and G_i = w_i ||grad L_i|| inherits them (the
    # weights themselves still agree to 1e-5 absolute below)
    run_both("fast", "W", torch.optim.Adam, dtype, batch=8,
             rtol=1e-4 if dtype == torch.float32 else None)


@pytest.mark.parametrize("act", [nn.Tanh, nn.GELU, nn.LeakyReLU], ids=["tanh", "gelu", "leaky"])
def test_matches_literal_with_other_activations(act):
    run_both("fast", "W", torch.optim.Adam, torch.float64, steps=20, act=act)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(24,), (4, 6)], ids=["2d", "sequence"])
def test_matches_literal_on_sequences_and_without_bias(bias, shape):
    # the last shared layer without bias (a plain mm), or applied to [B, L, in] (one matmul
    # over the B*L rows): the fast path's nn.Linear shortcut must hold for both
    torch.manual_seed(2)
    trunk = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 12, bias=bias),
                          nn.ReLU()).double()
    heads = nn.ModuleList(nn.Linear(12, 2) for _ in range(3)).double()
    trunk_b, heads_b = copy.deepcopy(trunk), copy.deepcopy(heads)
    x = torch.randn(*shape, 8, dtype=torch.float64)
    ys = [torch.randn(*shape, 2, dtype=torch.float64) * s for s in SCALES]
    bal = lb.GradNorm(3, alpha=1.5, lr=0.05).double()
    lit = literal_like(bal, 1.5, 0.05, torch.float64)
    for _ in range(20):
        feats = bal.tap(trunk(x))
        bal.backward([F.mse_loss(heads[i](feats[i]), ys[i]) for i in range(3)],
                     shared=trunk[2].weight)
        hb = trunk_b(x)
        g_lit, target_lit = lit.step([F.mse_loss(heads_b[i](hb), ys[i]) for i in range(3)],
                                     [trunk_b[2].weight])
        torch.testing.assert_close(bal.stats["grad_norm"], g_lit, **F64)
        torch.testing.assert_close(bal.stats["target"], target_lit, **F64)
        torch.testing.assert_close(bal.weights, lit.w.detach(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("where", ["W", "h"])
def test_compiled_trunk_and_heads(where):
    # torch.compile'd trunk and heads (compiled apart, so h is between them): the tap's hooks
    # sit on the heads' compiled nodes; norms at W go through the compiled trunk's backward
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU()).double()
    heads = nn.ModuleList(nn.Linear(12, 2) for _ in range(3)).double()
    compiled_trunk = torch.compile(trunk, backend="aot_eager")
    compiled_heads = [torch.compile(head, backend="aot_eager") for head in heads]
    x = torch.randn(20, 8, dtype=torch.float64)
    ys = [torch.randn(20, 2, dtype=torch.float64) * s for s in SCALES]
    bal = lb.GradNorm(3).double()
    for _ in range(3):
        f = bal.tap(compiled_trunk(x))
        bal.backward([F.mse_loss(compiled_heads[i](f[i]), ys[i]) for i in range(3)],
                     shared=trunk[2].weight if where == "W" else None)
        h = trunk(x)
        ref = []
        for i in range(3):
            loss = F.mse_loss(heads[i](h), ys[i]) * bal.stats["weight"][i]
            grad = torch.autograd.grad(loss, trunk[2].weight if where == "W" else h,
                                       retain_graph=True)[0]
            ref.append(grad.norm())
        torch.testing.assert_close(bal.stats["grad_norm"], torch.stack(ref))


class NormTrunk(nn.Module):
    """A trunk whose last layer is not Linear->activation: the generic batched VJP path."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 16)
        self.norm = nn.LayerNorm(16)

    def forward(self, x):
        return self.norm(torch.tanh(self.lin(x))) * 2


@pytest.mark.parametrize("path", ["fast", "general"])
def test_generic_vjp_path_matches_literal(path):
    torch.manual_seed(1)
    trunk = NormTrunk().double()
    heads = nn.ModuleList(nn.Linear(16, 2) for _ in range(3)).double()
    trunk_b, heads_b = copy.deepcopy(trunk), copy.deepcopy(heads)
    x = torch.randn(20, 8, dtype=torch.float64)
    ys = [torch.randn(20, 2, dtype=torch.float64) * s for s in SCALES]
    bal = lb.GradNorm(3, alpha=0.5, lr=0.05).double()
    lit = literal_like(bal, 0.5, 0.05, torch.float64)
    for _ in range(10):
        h = trunk(x)
        feats = bal.tap(h) if path == "fast" else (h,) * 3
        bal.backward([F.mse_loss(heads[i](feats[i]), ys[i]) for i in range(3)],
                     shared=[trunk.lin.weight, trunk.norm.weight])
        hb = trunk_b(x)
        g_lit, target_lit = lit.step([F.mse_loss(heads_b[i](hb), ys[i]) for i in range(3)],
                                     [trunk_b.lin.weight, trunk_b.norm.weight])
        torch.testing.assert_close(bal.stats["grad_norm"], g_lit, **F64)
        torch.testing.assert_close(bal.stats["target"], target_lit, **F64)
        torch.testing.assert_close(bal.weights, lit.w.detach(), rtol=0, atol=1e-12)


def test_model_gradient_is_weighted_sum_with_weights_of_the_step():
    net, x, ys = make_problem()
    bal = lb.GradNorm(3, alpha=1.0)
    bal = bal.double()
    for _ in range(3):  # move the weights away from 1 first
        net.zero_grad()
        f = bal.tap(net.trunk(x))
        bal.backward([F.mse_loss(net.heads[i](f[i]), ys[i]) for i in range(3)], net.last_shared)
    w = bal.weights
    net.zero_grad()
    f = bal.tap(net.trunk(x))
    losses = [F.mse_loss(net.heads[i](f[i]), ys[i]) for i in range(3)]
    total = bal.backward(losses, shared=net.last_shared)
    got = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    h = net.trunk(x)
    ref_losses = [F.mse_loss(net.heads[i](h), ys[i]) for i in range(3)]
    (torch.stack(ref_losses) @ w).backward()
    for g, p in zip(got, net.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad, rtol=1e-12, atol=1e-12)
    assert not total.requires_grad
    torch.testing.assert_close(total, (torch.stack(ref_losses) @ w).detach())
    assert not torch.equal(bal.weights, w)  # the weights moved after the model's gradient


def test_losses_as_dict_and_tensor():
    net, x, ys = make_problem()
    names = ["a", "b", "c"]
    bal_list = lb.GradNorm(3).double()
    bal_dict = lb.GradNorm(3, task_names=names).double()
    bal_vec = lb.GradNorm(3).double()
    for _ in range(5):
        for bal, form in ((bal_list, "list"), (bal_dict, "dict"), (bal_vec, "vec")):
            f = bal.tap(net.trunk(x))
            losses = [F.mse_loss(net.heads[i](f[i]), ys[i]) for i in range(3)]
            arg = {"list": losses, "dict": dict(zip(names, losses, strict=True)),
                   "vec": torch.stack(losses)}[form]
            net.zero_grad()
            bal.backward(arg, shared=net.last_shared)
    torch.testing.assert_close(bal_list.weights, bal_dict.weights, rtol=0, atol=0)
    torch.testing.assert_close(bal_list.weights, bal_vec.weights, rtol=0, atol=0)


def test_initial_losses_argument_is_used():
    net, x, ys = make_problem()
    bal = lb.GradNorm(3, initial_losses=[1.0, 2.0, 3.0]).double()
    f = bal.tap(net.trunk(x))
    losses = [F.mse_loss(net.heads[i](f[i]), ys[i]) for i in range(3)]
    bal.backward(losses, net.last_shared)
    values = torch.stack([loss.detach() for loss in losses])
    torch.testing.assert_close(bal.stats["loss_ratio"], values / torch.tensor([1.0, 2.0, 3.0],
                                                                             dtype=values.dtype))


def train(bal, steps, scales=SCALES, seed=0, num_tasks=3, lr_model=1e-3, where="W"):
    net, x, ys = make_problem(num_tasks, torch.float64, seed=seed, scales=scales)
    opt = torch.optim.SGD(net.parameters(), lr=lr_model)
    for _ in range(steps):
        opt.zero_grad()
        f = bal.tap(net.trunk(x))
        bal.backward([F.mse_loss(net.heads[i](f[i]), ys[i]) for i in range(num_tasks)],
                     shared=net.last_shared if where == "W" else None)
        opt.step()
    return bal


def test_alpha_zero_drives_gradient_norms_together():
    bal = train(lb.GradNorm(3, alpha=0.0, lr=0.01).double(), steps=300)
    g = bal.stats["grad_norm"]
    first = lb.GradNorm(3, alpha=0.0).double()
    train(first, steps=1)
    spread0 = (first.stats["grad_norm"].max() / first.stats["grad_norm"].min()).item()
    spread = (g.max() / g.min()).item()
    assert spread0 > 50  # the tasks start far apart (loss scales 1, 10, 100)
    assert spread < 1.2, spread


def test_loss_a_million_times_larger_does_not_collapse_weights():
    bal = lb.GradNorm(2, alpha=1.5, lr=0.025).double()
    net, x, ys = make_problem(2, scales=(1.0, 1.0))
    opt = torch.optim.SGD(net.parameters(), lr=1e-9)
    for _ in range(1000):
        opt.zero_grad()
        f = bal.tap(net.trunk(x))
        losses = [F.mse_loss(net.heads[0](f[0]), ys[0]),
                  1e6 * F.mse_loss(net.heads[1](f[1]), ys[1])]
        bal.backward(losses, shared=net.last_shared)
        opt.step()
        w = bal.weights
        assert torch.isfinite(w).all() and (w > 0).all(), w
        torch.testing.assert_close(w.sum(), torch.tensor(2.0, dtype=w.dtype))
    assert w[0] > 1.9 and w[1] < 0.1, w


@settings(max_examples=15, deadline=None)
@given(perm=st.permutations(range(4)), seed=st.integers(0, 10_000),
       alpha=st.sampled_from([0.0, 0.5, 1.5]))
def test_permuting_tasks_permutes_weights(perm, seed, alpha):
    scales = (1.0, 3.0, 10.0, 30.0)
    bal_a = train(lb.GradNorm(4, alpha=alpha).double(), 15, scales=scales, seed=seed,
                  num_tasks=4)
    torch.manual_seed(seed)
    net = ToyNet(4).double()
    x = torch.randn(32, 8, dtype=torch.float64)
    ys = [torch.randn(32, 4, dtype=torch.float64) * scales[i] for i in range(4)]
    bal_b = lb.GradNorm(4, alpha=alpha).double()
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    for _ in range(15):
        opt.zero_grad()
        f = bal_b.tap(net.trunk(x))
        losses = [F.mse_loss(net.heads[i](f[j]), ys[i]) for j, i in enumerate(perm)]
        bal_b.backward(losses, shared=net.last_shared)
        opt.step()
    torch.testing.assert_close(bal_b.weights, bal_a.weights[list(perm)], rtol=1e-9, atol=1e-9)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), alpha=st.floats(0, 3), lr=st.floats(1e-3, 0.5),
       log_scales=st.lists(st.floats(-3, 3), min_size=2, max_size=5),
       where=st.sampled_from(["W", "h"]))
def test_weights_positive_and_sum_to_num_tasks(seed, alpha, lr, log_scales, where):
    scales = tuple(10.0 ** s for s in log_scales)
    T = len(scales)
    bal = lb.GradNorm(T, alpha=alpha, lr=lr).double()
    net, x, ys = make_problem(T, seed=seed, scales=scales)
    for _ in range(20):
        net.zero_grad()
        f = bal.tap(net.trunk(x))
        bal.backward([F.mse_loss(net.heads[i](f[i]), ys[i]) for i in range(T)],
                     shared=net.last_shared if where == "W" else None)
        w = bal.weights
        assert (w > 0).all(), w
        torch.testing.assert_close(w.sum(), torch.tensor(float(T), dtype=w.dtype))


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), big=st.integers(0, 2))
def test_task_scaled_up_100x_ends_with_smallest_weight(seed, big):
    scales = [1.0, 1.0, 1.0]
    scales[big] = 100.0  # targets 100x larger: its MSE (and gradient) is far larger
    bal = train(lb.GradNorm(3, alpha=0.5, lr=0.025).double(), 200, scales=tuple(scales),
                seed=seed)
    assert int(bal.weights.argmin()) == big, bal.weights


def test_state_dict_round_trip_resumes_bit_exactly(tmp_path):
    net, x, ys = make_problem()
    bal = lb.GradNorm(3, alpha=1.5).double()

    def steps(b, model, n):
        trace = []
        for _ in range(n):
            model.zero_grad()
            f = b.tap(model.trunk(x))
            b.backward([F.mse_loss(model.heads[i](f[i]), ys[i]) for i in range(3)],
                       shared=model.last_shared)
            trace.append(b.weights)
        return torch.stack(trace)

    steps(bal, net, 10)
    path = tmp_path / "bal.pt"
    torch.save(bal.state_dict(), path)
    net2 = copy.deepcopy(net)
    resumed = lb.GradNorm(3, alpha=1.5).double()
    resumed.load_state_dict(torch.load(path, weights_only=False))
    assert int(resumed.num_steps) == 10
    torch.testing.assert_close(resumed.initial_losses, bal.initial_losses, rtol=0, atol=0)
    a = steps(bal, net, 10)
    b = steps(resumed, net2, 10)
    assert torch.equal(a, b)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("where", ["W", "h"])
def test_copied_or_pickled_balancer_carries_on_like_the_original(tmp_path, how, where):
    # a copy must not share the original's hooks (they would report to the original), and
    # torch.save(bal) pickles the whole object
    net, x, ys = make_problem()
    bal = lb.GradNorm(3, alpha=1.5).double()
    shared = net.last_shared if where == "W" else None

    def steps(b, n):
        trace = []
        for _ in range(n):
            f = b.tap(net.trunk(x))
            b.backward([F.mse_loss(net.heads[i](f[i]), ys[i]) for i in range(3)],
                       shared=shared)
            trace.append(b.weights)
        return torch.stack(trace)

    steps(bal, 3)
    if how == "deepcopy":
        other = copy.deepcopy(bal)
    else:
        torch.save(bal, tmp_path / "bal.pt")
        other = torch.load(tmp_path / "bal.pt", weights_only=False)
    assert torch.equal(steps(other, 3), steps(bal, 3))


def test_state_dict_is_a_snapshot():
    _net, _x, _ys = make_problem()
    bal = train(lb.GradNorm(3).double(), 3)
    sd = bal.state_dict()
    saved = copy.deepcopy(sd)
    train(bal, 3)
    exp_avg = sd["_extra_state"]["optimizer"]["state"][0]["exp_avg"]
    assert torch.equal(exp_avg, saved["_extra_state"]["optimizer"]["state"][0]["exp_avg"])


def test_to_dtype_moves_weights_and_optimizer_state():
    bal = train(lb.GradNorm(3).double(), 3)
    optimizer = bal.optimizer
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    bal.float()
    assert bal.optimizer is optimizer  # a scheduler made before .to() still drives it
    assert bal.task_weights.dtype == torch.float32
    state = bal.optimizer.state_dict()["state"][0]
    assert state["exp_avg"].dtype == torch.float32
    assert bal.optimizer.param_groups[0]["params"][0] is bal.task_weights
    train(bal.double(), 1)  # steps through the scheduler's wrapper of optimizer.step
    scheduler.step()
    assert bal.optimizer.param_groups[0]["lr"] == pytest.approx(0.0125)


def test_stats_are_detached_tensors():
    bal = train(lb.GradNorm(3).double(), 2)
    assert set(bal.stats) == {"weight", "grad_norm", "target", "loss_ratio", "inverse_rate",
                              "gradnorm_loss"}
    for value in bal.stats.values():
        assert isinstance(value, torch.Tensor) and not value.requires_grad


def test_other_balancers_tap_is_identity():
    h = torch.randn(3, 2, requires_grad=True)
    feats = lb.EqualWeighting(2).tap(h)
    assert feats[0] is h and feats[1] is h


class _AdamViaStep(torch.optim.Adam):
    """torch.optim.Adam under another type: the balancer then always calls ``step()``."""


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kwargs", [{}, {"fused": False}, {"betas": (0.5, 0.9), "eps": 1e-3},
                                    {"betas": (0.5, 0.9), "eps": 1e-3, "fused": False},
                                    {"amsgrad": True}, {"weight_decay": 0.1}, {"maximize": True}],
                         ids=["default", "single-tensor", "betas", "betas-single-tensor",
                              "amsgrad", "decay", "maximize"])
def test_adam_shortcut_equals_optimizer_step_bit_for_bit(dtype, kwargs, python_only):
    def run(optimizer, kwargs):
        bal = lb.GradNorm(3, alpha=1.5, optimizer=optimizer, optimizer_kwargs=kwargs).to(dtype)
        net, x, ys = make_problem(dtype=dtype)
        trace = []
        for step in range(30):
            if step == 15:  # a scheduler-style change of the learning rate mid-run
                bal.optimizer.param_groups[0]["lr"] = 0.01
            net.zero_grad()
            f = bal.tap(net.trunk(x))
            bal.backward([F.mse_loss(net.heads[i](f[i]), ys[i]) for i in range(3)],
                         shared=net.last_shared)
            trace.append(bal.weights)
        return torch.stack(trace), bal.optimizer.state_dict()["state"][0], bal.optimizer

    weights_a, state_a, opt_a = run(torch.optim.Adam, kwargs)
    # Adam is fused unless told otherwise; the subclass (whose step() always runs) is not
    assert opt_a.defaults["fused"] is kwargs.get("fused", True)
    weights_b, state_b, _ = run(_AdamViaStep, {"fused": opt_a.defaults["fused"], **kwargs})
    assert torch.equal(weights_a, weights_b)
    for key in state_b:
        assert torch.equal(state_a[key], state_b[key]), key


def test_adam_step_hooks_still_run():
    bal = lb.GradNorm(3)
    calls = []
    bal.optimizer.register_step_post_hook(lambda opt, args, kwargs: calls.append(1))
    train(bal.double(), 4)
    assert len(calls) == 4
