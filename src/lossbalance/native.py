"""The optional C++ step of GradNorm (see ``lossbalance._native`` for what it does).

Off by default: the pure PyTorch step runs and nothing is compiled. To use it, set
``LOSSBALANCE_NATIVE=1`` in the environment, or call ``build()`` before training::

    import lossbalance as lb
    if not lb.native.build():  # compiles once (~30-40 s on 2 cores), then cached by torch
        print("no C++ step here; the Python step runs")

``LOSSBALANCE_NATIVE=0`` turns it off even after ``build()``. A balancer decides on its first
step which step to use and keeps it.
"""

from __future__ import annotations

from . import _native
from ._native import build, enabled

__all__ = ["available", "build", "enabled"]


def available() -> bool:
    """Whether the C++ module is built and loaded in this process (no build, no check)."""
    return _native.loaded() is not None
