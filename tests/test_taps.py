"""Per-task norms from the tap and the batched products equal per-task autograd.grad."""

import pytest
import torch
from torch import nn

from lossbalance._taps import Tap, Workspace, linear_pattern, norms_from_tap_grads, per_task_norms


def per_task_reference(losses, shared):
    rows = []
    for loss in losses:
        grads = torch.autograd.grad(loss, shared, retain_graph=True, allow_unused=True)
        rows.append(torch.sqrt(sum((g ** 2).sum() for g in grads if g is not None)))
    return torch.stack(rows)


@pytest.mark.parametrize("act", [nn.ReLU, nn.Tanh, nn.Sigmoid, nn.SiLU, nn.ELU, nn.Identity])
@pytest.mark.parametrize("chunk", [1, 2, None])
@pytest.mark.parametrize("which", ["W", "b", "Wb"])
def test_linear_pattern_norms(act, chunk, which):
    torch.manual_seed(0)
    lin = nn.Linear(6, 5).double()
    x = torch.randn(7, 6, dtype=torch.float64)
    h = act()(lin(x))
    T = 3
    tap = Tap(h, T)
    heads = [nn.Linear(5, 2).double() for _ in range(T)]
    losses = [heads[i](tap.feats[i]).pow(2).mean() * (i + 1) for i in range(T)]
    shared = {"W": [lin.weight], "b": [lin.bias], "Wb": [lin.weight, lin.bias]}[which]
    pattern = linear_pattern(h, shared)
    if act is nn.Identity:
        assert pattern is not None and pattern[0] == []
    assert pattern is not None
    ref = per_task_reference(losses, shared)
    got = {}

    def hook(g):
        got["n"] = norms_from_tap_grads(g, h, shared, Workspace(), pattern, chunk)

    tap.expanded.register_hook(hook)
    torch.autograd.backward(torch.stack(losses).sum())
    torch.testing.assert_close(got["n"], ref)


def test_pattern_rejects_other_layers_and_generic_path_still_exact():
    torch.manual_seed(0)
    conv = nn.Conv1d(2, 3, 3).double()
    x = torch.randn(4, 2, 8, dtype=torch.float64)
    h = torch.relu(conv(x)).flatten(1)
    assert linear_pattern(h, [conv.weight]) is None
    tap = Tap(h, 2)
    heads = [nn.Linear(h.shape[1], 1).double() for _ in range(2)]
    losses = [heads[i](tap.feats[i]).pow(2).mean() for i in range(2)]
    ref = per_task_reference(losses, [conv.weight])
    got = {}

    def hook(g):
        got["n"] = norms_from_tap_grads(g, h, [conv.weight], Workspace())

    tap.expanded.register_hook(hook)
    torch.autograd.backward(torch.stack(losses).sum())
    torch.testing.assert_close(got["n"], ref)


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
