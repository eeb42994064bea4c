"""The digits study's pieces: the split, the pairs, the model, the metrics, DTP's KPIs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lossbalance.experiments import digits as d


@pytest.fixture(scope="module")
def source():
    return d.load_source()


@pytest.fixture(scope="module")
def data():
    return d.make_data(300, 100, 100, seed=0)


def test_source_split_is_disjoint_stratified_and_60_20_20(source):
    _, labels = source
    parts = d.split_sources(labels, seed=0)
    sets = {k: set(v.tolist()) for k, v in parts.items()}
    assert not sets["train"] & sets["val"]
    assert not sets["train"] & sets["test"]
    assert not sets["val"] & sets["test"]
    assert set().union(*sets.values()) == set(range(1797))
    assert [len(parts[k]) for k in d.SPLITS] == [1077, 360, 360]
    y = labels.numpy()
    for k in d.SPLITS:  # stratified: every split holds ~its share of every digit
        share = np.bincount(y[parts[k]], minlength=10) / np.bincount(y, minlength=10)
        assert np.all(np.abs(share - len(parts[k]) / 1797) < 0.02), k
    again = d.split_sources(labels, seed=0)
    assert all(np.array_equal(parts[k], again[k]) for k in d.SPLITS)
    other = d.split_sources(labels, seed=1)
    assert not np.array_equal(parts["test"], other["test"])


def test_no_source_image_in_two_splits(source, data):
    _, labels = source
    parts = d.split_sources(labels, seed=0)
    used = {k: set(data.split(k).sources.flatten().tolist()) for k in d.SPLITS}
    for k in d.SPLITS:
        assert used[k] <= set(parts[k].tolist()), k
    assert not used["test"] & (used["train"] | used["val"])
    assert not used["val"] & used["train"]


def test_pairs_are_two_different_images_side_by_side(source, data):
    images, labels = source
    for k in d.SPLITS:
        p = data.split(k)
        left, right = p.sources[:, 0], p.sources[:, 1]
        assert bool((left != right).all())
        grid = p.image.reshape(-1, 8, 16)
        assert torch.equal(grid[:, :, :8], images[left])
        assert torch.equal(grid[:, :, 8:], images[right])
        assert torch.equal(p.left, labels[left]) and torch.equal(p.right, labels[right])
        assert torch.equal(p.sum, (labels[left] + labels[right]).float())
        assert p.image.min() >= 0 and p.image.max() <= 16  # raw pixel values stay raw
    assert [len(data.split(k)) for k in d.SPLITS] == [300, 100, 100]
    again = d.make_data(300, 100, 100, seed=0)
    assert torch.equal(again.train.image, data.train.image)
    assert torch.equal(again.test.sources, data.test.sources)


def test_make_pairs_refuses_bad_sizes(source):
    images, labels = source
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="number of pairs must be >= 1, got 0"):
        d.make_pairs(images, labels, np.arange(10), 0, gen)
    with pytest.raises(ValueError, match="at least 2 source images, got 1"):
        d.make_pairs(images, labels, np.arange(1), 5, gen)
    with pytest.raises(ValueError, match="fractions"):
        d.split_sources(labels, 0, (0.5, 0.5, 0.5))


def test_model_heads_and_shared_tensor():
    torch.manual_seed(0)
    net = d.DigitsNet()
    out = net(torch.rand(5, 128) * 16)
    assert [tuple(o.shape) for o in out] == [(5, 10), (5, 10), (5,), (5, 128)]
    assert net.shared is net.trunk[-2].weight and tuple(net.shared.shape) == (128, 256)
    one = d.DigitsNet(["sum"])
    assert [tuple(o.shape) for o in one(torch.zeros(3, 128))] == [(3,)]
    with pytest.raises(ValueError, match="unknown task 'colour'"):
        d.DigitsNet(["colour"])


def test_losses_are_on_raw_targets():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 0])
    expected = -(torch.log_softmax(logits, 1)[0, 0] + torch.log_softmax(logits, 1)[1, 0]) / 2
    assert float(d.task_loss(0, logits, labels)) == pytest.approx(float(expected))
    # sum: predictions 3 and 10 against 5 and 14 -> MSE (4 + 16) / 2 = 10
    assert float(d.task_loss(2, torch.tensor([3.0, 10.0]), torch.tensor([5.0, 14.0]))) == 10.0


def test_metrics_against_hand_computed_values():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5], [0.0, 1.0, 0.0]])
    labels = torch.tensor([1, 0, 1, 2])
    assert d.accuracy(logits, labels) == 0.5
    assert d.task_metric(1, logits, labels) == 0.5
    # errors 1, -2, 2, 0 -> MSE 9/4 -> RMSE 1.5
    pred, target = torch.tensor([4.0, 6.0, 9.0, 0.0]), torch.tensor([3.0, 8.0, 7.0, 0.0])
    assert d.rmse(pred, target) == pytest.approx(1.5)
    assert d.task_metric(2, pred, target) == pytest.approx(1.5)
    # image: RMSE over every pixel of every row
    img_p, img_t = torch.zeros(2, 128), torch.zeros(2, 128)
    img_p[0, :64] = 4.0  # squared error 16 on 64 of 256 numbers -> MSE 4 -> RMSE 2
    assert d.task_metric(3, img_p, img_t) == pytest.approx(2.0)


def test_delta_m_signs_against_hand_computed_values():
    study = d.DigitsStudy(epochs=1, train_pairs=200, val_pairs=50, test_pairs=50)
    base = {"accuracy_0": 0.8, "accuracy_1": 0.5, "rmse_2": 2.0, "rmse_3": 4.0}
    # +10% (acc up), -10% (acc down), +25% (RMSE down is better), -50% (RMSE up)
    model = {"accuracy_0": 0.88, "accuracy_1": 0.45, "rmse_2": 1.5, "rmse_3": 6.0}
    assert study.summary_value(model, base) == pytest.approx((10 - 10 + 25 - 50) / 4)
    assert study.summary_value(base, base) == 0.0
    better = {"accuracy_0": 0.9, "accuracy_1": 0.6, "rmse_2": 1.0, "rmse_3": 2.0}
    assert study.summary_value(better, base) > 0
    with pytest.raises(ValueError, match="single-task baselines"):
        study.summary_value(model, None)


def test_selection_score_ranks_as_log_delta_m_whatever_the_baseline():
    a = {"accuracy_0": 0.9, "accuracy_1": 0.8, "rmse_2": 2.0, "rmse_3": 3.0}
    b = {"accuracy_0": 0.85, "accuracy_1": 0.85, "rmse_2": 1.5, "rmse_3": 3.5}
    tasks = range(4)
    expected = (math.log(0.9 / 0.85) + math.log(0.8 / 0.85) - math.log(2.0 / 1.5)
                - math.log(3.0 / 3.5)) / 4
    diff = d.selection_score(a, tasks) - d.selection_score(b, tasks)
    assert diff == pytest.approx(expected)
    for base in ({"accuracy_0": 0.5, "accuracy_1": 0.7, "rmse_2": 1.0, "rmse_3": 9.0},
                 {"accuracy_0": 0.99, "accuracy_1": 0.1, "rmse_2": 5.0, "rmse_3": 0.5}):
        log_dm = [sum((1 if m.higher_is_better else -1) * math.log(x[m.key] / base[m.key])
                      for m in d.METRICS) / 4 for x in (a, b)]
        assert log_dm[0] - log_dm[1] == pytest.approx(diff)
    # one task: its own metric's direction
    assert d.selection_score({"rmse_2": 1.0}, [2]) > d.selection_score({"rmse_2": 2.0}, [2])
    assert d.selection_score({"accuracy_1": 0.9}, [1]) > d.selection_score(
        {"accuracy_1": 0.8}, [1])


def test_dtp_kpi_map():
    logits = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    assert float(d.kpi(0, logits, torch.tensor([0, 1, 1, 1]))) == 0.75
    target = torch.tensor([0.0, 2.0, 4.0, 6.0])  # variance 5
    assert float(d.kpi(2, target.clone(), target)) == 1.0  # perfect
    assert float(d.kpi(2, torch.full((4,), 3.0), target)) == pytest.approx(0.0)  # the mean
    assert float(d.kpi(2, torch.full((4,), 30.0), target)) == 0.0  # worse: clipped at 0
    # errors of +-1 -> MSE 1 -> 1 - 1/5
    assert float(d.kpi(3, target + torch.tensor([1.0, -1.0, 1.0, -1.0]), target)) == \
        pytest.approx(0.8)
    study = d.DigitsStudy(epochs=1, train_pairs=200, val_pairs=50, test_pairs=50)
    preds = [logits, logits, target.clone(), torch.full((4,), 3.0)]
    batch = (torch.zeros(4, 128), [torch.tensor([0, 1, 1, 1]), torch.tensor([0, 0, 1, 1]),
                                   target, target])
    kpis = study.kpis(torch.ones(4), torch.ones(4), preds, batch)
    assert kpis.tolist() == pytest.approx([0.75, 1.0, 1.0, 0.0])


def test_study_batches_cover_each_epoch_once_and_are_seeded(data):
    study = d.DigitsStudy(epochs=2, batch_size=64, train_pairs=300, val_pairs=100,
                          test_pairs=100)
    assert study.steps == 2 * 4 and study.eval_every == 4
    batches = list(study.batches(data, seed=3))
    assert len(batches) == study.steps
    first_epoch = torch.cat([x for x, _ in batches[:4]])
    assert len({tuple(r.tolist()) for r in first_epoch}) == len(first_epoch)  # no repeats
    x, targets = batches[0]
    assert torch.equal(targets[3], x)  # the image task's target is the raw input
    again = list(study.batches(data, seed=3))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again, strict=True))
    assert not torch.equal(batches[0][0], next(iter(study.batches(data, seed=4)))[0])


@pytest.mark.parametrize("kwargs,message", [
    ({"epochs": 0}, "--epochs must be an integer >= 1, got 0"),
    ({"batch_size": 2.5}, "--batch-size must be an integer >= 1, got 2.5"),
    ({"train_pairs": 100, "batch_size": 128}, "--batch-size 128 is larger than --train-pairs"),
    ({"lr": -1.0}, "--lr must be a finite number > 0, got -1.0"),
    ({"lr": float("nan")}, "--lr must be a finite number > 0"),
    ({"data_seed": -1}, "--data-seed must be an integer >= 0, got -1"),
])
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        d.DigitsStudy(**kwargs)
