"""GradNorm's per-step work in C++: an opt-in, built on request.

``capture.cpp`` does what ``lossbalance._graph.consumers_of`` and the Python hooks of
``lossbalance._taps.Capture`` do; ``update.cpp`` what ``GradNorm``'s update stage does once the
norms are known (the T-vector arithmetic, the fused Adam step, the renormalisation). The
model's gradient and the norms at a weight are the Python code's bit for bit; the norm at h
and the update are loops in double precision, equal to the Python code's float operations up
to rounding. What they save: a call into Python per task and per graph node, and ~20 tensor
operations per step, which matter only for small models on the CPU.

By default nothing is built and the pure PyTorch step runs (no compiler needed). The C++
step is used when

* the environment sets ``LOSSBALANCE_NATIVE=1`` (or true/yes/on), or
* the program calls ``lossbalance.native.build()`` (and the environment does not set
  ``LOSSBALANCE_NATIVE=0``, which always wins).

The first use compiles the module with ``torch.utils.cpp_extension.load`` (~30-40 s with two
cores; a C++ compiler, the Python headers and ``ninja``, e.g. ``pip install
lossbalance[native]``), announced by one line on stderr, and torch caches it under
``$TORCH_EXTENSIONS_DIR`` (``~/.cache/torch_extensions`` by default) for later processes.
Where the build fails, the Python step runs and one warning says why.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
import threading
import warnings
from pathlib import Path
from typing import Any

_SOURCES = ("module.cpp", "capture.cpp", "update.cpp")
_ON = ("1", "true", "yes", "on")
_OFF = ("0", "false", "no", "off")
_lock = threading.Lock()
_module: Any = None
_tried = False
_requested = False  # build() was called in this process


def enabled() -> bool:
    """Whether the C++ step is wanted: ``LOSSBALANCE_NATIVE`` set to 1/true/yes/on, or
    unset (or empty) after ``build()`` was called; 0/false/no/off always turns it off."""
    value = os.environ.get("LOSSBALANCE_NATIVE", "").strip().lower()
    if value in _ON:
        return True
    if value in _OFF:
        return False
    if value:
        raise ValueError(
            f"LOSSBALANCE_NATIVE must be one of {', '.join(_ON + _OFF)} (or unset), "
            f"got {os.environ['LOSSBALANCE_NATIVE']!r}"
        )
    return _requested


def build() -> bool:
    """Build (or load from torch's cache) the C++ step now and use it in this process.

    Returns whether it is available: False where the build failed (one RuntimeWarning says
    why) or where ``LOSSBALANCE_NATIVE=0`` turns it off.
    """
    global _requested
    _requested = True
    return load() is not None


def _add_pip_ninja() -> None:
    """Put the ``ninja`` of the PyPI package (the ``native`` extra) on PATH when the machine
    has none: torch's build runs ``ninja`` by name."""
    if shutil.which("ninja"):
        return
    try:
        import ninja
    except ImportError:
        return
    os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, os.environ.get("PATH", "")])


class _NoCudaHomeWarning(logging.Filter):
    """Drops torch's "No CUDA runtime is found, using CUDA_HOME=..." (logged when
    ``torch.utils.cpp_extension`` is imported by a CUDA build of torch on a machine without
    CUDA): it is about torch's CUDA set-up, not about this CPU-only module."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No CUDA runtime is found")


def _cpp_extension() -> Any:
    """``torch.utils.cpp_extension``, imported without its CUDA_HOME warning."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    quiet = _NoCudaHomeWarning()
    logger.addFilter(quiet)
    try:
        from torch.utils import cpp_extension
    finally:
        logger.removeFilter(quiet)
    return cpp_extension


def _announce(cpp_extension: Any, name: str) -> None:
    """One line on stderr before a build, unless torch's cache already holds the module."""
    try:
        built = Path(cpp_extension._get_build_directory(name, False), f"{name}.so").exists()
    except Exception:  # a private helper of torch: if it changed, announce anyway
        built = False
    if not built:
        print("lossbalance: compiling GradNorm's C++ step (LOSSBALANCE_NATIVE=1), once per "
              "installation: ~30-40 s with 2 CPU cores", file=sys.stderr, flush=True)


def load() -> Any:
    """The compiled module, or None (not enabled, or the build failed: then a warning once)."""
    global _module, _tried
    if not enabled():
        return None
    if _tried:
        return _module
    with _lock:
        if not _tried:
            try:
                cpp_extension = _cpp_extension()
                _add_pip_ninja()
                sources = [Path(__file__).with_name(name) for name in _SOURCES]
                # named by its sources: versions side by side (two checkouts, an upgrade)
                # each keep their own build and can be loaded in one process
                digest = hashlib.sha256(b"".join(p.read_bytes() for p in sources))
                name = f"lossbalance_native_{digest.hexdigest()[:12]}"
                _announce(cpp_extension, name)
                _module = cpp_extension.load(
                    name=name,
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
                    "step runs instead (the same step up to float rounding). Unset "
                    "LOSSBALANCE_NATIVE (or set it to 0) to skip the build.",
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
