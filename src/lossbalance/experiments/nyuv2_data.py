"""NYUv2 in the preprocessed ``.npy`` layout of multi-task code (MTAN, Liu et al., CVPR 2019).

The layout, checked in full by :func:`check_layout` before anything trains::

    ROOT/
      train/                      795 samples in the usual copy
        image/{i}.npy             float,   H x W x 3   (RGB, channels last)
        label/{i}.npy             integer-valued (any int or float dtype), H x W:
                                  class 0..12, -1 = ignore
        depth/{i}.npy             float,   H x W x 1   (0 = no measurement)
        normal/{i}.npy            float,   H x W x 3   (all zeros = no normal)
      val/                        654 samples (NYUv2's test split, as MTAN uses it)
        image/ label/ depth/ normal/   as in train/

with ``i`` = 0 .. N-1 in every folder of a split and H x W = 288 x 384 in the usual copy.
Arrays are stored channels last, as MTAN's loader expects (it moves the last axis first);
:class:`NYUv2` returns them channels first: image [3, H, W] float32, label [H, W] int64,
depth [1, H, W] float32, normal [3, H, W] float32. Any H x W divisible by 32 (the
encoder's five 2 x 2 poolings) is accepted, so tests can run on small fake copies
(:func:`write_fake`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

SPLITS = ("train", "val")
FOLDERS = ("image", "label", "depth", "normal")
NUM_CLASSES = 13
IGNORE = -1
#: The encoder halves H and W five times.
DIVISOR = 32
_CHANNELS = {"image": 3, "label": None, "depth": 1, "normal": 3}
_NAME = re.compile(r"^(0|[1-9][0-9]*)\.npy$")


@dataclass(frozen=True)
class Layout:
    """What :func:`check_layout` found: the root, the samples per split, H and W."""

    root: Path
    sizes: dict[str, int]
    height: int
    width: int


def _expected_shape(folder: str, height: int, width: int) -> tuple[int, ...]:
    channels = _CHANNELS[folder]
    return (height, width) if channels is None else (height, width, channels)


def _indices(folder: Path) -> set[int]:
    return {int(m.group(1)) for p in folder.iterdir() if (m := _NAME.match(p.name))}


def _header(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of a ``.npy`` file from its header (the data is not read)."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ValueError(f"NYUv2 layout: {path} is not a readable .npy array ({exc})") from None
    return tuple(array.shape), array.dtype


def check_layout(root: str | Path) -> Layout:
    """Check the whole layout (folders, indices, shapes, dtypes) and return what it holds.

    Reads only the ``.npy`` headers. Raises ValueError naming the first missing folder, the
    first missing index of a folder, or the first file of the wrong shape or dtype.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"NYUv2 layout: --data {root} is not a folder")
    sizes: dict[str, int] = {}
    for split in SPLITS:
        for folder in FOLDERS:
            if not (root / split / folder).is_dir():
                raise ValueError(
                    f"NYUv2 layout: folder {root / split / folder} is missing (expected "
                    f"{', '.join(f'{s}/{f}/' for s in SPLITS for f in FOLDERS)} under {root})"
                )
        found = {folder: _indices(root / split / folder) for folder in FOLDERS}
        n = max((max(ix) + 1 for ix in found.values() if ix), default=0)
        if n == 0:
            raise ValueError(f"NYUv2 layout: {root / split} holds no {{index}}.npy files")
        for folder in FOLDERS:
            missing = sorted(set(range(n)) - found[folder])
            if missing:
                more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
                raise ValueError(
                    f"NYUv2 layout: {root / split / folder / f'{missing[0]}.npy'} is missing"
                    f"{more} ({split} has indices up to {n - 1}; every folder needs 0..{n - 1})"
                )
        sizes[split] = n
    first = root / "train" / "image" / "0.npy"
    shape, _ = _header(first)
    if len(shape) == 3 and shape[0] == 3 and shape[-1] != 3:
        raise ValueError(
            f"NYUv2 layout: {first} has shape {shape}, which looks channels first; the layout "
            "stores H x W x 3 (channels last, as MTAN's preprocessed copy)"
        )
    if len(shape) != 3 or shape[2] != 3:
        raise ValueError(f"NYUv2 layout: {first} has shape {shape}, expected (H, W, 3)")
    height, width = shape[0], shape[1]
    if height % DIVISOR or width % DIVISOR or height == 0 or width == 0:
        raise ValueError(
            f"NYUv2 layout: images are {height} x {width}; H and W must be positive multiples "
            f"of {DIVISOR} (the encoder pools five times); the usual copy is 288 x 384"
        )
    for split in SPLITS:
        for folder in FOLDERS:
            expected = _expected_shape(folder, height, width)
            for i in range(sizes[split]):
                path = root / split / folder / f"{i}.npy"
                got, dtype = _header(path)
                if got != expected:
                    raise ValueError(
                        f"NYUv2 layout: {path} has shape {got}, expected {expected} "
                        f"({folder}, from {first}: H x W = {height} x {width})"
                    )
                ok = dtype.kind in "iuf" if folder == "label" else dtype.kind == "f"
                if not ok:
                    kind = "an integer or float" if folder == "label" else "a float"
                    raise ValueError(f"NYUv2 layout: {path} has dtype {dtype}, expected {kind}")
    return Layout(root, sizes, height, width)


