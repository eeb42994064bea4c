import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(2)


import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

# The same examples on every run (CI included): a property test fails on a change of the code,
# never on a new random draw. HYPOTHESIS_PROFILE=explore searches afresh each run.
settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

from lossbalance import _native  # noqa: E402


@pytest.fixture(params=["native", "python"])
def backend(request, monkeypatch):
    """Run a test with GradNorm's C++ step (lossbalance._native) and with the Python code.

    "native" sets LOSSBALANCE_NATIVE=1 and checks after the test that the module was built
    and handed to the code under test (a balancer's step or a capture): a failed build or a
    disabled step fails the case instead of quietly running Python. "python" sets it to 0.
    Each balancer decides on its first step and keeps the decision; the process-wide state
    (``build()`` called, the build's result) is restored after each case.
    """
    monkeypatch.setattr(_native, "_requested", False)
    if request.param == "python":
        monkeypatch.setenv("LOSSBALANCE_NATIVE", "0")
        yield request.param
        return
    monkeypatch.setenv("LOSSBALANCE_NATIVE", "1")
    handed = []
    load = _native.load

    def counting_load():
        module = load()
        handed.append(module is not None)
        return module

    monkeypatch.setattr(_native, "load", counting_load)
    yield request.param
    assert _native.loaded() is not None, "the C++ step was not built"
    assert any(handed), "no balancer or capture was handed the C++ step"


@pytest.fixture
def python_only(monkeypatch):
    """The Python code only (LOSSBALANCE_NATIVE=0), for tests of the Python shortcuts."""
    monkeypatch.setenv("LOSSBALANCE_NATIVE", "0")


@pytest.fixture
def native_on(monkeypatch):
    """The C++ step on (LOSSBALANCE_NATIVE=1), for tests of it."""
    monkeypatch.setattr(_native, "_requested", False)
    monkeypatch.setenv("LOSSBALANCE_NATIVE", "1")
