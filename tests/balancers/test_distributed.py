"""GradNorm under DistributedDataParallel: two CPU processes (gloo) against one process."""

from __future__ import annotations

import copy

import pytest
import torch
from distributed_harness import run_in_processes
from torch import distributed as dist
from torch import nn
from torch.nn import functional as F

import lossbalance as lb

T, STEPS, BATCH = 3, 15, 32

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed missing")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())
        self.heads = nn.ModuleList(nn.Linear(16, 4) for _ in range(T))

    def forward(self, x, bal):
        feats = bal.tap(self.trunk(x))
        return [self.heads[i](feats[i]) for i in range(T)]


def data():
    torch.manual_seed(1)
    x = torch.randn(BATCH, 8)
    ys = [torch.randn(BATCH, 4) * s for s in (1.0, 10.0, 100.0)]
    return x, ys


def train(model, bal, x, ys, where, steps=STEPS):
    """The trace of the weights and G_i, and the final parameters; ``model`` may be
    DDP-wrapped (then x, ys are a shard). ``bal.accumulation_steps`` micro-batches a step."""
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    micro = bal.accumulation_steps
    shared = {"h": None, "W": inner.trunk[-2].weight, "Wb": inner.trunk[-2]}[where]
    trace, norms = [], []
    for _ in range(steps):
        opt.zero_grad()
        for m in range(micro):
            rows = slice(m * len(x) // micro, (m + 1) * len(x) // micro)
            outs = model(x[rows], bal)
            bal.backward([F.mse_loss(outs[i], ys[i][rows]) for i in range(T)], shared=shared)
        opt.step()
        trace.append(bal.weights)
        norms.append(bal.stats["grad_norm"])
    return (torch.stack(trace), [p.detach().clone() for p in inner.parameters()],
            torch.stack(norms))


# the balancers each process trains with: name -> (where, GradNorm keyword arguments)
CASES = {
    "h": ("h", {}),
    "W": ("W", {}),
    "Wb-general": ("Wb", {}),
    "W-accumulated": ("W", {"accumulation_steps": 2}),
    "W-mean": ("W", {"parameter_norms": "mean"}),
    "W-default": ("W", {"distributed": None}),  # follows the process group, not told
    "W-opted-out": ("W", {"distributed": False}),
}


def worker(rank, world, model):
    x, ys = data()
    shard = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    results = {}
    for name, (where, kwargs) in CASES.items():
        ddp = nn.parallel.DistributedDataParallel(copy.deepcopy(model))
        bal = lb.GradNorm(T, alpha=1.5, **{"distributed": True, **kwargs})
        if name.endswith("general"):
            bal.tap = lambda h: (h,) * T  # no tap: the general path
        results[name] = train(ddp, bal, x[shard], [y[shard] for y in ys], where)
    return results


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    torch.manual_seed(0)
    model = Net()
    return model, run_in_processes(worker, tmp, model)


def test_every_process_holds_the_same_weights(two_processes):
    _, (rank0, rank1) = two_processes
    for name in CASES:
        if name == "W-opted-out":
            continue
        assert torch.equal(rank0[name][0], rank1[name][0]), name
        assert not torch.allclose(rank0[name][0][-1], torch.ones(T))  # they did move


def test_distributed_false_keeps_each_process_own_weights(two_processes):
    _, (rank0, rank1) = two_processes
    assert not torch.allclose(rank0["W-opted-out"][0], rank1["W-opted-out"][0])


def test_default_follows_the_process_group(two_processes):
    # GradNorm() inside a process group of 2, not told: step for step what distributed=True
    # gives (weights, G_i, parameters)
    assert lb.GradNorm(T).distributed is None
    _, (rank0, _) = two_processes
    default, told = rank0["W-default"], rank0["W"]
    assert torch.equal(default[0], told[0]) and torch.equal(default[2], told[2])
    for p, q in zip(default[1], told[1], strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("name", ["h", "W", "Wb-general", "W-accumulated", "W-default"])
def test_norms_match_one_process_on_the_whole_batch(two_processes, name):
    # L_i = the mean of the two shards' losses = the whole batch's; G_i is exact at h (from
    # the norms) and at parameters (from the averaged per-task gradients)
    model, (rank0, _) = two_processes
    x, ys = data()
    where = CASES[name][0]
    weights, params, norms = train(copy.deepcopy(model), lb.GradNorm(T, alpha=1.5), x, ys,
                                   where)
    torch.testing.assert_close(rank0[name][2], norms, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rank0[name][0], weights, rtol=1e-5, atol=1e-5)
    for p, q in zip(rank0[name][1], params, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_mean_norms_at_parameters_bound_the_exact_ones(two_processes):
    # first step, same weights: mean_p ||g_i,p|| >= ||mean_p g_i,p|| (triangle inequality)
    _, (rank0, _) = two_processes
    exact, mean = rank0["W"][2][0], rank0["W-mean"][2][0]
    assert (mean > exact * (1 + 1e-6)).all()


def test_distributed_needs_an_initialised_process_group():
    with pytest.raises(TypeError, match="distributed must be"):
        lb.GradNorm(T, distributed="yes")
    bal = lb.GradNorm(T, distributed=True)
    model = Net()
    x, ys = data()
    outs = model(x, bal)
    with pytest.raises(ValueError, match="init_process_group"):
        bal.backward([F.mse_loss(outs[i], ys[i]) for i in range(T)])
    assert int(bal.num_steps) == 0
