"""lossbalance's GradNorm against the GradNorm implementations people use, in one run.

Implementations (the `bench` extra installs the peers: `pip install -e ".[bench]"`):

  lossbalance           GradNorm with the tap (fast path)
  lossbalance-general   GradNorm without the tap (one autograd.grad per task, no create_graph)
  literal               Algorithm 1 as notebooks write it: a create_graph backward per task
  gradnorm-pytorch      GradNormLossWeighter with its defaults (alpha 0, lr 1e-4)
  gradnorm-pytorch*     GradNormLossWeighter with our settings (alpha, lr 0.025, same W / h)
  LibMTL                LibMTL 1.1.5's GradNorm in a small harness (its trainer is not used):
                        softmax-parametrised weights, one backward per task over the shared
                        parameters (W, or the trunk's representation with rep_grad)

Step time and peak memory are ratios to the plain equal-weights step (zero_grad, forward,
sum(losses).backward(), SGD step) measured in the same run (interleaved blocks); memory is
the peak of all bytes live during a step, everything included (see _harness.peak_memory). Agreement
is each implementation's weight trajectory over ``--agree-steps`` steps against the literal
algorithm run with the same weights optimizer and learning rate: max |w - w_literal|.

    python benchmarks/peers.py                    # CPU, 2 threads; writes results/peers.csv/.png
    python benchmarks/peers.py --device cuda
"""

from __future__ import annotations

import argparse
import sys
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

IMPLS = ("lossbalance", "lossbalance-general", "literal", "gradnorm-pytorch",
         "gradnorm-pytorch*", "LibMTL")
TRUNKS = {"toy": {"width": 100, "out": 100}, "large": {"width": 1024, "out": 10}}


