"""Files a study leaves: metrics.csv, summary.json and summary.md."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path


def _mean_std(values: list[float]) -> dict:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
    }


def write_metrics(rows: list[dict], path: Path) -> None:
    """One row per (method, alpha, seed, logged step)."""
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def summarize(summaries: list[dict], config: dict) -> dict:
    """Mean and std over seeds per method (GradNorm at the main alpha) and per alpha."""
    T = config["tasks"]
    main_alpha = config["alpha"]
    methods: dict[str, dict] = {}
    for method in config["methods"]:
        runs = [s for s in summaries if s["method"] == method
                and (method != "gradnorm" or s["alpha"] == main_alpha)]
        if not runs:
            continue
        methods[method] = {
            "test_loss": [_mean_std([r["test_loss"][i] for r in runs]) for i in range(T)],
            "normalized_test_loss": _mean_std([r["normalized_test_loss"] for r in runs]),
            "final_weights": [_mean_std([r["final_weights"][i] for r in runs])
                              for i in range(T)],
            "wall_time_s": _mean_std([r["wall_time_s"] for r in runs]),
        }
    sweep = {}
    for alpha in sorted({s["alpha"] for s in summaries if s["method"] == "gradnorm"}):
        runs = [s for s in summaries if s["method"] == "gradnorm" and s["alpha"] == alpha]
        sweep[str(alpha)] = {
            "normalized_test_loss": _mean_std([r["normalized_test_loss"] for r in runs]),
            "test_loss": [_mean_std([r["test_loss"][i] for r in runs]) for i in range(T)],
            "final_weights": [_mean_std([r["final_weights"][i] for r in runs])
                              for i in range(T)],
        }
    return {"config": config, "methods": methods, "alpha_sweep": sweep, "runs": summaries}


def _fmt(ms: dict, digits: int = 4) -> str:
    return f"{ms['mean']:.{digits}g} ± {ms['std']:.2g}"


def write_summary(summary: dict, out: Path) -> None:
    """summary.json (everything) and summary.md (the tables)."""
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    cfg = summary["config"]
    T = cfg["tasks"]
    sig = ", ".join(f"{s:.3g}" for s in cfg["sigmas"])
    lines = [
        "# GradNorm toy study",
        "",
        f"T = {T} tasks, sigma = ({sig}), {cfg['steps']} steps, batch {cfg['batch_size']}, "
        f"{cfg['seeds']} seed(s); GradNorm alpha = {cfg['alpha']}. Mean ± std over seeds.",
        "",
        "`total` is the sum over tasks of test MSE / sigma_i^2, so that the sigma = 100 task "
        "does not hide the others.",
        "",
    ]
    if summary["methods"]:
        head = ["method", "total (normalised)"] + [f"test MSE {i}" for i in range(T)]
        head += [f"final w_{i}" for i in range(T)] + ["wall time (s)"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for method, m in summary["methods"].items():
            cells = [method, _fmt(m["normalized_test_loss"])]
            cells += [_fmt(t) for t in m["test_loss"]]
            cells += [f"{w['mean']:.3g}" for w in m["final_weights"]]
            cells += [f"{m['wall_time_s']['mean']:.1f}"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    if summary["alpha_sweep"]:
        lines += ["## GradNorm test loss against alpha", "",
                  "| alpha | total (normalised) | " + " | ".join(
                      f"final w_{i}" for i in range(T)) + " |",
                  "|---|---|" + "---|" * T]
        for alpha, a in summary["alpha_sweep"].items():
            lines.append(f"| {alpha} | {_fmt(a['normalized_test_loss'])} | " + " | ".join(
                f"{w['mean']:.3g}" for w in a["final_weights"]) + " |")
        lines.append("")
    (out / "summary.md").write_text("\n".join(lines))
