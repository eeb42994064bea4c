"""examples/toy_demo.ipynb: it runs top to bottom with a few steps, and the committed file is
the script's cells executed at the default steps (with every figure and table in it)."""

from __future__ import annotations

import base64
import csv
import importlib.util
import re
from pathlib import Path

import nbformat
import pytest

pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

EXAMPLES = Path(__file__).parents[1] / "examples"
NOTEBOOK = EXAMPLES / "toy_demo.ipynb"
ALPHAS = ("0", "0.12", "0.5", "1.5", "3")
METHODS = ("equal", "gradnorm", "gradnorm (log w)", "uncertainty")


def _script():
    spec = importlib.util.spec_from_file_location("make_notebook", EXAMPLES / "make_notebook.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MAKE = _script()


def _code_cells(nb) -> list:
    return [c for c in nb.cells if c.cell_type == "code"]


def _tagged(nb, tag: str) -> list:
    return [c for c in _code_cells(nb) if tag in c.metadata.get("tags", [])]


def _stdout(cell) -> str:
    return "".join(o.text for o in cell.outputs
                   if o.output_type == "stream" and o.name == "stdout")


def _check_outputs(nb) -> dict[str, int]:
    """Every section's table and figure are there, nothing went to stderr; returns the
    training steps each run of section 2 counted."""
    for cell in _code_cells(nb):
        kinds = {(o.output_type, o.get("name")) for o in cell.outputs}
        assert ("stream", "stderr") not in kinds and ("error", None) not in kinds, cell.source
    figures = _tagged(nb, MAKE.FIGURE)
    assert len(figures) == 3
    for cell in figures:
        pngs = [o.data["image/png"] for o in cell.outputs if "image/png" in o.get("data", {})]
        assert len(pngs) == 1, cell.source
        assert base64.b64decode(pngs[0])[:8] == b"\x89PNG\r\n\x1a\n"
    problem, loop, alpha, grid = (_stdout(c) for c in _tagged(nb, MAKE.TABLE))
    assert re.search(r"^task 0: sigma = 1, targets \(8000, 100\)", problem, re.M)
    assert re.search(r"^task 1: sigma = 100, targets \(8000, 100\)", problem, re.M)
    steps = {}
    for method in METHODS:
        num = r"[\d.e+-]+"
        row = re.search(rf"^\s*{re.escape(method)}\s+(\d+)\s+{num}\s+\d+\s+{num}\s+"
                        rf"\({num}, {num}\)\s+{num}$", loop, re.M)
        assert row, (method, loop)
        steps[method] = int(row.group(1))
    for name in ("equal", "uncertainty"):
        assert re.search(rf"^\s*{name}:\s+[\d.]+ ± [\d.e+-]+$", alpha, re.M), alpha
    for a in ALPHAS:
        assert re.search(rf"^alpha = \s*{re.escape(a)}:\s+[\d.]+ ± [\d.e+-]+\s+final w = \(",
                         alpha, re.M), (a, alpha)
    # the runner's seed-0 runs are section 2's loop, bit for bit
    assert "seed 0, test MSE as in section 2: True" in alpha
    points = re.findall(r"^grid log10\(w0/w1\) = +(-?\d+):", grid, re.M)
    assert points == [str(c) for c in range(-1, 9)], grid
    assert re.search(r"^best grid point: log10\(w0/w1\) = -?\d+", grid, re.M)
    for name in ("gradnorm", "static"):
        assert re.search(rf"^\s*{name}: w = \(.*decades from the best point, gap [-+][\d.]+.*"
                         r": (within|outside) the best point's spread$", grid, re.M), grid
    return steps


def test_notebook_runs_with_few_steps(tmp_path, monkeypatch):
    """The committed notebook, executed in a fresh kernel with 20 steps a run."""
    steps = 20
    out = tmp_path / "out"
    monkeypatch.setenv("LOSSBALANCE_DEMO_STEPS", str(steps))
    monkeypatch.setenv("LOSSBALANCE_DEMO_OUT", str(out))
    nb = MAKE.execute(nbformat.read(NOTEBOOK, as_version=4), timeout=300)
    counted = _check_outputs(nb)
    # the steps the loop of section 2 counted, and those the runner logged in sections 3-4
    assert counted == dict.fromkeys(METHODS, steps)
    for study in ("alpha", "grid"):
        with (out / study / "metrics.csv").open() as fh:
            rows = list(csv.DictReader(fh))
        last = {}
        for r in rows:
            key = (r["method"], r["alpha"], r["seed"], r.get("variant"))
            last[key] = max(last.get(key, -1), int(r["step"]))
        assert len(last) == (14 if study == "alpha" else 24)
        assert set(last.values()) == {steps - 1}
    for figure in ("balancers.png", "alpha/test_loss_vs_alpha.png", "grid/grid.png"):
        assert (out / figure).read_bytes()[:4] == b"\x89PNG"


def test_committed_notebook_is_the_script_executed():
    """Same cells as examples/make_notebook.py writes, executed in order at the default steps,
    every figure and table present, and small."""
    committed = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(committed)
    built = MAKE.build()
    assert [(c.cell_type, c.source, c.metadata.get("tags", [])) for c in committed.cells] == [
        (c.cell_type, c.source, c.metadata.get("tags", [])) for c in built.cells], (
        "examples/toy_demo.ipynb differs from examples/make_notebook.py: run the script")
    counts = [c.execution_count for c in _code_cells(committed)]
    assert counts == list(range(1, len(counts) + 1)), "committed without (all) its outputs"
    counted = _check_outputs(committed)
    assert counted == dict.fromkeys(METHODS, MAKE.DEFAULT_STEPS), (
        "committed from a short run: regenerate without LOSSBALANCE_DEMO_STEPS")
    assert NOTEBOOK.stat().st_size < 400_000
