"""Every bad input gets a clear error, raised before any state changes."""

from __future__ import annotations

import copy

import pytest
import torch
from literal import ToyNet
from torch import nn
from torch.nn import functional as F

import lossbalance as lb
from lossbalance._checks import first_nonfinite

T = 3


@pytest.fixture
def setup():
    torch.manual_seed(0)
    net = ToyNet(T).double()
    x = torch.randn(16, 8, dtype=torch.float64)
    ys = [torch.randn(16, 4, dtype=torch.float64) * s for s in (1, 10, 100)]
    bal = lb.GradNorm(T, alpha=1.5, task_names=["a", "b", "c"]).double()
    for _ in range(3):  # give it L(0), optimizer state and moved weights
        f = bal.tap(net.trunk(x))
        bal.backward([F.mse_loss(net.heads[i](f[i]), ys[i]) for i in range(T)], net.last_shared)
    return net, x, ys, bal


def snapshot(net, bal):
    return copy.deepcopy(bal.state_dict()), [
        None if p.grad is None else p.grad.clone() for p in net.parameters()
    ]


def assert_unchanged(net, bal, snap):
    state, grads = snap
    now = bal.state_dict()
    for key in ("task_weights", "initial_losses", "num_steps"):
        torch.testing.assert_close(now[key], state[key], rtol=0, atol=0, equal_nan=True)
    opt_now = now["_extra_state"]["optimizer"]["state"]
    opt_then = state["_extra_state"]["optimizer"]["state"]
    assert opt_now.keys() == opt_then.keys()
    for k in opt_then:
        for key in opt_then[k]:
            assert torch.equal(torch.as_tensor(opt_now[k][key]),
                               torch.as_tensor(opt_then[k][key])), key
    assert now["_extra_state"]["initialized"] == state["_extra_state"]["initialized"]
    for p, g in zip(net.parameters(), grads, strict=True):
        assert (p.grad is None and g is None) or torch.equal(p.grad, g)


def assert_refused(net, bal, losses, match, error=ValueError, **kwargs):
    """``bal.backward(losses, **kwargs)`` raises ``error`` and changes nothing."""
    snap = snapshot(net, bal)
    with pytest.raises(error, match=match):
        bal.backward(losses, **kwargs)
    assert_unchanged(net, bal, snap)


def losses_for(net, x, ys, feats):
    return [F.mse_loss(net.heads[i](feats[i]), ys[i]) for i in range(T)]


@pytest.mark.parametrize("make_losses,shared,error,match", [
    (lambda L: L[:2], "W", ValueError, "expected 3 losses, got 2"),
    (lambda L: {"a": L[0], "b": L[1], "z": L[2]}, "W", ValueError, r"missing \['c'\]"),
    (lambda L: [L[0], L[1], torch.stack([L[2], L[2]])], "W", ValueError,
     r"task 2 \('c'\) must be a scalar"),
    (lambda L: [L[0], L[1], L[2].detach()], "W", ValueError, r"task 2 \('c'\) does not require"),
    (lambda L: [L[0], L[1], 3.0], "W", TypeError, "must be a tensor"),
    (lambda L: "abc", "W", TypeError, "losses must be"),
    (lambda L: torch.stack(L).reshape(3, 1), "W", ValueError, "must be 1-D"),
    (lambda L: L, "notparam", ValueError, r"shared\[0\] does not require grad"),
    (lambda L: L, "outside", ValueError, r"shared\[0\] is outside the graph"),
    (lambda L: [L[0], L[1], L[2] * float("nan")], "W", ValueError, r"task 2 \('c'\) is nan"),
    (lambda L: [L[0], L[1] + float("inf"), L[2]], "W", ValueError, r"task 1 \('b'\) is inf"),
])
def test_bad_losses_raise_and_change_nothing(setup, make_losses, shared, error, match):
    net, x, ys, bal = setup
    net.zero_grad()
    f = bal.tap(net.trunk(x))
    losses = make_losses(losses_for(net, x, ys, f))
    shared_arg = {
        "W": net.last_shared,
        "notparam": torch.zeros(3),
        "outside": nn.Linear(2, 2).weight,
    }[shared]
    assert_refused(net, bal, losses, match, error, shared=shared_arg)


def test_task_not_using_the_tap_is_an_error(setup):
    net, x, ys, bal = setup
    h = net.trunk(x)
    f = bal.tap(h)
    losses = losses_for(net, x, ys, f)
    losses[1] = F.mse_loss(net.heads[1](net.trunk(x)), ys[1])  # head 1 on another forward
    assert_refused(net, bal, losses, r"task 1 \('b'\) does not reach the tapped",
                   shared=net.last_shared)


