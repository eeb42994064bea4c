"""NYUv2 losses, KPIs and metrics against values computed by hand on tiny arrays."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from lossbalance.experiments import nyuv2_metrics as nm

# label (1 x 2 x 3) with one ignored pixel, and logits whose argmax is `guess`
LABEL = torch.tensor([[[0, 0, 1], [1, -1, 2]]])
GUESS = torch.tensor([[[0, 1, 1], [1, 0, 0]]])


def logits_for(guess: torch.Tensor) -> torch.Tensor:
    return F.one_hot(guess, 13).permute(0, 3, 1, 2).float() * 5.0


def test_miou_and_pixel_accuracy_ignore_minus_one():
    m = nm.Metrics(("segmentation",))
    m.update({"segmentation": logits_for(GUESS)}, {"segmentation": LABEL})
    out = m.compute()
    # (truth, guess) on labelled pixels: (0,0) (0,1) (1,1) (1,1) (2,0); the ignored pixel,
    # guessed 0, must not count. IoU: class 0 = 1/3, class 1 = 2/3, class 2 = 0; the ten
    # classes absent from both are left out of the mean.
    assert out["miou"] == pytest.approx(100 * (1 / 3 + 2 / 3 + 0) / 3)
    assert out["pixel_acc"] == pytest.approx(100 * 3 / 5)


def test_miou_is_over_the_whole_set_not_a_mean_of_batches():
    a_label, a_guess = torch.tensor([[[0, 0]]]), torch.tensor([[[0, 0]]])
    b_label, b_guess = torch.tensor([[[1, 0]]]), torch.tensor([[[0, 0]]])
    m = nm.Metrics(("segmentation",))
    m.update({"segmentation": logits_for(a_guess)}, {"segmentation": a_label})
    m.update({"segmentation": logits_for(b_guess)}, {"segmentation": b_label})
    # all four pixels: class 0 TP 3, FP 1 -> 3/4; class 1 TP 0, FN 1 -> 0; mean 3/8.
    # (A mean of per-batch mIoU would give (1 + (1/2 + 0) / 2) / 2 = 5/8.)
    assert m.compute()["miou"] == pytest.approx(100 * 3 / 8)
    assert m.compute()["pixel_acc"] == pytest.approx(75.0)


def test_depth_errors_skip_invalid_pixels():
    pred = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 2, 2)
    depth = torch.tensor([2.0, 0.0, 2.0, 5.0]).view(1, 1, 2, 2)
    m = nm.Metrics(("depth",))
    m.update({"depth": pred}, {"depth": depth})
    out = m.compute()
    assert out["abs_err"] == pytest.approx(1.0)  # |1-2|, |3-2|, |4-5|
    assert out["rel_err"] == pytest.approx((1 / 2 + 1 / 2 + 1 / 5) / 3)
    assert float(nm.depth_loss(pred, depth)) == pytest.approx(1.0)


def _unit(angle_deg: float) -> list[float]:
    a = math.radians(angle_deg)
    return [math.sin(a), 0.0, math.cos(a)]


def normals_case():
    """Five pixels: angles 0, 60, 90, 10 against (0, 0, 1) (the last given as (0, 0, 2):
    not unit length) and one invalid (all-zero) normal."""
    pred = torch.tensor([_unit(0), _unit(60), _unit(90), _unit(10), _unit(45)])
    truth = torch.tensor([[0, 0, 1.0], [0, 0, 1.0], [0, 0, 1.0], [0, 0, 2.0], [0, 0, 0.0]])
    to_map = lambda t: t.T.reshape(1, 3, 1, 5)  # noqa: E731
    return to_map(pred), to_map(truth)


def test_normal_angles_mean_median_and_thresholds():
    pred, truth = normals_case()
    m = nm.Metrics(("normal",))
    m.update({"normal": pred}, {"normal": truth})
    out = m.compute()
    assert out["angle_mean"] == pytest.approx((0 + 60 + 90 + 10) / 4, abs=1e-5)  # float32 input
    assert out["angle_median"] == pytest.approx((10 + 60) / 2, abs=nm.BIN_WIDTH)
    assert out["within_11.25"] == pytest.approx(50.0)
    assert out["within_22.5"] == pytest.approx(50.0)
    assert out["within_30"] == pytest.approx(50.0)
    cos10 = math.cos(math.radians(10))
    assert float(nm.normal_loss(pred, truth)) == pytest.approx((0 + 0.5 + 1 + 1 - cos10) / 4)


def test_median_over_batches_matches_numpy():
    gen = torch.Generator().manual_seed(0)
    m = nm.Metrics(("normal",))
    angles = []
    for n in (7, 4):  # odd total: 11 pixels
        truth = torch.zeros(1, 3, 1, n)
        truth[:, 2] = 1.0
        deg = torch.rand(n, generator=gen, dtype=torch.float64) * 170 + 0.3
        pred = torch.stack([torch.sin(torch.deg2rad(deg)), torch.zeros(n),
                            torch.cos(torch.deg2rad(deg))]).float().view(1, 3, 1, n)
        m.update({"normal": pred}, {"normal": truth})
        angles += deg.tolist()
    assert m.compute()["angle_median"] == pytest.approx(np.median(angles), abs=2e-3)
    assert m.compute()["angle_mean"] == pytest.approx(np.mean(angles), abs=1e-4)


def test_losses_ignore_invalid_and_stay_attached_when_empty():
    logits = torch.randn(1, 13, 2, 3, requires_grad=True)
    loss = nm.segmentation_loss(logits, LABEL)
    valid = LABEL != -1
    expected = F.cross_entropy(logits.permute(0, 2, 3, 1)[valid], LABEL[valid])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    empty = nm.depth_loss(torch.ones(1, 1, 2, 2, requires_grad=True), torch.zeros(1, 1, 2, 2))
    assert empty.item() == 0.0 and empty.requires_grad
    no_label = nm.segmentation_loss(logits, torch.full((1, 2, 3), -1))
    assert no_label.item() == 0.0 and no_label.requires_grad


def test_dtp_kpis():
    pred_depth = torch.tensor([2.1, 9.0, 3.0, 4.5]).view(1, 1, 2, 2)
    depth = torch.tensor([2.0, 0.0, 2.0, 5.0]).view(1, 1, 2, 2)
    pred_n, truth_n = normals_case()
    k = nm.kpis({"segmentation": logits_for(GUESS), "depth": pred_depth, "normal": pred_n},
                {"segmentation": LABEL, "depth": depth, "normal": truth_n})
    # pixel accuracy 3/5; depth ratios 1.05, 1.5, 1.11 -> 2 of 3 under 1.25; normals
    # 0 and 10 degrees of 4 within 22.5
    assert k.tolist() == pytest.approx([0.6, 2 / 3, 0.5])


def test_delta_m_signs_and_subsets():
    base = {"miou": 40.0, "pixel_acc": 60.0, "abs_err": 0.5, "rel_err": 0.2,
            "angle_mean": 25.0, "angle_median": 20.0, "within_11.25": 30.0,
            "within_22.5": 55.0, "within_30": 65.0}
    higher = {name: up for name, _, up in nm.METRICS}
    better = {k: v * (1.1 if higher[k] else 0.9) for k, v in base.items()}
    assert nm.delta_m(better, base) == pytest.approx(10.0)
    mixed = dict(base, miou=44.0, abs_err=0.6)  # +10% on one, -20% on the other
    assert nm.delta_m(mixed, base, ("miou", "abs_err")) == pytest.approx((10 - 20) / 2)
    assert nm.delta_m(mixed, base) == pytest.approx((10 - 20) / 9)
    with pytest.raises(ValueError, match="abs_err"):
        nm.delta_m(better, dict(base, abs_err=0.0))
    with pytest.raises(ValueError, match="unknown metric"):
        nm.delta_m(better, base, ("iou",))
