"""The `lossbalance toy` command, driven in-process with tiny settings (the runner's
end-to-end tests: grid, determinism across worker processes, bad flags)."""

from __future__ import annotations

import csv
import json
import shutil

import pytest

from lossbalance.cli import main

METHODS = "equal,gradnorm,gradnorm-log,uncertainty,static,dtp,grid"
TINY = ["--steps", "12", "--seeds", "2", "--alphas", "0,1", "--log-every", "3",
        "--eval-every", "6", "--quiet", "--methods", METHODS, "--grid-levels", "3",
        "--grid-range=-1,5"]


def read_csv(path):
    with path.open() as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "toy"
    assert main(["toy", "--out", str(out), *TINY, "--workers", "1"]) == 0
    return out


def test_outputs_and_columns(tiny_run, capsys):
    names = {p.name for p in tiny_run.iterdir()}
    assert names == {"metrics.csv", "summary.json", "summary.md", "weights.png",
                     "loss_ratios.png", "test_loss_by_method.png", "test_loss_vs_alpha.png",
                     "grid.png", "test_metric_by_task.png"}
    rows = read_csv(tiny_run / "metrics.csv")
    expected = {"method", "alpha", "seed", "variant", "step"} | {
        f"{c}_{i}" for c in ("loss", "weight", "loss_ratio", "grad_norm", "test_loss")
        for i in range(2)}
    assert set(rows[0]) == expected
    runs = {(r["method"], r["alpha"], r["seed"], r["variant"]) for r in rows}
    # the methods, GradNorm at alphas 0 and 1 (0.12 is the main run) and 4 grid points
    # (levels -1, 2, 5 and equal weights), 2 seeds
    listed = METHODS.split(",")
    assert len(runs) == (len(listed) - 1 + 2 + 4) * 2
    for r in rows:
        assert float(r["loss_0"]) > 0 and float(r["weight_0"]) > 0
        assert r["grad_norm_0"] != ""
    steps = sorted({int(r["step"]) for r in rows if r["method"] == "equal" and r["seed"] == "0"})
    assert steps == [0, 3, 6, 9, 11]
    evals = [r for r in rows if r["test_loss_0"] != ""]
    assert {int(r["step"]) for r in evals} == {0, 6, 11}
    summary = json.loads((tiny_run / "summary.json").read_text())
    assert set(summary["methods"]) == set(listed) - {"grid"}
    assert set(summary["alpha_sweep"]) == {"0.0", "0.12", "1.0"}
    gn = summary["methods"]["gradnorm"]
    assert gn["normalized_test_loss"]["n"] == 2
    assert abs(sum(w["mean"] for w in gn["final_weights"]) - 2) < 1e-4
    static = summary["methods"]["static"]["final_weights"]
    for a, b in zip(static, gn["final_weights"], strict=True):
        assert abs(a["mean"] - b["mean"]) < 1e-5  # static holds GradNorm's final weights
    for run in summary["runs"]:
        expected_total = run["test_loss"][0] + run["test_loss"][1] / 100 ** 2
        assert abs(run["normalized_test_loss"] - expected_total) < 1e-9 * expected_total
    grid = summary["grid"]
    assert [p["coords"] for p in grid["points"]] == [[-1.0], [0.0], [2.0], [5.0]]
    for p in grid["points"]:
        assert abs(sum(p["weights"]) - 2) < 1e-12 and p["metric"]["n"] == 2
        values = [r["normalized_test_loss"] for r in summary["runs"]
                  if r["method"] == "grid" and r["variant"] == p["position"]]
        assert abs(p["metric"]["mean"] - sum(values) / 2) < 1e-12
        assert p["test"]["test_loss"][1]["n"] == 2
    best = min(grid["points"], key=lambda p: p["metric"]["mean"])
    assert grid["best"]["position"] == best["position"]
    assert {"gradnorm", "static", "equal"} <= set(grid["methods"])
    md = (tiny_run / "summary.md").read_text()
    assert "| gradnorm |" in md and "sigma_i^2" in md and "**Best point**" in md
    for png in ("weights.png", "loss_ratios.png", "grid.png", "test_metric_by_task.png"):
        assert (tiny_run / png).read_bytes()[:4] == b"\x89PNG"


def test_deterministic_with_worker_processes(tiny_run, tmp_path):
    """Same flags, same metrics.csv, whether the runs train here or in two processes."""
    again = tmp_path / "again"
    assert main(["toy", "--out", str(again), *TINY, "--workers", "2"]) == 0
    assert (again / "metrics.csv").read_text() == (tiny_run / "metrics.csv").read_text()