def test_tasks_sharing_an_operation_on_the_tap_is_an_error(setup):
    net, x, ys, bal = setup
    h = net.trunk(x)
    f = bal.tap(h)
    doubled = f[0] * 2  # heads 0 and 2 both read this: not separable at h
    losses = losses_for(net, x, ys, f)
    losses[0] = F.mse_loss(net.heads[0](doubled), ys[0])
    losses[2] = F.mse_loss(net.heads[2](doubled), ys[2])
    assert_refused(net, bal, losses, r"task 0 \('a'\) and task 2 \('c'\) share an",
                   shared=net.last_shared)


def test_path_around_the_tap_to_shared_is_an_error(setup):
    net, x, ys, bal = setup
    z = net.trunk[:-1](x)  # the last shared layer's output before its activation
    f = bal.tap(net.trunk[-1](z))
    losses = losses_for(net, x, ys, f)
    losses[1] = losses[1] + z.pow(2).mean()  # task 1 also reads z: a path to W around h
    assert_refused(net, bal, losses, r"task 1 \('b'\) reaches shared\[0\] by a path",
                   shared=net.last_shared)
    # without the tap the same losses are measured exactly at W
    net.zero_grad()
    z = net.trunk[:-1](x)
    losses = losses_for(net, x, ys, (net.trunk[-1](z),) * T)
    losses[1] = losses[1] + z.pow(2).mean()
    bal.backward(losses, shared=net.last_shared)


def test_task_not_reaching_shared_general_path(setup):
    net, x, ys, bal = setup
    h = net.trunk(x)
    losses = losses_for(net, x, ys, (h,) * T)
    losses[2] = F.mse_loss(net.heads[2](torch.randn(16, 16, dtype=torch.float64)), ys[2])
    assert_refused(net, bal, losses, r"task 2 \('c'\) does not reach any of the shared",
                   shared=net.last_shared)


def test_shared_none_without_tap_is_an_error(setup):
    net, x, ys, bal = setup
    h = net.trunk(x)
    assert_refused(net, bal, losses_for(net, x, ys, (h,) * T), r"call feats = bal\.tap")


@pytest.mark.parametrize("shared,error,match", [
    ([], ValueError, r"shared is empty: pass None"),
    (nn.ReLU(), ValueError, r"shared=ReLU\(\.\.\.\) has no parameters that require grad"),
    (3.0, TypeError, r"shared must be a tensor, an nn.Module, a list of tensors or None, got "
                     "float"),
    ([torch.zeros(2), "W"], TypeError, r"shared\[1\] must be a tensor, got str"),
])
@pytest.mark.parametrize("path", ["fast", "general"])
def test_bad_shared_is_an_error(setup, path, shared, error, match):
    net, x, ys, bal = setup
    h = net.trunk(x)
    feats = bal.tap(h) if path == "fast" else (h,) * T
    assert_refused(net, bal, losses_for(net, x, ys, feats), match, error, shared=shared)


@pytest.mark.parametrize("path", ["fast", "general"])
def test_shared_module_means_its_trainable_parameters(setup, path):
    net, x, ys, bal = setup
    other = copy.deepcopy(bal)
    layer = net.trunk[-2]

    def feats(b):
        h = net.trunk(x)
        return b.tap(h) if path == "fast" else (h,) * T

    for b, shared in ((bal, layer), (other, [layer.weight, layer.bias])):
        b.backward(losses_for(net, x, ys, feats(b)), shared=shared)
    assert torch.equal(bal.stats["grad_norm"], other.stats["grad_norm"])
    layer.bias.requires_grad_(False)  # a frozen parameter is left out
    for b, shared in ((bal, layer), (other, [layer.weight])):
        b.backward(losses_for(net, x, ys, feats(b)), shared=shared)
    assert torch.equal(bal.stats["grad_norm"], other.stats["grad_norm"])


def test_stale_tap_is_an_error(setup):
    net, x, ys, bal = setup
    bal.tap(net.trunk(x))  # tapped, then not used by the heads
    with pytest.raises(ValueError, match=r"task 0 \('a'\) does not reach the tapped"):
        bal.backward(losses_for(net, x, ys, (net.trunk(x),) * T), net.last_shared)
    # A tap serves one step only: the next call without a new tap takes the general path.
    bal.backward(losses_for(net, x, ys, (net.trunk(x),) * T), net.last_shared)
    assert int(bal.num_steps) == 4


