"""Running an example as a script, and comparing what its processes saved."""

import subprocess
import sys
from pathlib import Path

import torch

EXAMPLES = Path(__file__).parents[2] / "examples"


def run_example(*args: str, timeout: float = 300) -> str:
    """Run ``python <args>`` in the examples' folder; its output, or a failure that shows it."""
    done = subprocess.run([sys.executable, *args], cwd=EXAMPLES, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, f"{args} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest absolute difference between two state dicts' tensors."""
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)
