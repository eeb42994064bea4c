"""examples/toy_demo.ipynb runs top to bottom (with a few training steps)."""

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).parents[1] / "examples" / "toy_demo.ipynb"


def test_notebook_executes(monkeypatch):
    pytest.importorskip("ipykernel")
    monkeypatch.setenv("LOSSBALANCE_DEMO_STEPS", "20")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    text = "".join(o.get("text", "") for o in outputs)
    assert "gradnorm: test MSE per task" in text
    assert any("image/png" in o.get("data", {}) for o in outputs)
    assert os.environ["LOSSBALANCE_DEMO_STEPS"] == "20"
