"""A small real-data study: pairs of scikit-learn's 8 x 8 digits, four tasks of different kinds.

Data. ``sklearn.datasets.load_digits`` (bundled with scikit-learn, no download): 1797 grey
images of 8 x 8 pixels with values 0..16 and their digit 0..9. The *source images* are split
first into train / validation / test (60 / 20 / 20, stratified by digit, seeded); then, within
each split separately, pairs (a, b) of two different source images are drawn with a seeded
generator and placed side by side as one 8 x 16 image (a left, b right). No source image of
the test split appears in a training or validation pair.

Tasks, on one shared trunk (targets stay raw, so the losses differ in kind and scale):

    left   class of a (10 classes)        cross-entropy          metric: accuracy (higher better)
    right  class of b (10 classes)        cross-entropy          metric: accuracy (higher better)
    sum    class(a) + class(b), 0..18     MSE on the raw sum     metric: RMSE (lower better)
    image  the 8 x 16 input, pixels 0..16 MSE on the raw pixels  metric: RMSE (lower better)

The network sees the pixels divided by 16; its heads predict raw values. Model: an MLP trunk
128 -> 256 -> 128 (ReLU after each layer) and one linear head per task; GradNorm measures
gradient norms at the trunk's last ``nn.Linear`` weight (128 x 256), as in the toy study.
Adam's lr (1e-2) was chosen among 1e-3, 3e-3, 1e-2 and 3e-2 by the single-task networks'
validation metrics alone (one seed, 20 epochs), the same for every method.

Multi-task summary (Maninis et al., CVPR 2019; ``experiments.study.delta_m``):

    delta_m% = 100 * mean_k s_k (M_k - B_k) / B_k,   s_k = +1 for accuracy, -1 for RMSE,

with B_k the mean test metric of the ``single`` networks (one per task, same trunk, one head):
delta_m > 0 means better than one network per task on average.

Model selection (validation split only). Each run is evaluated on the validation pairs after
its first step, then every epoch (``train_pairs // batch_size`` steps), and after its last
step; it keeps the model of the evaluation with the highest

    score = mean_k s_k ln M_k

(the first on ties); the test split is evaluated once, on the kept model. For a ``single``
run (one task) this is its best validation metric. For a multi-task run the score differs
from the log form of delta_m, 100 * mean_k s_k ln(M_k / B_k), only by a constant, whatever
the baseline B: it ranks evaluations as delta_m would (to first order in M_k / B_k - 1)
without needing the single networks' results first, so every run selects on its own.

DTP's KPIs (Guo et al., ECCV 2018) come from each training batch: the batch accuracy for the
classifiers and, for the regressions, the batch's coefficient of determination clipped to
[0, 1],

    kpi = 1 - min(1, MSE_batch / Var_batch(target)).

Like accuracy it is 1 for a perfect prediction; it is 0 for a model no better than predicting
the batch's mean target, so it needs no scale of its own (exp(-RMSE / scale) would), and the
task's units cancel.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .grid import level_values
from .study import Batch, GridDefaults, Metric, Study, Summary, delta_m

TASKS = ("left", "right", "sum", "image")
TASK_LABELS = ("left digit (CE)", "right digit (CE)", "sum of digits (MSE)",
               "8x16 image (MSE)")
KINDS = ("classification", "classification", "regression", "regression")
SPLITS = ("train", "val", "test")
PIXEL_MAX = 16.0
IMAGE_PIXELS = 8 * 16
HEAD_OUT = {"left": 10, "right": 10, "sum": 1, "image": IMAGE_PIXELS}
METRICS = (
    Metric("accuracy", 0, True, "left accuracy"),
    Metric("accuracy", 1, True, "right accuracy"),
    Metric("rmse", 2, False, "sum RMSE"),
    Metric("rmse", 3, False, "image RMSE"),
)


# ---------------------------------------------------------------------- data
@dataclass
class Pairs:
    """One split's pairs: inputs and raw targets.

    ``image`` [N, 128] raw pixels (0..16) of the 8 x 16 pair, row-major; ``left``/``right``
    [N] digit classes; ``sum`` [N] float; ``sources`` [N, 2] the indices in ``load_digits``
    of the left and right images.
    """

    image: Tensor
    left: Tensor
    right: Tensor
    sum: Tensor
    sources: Tensor

    def __len__(self) -> int:
        return int(self.left.shape[0])

    def targets(self) -> list[Tensor]:
        """Targets in task order: left, right, sum, image."""
        return [self.left, self.right, self.sum, self.image]


@dataclass
class DigitsData:
    """The three splits' pairs."""

    train: Pairs
    val: Pairs
    test: Pairs

    def split(self, name: str) -> Pairs:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; choose from {', '.join(SPLITS)}")
        return getattr(self, name)


