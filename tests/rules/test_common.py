"""What every rule shares: the solver extra's error when scipy is missing."""

from __future__ import annotations

import importlib

import pytest
import torch

from lossbalance._rules import _qp, cagrad_weights, mgda_weights, upgrad_weights


@pytest.mark.parametrize("rule", [mgda_weights, upgrad_weights, cagrad_weights])
def test_missing_solver_names_the_package_and_the_extra(rule, monkeypatch):
    real = importlib.import_module

    def no_scipy(name, *args):
        if name.startswith("scipy"):
            raise ImportError(f"No module named {name!r}")
        return real(name, *args)

    monkeypatch.setattr(_qp.importlib, "import_module", no_scipy)
    with pytest.raises(ImportError, match=r"'scipy'.*pip install \"lossbalance\[solvers\]\""):
        rule(torch.tensor([[1.0, -0.5], [-0.5, 2.0]]))
