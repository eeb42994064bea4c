"""`lossbalance nyuv2` end to end on a tiny fake copy in the exact layout (CPU, width 4)."""

from __future__ import annotations

import csv
import json
import math
import shutil

import numpy as np
import pytest
import torch

from lossbalance.cli import main
from lossbalance.experiments import nyuv2 as study
from lossbalance.experiments.nyuv2_data import NYUv2, check_layout, write_fake
from lossbalance.experiments.nyuv2_metrics import METRICS

TINY = ["--width", "4", "--workers", "0", "--quiet", "--epochs", "1", "--device", "cpu"]
METRIC_NAMES = [name for name, _, _ in METRICS]


def read_csv(path):
    with path.open() as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_fake(tmp_path_factory.mktemp("nyuv2") / "data", train=4, val=2)


@pytest.fixture(scope="module")
def study_run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "main"
    code = main(["nyuv2", "--data", str(data), "--out", str(out), *TINY,
                 "--methods", "single,equal,gradnorm,static"])
    assert code == 0
    return out


def test_fake_copy_has_the_layout(data):
    layout = check_layout(data)
    assert layout.sizes == {"train": 4, "val": 2} and (layout.height, layout.width) == (32, 64)
    assert np.load(data / "train" / "image" / "0.npy").shape == (32, 64, 3)  # channels last
    image, label, depth, normal = NYUv2(layout, "train")[3]
    assert image.shape == (3, 32, 64) and image.dtype == torch.float32
    assert label.shape == (32, 64) and label.dtype == torch.int64
    assert depth.shape == (1, 32, 64) and normal.shape == (3, 32, 64)
    assert int(label.min()) >= -1 and int(label.max()) <= 12


def test_outputs_are_well_formed(study_run):
    assert {p.name for p in study_run.iterdir()} == {
        "config.json", "metrics.csv", "summary.json", "summary.md", "checkpoints"}
    rows = read_csv(study_run / "metrics.csv")
    assert [r["run"] for r in rows] == [
        "single-segmentation-seed0", "single-depth-seed0", "single-normal-seed0",
        "equal-seed0", "gradnorm-seed0", "static-seed0"]
    for r in rows:
        assert r["epoch"] == "1"
        tasks = [r["task"]] if r["method"] == "single" else ["segmentation", "depth", "normal"]
        for t in tasks:
            assert float(r[f"train_loss_{t}"]) > 0
        filled = [n for n in METRIC_NAMES if r[n] != ""]
        assert all(math.isfinite(float(r[n])) for n in filled)
        assert len(filled) == (9 if r["method"] != "single" else {"segmentation": 2, "depth": 2,
                                                                  "normal": 5}[r["task"]])
    summary = json.loads((study_run / "summary.json").read_text())
    methods = summary["methods"]
    assert list(methods) == ["single", "equal", "gradnorm", "static"]
    assert methods["single"]["delta_m"]["mean"] == pytest.approx(0.0, abs=1e-9)
    gn = [w["mean"] for w in methods["gradnorm"]["final_weights"]]
    assert sum(gn) == pytest.approx(3.0, abs=1e-5) and gn != [1.0, 1.0, 1.0]
    static = [w["mean"] for w in methods["static"]["final_weights"]]
    assert static == pytest.approx(gn, abs=1e-6)  # static holds GradNorm's final weights
    assert all(math.isfinite(methods[m]["delta_m"]["mean"]) for m in methods)
    md = (study_run / "summary.md").read_text()
    assert "| gradnorm |" in md and "delta_m %" in md


def test_report_writes_the_same_summary_md(study_run, tmp_path):
    """`lossbalance report` on a nyuv2 folder: summary.md again from summary.json; single's
    delta_m (against its own mean) prints as 0.00."""
    out = tmp_path / "copy"
    out.mkdir()
    for name in ("summary.json", "summary.md"):
        shutil.copy(study_run / name, out / name)
    (out / "summary.md").write_text("stale")
    assert main(["report", "--out", str(out)]) == 0
    md = (out / "summary.md").read_text()
    assert md == (study_run / "summary.md").read_text()
    single = next(line for line in md.splitlines() if line.startswith("| single |"))
    assert single.split(" | ")[-2] == "0.00"  # delta_m %, one seed: the mean alone
    assert [p.name for p in sorted(out.iterdir())] == ["summary.json", "summary.md"]


