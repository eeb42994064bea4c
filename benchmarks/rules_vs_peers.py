"""The aggregation rules (lossbalance._rules) against torchjd 0.18's and LibMTL 1.1.5's versions.

Not a timing benchmark: on random Jacobians J [T, P] of several kinds, each rule's direction
d = sum_i c_i g_i (c from G = J J^T) is compared with the peer's direction on the same J, as
||d_peer - d|| / max(||d||, ||d_peer||) (0: the same direction and length; 1: one of them is 0,
or they are orthogonal with equal norms; 2: opposite; the denominator is floored at
1e-7 max_i ||g_i||).
The rules themselves are checked against their papers' formulas on the vectors in tests/rules.

Peers, each with its defaults:
  torchjd   UPGrad, MGDA, PCGrad (same seed), CAGrad(c=0.5), IMTLG, AlignedMTL, NashMTL
            (CAGrad and NashMTL need cvxpy: ``pip install "torchjd[full]==0.18.0"``)
  LibMTL    MGDA, PCGrad, CAGrad, IMTL (its IMTL-G part: loss scales at their initial 0), driven
            through a small harness (its trainer is not used; LibMTL/__init__ imports
            torchvision, so single modules are loaded as benchmarks/peers.py does).

    python benchmarks/rules_vs_peers.py               # writes results/rules_vs_peers.csv
    python benchmarks/rules_vs_peers.py --draws 5     # quicker

The published run used a separate venv with torch 2.13.0 (CPU), "torchjd[full]==0.18.0" and
``pip install --no-deps LibMTL==1.1.5`` (see docs/balancers.md, "Peers" of each method).
"""

from __future__ import annotations

import argparse
import csv
import importlib
import importlib.util
import random
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _harness import load_libmtl

from lossbalance._rules import (
    aligned_mtl_weights,
    cagrad_weights,
    imtl_g_weights,
    mgda_weights,
    nash_mtl_weights,
    pcgrad_weights,
    upgrad_weights,
)
from lossbalance._rules.pcgrad import pcgrad_coefficients

RESULTS = Path(__file__).parent / "results"
KINDS = ("random", "norms", "collinear", "conflicting", "P<T")


