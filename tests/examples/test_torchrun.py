"""examples/ddp_torchrun.py under ``torchrun --nproc_per_node 2`` (gloo, CPU): the two
processes, each on half of every batch, end with the same weights and model, those of one
process on the whole batches; ``bal.loss(...).backward()`` synchronises inside autograd's
queued callback."""

from __future__ import annotations

import ddp_torchrun
import multitask
import pytest
import torch
from example_runs import max_difference, run_example
from torch import distributed as dist

STEPS, BATCH = 12, 32

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed missing")


# A launch aborted by gloo ("terminate called without an active exception", a child killed by
# SIGABRT) came in 2 of 3 fresh-clone runs of the whole suite here, and in none of 13 launches
# of this test or the script alone; its cause is not found yet. Such a launch is retried (at
# most 3 tries), any other failure is not.
GLOO_ABORT = "terminate called without an active exception"


def launch(out):
    args = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "ddp_torchrun.py", "--steps", str(STEPS), "--out", str(out))
    for attempt in range(3):
        try:
            return run_example(*args)
        except AssertionError as failure:
            if GLOO_ABORT not in str(failure) or attempt == 2:
                raise


def test_torchrun_two_processes_are_one(tmp_path):
    launch(tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    net, bal = multitask.train_by_hand(STEPS, BATCH)
    assert torch.equal(ranks[0]["weights"], ranks[1]["weights"])
    assert max_difference(ranks[0]["model"], ranks[1]["model"]) == 0
    assert float((ranks[0]["weights"] - bal.weights).abs().max()) <= 1e-6
    # Adam turns the rounding of a near-zero gradient entry into a step of up to its lr
    assert max_difference(ranks[0]["model"], net.state_dict()) <= 1e-4
    assert (bal.weights - 1).abs().max() > 0.05


def test_one_process_is_the_plain_loop(monkeypatch, capsys):
    """Without torchrun the script trains in one process, without DDP."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    model, bal = ddp_torchrun.train(STEPS, BATCH)
    net, hand = multitask.train_by_hand(STEPS, BATCH)
    assert torch.equal(bal.weights, hand.weights)
    assert max_difference(model.state_dict(), net.state_dict()) == 0
