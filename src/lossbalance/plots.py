"""Figures of a study, drawn from its metrics.csv and summary.json (no training here).

``plot_study(out)`` writes, where the study has what they show (``lossbalance report`` draws
them again from the files, without training):

- ``weights.png``, ``loss_ratios.png``: each task's weight w_i and training loss ratio
  L_i(t) / L_i(0) over training, one panel per method (GradNorm at the main alpha);
- ``{stem}_by_method.png``: the study's ranking scalar by method, mean ± std over seeds
  (with the best grid point);
- ``{stem}_vs_alpha.png``: the same for GradNorm against alpha;
- ``grid.png``: the scalar over the grid of static weights with GradNorm's final weights and
  its static retrain marked (T = 2: against log10(w_0/w_1); T > 2: against the distance of
  each point's weights from GradNorm's, centred log10 weights);
- ``test_metric_by_task.png``: each task's test metric by method.
"""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from .experiments import grid as gridlib

DPI = 85
NOT_PANELS = ("grid", "single")


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
    """Rows of the per-method runs (GradNorm at the main alpha, not the sweep; no grid or
    single-task runs)."""
    main = str(config["alpha"])
    return [r for r in rows if r["method"] in config["methods"]
            and r["method"] not in NOT_PANELS
            and (r["method"] != "gradnorm" or r["alpha"] == main)]


def _save(fig: plt.Figure, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def _per_method_panels(rows: list[dict], summary: dict, prefix: str, ylabel: str, title: str,
                       path: Path, log: bool = False) -> None:
    config = summary["config"]
    labels = summary["study"]["task_labels"]
    methods = [m for m in config["methods"] if any(r["method"] == m for r in rows)]
    T = len(labels)
    cols = min(len(methods), 4)
    nrows = math.ceil(len(methods) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.6 * cols, 3.1 * nrows + 0.3),
                             squeeze=False, sharey=not log)
    colors = plt.get_cmap("tab10" if T <= 10 else "viridis")
    for ax, method in zip(axes.flat, methods, strict=False):
        mrows = [r for r in rows if r["method"] == method]
        for i in range(T):
            color = colors(i if T <= 10 else i / max(T - 1, 1))
            for (_, _, seed), pts in sorted(_series(mrows, f"{prefix}_{i}").items()):
                steps, vals = zip(*pts, strict=True)
                ax.plot(steps, vals, color=color, alpha=0.85, lw=1.2 if seed == 0 else 0.6,
                        label=labels[i] if seed == 0 else None)
        ax.set_title(method)
        ax.set_xlabel("step")
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(methods):]:
        ax.set_visible(False)
    for row in axes:
        row[0].set_ylabel(ylabel)
    axes[0][0].legend(fontsize=6 if T > 4 else 7)
    fig.suptitle(title)
    _save(fig, path)


def _by_method(summary: dict) -> tuple[list[str], list[float], list[float]]:
    key = summary["study"]["summary"]["key"]
    names, means, stds = [], [], []
    for name, m in summary["methods"].items():
        names.append(name)
        means.append(m[key]["mean"])
        stds.append(m[key]["std"])
    if "grid" in summary:
        best = summary["grid"]["best"]["metric"]
        names.append("grid (best)")
        means.append(best["mean"])
        stds.append(best["std"])
    return names, means, stds


def plot_summary_by_method(summary: dict, path: Path) -> None:
    info = summary["study"]["summary"]
    names, means, stds = _by_method(summary)
    fig, ax = plt.subplots(figsize=(max(5.5, 0.9 * len(names) + 1.5), 3.4))
    colors = ["#dd8452" if n == "grid (best)" else "#4c72b0" for n in names]
    ax.bar(names, means, yerr=stds, capsize=4, color=colors)
    lo = min(m - s for m, s in zip(means, stds, strict=True))
    hi = max(m + s for m, s in zip(means, stds, strict=True))
    if lo > 0 and (hi - lo) < 0.3 * hi:  # small differences: do not start the axis at 0
        pad = 0.15 * (hi - lo) or 0.01 * hi
        ax.set_ylim(lo - pad, hi + pad)
    ax.set_ylabel(info["axis"])
    better = "higher" if info["higher_is_better"] else "lower"
    ax.set_title(f"By method (mean ± std, {summary['config']['seeds']} seeds; {better} is "
                 "better)", fontsize=10)
    ax.tick_params(axis="x", labelrotation=30)
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path)


