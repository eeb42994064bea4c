"""DB-MTL under DistributedDataParallel: two CPU processes (gloo) against one process."""

from __future__ import annotations

import copy

import pytest
import torch
from distributed_harness import run_in_processes
from test_aggregator_distributed import BATCH, STEPS, Net, T, data
from torch import distributed as dist
from torch import nn
from torch.nn import functional as F

import lossbalance as lb

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed missing")

CASES = {"W": {}, "W-window": {"accumulation_steps": 2}}


def train(model, bal, x, ys):
    """Per step alpha and the EMA, and the final parameters; ``model`` may be DDP-wrapped.
    In a window, micro-batch m is rows [m::k] of this process's rows."""
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    k = bal.accumulation_steps
    trace = []
    for _ in range(STEPS):
        opt.zero_grad()
        for m in range(k):
            outs = model(x[m::k], bal, False)
            bal.backward([F.mse_loss(outs[i], ys[i][m::k]) for i in range(T)],
                         inner.trunk[2].weight)
        opt.step()
        trace.append((bal.weights, bal.grad_ema.clone()))
    return trace, [p.detach().clone() for p in inner.parameters()]


def worker(rank, world, model):
    x, ys = data()
    rows = torch.arange(BATCH).view(world, -1)[rank]  # rank r: rows r*B/P ... (r+1)*B/P-1
    results = {}
    for name, kwargs in CASES.items():
        ddp = nn.parallel.DistributedDataParallel(copy.deepcopy(model))
        bal = lb.DBMTL(T, **kwargs).double()  # distributed=None: follows the group
        results[name] = train(ddp, bal, x[rows], [y[rows] for y in ys])
    return results


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    torch.manual_seed(0)
    model = Net().double()
    return model, run_in_processes(worker, tmp, model)


@pytest.mark.parametrize("name", list(CASES))
def test_every_process_holds_the_same_ema_and_model(two_processes, name):
    _, (rank0, rank1) = two_processes
    for (a0, e0), (a1, e1) in zip(rank0[name][0], rank1[name][0], strict=True):
        assert torch.equal(a0, a1) and torch.equal(e0, e1)
    for p, q in zip(rank0[name][1], rank1[name][1], strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("name", list(CASES))
def test_matches_one_process_on_the_whole_batch(two_processes, name):
    # g_i = grad log(L_i + eps) of the whole batch (L_i the mean over the processes); in a
    # window, the one process's micro-batch m is the union of the processes' m-th ones
    model, (rank0, _) = two_processes
    x, ys = data()
    k = CASES[name].get("accumulation_steps", 1)
    if k > 1:  # one process's rows [m::k] must be the processes' micro-batches m together
        shards = torch.arange(BATCH).view(2, -1)
        micro = [torch.cat([shard[m::k] for shard in shards]) for m in range(k)]
        order = torch.stack(micro, dim=1).reshape(-1)
        x, ys = x[order], [y[order] for y in ys]
    trace, params = train(copy.deepcopy(model), lb.DBMTL(T, **CASES[name]).double(), x, ys)
    for (a0, e0), (a, e) in zip(rank0[name][0], trace, strict=True):
        torch.testing.assert_close(e0, e, rtol=1e-9, atol=1e-15)
        torch.testing.assert_close(a0, a, rtol=1e-9, atol=0)
    for p, q in zip(rank0[name][1], params, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)


def test_distributed_needs_an_initialised_process_group():
    bal = lb.DBMTL(T, distributed=True).double()
    model = Net().double()
    x, ys = data()
    outs = model(x, bal, False)
    with pytest.raises(ValueError, match="init_process_group"):
        bal.backward([F.mse_loss(outs[i], ys[i]) for i in range(T)], model.trunk[2].weight)
    assert int(bal.num_steps) == 0 and bal.stats == {}
