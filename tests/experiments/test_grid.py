"""The grid of static weights: its points, the distance, and the comparison with a method."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lossbalance.experiments import grid as gridlib


def test_two_tasks_is_a_log_spaced_sweep_through_equal_weights():
    g = gridlib.make_grid(2, (-1.0, 5.0), 13, 64)
    assert len(g.points) == 13 and not g.subsampled and not g.equal_added
    coords = [p.coords[0] for p in g.points]
    assert coords == pytest.approx([-1 + 0.5 * k for k in range(13)])
    for p in g.points:
        assert sum(p.weights) == pytest.approx(2.0)
        assert math.log10(p.weights[0] / p.weights[1]) == pytest.approx(p.coords[0])
    assert (1.0, 1.0) in [tuple(pytest.approx(w) for w in p.weights) for p in g.points]
    # log spacing: consecutive ratios differ by the same factor
    ratios = [p.weights[0] / p.weights[1] for p in g.points]
    steps = [b / a for a, b in itertools.pairwise(ratios)]
    assert steps == pytest.approx([10 ** 0.5] * 12)


def test_equal_weights_added_where_zero_is_not_a_level():
    g = gridlib.make_grid(2, (-1.0, 5.0), 4, 64)  # levels -1, 1, 3, 5
    assert g.equal_added and len(g.points) == 5
    assert [p.coords[0] for p in g.points] == pytest.approx([-1, 0, 1, 3, 5])
    assert g.points[1].weights == (1.0, 1.0)


def test_lattice_for_more_tasks():
    g = gridlib.make_grid(3, (-1.0, 1.0), 3, 100)
    assert len(g.points) == 9 == g.lattice_size
    assert {p.coords for p in g.points} == {(a, b) for a in (-1, 0, 1) for b in (-1, 0, 1)}
    for p in g.points:
        assert sum(p.weights) == pytest.approx(3.0)
        for i, c in enumerate(p.coords, start=1):
            assert math.log10(p.weights[0] / p.weights[i]) == pytest.approx(c)
    assert any(p.weights == pytest.approx((1, 1, 1)) for p in g.points)


def test_subsample_of_a_large_lattice():
    g = gridlib.make_grid(10, (-1.0, 3.0), 5, 24, seed=0)
    assert g.subsampled and g.lattice_size == 5 ** 9 and len(g.points) == 24
    assert len({p.index for p in g.points}) == 24
    assert any(p.coords == (0.0,) * 9 for p in g.points)  # equal weights kept
    assert all(set(p.coords) <= set(g.levels) for p in g.points)
    assert [p.index for p in g.points] == sorted(p.index for p in g.points)
    again = gridlib.make_grid(10, (-1.0, 3.0), 5, 24, seed=0)
    assert again.points == g.points
    other = gridlib.make_grid(10, (-1.0, 3.0), 5, 24, seed=1)
    assert other.points != g.points


@pytest.mark.parametrize("args,message", [
    ((2, (1.0, -1.0), 5, 10), "--grid-range must be two finite numbers LO < HI"),
    ((2, (-1.0, float("inf")), 5, 10), "--grid-range"),
    ((2, (-1.0, 1.0), 1, 10), "--grid-levels must be an integer >= 2"),
    ((3, (-1.0, 1.0), 3, 1), "--grid-max-points must be an integer >= 2"),
    ((2, (-1.0, 5.0), 13, 12), "never subsampled"),
])
def test_bad_settings(args, message):
    with pytest.raises(ValueError, match=message):
        gridlib.make_grid(*args)


@settings(max_examples=40, deadline=None)
@given(T=st.integers(2, 5), lo=st.floats(-4, 0), width=st.floats(0.5, 6),
       levels=st.integers(2, 6), cap=st.integers(2, 80))
def test_points_sum_to_T_and_include_equal(T, lo, width, levels, cap):
    if T == 2 and levels + 1 > cap:
        cap = levels + 1
    g = gridlib.make_grid(T, (lo, lo + width), levels, cap)
    assert len(g.points) == min(cap, g.lattice_size + g.equal_added)
    assert len({p.coords for p in g.points}) == len(g.points)
    for p in g.points:
        assert sum(p.weights) == pytest.approx(T)
        assert min(p.weights) > 0
    assert any(max(abs(w - 1) for w in p.weights) < 1e-12 for p in g.points)


def test_distance_is_scale_free_and_in_decades():
    assert gridlib.distance([1, 1], [2, 2]) == pytest.approx(0)
    # T = 2: |log10 ratio difference| / sqrt(2)
    assert gridlib.distance([1.0, 1.0], [100.0, 1.0]) == pytest.approx(2 / math.sqrt(2))
    assert gridlib.distance([1, 10, 100], [1, 10, 100]) == 0


def test_compare_on_hand_made_numbers():
    g = gridlib.make_grid(2, (-1.0, 3.0), 5, 10)  # log10(w0/w1) = -1, 0, 1, 2, 3
    values = {0: [0.95, 0.97], 1: [0.90, 0.92], 2: [0.86, 0.88], 3: [0.84, 0.86],
              4: [0.87, 0.89]}
    gn_weights = [[1.9, 0.1], [1.9, 0.1]]  # log10 ratio 1.2788
    out = gridlib.compare(g, values, {
        "gradnorm": {"weights": gn_weights, "values": [0.85, 0.85]},
        "static": {"weights": gn_weights, "values": [0.88, 0.90]},
    }, higher_is_better=False)
    best = out["best"]
    assert best["position"] == 3 and best["coords"] == [2.0] and best["at_edge"] == []
    assert best["metric"]["mean"] == pytest.approx(0.85)
    best_std = math.sqrt(2) * 0.01  # std of (0.84, 0.86)
    assert best["metric"]["std"] == pytest.approx(best_std)
    gn = out["methods"]["gradnorm"]
    d = (2 - math.log10(19)) / math.sqrt(2)
    assert gn["distance"]["mean"] == pytest.approx(d)
    assert gn["nearest_point"] == 2  # log10 19 = 1.28 is nearest 1
    assert gn["gap"] == pytest.approx(0.0) and gn["within_best_std"]
    st_ = out["methods"]["static"]
    assert st_["gap"] == pytest.approx(0.04)
    assert st_["gap_over_best_std"] == pytest.approx(0.04 / best_std)
    assert not st_["within_best_std"]
    # higher is better: the best point is the largest mean, and the gap's sign flips
    hi = gridlib.compare(g, values, {"m": {"weights": gn_weights, "values": [0.90, 0.90]}},
                         higher_is_better=True)
    assert hi["best"]["position"] == 0 and hi["best"]["at_edge"] == [1]
    assert hi["methods"]["m"]["gap"] == pytest.approx(0.96 - 0.90)


def test_best_at_the_edge_is_flagged():
    g = gridlib.make_grid(2, (-1.0, 1.0), 3, 10)
    out = gridlib.compare(g, {0: [3.0], 1: [2.0], 2: [1.0]}, {}, higher_is_better=False)
    assert out["best"]["position"] == 2 and out["best"]["at_edge"] == [1]
