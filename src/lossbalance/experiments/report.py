"""Files a study leaves: metrics.csv, summary.json and summary.md.

summary.json holds ``study`` (tasks, metrics, the ranking scalar), ``description`` (the
lines under summary.md's heading), ``config`` (the study's
settings and the runner's options), ``methods`` (per method: the ranking scalar and each test
metric, mean/std/n over seeds, the final weights and the wall time; ``gradnorm`` at the main
alpha; ``single`` per seed over its T one-task networks), ``alpha_sweep`` (GradNorm per alpha),
``grid`` (``experiments.grid.compare``: the best point and where each method's weights and
metric fall against it), ``baseline`` (the single-task networks' mean test metrics, where
trained) and ``runs`` (every run's record).

:func:`render` writes summary.md and the figures again from a folder's summary.json (and its
metrics.csv where present), without training (``lossbalance report --out DIR``).
"""

from __future__ import annotations

import csv
import importlib
import inspect
import json
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from . import grid as gridlib
from .study import Study


def _mean_std(values: Sequence[float]) -> dict:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
    }


def write_metrics(rows: list[dict], path: Path, fieldnames: Sequence[str]) -> None:
    """One row per (method, alpha, seed, variant, logged step); "" where a value is absent."""
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(fieldnames), restval="")
        writer.writeheader()
        writer.writerows(rows)


def study_info(study: Study) -> dict[str, Any]:
    """What the plots and tables need to know about the study."""
    s = study.summary
    return {
        "name": study.name,
        "title": study.title,
        "task_names": list(study.task_names),
        "task_labels": list(study.task_labels or study.task_names),
        "task_kinds": list(study.task_kinds),
        "metrics": [{"name": m.name, "task": m.task, "key": m.key, "label": m.label or m.name,
                     "higher_is_better": m.higher_is_better} for m in study.metrics],
        "summary": {"key": s.key, "label": s.label, "axis": s.axis,
                    "higher_is_better": s.higher_is_better, "stem": s.stem,
                    "needs_single": s.needs_single, "decimals": s.decimals},
    }


def _metric_lists(study: Study, test: Mapping[str, float]) -> dict[str, list]:
    """{"test_<name>": [value or None per task]} from a run's test metrics."""
    out: dict[str, list] = {}
    for m in study.metrics:
        out.setdefault(f"test_{m.name}", [None] * study.num_tasks)[m.task] = test.get(m.key)
    return out


def _combine_single(study: Study, records: list[dict]) -> list[dict]:
    """Per seed, one record of the single-task networks together (all tasks' metrics)."""
    out = []
    for seed in sorted({r["seed"] for r in records}):
        mine = [r for r in records if r["seed"] == seed]
        tasks = sorted(r["variant"] for r in mine)
        if tasks != list(range(study.num_tasks)):
            raise ValueError(f"seed {seed} has single-task runs for tasks {tasks}")
        test: dict[str, float] = {}
        for r in mine:
            test.update(r["test"])
        out.append({"method": "single", "alpha": None, "seed": seed, "variant": None,
                    "weights": None, "tasks": tasks, "test": test, "final_weights": None,
                    "selected_step": None,
                    "wall_time_s": sum(r["wall_time_s"] for r in mine)})
    return out


def _aggregate(study: Study, runs: list[dict]) -> dict:
    key = study.summary.key
    T = study.num_tasks
    entry: dict[str, Any] = {key: _mean_std([r[key] for r in runs])}
    for name, first in _metric_lists(study, runs[0]["test"]).items():
        entry[name] = [
            _mean_std([_metric_lists(study, r["test"])[name][i] for r in runs])
            if first[i] is not None else None for i in range(T)]
    if runs[0]["final_weights"] is not None:
        entry["final_weights"] = [_mean_std([r["final_weights"][i] for r in runs])
                                  for i in range(T)]
    else:
        entry["final_weights"] = None
    entry["wall_time_s"] = _mean_std([r["wall_time_s"] for r in runs])
    return entry


