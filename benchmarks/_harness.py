"""Shared pieces of the benchmarks: models, timing in interleaved blocks, peak memory."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch import nn


class TrunkHeads(nn.Module):
    """250 -> depth x width ReLU trunk, one width -> out linear head per task."""

    def __init__(self, num_tasks: int, width: int = 100, out: int = 100, depth: int = 4) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        d = 250
        for _ in range(depth):
            layers += [nn.Linear(d, width), nn.ReLU()]
            d = width
        self.trunk = nn.Sequential(*layers)
        self.heads = nn.ModuleList(nn.Linear(width, out) for _ in range(num_tasks))

    @property
    def last_shared(self) -> nn.Parameter:
        return self.trunk[-2].weight


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_block(step: Callable[[], None], n: int, device: torch.device) -> float:
    """Mean seconds per step over ``n`` steps."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    sync(device)
    return (time.perf_counter() - t0) / n


def interleaved_ratio(base: Callable[[], None], other: Callable[[], None], reps: int,
                      steps: int, device: torch.device) -> dict:
    """Blocks of base and other, alternated ``reps`` times: median ratio and its quartiles."""
    ratios, base_times = [], []
    for _ in range(reps):
        a = time_block(base, steps, device)
        b = time_block(other, steps, device)
        ratios.append(b / a)
        base_times.append(a)
    q = statistics.quantiles(ratios, n=4) if len(ratios) >= 2 else [ratios[0]] * 3
    return {"base_ms": statistics.median(base_times) * 1e3, "ratio": statistics.median(ratios),
            "p25": q[0], "p75": q[2]}


def resident_bytes(model: nn.Module, tensors: list[torch.Tensor]) -> int:
    """Bytes that live across steps for every method: parameters, their gradients, the batch."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return 2 * params + sum(t.numel() * t.element_size() for t in tensors)


def peak_step_bytes(step: Callable[[], None], device: torch.device) -> int:
    """Peak bytes allocated during one step above what was live before it."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]"
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def machine_name(device: torch.device, threads: int) -> str:
    import platform

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {threads} threads"
