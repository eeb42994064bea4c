"""GradNorm's per-step work in C++, built on first use.

``capture.cpp`` does what ``lossbalance._graph.consumers_of`` and the Python hooks of
``lossbalance._taps.Capture`` do; ``update.cpp`` what ``GradNorm._step`` does once the norms
are known (the T-vector arithmetic, the fused Adam step, the renormalisation). The model's
gradient and the norms at a weight are the Python code's bit for bit; the norm at h and the
update are loops in double precision, equal to the Python code's float operations up to
rounding. What they save: a call into Python per task and per graph node, and ~20 tensor
operations per step, cost ~0.1-0.2x of a small network's training step. The module is
compiled with ``torch.utils.cpp_extension.load`` the first time a GradNorm step needs it
(~30-40 s with two cores; a C++ compiler and ninja are needed) and cached by torch under
``$TORCH_EXTENSIONS_DIR`` (``~/.cache/torch_extensions`` by default) for later processes.

Set ``LOSSBALANCE_NATIVE=0`` to run the Python code only; where the build fails, it runs and
one warning says why.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
import warnings
from pathlib import Path
from typing import Any

_SOURCES = ("module.cpp", "capture.cpp", "update.cpp")
_lock = threading.Lock()
_module: Any = None
_tried = False


def enabled() -> bool:
    """Whether ``LOSSBALANCE_NATIVE`` allows the C++ step (anything but 0/false/no/off)."""
    return os.environ.get("LOSSBALANCE_NATIVE", "1").strip().lower() not in (
        "0", "false", "no", "off")


def _add_pip_ninja() -> None:
    """Put the ``ninja`` of the PyPI package (the test and toy extras) on PATH when the
    machine has none: torch's build runs ``ninja`` by name."""
    if shutil.which("ninja"):
        return
    try:
        import ninja
    except ImportError:
        return
    os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, os.environ.get("PATH", "")])


def load() -> Any:
    """The compiled module, or None (disabled, or the build failed: then a warning once)."""
    global _module, _tried
    if not enabled():
        return None
    if _tried:
        return _module
    with _lock:
        if not _tried:
            try:
                from torch.utils import cpp_extension

                _add_pip_ninja()
                sources = [Path(__file__).with_name(name) for name in _SOURCES]
                # named by its sources: versions side by side (two checkouts, an upgrade)
                # each keep their own build and can be loaded in one process
                digest = hashlib.sha256(b"".join(p.read_bytes() for p in sources))
                _module = cpp_extension.load(
                    name=f"lossbalance_native_{digest.hexdigest()[:12]}",
                    sources=[str(p) for p in sources],
                    extra_cflags=["-O3"],
                    verbose=False,
                )
            except Exception as exc:  # no compiler, no ninja, a failed build
                _module = None
                lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
                telling = [line for line in lines if any(
                    key in line for key in ("error:", "not found", "No such file"))]
                reason = (telling[0] if telling else lines[0] if lines else repr(exc))[:300]
                warnings.warn(
                    f"lossbalance: the C++ step could not be built ({reason}); the Python "
                    "code runs instead (the same step up to float rounding, slower). Set "
                    "LOSSBALANCE_NATIVE=0 to skip the build.",
                    RuntimeWarning,
                    stacklevel=3,
                )
            _tried = True
    return _module


def loaded() -> Any:
    """The module once ``load`` has built it, else None (no environment check, no build)."""
    return _module


def new_capture() -> Any:
    """A ``NativeCapture`` object, or None when the module is not available."""
    module = load()
    return None if module is None else module.NativeCapture()
