"""GradNorm's C++ step (lossbalance._native) against the Python code it replaces.

The capture (graph walk and hooks) runs the same ATen operations as the Python hooks, so its
norms are equal bit for bit; the update (T-vector arithmetic, Adam, renormalisation) is one
loop in double precision, equal to the Python code's up to float rounding.
"""

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import lossbalance as lb
from lossbalance import _native
from lossbalance._graph import consumers_of, edges_of
from lossbalance._taps import Capture, Workspace, linear_pattern


@pytest.fixture(autouse=True)
def _native_enabled(request, monkeypatch):
    # the C++ step is opt-in: these tests turn it on, unless they run on both steps
    if "backend" not in request.fixturenames:
        monkeypatch.setattr(_native, "_requested", False)
        monkeypatch.setenv("LOSSBALANCE_NATIVE", "1")


def test_module_builds_here():
    # CI runs on a machine with a C++ compiler: the build must work there, not fall back
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module = _native.load()
    assert module is not None
    assert hasattr(module, "NativeCapture") and hasattr(module, "gradnorm_update")


class Net(nn.Module):
    def __init__(self, act=nn.ReLU, tasks=4, reads=1, dtype=torch.float64, width=12):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(6, width), nn.Tanh(), nn.Linear(width, width), act())
        self.heads = nn.ModuleList(nn.Linear(width, 2) for _ in range(tasks))
        self.reads = reads
        self.to(dtype)

    def losses(self, feats, ys):
        out = []
        for i, head in enumerate(self.heads):
            pred = head(feats[i])
            if self.reads == 2:  # a head that reads h in two places
                pred = pred + head(feats[i] * 0.5)
            out.append(F.mse_loss(pred, ys[i]) * (i + 1))
        return out


def train(native, *, act=nn.ReLU, where="W", tasks=4, reads=1, chunk=None, seq=False,
          dtype=torch.float64, steps=25, monkeypatch=None, kwargs=None):
    """Weights, stats and model gradients of every step, with the C++ step on or off."""
    if native is not None:  # None: as the environment says
        monkeypatch.setenv("LOSSBALANCE_NATIVE", "1" if native else "0")
    torch.manual_seed(0)
    net = Net(act, tasks, reads, dtype)
    shape = (4, 5, 6) if seq else (20, 6)
    x = torch.randn(*shape, dtype=dtype)
    ys = [torch.randn(*shape[:-1], 2, dtype=dtype) for _ in range(tasks)]
    bal = lb.GradNorm(tasks, alpha=1.5, chunk=chunk, **(kwargs or {})).to(dtype)
    opt = torch.optim.SGD(net.parameters(), lr=1e-2)
    trace = []
    for _ in range(steps):
        opt.zero_grad()
        feats = bal.tap(net.trunk(x))
        shared = {"W": net.trunk[2].weight, "h": None}[where]
        total = bal.backward(net.losses(feats, ys), shared=shared)
        trace.append({"total": total, "weights": bal.weights,
                      **{k: v.clone() for k, v in bal.stats.items()},
                      "grads": torch.cat([p.grad.flatten() for p in net.parameters()])})
        opt.step()
    return trace, bal


CASES = {
    "h": {"where": "h"},
    "W-relu": {},
    "W-tanh": {"act": nn.Tanh},  # the activation's Jacobian kept
    "W-identity": {"act": nn.Identity},  # no activation
    "W-chunk1": {"chunk": 1},
    "W-chunk3": {"chunk": 3},  # a last chunk of one
    "W-sequence": {"seq": True},  # nn.Linear on [B, L, in]
    "h-two-reads": {"where": "h", "reads": 2},
    "W-two-reads": {"reads": 2},
    "W-T2": {"tasks": 2},
}