def test_baseline_from_an_earlier_study_and_limit(data, study_run, tmp_path):
    out = tmp_path / "b"
    assert main(["nyuv2", "--data", str(data), "--out", str(out), *TINY,
                 "--methods", "uncertainty", "--limit", "2",
                 "--baseline", str(study_run / "summary.json")]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["baseline"] == pytest.approx(json.loads(
        (study_run / "summary.json").read_text())["baseline"])
    uw = summary["methods"]["uncertainty"]
    assert math.isfinite(uw["delta_m"]["mean"])
    # log-variances moved from 0 in training: the multipliers left (1, 1/2, 1/2)
    assert [w["mean"] for w in uw["final_weights"]] != pytest.approx([1.0, 0.5, 0.5], abs=1e-6)
    assert "2 train / 2 val" in (out / "summary.md").read_text()


def _without_time(rows):
    return [{k: v for k, v in r.items() if k != "epoch_time_s"} for r in rows]


def test_resume_equals_an_uninterrupted_run(data, tmp_path):
    flags = ["--data", str(data), "--width", "4", "--workers", "0", "--quiet", "--device", "cpu",
             "--methods", "gradnorm,dtp"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert main(["nyuv2", *flags, "--out", str(whole), "--epochs", "2"]) == 0
    assert main(["nyuv2", *flags, "--out", str(parts), "--epochs", "1"]) == 0
    assert main(["nyuv2", *flags, "--out", str(parts), "--epochs", "2", "--resume"]) == 0
    a, b = read_csv(whole / "metrics.csv"), read_csv(parts / "metrics.csv")
    assert len(a) == 4 and _without_time(a) == _without_time(b)
    for run in ("gradnorm-seed0", "dtp-seed0"):
        sa = torch.load(whole / "checkpoints" / f"{run}.pt", weights_only=True)
        sb = torch.load(parts / "checkpoints" / f"{run}.pt", weights_only=True)
        assert sa["epoch"] == sb["epoch"] == 2
        for key in sa["model"]:
            assert torch.equal(sa["model"][key], sb["model"][key]), (run, key)
        for key in sa["balancer"]:
            if isinstance(sa["balancer"][key], torch.Tensor):
                assert torch.equal(sa["balancer"][key], sb["balancer"][key]), (run, key)
    sa, sb = (json.loads((p / "summary.json").read_text())["methods"] for p in (whole, parts))
    assert sa["gradnorm"]["final_weights"] == sb["gradnorm"]["final_weights"]
    # a resumed, finished study trains nothing more and summarises the same numbers
    assert main(["nyuv2", *flags, "--out", str(parts), "--epochs", "2", "--resume"]) == 0
    assert _without_time(read_csv(parts / "metrics.csv")) == _without_time(a)


def test_gradnorm_log_steps_log_weights(data, tmp_path):
    """--methods gradnorm-log: GradNorm(log_weights=True) at the same alpha, lr and site; its
    checkpoint holds s = log w, the weights stay on the simplex and move differently from
    the paper's update (same seed, same batches)."""
    out = tmp_path / "log"
    assert main(["nyuv2", "--data", str(data), "--out", str(out), *TINY, "--epochs", "2",
                 "--methods", "gradnorm,gradnorm-log"]) == 0
    rows = read_csv(out / "metrics.csv")
    assert [r["run"] for r in rows] == ["gradnorm-seed0"] * 2 + ["gradnorm-log-seed0"] * 2
    methods = json.loads((out / "summary.json").read_text())["methods"]
    assert list(methods) == ["gradnorm", "gradnorm-log"]
    plain = torch.load(out / "checkpoints" / "gradnorm-seed0.pt", weights_only=True)
    state = torch.load(out / "checkpoints" / "gradnorm-log-seed0.pt", weights_only=True)
    assert "task_log_weights" not in plain["balancer"]
    s = state["balancer"]["task_log_weights"]
    w = torch.tensor(state["final_weights"])
    torch.testing.assert_close(w, s.exp(), rtol=1e-6, atol=0)
    assert float(w.sum()) == pytest.approx(3.0, abs=1e-5) and bool((w > 0).all())
    assert not torch.allclose(s, torch.zeros(3))  # the log weights moved from log 1
    assert state["final_weights"] != plain["final_weights"]
    fw = [m["mean"] for m in methods["gradnorm-log"]["final_weights"]]
    assert fw == pytest.approx(state["final_weights"], abs=1e-7)
    assert "| gradnorm-log |" in (out / "summary.md").read_text()


def test_fp16_autocast_with_a_grad_scaler_on_cpu(data, tmp_path):
    """--amp fp16: autocast and a GradScaler handed to GradNorm.backward (bf16 is the same
    code without the scaler)."""
    out = tmp_path / "fp16"
    assert main(["nyuv2", "--data", str(data), "--out", str(out), *TINY, "--amp", "fp16",
                 "--methods", "gradnorm"]) == 0
    row = read_csv(out / "metrics.csv")[0]
    assert all(math.isfinite(float(row[n])) for n in METRIC_NAMES)
    state = torch.load(out / "checkpoints" / "gradnorm-seed0.pt", weights_only=True)
    assert state["scaler"]["scale"] > 0  # the GradScaler's state is in the checkpoint


def test_gradnorm_at_weight_equals_the_general_path():
    """The tap + last conv weight measures what one autograd.grad per task measures."""
    import lossbalance as lb
    from lossbalance.experiments import nyuv2_metrics as nm
    from lossbalance.experiments.nyuv2_model import TASKS, SegNet

    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 64, generator=gen)
    targets = {"segmentation": torch.randint(-1, 13, (2, 32, 64), generator=gen),
               "depth": torch.rand(2, 1, 32, 64, generator=gen) + 0.5,
               "normal": torch.nn.functional.normalize(torch.randn(2, 3, 32, 64,
                                                                   generator=gen), dim=1)}
    norms = []
    for tapped in (True, False):
        torch.manual_seed(0)
        model = SegNet(4)
        bal = lb.GradNorm(3)
        h = model.trunk(x)
        feats = bal.tap(h) if tapped else (h,) * 3
        losses = [nm.LOSSES[t](model.head(t, f), targets[t])
                  for t, f in zip(TASKS, feats, strict=True)]
        bal.backward(losses, shared=model.last_shared)
        norms.append(bal.stats["grad_norm"])
    torch.testing.assert_close(norms[0], norms[1], rtol=1e-4, atol=0)


# ------------------------------------------------------------------ refusals
def _refused(argv, capsys, match, code=2):
    assert main(["nyuv2", *argv]) == code
    err = capsys.readouterr().err
    assert match in err, err
    return err


def test_layout_errors_name_what_is_missing(data, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(data, bad)
    out = tmp_path / "out"
    (bad / "train" / "normal" / "2.npy").unlink()
    _refused(["--data", str(bad), "--out", str(out), *TINY], capsys, "train/normal/2.npy")
    np.save(bad / "train" / "normal" / "2.npy", np.zeros((32, 64, 3), np.float32))
    np.save(bad / "val" / "label" / "1.npy", np.zeros((32, 48), np.float32))
    _refused(["--data", str(bad), "--out", str(out), *TINY], capsys,
             "val/label/1.npy has shape (32, 48), expected (32, 64)")
    np.save(bad / "val" / "label" / "1.npy", np.zeros((32, 64), np.float32))
    shutil.rmtree(bad / "val" / "depth")
    _refused(["--data", str(bad), "--out", str(out), *TINY], capsys, "val/depth is missing")
    assert not out.exists()  # nothing written


def test_layout_errors_on_shapes(tmp_path):
    first = write_fake(tmp_path / "cf", train=1, val=1)
    np.save(first / "train" / "image" / "0.npy", np.zeros((3, 32, 64), np.float32))
    with pytest.raises(ValueError, match="channels first"):
        check_layout(first)
    odd = write_fake(tmp_path / "odd", train=1, val=1, height=40, width=64)
    with pytest.raises(ValueError, match="multiples of 32"):
        check_layout(odd)
    ints = write_fake(tmp_path / "ints", train=1, val=1)
    np.save(ints / "val" / "depth" / "0.npy", np.zeros((32, 64, 1), np.int32))
    with pytest.raises(ValueError, match=r"val/depth/0.npy has dtype int32"):
        check_layout(ints)
    with pytest.raises(ValueError, match="is not a folder"):
        check_layout(tmp_path / "nowhere")


def test_bad_label_value_is_named_when_loaded(data, tmp_path, capsys):
    bad = tmp_path / "lab"
    shutil.copytree(data, bad)
    label = np.zeros((32, 64), np.float32)
    label[3, 5] = 13
    np.save(bad / "train" / "label" / "1.npy", label)
    _refused(["--data", str(bad), "--out", str(tmp_path / "o"), *TINY, "--methods", "equal"],
             capsys, "train/label/1.npy holds class 13", code=1)


@pytest.mark.parametrize(("extra", "match"), [
    (["--methods", "equal,mgda"], "unknown method 'mgda'"),
    (["--static-weights", "1,2"], "--static-weights needs 3 values"),
    (["--methods", "equal", "--static-weights", "1,2,3"], "--methods has no static"),
    (["--epochs", "0"], "--epochs must be an integer >= 1"),
    (["--force", "--resume"], "contradict"),
    (["--resume"], "holds no study"),
    (["--baseline", "nowhere.json"], "--baseline is given and --methods has single"),
    (["--methods", "equal", "--baseline", "nowhere.json"], "--baseline nowhere.json"),
    (["--gradnorm-at", "bias"], "Invalid value for '--gradnorm-at'"),
])
def test_bad_flags_write_nothing(data, tmp_path, capsys, extra, match):
    out = tmp_path / "out"
    _refused(["--data", str(data), "--out", str(out), *TINY, *extra], capsys, match)
    assert not out.exists()


def test_existing_out_needs_force_or_a_matching_resume(data, study_run, capsys):
    before = (study_run / "metrics.csv").read_bytes()
    base = ["--data", str(data), "--out", str(study_run), *TINY,
            "--methods", "single,equal,gradnorm,static"]
    _refused(base, capsys, "is not empty")
    _refused([*base, "--resume", "--width", "8"], capsys,
             "--width is 8 but the study in")
    _refused([*base[:-1], "equal", "--resume"], capsys, "--methods is")
    assert (study_run / "metrics.csv").read_bytes() == before


def test_resume_refuses_fewer_epochs_than_done(data, tmp_path, capsys):
    out = tmp_path / "o"
    flags = ["nyuv2", "--data", str(data), "--out", str(out), "--width", "4", "--workers", "0",
             "--quiet", "--device", "cpu", "--methods", "equal"]
    assert main([*flags, "--epochs", "2"]) == 0
    _refused([*flags[1:], "--epochs", "1", "--resume"], capsys, "at epoch 2, beyond --epochs 1")


def test_config_checks_in_python():
    with pytest.raises(ValueError, match=r"--static-weights: the weight of depth is -1\.0"):
        study.NYUv2Config(data=".", static_weights=(1.0, -1.0, 1.0))
    with pytest.raises(ValueError, match="names a method twice"):
        study.NYUv2Config(data=".", methods=("equal", "equal"))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            study.NYUv2Config(data=".", device="cuda")
    assert "gradnorm-log" not in study.NYUv2Config(data=".").methods  # asked for by name
    cfg = study.NYUv2Config(data=".", methods=("static",), seeds=2)
    assert [r.name for r in study.plan_runs(cfg)] == [
        "gradnorm-seed0", "static-seed0", "gradnorm-seed1", "static-seed1"]
