"""Losses, DTP's KPIs and the validation metrics of the three NYUv2 tasks.

Losses (each a mean over the batch's valid pixels; 0, still attached to the graph, when a
batch has none):

    segmentation  cross-entropy of the 13 logits, pixels labelled -1 ignored
    depth         L1:  |d_hat - d|, pixels with d = 0 (no measurement) ignored
    normal        1 - cos(n_hat, n), pixels whose normal n is all zeros ignored

Validation metrics, accumulated over the whole split (not averaged per batch):

    miou, pixel_acc   from one 13 x 13 confusion matrix of the labelled pixels: IoU_c =
                      TP_c / (TP_c + FP_c + FN_c), averaged over the classes that occur in
                      the labels or the predictions (union > 0); pixel accuracy = trace / total
    abs_err, rel_err  mean over valid pixels of |d_hat - d| and |d_hat - d| / d
    angle_mean,       the angle between n_hat and n (in degrees, from the cosine in float64)
    angle_median,     over every valid pixel; the median from a histogram of 0.001 degree
    within_11.25/22.5/30  bins (exact to 0.0005 degrees), the rest exact; within_t is the
                      share of pixels with angle < t

miou, pixel_acc and within_* are in percent, as the literature's tables print them.

delta_m% (Maninis, Radosavovic, Kokkinos, CVPR 2019) of a multi-task model m against the
single-task baselines b, over the K = 9 metrics above (as NYUv2 tables in the literature
compute it), signed so that higher is better:

    delta_m = 100 / K * sum_k s_k (M_m,k - M_b,k) / M_b,k,   s_k = +1 if higher is better,
                                                             s_k = -1 if lower is better
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor
from torch.nn import functional as F

from .nyuv2_data import IGNORE, NUM_CLASSES

#: (metric, task, higher is better), in table order.
METRICS: tuple[tuple[str, str, bool], ...] = (
    ("miou", "segmentation", True),
    ("pixel_acc", "segmentation", True),
    ("abs_err", "depth", False),
    ("rel_err", "depth", False),
    ("angle_mean", "normal", False),
    ("angle_median", "normal", False),
    ("within_11.25", "normal", True),
    ("within_22.5", "normal", True),
    ("within_30", "normal", True),
)
THRESHOLDS = (11.25, 22.5, 30.0)
BIN_WIDTH = 1e-3  # degrees, the median's histogram
#: DTP's KPI for normals: the share of valid pixels within this angle (degrees).
KPI_ANGLE = 22.5
#: DTP's KPI for depth: the share of valid pixels with max(d_hat/d, d/d_hat) < this.
KPI_DEPTH_RATIO = 1.25


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    count = mask.sum()
    return (values * mask).sum() / count.clamp(min=1)


def segmentation_loss(logits: Tensor, label: Tensor) -> Tensor:
    """Cross-entropy over the pixels whose label is not -1 (logits [B, 13, H, W])."""
    per_pixel = F.cross_entropy(logits.float(), label, ignore_index=IGNORE, reduction="none")
    return _masked_mean(per_pixel, label != IGNORE)


def depth_loss(pred: Tensor, depth: Tensor) -> Tensor:
    """Mean |d_hat - d| over the pixels with d != 0 (both [B, 1, H, W])."""
    return _masked_mean((pred.float() - depth).abs(), depth != 0)


def _normal_valid(normal: Tensor) -> Tensor:
    return (normal != 0).any(dim=1)


def normal_loss(pred: Tensor, normal: Tensor) -> Tensor:
    """Mean 1 - cos(n_hat, n) over the pixels whose n is not all zeros ([B, 3, H, W])."""
    cos = F.cosine_similarity(pred.float(), normal, dim=1)
    return _masked_mean(1 - cos, _normal_valid(normal))


LOSSES = {"segmentation": segmentation_loss, "depth": depth_loss, "normal": normal_loss}


def _angles(pred: Tensor, normal: Tensor) -> Tensor:
    """Angles in degrees between n_hat and n at the valid pixels, in float64."""
    valid = _normal_valid(normal)
    p = pred.detach().double().movedim(1, -1)[valid]
    n = normal.double().movedim(1, -1)[valid]
    cos = F.cosine_similarity(p, n, dim=-1)
    return torch.rad2deg(torch.acos(cos.clamp(-1.0, 1.0)))


@torch.no_grad()
def kpis(preds: Mapping[str, Tensor], targets: Mapping[str, Tensor]) -> Tensor:
    """DTP's KPIs in [0, 1] from one training batch, one per task of ``preds`` in order:

    segmentation: pixel accuracy over labelled pixels; depth: share of valid pixels with
    max(d_hat / d, d / d_hat) < 1.25 (a d_hat <= 0 counts as wrong); normal: share of valid
    pixels within 22.5 degrees. A task with no valid pixel in the batch gets 0.5.
    """
    out = []
    for task, pred in preds.items():
        target = targets[task]
        if task == "segmentation":
            valid = target != IGNORE
            hit = (pred.argmax(dim=1) == target) & valid
        elif task == "depth":
            valid = target != 0
            p = pred.detach().float()
            ratio = torch.maximum(p / target, target / p)
            hit = (p > 0) & valid & (ratio < KPI_DEPTH_RATIO)
        else:
            angles = _angles(pred, target)
            n = angles.numel()
            out.append(float((angles < KPI_ANGLE).sum()) / n if n else 0.5)
            continue
        n = int(valid.sum())
        out.append(float(hit.sum()) / n if n else 0.5)
    return torch.tensor(out)


class Metrics:
    """Accumulates the validation metrics of some tasks over batches; see the module doc."""

    def __init__(self, tasks: tuple[str, ...], device: torch.device | str = "cpu") -> None:
        self.tasks = tasks
        self.device = torch.device(device)
        self.confusion = torch.zeros(NUM_CLASSES * NUM_CLASSES, dtype=torch.long,
                                     device=self.device)
        self.depth_sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        self.depth_count = 0
        self.bins = round(180 / BIN_WIDTH)
        self.histogram = torch.zeros(self.bins, dtype=torch.long, device=self.device)
        self.angle_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.within = torch.zeros(len(THRESHOLDS), dtype=torch.long, device=self.device)
        self.angle_count = 0

    @torch.no_grad()
    def update(self, preds: Mapping[str, Tensor], targets: Mapping[str, Tensor]) -> None:
        """Add one batch: ``preds[task]`` the model's output, ``targets[task]`` the truth."""
        if "segmentation" in preds:
            label = targets["segmentation"]
            valid = label != IGNORE
            guess = preds["segmentation"].argmax(dim=1)
            self.confusion += torch.bincount(
                label[valid] * NUM_CLASSES + guess[valid], minlength=NUM_CLASSES ** 2)
        if "depth" in preds:
            depth = targets["depth"]
            valid = depth != 0
            d = depth[valid].double()
            err = (preds["depth"].detach().double()[valid] - d).abs()
            self.depth_sums += torch.stack([err.sum(), (err / d).sum()])
            self.depth_count += int(valid.sum())
        if "normal" in preds:
            angles = _angles(preds["normal"], targets["normal"])
            self.angle_sum += angles.sum()
            self.within += torch.stack([(angles < t).sum() for t in THRESHOLDS])
            idx = (angles / BIN_WIDTH).long().clamp_(0, self.bins - 1)
            self.histogram += torch.bincount(idx, minlength=self.bins)
            self.angle_count += angles.numel()

    def _median(self) -> float:
        n = self.angle_count
        cum = self.histogram.cumsum(0)
        ranks = torch.tensor([(n - 1) // 2, n // 2], device=cum.device) + 1
        bins = torch.searchsorted(cum, ranks)
        return float((bins.double() + 0.5).mean()) * BIN_WIDTH

    def compute(self) -> dict[str, float]:
        """The metrics of the tasks seen (NaN for a task without a valid pixel)."""
        nan = float("nan")
        out: dict[str, float] = {}
        if "segmentation" in self.tasks:
            cm = self.confusion.view(NUM_CLASSES, NUM_CLASSES).double()  # [truth, guess]
            tp = cm.diagonal()
            union = cm.sum(0) + cm.sum(1) - tp
            present = union > 0
            total = cm.sum()
            out["miou"] = float((tp[present] / union[present]).mean() * 100) if present.any() \
                else nan
            out["pixel_acc"] = float(tp.sum() / total * 100) if total > 0 else nan
        if "depth" in self.tasks:
            n = self.depth_count
            out["abs_err"] = float(self.depth_sums[0]) / n if n else nan
            out["rel_err"] = float(self.depth_sums[1]) / n if n else nan
        if "normal" in self.tasks:
            n = self.angle_count
            out["angle_mean"] = float(self.angle_sum) / n if n else nan
            out["angle_median"] = self._median() if n else nan
            for t, count in zip(THRESHOLDS, self.within.tolist(), strict=True):
                out[f"within_{t:g}"] = 100 * count / n if n else nan
        return out


def delta_m(metrics: Mapping[str, float], baseline: Mapping[str, float],
            names: tuple[str, ...] | None = None) -> float:
    """delta_m% of ``metrics`` against ``baseline`` over ``names`` (default: all 9), higher
    is better; see the module doc. Raises ValueError for a metric missing from either or a
    baseline of 0."""
    higher = {name: up for name, _, up in METRICS}
    names = tuple(higher) if names is None else names
    total = 0.0
    for name in names:
        if name not in higher:
            raise ValueError(f"unknown metric {name!r}; choose from {', '.join(higher)}")
        if name not in metrics or name not in baseline:
            raise ValueError(f"delta_m needs {name!r} in both the run and the baseline")
        b = baseline[name]
        if b == 0:
            raise ValueError(f"the baseline's {name} is 0: its relative change is undefined")
        sign = 1.0 if higher[name] else -1.0
        total += sign * (metrics[name] - b) / b
    return 100.0 * total / len(names)
