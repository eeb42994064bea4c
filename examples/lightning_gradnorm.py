"""GradNorm inside PyTorch Lightning: ``training_step`` returns ``bal.loss(...)``.

Lightning runs the backward (through its precision plugin's gradient scaler, if any) and the
optimizer; the total's ordinary backward takes GradNorm's step. The balancer is a submodule
of the LightningModule, so its weights go into Lightning's checkpoints. Under DDP it
synchronises by itself (its ``distributed`` defaults to following the process group).

    python examples/lightning_gradnorm.py                          # automatic optimisation
    python examples/lightning_gradnorm.py --manual                 # manual optimisation
    python examples/lightning_gradnorm.py --devices 2              # DDP, 2 CPU processes
    python examples/lightning_gradnorm.py --precision bf16-mixed   # bfloat16 autocast
    python examples/lightning_gradnorm.py --accumulate 2           # accumulate_grad_batches=2

With ``--accumulate k`` Lightning divides the returned total by k and steps every k batches;
the balancer is ``GradNorm(accumulation_steps=k, caller_divides=True)``: one GradNorm step a
window, and ``bal.loss`` leaves the division by k to Lightning.

The model, data and GradNorm's settings are those of ``multitask.py``, next to this file.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning.pytorch as pl
import torch
from multitask import (
    MODEL_LR,
    T,
    log_values,
    make_balancer,
    make_data,
    make_model,
    shard_rows,
    task_losses,
)
from torch.utils.data import DataLoader, TensorDataset


class GradNormModule(pl.LightningModule):
    """The multi-task model and its GradNorm balancer; ``manual=True`` for manual
    optimisation (``self.manual_backward(bal.loss(...))``); ``accumulate`` = k for
    ``Trainer(accumulate_grad_batches=k)`` (automatic optimisation): each of the ``steps``
    batches of ``batch_size`` rows comes as k micro-batches."""

    def __init__(self, steps: int = 20, batch_size: int = 32, seed: int = 0,
                 manual: bool = False, accumulate: int = 1) -> None:
        super().__init__()
        if batch_size % accumulate:
            raise ValueError(f"batch_size {batch_size} is not divisible by accumulate "
                             f"{accumulate}")
        self.steps, self.batch_size, self.seed = steps, batch_size, seed
        self.accumulate = accumulate
        self.net = make_model(seed)
        # Lightning divides the returned total by accumulate_grad_batches itself
        self.bal = make_balancer(accumulate, caller_divides=True)
        self.automatic_optimization = not manual

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        x, y = batch
        losses = task_losses(self.net(x, self.bal), y)
        total = self.bal.loss(losses, shared=self.net.last_shared)  # sum_i w_i L_i
        if self.automatic_optimization:
            return total  # Lightning's backward of it takes GradNorm's step
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(total)
        opt.step()
        return None

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        # after the backward: bal.stats holds this step's weights and G_i
        self.log_dict(log_values(self.bal), on_step=True, on_epoch=False)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.net.parameters(), lr=MODEL_LR)

    def train_dataloader(self) -> DataLoader:
        # each process its own 1/P of every batch, in order (see multitask.shard_rows)
        world = self.trainer.world_size
        rows = shard_rows(self.steps, self.batch_size, self.global_rank, world)
        x, y = make_data(self.steps, self.batch_size, self.seed)
        return DataLoader(TensorDataset(x[rows], y[rows]),
                          batch_size=self.batch_size // (world * self.accumulate))


def make_trainer(steps: int, devices: int = 1, precision: str = "32-true",
                 plugins: list | None = None, accumulate: int = 1) -> pl.Trainer:
    """A CPU trainer for ``steps`` optimizer steps of ``accumulate`` batches each, quiet;
    DDP over gloo when ``devices`` > 1."""
    return pl.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
        precision=None if plugins else precision, plugins=plugins, max_steps=steps,
        accumulate_grad_batches=accumulate,
        max_epochs=1, use_distributed_sampler=False, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--devices", type=int, default=1, help="CPU processes (DDP if > 1)")
    parser.add_argument("--manual", action="store_true", help="manual optimisation")
    parser.add_argument("--precision", default="32-true", help="e.g. bf16-mixed")
    parser.add_argument("--accumulate", type=int, default=1,
                        help="accumulate_grad_batches (automatic optimisation)")
    parser.add_argument("--out", type=Path, help="save each process's final weights and "
                        "model parameters to OUT/rank<r>.pt")
    args = parser.parse_args()
    torch.set_num_threads(1)
    module = GradNormModule(args.steps, args.batch_size, manual=args.manual,
                            accumulate=args.accumulate)
    trainer = make_trainer(args.steps, args.devices, args.precision, accumulate=args.accumulate)
    trainer.fit(module)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        torch.save({"weights": module.bal.weights, "model": module.net.state_dict()},
                   args.out / f"rank{trainer.global_rank}.pt")
    if trainer.is_global_zero:  # the final weights; G_i of the last step (also logged)
        print("weights", [round(w, 6) for w in module.bal.weights.tolist()])
        print("G_i    ", [round(float(trainer.callback_metrics[f"G_{i}"]), 6) for i in range(T)])


if __name__ == "__main__":
    main()
