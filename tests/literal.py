"""Literal, slow implementations of each paper's formulas, written plainly for the tests.

GradNorm here is Algorithm 1 of Chen et al. (ICML 2018) as notebooks write it: one
``create_graph`` backward per task to get G_i, autograd through |G_i - target_i| for the
weights' gradient, then the model's backward of sum_i w_i L_i. With ``log_weights`` the
optimizer holds s = log w instead, w = exp(s) is formed inside the graph (so autograd gives
dL_grad/ds), and the floor and the renormalisation act on s.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class LiteralGradNorm:
    def __init__(self, num_tasks, alpha, lr, optimizer=torch.optim.Adam, min_weight=1e-6,
                 dtype=torch.float32, optimizer_kwargs=None, log_weights=False):
        self.T = num_tasks
        self.alpha = alpha
        self.min_weight = min_weight
        self.log_weights = log_weights
        if log_weights:
            self.s = torch.zeros(num_tasks, dtype=dtype, requires_grad=True)
            self.opt = optimizer([self.s], lr=lr, **(optimizer_kwargs or {}))
        else:
            self.w = torch.ones(num_tasks, dtype=dtype, requires_grad=True)
            self.opt = optimizer([self.w], lr=lr, **(optimizer_kwargs or {}))
        self.L0 = None

    @property
    def weights(self):
        return torch.exp(self.s).detach() if self.log_weights else self.w.detach()

    def step(self, losses, shared):
        if self.log_weights:
            return self._log_step(losses, shared)
        L = torch.stack(losses)
        if self.L0 is None:
            self.L0 = L.detach().clone()
        G = []
        for i in range(self.T):
            grads = torch.autograd.grad(self.w[i] * L[i], shared, retain_graph=True,
                                        create_graph=True)
            G.append(torch.sqrt(sum((g ** 2).sum() for g in grads)))
        G = torch.stack(G)
        G_bar = G.mean().detach()
        loss_ratio = L.detach() / self.L0
        r = loss_ratio / loss_ratio.mean()
        target = (G_bar * r ** self.alpha).detach()
        L_grad = (G - target).abs().sum()
        w_grad = torch.autograd.grad(L_grad, self.w, retain_graph=True)[0]
        (self.w.detach() * L).sum().backward()
        self.w.grad = w_grad
        self.opt.step()
        with torch.no_grad():
            self.w.clamp_(min=self.min_weight)
            self.w.mul_(self.T / self.w.sum())
        return G.detach(), target

    def _log_step(self, losses, shared):
        L = torch.stack(losses)
        if self.L0 is None:
            self.L0 = L.detach().clone()
        w = torch.exp(self.s)
        G = []
        for i in range(self.T):
            grads = torch.autograd.grad(w[i] * L[i], shared, retain_graph=True,
                                        create_graph=True)
            G.append(torch.sqrt(sum((g ** 2).sum() for g in grads)))
        G = torch.stack(G)
        loss_ratio = L.detach() / self.L0
        r = loss_ratio / loss_ratio.mean()
        target = (G.mean() * r ** self.alpha).detach()
        L_grad = (G - target).abs().sum()
        s_grad = torch.autograd.grad(L_grad, self.s, retain_graph=True)[0]
        (w.detach() * L).sum().backward()
        self.s.grad = s_grad
        self.opt.step()
        with torch.no_grad():
            self.s.clamp_(min=math.log(self.min_weight))
            self.s.sub_(torch.log(torch.exp(self.s).sum() / self.T))
        return G.detach(), target


def literal_uncertainty_total(losses, log_vars, task_types):
    total = 0
    for loss, s, kind in zip(losses, log_vars, task_types, strict=True):
        if kind == "regression":
            total = total + 1 / (2 * torch.exp(s)) * loss + torch.log(torch.exp(s / 2))
        else:
            total = total + 1 / torch.exp(s) * loss + torch.log(torch.exp(s / 2))
    return total


def literal_dtp_weights(kpi_history, gamma, decay):
    k = None
    for kappa in kpi_history:
        k = list(kappa) if k is None else [decay * a + (1 - decay) * b for a, b in zip(k, kappa,
                                                                                      strict=True)]
    import math
    return [-((1 - x) ** gamma) * math.log(max(x, 1e-6)) for x in k]


class ToyNet(nn.Module):
    """A small trunk (Linear-ReLU x2) and one linear head per task."""

    def __init__(self, num_tasks, d_in=8, width=16, d_out=4, act=nn.ReLU):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(d_in, width), act(), nn.Linear(width, width), act())
        self.heads = nn.ModuleList(nn.Linear(width, d_out) for _ in range(num_tasks))

    @property
    def last_shared(self):
        return self.trunk[-2].weight


def toy_problem(seed=0, batch=16, dtype=torch.float32):
    """A 3-task ToyNet and one batch whose targets differ in scale (1, 10, 100)."""
    torch.manual_seed(seed)
    net = ToyNet(3).to(dtype)
    x = torch.randn(batch, 8, dtype=dtype)
    ys = [torch.randn(batch, 4, dtype=dtype) * s for s in (1.0, 10.0, 100.0)]
    return net, x, ys
