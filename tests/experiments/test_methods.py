"""Every method of the runner's registry trains in the toy and the digits study, driven as a
user would drive it (FAMO's update after the step, DWA's epoch ends)."""

from __future__ import annotations

import math

import pytest

from lossbalance.experiments import runner
from lossbalance.experiments.digits import DigitsStudy
from lossbalance.experiments.toy import ToyStudy

STUDIES = {
    # 4 steps an epoch: DWA's weights leave 1 after the second epoch
    "toy": lambda: ToyStudy(tasks=3, steps=14, train_size=40, test_size=20, batch_size=10,
                            log_every=2, eval_every=7),
    "digits": lambda: DigitsStudy(epochs=3, batch_size=32, train_pairs=64, val_pairs=32,
                                  test_pairs=32, hidden=16, width=8, log_every=1),
}
DATA: dict = {}
# aggregation methods whose coefficients c may be negative (IMTL-G's closed form, Aligned-MTL's
# B 1); the others weight the tasks with w_i >= 0
SIGNED = {"imtl-g", "aligned-mtl"}


def study_and_data(name):
    if name not in DATA:
        study = STUDIES[name]()
        DATA[name] = (study, study.make_data())
    return DATA[name]


def test_every_method_is_registered():
    assert set(runner.METHODS) == {"single", *runner.METHOD_SPECS}
    assert {"dwa", "rlw", "gls", "famo", "famo-next", "imtl-l"} <= set(runner.METHODS)


@pytest.mark.parametrize("method", sorted(runner.METHOD_SPECS))
@pytest.mark.parametrize("name", sorted(STUDIES))
def test_method_trains(name, method):
    study, data = study_and_data(name)
    T = study.num_tasks
    run = runner.Run(method, 0, alpha=1.0 if method.startswith("gradnorm") else None,
                     weights=(1.0,) * T if method in ("static", "grid") else None)
    options = runner.Options(methods=(method,), seeds=1).resolved(study)
    rows, record = runner.train_run(study, run, data, options)
    assert len(rows) >= 2 and all(math.isfinite(v) for v in record["test"].values())
    weights = record["final_weights"]
    assert len(weights) == T and all(math.isfinite(w) for w in weights)
    if method not in SIGNED:
        assert all(w >= 0 for w in weights), weights
    last = rows[-1]
    for i in range(T):  # every row logs the step's weights and ||grad_W (w_i L_i)||
        assert math.isfinite(last[f"weight_{i}"]) and last[f"grad_norm_{i}"] >= 0
    if method in ("dwa", "rlw", "gls", "famo", "famo-next", "imtl-l"):
        assert weights != [weights[0]] * T, weights  # the method moved its weights


def test_a_study_without_epochs_refuses_dwa():
    class NoEpochs(ToyStudy):
        steps_per_epoch = None

        def __init__(self):
            super().__init__(steps=4)
            self.steps_per_epoch = None

    with pytest.raises(ValueError, match="'dwa' needs epochs"):
        runner.Options(methods=("equal", "dwa")).resolved(NoEpochs())
