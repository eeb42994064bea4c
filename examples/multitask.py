"""The multi-task problem the trainer examples share, and the plain loop they are checked against.

The GradNorm paper's toy problem (Chen et al., ICML 2018, Section 4) with T = 3 regression
tasks whose targets differ in scale (sigma = 1, 10, 100): its 250 -> 4 x 100 ReLU trunk, one
affine head per task, and GradNorm (alpha = 1.5) measuring the gradient norms G_i at the last
shared layer's weight W through the fast path (``bal.tap(h)`` on the trunk's output).

Batches are the training set's rows in order, ``batch_size`` at a time. Under data
parallelism each of P processes takes its own contiguous 1/P of every batch (``shard_rows``),
so that P processes together see exactly the one-process batches: no sampler, no shuffling.

    python examples/multitask.py --steps 20      # the plain loop: bal.backward(losses, shared)
"""

from __future__ import annotations

import argparse
from contextlib import nullcontext

import torch
from torch import Tensor
from torch.nn import functional as F

import lossbalance as lb
from lossbalance.experiments.toy import ToyNet, make_toy_data, task_sigmas

T = 3
ALPHA, BALANCER_LR, MODEL_LR = 1.5, 0.025, 1e-3


class TaskNet(ToyNet):
    """ToyNet whose forward taps h, so that a DDP wrapper holds the whole step."""

    def forward(self, x: Tensor, bal: lb.Balancer) -> list[Tensor]:
        feats = bal.tap(self.trunk(x))
        return [head(f) for head, f in zip(self.heads, feats, strict=True)]


def make_model(seed: int = 0) -> TaskNet:
    torch.manual_seed(seed)
    return TaskNet(T)


def make_balancer(accumulation_steps: int = 1, caller_divides: bool = False) -> lb.GradNorm:
    """GradNorm at alpha 1.5; ``accumulation_steps`` micro-batches a window, and
    ``caller_divides=True`` where a trainer divides the total by them itself."""
    return lb.GradNorm(T, alpha=ALPHA, lr=BALANCER_LR, accumulation_steps=accumulation_steps,
                       caller_divides=caller_divides)


def make_data(steps: int, batch_size: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """x [steps * batch_size, 250] and the targets y [steps * batch_size, T, 100]."""
    data = make_toy_data(T, task_sigmas(T), steps * batch_size, 0, seed)
    return data.x_train, torch.stack(data.y_train, dim=1)


def shard_rows(steps: int, batch_size: int, rank: int = 0, world: int = 1) -> Tensor:
    """The rows process ``rank`` of ``world`` trains on, batch after batch: its contiguous
    1/world of each batch of ``batch_size`` rows."""
    if batch_size % world:
        raise ValueError(f"batch_size {batch_size} is not divisible by {world} processes")
    part = batch_size // world
    return torch.cat([torch.arange(s * batch_size + rank * part, s * batch_size + (rank + 1) * part)
                      for s in range(steps)])


def task_losses(outs: list[Tensor], y: Tensor) -> list[Tensor]:
    """L_i: the mean squared error of head i's prediction of task i's targets."""
    return [F.mse_loss(out, y[:, i]) for i, out in enumerate(outs)]


def log_values(bal: lb.GradNorm) -> dict[str, Tensor]:
    """The weights w_i and the gradient norms G_i of the last step, one scalar each (none
    before the first step, e.g. inside the first accumulation window)."""
    stats = bal.stats
    if not stats:
        return {}
    return {**{f"w_{i}": w for i, w in enumerate(stats["weight"])},
            **{f"G_{i}": g for i, g in enumerate(stats["grad_norm"])}}


def train_by_hand(steps: int = 20, batch_size: int = 32, seed: int = 0,
                  autocast: torch.dtype | None = None,
                  scaler: torch.amp.GradScaler | None = None,
                  accumulate: int = 1) -> tuple[TaskNet, lb.GradNorm]:
    """The plain loop: ``bal.backward`` does the backward and GradNorm's step. ``autocast``:
    run the forward (and the balancer's call, as a trainer does) under CPU autocast of that
    dtype; ``scaler``: a GradScaler applied to the total; ``accumulate``: k micro-batches of
    ``batch_size // k`` rows (each batch's in order) a step, ``GradNorm(accumulation_steps=k)``.
    """
    if batch_size % accumulate:
        raise ValueError(f"batch_size {batch_size} is not divisible by accumulate {accumulate}")
    model, bal = make_model(seed), make_balancer(accumulate)
    opt = torch.optim.Adam(model.parameters(), lr=MODEL_LR)
    x, y = make_data(steps, batch_size, seed)
    micro = batch_size // accumulate
    for s in range(steps):
        opt.zero_grad()
        for m in range(accumulate):
            rows = slice(s * batch_size + m * micro, s * batch_size + (m + 1) * micro)
            region = (nullcontext() if autocast is None
                      else torch.autocast("cpu", dtype=autocast))
            with region:
                losses = task_losses(model(x[rows], bal), y[rows])
                bal.backward(losses, shared=model.last_shared, grad_scaler=scaler)
        if scaler is None:
            opt.step()
        else:
            scaler.step(opt)
            scaler.update()
    return model, bal


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--accumulate", type=int, default=1,
                        help="micro-batches a step (GradNorm's accumulation window)")
    args = parser.parse_args()
    _, bal = train_by_hand(args.steps, args.batch_size, accumulate=args.accumulate)
    print("weights", bal.weights.tolist())


if __name__ == "__main__":
    main()