def test_more_tasks_and_method_subset(tmp_path):
    out = tmp_path / "t4"
    assert main(["toy", "--out", str(out), "--tasks", "4", "--methods", "equal,static",
                 "--alphas", "", "--steps", "5", "--seeds", "1", "--quiet",
                 "--workers", "1"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    sig = summary["config"]["sigmas"]
    assert len(sig) == 4 and sig[0] == 1 and abs(sig[-1] - 100) < 1e-9
    assert set(summary["methods"]) == {"equal", "static"}
    assert not (out / "test_loss_vs_alpha.png").exists() or summary["alpha_sweep"]


@pytest.mark.parametrize("flags,message", [
    (["--tasks", "1"], "--tasks must be an integer >= 2"),
    (["--steps", "0"], "--steps must be an integer >= 1"),
    (["--methods", "equal,magic"], "unknown method 'magic'"),
    (["--methods", "equal,,gradnorm"], "has an empty entry"),
    (["--alphas", "0,-1"], "alpha must be a finite number >= 0"),
    (["--alphas", "0,x"], "is not a comma-separated list"),
    (["--alpha", "-0.5"], "alpha must be a finite number >= 0"),
    (["--seeds", "0"], "--seeds must be an integer >= 1"),
    (["--steps", "ten"], "'ten' is not a valid integer"),
    (["--bogus"], "No such option"),
    (["--methods", "equal,grid", "--grid-levels", "1"], "--grid-levels must be an integer >= 2"),
    (["--methods", "grid", "--grid-range", "3,1"], "--grid-range must be two finite numbers"),
    (["--methods", "grid", "--grid-range", "1"], "--grid-range must be two finite numbers"),
    (["--methods", "grid", "--grid-levels", "13", "--grid-max-points", "10"],
     "never subsampled"),
    (["--methods", "grid", "--tasks", "3", "--grid-max-points", "1"],
     "--grid-max-points must be an integer >= 2"),
    (["--methods", "equal,equal"], "names a method twice"),
    (["--workers", "0"], "--workers must be an integer >= 1"),
    (["--batch-size", "9000"], "larger than the training set"),
])
def test_bad_flags(tmp_path, capsys, flags, message):
    out = tmp_path / "bad"
    code = main(["toy", "--out", str(out), "--quiet", *flags])
    assert code != 0
    err = capsys.readouterr().err.strip()
    assert message in err
    assert len(err.splitlines()) == 1, err
    assert not out.exists()


def test_refuses_non_empty_out_unless_forced(tmp_path, capsys):
    out = tmp_path / "full"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main(["toy", "--out", str(out), "--steps", "2", "--seeds", "1", "--alphas", "",
                 "--methods", "equal", "--quiet", "--workers", "1"]) != 0
    assert "is not empty" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert main(["toy", "--out", str(out), "--steps", "2", "--seeds", "1", "--alphas", "",
                 "--methods", "equal", "--quiet", "--force", "--workers", "1"]) == 0
    assert not (out / "keep.txt").exists() and (out / "metrics.csv").exists()


def test_report_draws_the_same_files_again(tiny_run, tmp_path, capsys):
    """`lossbalance report --out DIR` writes summary.md and the figures again from the files,
    as the run wrote them; summary.json is not changed; without metrics.csv the weight and
    loss-ratio panels stay as they were."""
    out = tmp_path / "copy"
    shutil.copytree(tiny_run, out)
    drawn = {p.name: p.read_bytes() for p in out.iterdir() if p.suffix in (".md", ".png")}
    for name in drawn:
        (out / name).unlink()
    before = (out / "summary.json").read_bytes()
    assert json.loads(before)["description"][0].startswith("T = 2 tasks")
    capsys.readouterr()
    assert main(["report", "--out", str(out)]) == 0
    assert capsys.readouterr().out.startswith("wrote summary.md, weights.png")
    assert {p.name: p.read_bytes() for p in out.iterdir()
            if p.suffix in (".md", ".png")} == drawn
    assert (out / "summary.json").read_bytes() == before
    (out / "metrics.csv").unlink()
    (out / "weights.png").unlink()
    (out / "summary.md").write_text("stale")
    assert main(["report", "--out", str(out)]) == 0
    assert (out / "summary.md").read_bytes() == drawn["summary.md"]
    assert not (out / "weights.png").exists()
    md = drawn["summary.md"].decode()
    assert "| task 0 MSE (test) | task 1 MSE (test) |" in md and "test MSE 0" not in md


def test_report_refuses_a_folder_without_a_study(tmp_path, capsys):
    assert main(["report", "--out", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("has no summary.json") and len(err.splitlines()) == 1
    assert not (tmp_path / "none").exists()
