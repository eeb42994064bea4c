"""GradNorm with Hugging Face Accelerate: ``accelerator.backward(bal.loss(...))``.

``accelerator.backward`` runs the backward (through its gradient scaler when it has one); the
total's ordinary backward takes GradNorm's step. Launched on several processes (``accelerate
launch`` or ``torchrun``), Accelerate starts the process group and GradNorm synchronises by
itself (its ``distributed`` defaults to following the process group).

    python examples/accelerate_gradnorm.py                          # CPU, float32
    python examples/accelerate_gradnorm.py --mixed-precision bf16   # bfloat16 autocast

The model, data and GradNorm's settings are those of ``multitask.py``, next to this file.
"""

from __future__ import annotations

import argparse

import torch
from accelerate import Accelerator
from multitask import MODEL_LR, make_balancer, make_data, make_model, shard_rows, task_losses
from torch.utils.data import DataLoader, TensorDataset

import lossbalance as lb


def train(steps: int = 20, batch_size: int = 32, seed: int = 0,
          mixed_precision: str = "no") -> tuple[torch.nn.Module, lb.GradNorm]:
    """Train for ``steps`` steps on the CPU; the (unwrapped) model and its balancer."""
    accelerator = Accelerator(cpu=True, mixed_precision=mixed_precision)
    model, bal = make_model(seed), make_balancer()
    opt = torch.optim.Adam(model.parameters(), lr=MODEL_LR)
    model, opt = accelerator.prepare(model, opt)
    # each process its own 1/P of every batch, in order (see multitask.shard_rows)
    world, rank = accelerator.num_processes, accelerator.process_index
    rows = shard_rows(steps, batch_size, rank, world)
    x, y = make_data(steps, batch_size, seed)
    loader = DataLoader(TensorDataset(x[rows], y[rows]), batch_size=batch_size // world)
    shared = accelerator.unwrap_model(model).last_shared
    for xb, yb in loader:
        opt.zero_grad()
        total = bal.loss(task_losses(model(xb, bal), yb), shared=shared)  # sum_i w_i L_i
        accelerator.backward(total)  # takes GradNorm's step too
        opt.step()
    return accelerator.unwrap_model(model), bal


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--mixed-precision", default="no", choices=["no", "bf16"])
    args = parser.parse_args()
    _, bal = train(args.steps, args.batch_size, mixed_precision=args.mixed_precision)
    print("weights", [round(w, 6) for w in bal.weights.tolist()])
    print("G_i    ", [round(g, 6) for g in bal.stats["grad_norm"].tolist()])


if __name__ == "__main__":
    main()
