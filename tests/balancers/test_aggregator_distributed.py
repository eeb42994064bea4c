"""The aggregators under DistributedDataParallel: two CPU processes (gloo) against one."""

from __future__ import annotations

import copy

import pytest
import torch
from distributed_harness import run_in_processes
from test_aggregator import RuleAggregator
from torch import distributed as dist
from torch import nn
from torch.nn import functional as F

T, STEPS, BATCH = 3, 6, 16

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed missing")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())
        self.heads = nn.ModuleList(nn.Linear(16, 4) for _ in range(T))

    def forward(self, x, bal, tapped):
        h = self.last_h = self.trunk(x)
        feats = bal.tap(h) if tapped else (h,) * T
        return [self.heads[i](feats[i]) for i in range(T)]


def data():
    torch.manual_seed(1)
    x = torch.randn(BATCH, 8, dtype=torch.float64)
    ys = [torch.randn(BATCH, 4, dtype=torch.float64) * s for s in (1.0, 10.0, 100.0)]
    return x, ys


# name -> (tapped, shared: "W" or None, Aggregator keyword arguments)
CASES = {
    "h": (True, None, {}),
    "tap-W": (True, "W", {}),
    "W": (False, "W", {}),
    "W-window": (False, "W", {"accumulation_steps": 2}),
    "h-window": (True, None, {"accumulation_steps": 2}),
    "general-h": (False, "h", {}),  # no tap, shared=h: per-sample, (1/P^2) sum_p G_p
}


def train(model, bal, x, ys, tapped, where):
    """Per step c and G, and the final parameters; ``model`` may be DDP-wrapped."""
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    micro = bal.accumulation_steps
    trace = []
    for _ in range(STEPS):
        opt.zero_grad()
        for m in range(micro):
            rows = slice(m * len(x) // micro, (m + 1) * len(x) // micro)
            outs = model(x[rows], bal, tapped)
            shared = {"W": inner.trunk[2].weight, "h": inner.last_h}.get(where)
            bal.backward([F.mse_loss(outs[i], ys[i][rows]) for i in range(T)], shared)
        opt.step()
        trace.append((bal.weights, bal.stats["gram"]))
    return trace, [p.detach().clone() for p in inner.parameters()]


def worker(rank, world, model):
    x, ys = data()
    shard = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    results = {}
    for name, (tapped, where, kwargs) in CASES.items():
        ddp = nn.parallel.DistributedDataParallel(copy.deepcopy(model))
        bal = RuleAggregator(T, **kwargs).double()  # distributed=None: follows the group
        results[name] = train(ddp, bal, x[shard], [y[shard] for y in ys], tapped, where)
    return results


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    torch.manual_seed(0)
    model = Net().double()
    return model, run_in_processes(worker, tmp, model)


@pytest.mark.parametrize("name", list(CASES))
def test_every_process_holds_the_same_coefficients(two_processes, name):
    _, (rank0, rank1) = two_processes
    for (c0, g0), (c1, g1) in zip(rank0[name][0], rank1[name][0], strict=True):
        assert torch.equal(c0, c1) and torch.equal(g0, g1)
    for p, q in zip(rank0[name][1], rank1[name][1], strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("name", ["h", "tap-W", "W", "W-window", "general-h"])
def test_matches_one_process_on_the_whole_batch(two_processes, name):
    # the Gram matrix of the global per-task gradients: at h (1/P^2) sum_p G_p, at W from
    # the averaged per-task gradients (a window's: exact over micro-batches and processes,
    # against one process's window of two micro-batches)
    model, (rank0, _) = two_processes
    tapped, where, kwargs = CASES[name]
    x, ys = data()
    trace, params = train(copy.deepcopy(model), RuleAggregator(T, **kwargs).double(), x, ys,
                          tapped, where)
    for (c0, g0), (c, g) in zip(rank0[name][0], trace, strict=True):
        torch.testing.assert_close(g0, g, rtol=1e-9, atol=0)
        torch.testing.assert_close(c0, c, rtol=1e-9, atol=0)
    for p, q in zip(rank0[name][1], params, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)


def test_distributed_needs_an_initialised_process_group():
    bal = RuleAggregator(T, distributed=True).double()
    model = Net().double()
    x, ys = data()
    outs = model(x, bal, True)
    with pytest.raises(ValueError, match="init_process_group"):
        bal.backward([F.mse_loss(outs[i], ys[i]) for i in range(T)])
    assert int(bal.num_steps) == 0 and bal.stats == {}