class NYUv2(Dataset):
    """One split of a checked layout: ``(image, label, depth, normal)`` channels first.

    ``limit`` keeps the first ``limit`` samples (indices 0 .. limit-1). A label that is not
    an integer in {-1, 0, .., 12} raises ValueError naming the file when it is loaded.
    """

    def __init__(self, layout: Layout, split: str, limit: int | None = None) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.folder = layout.root / split
        n = layout.sizes[split]
        self.size = n if limit is None else min(n, limit)

    def __len__(self) -> int:
        return self.size

    def _load(self, folder: str, i: int) -> np.ndarray:
        return np.load(self.folder / folder / f"{i}.npy", allow_pickle=False)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        if not 0 <= i < self.size:
            raise IndexError(f"sample {i} of {self.size}")
        image = torch.from_numpy(np.ascontiguousarray(
            np.moveaxis(self._load("image", i), -1, 0), dtype=np.float32))
        raw = self._load("label", i)
        label = np.asarray(raw)
        if label.dtype.kind == "f":
            bad = ~np.isfinite(label) | (label != np.round(label))
            if bad.any():
                value = label[bad][0]
                raise ValueError(
                    f"NYUv2: {self.folder / 'label' / f'{i}.npy'} holds {value}, not an integer")
        lo, hi = (label.min(), label.max()) if label.size else (0, 0)
        if lo < IGNORE or hi >= NUM_CLASSES:
            value = lo if lo < IGNORE else hi
            raise ValueError(
                f"NYUv2: {self.folder / 'label' / f'{i}.npy'} holds class {value}; labels must "
                f"be 0..{NUM_CLASSES - 1} or {IGNORE} (ignore)"
            )
        label_t = torch.from_numpy(label.astype(np.int64))
        depth = torch.from_numpy(np.ascontiguousarray(
            np.moveaxis(self._load("depth", i), -1, 0), dtype=np.float32))
        normal = torch.from_numpy(np.ascontiguousarray(
            np.moveaxis(self._load("normal", i), -1, 0), dtype=np.float32))
        return image, label_t, depth, normal


def write_fake(root: str | Path, train: int = 4, val: int = 2, height: int = 32,
               width: int = 64, seed: int = 0) -> Path:
    """Write a random copy in the exact layout (for tests and smoke runs; not NYUv2).

    Labels are uniform over -1..12, depth uniform on (0.5, 10) with about 10% zeros
    (invalid), normals random unit vectors with about 10% all-zero (invalid) pixels.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, n in (("train", train), ("val", val)):
        for folder in FOLDERS:
            (root / split / folder).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            image = rng.random((height, width, 3), dtype=np.float32)
            label = rng.integers(IGNORE, NUM_CLASSES, (height, width)).astype(np.float32)
            depth = rng.uniform(0.5, 10.0, (height, width, 1)).astype(np.float32)
            depth[rng.random((height, width)) < 0.1] = 0.0
            normal = rng.normal(size=(height, width, 3)).astype(np.float32)
            normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
            normal[rng.random((height, width)) < 0.1] = 0.0
            for folder, array in zip(FOLDERS, (image, label, depth, normal), strict=True):
                np.save(root / split / folder / f"{i}.npy", array)
    return root

