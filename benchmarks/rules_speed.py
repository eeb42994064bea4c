"""Micro-benchmark of the aggregation rules (``lossbalance._rules``): microseconds per call.

For each rule and each T, random Jacobians J [T, P] (P = 500, so G = J J^T has rank min(T, P))
with task norms spread over 1e-1..1e1, their Gram matrices in ``--dtype`` (float32, as the
Aggregator balancers measure them), and the median wall time of one call over ``--reps`` calls
cycling through ``--matrices`` matrices. With ``--compare-to REF`` the rules of git ref REF
(``git archive REF src/lossbalance/_rules``, loaded as a second package) are timed in the same
process, the two versions' calls interleaved (old, new, old, new, ...), so a busy machine slows
both alike; the speed-up is old median / new median.

    python benchmarks/rules_speed.py                          # T = 2, 10, 64
    python benchmarks/rules_speed.py --compare-to HEAD~3 --rules pcgrad cagrad
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch

ROOT = Path(__file__).resolve().parent.parent
RULES = ("mgda", "upgrad", "pcgrad", "imtl_g", "cagrad", "aligned_mtl", "nash_mtl")


def load_rules_at(ref: str, into: Path) -> ModuleType:
    """``lossbalance._rules`` as it is at git ref ``ref``, imported as the package ``old_rules``
    (the rules import only each other, relatively)."""
    tar = subprocess.run(["git", "archive", ref, "src/lossbalance/_rules"], cwd=ROOT,
                         check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        archive.extractall(into, filter="data")
    init = into / "src" / "lossbalance" / "_rules" / "__init__.py"
    spec = importlib.util.spec_from_file_location("old_rules", init,
                                                  submodule_search_locations=[str(init.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["old_rules"] = module
    spec.loader.exec_module(module)
    return module


def rule_call(rules: ModuleType, name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The rule with its balancer's default arguments (PCGrad: a seeded generator)."""
    fn = getattr(rules, f"{name}_weights")
    if name == "pcgrad":
        generator = torch.Generator().manual_seed(0)
        return lambda g: fn(g, generator=generator)
    return fn


def grams(T: int, P: int, count: int, dtype: torch.dtype) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(T)
    out = []
    for _ in range(count):
        scales = 10 ** (2 * torch.rand(T, 1, generator=gen, dtype=torch.float64) - 1)
        J = torch.randn(T, P, generator=gen, dtype=torch.float64) * scales
        out.append((J @ J.T).to(dtype))
    return out


def median_us(calls: list[Callable[[torch.Tensor], torch.Tensor]], inputs: list[torch.Tensor],
              reps: int) -> list[float]:
    """Median microseconds per call of each of ``calls``, interleaved call by call."""
    times: list[list[float]] = [[] for _ in calls]
    for fn in calls:  # warm-up (imports, caches)
        fn(inputs[0])
    for k in range(reps):
        g = inputs[k % len(inputs)]
        for fn, t in zip(calls, times, strict=True):
            start = time.perf_counter()
            fn(g)
            t.append(time.perf_counter() - start)
    return [1e6 * statistics.median(t) for t in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rules", nargs="+", choices=RULES, default=list(RULES))
    parser.add_argument("--tasks", nargs="+", type=int, default=[2, 10, 64])
    parser.add_argument("--params", type=int, default=500, help="P, the gradients' length")
    parser.add_argument("--reps", type=int, default=200, help="calls per rule, T and version")
    parser.add_argument("--matrices", type=int, default=20)
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--compare-to", metavar="REF", help="a git ref to time against")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args()
    if min(args.tasks) < 2 or args.reps < 1 or args.matrices < 1:
        parser.error("--tasks must be >= 2, --reps and --matrices >= 1")
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    sys.path.insert(0, str(ROOT / "src"))
    import lossbalance._rules as new

    with tempfile.TemporaryDirectory() as tmp:
        old = load_rules_at(args.compare_to, Path(tmp)) if args.compare_to else None
        header = f"{'rule':<12} {'T':>3} {'new us':>10}"
        if old is not None:
            header += f" {args.compare_to + ' us':>14} {'speed-up':>9}"
        print(f"# median us per call, P = {args.params}, {args.dtype} G, {args.reps} calls, "
              f"{torch.get_num_threads()} torch thread(s)")
        print(header)
        for name in args.rules:
            for T in args.tasks:
                inputs = grams(T, args.params, args.matrices, dtype)
                # the slow old rules at T = 64: fewer calls (at least 20)
                reps = args.reps if T <= 16 else max(20, args.reps // 5)
                calls = [rule_call(new, name)]
                if old is not None:
                    calls.append(rule_call(old, name))
                us = median_us(calls, inputs, reps)
                line = f"{name:<12} {T:>3} {us[0]:>10.1f}"
                if old is not None:
                    line += f" {us[1]:>14.1f} {us[1] / us[0]:>8.1f}x"
                print(line, flush=True)


if __name__ == "__main__":
    main()
