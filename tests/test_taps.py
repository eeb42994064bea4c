"""Per-task norms from the tap's hooks and from the general path equal per-task autograd.grad."""

import pytest
import torch
from torch import nn

from lossbalance._graph import consumers_of, edges_of
from lossbalance._taps import Capture, Workspace, linear_pattern, per_task_norms


def per_task_reference(losses, shared):
    rows = []
    for loss in losses:
        grads = torch.autograd.grad(loss, shared, retain_graph=True, allow_unused=True)
        rows.append(torch.sqrt(sum((g ** 2).sum() for g in grads if g is not None)))
    return torch.stack(rows)


def captured_norms(losses, h, shared, chunk=16, pattern="auto"):
    if pattern == "auto":
        pattern = linear_pattern(h, shared)
    cap = Capture(Workspace(), chunk)
    assert cap.walk(losses, h, shared, edges_of(shared), pattern, False) is None
    cap.begin(h, shared, pattern)
    torch.autograd.backward(torch.stack(losses).sum())
    norms = cap.finish()
    cap.end()
    return norms


@pytest.mark.parametrize("act", [nn.ReLU, nn.Tanh, nn.Sigmoid, nn.SiLU, nn.ELU, nn.GELU,
                                 nn.Softplus, nn.LeakyReLU, nn.Hardtanh, nn.Identity])
@pytest.mark.parametrize("chunk", [1, 2, 16])
@pytest.mark.parametrize("which", ["W", "b", "Wb"])
@pytest.mark.parametrize("fan_in", [6, 12], ids=["direct", "gram"])  # batch 7: gram when wider
def test_linear_pattern_norms(act, chunk, which, fan_in):
    torch.manual_seed(0)
    lin = nn.Linear(fan_in, 5).double()
    x = torch.randn(7, fan_in, dtype=torch.float64)
    h = act()(lin(x))
    heads = [nn.Linear(5, 2).double() for _ in range(3)]
    losses = [heads[i](h).pow(2).mean() * (i + 1) for i in range(3)]
    shared = {"W": [lin.weight], "b": [lin.bias], "Wb": [lin.weight, lin.bias]}[which]
    pattern = linear_pattern(h, shared)
    assert pattern is not None
    ref = per_task_reference(losses, shared)
    torch.testing.assert_close(captured_norms(losses, h, shared, chunk), ref)


@pytest.mark.parametrize("act", [nn.ReLU, nn.Tanh, nn.Identity])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("chunk", [1, 2])
@pytest.mark.parametrize("fan_in", [6, 40], ids=["direct", "gram"])  # 12 rows
@pytest.mark.parametrize("shape", [(12,), (3, 4)], ids=["2d", "3d"])
def test_linear_pattern_without_bias_and_on_sequences(act, bias, chunk, fan_in, shape):
    # nn.Linear without bias is a plain mm; on [B, L, in] it is one matmul over the B*L rows
    # whose result is viewed as [B, L, out]
    torch.manual_seed(0)
    lin = nn.Linear(fan_in, 5, bias=bias).double()
    x = torch.randn(*shape, fan_in, dtype=torch.float64)
    h = act()(lin(x))
    heads = [nn.Linear(5, 2).double() for _ in range(3)]
    losses = [heads[i](h).pow(2).mean() * (i + 1) for i in range(3)]
    shared = [lin.weight, lin.bias] if bias else [lin.weight]
    assert linear_pattern(h, shared) is not None
    ref = per_task_reference(losses, shared)
    torch.testing.assert_close(captured_norms(losses, h, shared, chunk), ref)


def test_linear_pattern_refuses_a_view_that_is_not_a_row_split():
    lin = nn.Linear(4, 6)
    h = lin(torch.randn(5, 4)).view(5, 2, 3)  # splits the output features, not the rows
    assert linear_pattern(h, [lin.weight]) is None


@pytest.mark.parametrize("shared_kind", ["none", "conv"])
def test_generic_layer_and_norms_at_h(shared_kind):
    torch.manual_seed(0)
    conv = nn.Conv1d(2, 3, 3).double()
    x = torch.randn(4, 2, 8, dtype=torch.float64)
    h = torch.relu(conv(x)).flatten(1)
    heads = [nn.Linear(h.shape[1], 1).double() for _ in range(3)]
    losses = [heads[i](h).pow(2).mean() * (i + 1) for i in range(3)]
    shared = [conv.weight] if shared_kind == "conv" else []
    assert linear_pattern(h, [conv.weight]) is None
    ref = per_task_reference(losses, shared or [h])
    torch.testing.assert_close(captured_norms(losses, h, shared), ref)