class Stepper:
    """One implementation driving one model: ``step()`` and ``weights()``."""

    def __init__(self, impl: str, model: TrunkHeads, x: torch.Tensor, ys: list[torch.Tensor],
                 where: str, alpha: float, lr: float) -> None:
        self.model, self.x, self.ys, self.where = model, x, ys, where
        self.T = len(ys)
        self.opt = torch.optim.SGD(model.parameters(), lr=1e-4)
        self.step: Callable[[], None] = getattr(self, "_" + impl.replace("-", "_")
                                                .replace("*", "_matched").lower())(alpha, lr)

    def _losses(self, feats):
        return [F.mse_loss(self.model.heads[i](feats[i]), self.ys[i]) for i in range(self.T)]

    def _plain(self, alpha, lr):
        self.weights = lambda: torch.ones(self.T)

        def step():
            self.opt.zero_grad()
            h = self.model.trunk(self.x)
            # the list stays alive through the backward, as in every balancer's step (and
            # step_overhead.py's plain step): F.mse_loss's 0-d mean keeps the storage of the
            # unreduced [B, out] loss, so this matters for peak memory
            losses = self._losses((h,) * self.T)
            torch.stack(losses).sum().backward()
            self.opt.step()
        return step

    def _lossbalance(self, alpha, lr, tap=True):
        bal = lb.GradNorm(self.T, alpha=alpha, lr=lr).to(self.x.device)
        self.weights = lambda: bal.weights

        def step():
            self.opt.zero_grad()
            h = self.model.trunk(self.x)
            feats = bal.tap(h) if tap else (h,) * self.T
            losses = self._losses(feats)
            at_h = None if tap else h
            bal.backward(losses, shared=self.model.last_shared if self.where == "W" else at_h)
            self.opt.step()
        return step

    def _lossbalance_general(self, alpha, lr):
        return self._lossbalance(alpha, lr, tap=False)

    def _literal(self, alpha, lr, optimizer=torch.optim.Adam):
        w = torch.ones(self.T, device=self.x.device, requires_grad=True)
        wopt = optimizer([w], lr=lr)
        l0: list[torch.Tensor] = []
        self.weights = lambda: w.detach().clone()

        def step():
            self.opt.zero_grad()
            h = self.model.trunk(self.x)
            L = torch.stack(self._losses((h,) * self.T))
            if not l0:
                l0.append(L.detach())
            at = self.model.last_shared if self.where == "W" else h
            G = torch.stack([
                torch.autograd.grad(w[i] * L[i], at, retain_graph=True, create_graph=True)[0]
                .norm() for i in range(self.T)])
            ratio = L.detach() / l0[0]
            target = (G.mean() * (ratio / ratio.mean()) ** alpha).detach()
            w.grad = torch.autograd.grad((G - target).abs().sum(), w, retain_graph=True)[0]
            (w.detach() * L).sum().backward()
            wopt.step()
            with torch.no_grad():
                w.clamp_(min=1e-6)
                w.mul_(self.T / w.sum())
            self.opt.step()
        return step

    def _gradnorm_pytorch(self, alpha, lr, matched=False):
        from gradnorm_pytorch import GradNormLossWeighter

        kwargs = {"restoring_force_alpha": alpha, "learning_rate": lr} if matched else {}
        weighter = GradNormLossWeighter(
            num_losses=self.T,
            grad_norm_parameters=self.model.last_shared if self.where == "W" else None,
            **kwargs)
        self.weights = lambda: weighter.loss_weights.detach().clone()

        def step():
            self.opt.zero_grad()
            h = self.model.trunk(self.x)
            losses = self._losses((h,) * self.T)
            weighter.backward(losses, activations=h if self.where == "h" else None)
            self.opt.step()
        return step

    def _gradnorm_pytorch_matched(self, alpha, lr):
        return self._gradnorm_pytorch(alpha, lr, matched=True)

    def _libmtl(self, alpha, lr):
        base = load_libmtl("GradNorm")
        model, T = self.model, self.T
        rep_grad = self.where == "h"

        class Harness(base):  # the attributes LibMTL's trainer would set
            def __init__(self):
                super().__init__()
                self.task_num, self.device, self.rep_grad, self.epoch = T, "cpu", rep_grad, 1
                self.task_name = [str(i) for i in range(T)]
                self.init_param()
                self.train_loss_buffer = torch.zeros(T, 1)

            def get_share_params(self):
                return [model.last_shared]

            def zero_grad_share_params(self):  # as LibMTL's encoder.zero_grad(): zeros
                if model.last_shared.grad is not None:
                    model.last_shared.grad.zero_()

        harness = Harness()
        harness.loss_scale.data = harness.loss_scale.data.to(self.x.device)
        wopt = torch.optim.Adam([harness.loss_scale], lr=lr)
        first = [True]
        self.weights = lambda: (T * torch.softmax(harness.loss_scale.detach(), -1)).cpu()

        def step():
            self.opt.zero_grad()
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
            if first[0]:  # L(0) from the first batch, as the paper (LibMTL: epoch-0 average)
                harness.train_loss_buffer[:, 0] = losses.detach().cpu()
                first[0] = False
            harness.device = self.x.device
            harness.backward(losses, alpha=alpha)
            wopt.step()
            self.opt.step()
        return step


def build(impl: str, T: int, trunk: str, where: str, args, device, seed: int = 0) -> Stepper:
    torch.manual_seed(seed)
    model = TrunkHeads(T, **TRUNKS[trunk]).to(device)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(args.batch, 250, generator=gen).to(device)
    scales = [10 ** (2 * i / max(1, T - 1)) for i in range(T)]
    ys = [(torch.randn(args.batch, TRUNKS[trunk]["out"], generator=gen) * s).to(device)
          for s in scales]
    return Stepper(impl, model, x, ys, where, args.alpha, args.lr)


