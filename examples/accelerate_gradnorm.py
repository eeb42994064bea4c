"""GradNorm with Hugging Face Accelerate: ``accelerator.backward(bal.loss(...))``.

``accelerator.backward`` runs the backward (through its gradient scaler when it has one); the
total's ordinary backward takes GradNorm's step. Launched on several processes (``accelerate
launch`` or ``torchrun``), Accelerate starts the process group and GradNorm synchronises by
itself (its ``distributed`` defaults to following the process group).

    python examples/accelerate_gradnorm.py                          # CPU, float32
    python examples/accelerate_gradnorm.py --mixed-precision bf16   # bfloat16 autocast
    python examples/accelerate_gradnorm.py --accumulate 2           # gradient_accumulation_steps=2

With ``--accumulate k``, ``accelerator.backward`` divides the total by k and the optimizer
steps every k micro-batches (``accelerator.accumulate(model)``); the balancer is
``GradNorm(accumulation_steps=k, caller_divides=True)``: one GradNorm step a window, and
``bal.loss`` leaves the division by k to Accelerate.

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
          mixed_precision: str = "no", accumulate: int = 1
          ) -> tuple[torch.nn.Module, lb.GradNorm]:
    """Train for ``steps`` optimizer steps on the CPU, each of ``accumulate`` micro-batches of
    ``batch_size // accumulate`` rows; the (unwrapped) model and its balancer."""
    if batch_size % accumulate:
        raise ValueError(f"batch_size {batch_size} is not divisible by accumulate {accumulate}")
    accelerator = Accelerator(cpu=True, mixed_precision=mixed_precision,
                              gradient_accumulation_steps=accumulate)
    # accelerator.backward divides the total by gradient_accumulation_steps itself
    model, bal = make_model(seed), make_balancer(accumulate, caller_divides=True)
    opt = torch.optim.Adam(model.parameters(), lr=MODEL_LR)
    model, opt = accelerator.prepare(model, opt)
    # each process its own 1/P of every batch, in order (see multitask.shard_rows)
    world, rank = accelerator.num_processes, accelerator.process_index
    rows = shard_rows(steps, batch_size, rank, world)
    x, y = make_data(steps, batch_size, seed)
    loader = DataLoader(TensorDataset(x[rows], y[rows]),
                        batch_size=batch_size // (world * accumulate))
    shared = accelerator.unwrap_model(model).last_shared
    for xb, yb in loader:
        with accelerator.accumulate(model):  # the prepared optimizer steps every k calls
            total = bal.loss(task_losses(model(xb, bal), yb), shared=shared)  # sum_i w_i L_i
            accelerator.backward(total)  # takes GradNorm's step too (at a window's end)
            opt.step()
            opt.zero_grad()
    return accelerator.unwrap_model(model), bal


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--mixed-precision", default="no", choices=["no", "bf16"])
    parser.add_argument("--accumulate", type=int, default=1,
                        help="gradient_accumulation_steps: micro-batches a step")
    args = parser.parse_args()
    _, bal = train(args.steps, args.batch_size, mixed_precision=args.mixed_precision,
                   accumulate=args.accumulate)
    print("weights", [round(w, 6) for w in bal.weights.tolist()])
    print("G_i    ", [round(g, 6) for g in bal.stats["grad_norm"].tolist()])


if __name__ == "__main__":
    main()
