"""The README: its Python examples run, its test command is CI's, its speed table is the CSV's."""

import csv
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parents[1]
README = ROOT / "README.md"
MAX_CHARS = 15_000  # a user's page (a row for each of 18 balancers, twice); explanations: docs/


def test_readme_examples_run(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 2
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    bal, fixed = namespace["bal"], namespace["fixed"]
    # the training loop's GradNorm moved its weights, positive and summing to T
    assert bal.weights.sum().item() == pytest.approx(3.0, rel=1e-5)
    assert (bal.weights > 0).all()
    assert (bal.weights - 1).abs().max() > 0.05
    assert int(bal.num_steps) == len(namespace["loader"])
    # the static retrain held GradNorm's final weights
    torch.testing.assert_close(fixed.weights, bal.weights)


def test_readme_commands_match_ci():
    blocks = [b.strip() for b in re.findall(r"```bash\n(.*?)\n```", README.read_text(), flags=re.S)]
    ci = (ROOT / ".ci" / "run").read_text()
    ci_command = next(line for line in ci.splitlines() if line.startswith("python3 -m venv"))
    assert ci_command in blocks
    assert "constraints.txt" in ci_command and "pytest" in ci_command


def test_readme_is_short():
    assert len(README.read_text()) <= MAX_CHARS


def readme_speed_rows() -> dict[str, list[str]]:
    """The README's speed table: row label -> cells after it."""
    text = README.read_text()
    table = text[text.index("| implementation | T = 2"):].split("\n\n")[0]
    rows = {}
    for line in table.splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


# README row label -> (peers.csv impl, norms_at)
SPEED_ROWS = {
    "lossbalance, fast path (tap)": ("lossbalance", "W"),
    "lossbalance, fast path, norms at h": ("lossbalance", "h"),
    "lossbalance, general path (no tap)": ("lossbalance-general", "W"),
    "literal Algorithm 1 (`create_graph`)": ("literal", "W"),
    "gradnorm-pytorch 0.2.3, our alpha and lr": ("gradnorm-pytorch*", "W"),
    "LibMTL 1.1.5": ("LibMTL", "W"),
}


def test_readme_speed_table_is_the_csv():
    with (ROOT / "benchmarks" / "results" / "peers.csv").open(newline="") as f:
        csv_rows = [r for r in csv.DictReader(f) if r["trunk"] == "toy"]
    rows = readme_speed_rows()
    assert set(rows) == set(SPEED_ROWS)
    for label, (impl, where) in SPEED_ROWS.items():
        expected = []
        for tasks in ("2", "10", "64"):
            (r,) = [r for r in csv_rows
                    if (r["impl"], r["norms_at"], r["tasks"]) == (impl, where, tasks)]
            expected.append(f"{float(r['time_ratio']):.2f}x ({float(r['peak_mem_ratio']):.2f})")
        if where == "W":
            expected.append(f"{float(r['agreement']):.2g}")
        assert rows[label][:len(expected)] == expected, (
            f"README row {label!r} differs from benchmarks/results/peers.csv: {expected}")


# README balancer row (its first cell) -> benchmarks/methods.py's method name
BALANCER_ROWS = {
    "`GradNorm(T, alpha, lr)`": "gradnorm",
    "`UncertaintyWeighting(T, task_types)`": "uncertainty",
    "`DWA(T)`": "dwa", "`RLW(T)`": "rlw", "`GLS(T)`": "gls", "`FAMO(T)`": "famo",
    "`IMTLL(T)`": "imtl-l", "`DBMTL(T)`": "db-mtl", "`MGDA(T)`": "mgda",
    "`PCGrad(T)`": "pcgrad", "`CAGrad(T)`": "cagrad", "`IMTLG(T)`": "imtl-g",
    "`NashMTL(T)`": "nash-mtl", "`AlignedMTL(T)`": "aligned-mtl", "`UPGrad(T)`": "upgrad",
}


def cost_cell(rows: list[dict], method: str, impl: str) -> str:
    """'a / b' at h / W ('-' where not run), or one ratio for a loss-based method."""
    def ratio(where):
        hit = [r for r in rows if (r["method"], r["impl"], r["where"], r["tasks"])
               == (method, impl, where, "10")]
        return f"{float(hit[0]['time_ratio']):.2f}x" if hit else "-"
    if any(r["method"] == method and r["where"] == "-" for r in rows):
        return ratio("-")
    cell = f"{ratio('h')} / {ratio('W')}"
    return "-" if cell == "- / -" else cell


def test_readme_balancer_costs_are_the_csv():
    with (ROOT / "benchmarks" / "results" / "methods.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    text = README.read_text()
    table = text[text.index("| balancer | paper |"):].split("\n\n")[0]
    cells = {}
    for line in table.splitlines()[2:]:
        parts = [c.strip() for c in line.strip("|").split("|")]
        cells[parts[0]] = parts
    assert set(BALANCER_ROWS) <= set(cells)
    for label, method in BALANCER_ROWS.items():
        ours, libmtl = cells[label][3], cells[label][4]
        assert ours == cost_cell(rows, method, "lossbalance"), (label, ours)
        assert libmtl == cost_cell(rows, method, "LibMTL"), (label, libmtl)