def agreement(impl: str, args, device) -> float:
    """max |w - w_literal| over the trajectory, literal run with the same weights optimizer."""
    T, where = args.agree_tasks, "W"
    ours = build(impl, T, "toy", where, args, device)
    ref = build("literal", T, "toy", where, args, device)
    if impl.startswith("gradnorm-pytorch"):
        lr = args.lr if impl.endswith("*") else 1e-4
        alpha = args.alpha if impl.endswith("*") else 0.0
        ref.step = ref._literal(alpha, lr, optimizer=torch.optim.SGD)
    worst = 0.0
    for _ in range(args.agree_steps):
        ours.step()
        ref.step()
        worst = max(worst, float((ours.weights().cpu() - ref.weights().cpu()).abs().max()))
    return worst


def measure(impl: str, T: int, trunk: str, where: str, args, device) -> dict:
    plain = build("plain", T, trunk, where, args, device)
    other = build(impl, T, trunk, where, args, device)
    for _ in range(2):
        plain.step()
        other.step()
    # blocks of about the same length whatever the method costs
    import time

    t0 = time.perf_counter()
    other.step()
    per = time.perf_counter() - t0
    steps = max(1, min(args.steps, int(args.block_s / max(per, 1e-6))))
    timing = interleaved_ratio(plain.step, other.step, args.reps, steps, device)
    mem_plain = peak_memory(lambda: build("plain", T, trunk, where, args, device).step, device)
    mem_other = peak_memory(lambda: build(impl, T, trunk, where, args, device).step, device)
    return {"trunk": trunk, "norms_at": where, "tasks": T, "impl": impl,
            "plain_ms": round(timing["base_ms"], 3), "time_ratio": round(timing["ratio"], 3),
            "ratio_p25": round(timing["p25"], 3), "ratio_p75": round(timing["p75"], 3),
            "peak_mem_ratio": round(mem_other / mem_plain, 3)}


def plot(rows: list[dict], path: Path, machine: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["trunk"], r["norms_at"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, (trunk, where) in zip(axes[0], panels, strict=True):
        for impl in IMPLS:
            pts = sorted((r["tasks"], r["time_ratio"]) for r in rows
                         if r["impl"] == impl and r["trunk"] == trunk and r["norms_at"] == where)
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=impl)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tasks T")
        ax.set_title(f"{trunk} trunk, norms at {where}")
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel("step time / plain step")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"GradNorm step time against the plain step ({machine})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default="2,4,10,32,64")
    parser.add_argument("--impls", default=",".join(IMPLS))
    parser.add_argument("--trunks", default="toy,large")
    parser.add_argument("--where", default="W,h")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--alpha", type=float, default=1.5)
    parser.add_argument("--lr", type=float, default=0.025)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="most steps in a timed block")
    parser.add_argument("--block-s", type=float, default=0.3, help="target seconds a block")
    parser.add_argument("--agree-steps", type=int, default=100)
    parser.add_argument("--agree-tasks", type=int, default=4)
    parser.add_argument("--out", default="benchmarks/results/peers")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    machine = machine_name(device, args.threads)
    impls = args.impls.split(",")
    print(f"# GradNorm implementations on {machine}, torch {torch.__version__}")
    print(f"# agreement: max |w - w_literal| over {args.agree_steps} steps, T="
          f"{args.agree_tasks}, toy trunk, norms at W")
    agree = {}
    for impl in impls:
        agree[impl] = agreement(impl, args, device)
        print(f"{impl:>22}: {agree[impl]:.3g}", flush=True)
    header = ("trunk", "norms_at", "tasks", "impl", "plain_ms", "time_ratio", "ratio_p25",
              "ratio_p75", "peak_mem_ratio")
    rows = Rows(header)
    for trunk in args.trunks.split(","):
        for where in args.where.split(","):
            for T in [int(t) for t in args.tasks.split(",")]:
                for impl in impls:
                    rows.add(measure(impl, T, trunk, where, args, device))
    out = Path(args.out)
    write_csv(out.with_suffix(".csv"),
              [{**row, "agreement": agree[row["impl"]], "machine": machine} for row in rows.rows])
    plot(rows.rows, out.with_suffix(".png"), machine)
    print(f"# wrote {out.with_suffix('.csv')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
