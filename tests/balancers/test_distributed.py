"""GradNorm under DistributedDataParallel: two CPU processes (gloo) against one process."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import distributed as dist
from torch import multiprocessing as mp
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
    """The trace of the weights; ``model`` may be DDP-wrapped (then x, ys are a shard)."""
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    trace = []
    for _ in range(steps):
        opt.zero_grad()
        outs = model(x, bal)
        losses = [F.mse_loss(outs[i], ys[i]) for i in range(T)]
        bal.backward(losses, shared=inner.trunk[-2].weight if where == "W" else None)
        opt.step()
        trace.append(bal.weights)
    return torch.stack(trace), [p.detach().clone() for p in inner.parameters()]


def worker(rank, world, store, model, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        x, ys = data()
        shard = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
        results = {}
        for where in ("h", "W"):
            ddp = nn.parallel.DistributedDataParallel(copy.deepcopy(model))
            bal = lb.GradNorm(T, alpha=1.5, distributed=True)
            results[where] = train(ddp, bal, x[shard], [y[shard] for y in ys], where)
        torch.save(results, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    torch.manual_seed(0)
    model = Net()
    mp.spawn(worker, args=(2, str(tmp / "store"), model, str(tmp / "out")), nprocs=2)
    return model, [torch.load(tmp / f"out.{r}", weights_only=False) for r in range(2)]


def test_every_process_holds_the_same_weights(two_processes):
    _, (rank0, rank1) = two_processes
    for where in ("h", "W"):
        assert torch.equal(rank0[where][0], rank1[where][0]), where
        assert not torch.allclose(rank0[where][0][-1], torch.ones(T))  # they did move


def test_norms_at_h_match_one_process_on_the_whole_batch(two_processes):
    # L_i = the mean of the two shards' losses = the whole batch's; G_i at h is exact
    model, (rank0, _) = two_processes
    x, ys = data()
    weights, params = train(copy.deepcopy(model), lb.GradNorm(T, alpha=1.5), x, ys, "h")
    torch.testing.assert_close(rank0["h"][0], weights, rtol=1e-5, atol=1e-5)
    for p, q in zip(rank0["h"][1], params, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


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