@pytest.mark.parametrize("alpha", [1.5, 0.0])
def test_nonpositive_initial_loss(alpha):
    torch.manual_seed(0)
    net = ToyNet(T).double()
    x = torch.randn(16, 8, dtype=torch.float64)
    bal = lb.GradNorm(T, alpha=alpha).double()
    f = bal.tap(net.trunk(x))
    losses = [net.heads[i](f[i]).mean() * 0 for i in range(T)]  # L_i(0) = 0
    losses[0] = losses[0] + 1.0
    if alpha > 0:
        assert_refused(net, bal, losses, r"L_i\(0\) of task 1 is -?0.0: loss ratios",
                       shared=net.last_shared)
        assert not bal._initialized
    else:
        bal.backward(losses, net.last_shared)  # alpha = 0 needs no ratios
        assert torch.isfinite(bal.weights).all()


def test_negative_initial_losses_argument():
    with pytest.raises(ValueError, match=r"initial_losses of task 1 is -1.0"):
        lb.GradNorm(3, initial_losses=[1.0, -1.0, 2.0])
    with pytest.raises(ValueError, match="initial_losses has 2 values"):
        lb.GradNorm(3, initial_losses=[1.0, 2.0])


@pytest.mark.parametrize("kwargs,match", [
    ({"num_tasks": 1}, "num_tasks must be >= 2, got 1"),
    ({"num_tasks": 2.0}, "num_tasks must be an int"),
    ({"num_tasks": 3, "alpha": -0.1}, "alpha must be >= 0, got -0.1"),
    ({"num_tasks": 3, "alpha": float("nan")}, "alpha must be a finite number"),
    ({"num_tasks": 3, "lr": 0.0}, "lr must be > 0, got 0.0"),
    ({"num_tasks": 3, "lr": -1}, "lr must be > 0, got -1"),
    ({"num_tasks": 3, "on_nonfinite": "ignore"}, "on_nonfinite must be one of"),
    ({"num_tasks": 3, "task_names": ["a", "a", "b"]}, "task_names must be distinct"),
    ({"num_tasks": 3, "task_names": ["a", "b"]}, "task_names has 2 names"),
    ({"num_tasks": 3, "min_weight": 0}, "min_weight must be > 0"),
    ({"num_tasks": 3, "general_path": "fast"}, "general_path must be"),
    ({"num_tasks": 3, "chunk": 0}, "chunk must be None or an int >= 1, got 0"),
    ({"num_tasks": 3, "optimizer_kwargs": {"nonsense": 1}}, "could not build the weights"),
])
def test_bad_gradnorm_arguments(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        lb.GradNorm(**kwargs)


@pytest.mark.parametrize("make,match", [
    (lambda: lb.EqualWeighting(1), "num_tasks must be >= 2"),
    (lambda: lb.StaticWeighting([1.0, 0.0]), r"weight of task 1 is 0.0"),
    (lambda: lb.StaticWeighting([1.0, float("inf")]), r"weight of task 1 is inf"),
    (lambda: lb.UncertaintyWeighting(2, ["regression", "ranking"]), "task type of task 1"),
    (lambda: lb.UncertaintyWeighting(2, ["regression"]), "task_types has 1 entries"),
    (lambda: lb.DynamicTaskPrioritization(2, gamma=-1), "gamma must be >= 0"),
    (lambda: lb.DynamicTaskPrioritization(2, kpi_decay=1.0), r"kpi_decay must be in \[0, 1\)"),
])
def test_bad_arguments_of_other_balancers(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def _inf_grad_losses(net, x, ys, feats):
    losses = losses_for(net, x, ys, feats)
    u = net.heads[1](feats[1])
    # sqrt at 0: a finite loss (0 added) whose gradient is infinite.
    losses[1] = losses[1] + torch.sqrt(u[0, 0] - u[0, 0].detach())
    return losses


def test_nonfinite_gradient_norm_general_path_raises_before_backward(setup):
    net, x, ys, bal = setup
    net.zero_grad()
    h = net.trunk(x)
    losses = _inf_grad_losses(net, x, ys, (h,) * T)
    assert_refused(net, bal, losses, r"gradient norm of task 1 \('b'\) is (inf|nan)",
                   shared=net.last_shared)


def test_nonfinite_gradient_norm_fast_path_leaves_balancer_untouched(setup):
    net, x, ys, bal = setup
    net.zero_grad()
    f = bal.tap(net.trunk(x))
    losses = _inf_grad_losses(net, x, ys, f)
    state = copy.deepcopy(bal.state_dict())
    with pytest.raises(ValueError, match=r"gradient norm of task 1 \('b'\).*already holds"):
        bal.backward(losses, shared=net.last_shared)
    assert torch.equal(bal.task_weights, state["task_weights"])
    assert torch.equal(bal.num_steps, state["num_steps"])


@pytest.mark.parametrize("path", ["fast", "general"])
def test_skip_mode_skips_nonfinite_steps(setup, path):
    net, x, ys, _ = setup
    bal = lb.GradNorm(T, on_nonfinite="skip").double()
    f = bal.tap(net.trunk(x))
    bal.backward(losses_for(net, x, ys, f), net.last_shared)
    net.zero_grad()
    h = net.trunk(x)
    feats = bal.tap(h) if path == "fast" else (h,) * T
    snap = snapshot(net, bal)
    bal.backward(_inf_grad_losses(net, x, ys, feats), shared=net.last_shared)
    assert bal.last_step_skipped
    state, _grads = snap
    assert torch.equal(bal.task_weights, state["task_weights"])
    assert torch.equal(bal.num_steps, state["num_steps"])
    if path == "general":
        assert_unchanged(net, bal, snap)
    # non-finite losses are skipped before any backward, on both paths
    feats = bal.tap(net.trunk(x)) if path == "fast" else (net.trunk(x),) * T
    losses = losses_for(net, x, ys, feats)
    losses[0] = losses[0] * float("inf")
    net.zero_grad()
    snap = snapshot(net, bal)
    total = bal.backward(losses, shared=net.last_shared)
    assert bal.last_step_skipped and not torch.isfinite(total)
    assert_unchanged(net, bal, snap)
    # and a good step afterwards is not skipped
    f = bal.tap(net.trunk(x))
    bal.backward(losses_for(net, x, ys, f), net.last_shared)
    assert not bal.last_step_skipped
    assert int(bal.num_steps) == 2


def test_kpis_outside_unit_interval():
    torch.manual_seed(0)
    net = ToyNet(2).double()
    x = torch.randn(4, 8, dtype=torch.float64)
    bal = lb.DynamicTaskPrioritization(2, task_names=["seg", "depth"])
    h = net.trunk(x)
    losses = [net.heads[i](h).pow(2).mean() for i in range(2)]
    state = copy.deepcopy(bal.state_dict())
    with pytest.raises(ValueError, match=r"kpi of task 1 \('depth'\) is 1.5, outside \[0, 1\]"):
        bal.backward(losses, kpis=[0.5, 1.5])
    with pytest.raises(ValueError, match="needs kpis="):
        bal.backward(losses)
    with pytest.raises(ValueError, match="expected 2 kpis, got 3"):
        bal.backward(losses, kpis=[0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match=r"kpi of task 0 \('seg'\) is nan"):
        bal.backward(losses, kpis=torch.tensor([float("nan"), 0.5]))
    for key, value in state.items():
        assert torch.equal(bal.state_dict()[key], value)
    assert all(p.grad is None for p in net.parameters())


def test_unexpected_keyword_is_an_error(setup):
    net, x, ys, _ = setup
    bal = lb.EqualWeighting(T)
    h = net.trunk(x)
    with pytest.raises(TypeError, match=r"unexpected arguments \['kpis'\]"):
        bal.backward(losses_for(net, x, ys, (h,) * T), kpis=[0.1, 0.2, 0.3])


def test_dict_losses_need_task_names(setup):
    net, x, ys, _ = setup
    bal = lb.GradNorm(T).double()
    f = bal.tap(net.trunk(x))
    losses = losses_for(net, x, ys, f)
    with pytest.raises(TypeError, match="built without task_names"):
        bal.backward(dict(zip("abc", losses, strict=True)), net.last_shared)


def test_tap_needs_grad():
    with pytest.raises(ValueError, match="h does not require grad"):
        lb.GradNorm(2).tap(torch.zeros(3))


def test_first_nonfinite_tells_an_overflowing_sum_from_a_nonfinite_entry():
    assert first_nonfinite(torch.tensor([3e38, 3e38])) is None  # the sum overflows
    assert first_nonfinite(torch.tensor([1.0, 2.0])) is None
    assert first_nonfinite(torch.tensor([1.0, float("nan"), float("inf")])) == 1
    assert first_nonfinite(torch.tensor([float("-inf"), 1.0], dtype=torch.float16)) == 0
    assert first_nonfinite(torch.tensor([6e4, 6e4], dtype=torch.float16)) is None
