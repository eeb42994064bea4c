"""What a first-order GradNorm can do that a create_graph one cannot.

Algorithm 1 as it is usually written differentiates G_i = ||grad_W (w_i L_i)|| with
``create_graph=True``: it needs the second derivative of every operation between the losses and
the shared tensors W. lossbalance uses the closed form dL_grad/dw_i = sign(G_i - target_i)
||grad_W L_i||, which needs first derivatives only. So it measures G_i at tensors whose double
backward PyTorch does not implement, such as a transformer layer's attention weights under
PyTorch's default CPU attention kernel, where the create_graph algorithm stops with an error.

Checked here, in float64 over several steps (G_i, weights, model parameters):
- a conv + BatchNorm trunk: the fast path (tap), the general path and the literal algorithm agree;
- an ``nn.TransformerEncoderLayer`` with ``shared=self_attn.in_proj_weight``: the literal
  algorithm fails with the default kernel; our two paths run and agree, and they match the
  literal algorithm run with PyTorch's math attention kernel, whose double backward exists.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from literal import LiteralGradNorm
from torch import nn
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import lossbalance as lb

T = 3
SCALES = (1.0, 10.0, 100.0)
STEPS = 8


class AttentionNet(nn.Module):
    """Token embedding, one transformer encoder layer, mean over tokens; one head per task."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.layer = nn.TransformerEncoderLayer(16, nhead=2, dim_feedforward=32, dropout=0.0,
                                                batch_first=True)
        self.heads = nn.ModuleList(nn.Linear(16, 1) for _ in range(T))

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(self.embed(x)).mean(dim=1)

    def shared(self) -> list[torch.Tensor]:
        return [self.layer.self_attn.in_proj_weight]


class ConvBatchNormNet(nn.Module):
    """Conv -> BatchNorm (batch statistics) -> ReLU -> flatten; one head per task."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.heads = nn.ModuleList(nn.Linear(4 * 6 * 6, 1) for _ in range(T))

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x))).flatten(1)

    def shared(self) -> list[torch.Tensor]:
        return [self.conv.weight, self.bn.weight]


def problem(kind: str):
    torch.manual_seed(0)
    if kind == "attention":
        net, x = AttentionNet(), torch.randn(16, 5, 6)
    else:
        net, x = ConvBatchNormNet(), torch.randn(16, 1, 6, 6)
    ys = [torch.randn(16, 1) * s for s in SCALES]
    return net.double(), x.double(), [y.double() for y in ys]


def train(kind: str, mode: str, kernel: SDPBackend | None = None):
    """STEPS steps of GradNorm (``mode``: "fast", "general" or "literal"): G_i of every step,
    the final weights and the final model parameters."""
    net, x, ys = problem(kind)
    net = copy.deepcopy(net)
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    if mode == "literal":
        bal = LiteralGradNorm(T, alpha=1.5, lr=0.025, dtype=torch.float64,
                              optimizer_kwargs={"fused": True})
    else:
        bal = lb.GradNorm(T, alpha=1.5, lr=0.025).double()
    norms = []
    for _ in range(STEPS):
        opt.zero_grad()
        with sdpa_kernel(kernel) if kernel is not None else contextlib.nullcontext():
            h = net.trunk(x)
            feats = bal.tap(h) if mode == "fast" else (h,) * T
            losses = [F.mse_loss(net.heads[i](feats[i]), ys[i]) for i in range(T)]
            if mode == "literal":
                grad_norm, _ = bal.step(losses, net.shared())
            else:
                bal.backward(losses, shared=net.shared())
                grad_norm = bal.stats["grad_norm"]
        norms.append(grad_norm.detach().clone())
        opt.step()
    weights = bal.w.detach().clone() if mode == "literal" else bal.weights
    return torch.stack(norms), weights, [p.detach().clone() for p in net.parameters()]


def assert_same_run(a, b, rtol: float) -> None:
    torch.testing.assert_close(a[0], b[0], rtol=rtol, atol=0)
    torch.testing.assert_close(a[1], b[1], rtol=rtol, atol=1e-12)
    for pa, pb in zip(a[2], b[2], strict=True):
        torch.testing.assert_close(pa, pb, rtol=rtol, atol=1e-12)


@pytest.mark.parametrize("kind", ["conv_bn", "attention"])
def test_fast_and_general_paths_agree(kind):
    fast, general = train(kind, "fast"), train(kind, "general")
    assert_same_run(fast, general, rtol=1e-10)
    # the weights moved: the comparison is not between two runs that did nothing
    assert (fast[1] - 1).abs().max() > 0.05


def test_conv_batchnorm_trunk_matches_literal_algorithm():
    assert_same_run(train("conv_bn", "fast"), train("conv_bn", "literal"), rtol=1e-10)


def test_attention_create_graph_gradnorm_fails_where_ours_runs():
    with pytest.raises(RuntimeError, match=r"derivative for .*attention.* is not implemented"):
        train("attention", "literal")  # PyTorch's default CPU attention kernel
    norms, weights, _ = train("attention", "fast")
    assert torch.isfinite(norms).all() and (norms > 0).all()
    assert torch.isclose(weights.sum(), torch.tensor(float(T), dtype=weights.dtype))


def test_attention_matches_literal_algorithm_under_the_math_kernel():
    # the math kernel has a double backward, so the literal algorithm runs there; ours runs with
    # the default kernel and lands on the same G_i, weights and parameters
    literal = train("attention", "literal", kernel=SDPBackend.MATH)
    assert_same_run(train("attention", "fast"), literal, rtol=1e-10)
    assert_same_run(train("attention", "general"), literal, rtol=1e-10)