@pytest.mark.parametrize("at_weight", [True, False])
def test_head_reading_h_twice_sums_its_contributions(at_weight):
    torch.manual_seed(0)
    lin = nn.Linear(4, 5).double()
    h = torch.tanh(lin(torch.randn(6, 4, dtype=torch.float64)))
    a, b = nn.Linear(5, 5).double(), nn.Linear(5, 1).double()
    losses = [b(a(h) + h).pow(2).mean(), (h ** 3).sum(), b(h).abs().mean()]
    consumers, _ = consumers_of(losses, h)
    assert [len(c) for c in consumers] == [2, 1, 1]
    shared = [lin.weight] if at_weight else []
    ref = per_task_reference(losses, shared or [h])
    torch.testing.assert_close(captured_norms(losses, h, shared), ref)


def test_losses_taken_from_a_stack_are_told_apart():
    torch.manual_seed(0)
    h = torch.randn(4, 3, dtype=torch.float64, requires_grad=True) * 1.0
    heads = [nn.Linear(3, 1).double() for _ in range(3)]
    stacked = torch.stack([heads[i](h).pow(2).mean() * (i + 1) for i in range(3)])
    for losses in (list(stacked.unbind(0)), [stacked[i] for i in range(3)]):
        consumers, problem = consumers_of(losses, h)
        assert problem is None and [len(c) for c in consumers] == [1, 1, 1]


def test_consumers_report_problems():
    h = torch.randn(3, 2, requires_grad=True) * 1.0
    other = torch.randn(3, 2, requires_grad=True)
    shared_op = h * 2
    assert consumers_of([h.sum(), other.sum()], h)[1] == ("unreached", 1)
    assert consumers_of([shared_op.sum(), shared_op.mean(), h.sum()], h)[1] == ("shared", 0, 1)


@pytest.mark.parametrize("batched", [True, False])
def test_general_path_norms(batched):
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(4, 6), nn.Tanh()).double()
    heads = [nn.Linear(6, 2).double() for _ in range(3)]
    x = torch.randn(5, 4, dtype=torch.float64)
    h = trunk(x)
    losses = [heads[i](h).pow(2).sum() * (i + 1) for i in range(3)]
    shared = list(trunk.parameters())
    torch.testing.assert_close(per_task_norms(losses, shared, batched=batched),
                               per_task_reference(losses, shared))


def test_workspace_reuses_buffers():
    ws = Workspace()
    like = torch.zeros(1)
    a = ws.get("a", (2, 3), like)
    assert ws.get("a", (2, 3), like) is a
    assert ws.get("a", (3, 3), like) is not a
    assert ws.nbytes() == 9 * 4


def test_hooks_of_an_ended_step_do_nothing():
    import lossbalance as lb

    h = torch.rand(4, 3).add_(1).requires_grad_()  # a leaf: its heads save no tensors
    bal = lb.GradNorm(2)
    feats = bal.tap(h)
    losses = [feats[0].sum(), feats[1].sum()]  # positive
    bal.backward(losses)
    weights = bal.weights
    h.grad = None
    losses[0].backward()  # the same nodes again, outside any balancer step
    assert torch.equal(h.grad, torch.ones(4, 3))
    assert torch.equal(bal.weights, weights)


@pytest.mark.parametrize("which", ["W", "b"])
def test_tied_layer_is_not_taken_for_a_plain_linear(which):
    import lossbalance as lb

    torch.manual_seed(0)
    lin = nn.Linear(5, 5).double()
    x = torch.randn(7, 5, dtype=torch.float64)
    heads = [nn.Linear(5, 2).double() for _ in range(3)]
    shared = lin.weight if which == "W" else lin.bias

    def losses_of(feats):
        return [heads[i](feats[i]).pow(2).mean() * (i + 1) for i in range(3)]

    h = torch.relu(lin(torch.relu(lin(x))))  # the same layer twice (tied weights)
    assert linear_pattern(h, [shared]) is None
    ref = per_task_reference(losses_of((h,) * 3), [shared])
    bal = lb.GradNorm(3)
    h = torch.relu(lin(torch.relu(lin(x))))
    bal.backward(losses_of(bal.tap(h)), shared=shared)
    torch.testing.assert_close(bal.stats["grad_norm"] / bal.stats["weight"], ref)
