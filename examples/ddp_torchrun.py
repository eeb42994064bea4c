"""GradNorm under plain DistributedDataParallel, launched by torchrun: ``bal.loss(...).backward()``.

Each process trains the DDP-wrapped model on its own half (1/P) of every batch. The total's
backward takes GradNorm's step: its all-reduces (of the T losses and of the per-task
gradients at W) run once autograd has finished that backward, beside DDP's gradient
all-reduces. GradNorm synchronises without being told (its ``distributed`` defaults to
following the process group), so every process ends with the weights one process would
reach on the whole batches.

    torchrun --standalone --nproc_per_node 2 examples/ddp_torchrun.py     # 2 CPU processes
    python examples/ddp_torchrun.py                                       # 1 process, no DDP

The model, data and GradNorm's settings are those of ``multitask.py``, next to this file.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from multitask import MODEL_LR, make_balancer, make_data, make_model, shard_rows, task_losses
from torch import distributed as dist
from torch.nn.parallel import DistributedDataParallel


def train(steps: int = 20, batch_size: int = 32, seed: int = 0
          ) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Train in this process (DDP when torchrun started several); the model and balancer."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    model, bal = make_model(seed), make_balancer()
    ddp = DistributedDataParallel(model) if world > 1 else model
    opt = torch.optim.Adam(ddp.parameters(), lr=MODEL_LR)
    x, y = make_data(steps, batch_size, seed)
    rows = shard_rows(steps, batch_size, rank, world).view(steps, -1)
    for s in range(steps):
        xb, yb = x[rows[s]], y[rows[s]]
        opt.zero_grad()
        total = bal.loss(task_losses(ddp(xb, bal), yb), shared=model.last_shared)
        total.backward()  # DDP averages the gradients; GradNorm's step, synchronised
        opt.step()
    return model, bal


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", type=Path, help="save each process's final weights and "
                        "model parameters to OUT/rank<r>.pt")
    args = parser.parse_args()
    if "WORLD_SIZE" in os.environ:  # started by torchrun
        torch.set_num_threads(1)
        dist.init_process_group("gloo")
    try:
        model, bal = train(args.steps, args.batch_size)
        rank = dist.get_rank() if dist.is_initialized() else 0
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            torch.save({"weights": bal.weights, "model": model.state_dict()},
                       args.out / f"rank{rank}.pt")
        if rank == 0:
            print("weights", [round(w, 6) for w in bal.weights.tolist()])
            print("G_i    ", [round(g, 6) for g in bal.stats["grad_norm"].tolist()])
        if dist.is_initialized():
            # every process done before any leaves: gloo aborts a process whose peer tears the
            # group down first ("terminate called without an active exception", seen once in CI)
            dist.barrier()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
