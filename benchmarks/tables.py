"""Markdown tables for the README from the benchmarks' CSV files, so no number is copied by hand.

    python benchmarks/tables.py   # reads benchmarks/results/{step_overhead,peers,window_norms}.csv
"""

from __future__ import annotations

import argparse
import csv
from collections.abc import Callable
from pathlib import Path

Cell = Callable[[dict[str, str]], str]  # a table cell from a CSV row

METHOD_NAMES = {
    "fast/W": "fast path, norms at W",
    "fast/h": "fast path, norms at h",
    "general/W": "general path, norms at W",
    "general/h": "general path, norms at h",
    "literal/W": "literal loop, norms at W",
}


def read(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def markdown(rows: list[dict[str, str]], columns: dict[str, Cell]) -> str:
    """A Markdown table: one column per (header, cell function of a CSV row)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r) for cell in columns.values()) + " |" for r in rows]
    return "\n".join(lines)


def number(key: str) -> Cell:
    """The CSV field ``key`` with two decimals."""
    return lambda r: f"{float(r[key]):.2f}"


def step_overhead_table(rows: list[dict[str, str]]) -> str:
    return markdown(rows, {
        "T": lambda r: r["tasks"],
        "method": lambda r: METHOD_NAMES.get(r["method"], r["method"]),
        "plain step (ms)": number("plain_ms"),
        "time ratio (p25-p75)": lambda r: (f"{float(r['time_ratio']):.2f} "
                                           f"({float(r['ratio_p25']):.2f}-"
                                           f"{float(r['ratio_p75']):.2f})"),
        "peak memory ratio": number("peak_mem_ratio"),
    })


def peers_tables(rows: list[dict[str, str]]) -> str:
    out = []
    for trunk in dict.fromkeys(r["trunk"] for r in rows):
        for where in dict.fromkeys(r["norms_at"] for r in rows if r["trunk"] == trunk):
            part = [r for r in rows if r["trunk"] == trunk and r["norms_at"] == where]
            tasks = list(dict.fromkeys(r["tasks"] for r in part))
            out.append(f"**{trunk} trunk, norms at {where}**\n")
            out.append("| implementation | " + " | ".join(f"T={t}" for t in tasks) + " |")
            out.append("|---|" + "---|" * len(tasks))
            for impl in dict.fromkeys(r["impl"] for r in part):
                cells = []
                for t in tasks:
                    hit = [r for r in part if r["impl"] == impl and r["tasks"] == t]
                    cells.append(
                        f"{float(hit[0]['time_ratio']):.2f}x "
                        f"({float(hit[0]['peak_mem_ratio']):.2f})" if hit else "-"
                    )
                out.append(f"| {impl} | " + " | ".join(cells) + " |")
            out.append("")
    agree = {r["impl"]: r["agreement"] for r in rows if r.get("agreement")}
    if agree:
        out.append("| implementation | max abs difference |")
        out.append("|---|---|")
        for impl, value in agree.items():
            out.append(f"| {impl} | {float(value):.2g} |")
    return "\n".join(out)


def window_norms_table(rows: list[dict[str, str]]) -> str:
    return markdown(rows, {
        "T": lambda r: r["tasks"],
        "micro-batches": lambda r: r["micro"],
        "parameter_norms": lambda r: r["method"],
        "plain step (ms)": number("plain_ms"),
        "time ratio": number("time_ratio"),
        "peak memory": number("peak_mem_ratio"),
    })


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", default="benchmarks/results")
    args = parser.parse_args()
    results = Path(args.results)
    for name, render in (("step_overhead", step_overhead_table), ("peers", peers_tables),
                         ("window_norms", window_norms_table)):
        path = results / f"{name}.csv"
        if path.exists():
            rows = read(path)
            print(f"<!-- {path}, {rows[0]['machine']} -->\n{render(rows)}\n")


if __name__ == "__main__":
    main()
