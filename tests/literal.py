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


# ---------------------------------------------------------------- loss-based methods (issue 15)
class LiteralDWA:
    """Dynamic Weight Average, Liu, Johns, Davison (CVPR 2019) Eq. 7, as MTAN's script keeps
    it: a table of each epoch's average training losses; lambda_k(t) = K exp(w_k(t-1)/T) /
    sum_i exp(w_i(t-1)/T) with w_k(t-1) = L_k(t-1)/L_k(t-2), and 1 in the first two epochs."""

    def __init__(self, num_tasks, temperature=2.0):
        self.K, self.T = num_tasks, temperature
        self.table, self.current = [], []

    def weights(self):
        if len(self.table) < 2:
            return [1.0] * self.K
        w = [a / b for a, b in zip(self.table[-1], self.table[-2], strict=True)]
        e = [math.exp(v / self.T) for v in w]
        return [self.K * v / sum(e) for v in e]

    def record(self, losses):
        self.current.append([float(loss.detach()) for loss in losses])

    def epoch_end(self):
        n = len(self.current)
        self.table.append([sum(column) / n for column in zip(*self.current, strict=True)])
        self.current = []


def literal_rlw_weights(seed, steps, num_tasks, distribution="normal"):
    """RLW (Lin et al., TMLR 2022): each step lambda = softmax(lambda~), lambda~ ~ N(0, I) (or
    U(0, 1)), drawn from a generator seeded with ``seed``; the softmax written out."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        if distribution == "normal":
            z = torch.randn(num_tasks, generator=gen, dtype=torch.float64).tolist()
        else:
            z = torch.rand(num_tasks, generator=gen, dtype=torch.float64).tolist()
        e = [math.exp(v) for v in z]
        out.append([v / sum(e) for v in e])
    return out


def literal_gls_total(losses):
    """GLS (Chennupati et al., CVPRW 2019): the product of the losses to the power 1/T."""
    product = losses[0]
    for loss in losses[1:]:
        product = product * loss
    return product ** (1.0 / len(losses))


class LiteralFAMO:
    """FAMO (Liu, Feng, Stone, Liu, NeurIPS 2023), Algorithm 2 as the official code writes it:
    logits w (0), z = softmax(w), D = L - b + eps, the model's loss sum_i z_i log(D_i) / c with
    c = sum_i z_i / D_i detached; after the model's step, delta = log D(before) - log D(after)
    and w.grad = autograd.grad(softmax(w), w, grad_outputs=delta), one Adam step (lr, weight
    decay gamma)."""

    def __init__(self, num_tasks, lr=0.025, gamma=1e-3, min_losses=None, eps=1e-8,
                 dtype=torch.float64):
        self.w = torch.zeros(num_tasks, dtype=dtype, requires_grad=True)
        self.opt = torch.optim.Adam([self.w], lr=lr, weight_decay=gamma)
        self.b = (torch.zeros(num_tasks, dtype=dtype) if min_losses is None
                  else torch.tensor(min_losses, dtype=dtype))
        self.eps = eps
        self.prev = None

    def loss(self, losses):
        L = torch.stack(losses)
        self.prev = L.detach()
        z = torch.softmax(self.w, -1)
        D = L - self.b + self.eps
        c = (z / D).sum().detach()
        return (torch.log(D) * z / c).sum()

    def weights(self):
        """The weights the last ``loss`` gave each L_i's gradient: (z_i / D_i) / c."""
        z = torch.softmax(self.w, -1).detach()
        D = self.prev - self.b + self.eps
        return (z / D) / (z / D).sum()

    def update(self, new_losses):
        delta = (torch.log(self.prev - self.b + self.eps)
                 - torch.log(torch.stack(list(new_losses)).detach() - self.b + self.eps))
        d = torch.autograd.grad(torch.softmax(self.w, -1), self.w, grad_outputs=delta)[0]
        self.opt.zero_grad()
        self.w.grad = d
        self.opt.step()


def literal_imtl_l_total(losses, s):
    """IMTL-L (Liu et al., ICLR 2021): sum_t e^{s_t} L_t - s_t."""
    total = 0
    for loss, s_t in zip(losses, s, strict=True):
        total = total + torch.exp(s_t) * loss - s_t
    return total


def assert_same_state(before, after):
    """Two state dicts hold the same tensors, bit for bit (NaN equal to NaN)."""
    assert before.keys() == after.keys()
    for key, value in before.items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(after[key], value, rtol=0, atol=0, equal_nan=True,
                                       msg=key)


def assert_equal_states(a, b):
    """Two (nested: dicts, lists, tuples) state dicts equal bit for bit (torch.equal)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_equal_states(a[key], b[key])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for u, v in zip(a, b, strict=True):
            assert_equal_states(u, v)
    else:
        assert a == b
