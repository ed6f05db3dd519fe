"""Metric classes: several updates equal one functional call on the concatenation; ReliabilityMetrics keys."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from fairlearn.metrics import MetricFrame
from fairlearn.metrics import demographic_parity_difference as fl_demographic_parity_difference
from fairlearn.metrics import equal_opportunity_difference as fl_equal_opportunity_difference
from sklearn.metrics import accuracy_score, log_loss
from torchmetrics.functional.classification import multiclass_calibration_error

from icp_lightning.metrics import (
    CounterfactualFlipRate,
    DemographicParityDifference,
    EqualOpportunityDifference,
    ExpectedCalibrationError,
    GroupAccuracy,
    ReliabilityMetrics,
    WorstGroupAccuracy,
    counterfactual_flip_rate,
    demographic_parity_difference,
    equal_opportunity_difference,
    expected_calibration_error,
    group_accuracies,
    worst_group_accuracy,
)

torch.set_num_threads(1)
NUM_GROUPS = 4


def _data(seed: int, n: int = 240):
    g = torch.Generator().manual_seed(seed)
    groups = torch.randint(0, NUM_GROUPS, (n,), generator=g)
    target = torch.randint(0, 2, (n,), generator=g)
    preds = (torch.rand(n, generator=g) < torch.linspace(0.2, 0.8, NUM_GROUPS)[groups]).long()
    cf_preds = torch.where(torch.rand(n, generator=g) < 0.3, 1 - preds, preds)
    probs = torch.randn(n, 3, generator=g).mul(2).softmax(-1)
    labels3 = torch.randint(0, 3, (n,), generator=g)
    return preds, target, groups, cf_preds, probs, labels3


def _chunks(n: int, sizes=(17, 100, 3, 0)) -> list[slice]:
    """Uneven batches (one of them empty) that cover 0..n."""
    bounds = np.cumsum((0, *sizes)).tolist() + [n]
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_accumulated_metrics_equal_functional_on_concatenation(seed: int) -> None:
    preds, target, groups, cf_preds, probs, labels3 = _data(seed)
    metrics = {
        "dp": DemographicParityDifference(NUM_GROUPS),
        "eo": EqualOpportunityDifference(NUM_GROUPS),
        "ga": GroupAccuracy(NUM_GROUPS),
        "wga": WorstGroupAccuracy(NUM_GROUPS),
        "flip": CounterfactualFlipRate(),
        "ece": ExpectedCalibrationError(n_bins=10),
    }
    for s in _chunks(len(preds)):
        metrics["dp"].update(preds[s], groups[s])
        metrics["eo"].update(preds[s], target[s], groups[s])
        metrics["ga"].update(preds[s], target[s], groups[s])
        metrics["wga"].update(preds[s], target[s], groups[s])
        metrics["flip"].update(preds[s], cf_preds[s])
        metrics["ece"].update(probs[s], labels3[s])

    torch.testing.assert_close(metrics["dp"].compute(), demographic_parity_difference(preds, groups))
    torch.testing.assert_close(metrics["eo"].compute(), equal_opportunity_difference(preds, target, groups))
    torch.testing.assert_close(metrics["ga"].compute(), group_accuracies(preds, target, groups, NUM_GROUPS))
    torch.testing.assert_close(metrics["wga"].compute(), worst_group_accuracy(preds, target, groups))
    torch.testing.assert_close(metrics["flip"].compute(), counterfactual_flip_rate(preds, cf_preds))
    torch.testing.assert_close(
        metrics["ece"].compute(), expected_calibration_error(probs, labels3, n_bins=10)
    )

    # and against outside references
    fl_dp = fl_demographic_parity_difference(target.numpy(), preds.numpy(), sensitive_features=groups.numpy())
    assert metrics["dp"].compute().item() == pytest.approx(fl_dp, abs=1e-6)
    tm_ece = multiclass_calibration_error(probs, labels3, num_classes=3, n_bins=10)
    assert metrics["ece"].compute().item() == pytest.approx(tm_ece.item(), abs=1e-5)

    for metric in metrics.values():  # states are fixed-size sums
        for name in metric._defaults:
            assert metric._reductions[name].__name__ in ("dim_zero_sum", "sum"), name
            assert isinstance(getattr(metric, name), torch.Tensor)
        metric.reset()
    assert metrics["dp"].numerator.sum() == 0


def test_metric_states_have_fixed_size() -> None:
    metric = GroupAccuracy(3)
    metric.update(torch.tensor([0, 1]), torch.tensor([0, 0]), torch.tensor([0, 0]))
    metric.update(torch.tensor([1, 1, 1]), torch.tensor([1, 1, 0]), torch.tensor([2, 2, 2]))
    assert metric.numerator.tolist() == [1, 0, 2]
    assert metric.denominator.tolist() == [2, 0, 3]


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (lambda: DemographicParityDifference(0), "num_groups"),
        (lambda: WorstGroupAccuracy(2.5), "num_groups"),  # type: ignore[arg-type]
        (lambda: ExpectedCalibrationError(n_bins=0), "n_bins"),
        (lambda: ReliabilityMetrics(num_classes=1), "num_classes"),
        (lambda: ReliabilityMetrics(num_classes=3, positive_class=3), "positive_class"),
        (lambda: ReliabilityMetrics(num_classes=3, num_groups=0), "num_groups"),
    ],
)
def test_bad_arguments_raise(factory, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        factory()


def test_update_rejects_out_of_range_groups() -> None:
    metric = DemographicParityDifference(2)
    with pytest.raises(ValueError, match="num_groups"):
        metric.update(torch.tensor([0, 1]), torch.tensor([0, 2]))


@pytest.mark.parametrize("seed", [0, 1])
def test_reliability_metrics_against_independent_references(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    n, c = 150, 3
    logits = torch.randn(n, c, generator=g) * 2
    target = torch.randint(0, c, (n,), generator=g)
    groups = torch.randint(0, NUM_GROUPS, (n,), generator=g)
    cf_logits = logits + torch.randn(n, c, generator=g)

    metrics = ReliabilityMetrics(num_classes=c, num_groups=NUM_GROUPS, counterfactual=True, n_bins=10)
    for s in _chunks(n, (40, 60)):
        metrics.update(logits[s], target[s], groups=groups[s], cf_logits=cf_logits[s])
    out = metrics.compute()
    assert list(out) == [
        "acc", "ece", "nll", "dp_diff", "eo_diff", "worst_group_acc",
        *[f"group_acc/{i}" for i in range(NUM_GROUPS)], "flip_rate",
    ]  # fmt: skip

    probs = logits.softmax(-1).numpy()
    pred = probs.argmax(1)
    y, grp = target.numpy(), groups.numpy()
    assert out["acc"].item() == pytest.approx(accuracy_score(y, pred), abs=1e-6)
    probs64 = logits.double().softmax(-1).numpy()
    assert out["nll"].item() == pytest.approx(log_loss(y, probs64, labels=[0, 1, 2]), abs=1e-5)
    tm_ece = multiclass_calibration_error(logits.softmax(-1), target, num_classes=c, n_bins=10)
    assert out["ece"].item() == pytest.approx(tm_ece.item(), abs=1e-5)
    pos_pred, pos_true = (pred == 1).astype(int), (y == 1).astype(int)
    fl_dp = fl_demographic_parity_difference(pos_true, pos_pred, sensitive_features=grp)
    fl_eo = fl_equal_opportunity_difference(pos_true, pos_pred, sensitive_features=grp)
    assert out["dp_diff"].item() == pytest.approx(fl_dp, abs=1e-6)
    assert out["eo_diff"].item() == pytest.approx(fl_eo, abs=1e-6)
    by_group = MetricFrame(metrics=accuracy_score, y_true=y, y_pred=pred, sensitive_features=grp).by_group
    for i in range(NUM_GROUPS):
        assert out[f"group_acc/{i}"].item() == pytest.approx(by_group[i], abs=1e-6)
    assert out["worst_group_acc"].item() == pytest.approx(by_group.min(), abs=1e-6)
    flips = np.mean(pred != cf_logits.argmax(-1).numpy())
    assert out["flip_rate"].item() == pytest.approx(flips, abs=1e-6)

    metrics.reset()
    metrics.update(logits[:10], target[:10], groups=torch.zeros(10, dtype=torch.long), cf_logits=logits[:10])
    out = metrics.compute()
    assert out["flip_rate"].item() == 0.0
    assert math.isnan(out["group_acc/1"].item())
    assert out["worst_group_acc"].item() == pytest.approx(out["group_acc/0"].item())


def test_reliability_metrics_minimal_and_required_inputs() -> None:
    metrics = ReliabilityMetrics(num_classes=2)
    logits = torch.tensor([[0.0, 3.0], [1.0, 0.0]], requires_grad=True)
    metrics.update(logits, torch.tensor([1, 1]))
    assert set(metrics.compute()) == {"acc", "ece", "nll"}
    assert metrics.compute()["acc"].item() == 0.5

    grouped = ReliabilityMetrics(num_classes=2, num_groups=2, counterfactual=True)
    with pytest.raises(ValueError, match="groups"):
        grouped.update(logits, torch.tensor([1, 1]), cf_logits=logits)
    with pytest.raises(ValueError, match="cf_logits"):
        grouped.update(logits, torch.tensor([1, 1]), groups=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"\[N, 2\]"):
        grouped.update(torch.zeros(2, 3), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="target"):
        grouped.update(logits, torch.tensor([1, 1, 0]))


def test_reliability_metrics_bad_batch_leaves_states_untouched() -> None:
    metrics = ReliabilityMetrics(num_classes=2, num_groups=2)
    logits = torch.tensor([[0.0, 3.0], [1.0, 0.0]])
    metrics.update(logits, torch.tensor([1, 0]), groups=torch.tensor([0, 1]))
    before = {k: v.clone() for k, v in metrics.compute().items()}
    for bad_target, bad_groups, match in [
        (torch.tensor([1, 0]), torch.tensor([0, 5]), "num_groups"),
        (torch.tensor([1, 0]), torch.tensor([0, -1]), "negative"),
        (torch.tensor([1, 0]), torch.tensor([0]), "same shape"),
        (torch.tensor([1, 2]), torch.tensor([0, 1]), "2 classes"),
        (torch.tensor([1.0, 0.0]), torch.tensor([0, 1]), "integer"),
    ]:
        with pytest.raises(ValueError, match=match):
            metrics.update(torch.tensor([[5.0, 0.0], [5.0, 0.0]]), bad_target, groups=bad_groups)
    after = metrics.compute()
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, equal_nan=True)
