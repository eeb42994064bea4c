"""Shared pieces of the benchmarks: models, timing in interleaved blocks, peak memory."""

from __future__ import annotations

import csv
import importlib
import importlib.util
import statistics
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

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


def peak_memory(factory: Callable[[], Callable[[], None]], device: torch.device,
                warmup: int = 3) -> int:
    """Peak bytes live during one training step, everything included.

    ``factory`` builds the model, the batch, the optimizer and whatever the method keeps, and
    returns the step. On CPU the whole life of those allocations is recorded by the profiler
    (so frees are matched to their allocations) and the peak of the live total is read during
    the last step; on CUDA it is ``max_memory_allocated`` during that step.
    """
    if device.type == "cuda":
        sync(device)
        step = factory()
        for _ in range(warmup):
            step()
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        sync(device)
        return torch.cuda.max_memory_allocated(device)
    import gc

    from torch.profiler import ProfilerActivity, profile

    # Earlier runs' garbage, collected inside the window, would free blocks the profiler
    # never saw allocated: collect it now and keep the collector off while recording.
    gc.collect()
    gc.disable()
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step = factory()
            for _ in range(warmup):
                step()
            with torch.profiler.record_function("measured_step"):
                step()
    finally:
        gc.enable()
    events = prof.profiler.kineto_results.events()
    window = [e for e in events if e.name() == "measured_step"]
    start, end = window[0].start_ns(), window[0].end_ns()
    live = peak = 0
    for t, nbytes in sorted((e.start_ns(), e.nbytes()) for e in events
                            if e.name() == "[memory]"):
        live += nbytes
        if start <= t <= end:
            peak = max(peak, live)
    return peak


class Rows:
    """A benchmark's result rows (dicts), each printed as it comes, ``|``-separated."""

    def __init__(self, header: tuple[str, ...]) -> None:
        self.header, self.rows = header, []
        print(" | ".join(header))

    def add(self, row: dict) -> None:
        self.rows.append(row)
        print(" | ".join(str(row[k]) for k in self.header), flush=True)


def write_csv(path: Path, rows: list[dict]) -> None:
    """Rows (dicts with the same keys) as a CSV file, creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


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


def load_libmtl(name: str) -> type:
    """LibMTL's weighting class ``name``, without running LibMTL/__init__ (it imports
    torchvision, which does not load beside a local torch build)."""
    module_name = f"LibMTL.weighting.{name}"
    if module_name in sys.modules:
        return getattr(sys.modules[module_name], name)
    if "LibMTL" in sys.modules:  # the empty package made by an earlier call
        root = Path(sys.modules["LibMTL"].__path__[0])
    else:
        spec = importlib.util.find_spec("LibMTL")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("LibMTL is not installed (pip install -e '.[bench]')")
        root = Path(next(iter(spec.submodule_search_locations)))
    for pkg, path in (("LibMTL", root), ("LibMTL.weighting", root / "weighting")):
        if pkg not in sys.modules:
            module = types.ModuleType(pkg)
            module.__path__ = [str(path)]
            sys.modules[pkg] = module
    return getattr(importlib.import_module(module_name), name)
