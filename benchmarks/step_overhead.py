"""Step overhead of lossbalance's GradNorm against the plain equal-weights step, same run.

Workload: the GradNorm paper's toy trunk (250 -> 4 x 100 ReLU), one 100 -> 100 linear head per
task, batch 128, MSE per task, SGD on the model. For each T the script times

  plain      zero_grad; forward; sum(losses).backward(); opt.step()          (the baseline)
  fast/W     bal.tap(h) + bal.backward(losses, shared=last_shared_weight)
  fast/h     bal.tap(h) + bal.backward(losses)                (norms at h)
  general/W  bal.backward(losses, shared=last_shared_weight)  (no tap: batched per-task grads)
  general/h  bal.backward(losses, shared=h)
  literal/W  Algorithm 1 as usually written: one create_graph backward per task

Timing: blocks of ``--steps`` steps of the baseline and of the method, interleaved
(a, b, a, b, ...) ``--reps`` times; the ratio is the median of the per-pair ratios, with the
25th-75th percentile spread. Memory: the peak bytes live during a step, everything counted
(model, gradients, optimizer and balancer state, kept buffers, the batch, the step's
temporaries), as a ratio to the baseline's: the profiler's allocation record from before the
model is built on CPU, ``max_memory_allocated`` on CUDA.

    python benchmarks/step_overhead.py                      # T = 2, 10, 64 on 2 CPU threads
    python benchmarks/step_overhead.py --device cuda
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).parent))
from _harness import Rows, TrunkHeads, interleaved_ratio, machine_name, peak_memory, write_csv

import lossbalance as lb

METHODS = ("fast/W", "fast/h", "general/W", "general/h", "literal/W")


def make_step(method: str, model: TrunkHeads, x: torch.Tensor, ys: list[torch.Tensor]
              ) -> Callable[[], None]:
    """One training step of ``method`` on ``model``."""
    T = len(ys)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    W = model.trunk[-2].weight
    heads = list(model.heads)

    if method == "plain":
        def step() -> None:
            opt.zero_grad()
            h = model.trunk(x)
            losses = [F.mse_loss(heads[i](h), ys[i]) for i in range(T)]
            torch.stack(losses).sum().backward()
            opt.step()
        return step

    if method == "literal/W":
        w = torch.ones(T, device=x.device, requires_grad=True)
        wopt = torch.optim.Adam([w], lr=0.025)
        l0: list[torch.Tensor] = []

        def step() -> None:
            opt.zero_grad()
            h = model.trunk(x)
            L = torch.stack([F.mse_loss(heads[i](h), ys[i]) for i in range(T)])
            if not l0:
                l0.append(L.detach())
            G = torch.stack([
                torch.autograd.grad(w[i] * L[i], W, retain_graph=True, create_graph=True)[0].norm()
                for i in range(T)
            ])
            ratio = L.detach() / l0[0]
            target = (G.mean() * (ratio / ratio.mean()) ** 0.12).detach()
            w.grad = torch.autograd.grad((G - target).abs().sum(), w, retain_graph=True)[0]
            (w.detach() * L).sum().backward()
            wopt.step()
            with torch.no_grad():
                w.mul_(T / w.sum())
            opt.step()
        return step

    path, where = method.split("/")
    bal = lb.GradNorm(T, alpha=0.12, lr=0.025).to(x.device)

    def step() -> None:
        opt.zero_grad()
        h = model.trunk(x)
        feats = bal.tap(h) if path == "fast" else (h,) * T
        losses = [F.mse_loss(heads[i](feats[i]), ys[i]) for i in range(T)]
        shared = W if where == "W" else None if path == "fast" else h
        bal.backward(losses, shared=shared)
        opt.step()
    return step


def build(method: str, T: int, args: argparse.Namespace, device: torch.device
          ) -> Callable[[], None]:
    """The step of ``method`` on a fresh model and batch (the same for every method)."""
    torch.manual_seed(0)
    model = TrunkHeads(T).to(device)
    x = torch.randn(args.batch, 250, device=device)
    ys = [torch.randn(args.batch, 100, device=device) for _ in range(T)]
    return make_step(method, model, x, ys)


def measure(T: int, method: str, args: argparse.Namespace, device: torch.device) -> dict:
    plain = build("plain", T, args, device)
    other = build(method, T, args, device)
    for _ in range(args.warmup):
        plain()
        other()
    timing = interleaved_ratio(plain, other, args.reps, args.steps, device)
    mem_plain = peak_memory(lambda: build("plain", T, args, device), device)
    mem_other = peak_memory(lambda: build(method, T, args, device), device)
    return {
        "tasks": T,
        "method": method,
        "plain_ms": round(timing["base_ms"], 3),
        "time_ratio": round(timing["ratio"], 3),
        "ratio_p25": round(timing["p25"], 3),
        "ratio_p75": round(timing["p75"], 3),
        "peak_mem_ratio": round(mem_other / mem_plain, 3),
        "plain_peak_mb": round(mem_plain / 2**20, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default="2,10,64", help="comma-separated T values")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--csv", default="benchmarks/results/step_overhead.csv")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    machine = machine_name(device, args.threads)
    print(f"# lossbalance step overhead on {machine}, torch {torch.__version__}")
    header = ("tasks", "method", "plain_ms", "time_ratio", "ratio_p25", "ratio_p75",
              "peak_mem_ratio", "plain_peak_mb")
    rows = Rows(header)
    for T in [int(t) for t in args.tasks.split(",")]:
        for method in args.methods.split(","):
            rows.add(measure(T, method, args, device))
    out = Path(args.csv)
    write_csv(out, [{**row, "machine": machine} for row in rows.rows])
    print(f"# wrote {out}")


if __name__ == "__main__":
    main()
