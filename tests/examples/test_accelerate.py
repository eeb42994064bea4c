"""examples/accelerate_gradnorm.py: ``accelerator.backward(bal.loss(...))`` (float32 and bf16
autocast on the CPU) takes exactly the plain loop's steps."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("accelerate",
                    reason="Accelerate is not installed (pip install -e '.[accelerate]')")

import accelerate_gradnorm as example
import multitask
from accelerate.state import AcceleratorState

STEPS, BATCH = 12, 32


@pytest.fixture(autouse=True)
def fresh_accelerator():
    """Accelerate keeps one state per process; each test starts its own Accelerator."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize(("mixed_precision", "autocast"),
                         [("no", None), ("bf16", torch.bfloat16)])
def test_accelerate_steps_are_the_plain_loops(mixed_precision, autocast):
    model, bal = example.train(STEPS, BATCH, mixed_precision=mixed_precision)
    net, hand = multitask.train_by_hand(STEPS, BATCH, autocast=autocast)
    assert torch.equal(bal.weights, hand.weights)
    assert torch.equal(bal.stats["grad_norm"], hand.stats["grad_norm"])
    for ours, theirs in zip(model.parameters(), net.parameters(), strict=True):
        assert torch.equal(ours, theirs)
    assert torch.isfinite(bal.weights).all() and (bal.weights - 1).abs().max() > 0.05


def test_accelerate_script(monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["accelerate_gradnorm.py", "--steps", str(STEPS)])
    example.main()
    _, hand = multitask.train_by_hand(STEPS, BATCH)
    printed = capsys.readouterr().out.splitlines()[0]
    assert printed == f"weights {[round(w, 6) for w in hand.weights.tolist()]}"
