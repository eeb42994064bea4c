"""Figures of a toy study, drawn from its metrics.csv and summary.json (no training here)."""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def _read_metrics(path: Path) -> list[dict]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


def _series(rows: list[dict], column: str) -> dict[tuple, list[tuple[int, float]]]:
    """(method, alpha, seed) -> [(step, value)] for a column."""
    out: dict[tuple, list[tuple[int, float]]] = defaultdict(list)
    for r in rows:
        if r[column] != "":
            out[(r["method"], r["alpha"], int(r["seed"]))].append((int(r["step"]),
                                                                   float(r[column])))
    return out


def _main_runs(rows: list[dict], config: dict) -> list[dict]:
    """Rows of the per-method runs (GradNorm at the main alpha, not the sweep)."""
    main = str(config["alpha"])
    return [r for r in rows if r["method"] in config["methods"]
            and (r["method"] != "gradnorm" or r["alpha"] == main)]


def _per_method_panels(rows: list[dict], config: dict, prefix: str, ylabel: str, title: str,
                       path: Path, log: bool = False) -> None:
    methods = [m for m in config["methods"] if any(r["method"] == m for r in rows)]
    T = config["tasks"]
    fig, axes = plt.subplots(1, len(methods), figsize=(4 * len(methods), 3.4), squeeze=False,
                             sharey=not log)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, method in zip(axes[0], methods, strict=True):
        mrows = [r for r in rows if r["method"] == method]
        for i in range(T):
            for (_, _, seed), pts in sorted(_series(mrows, f"{prefix}_{i}").items()):
                steps, vals = zip(*pts, strict=True)
                ax.plot(steps, vals, color=colors[i % len(colors)], alpha=0.85,
                        lw=1.2 if seed == 0 else 0.6,
                        label=f"task {i} (σ={config['sigmas'][i]:.3g})" if seed == 0 else None)
        ax.set_title(method)
        ax.set_xlabel("step")
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_test_loss_by_method(summary: dict, path: Path) -> None:
    methods = summary["methods"]
    names = list(methods)
    means = [methods[m]["normalized_test_loss"]["mean"] for m in names]
    stds = [methods[m]["normalized_test_loss"]["std"] for m in names]
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    ax.bar(names, means, yerr=stds, capsize=4, color="#4c72b0")
    ax.set_ylabel("test loss  Σ MSE_i / σ_i²")
    ax.set_title(f"Test loss by method (mean ± std, {summary['config']['seeds']} seeds)")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_test_loss_vs_alpha(summary: dict, path: Path) -> None:
    sweep = summary["alpha_sweep"]
    alphas = [float(a) for a in sweep]
    means = [sweep[a]["normalized_test_loss"]["mean"] for a in sweep]
    stds = [sweep[a]["normalized_test_loss"]["std"] for a in sweep]
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    ax.errorbar(alphas, means, yerr=stds, marker="o", capsize=4, label="GradNorm")
    if "equal" in summary["methods"]:
        eq = summary["methods"]["equal"]["normalized_test_loss"]
        ax.axhline(eq["mean"], color="gray", ls="--", label="equal weights")
    ax.set_xlabel("alpha")
    ax.set_ylabel("test loss  Σ MSE_i / σ_i²")
    ax.set_title("GradNorm test loss against alpha")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_study(out: Path) -> list[Path]:
    """Draw every figure of the study in ``out``; returns the files written."""
    summary = json.loads((out / "summary.json").read_text())
    config = summary["config"]
    rows = _main_runs(_read_metrics(out / "metrics.csv"), config)
    written = []
    if rows:
        p = out / "weights.png"
        _per_method_panels(rows, config, "weight", "task weight w_i", "Task weights over training",
                           p, log=True)
        written.append(p)
        p = out / "loss_ratios.png"
        _per_method_panels(rows, config, "loss_ratio", "L_i(t) / L_i(0)",
                           "Training loss ratios", p, log=True)
        written.append(p)
    if summary["methods"]:
        p = out / "test_loss_by_method.png"
        plot_test_loss_by_method(summary, p)
        written.append(p)
    if summary["alpha_sweep"]:
        p = out / "test_loss_vs_alpha.png"
        plot_test_loss_vs_alpha(summary, p)
        written.append(p)
    return written
