"""Every balancer's step against the plain step, and against LibMTL's version of the same method.

For each method, on the toy trunk (250 -> 4 x 100 ReLU, one 100 -> 100 head a task, batch 128)
and T tasks, one run times in interleaved blocks:

  plain        zero_grad, forward, sum(losses).backward(), SGD step
  lossbalance  the same loop with ``bal.tap(h)`` and ``bal.backward(losses, shared=...)``:
               gradients at h (``shared=None``) or at the last shared layer's weight W
  LibMTL       LibMTL 1.1.5's weighting class of the same method in a small harness (its
               trainer is not used): its ``rep_grad`` mode at h, its shared parameters = [W]
               at W; it takes one backward per task (``_compute_grad(mode="backward")``)

Step time and peak memory are ratios to the plain step of the same run (median of the
interleaved blocks, with quartiles), as in ``peers.py``. Loss-based methods need no gradient
and are timed once (``where`` = "-"). LibMTL 1.1.5 has no Nash-MTL, Aligned-MTL, UPGrad,
DB-MTL, FAMO or IMTL-L; its PCGrad and CAGrad refuse ``rep_grad``; its IMTL is IMTL-L and
IMTL-G together (timed against our IMTL-G); its CAGrad runs only at T = 3.

    pip install -c constraints.txt -e ".[bench,solvers]"   # LibMTL: see docs/performance.md
    python benchmarks/methods.py                           # writes results/methods.csv
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).parent))
from _harness import (
    Rows,
    TrunkHeads,
    interleaved_ratio,
    load_libmtl,
    machine_name,
    peak_memory,
    write_csv,
)

import lossbalance as lb

# name: (our class, its options, LibMTL class or None, LibMTL's backward kwargs, kind)
METHODS: dict[str, tuple[str, dict, str | None, dict, str]] = {
    "mgda": ("MGDA", {}, "MGDA", {"mgda_gn": "none"}, "gradient"),
    "pcgrad": ("PCGrad", {}, "PCGrad", {}, "gradient"),
    "cagrad": ("CAGrad", {}, "CAGrad", {"calpha": 0.5, "rescale": 1}, "gradient"),
    "imtl-g": ("IMTLG", {}, "IMTL", {}, "gradient"),
    "nash-mtl": ("NashMTL", {}, None, {}, "gradient"),
    "aligned-mtl": ("AlignedMTL", {}, None, {}, "gradient"),
    "upgrad": ("UPGrad", {}, None, {}, "gradient"),
    "db-mtl": ("DBMTL", {}, None, {}, "gradient"),
    "gradnorm": ("GradNorm", {"alpha": 1.5}, "GradNorm", {"alpha": 1.5}, "gradient"),
    "dwa": ("DWA", {}, "DWA", {"T": 2.0}, "loss"),
    "rlw": ("RLW", {}, "RLW", {"dist": "Normal"}, "loss"),
    "gls": ("GLS", {}, "GLS", {}, "loss"),
    "famo": ("FAMO", {}, None, {}, "loss"),
    "imtl-l": ("IMTLL", {}, None, {}, "loss"),
    "uncertainty": ("UncertaintyWeighting", {}, "UW", {}, "loss"),
}
# gradients at W only: DB-MTL refuses h, as its official code refuses rep_grad
AT_PARAMETERS_ONLY = {"db-mtl"}


def libmtl_supports(method: str, where: str) -> bool:
    cls = METHODS[method][2]
    if cls is None:
        return False
    return not (where == "h" and cls in ("PCGrad", "CAGrad"))


def libmtl_runs(method: str, where: str, T: int) -> bool:
    """Whether LibMTL 1.1.5 runs the method there: its CAGrad hard-codes three tasks
    (``x.reshape(1, 3)`` in its objective)."""
    return libmtl_supports(method, where) and not (METHODS[method][2] == "CAGrad" and T != 3)


class Stepper:
    """One implementation of one method driving one model: ``step()``."""

    def __init__(self, impl: str, method: str, model: TrunkHeads, x: torch.Tensor,
                 ys: list[torch.Tensor], where: str) -> None:
        self.model, self.x, self.ys, self.where, self.method = model, x, ys, where, method
        self.T = len(ys)
        self.opt = torch.optim.SGD(model.parameters(), lr=1e-4)
        self.step: Callable[[], None] = getattr(self, "_" + impl.lower())()

    def _losses(self, feats):
        return [F.mse_loss(self.model.heads[i](feats[i]), self.ys[i]) for i in range(self.T)]

    def _plain(self):
        def step():
            self.opt.zero_grad()
            h = self.model.trunk(self.x)
            losses = self._losses((h,) * self.T)
            torch.stack(losses).sum().backward()
            self.opt.step()
        return step

    def _lossbalance(self):
        cls, options, _, _, kind = METHODS[self.method]
        bal = getattr(lb, cls)(self.T, **options).to(self.x.device)
        if list(bal.parameters()):  # Uncertainty, IMTL-L: their parameters train with the model
            self.opt.add_param_group({"params": list(bal.parameters())})
        shared = self.model.last_shared if self.where == "W" else None

        def step():
            self.opt.zero_grad()
            h = self.model.trunk(self.x)
            losses = self._losses(bal.tap(h))
            if kind == "loss":
                bal.backward(losses)
            else:
                bal.backward(losses, shared=shared)
            self.opt.step()
        return step

    def _libmtl(self):
        _, _, cls, kwargs, _ = METHODS[self.method]
        base = load_libmtl(cls)
        model, T = self.model, self.T
        rep_grad = self.where == "h"

        class Harness(base):  # the attributes LibMTL's trainer would set
            def __init__(self):
                super().__init__()
                self.task_num, self.device, self.rep_grad, self.epoch = T, "cpu", rep_grad, 3
                self.task_name = [str(i) for i in range(T)]
                self.init_param()
                # DWA reads the last two epochs' average losses
                self.train_loss_buffer = torch.rand(T, 3).numpy() + 0.5

            def get_share_params(self):
                return [model.last_shared]

            def zero_grad_share_params(self):  # as LibMTL's encoder.zero_grad(): zeros
                if model.last_shared.grad is not None:
                    model.last_shared.grad.zero_()

        harness = Harness().to(self.x.device)
        harness.device = self.x.device
        extra = list(harness.parameters())
        wopt = torch.optim.Adam(extra, lr=0.025) if extra else None
        first = [True]

        def step():
            self.opt.zero_grad()
            if wopt is not None:
                wopt.zero_grad()
            h = model.trunk(self.x)
            if rep_grad:
                harness.rep = h
                harness.rep_tasks = {str(i): h.detach().clone().requires_grad_()
                                     for i in range(T)}
                feats = [harness.rep_tasks[str(i)] for i in range(T)]
            else:
                feats = (h,) * T
            losses = torch.stack(self._losses(feats))
            if cls == "GradNorm" and first[0]:
                harness.train_loss_buffer = torch.zeros(T, 1)
                harness.train_loss_buffer[:, 0] = losses.detach().cpu()
                first[0] = False
            harness.backward(losses, **kwargs)
            if wopt is not None:
                wopt.step()
            self.opt.step()
        return step


def build(impl: str, method: str, T: int, where: str, batch: int, device: torch.device,
          seed: int = 0) -> Stepper:
    torch.manual_seed(seed)
    model = TrunkHeads(T).to(device)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 250, generator=gen).to(device)
    scales = [10 ** (2 * i / max(1, T - 1)) for i in range(T)]
    ys = [(torch.randn(batch, 100, generator=gen) * s).to(device) for s in scales]
    return Stepper(impl, method, model, x, ys, where)


def measure(impl: str, method: str, T: int, where: str, args, device) -> dict | None:
    plain = build("plain", method, T, where, args.batch, device)
    other = build(impl, method, T, where, args.batch, device)
    t0 = time.perf_counter()
    other.step()
    per = time.perf_counter() - t0
    if per > args.max_step_s:  # LibMTL's MGDA at h, T = 64: its solver's thousands of ops
        t1 = time.perf_counter()
        plain.step()
        plain_s = time.perf_counter() - t1
        print(f"# {impl} {method} at {where}, T = {T}: one step took {per:.1f} s "
              f"({per / plain_s:.0f}x a plain step of {plain_s * 1e3:.1f} ms, first steps); "
              "not timed further")
        return None
    for _ in range(2):
        plain.step()
        other.step()
    t0 = time.perf_counter()
    other.step()
    per = time.perf_counter() - t0
    steps = max(1, min(args.steps, int(args.block_s / max(per, 1e-6))))
    timing = interleaved_ratio(plain.step, other.step, args.reps, steps, device)
    mem_plain = peak_memory(lambda: build("plain", method, T, where, args.batch, device).step,
                            device)
    # the CPU profiler records every allocation: LibMTL's MGDA (thousands of Frank-Wolfe
    # iterations of tiny ops a step) ran this machine out of memory there, so slow steps skip it
    slow = per > args.memory_max_s
    mem_other = float("nan") if slow else peak_memory(
        lambda: build(impl, method, T, where, args.batch, device).step, device)
    return {"method": method, "where": where, "tasks": T, "impl": impl,
            "plain_ms": round(timing["base_ms"], 3), "time_ratio": round(timing["ratio"], 3),
            "ratio_p25": round(timing["p25"], 3), "ratio_p75": round(timing["p75"], 3),
            "peak_mem_ratio": round(mem_other / mem_plain, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--tasks", default="2,10,64")
    parser.add_argument("--where", default="h,W")
    parser.add_argument("--impls", default="lossbalance,LibMTL")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="most steps in a timed block")
    parser.add_argument("--block-s", type=float, default=0.3, help="target seconds a block")
    parser.add_argument("--max-step-s", type=float, default=5.0,
                        help="a method whose first step takes longer is not timed further")
    parser.add_argument("--memory-max-s", type=float, default=0.2,
                        help="no peak memory for steps slower than this (profiler memory)")
    parser.add_argument("--out", default="benchmarks/results/methods.csv")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    machine = machine_name(device, args.threads)
    impls = args.impls.split(",")
    print(f"# every method's step against the plain step on {machine}, torch {torch.__version__}")
    rows = Rows(("method", "where", "tasks", "impl", "plain_ms", "time_ratio", "ratio_p25",
                 "ratio_p75", "peak_mem_ratio"))
    for method in args.methods.split(","):
        if method not in METHODS:
            raise SystemExit(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
        kind = METHODS[method][4]
        wheres = ["-"] if kind == "loss" else args.where.split(",")
        for where in wheres:
            if where == "h" and method in AT_PARAMETERS_ONLY:
                continue
            for T in [int(t) for t in args.tasks.split(",")]:
                for impl in impls:
                    if impl == "LibMTL" and not libmtl_runs(method, where, T):
                        continue
                    if impl == "lossbalance" and not hasattr(lb, METHODS[method][0]):
                        print(f"# lb.{METHODS[method][0]} not found: {method} skipped")
                        break
                    row = measure(impl, method, T, where, args, device)
                    if row is not None:
                        rows.add(row)
    write_csv(Path(args.out), [{**row, "machine": machine} for row in rows.rows])
    print(f"# wrote {args.out}")


if __name__ == "__main__":
    main()
