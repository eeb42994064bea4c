"""The grid of static weights (the GradNorm paper's baseline) and where other weights fall on it.

Points. The free coordinates are the T - 1 log weight ratios c_i = log10(w_0 / w_i), i = 1..T-1,
each on ``levels`` values evenly spaced over [lo, hi]; a point's weights are
w = T * v / sum_j v_j with v_0 = 1 and v_i = 10^(-c_i), so sum_i w_i = T. For T = 2 this is a
log-spaced sweep of the ratio w_0 / w_1; for T > 2 a lattice of levels^(T-1) points. Equal
weights (every c_i = 0) are always a point: where 0 is not one of the levels the equal point is
added to the lattice's points. Where the count exceeds ``max_points``, T = 2 is refused (a sweep
with holes would hide where the best point is) and T > 2 keeps the equal point and a uniform
sample without replacement of the other lattice points, drawn from ``random.Random(seed)``,
in lattice order.

Distance. Weights are compared up to scale through their centred log10 vectors,
z(w)_i = log10 w_i - mean_j log10 w_j; the distance of w from v is the Euclidean norm
||z(w) - z(v)||_2 (in decades; for T = 2 it is |log10(w_0/w_1) - log10(v_0/v_1)| / sqrt(2)).
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

EDGE_TOLERANCE = 1e-9


@dataclass(frozen=True)
class GridPoint:
    """One point: its lattice index (-1 for an added equal point), coordinates, weights."""

    index: int
    coords: tuple[float, ...]
    weights: tuple[float, ...]


@dataclass(frozen=True)
class Grid:
    """The points a study trains, and how they were chosen."""

    num_tasks: int
    range: tuple[float, float]
    levels: tuple[float, ...]
    lattice_size: int
    points: tuple[GridPoint, ...]
    subsampled: bool = False
    sample_seed: int = 0
    equal_added: bool = False

    def describe(self) -> dict:
        """JSON-ready description (summary.json's grid "lattice")."""
        return {
            "coordinates": "log10(w_0 / w_i), i = 1..T-1",
            "range": list(self.range),
            "levels": list(self.levels),
            "lattice_size": self.lattice_size,
            "points": len(self.points),
            "equal_added": self.equal_added,
            "subsampled": self.subsampled,
            "sample_seed": self.sample_seed,
        }


def level_values(lo: float, hi: float, levels: int) -> tuple[float, ...]:
    """``levels`` values evenly spaced over [lo, hi] (both ends included)."""
    if levels == 1:
        return (float(lo),)
    return tuple(lo + (hi - lo) * k / (levels - 1) for k in range(levels))


def weights_of(coords: Sequence[float]) -> tuple[float, ...]:
    """w with log10(w_0 / w_i) = coords[i-1] and sum_i w_i = T."""
    raw = [1.0] + [10.0 ** (-c) for c in coords]
    total = sum(raw)
    return tuple(len(raw) * v / total for v in raw)


def _coords_of_index(index: int, levels: Sequence[float], dims: int) -> tuple[float, ...]:
    digits = []
    for _ in range(dims):
        index, d = divmod(index, len(levels))
        digits.append(d)
    return tuple(levels[d] for d in reversed(digits))  # first coordinate most significant


def check_settings(num_tasks: int, range_: Sequence[float], levels: int, max_points: int) -> None:
    """Raise ValueError naming the first bad grid setting."""
    if len(range_) != 2 or not all(math.isfinite(v) for v in range_) or range_[0] >= range_[1]:
        raise ValueError(f"--grid-range must be two finite numbers LO < HI, got {tuple(range_)}")
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 2:
        raise ValueError(f"--grid-levels must be an integer >= 2, got {levels}")
    if isinstance(max_points, bool) or not isinstance(max_points, int) or max_points < 2:
        raise ValueError(f"--grid-max-points must be an integer >= 2, got {max_points}")
    if num_tasks == 2 and levels + (0 if _has_zero(range_, levels) else 1) > max_points:
        raise ValueError(
            f"--grid-levels {levels} gives more than --grid-max-points {max_points} points; "
            "for 2 tasks the sweep is never subsampled: raise --grid-max-points or lower "
            "--grid-levels")


def _has_zero(range_: Sequence[float], levels: int) -> bool:
    return any(abs(v) < EDGE_TOLERANCE for v in level_values(range_[0], range_[1], levels))


def make_grid(num_tasks: int, range_: Sequence[float], levels: int, max_points: int,
              seed: int = 0) -> Grid:
    """The grid's points (module docstring); ValueError for bad settings."""
    check_settings(num_tasks, range_, levels, max_points)
    lo, hi = float(range_[0]), float(range_[1])
    values = level_values(lo, hi, levels)
    dims = num_tasks - 1
    size = levels ** dims
    zero = [k for k, v in enumerate(values) if abs(v) < EDGE_TOLERANCE]
    if zero:
        values = tuple(0.0 if k == zero[0] else v for k, v in enumerate(values))
        equal_index = sum(zero[0] * levels ** d for d in range(dims))
    else:
        equal_index = -1
    equal_added = equal_index < 0
    subsampled = size + equal_added > max_points
    if subsampled:
        # every lattice index but the equal point's, drawn lazily (the lattice may be huge)
        skip = equal_index if equal_index >= 0 else size
        drawn = random.Random(seed).sample(range(size - (not equal_added)), max_points - 1)
        indices = sorted([i + (i >= skip) for i in drawn] + ([] if equal_added else [skip]))
    else:
        indices = list(range(size))
    points = [GridPoint(i, c, weights_of(c)) for i in indices
              for c in [_coords_of_index(i, values, dims)]]
    if equal_added:
        points.append(GridPoint(-1, (0.0,) * dims, (1.0,) * num_tasks))
        points.sort(key=lambda p: p.coords)
    return Grid(num_tasks, (lo, hi), values, size, tuple(points), subsampled, seed, equal_added)


def centred_log10(weights: Sequence[float]) -> list[float]:
    """z_i = log10 w_i - mean_j log10 w_j (weights compared up to scale)."""
    logs = [math.log10(w) for w in weights]
    mean = sum(logs) / len(logs)
    return [v - mean for v in logs]


def distance(a: Sequence[float], b: Sequence[float]) -> float:
    """||z(a) - z(b)||_2 in decades (module docstring)."""
    if len(a) != len(b):
        raise ValueError(f"weights of {len(a)} and {len(b)} tasks")
    return math.dist(centred_log10(a), centred_log10(b))


def _mean_std(values: Sequence[float]) -> dict:
    return {"mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}


def at_edge(coords: Sequence[float], range_: Sequence[float]) -> list[int]:
    """The tasks i (1..T-1) whose coordinate log10(w_0/w_i) is at an end of the range."""
    return [i + 1 for i, c in enumerate(coords)
            if abs(c - range_[0]) < EDGE_TOLERANCE or abs(c - range_[1]) < EDGE_TOLERANCE]


def compare(grid: Grid, point_values: Mapping[int, Sequence[float]],
            methods: Mapping[str, Mapping[str, Sequence]], higher_is_better: bool) -> dict:
    """The grid's best point and where each method's weights and metric fall against it.

    ``point_values``: position in ``grid.points`` -> the summary metric over seeds.
    ``methods``: name -> {"weights": per-seed final weights, "values": per-seed metric}.
    Returns ``points`` (weights, coordinates, metric mean/std per point), ``best`` (its
    position, weights, metric, ``at_edge``: tasks whose coordinate is at the range's end) and,
    per method, ``distance`` (of each seed's weights from the best point's, mean/std),
    ``nearest_point`` (the grid point nearest the geometric mean of its weights over seeds),
    ``metric`` (mean/std), ``gap`` (its mean minus the best point's, signed so that positive
    is worse), ``gap_over_best_std`` and ``within_best_std`` (|gap| <= the best point's std
    over seeds).
    """
    if not point_values:
        raise ValueError("the grid has no trained point")
    points = []
    for pos, values in sorted(point_values.items()):
        p = grid.points[pos]
        points.append({"position": pos, "lattice_index": p.index, "coords": list(p.coords),
                       "weights": list(p.weights), "metric": _mean_std(list(values))})
    sign = -1.0 if higher_is_better else 1.0  # sign * value: lower is better
    best = min(points, key=lambda q: (sign * q["metric"]["mean"], q["position"]))
    best_w = best["weights"]
    best_mean, best_std = best["metric"]["mean"], best["metric"]["std"]
    out_methods = {}
    for name, m in methods.items():
        seeds_w = [list(w) for w in m["weights"]]
        values = list(m["values"])
        if not seeds_w or not values:
            continue
        geo = [10 ** statistics.fmean(math.log10(w[i]) for w in seeds_w)
               for i in range(len(seeds_w[0]))]
        nearest = min(points, key=lambda q: (distance(geo, q["weights"]), q["position"]))
        metric = _mean_std(values)
        gap = sign * (metric["mean"] - best_mean)
        out_methods[name] = {
            "mean_weights": geo,
            "distance": _mean_std([distance(w, best_w) for w in seeds_w]),
            "nearest_point": nearest["position"],
            "nearest_metric": nearest["metric"],
            "nearest_distance": distance(geo, nearest["weights"]),
            "metric": metric,
            "gap": gap,
            "gap_over_best_std": gap / best_std if best_std > 0 else None,
            "within_best_std": abs(gap) <= best_std,
        }
    return {
        "lattice": grid.describe(),
        "distance": "Euclidean distance between centred log10-weight vectors "
                    "z_i = log10 w_i - mean_j log10 w_j (decades)",
        "points": points,
        "best": {**best, "at_edge": at_edge(best["coords"], grid.range)},
        "methods": out_methods,
    }
