"""Two CPU processes (gloo) for the DDP tests: spawn, initialise the group, run, collect."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import distributed as dist
from torch import multiprocessing as mp


def _worker(rank: int, world: int, store: str, body: Callable, args: tuple, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        torch.save(body(rank, world, *args), f"{out}.{rank}")
        dist.barrier()  # gloo aborts a process whose peer tears the group down first
    finally:
        dist.destroy_process_group()


def run_in_processes(body: Callable, tmp: Path, *args: Any, world: int = 2) -> list:
    """``body(rank, world, *args)`` in ``world`` processes of one gloo group (``body`` at a
    module's top level, so that it pickles); what each returns, by rank."""
    mp.spawn(_worker, args=(world, str(tmp / "store"), body, args, str(tmp / "out")),
             nprocs=world)
    return [torch.load(tmp / f"out.{r}", weights_only=False) for r in range(world)]