def summarize(study: Study, config: dict, records: list[dict],
              grid: gridlib.Grid | None = None) -> dict:
    """Everything summary.json holds (module docstring), from the run records."""
    key = study.summary.key
    singles = [r for r in records if r["method"] == "single"]
    combined = _combine_single(study, singles) if singles else []
    baseline = None
    if combined:
        baseline = {k: statistics.fmean(r["test"][k] for r in combined)
                    for k in combined[0]["test"]}
    if study.summary.needs_single and baseline is None:
        raise ValueError(f"the {study.name} study's {key} needs the single-task baselines")
    runs = []
    for r in records:
        run = dict(r)
        run.update(_metric_lists(study, r["test"]))
        if r["method"] != "single":
            run[key] = study.summary_value(r["test"], baseline)
        runs.append(run)
    for r in combined:
        r.update(_metric_lists(study, r["test"]))
        r[key] = study.summary_value(r["test"], baseline)
    main_alpha = config["alpha"]
    methods: dict[str, dict] = {}
    listed = list(config["methods"])
    if combined and "single" not in listed:  # added by the runner for the baselines
        listed.insert(0, "single")
    for method in listed:
        if method == "grid":
            continue
        if method == "single":
            chosen = combined
        else:
            chosen = [r for r in runs if r["method"] == method
                      and (method != "gradnorm" or r["alpha"] == main_alpha)]
        if chosen:
            methods[method] = _aggregate(study, chosen)
    sweep = {}
    for alpha in sorted({r["alpha"] for r in runs if r["method"] == "gradnorm"}):
        chosen = [r for r in runs if r["method"] == "gradnorm" and r["alpha"] == alpha]
        sweep[str(alpha)] = _aggregate(study, chosen)
    summary: dict[str, Any] = {"study": study_info(study), "config": config,
                               "methods": methods, "alpha_sweep": sweep}
    if grid is not None:
        points: dict[int, list[float]] = {}
        for r in runs:
            if r["method"] == "grid":
                points.setdefault(r["variant"], []).append(r[key])
        compared = {}
        for method in config["methods"]:
            if method in ("grid", "single"):
                continue
            chosen = [r for r in runs if r["method"] == method
                      and (method != "gradnorm" or r["alpha"] == main_alpha)]
            if chosen and all(min(r["final_weights"]) > 0 for r in chosen):
                compared[method] = {"weights": [r["final_weights"] for r in chosen],
                                    "values": [r[key] for r in chosen]}
        summary["grid"] = gridlib.compare(grid, points, compared,
                                          study.summary.higher_is_better)
        for p in summary["grid"]["points"]:  # each point's test metrics too
            chosen = [r for r in runs if r["method"] == "grid" and r["variant"] == p["position"]]
            agg = _aggregate(study, chosen)
            p["test"] = {k: v for k, v in agg.items() if k.startswith("test_")}
    if baseline is not None:
        summary["baseline"] = baseline
    summary["runs"] = runs
    return summary


def _fixed(value: float, decimals: int) -> str:
    """``value`` with ``decimals`` decimals; one that rounds to zero prints as 0, not -0.0."""
    text = f"{value:.{decimals}f}"
    return f"{0.0:.{decimals}f}" if float(text) == 0 else text


def mean_std_text(ms: dict | None, digits: int = 4, decimals: int | None = None) -> str:
    """``mean ± std`` of a ``{"mean", "std", "n"}`` entry ("–" for None).

    ``decimals`` None: the mean with ``digits`` significant digits, the std with 2; a mean
    below 1e-9 of the std (floating-point rounding of a mean that is 0) prints as 0.
    ``decimals`` k: both with k decimals (a std that would round to 0 but is not keeps one
    significant digit).
    """
    if ms is None:
        return "–"
    mean, std = ms["mean"], ms["std"]
    if not (math.isfinite(mean) and math.isfinite(std)):
        return f"{mean:g} ± {std:g}"
    if decimals is not None:
        spread = _fixed(std, decimals)
        if float(spread) == 0 and std > 0:
            spread = f"{std:.1g}"
        return f"{_fixed(mean, decimals)} ± {spread}"
    if std > 0 and abs(mean) < 1e-9 * std:
        mean = 0.0
    return f"{mean:.{digits}g} ± {std:.2g}"


def _signed(value: float, decimals: int | None) -> str:
    if decimals is None:
        return f"{value:+.3g}"
    text = _fixed(value, decimals)
    return text if text.startswith("-") or float(text) == 0 else "+" + text


def _weights(ws: Sequence[float]) -> str:
    return "(" + ", ".join(f"{w:.3g}" for w in ws) + ")"


def metric_heading(info: Mapping[str, Any], spec: Mapping[str, Any]) -> str:
    """A test metric's column heading: "left accuracy (test)", "task 0 MSE (test)" (the
    task's name is put before a label that does not start with it)."""
    name = info["task_names"][spec["task"]]
    label = spec["label"] or spec["name"]
    if not label.startswith(name):
        label = f"{name} {label}"
    return f"{label} (test)"


