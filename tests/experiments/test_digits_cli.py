"""`lossbalance digits` end to end at its smallest: files, their content, determinism, bad flags."""

from __future__ import annotations

import csv
import json
import math

import pytest

from lossbalance.cli import main

TINY = ["--epochs", "2", "--train-pairs", "128", "--batch-size", "64", "--val-pairs", "40",
        "--test-pairs", "40", "--seeds", "2", "--alphas", "3", "--grid-levels", "2",
        "--grid-range", "-1,1", "--grid-max-points", "4", "--log-every", "1", "--workers", "1",
        "--quiet"]
METHODS = {"single", "equal", "gradnorm", "gradnorm-log", "uncertainty", "dtp", "static",
           "grid"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "digits"
    assert main(["digits", "--out", str(out), *TINY]) == 0
    return out


def read_csv(path):
    with path.open() as fh:
        return list(csv.DictReader(fh))


def test_outputs_present_and_well_formed(tiny_run):
    names = {p.name for p in tiny_run.iterdir()}
    assert {"metrics.csv", "summary.json", "summary.md", "weights.png", "grid.png",
            "delta_m_by_method.png", "delta_m_vs_alpha.png", "test_metric_by_task.png"} <= names
    for png in (p for p in tiny_run.iterdir() if p.suffix == ".png"):
        assert png.read_bytes()[:4] == b"\x89PNG", png.name

    rows = read_csv(tiny_run / "metrics.csv")
    assert {r["method"] for r in rows} == METHODS
    evals = [r for r in rows if r["method"] == "equal" and r["seed"] == "0"]
    # 2 epochs of 2 steps, a row every step; validation after the first step, every epoch
    # (2 steps) after it, and after the last step
    assert [int(r["step"]) for r in evals] == [0, 1, 2, 3]
    assert [r["step"] for r in evals if r["val_rmse_2"] != ""] == ["0", "2", "3"]
    assert not any(k.startswith("test_") for k in rows[0])  # the test split is not logged

    summary = json.loads((tiny_run / "summary.json").read_text())
    assert summary["config"]["steps"] == 4 and summary["config"]["seeds"] == 2
    assert set(summary["methods"]) == METHODS - {"grid"}
    for name, m in summary["methods"].items():
        assert m["delta_m"]["n"] == 2 and math.isfinite(m["delta_m"]["mean"]), name
        for acc in m["test_accuracy"][:2]:
            assert 0 <= acc["mean"] <= 1
        for err in m["test_rmse"][2:]:
            assert err["mean"] > 0
    assert abs(summary["methods"]["single"]["delta_m"]["mean"]) < 1e-9
    base = summary["baseline"]
    assert set(base) == {"accuracy_0", "accuracy_1", "rmse_2", "rmse_3"}
    # delta_m of each run recomputed by hand from its test metrics and the baseline
    for rec in summary["runs"]:
        if rec["method"] == "single":
            continue
        t = rec["test"]
        by_hand = 100 / 4 * ((t["accuracy_0"] - base["accuracy_0"]) / base["accuracy_0"]
                             + (t["accuracy_1"] - base["accuracy_1"]) / base["accuracy_1"]
                             - (t["rmse_2"] - base["rmse_2"]) / base["rmse_2"]
                             - (t["rmse_3"] - base["rmse_3"]) / base["rmse_3"])
        assert rec["delta_m"] == pytest.approx(by_hand), rec["method"]
        assert rec["selected_step"] in (0, 2, 3)  # an evaluation, chosen on validation
    gn = summary["methods"]["gradnorm"]["final_weights"]
    st = summary["methods"]["static"]["final_weights"]
    assert [w["mean"] for w in st] == pytest.approx([w["mean"] for w in gn], abs=1e-5)
    assert set(summary["alpha_sweep"]) == {"1.5", "3.0"}
    # equal weights (not on the levels -1, 1) and 3 of the lattice's 2^3 points
    points = summary["grid"]["points"]
    assert len(points) == 4 and [1.0] * 4 in [p["weights"] for p in points]
    assert summary["grid"]["lattice"]["subsampled"]
    md = (tiny_run / "summary.md").read_text()
    for name in METHODS - {"grid"}:
        assert f"| {name} |" in md
    assert "Best point" in md and "validation" in md
    assert "| left accuracy (test) | right accuracy (test) | sum RMSE (test) |" in md
    assert "| single | 0.0 ± " in md  # against its own mean over the seeds


def test_same_flags_same_metrics(tmp_path):
    flags = ["--methods", "gradnorm,dtp", "--seeds", "1", "--alphas", "", "--epochs", "1",
             "--train-pairs", "192", "--batch-size", "64", "--val-pairs", "40",
             "--test-pairs", "40", "--workers", "1", "--quiet"]
    texts = []
    for name in ("a", "b"):
        assert main(["digits", "--out", str(tmp_path / name), *flags]) == 0
        texts.append((tmp_path / name / "metrics.csv").read_text())
    assert texts[0] == texts[1]
    rows = list(csv.DictReader(texts[0].splitlines()))
    assert {r["method"] for r in rows} == {"single", "gradnorm", "dtp"}  # single added


@pytest.mark.parametrize("flags,message", [
    (["--epochs", "0"], "--epochs must be an integer >= 1, got 0"),
    (["--train-pairs", "50", "--batch-size", "64"], "--batch-size 64 is larger than"),
    (["--lr", "0"], "--lr must be a finite number > 0, got 0"),
    (["--methods", "equal,magic"], "unknown method 'magic'"),
    (["--seeds", "0"], "--seeds must be an integer >= 1, got 0"),
    (["--alphas", "1,-2"], "alpha must be a finite number >= 0, got -2"),
    (["--grid-levels", "1"], "--grid-levels must be an integer >= 2, got 1"),
    (["--workers", "0"], "--workers must be an integer >= 1, got 0"),
])
def test_bad_flags_refused_with_nothing_written(tmp_path, capsys, flags, message):
    out = tmp_path / "never"
    assert main(["digits", "--out", str(out), "--quiet", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []
