import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(2)


import pytest  # noqa: E402


@pytest.fixture(params=["native", "python"])
def backend(request, monkeypatch):
    """Run a test with GradNorm's C++ step (lossbalance._native) and with the Python code."""
    if request.param == "python":
        monkeypatch.setenv("LOSSBALANCE_NATIVE", "0")
    return request.param


@pytest.fixture
def python_only(monkeypatch):
    """The Python code only (LOSSBALANCE_NATIVE=0), for tests of the Python shortcuts."""
    monkeypatch.setenv("LOSSBALANCE_NATIVE", "0")