def plot_summary_vs_alpha(summary: dict, path: Path) -> None:
    info = summary["study"]["summary"]
    key = info["key"]
    sweep = summary["alpha_sweep"]
    alphas = [float(a) for a in sweep]
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    ax.errorbar(alphas, [sweep[a][key]["mean"] for a in sweep],
                yerr=[sweep[a][key]["std"] for a in sweep], marker="o", capsize=4,
                label="GradNorm")
    for method, style in (("equal", "--"), ("uncertainty", ":"), ("dtp", "-.")):
        if method in summary["methods"]:
            ax.axhline(summary["methods"][method][key]["mean"], color="gray", ls=style,
                       label=method)
    if "grid" in summary:
        ax.axhline(summary["grid"]["best"]["metric"]["mean"], color="#dd8452", ls="--",
                   label="best grid point")
    ax.set_xlabel("alpha")
    ax.set_ylabel(info["axis"])
    ax.set_title("GradNorm against alpha (mean ± std over seeds)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, path)


def _log_ratio(weights: list[float]) -> float:
    return math.log10(weights[0] / weights[1])


def plot_grid(summary: dict, path: Path) -> None:
    """The grid's metric with GradNorm's weights and its static retrain marked."""
    g = summary["grid"]
    info = summary["study"]["summary"]
    T = len(summary["study"]["task_names"])
    pts = g["points"]
    compared = g["methods"]
    ref_name = next((m for m in ("gradnorm", "static", "gradnorm-log") if m in compared), None)
    fig, ax = plt.subplots(figsize=(6.2, 3.8))
    if T == 2:
        def x_of(w: list[float]) -> float:
            return _log_ratio(w)
        xlabel = "log10(w_0 / w_1)"
    else:
        ref = compared[ref_name]["mean_weights"] if ref_name else [1.0] * T
        def x_of(w: list[float]) -> float:
            return gridlib.distance(w, ref)
        xlabel = (f"distance from {ref_name or 'equal'}'s mean final weights "
                  "(centred log10 weights)")
    xs = [x_of(p["weights"]) for p in pts]
    order = sorted(range(len(pts)), key=lambda k: xs[k])
    ax.errorbar([xs[k] for k in order], [pts[k]["metric"]["mean"] for k in order],
                yerr=[pts[k]["metric"]["std"] for k in order], marker="o", ms=4, capsize=3,
                color="#4c72b0", ls="-" if T == 2 else "none", label="grid (static weights)")
    best = g["best"]
    ax.plot([x_of(best["weights"])], [best["metric"]["mean"]], marker="*", ms=14,
            color="#dd8452", ls="none", label="best grid point")
    styles = {"gradnorm": ("D", "#c44e52"), "static": ("s", "#55a868"),
              "gradnorm-log": ("^", "#8172b3"), "equal": ("o", "gray"),
              "uncertainty": ("v", "#937860"), "dtp": ("P", "#da8bc3")}
    for name, m in compared.items():
        marker, color = styles.get(name, ("x", "black"))
        x = x_of(m["mean_weights"])
        ax.errorbar([x], [m["metric"]["mean"]], yerr=[m["metric"]["std"]], marker=marker,
                    color=color, ms=7, capsize=4, ls="none",
                    label=f"{name} (final weights)" if name in ("gradnorm", "gradnorm-log")
                    else name)
        if name == "gradnorm" and T == 2:
            ax.axvline(x, color=color, lw=0.8, ls=":")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(info["axis"])
    ax.set_title("Static weights on a grid (mean ± std over seeds)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, path)


def plot_test_metric_by_task(summary: dict, path: Path) -> None:
    """Each task's test metric by method (mean ± std over seeds)."""
    metrics = summary["study"]["metrics"]
    labels = summary["study"]["task_labels"]
    methods = list(summary["methods"])
    cols = min(len(metrics), 5)
    rows = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 2.9 * rows), squeeze=False)
    for ax, spec in zip(axes.flat, metrics, strict=False):
        vals = [summary["methods"][m][f"test_{spec['name']}"][spec["task"]] for m in methods]
        names = [m for m, v in zip(methods, vals, strict=True) if v is not None]
        vals = [v for v in vals if v is not None]
        means = [v["mean"] for v in vals]
        stds = [v["std"] for v in vals]
        ax.bar(names, means, yerr=stds, capsize=3, color="#4c72b0")
        lo = min(m - s for m, s in zip(means, stds, strict=True))
        hi = max(m + s for m, s in zip(means, stds, strict=True))
        if lo > 0 and (hi - lo) < 0.3 * hi:
            pad = 0.15 * (hi - lo) or 0.01 * hi
            ax.set_ylim(lo - pad, hi + pad)
        arrow = "↑" if spec["higher_is_better"] else "↓"
        ax.set_title(f"{labels[spec['task']]}: {spec['label']} {arrow}", fontsize=8)
        ax.tick_params(axis="x", labelrotation=45, labelsize=7)
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(metrics):]:
        ax.set_visible(False)
    fig.suptitle(f"Test metric per task (mean ± std, {summary['config']['seeds']} seeds)")
    _save(fig, path)


def plot_study(out: Path, summary: dict | None = None) -> list[Path]:
    """Draw every figure of the study in ``out`` from its summary.json (or ``summary``, the
    same read back) and its metrics.csv; without a metrics.csv the weight and loss-ratio
    panels are not drawn (files of an earlier drawing stay). Returns the files written."""
    if summary is None:
        summary = json.loads((out / "summary.json").read_text())
    config = summary["config"]
    stem = summary["study"]["summary"]["stem"]
    metrics = out / "metrics.csv"
    rows = _main_runs(_read_metrics(metrics), config) if metrics.is_file() else []
    written = []
    if rows:
        p = out / "weights.png"
        _per_method_panels(rows, summary, "weight", "task weight w_i",
                           "Task weights over training", p, log=True)
        written.append(p)
        p = out / "loss_ratios.png"
        _per_method_panels(rows, summary, "loss_ratio", "L_i(t) / L_i(0)",
                           "Training loss ratios", p, log=True)
        written.append(p)
    if summary["methods"] or "grid" in summary:
        p = out / f"{stem}_by_method.png"
        plot_summary_by_method(summary, p)
        written.append(p)
    if summary["methods"]:
        p = out / "test_metric_by_task.png"
        plot_test_metric_by_task(summary, p)
        written.append(p)
    if summary["alpha_sweep"]:
        p = out / f"{stem}_vs_alpha.png"
        plot_summary_vs_alpha(summary, p)
        written.append(p)
    if "grid" in summary:
        p = out / "grid.png"
        plot_grid(summary, p)
        written.append(p)
    return written