@pytest.mark.parametrize("case", list(CASES))
def test_native_step_equals_python_step(case, monkeypatch):
    native, bal_n = train(True, monkeypatch=monkeypatch, **CASES[case])
    python, bal_p = train(False, monkeypatch=monkeypatch, **CASES[case])
    assert bal_n._capture._native is not None and bal_p._capture._native is None
    # step 0: the model's gradient and the total are the same operations: equal bit for
    # bit; so are the norms at W (delta_i element-wise, then the same matmul and norm),
    # while a norm at h is the C++ loop's double-precision sum of squares
    for key in ("grads", "total"):
        assert torch.equal(native[0][key], python[0][key]), key
    if CASES[case].get("where", "W") == "W":
        assert torch.equal(native[0]["grad_norm"], python[0]["grad_norm"])
    # later steps: the weights' update rounds differently (double against float64 ops)
    for a, b in zip(native, python, strict=True):
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-12, atol=1e-13, msg=key)
    assert not torch.allclose(bal_n.weights, torch.ones(bal_n.num_tasks, dtype=torch.float64))
    state_n, state_p = bal_n.state_dict(), bal_p.state_dict()
    torch.testing.assert_close(state_n["num_steps"], state_p["num_steps"])
    opt_n = state_n["_extra_state"]["optimizer"]["state"][0]
    opt_p = state_p["_extra_state"]["optimizer"]["state"][0]
    for key in ("step", "exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(opt_n[key], opt_p[key], rtol=1e-12, atol=1e-15)


def test_native_step_in_float32_agrees_to_float_rounding(monkeypatch):
    native, _ = train(True, dtype=torch.float32, steps=40, monkeypatch=monkeypatch)
    python, _ = train(False, dtype=torch.float32, steps=40, monkeypatch=monkeypatch)
    for a, b in zip(native, python, strict=True):
        torch.testing.assert_close(a["weights"], b["weights"], rtol=0, atol=1e-6)
        torch.testing.assert_close(a["grad_norm"], b["grad_norm"], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kwargs", [{}, {"betas": (0.5, 0.9), "eps": 1e-3}],
                         ids=["default", "betas"])
def test_native_adam_follows_torch_adam(kwargs, monkeypatch):
    # the native loop against torch.optim.Adam's own step (a subclass, so that the balancer
    # calls step()), a learning-rate change mid-run included
    class AdamViaStep(torch.optim.Adam):
        pass

    def run(optimizer):
        monkeypatch.setenv("LOSSBALANCE_NATIVE", "1")
        torch.manual_seed(0)
        net = Net()
        x, ys = torch.randn(20, 6, dtype=torch.float64), [
            torch.randn(20, 2, dtype=torch.float64) for _ in range(4)]
        bal = lb.GradNorm(4, alpha=1.5, optimizer=optimizer,
                          optimizer_kwargs={"fused": True, **kwargs}).double()
        trace = []
        for step in range(30):
            if step == 15:
                bal.optimizer.param_groups[0]["lr"] = 0.01
            net.zero_grad()
            feats = bal.tap(net.trunk(x))
            bal.backward(net.losses(feats, ys), shared=net.trunk[2].weight)
            trace.append(bal.weights)
        return torch.stack(trace), bal.optimizer.state_dict()["state"][0]

    weights_a, state_a = run(torch.optim.Adam)
    weights_b, state_b = run(AdamViaStep)
    torch.testing.assert_close(weights_a, weights_b, rtol=1e-12, atol=1e-14)
    for key in ("step", "exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(state_a[key], state_b[key], rtol=1e-12, atol=1e-15)


def test_native_update_keeps_the_floor_and_the_sum(monkeypatch):
    # a task whose loss is 1e6 times another's, for many steps: weights > 0, sum T
    monkeypatch.setenv("LOSSBALANCE_NATIVE", "1")
    torch.manual_seed(0)
    net = Net(tasks=2, dtype=torch.float32)
    x, ys = torch.randn(20, 6), [torch.randn(20, 2) for _ in range(2)]
    bal = lb.GradNorm(2, alpha=1.5, lr=0.5, min_weight=1e-4)
    for _ in range(300):
        net.zero_grad()
        feats = bal.tap(net.trunk(x))
        losses = net.losses(feats, ys)
        bal.backward([losses[0] * 1e6, losses[1]], shared=net.trunk[2].weight)
        w = bal.weights
        assert torch.all(w > 0)
        torch.testing.assert_close(w.sum(), torch.tensor(2.0))
    assert w.min() < 0.05  # the floor was reached: the run did push a weight down


def test_state_dict_round_trip_resumes_bit_exactly_with_the_native_step(monkeypatch):
    _, bal = train(True, steps=10, monkeypatch=monkeypatch)
    clone = copy.deepcopy(bal)
    torch.manual_seed(1)
    net = Net()
    x, ys = torch.randn(20, 6, dtype=torch.float64), [
        torch.randn(20, 2, dtype=torch.float64) for _ in range(4)]
    for b in (bal, clone):
        feats = b.tap(net.trunk(x))
        b.backward(net.losses(feats, ys), shared=net.trunk[2].weight)
    assert torch.equal(bal.weights, clone.weights)
    restored = lb.GradNorm(4, alpha=1.5).double()
    restored.load_state_dict(bal.state_dict())
    for b in (bal, restored):
        feats = b.tap(net.trunk(x))
        b.backward(net.losses(feats, ys), shared=net.trunk[2].weight)
    assert torch.equal(bal.weights, restored.weights)


def test_old_graph_backpropagated_again_does_not_write_into_this_step(backend):
    # hooks stay on the nodes of earlier steps; a second backward through such a graph
    # (retain_graph) while a later step is in progress must not touch that step's norms
    torch.manual_seed(0)
    net = Net()
    x, ys = torch.randn(20, 6, dtype=torch.float64), [
        torch.randn(20, 2, dtype=torch.float64) for _ in range(4)]
    shared = [net.trunk[2].weight]
    cap = Capture(Workspace(), None)

    def begin(h, losses):
        pattern = linear_pattern(h, shared)
        assert cap.walk(losses, h, shared, edges_of(shared), pattern, False) is None
        cap.begin(h, shared, pattern)

    h_old = net.trunk(x)
    old = net.losses((h_old,) * 4, ys)
    begin(h_old, old)
    torch.autograd.backward(torch.stack(old).sum(), retain_graph=True)
    cap.finish()
    cap.end()
    assert cap.native is None and (cap._native is not None) == (backend == "native")
    h_new = net.trunk(x * 2)
    new = net.losses((h_new,) * 4, ys)
    begin(h_new, new)
    try:
        torch.autograd.backward(torch.stack(old).sum())  # the old step's hooks fire again
        torch.autograd.backward(torch.stack(new).sum(), retain_graph=True)
        norms = cap.finish()
    finally:
        cap.end()
    ref = torch.stack([torch.linalg.vector_norm(torch.autograd.grad(
        loss, shared[0], retain_graph=True)[0]) for loss in new])
    torch.testing.assert_close(norms, ref)


def test_failed_build_warns_once_and_runs_the_python_code(monkeypatch):
    from torch.utils import cpp_extension

    def fail(*args, **kwargs):
        raise RuntimeError("Error building extension 'x'\nfake.cpp:1: error: no compiler here")

    monkeypatch.setattr(cpp_extension, "load", fail)
    monkeypatch.setattr(_native, "_tried", False)
    monkeypatch.setattr(_native, "_module", None)
    with pytest.warns(RuntimeWarning, match="no compiler here"):
        assert _native.load() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _native.load() is None  # once
    torch.manual_seed(0)
    net = Net()
    x, ys = torch.randn(20, 6, dtype=torch.float64), [
        torch.randn(20, 2, dtype=torch.float64) for _ in range(4)]
    bal = lb.GradNorm(4).double()
    for _ in range(3):
        feats = bal.tap(net.trunk(x))
        bal.backward(net.losses(feats, ys), shared=net.trunk[2].weight)
    assert bal._capture._native is None
    assert torch.isfinite(bal.weights).all()


def test_off_by_default_and_switched_by_environment_or_build(monkeypatch):
    monkeypatch.delenv("LOSSBALANCE_NATIVE")
    assert not _native.enabled() and _native.load() is None  # the default: nothing built
    for value in ("1", "true", "YES", " on "):
        monkeypatch.setenv("LOSSBALANCE_NATIVE", value)
        assert _native.enabled()
    for value in ("0", "false", "no", "Off"):
        monkeypatch.setenv("LOSSBALANCE_NATIVE", value)
        assert not _native.enabled()
        assert _native.load() is None
    monkeypatch.setenv("LOSSBALANCE_NATIVE", "maybe")
    with pytest.raises(ValueError, match=r"LOSSBALANCE_NATIVE.*'maybe'"):
        _native.enabled()
    monkeypatch.setenv("LOSSBALANCE_NATIVE", "")
    assert not lb.native.enabled()
    assert lb.native.build()  # the documented call: builds (or loads) and turns it on
    assert lb.native.enabled() and lb.native.available()
    monkeypatch.setenv("LOSSBALANCE_NATIVE", "0")  # the environment's 0 always wins
    assert not lb.native.enabled() and not lb.native.build()


@pytest.mark.parametrize("tapped", [True, False])
def test_bad_environment_value_raises_before_the_backward(monkeypatch, tapped):
    # the general path decides on the C++ update after its backward: the value is checked first
    monkeypatch.setenv("LOSSBALANCE_NATIVE", "maybe")
    torch.manual_seed(0)
    trunk, heads = nn.Linear(4, 8), [nn.Linear(8, 1) for _ in range(2)]
    bal = lb.GradNorm(2)
    h = torch.relu(trunk(torch.randn(16, 4)))
    feats = bal.tap(h) if tapped else (h, h)
    losses = [heads[i](feats[i]).pow(2).mean() for i in range(2)]
    with pytest.raises(ValueError, match=r"LOSSBALANCE_NATIVE.*'maybe'"):
        bal.backward(losses, None if tapped else trunk.weight)
    assert trunk.weight.grad is None and all(hd.weight.grad is None for hd in heads)
    assert int(bal.num_steps) == 0 and torch.isnan(bal.initial_losses).all()


def test_default_step_is_python(monkeypatch):
    monkeypatch.delenv("LOSSBALANCE_NATIVE")
    loads = []
    monkeypatch.setattr(_native, "_module", None)
    monkeypatch.setattr(_native, "_tried", False)
    from torch.utils import cpp_extension
    monkeypatch.setattr(cpp_extension, "load", lambda *a, **k: loads.append(1))
    _, bal = train(None, steps=3, monkeypatch=monkeypatch)
    assert not loads and not bal._use_native and bal._capture._native is None


def test_build_announces_itself_in_one_line_and_hides_the_cuda_home_warning(
        monkeypatch, capsys, caplog, tmp_path):
    import logging

    from torch.utils import cpp_extension

    built = []

    def fake_load(name, **kwargs):
        built.append(name)
        return "module"

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    monkeypatch.setattr(_native, "_tried", False)
    monkeypatch.setattr(_native, "_module", None)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # an empty cache
    assert _native.load() == "module"
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "C++" in err and "s with 2 CPU cores" in err
    assert _native.load() == "module" and len(built) == 1  # once a process
    assert capsys.readouterr().err == ""
    # torch logs "No CUDA runtime is found, using CUDA_HOME=..." when cpp_extension is
    # imported (CUDA build of torch, no CUDA): the import under the filter drops it
    logger = logging.getLogger("torch.utils.cpp_extension")
    quiet = _native._NoCudaHomeWarning()
    with caplog.at_level(logging.WARNING, logger=logger.name):
        logger.addFilter(quiet)
        try:
            logger.warning("No CUDA runtime is found, using CUDA_HOME='%s'", "/usr/local/cuda")
            logger.warning("something else")
        finally:
            logger.removeFilter(quiet)
    assert [r.getMessage() for r in caplog.records] == ["something else"]


def _graphs():
    """h for each kind of last shared layer, with its nn.Linear (or None)."""
    torch.manual_seed(0)
    x = torch.randn(7, 5, dtype=torch.float64)
    seq = torch.randn(3, 4, 5, dtype=torch.float64)

    def lin(bias=True):
        return nn.Linear(5, 5, bias=bias).double()

    a, b, c, d, e, f, g = (lin() for _ in range(7))
    nb = lin(bias=False)
    return {
        "relu": (torch.relu(a(torch.tanh(x))), a),
        "tanh": (torch.tanh(b(x)), b),
        "gelu-relu": (torch.relu(F.gelu(c(x))), c),  # two activations: the Jacobian
        "identity": (d(x), d),
        "no-bias": (torch.relu(nb(x)), nb),
        "sequence": (torch.relu(e(seq)), e),
        "tied": (torch.relu(f(torch.relu(f(x)))), f),  # the same layer twice
        "alpha": (torch.relu(torch.addmm(g.bias, x, g.weight.T, alpha=2.0)), g),
        "not-linear": (torch.relu(x * a.weight.sum()), a),
    }


@pytest.mark.parametrize("graph", list(_graphs()))
@pytest.mark.parametrize("which", ["W", "b", "Wb"])
def test_linear_match_agrees_with_python(graph, which):
    # the C++ match (match_linear) against linear_pattern's Python one: same x, roles and
    # act'(z), and None for the same graphs (tied weights, alpha != 1, no nn.Linear)
    h, layer = _graphs()[graph]
    if which != "W" and layer.bias is None:
        pytest.skip("no bias to share")
    shared = {"W": [layer.weight], "b": [layer.bias], "Wb": [layer.weight, layer.bias]}[which]
    native = Capture(Workspace(), None).native_capture()
    assert native is not None
    python = linear_pattern(h, shared)
    cpp = linear_pattern(h, shared, native=native)
    assert (python is None) == (cpp is None)
    assert (python is None) == (graph in ("tied", "alpha", "not-linear"))
    if python is None:
        return
    assert torch.equal(python.x, cpp.x)
    assert [python.roles[id(p)] for p in shared] == [cpp.roles[id(p)] for p in shared]
    acts = python.acts
    if len(acts) == 1 and type(acts[0]).__name__ == "ReluBackward0":
        assert torch.equal(cpp.relu_out, acts[0]._saved_result) and cpp.jac is None
    elif acts:
        with torch.no_grad():
            jac = torch.ones_like(h)
            for node in acts:
                jac = node(jac)
        assert torch.equal(cpp.jac, jac) and cpp.relu_out is None
    else:
        assert cpp.relu_out is None and cpp.jac is None


@pytest.mark.parametrize("backend_", ["native", "python"])
def test_a_refused_step_keeps_no_reference_to_its_graph(backend_, monkeypatch):
    # a step refused after the graph walk (here: a window given shared= of another size)
    # must not keep that step's autograd graph alive
    import gc
    import weakref

    if backend_ == "python":
        monkeypatch.setenv("LOSSBALANCE_NATIVE", "0")
    torch.manual_seed(0)
    net = Net()
    x, ys = torch.randn(20, 6, dtype=torch.float64), [
        torch.randn(20, 2, dtype=torch.float64) for _ in range(4)]
    bal = lb.GradNorm(4, accumulation_steps=2).double()
    feats = bal.tap(net.trunk(x))
    bal.backward(net.losses(feats, ys), shared=net.trunk[2].weight)  # first of the window
    leaf = torch.ones_like(x, requires_grad=True)
    h = net.trunk(x * leaf)  # the graph saves leaf (the product's backward needs it)
    ref = weakref.ref(leaf)
    feats = bal.tap(h)
    del leaf, h
    with pytest.raises(ValueError, match="window"):
        bal.backward(net.losses(feats, ys), shared=[net.trunk[2].weight, net.trunk[2].bias])
    del feats
    gc.collect()
    assert ref() is None


@pytest.mark.parametrize("form", ["unbind", "select", "negative-select", "list"])
def test_walk_from_losses_taken_out_of_a_stack(form):
    # bal.backward(torch.stack(losses)) hands the walk the stack's elements: it must start at
    # the stack's inputs (as the Python walk does), or report what the Python walk reports
    torch.manual_seed(0)
    h = torch.randn(4, 3, dtype=torch.float64, requires_grad=True) * 1.0
    heads = [nn.Linear(3, 1).double() for _ in range(3)]
    parts = [heads[i](h).pow(2).mean() * (i + 1) for i in range(3)]
    stacked = torch.stack(parts)
    losses = {"unbind": list(stacked.unbind(0)), "select": [stacked[i] for i in range(3)],
              "negative-select": [stacked[i - 3] for i in range(3)], "list": parts}[form]
    native = Capture(Workspace(), None).native_capture()
    python_problem = consumers_of(losses, h)[1]
    assert native.walk(losses, h, []) == python_problem
    assert (python_problem is None) == (form != "negative-select")
    if python_problem is None:
        cap = Capture(Workspace(), None)
        assert cap.walk(losses, h, [], [], None, False) is None
        assert cap._walked is cap.native_capture()  # the C++ walk served it
        cap.begin(h, [], None)
        torch.autograd.backward(torch.stack(losses).sum(), retain_graph=True)
        norms = cap.finish()
        cap.end()
        ref = torch.stack([torch.linalg.vector_norm(torch.autograd.grad(
            p, h, retain_graph=True)[0]) for p in parts])
        torch.testing.assert_close(norms, ref, rtol=1e-12, atol=0)