def _grid_lines(summary: dict) -> list[str]:
    g = summary["grid"]
    info = summary["study"]["summary"]
    dec = info.get("decimals")
    T = len(summary["study"]["task_names"])
    lat = g["lattice"]
    best = g["best"]
    lines = ["## Grid of static weights", ""]
    levels = ", ".join(f"{v:g}" for v in lat["levels"])
    what = ("a sweep of log10(w_0 / w_1)" if T == 2
            else f"a lattice of the {T - 1} log ratios log10(w_0 / w_i)")
    text = (f"Each point is retrained from scratch with static weights (sum = {T}); "
            f"{lat['points']} points: {what} on the levels {levels}")
    if lat["equal_added"]:
        text += " plus equal weights"
    if lat["subsampled"]:
        text += (f" ({lat['points']} of the lattice's {lat['lattice_size']} points: equal "
                 f"weights and a uniform sample drawn with seed {lat['sample_seed']})")
    better = "Higher" if info["higher_is_better"] else "Lower"
    lines.append(f"{text}. {better} is better for {info['label']}.")
    lines.append("")
    coord = (f", log10(w_0/w_1) = {best['coords'][0]:g}" if T == 2 else "")
    lines.append(f"**Best point**: w = {_weights(best['weights'])}{coord}: "
                 f"{mean_std_text(best['metric'], decimals=dec)} over "
                 f"{best['metric']['n']} seed(s).")
    if best["at_edge"]:
        which = ", ".join(f"w_0/w_{i}" for i in best["at_edge"])
        lines.append("")
        lines.append(f"**The best point is at the edge of the grid** ({which} at the end of "
                     f"the range {lat['range']}): the optimum may lie outside; widen "
                     "--grid-range.")
    lines += ["", f"Distance: {g['distance']}. Gap: the method's mean minus the best "
              "point's, signed so that positive is worse; within = |gap| <= the best point's "
              "std over seeds.", ""]
    head = ["method", "mean final w", "distance to best", "nearest point (its metric)",
            info["label"], "gap", "gap / best std", "within best std"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in g["methods"].items():
        near = g["points"][[p["position"] for p in g["points"]].index(m["nearest_point"])]
        ratio = m["gap_over_best_std"]
        lines.append("| " + " | ".join([
            name, _weights(m["mean_weights"]), mean_std_text(m["distance"], 3),
            f"{_weights(near['weights'])} ({mean_std_text(near['metric'], decimals=dec)})",
            mean_std_text(m["metric"], decimals=dec), _signed(m["gap"], dec),
            "–" if ratio is None else f"{ratio:+.2f}",
            "yes" if m["within_best_std"] else "no"]) + " |")
    lines.append("")
    pts = g["points"]
    sign = -1 if info["higher_is_better"] else 1
    shown = pts if T == 2 else sorted(pts, key=lambda p: sign * p["metric"]["mean"])[:10]
    title = "All points" if T == 2 or len(pts) <= 10 else f"The 10 best of {len(pts)} points"
    lines += [f"{title}:", ""]
    first = "log10(w_0/w_1)" if T == 2 else "log10(w_0/w_i), i = 1..T-1"
    lines += [f"| {first} | w | {info['label']} |", "|---|---|---|"]
    for p in shown:
        c = ", ".join(f"{v:g}" for v in p["coords"])
        c = c if T == 2 else f"({c})"
        lines.append(f"| {c} | {_weights(p['weights'])} | "
                     f"{mean_std_text(p['metric'], decimals=dec)} |")
    lines.append("")
    return lines


def _single_note(summary: dict) -> list[str]:
    """What the ``single`` row's summary value is (where it is measured against itself)."""
    info = summary["study"]["summary"]
    single = summary["methods"].get("single")
    if single is None or not info["needs_single"]:
        return []
    n = single[info["key"]]["n"]
    return [f"`single` is one network per task. The baselines B are the single networks' test "
            f"metrics averaged over the {n} seed(s), and each seed's single networks are "
            f"scored against that mean: their {info['label']} is 0 on average by "
            "construction (the mean over seeds is printed as 0; summary.json keeps its "
            "floating-point rounding), and its ± is the spread over seeds of the single "
            "networks about their own mean, the seed-to-seed noise of the baselines.", ""]


def render_markdown(summary: Mapping[str, Any], description: Sequence[str] = ()) -> str:
    """summary.md's text: the method table, the alpha sweep and the grid, from a summary
    (:func:`summarize`'s, or summary.json read back)."""
    info = summary["study"]
    T = len(info["task_names"])
    label = info["summary"]["label"]
    key = info["summary"]["key"]
    dec = info["summary"].get("decimals")
    lines = [f"# {info['title']}", "", *description, ""]
    metrics = info["metrics"]
    if summary["methods"]:
        head = ["method", label] + [metric_heading(info, m) for m in metrics]
        head += [f"final w_{i}" for i in range(T)] + ["wall time (s)"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for method, m in summary["methods"].items():
            cells = [method, mean_std_text(m[key], decimals=dec)]
            cells += [mean_std_text(m[f"test_{s['name']}"][s["task"]]) for s in metrics]
            fw = m["final_weights"]
            cells += [f"{w['mean']:.3g}" for w in fw] if fw is not None else ["–"] * T
            cells += [f"{m['wall_time_s']['mean']:.1f}"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        lines += _single_note(summary)
    if summary["alpha_sweep"]:
        lines += ["## GradNorm against alpha", "",
                  f"| alpha | {label} | " + " | ".join(f"final w_{i}" for i in range(T)) + " |",
                  "|---|---|" + "---|" * T]
        for alpha, a in summary["alpha_sweep"].items():
            lines.append(f"| {alpha} | {mean_std_text(a[key], decimals=dec)} | " + " | ".join(
                f"{w['mean']:.3g}" for w in a["final_weights"]) + " |")
        lines.append("")
    if "grid" in summary:
        lines += _grid_lines(summary)
    return "\n".join(lines)


def write_summary(summary: dict, out: Path, description: Sequence[str] = ()) -> None:
    """summary.json (everything, with ``description``: the lines under summary.md's heading)
    and summary.md (the tables)."""
    data = {"study": summary["study"], "description": list(description),
            **{k: v for k, v in summary.items() if k not in ("study", "description")}}
    (out / "summary.json").write_text(json.dumps(data, indent=2))
    (out / "summary.md").write_text(render_markdown(summary, description))


# ---------------------------------------------------------------------- re-rendering
#: The studies on the runner that a summary.json can rebuild: name -> (module, class).
STUDIES = {"toy": ("lossbalance.experiments.toy", "ToyStudy"),
           "digits": ("lossbalance.experiments.digits", "DigitsStudy")}


def rebuild_study(summary: Mapping[str, Any]) -> Study | None:
    """The study a summary.json was written by, built from its ``config`` (None for a study
    not in :data:`STUDIES`). ValueError where the config does not give back the same study
    settings."""
    name = summary["study"].get("name")
    if name not in STUDIES:
        return None
    module, cls_name = STUDIES[name]
    cls = getattr(importlib.import_module(module), cls_name)
    config = summary["config"]
    params = inspect.signature(cls).parameters
    study = cls(**{k: config[k] for k in params if k in config})
    differ = [k for k, v in study.config().items() if k in config and config[k] != v]
    if differ:
        raise ValueError(f"summary.json's config does not rebuild the {name} study: "
                         f"{', '.join(differ)} differ")
    return study


def render(out: Path) -> list[Path]:
    """Re-render summary.md and the figures of a finished study in ``out`` from its
    summary.json (and metrics.csv where present: the weight and loss-ratio panels need it;
    without it those figures are left as they are). Nothing is trained and summary.json is
    not written: the numbers are the file's, the formatting, labels and description are the
    current code's (a study of :data:`STUDIES` is rebuilt from its config for them; another
    keeps what summary.json holds). A ``lossbalance nyuv2`` folder gets its summary.md again
    (it has no figures). Returns the files written.

    ValueError (nothing written) where ``out`` holds no such summary.json.
    """
    from .. import plots

    path = Path(out) / "summary.json"
    if not path.is_file():
        raise ValueError(f"--out {out} has no summary.json")
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} is not readable JSON: {exc}") from None
    from . import nyuv2

    if nyuv2.is_summary(summary):  # lossbalance nyuv2's (summary.md only, no figures)
        md = Path(out) / "summary.md"
        md.write_text(nyuv2.summary_markdown(summary))
        return [md]
    if not isinstance(summary, dict) or not {"study", "config", "methods"} <= set(summary):
        raise ValueError(f"{path} is not a summary.json of lossbalance toy, digits, nyuv2 or "
                         "another study on the runner (no study, config or methods)")
    study = rebuild_study(summary)
    if study is not None:
        summary["study"] = {**summary["study"], **study_info(study)}
        description = study.describe(summary["config"])
    else:
        description = summary.get("description") or []
    md = Path(out) / "summary.md"
    md.write_text(render_markdown(summary, description))
    return [md, *plots.plot_study(Path(out), summary)]
