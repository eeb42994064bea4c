"""The README: its Python examples run, its test command is CI's, its speed table is the CSV's."""

import csv
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parents[1]
README = ROOT / "README.md"
MAX_CHARS = 12_000  # a user's page; explanations go to docs/


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
