"""examples/lightning_gradnorm.py: GradNorm's total returned from a LightningModule (automatic
and manual optimisation, 32-bit, bf16 autocast, float16 with a GradScaler, accumulate_grad_batches)
takes exactly the plain loop's steps, and two DDP processes take the one process's steps."""

from __future__ import annotations

import pytest
import torch
from example_runs import max_difference, run_example

try:
    pytest.importorskip("lightning.pytorch",
                        reason="PyTorch Lightning is not installed (pip install -e '.[lightning]')")
except RuntimeError as err:  # torchmetrics imports a torchvision built for another torch
    pytest.skip(f"lightning does not import beside this torchvision: {err} (docs/training.md, "
                "PyTorch Lightning)", allow_module_level=True)

import lightning_gradnorm as example
import multitask
from lightning.pytorch.plugins import MixedPrecision

STEPS, BATCH = 12, 32

# precision -> (Trainer arguments, the plain loop's arguments), each with a fresh GradScaler
PRECISIONS = {
    "32-true": lambda: ({}, {}),
    "bf16-mixed": lambda: ({"precision": "bf16-mixed"}, {"autocast": torch.bfloat16}),
    # Trainer(precision="16-mixed") on the CPU turns into bf16-mixed; the plugin keeps float16
    # and its GradScaler, which scales the returned total: the balancer divides the scale out
    "16-mixed-plugin": lambda: ({"plugins": [MixedPrecision("16-mixed", "cpu")]},
                                {"autocast": torch.float16,
                                 "scaler": torch.amp.GradScaler("cpu")}),
}


@pytest.mark.parametrize(("manual", "precision"), [
    (False, "32-true"), (True, "32-true"), (False, "bf16-mixed"), (True, "16-mixed-plugin")],
    ids=["automatic", "manual", "automatic-bf16", "manual-16-plugin"])
def test_lightning_steps_are_the_plain_loops(manual, precision):
    trainer_args, loop_args = PRECISIONS[precision]()
    module = example.GradNormModule(STEPS, BATCH, manual=manual)
    trainer = example.make_trainer(STEPS, **trainer_args)
    trainer.fit(module)
    net, bal = multitask.train_by_hand(STEPS, BATCH, **loop_args)
    assert torch.equal(module.bal.weights, bal.weights)
    assert torch.equal(module.bal.stats["grad_norm"], bal.stats["grad_norm"])
    assert int(module.bal.num_steps) == int(bal.num_steps) > 0
    for ours, theirs in zip(module.net.parameters(), net.parameters(), strict=True):
        assert torch.equal(ours, theirs)
    assert torch.isfinite(bal.weights).all() and (bal.weights - 1).abs().max() > 0.05
    # what training_step's log_dict recorded: the last step's w_i and G_i
    logged = trainer.callback_metrics
    assert torch.equal(torch.stack([logged[f"G_{i}"] for i in range(multitask.T)]),
                       bal.stats["grad_norm"])
    if precision == "16-mixed-plugin":  # the scaler overflowed and backed off, skipping
        assert trainer.precision_plugin.scaler.get_scale() < 2.0**16


def test_lightning_accumulation_is_the_plain_loops_windows(monkeypatch, tmp_path):
    """``python lightning_gradnorm.py --accumulate 2``: ``accumulate_grad_batches=2`` divides
    the returned total by 2 itself; ``GradNorm(accumulation_steps=2, caller_divides=True)``
    then takes the plain loop's window steps (``bal.backward``, accumulation_steps=2)."""
    monkeypatch.setattr("sys.argv", ["lightning_gradnorm.py", "--steps", str(STEPS),
                                     "--accumulate", "2", "--out", str(tmp_path)])
    example.main()
    saved = torch.load(tmp_path / "rank0.pt", weights_only=True)
    net, bal = multitask.train_by_hand(STEPS, BATCH, accumulate=2)
    assert int(bal.num_steps) == STEPS
    assert torch.equal(saved["weights"], bal.weights)
    assert max_difference(saved["model"], net.state_dict()) == 0
    assert (bal.weights - 1).abs().max() > 0.05


def test_lightning_ddp_two_processes_are_one(tmp_path):
    """``python lightning_gradnorm.py --devices 2``: DDP over gloo, each process on its half
    of every batch, GradNorm's ``distributed`` left at its default."""
    run_example("lightning_gradnorm.py", "--devices", "2", "--steps", str(STEPS),
                "--out", str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    net, bal = multitask.train_by_hand(STEPS, BATCH)
    assert torch.equal(ranks[0]["weights"], ranks[1]["weights"])
    assert max_difference(ranks[0]["model"], ranks[1]["model"]) == 0
    assert float((ranks[0]["weights"] - bal.weights).abs().max()) <= 1e-6
    # Adam turns the rounding of a near-zero gradient entry into a step of up to its lr
    assert max_difference(ranks[0]["model"], net.state_dict()) <= 1e-4
    assert (bal.weights - 1).abs().max() > 0.05
