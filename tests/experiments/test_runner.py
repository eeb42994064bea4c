"""The study runner on a tiny study that uses what the toy does not: a classification task,
single-task baselines and delta_m, model selection on a validation split."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lossbalance.experiments import report, runner
from lossbalance.experiments.study import (
    Batch,
    GridDefaults,
    Metric,
    Study,
    Summary,
    delta_m,
)


class TinyNet(nn.Module):
    def __init__(self, tasks: Sequence[int]) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
        self.heads = nn.ModuleList(nn.Linear(8, 1 if t == 0 else 2) for t in tasks)

    @property
    def shared(self) -> nn.Parameter:
        return self.trunk[0].weight


class TinyStudy(Study):
    """Task 0: regression of a linear target (RMSE); task 1: a 2-class problem (accuracy)."""

    name = "tiny"
    title = "Tiny study"
    summary = Summary("delta_m", "delta_m (%)", "delta_m %", True, "delta_m", needs_single=True)
    grid = GridDefaults((-1.0, 1.0), 3, 10)
    default_alpha = 1.5
    default_alphas = ()
    task_names = ("reg", "cls")
    task_kinds = ("regression", "classification")
    metrics = (Metric("rmse", 0, False, "RMSE"), Metric("accuracy", 1, True, "accuracy"))
    steps, log_every, eval_every = 12, 2, 4
    eval_splits = ("val",)
    selection_split = "val"

    def config(self) -> dict:
        return {"steps": self.steps}

    def make_data(self) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(96, 4, generator=g)
        reg = (x @ torch.tensor([1.0, -2.0, 0.5, 0.0]))[:, None] * 3
        cls = (x[:, 0] * x[:, 1] > 0).long()
        return {"train": (x[:64], reg[:64], cls[:64]), "val": (x[64:80], reg[64:80], cls[64:80]),
                "test": (x[80:], reg[80:], cls[80:])}

    def build_model(self, tasks: Sequence[int]) -> TinyNet:
        return TinyNet(tasks)

    def batches(self, data: dict, seed: int) -> Iterator[Batch]:
        g = torch.Generator().manual_seed(seed)
        x, reg, cls = data["train"]
        for _ in range(self.steps):
            idx = torch.randint(0, len(x), (16,), generator=g)
            yield x[idx], [reg[idx], cls[idx]]

    def task_loss(self, task: int, prediction: Tensor, batch: Batch) -> Tensor:
        target = batch[1][task]
        return F.mse_loss(prediction, target) if task == 0 else F.cross_entropy(prediction,
                                                                                 target)

    def evaluate(self, model: nn.Module, data: dict, split: str,
                 tasks: Sequence[int]) -> dict[str, float]:
        x, reg, cls = data[split]
        h = model.trunk(x)
        out = {}
        for head, t in zip(model.heads, tasks, strict=True):
            if t == 0:
                out["rmse_0"] = float(F.mse_loss(head(h), reg).sqrt())
            else:
                out["accuracy_1"] = float((head(h).argmax(1) == cls).float().mean())
        return out

    def summary_value(self, metrics: Mapping[str, float],
                      baseline: Mapping[str, float] | None) -> float:
        assert baseline is not None
        return delta_m(metrics, baseline, self.metrics)

    def selection_score(self, metrics: Mapping[str, float], tasks: Sequence[int]) -> float:
        return metrics.get("accuracy_1", 0.0) - metrics.get("rmse_0", 0.0) / 10


def test_delta_m_on_hand_made_numbers():
    specs = [Metric("acc", 0, True), Metric("rmse", 1, False), Metric("rel", 1, False)]
    base = {"acc_0": 0.80, "rmse_1": 2.0, "rel_1": 0.5}
    mine = {"acc_0": 0.84, "rmse_1": 1.5, "rel_1": 0.6}
    # task 0: +5%; task 1: mean(+25%, -20%) = +2.5%; mean over tasks: 3.75%
    assert delta_m(mine, base, specs) == pytest.approx(3.75)
    assert delta_m(base, base, specs) == 0
    with pytest.raises(ValueError, match="baseline of rmse_1 is 0"):
        delta_m(mine, {**base, "rmse_1": 0.0}, specs)


@pytest.fixture(scope="module")
def tiny():
    study = TinyStudy()
    options = runner.Options(methods=("equal", "gradnorm", "uncertainty", "dtp", "static",
                                      "grid"), seeds=1, alphas=(0.5,), workers=1
                             ).resolved(study)
    rows, records = runner.run_study(study, options)
    return study, options, rows, records


def test_plan_and_records(tiny):
    _, _, _, records = tiny
    methods = [r["method"] for r in records]
    # single is added (delta_m needs it), one run per task; static last
    assert methods == ["single", "single", "equal", "gradnorm", "uncertainty", "dtp",
                       *["grid"] * 3, "gradnorm", "static"]
    assert [r["variant"] for r in records[:2]] == [0, 1]
    assert records[0]["tasks"] == [0] and set(records[0]["test"]) == {"rmse_0"}
    gn = next(r for r in records if r["method"] == "gradnorm" and r["alpha"] == 1.5)
    static = records[-1]
    assert static["weights"] == gn["final_weights"]
    assert static["final_weights"] == pytest.approx(gn["final_weights"], rel=1e-6)
    grid_weights = [tuple(r["weights"]) for r in records if r["method"] == "grid"]
    assert len(set(grid_weights)) == 3
    for r in records:
        assert r["selected_step"] in (0, 4, 8, 11)


def test_selection_keeps_the_best_validation_model(tiny):
    study, _, rows, records = tiny
    for rec in records:
        mine = [r for r in rows if r["method"] == rec["method"] and r["alpha"] == (
            "" if rec["alpha"] is None else rec["alpha"]) and r.get("variant") == rec["variant"]]
        evals = [r for r in mine if "val_rmse_0" in r or "val_accuracy_1" in r]
        assert [r["step"] for r in evals] == [0, 4, 8, 11]
        scores = [study.selection_score({k[4:]: v for k, v in r.items()
                                         if k.startswith("val_") and v != ""}, rec["tasks"])
                  for r in evals]
        assert rec["selected_step"] == evals[scores.index(max(scores))]["step"]


def test_summary_with_baselines(tiny):
    study, options, _, records = tiny
    config = {**study.config(), **options.config()}
    summary = report.summarize(study, config, records, runner.study_grid(study, options))
    base = summary["baseline"]
    assert set(base) == {"rmse_0", "accuracy_1"}
    # one seed: the single-task networks are the baseline, delta_m = 0
    assert summary["methods"]["single"]["delta_m"]["mean"] == 0
    assert "single" in summary["methods"] and summary["methods"]["single"]["final_weights"] \
        is None
    eq = next(r for r in summary["runs"] if r["method"] == "equal")
    assert eq["delta_m"] == pytest.approx(delta_m(eq["test"], base, study.metrics))
    assert eq["test_rmse"] == [eq["test"]["rmse_0"], None]
    assert summary["methods"]["equal"]["test_accuracy"][0] is None
    g = summary["grid"]
    assert len(g["points"]) == 3 and set(g["methods"]) >= {"gradnorm", "static", "equal"}
    best = max(p["metric"]["mean"] for p in g["points"])  # higher is better
    assert g["best"]["metric"]["mean"] == best


def test_uncertainty_uses_the_task_kinds():
    study = TinyStudy()
    bal = runner.make_balancer(study, runner.Run("uncertainty", 0), runner.Options())
    assert bal.task_types == ("regression", "classification")


@pytest.mark.parametrize("kwargs,message", [
    ({"methods": ()}, "--methods must name at least one method"),
    ({"methods": ("equal", "magic")}, "unknown method 'magic'"),
    ({"methods": ("equal", "equal")}, "names a method twice"),
    ({"seeds": 0}, "--seeds must be an integer >= 1"),
    ({"alpha": -1.0}, "alpha must be a finite number >= 0"),
    ({"alphas": (0.0, math.nan)}, "alpha must be a finite number >= 0"),
    ({"weight_lr": 0.0}, "--weight-lr must be > 0"),
    ({"dtp_gamma": -1.0}, "--dtp-gamma must be >= 0"),
    ({"workers": 0}, "--workers must be an integer >= 1"),
    ({"device": "warp"}, "is not a torch device"),
    ({"methods": ("grid",), "grid_levels": 1}, "--grid-levels must be an integer >= 2"),
])
def test_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        runner.Options(**kwargs).resolved(TinyStudy())


def test_batches_must_match_steps():
    class Short(TinyStudy):
        def batches(self, data, seed):
            return list(super().batches(data, seed))[:-1]

    study = Short()
    with pytest.raises(ValueError, match="gave 11 batches, expected 12"):
        runner.train_run(study, runner.Run("equal", 0), study.make_data(), runner.Options())
