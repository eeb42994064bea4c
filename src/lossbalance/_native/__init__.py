"""The fast path's graph walk and per-task hooks in C++, built on first use.

``capture.cpp`` does what ``lossbalance._graph.consumers_of`` and the Python hooks of
``lossbalance._taps.Capture`` do, with the same ATen operations in the same order (so the
same numbers, bit for bit), without a call into the interpreter per task and per node. It is
compiled with ``torch.utils.cpp_extension.load`` the first time a fast-path step needs it
(about 20 s with two cores; a C++ compiler and ninja are needed) and cached by torch under
``$TORCH_EXTENSIONS_DIR`` (``~/.cache/torch_extensions`` by default) for later processes.

Set ``LOSSBALANCE_NATIVE=0`` to use the Python hooks only; where the build fails, the Python
hooks are used and one warning says why.
"""

from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path
from typing import Any

_lock = threading.Lock()
_module: Any = None
_tried = False


def enabled() -> bool:
    """Whether ``LOSSBALANCE_NATIVE`` allows the C++ capture (anything but 0/false/no/off)."""
    return os.environ.get("LOSSBALANCE_NATIVE", "1").strip().lower() not in (
        "0", "false", "no", "off")


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

                _module = cpp_extension.load(
                    name="lossbalance_native_capture",
                    sources=[str(Path(__file__).with_name("capture.cpp"))],
                    extra_cflags=["-O2"],
                    verbose=False,
                )
            except Exception as exc:  # no compiler, no ninja, a failed build
                _module = None
                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
                warnings.warn(
                    f"lossbalance: the C++ capture could not be built ({reason}); the fast path "
                    "uses Python hooks (same results, slower). Set LOSSBALANCE_NATIVE=0 to "
                    "skip the build.",
                    RuntimeWarning,
                    stacklevel=3,
                )
            _tried = True
    return _module


def new_capture() -> Any:
    """A ``NativeCapture`` object, or None when the module is not available."""
    module = load()
    return None if module is None else module.NativeCapture()
