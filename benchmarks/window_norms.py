"""What exact norms at parameters cost under gradient accumulation, same run.

Workload: step_overhead.py's (the paper's toy trunk, one linear head per task, batch 128, norms
at the last shared layer's weight, fast path), as k micro-batches of 128 / k rows per
optimizer step. For each T and k the script times, against the plain equal-weights step over
the same k micro-batches,

  exact   GradNorm(accumulation_steps=k): each call keeps the T per-task gradients at W
          (dW_i, T x |W| numbers) and the window sums them: G_i of the whole batch
  mean    GradNorm(accumulation_steps=k, parameter_norms="mean"): the calls' norms summed,
          an upper bound of G_i

and prints the time ratio (median of interleaved blocks, as step_overhead.py) and the
peak-memory ratio.

    python benchmarks/window_norms.py
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).parent))
from _harness import Rows, TrunkHeads, interleaved_ratio, machine_name, peak_memory, write_csv

import lossbalance as lb


def build(method: str, T: int, micro: int, batch: int) -> Callable[[], None]:
    """One optimizer step of ``method`` over ``micro`` micro-batches, on a fresh model."""
    torch.manual_seed(0)
    model = TrunkHeads(T)
    x = torch.randn(batch, 250)
    ys = [torch.randn(batch, 100) for _ in range(T)]
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    heads, W = list(model.heads), model.last_shared
    parts = [slice(m * batch // micro, (m + 1) * batch // micro) for m in range(micro)]
    bal = None if method == "plain" else lb.GradNorm(
        T, alpha=0.12, lr=0.025, accumulation_steps=micro, parameter_norms=method)

    def step() -> None:
        opt.zero_grad()
        for rows in parts:
            h = model.trunk(x[rows])
            feats = (h,) * T if bal is None else bal.tap(h)
            losses = [F.mse_loss(heads[i](feats[i]), ys[i][rows]) for i in range(T)]
            if bal is None:
                (torch.stack(losses).sum() / micro).backward()
            else:
                bal.backward(losses, shared=W)
        opt.step()
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default="10,64", help="comma-separated T values")
    parser.add_argument("--micro", default="2,4", help="comma-separated micro-batch counts")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--reps", type=int, default=11)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--csv", default="benchmarks/results/window_norms.csv")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    machine = machine_name(cpu, args.threads)
    print(f"# exact vs mean norms at W under accumulation on {machine}, torch "
          f"{torch.__version__}")
    header = ("tasks", "micro", "method", "plain_ms", "time_ratio", "peak_mem_ratio")
    rows = Rows(header)
    for T in [int(t) for t in args.tasks.split(",")]:
        for micro in [int(k) for k in args.micro.split(",")]:
            plain = build("plain", T, micro, args.batch)
            mem_plain = peak_memory(partial(build, "plain", T, micro, args.batch), cpu)
            for method in ("exact", "mean"):
                other = build(method, T, micro, args.batch)
                for _ in range(3):
                    plain()
                    other()
                timing = interleaved_ratio(plain, other, args.reps, args.steps, cpu)
                mem = peak_memory(partial(build, method, T, micro, args.batch), cpu)
                rows.add({"tasks": T, "micro": micro, "method": method,
                          "plain_ms": round(timing["base_ms"], 3),
                          "time_ratio": round(timing["ratio"], 3),
                          "peak_mem_ratio": round(mem / mem_plain, 3)})
    out = Path(args.csv)
    write_csv(out, [{**row, "machine": machine} for row in rows.rows])
    print(f"# wrote {out}")


if __name__ == "__main__":
    main()