def jacobian(kind: str, T: int, g: torch.Generator) -> torch.Tensor:
    """One float64 Jacobian [T, P] of the given kind."""
    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    if kind == "random":
        return randn(T, 50)
    if kind == "norms":  # gradient norms spread over 1e-2 .. 1e2
        return randn(T, 50) * torch.logspace(-2, 2, T, dtype=torch.float64)[:, None]
    if kind == "collinear":
        stretch = 1 + torch.rand(T, 1, generator=g, dtype=torch.float64)
        return randn(1, 50) * stretch + 1e-3 * randn(T, 50)
    if kind == "conflicting":  # pairs of nearly opposite gradients
        half = randn((T + 1) // 2, 50)
        return torch.cat([half, -half + 0.3 * randn(*half.shape)])[:T]
    if kind == "P<T":
        return randn(T, max(1, T // 2))
    raise ValueError(kind)


def rel_dev(d_peer: torch.Tensor, d: torch.Tensor, J: torch.Tensor) -> float:
    d_peer = d_peer.to(d.dtype)
    scale = max(float(d.norm()), float(d_peer.norm()), 1e-7 * float(J.norm(dim=1).max()))
    return float((d_peer - d).norm()) / scale


# ------------------------------------------------------------------------------ LibMTL harness


def libmtl_direction(name: str, J: torch.Tensor, **kwargs) -> torch.Tensor:
    """The direction LibMTL's weighting ``name`` writes into the shared gradient for J (in
    float32, as LibMTL's gradient buffers are)."""
    weighting = load_libmtl(name)()
    J = J.float()
    T = J.shape[0]
    weighting.task_num, weighting.device, weighting.rep_grad = T, torch.device("cpu"), False
    weighting.init_param()
    out = {}
    weighting._compute_grad_dim = lambda: None
    weighting._compute_grad = lambda losses, mode, rep_grad=False: J.clone()
    weighting._get_grads = lambda losses, mode="backward": J.clone()

    def capture(batch_weight, per_grads=None, grads=None):
        out["d"] = torch.einsum("i,i...->...", batch_weight.to(grads.dtype), grads)

    weighting._backward_new_grads = capture
    weighting._reset_grad = lambda new_grads: out.__setitem__("d", new_grads)
    losses = [torch.tensor(1.0, dtype=J.dtype) for _ in range(T)]
    with torch.no_grad():
        weighting.backward(torch.stack(losses) if name == "IMTL" else losses, **kwargs)
    return out["d"]


# ------------------------------------------------------------------------------ the comparisons


def torchjd_peers() -> dict[str, Callable[[torch.Tensor, int], torch.Tensor]]:
    import torchjd.aggregation as jd

    peers = {
        "UPGrad": lambda J, seed: jd.UPGrad()(J),
        "MGDA": lambda J, seed: jd.MGDA()(J),
        "PCGrad": lambda J, seed: (torch.manual_seed(seed), jd.PCGrad()(J))[1],
        "IMTL-G": lambda J, seed: jd.IMTLG()(J),
        "Aligned-MTL": lambda J, seed: jd.AlignedMTL()(J),
    }
    try:
        importlib.import_module("cvxpy")
        peers["CAGrad"] = lambda J, seed: jd.CAGrad(c=0.5)(J)
        peers["Nash-MTL"] = lambda J, seed: jd.NashMTL(n_tasks=J.shape[0], max_norm=0.0)(J)
    except ImportError:
        print("cvxpy is not installed: torchjd's CAGrad and NashMTL are left out", file=sys.stderr)
    return peers


def libmtl_peers() -> dict[str, Callable[[torch.Tensor, int], torch.Tensor]]:
    load_libmtl("MGDA")
    return {
        "MGDA": lambda J, seed: libmtl_direction("MGDA", J, mgda_gn="none"),
        "PCGrad": lambda J, seed: (random.seed(seed), libmtl_direction("PCGrad", J))[1],
        "CAGrad": lambda J, seed: libmtl_direction("CAGrad", J, calpha=0.5, rescale=1),
        "IMTL-G": lambda J, seed: libmtl_direction("IMTL", J),
    }


def ours(method: str, J: torch.Tensor, seed: int, peer: str) -> torch.Tensor:
    """Our direction, in the peer's convention where a documented convention differs."""
    G = J @ J.T
    if method == "UPGrad":
        c = upgrad_weights(G)
    elif method == "MGDA":
        c = mgda_weights(G)
    elif method == "PCGrad" and peer == "LibMTL":  # the orders LibMTL draws with random.shuffle
        random.seed(seed)
        orders = []
        for _ in range(J.shape[0]):
            order = list(range(J.shape[0]))
            random.shuffle(order)
            orders.append(torch.tensor(order))
        c = pcgrad_coefficients(G, orders)
    elif method == "PCGrad":
        c = pcgrad_weights(G, generator=torch.Generator().manual_seed(seed))
    elif method == "CAGrad":  # torchjd: no rescale; LibMTL: rescale=1 as the official code
        c = cagrad_weights(G, c=0.5, rescale=0 if peer == "torchjd" else 1)
    elif method == "IMTL-G":
        c = imtl_g_weights(G)
    elif method == "Aligned-MTL":  # torchjd weights the aligned gradients by 1/T, not 1
        c = aligned_mtl_weights(G) / (J.shape[0] if peer == "torchjd" else 1)
    elif method == "Nash-MTL":
        c = nash_mtl_weights(G, max_norm=0.0)
    else:
        raise ValueError(method)
    return c @ J


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=20, help="Jacobians per kind and T")
    parser.add_argument("--out", type=Path, default=RESULTS / "rules_vs_peers.csv")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    peers: dict[str, dict[str, Callable]] = {}
    try:
        peers["torchjd"] = torchjd_peers()
    except ImportError as err:
        print(f"torchjd left out: {err}", file=sys.stderr)
    try:
        peers["LibMTL"] = libmtl_peers()
    except ImportError as err:
        print(f"LibMTL left out: {err}", file=sys.stderr)
    rows = []
    for peer, methods in peers.items():
        for method, run in methods.items():
            for T in (2, 3, 10):
                for kind in KINDS:
                    devs, failures = [], 0
                    g = torch.Generator().manual_seed(1000 * T + KINDS.index(kind))
                    for draw in range(args.draws):
                        J = jacobian(kind, T, g)
                        try:
                            d = ours(method, J, draw, peer)
                        except ValueError:  # Nash-MTL: no solution for this J
                            continue
                        try:
                            devs.append(rel_dev(run(J, draw), d, J))
                        except Exception:  # a peer's failure is a result too
                            failures += 1
                    devs.sort()
                    rows.append({
                        "peer": peer, "method": method, "T": T, "kind": kind,
                        "compared": len(devs), "peer_failed": failures,
                        "median_rel_dev": f"{devs[len(devs) // 2]:.2e}" if devs else "",
                        "max_rel_dev": f"{devs[-1]:.2e}" if devs else "",
                    })
                    print(" ".join(f"{v}" for v in rows[-1].values()), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
