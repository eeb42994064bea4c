"""Two versions of lossbalance against the plain step, interleaved step by step in one process.

The step-overhead table moves by several hundredths between runs on a shared machine (the
plain step's time drifts); comparing a change against the code before it is steadier when
both run in the same process, alternating plain / old / new and plain / new / old steps:

    git worktree add /tmp/before HEAD~1
    python benchmarks/compare_versions.py --old /tmp/before/src --new src --tasks 10 --where h
    python benchmarks/compare_versions.py --old-python --tasks 10 --where h  # C++ vs Python step

prints the median step time of each as a ratio to the plain equal-weights step.
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).parent))
from _harness import TrunkHeads


def load(src: str, alias: str):
    """Import the ``lossbalance`` package under ``src`` and file it under ``alias``."""
    for name in [n for n in sys.modules if n == "lossbalance" or n.startswith("lossbalance.")]:
        sys.modules[f"_{id(sys.modules[name])}_{name}"] = sys.modules.pop(name)
    sys.path.insert(0, str(Path(src).resolve()))
    try:
        module = importlib.import_module("lossbalance")
    finally:
        sys.path.pop(0)
    for name in [n for n in sys.modules if n == "lossbalance" or n.startswith("lossbalance.")]:
        sys.modules[f"{alias}.{name}"] = sys.modules.pop(name)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", help="the src/ folder of the old version")
    parser.add_argument("--old-python", action="store_true",
                        help="old: the new version's balancer with LOSSBALANCE_NATIVE=0 (the "
                        "Python step instead of the C++ one); no --old then")
    parser.add_argument("--new", default="src", help="the src/ folder of the new version")
    parser.add_argument("--tasks", type=int, default=10)
    parser.add_argument("--where", choices=("W", "h"), default="W")
    parser.add_argument("--path", choices=("fast", "general"), default="fast",
                        help="fast: heads read bal.tap(h); general: no tap (shared=h at h)")
    parser.add_argument("--seq", type=int, default=1,
                        help="L > 1: the 128 rows as 128/L sequences of L tokens ([B, L, 250])")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.old_python == (args.old is not None):
        parser.error("give one of --old and --old-python")
    if args.old_python:
        new = load(args.new, "new")
        versions = {"old": new, "new": new}
    else:
        versions = {"old": load(args.old, "old"), "new": load(args.new, "new")}
        if versions["old"].__file__ == versions["new"].__file__:
            parser.error(f"--old and --new both load {versions['new'].__file__}")
    print(f"# old: {versions['old'].__file__}\n# new: {versions['new'].__file__}")
    T = args.tasks
    torch.manual_seed(0)
    model = TrunkHeads(T)
    rows = (128,) if args.seq == 1 else (128 // args.seq, args.seq)
    x, ys = torch.randn(*rows, 250), [torch.randn(*rows, 100) for _ in range(T)]
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    shared = model.last_shared if args.where == "W" else None
    bals = {k: v.GradNorm(T, alpha=0.12) for k, v in versions.items()}

    def step(kind: str) -> None:
        opt.zero_grad()
        h = model.trunk(x)
        if kind == "plain":
            losses = [F.mse_loss(model.heads[i](h), ys[i]) for i in range(T)]
            torch.stack(losses).sum().backward()
        else:
            fast = args.path == "fast"
            feats = bals[kind].tap(h) if fast else (h,) * T
            losses = [F.mse_loss(model.heads[i](feats[i]), ys[i]) for i in range(T)]
            # without the tap, norms "at h" are norms at the tensor h itself
            at = h if shared is None and not fast else shared
            bals[kind].backward(losses, shared=at)
        opt.step()

    if args.old_python:  # a balancer decides on its first step whether to use the C++ step
        os.environ["LOSSBALANCE_NATIVE"] = "0"
        step("old")
        del os.environ["LOSSBALANCE_NATIVE"]
    times: dict[str, list[float]] = {"plain": [], "old": [], "new": []}
    # the version that runs right after the other one finds the caches warm for the step's
    # shared code paths (measured: identical code ran 0.015x faster second), so the two
    # orders alternate
    orders = (("plain", "old", "new"), ("plain", "new", "old"))
    for r in range(args.steps + 30):
        for kind in orders[r % 2]:
            t0 = time.perf_counter()
            step(kind)
            if r >= 30:  # warm-up
                times[kind].append(time.perf_counter() - t0)
    plain = statistics.median(times["plain"])
    print(f"T={T}, {args.path} path, norms at {args.where}: plain step {plain * 1e3:.3f} ms; "
          f"old {statistics.median(times['old']) / plain:.3f}x; "
          f"new {statistics.median(times['new']) / plain:.3f}x")


if __name__ == "__main__":
    main()
