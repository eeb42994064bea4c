"""summary.md's formatting and re-rendering a study folder from its summary.json."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lossbalance.experiments import report

DOCS = Path(__file__).resolve().parents[2] / "docs"


@pytest.mark.parametrize("ms,decimals,text", [
    # the single baseline against itself: float rounding of a mean that is 0
    ({"mean": -1.6514567491299204e-15, "std": 1.8159151752300637, "n": 3}, 1, "0.0 ± 1.8"),
    ({"mean": -1.6514567491299204e-15, "std": 1.8159151752300637, "n": 3}, None, "0 ± 1.8"),
    ({"mean": -16.59, "std": 0.73, "n": 3}, 1, "-16.6 ± 0.7"),
    ({"mean": -0.04, "std": 1.0, "n": 3}, 1, "0.0 ± 1.0"),  # no "-0.0"
    ({"mean": 2.0, "std": 0.004, "n": 3}, 1, "2.0 ± 0.004"),  # a std > 0 never prints as 0
    ({"mean": 0.003, "std": 1.8, "n": 3}, None, "0.003 ± 1.8"),  # small is not zero
    ({"mean": 0.88030, "std": 0.00083, "n": 3}, None, "0.8803 ± 0.00083"),
    ({"mean": 4417.2, "std": 1.1, "n": 3}, None, "4417 ± 1.1"),
    (None, None, "–"),
])
def test_mean_std_text(ms, decimals, text):
    assert report.mean_std_text(ms, decimals=decimals) == text


def test_metric_heading_names_the_task_once():
    info = {"task_names": ["left", "sum"]}
    assert report.metric_heading(info, {"task": 0, "name": "accuracy",
                                        "label": "left accuracy"}) == "left accuracy (test)"
    assert report.metric_heading(info, {"task": 1, "name": "rmse", "label": "RMSE"}) == \
        "sum RMSE (test)"
    assert report.metric_heading({"task_names": ["task 0"]},
                                 {"task": 0, "name": "loss", "label": ""}) == "task 0 loss (test)"


@pytest.mark.parametrize("folder", ["toy", "toy10", "digits"])
def test_committed_summaries_are_their_summary_json_rendered(folder):
    """docs/*/summary.md is what `lossbalance report` writes from docs/*/summary.json."""
    summary = json.loads((DOCS / folder / "summary.json").read_text())
    study = report.rebuild_study(summary)
    assert study is not None and study.name == summary["study"]["name"]
    summary["study"] = {**summary["study"], **report.study_info(study)}
    text = report.render_markdown(summary, study.describe(summary["config"]))
    assert (DOCS / folder / "summary.md").read_text() == text


def test_digits_single_row_and_headings():
    md = (DOCS / "digits" / "summary.md").read_text()
    assert "| single | 0.0 ± 1.8 |" in md and "e-15" not in md
    assert "| left accuracy (test) | right accuracy (test) | sum RMSE (test) |" in md
    assert "| equal | -16.6 ± 0.7 |" in md
    assert "scored against that mean" in md  # the note on what single's row is


def _copy(folder: str, tmp_path: Path) -> Path:
    out = tmp_path / folder
    out.mkdir()
    shutil.copy(DOCS / folder / "summary.json", out / "summary.json")
    return out


def test_render_without_metrics_csv_keeps_the_panels(tmp_path):
    out = _copy("toy", tmp_path)
    (out / "weights.png").write_bytes(b"old")
    before = (out / "summary.json").read_bytes()
    written = report.render(out)
    names = [p.name for p in written]
    assert names[0] == "summary.md" and "grid.png" in names and "weights.png" not in names
    assert (out / "weights.png").read_bytes() == b"old"  # needs metrics.csv: left as it was
    assert (out / "summary.json").read_bytes() == before  # read, never written
    assert (out / "summary.md").read_text() == (DOCS / "toy" / "summary.md").read_text()


def test_render_another_study_uses_its_stored_description(tmp_path):
    out = _copy("toy", tmp_path)
    summary = json.loads((out / "summary.json").read_text())
    summary["study"]["name"] = "mine"  # not in report.STUDIES: nothing to rebuild
    summary["description"] = ["My own words."]
    (out / "summary.json").write_text(json.dumps(summary))
    report.render(out)
    md = (out / "summary.md").read_text()
    assert md.startswith("# GradNorm toy study\n\nMy own words.\n") and "**Best point**" in md


def test_rebuild_refuses_a_config_that_gives_another_study():
    summary = json.loads((DOCS / "digits" / "summary.json").read_text())
    summary["config"]["steps"] = 999  # derived (epochs x steps per epoch), not a setting
    with pytest.raises(ValueError, match="does not rebuild the digits study: steps differ"):
        report.rebuild_study(summary)
    summary["config"]["epochs"] = 0
    with pytest.raises(ValueError, match="--epochs must be an integer >= 1"):
        report.rebuild_study(summary)


def test_render_refuses_what_is_not_a_summary(tmp_path):
    with pytest.raises(ValueError, match=r"has no summary\.json"):
        report.render(tmp_path)
    (tmp_path / "summary.json").write_text("{not json")
    with pytest.raises(ValueError, match="not readable JSON"):
        report.render(tmp_path)
    (tmp_path / "summary.json").write_text(json.dumps({"runs": []}))
    with pytest.raises(ValueError, match="no study, config or methods"):
        report.render(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]
