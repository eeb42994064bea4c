"""examples/accelerate_gradnorm.py: ``accelerator.backward(bal.loss(...))`` (float32 and bf16
autocast on the CPU, gradient accumulation) takes exactly the plain loop's steps."""

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


def test_accelerate_accumulation_is_the_plain_loops_windows():
    """``Accelerator(gradient_accumulation_steps=2)`` divides the total by 2 in
    ``accelerator.backward``; ``GradNorm(accumulation_steps=2, caller_divides=True)`` then
    takes the plain loop's window steps (``bal.backward``, accumulation_steps=2)."""
    model, bal = example.train(STEPS, BATCH, accumulate=2)
    net, hand = multitask.train_by_hand(STEPS, BATCH, accumulate=2)
    assert bal.caller_divides and int(bal.num_steps) == int(hand.num_steps) == STEPS
    assert torch.equal(bal.weights, hand.weights)
    assert torch.equal(bal.stats["grad_norm"], hand.stats["grad_norm"])
    for ours, theirs in zip(model.parameters(), net.parameters(), strict=True):
        assert torch.equal(ours, theirs)
    assert (hand.weights - 1).abs().max() > 0.05


def test_accelerate_script(monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["accelerate_gradnorm.py", "--steps", str(STEPS),
                                     "--accumulate", "2"])
    example.main()
    _, hand = multitask.train_by_hand(STEPS, BATCH, accumulate=2)
    printed = capsys.readouterr().out.splitlines()[0]
    assert printed == f"weights {[round(w, 6) for w in hand.weights.tolist()]}"