def load_source() -> tuple[Tensor, Tensor]:
    """scikit-learn's bundled digits: images [1797, 8, 8] (float32, 0..16), labels [1797]."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return (torch.as_tensor(bunch.images, dtype=torch.float32),
            torch.as_tensor(bunch.target, dtype=torch.long))


def split_sources(labels: Tensor | np.ndarray, seed: int,
                  fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)
                  ) -> dict[str, np.ndarray]:
    """Split source-image indices into train / val / test, stratified by digit
    (scikit-learn's ``train_test_split``, twice); sorted, disjoint index arrays."""
    from sklearn.model_selection import train_test_split

    if (len(fractions) != 3 or any(not 0 < f < 1 for f in fractions)
            or abs(sum(fractions) - 1) > 1e-9):
        raise ValueError(f"fractions must be three numbers in (0, 1) summing to 1, got "
                         f"{fractions}")
    y = np.asarray(labels)
    idx = np.arange(len(y))
    rest, test = train_test_split(idx, test_size=fractions[2], stratify=y, random_state=seed)
    train, val = train_test_split(rest, test_size=fractions[1] / (fractions[0] + fractions[1]),
                                  stratify=y[rest], random_state=seed)
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


def make_pairs(images: Tensor, labels: Tensor, sources: np.ndarray, n: int,
               gen: torch.Generator) -> Pairs:
    """Draw ``n`` pairs of two different images among ``sources`` (uniformly; pairs are
    independent draws) and place them side by side: left image in columns 0..7."""
    if n < 1:
        raise ValueError(f"the number of pairs must be >= 1, got {n}")
    if len(sources) < 2:
        raise ValueError(f"pairs need at least 2 source images, got {len(sources)}")
    src = torch.as_tensor(np.asarray(sources), dtype=torch.long)
    m = len(src)
    a = torch.randint(m, (n,), generator=gen)
    b = (a + torch.randint(1, m, (n,), generator=gen)) % m  # never a itself
    left, right = src[a], src[b]
    image = torch.cat([images[left], images[right]], dim=2).reshape(n, IMAGE_PIXELS)
    return Pairs(image=image.contiguous(), left=labels[left], right=labels[right],
                 sum=(labels[left] + labels[right]).to(torch.float32),
                 sources=torch.stack([left, right], dim=1))


def make_data(train_pairs: int, val_pairs: int, test_pairs: int, seed: int = 0) -> DigitsData:
    """The study's data: split the source images with ``seed``, then draw each split's pairs
    with its own generator (seeded from ``seed`` and the split)."""
    images, labels = load_source()
    parts = split_sources(labels, seed)
    sizes = {"train": train_pairs, "val": val_pairs, "test": test_pairs}
    pairs = {}
    for k, name in enumerate(SPLITS):
        gen = torch.Generator().manual_seed(1000 * seed + k)
        pairs[name] = make_pairs(images, labels, parts[name], sizes[name], gen)
    return DigitsData(**pairs)


# ---------------------------------------------------------------------- model
class DigitsNet(nn.Module):
    """An MLP trunk 128 -> hidden -> width (ReLU after each) and one linear head per task.

    ``tasks`` selects the heads (all four for multi-task training, one for a ``single``
    network). Heads: left/right -> 10 logits, sum -> 1 value, image -> 128 pixel values.
    GradNorm measures gradient norms at :attr:`shared`, the trunk's last ``nn.Linear`` weight.
    """

    def __init__(self, tasks: Sequence[str] = TASKS, hidden: int = 256, width: int = 128
                 ) -> None:
        super().__init__()
        for t in tasks:
            if t not in TASKS:
                raise ValueError(f"unknown task {t!r}; choose from {', '.join(TASKS)}")
        self.tasks = tuple(tasks)
        self.trunk = nn.Sequential(
            nn.Linear(IMAGE_PIXELS, hidden), nn.ReLU(), nn.Linear(hidden, width), nn.ReLU())
        self.heads = nn.ModuleList(nn.Linear(width, HEAD_OUT[t]) for t in self.tasks)

    @property
    def shared(self) -> nn.Parameter:
        """The weight of the last shared layer, where GradNorm measures gradient norms."""
        return self.trunk[-2].weight

    def features(self, image: Tensor) -> Tensor:
        """The shared representation h of raw images [N, 128] (pixels scaled by 1/16)."""
        return self.trunk(image / PIXEL_MAX)

    def head_outputs(self, feats: Sequence[Tensor]) -> list[Tensor]:
        """Each head on its own alias of h (``balancer.tap(h)``); sum's output as [N]."""
        outs = [head(f) for head, f in zip(self.heads, feats, strict=True)]
        return [o.squeeze(-1) if t == "sum" else o
                for t, o in zip(self.tasks, outs, strict=True)]

    def forward(self, image: Tensor) -> list[Tensor]:
        h = self.features(image)
        return self.head_outputs([h] * len(self.heads))


# ---------------------------------------------------------------------- losses, metrics, KPIs
def task_loss(task: int, prediction: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy for left/right (0, 1); MSE on the raw targets for sum and image (2, 3)."""
    if KINDS[task] == "classification":
        return F.cross_entropy(prediction, target)
    return F.mse_loss(prediction, target)


def accuracy(logits: Tensor, labels: Tensor) -> float:
    """The fraction of rows whose largest logit is at the label."""
    return float((logits.argmax(dim=-1) == labels).to(torch.float64).mean())


def rmse(prediction: Tensor, target: Tensor) -> float:
    """sqrt(mean over every predicted number of the squared error), in the target's units."""
    return float(((prediction.double() - target.double()) ** 2).mean().sqrt())


def task_metric(task: int, prediction: Tensor, target: Tensor) -> float:
    """Accuracy for left/right, RMSE for sum and image (``METRICS[task]``)."""
    if KINDS[task] == "classification":
        return accuracy(prediction, target)
    return rmse(prediction, target)


def kpi(task: int, prediction: Tensor, target: Tensor) -> Tensor:
    """DTP's KPI of one task on one training batch, in [0, 1] (module docstring): the batch
    accuracy, or 1 - min(1, MSE / Var(target)) over the batch."""
    with torch.no_grad():
        if KINDS[task] == "classification":
            return (prediction.argmax(dim=-1) == target).float().mean()
        mse = F.mse_loss(prediction.float(), target.float())
        var = target.float().var(unbiased=False).clamp(min=1e-12)
        return 1.0 - torch.clamp(mse / var, max=1.0)


def selection_score(metrics: Mapping[str, float], tasks: Sequence[int]) -> float:
    """mean over ``tasks`` of s_k ln M_k (module docstring); M_k clamped to >= 1e-12."""
    chosen = [m for m in METRICS if m.task in tasks]
    return sum((1.0 if m.higher_is_better else -1.0) * math.log(max(metrics[m.key], 1e-12))
               for m in chosen) / len(chosen)


# ---------------------------------------------------------------------- the study
def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"--{name.replace('_', '-')} must be an integer >= 1, got {value}")
    return value


class DigitsStudy(Study):
    """Pairs of 8 x 8 digits, four tasks (module docstring); defaults are the README's run.

    Args:
        epochs: passes over the training pairs (the last incomplete batch of an epoch is
            dropped); a run has ``epochs * (train_pairs // batch_size)`` steps and is
            evaluated on the validation split every epoch (module docstring).
        batch_size, lr: the model's Adam.
        train_pairs, val_pairs, test_pairs: pairs drawn in each split.
        data_seed: the source split's and the pairs' seed (the same for every run).
        hidden, width: the trunk's layer sizes.
        log_every: steps between rows of metrics.csv.
    """

    name = "digits"
    title = "Digits study: four tasks on pairs of 8 x 8 digits"
    task_names = TASKS
    task_labels = TASK_LABELS
    task_kinds = KINDS
    metrics = METRICS
    summary = Summary(key="delta_m", label="Δm% vs single", axis="Δm% against single (higher "
                      "is better)", higher_is_better=True, stem="delta_m", needs_single=True,
                      decimals=1)
    grid = GridDefaults(range=(-1.5, 1.5), levels=3, max_points=27)
    default_alpha = 1.5
    default_alphas = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0)
    eval_splits = ("val",)
    selection_split = "val"

    def __init__(self, epochs: int = 20, batch_size: int = 128, lr: float = 1e-2,
                 train_pairs: int = 8000, val_pairs: int = 2000, test_pairs: int = 2000,
                 data_seed: int = 0, hidden: int = 256, width: int = 128,
                 log_every: int = 10) -> None:
        for name, value in (("epochs", epochs), ("batch_size", batch_size),
                            ("train_pairs", train_pairs), ("val_pairs", val_pairs),
                            ("test_pairs", test_pairs), ("hidden", hidden), ("width", width),
                            ("log_every", log_every)):
            _positive_int(name, value)
        if isinstance(data_seed, bool) or not isinstance(data_seed, int) or data_seed < 0:
            raise ValueError(f"--data-seed must be an integer >= 0, got {data_seed}")
        if not isinstance(lr, int | float) or not math.isfinite(lr) or lr <= 0:
            raise ValueError(f"--lr must be a finite number > 0, got {lr}")
        if batch_size > train_pairs:
            raise ValueError(f"--batch-size {batch_size} is larger than --train-pairs "
                             f"{train_pairs}: an epoch would have no full batch")
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = float(lr)
        self.train_pairs = train_pairs
        self.val_pairs = val_pairs
        self.test_pairs = test_pairs
        self.data_seed = data_seed
        self.hidden = hidden
        self.width = width
        self.steps_per_epoch = train_pairs // batch_size
        self.steps = epochs * self.steps_per_epoch
        self.log_every = log_every
        self.eval_every = self.steps_per_epoch

    def config(self) -> dict[str, Any]:
        return {
            "tasks": len(TASKS), "task_names": list(TASKS), "epochs": self.epochs,
            "batch_size": self.batch_size, "lr": self.lr, "train_pairs": self.train_pairs,
            "val_pairs": self.val_pairs, "test_pairs": self.test_pairs,
            "data_seed": self.data_seed, "hidden": self.hidden, "width": self.width,
            "steps": self.steps, "steps_per_epoch": self.steps_per_epoch,
            "log_every": self.log_every, "eval_every": self.eval_every,
        }

    def make_data(self) -> DigitsData:
        return make_data(self.train_pairs, self.val_pairs, self.test_pairs, self.data_seed)

    def build_model(self, tasks: Sequence[int]) -> DigitsNet:
        return DigitsNet([TASKS[t] for t in tasks], hidden=self.hidden, width=self.width)

    def batches(self, data: DigitsData, seed: int) -> Iterator[Batch]:
        gen = torch.Generator().manual_seed(10_000 + seed)
        train = data.train
        targets = train.targets()
        for _ in range(self.epochs):
            order = torch.randperm(len(train), generator=gen)
            for k in range(self.steps_per_epoch):
                idx = order[k * self.batch_size:(k + 1) * self.batch_size]
                yield train.image[idx], [t[idx] for t in targets]

    def forward(self, model: nn.Module, batch: Batch, tap: Any) -> list[Tensor]:
        return model.head_outputs(tap(model.features(batch[0])))

    def task_loss(self, task: int, prediction: Tensor, batch: Batch) -> Tensor:
        return task_loss(task, prediction, batch[1][task])

    def evaluate(self, model: nn.Module, data: DigitsData, split: str,
                 tasks: Sequence[int]) -> dict[str, float]:
        pairs = data.split(split)
        targets = pairs.targets()
        outputs = model(pairs.image)
        return {METRICS[t].key: task_metric(t, out, targets[t])
                for t, out in zip(tasks, outputs, strict=True)}

    def summary_value(self, metrics: Mapping[str, float],
                      baseline: Mapping[str, float] | None) -> float:
        if baseline is None:
            raise ValueError("the digits study's delta_m needs the single-task baselines")
        return delta_m(metrics, baseline, METRICS)

    def kpis(self, values: Tensor, initial: Tensor, predictions: Sequence[Tensor],
             batch: Batch) -> Tensor:
        return torch.stack([kpi(t, p, batch[1][t]) for t, p in enumerate(predictions)])

    def selection_score(self, metrics: Mapping[str, float], tasks: Sequence[int]) -> float:
        return selection_score(metrics, tasks)

    def describe(self, config: Mapping[str, Any]) -> list[str]:
        levels = ", ".join(f"{v:g}" for v in level_values(
            *config.get("grid_range") or self.grid.range,
            config.get("grid_levels") or self.grid.levels))
        return [
            f"Pairs of scikit-learn's 8 x 8 digits side by side ({config['train_pairs']} "
            f"train / {config['val_pairs']} validation / {config['test_pairs']} test pairs, "
            "drawn within a 60/20/20 split of the 1797 source images), four tasks on one MLP "
            f"trunk 128-{config['hidden']}-{config['width']}: left and right digit "
            "(cross-entropy; accuracy), sum of the digits (MSE on 0..18; RMSE), the 8 x 16 "
            "image (MSE on pixel values 0..16; RMSE).",
            "",
            f"{config['epochs']} epochs of {config['steps_per_epoch']} steps, batch "
            f"{config['batch_size']}, Adam lr {config['lr']:g}. Each run keeps the model "
            "with the best validation score mean_k s_k ln M_k (evaluated after the first "
            "step, every epoch and after the last step); the test split is used only for the "
            "kept model. Δm% = 100 mean_k s_k (M_k - B_k) / B_k against the single-task "
            "networks' mean test metrics B (s = +1 for accuracy, -1 for RMSE): higher is "
            "better, 0 is as good as one network per task.",
            "",
            f"Grid coordinates log10(w_left / w_i) on levels {levels}.",
        ]
