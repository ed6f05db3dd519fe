"""Functional metrics against fairlearn, torchmetrics and naive loops written here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from fairlearn.metrics import MetricFrame
from fairlearn.metrics import demographic_parity_difference as fl_demographic_parity_difference
from fairlearn.metrics import equal_opportunity_difference as fl_equal_opportunity_difference
from sklearn.metrics import accuracy_score
from torchmetrics.functional.classification import binary_calibration_error, multiclass_calibration_error

from icp_lightning.metrics.functional import (
    counterfactual_flip_rate,
    demographic_parity_difference,
    equal_opportunity_difference,
    expected_calibration_error,
    group_accuracies,
    negative_log_likelihood,
    worst_group_accuracy,
)

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[2]
SEEDS = [0, 1, 2, 3, 4]


def _random_fairness_data(seed: int, n: int = 200, num_groups: int = 4):
    """Binary preds/targets whose positive rates depend on the group, so the differences are far from 0."""
    g = torch.Generator().manual_seed(seed)
    groups = torch.randint(0, num_groups, (n,), generator=g)
    bias = torch.linspace(0.2, 0.8, num_groups)[groups]
    target = (torch.rand(n, generator=g) < 0.5).long()
    preds = (torch.rand(n, generator=g) < bias).long()
    return preds, target, groups


def _naive_ece(confidences: np.ndarray, correct: np.ndarray, n_bins: int) -> float:
    """Equal-width bins [k/n, (k+1)/n), plus a last bin for confidence exactly 1.0 (torchmetrics' convention)."""
    n = len(confidences)
    ece = 0.0
    edges = [(k / n_bins, (k + 1) / n_bins) for k in range(n_bins)]
    masks = [(confidences >= lo) & (confidences < hi) for lo, hi in edges] + [confidences == 1.0]
    for in_bin in masks:
        if in_bin.sum() == 0:
            continue
        ece += in_bin.sum() / n * abs(correct[in_bin].mean() - confidences[in_bin].mean())
    return float(ece)


@pytest.mark.parametrize("seed", SEEDS)
def test_demographic_parity_difference_matches_fairlearn(seed: int) -> None:
    preds, target, groups = _random_fairness_data(seed)
    expected = fl_demographic_parity_difference(
        target.numpy(), preds.numpy(), sensitive_features=groups.numpy()
    )
    assert expected > 0.05  # the test data are unfair enough for a wrong formula to show
    assert demographic_parity_difference(preds, groups).item() == pytest.approx(expected, abs=1e-6)
    assert demographic_parity_difference(preds, groups, num_groups=7).item() == pytest.approx(
        expected, abs=1e-6
    )


@pytest.mark.parametrize("seed", SEEDS)
def test_equal_opportunity_difference_matches_fairlearn(seed: int) -> None:
    preds, target, groups = _random_fairness_data(seed)
    expected = fl_equal_opportunity_difference(
        target.numpy(), preds.numpy(), sensitive_features=groups.numpy()
    )
    assert expected > 0.05
    assert equal_opportunity_difference(preds, target, groups).item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("seed", SEEDS)
def test_group_and_worst_group_accuracy_match_fairlearn(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    n, num_classes = 300, 3
    groups = torch.randint(0, 4, (n,), generator=g)
    groups[groups == 2] = 3  # group 2 is empty: reported as nan and ignored by the minimum
    target = torch.randint(0, num_classes, (n,), generator=g)
    noise = torch.rand(n, generator=g) < 0.2 + 0.15 * groups  # accuracy falls with the group id
    preds = torch.where(noise, torch.randint(0, num_classes, (n,), generator=g), target)

    frame = MetricFrame(
        metrics=accuracy_score, y_true=target.numpy(), y_pred=preds.numpy(), sensitive_features=groups.numpy()
    )
    by_group = frame.by_group
    result = group_accuracies(preds, target, groups, num_groups=5)
    assert result.shape == (5,)
    assert torch.isnan(result[[2, 4]]).all()
    for group, value in by_group.items():
        assert result[int(group)].item() == pytest.approx(value, abs=1e-6)
    assert worst_group_accuracy(preds, target, groups).item() == pytest.approx(by_group.min(), abs=1e-6)
    assert worst_group_accuracy(preds, target, groups).item() < accuracy_score(target.numpy(), preds.numpy())


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n_bins", [5, 15])
def test_multiclass_ece_matches_naive_loop_and_torchmetrics(seed: int, n_bins: int) -> None:
    g = torch.Generator().manual_seed(seed)
    probs = (2 * torch.randn(500, 4, generator=g)).softmax(-1)
    probs[:3] = torch.tensor([1.0, 0.0, 0.0, 0.0])  # confidence exactly 1.0: its own bin
    target = torch.randint(0, 4, (500,), generator=g)
    conf, pred = probs.double().numpy().max(1), probs.numpy().argmax(1)
    expected = _naive_ece(conf, (pred == target.numpy()).astype(float), n_bins)
    assert expected > 0.05
    result = expected_calibration_error(probs, target, n_bins=n_bins)
    assert result.item() == pytest.approx(expected, abs=1e-5)
    reference = multiclass_calibration_error(probs, target, num_classes=4, n_bins=n_bins, norm="l1")
    assert result.item() == pytest.approx(reference.item(), abs=1e-5)


@pytest.mark.parametrize("seed", SEEDS)
def test_binary_ece_matches_naive_loop_and_torchmetrics(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    probs = torch.rand(400, generator=g)
    probs[:4] = torch.tensor([0.0, 1.0, 1.0, 0.0])
    target = (torch.rand(400, generator=g) < probs**2).long()  # over-confident on purpose
    expected = _naive_ece(probs.double().numpy(), target.numpy().astype(float), 10)
    assert expected > 0.05
    result = expected_calibration_error(probs, target, n_bins=10)
    assert result.item() == pytest.approx(expected, abs=1e-5)
    assert result.item() == pytest.approx(binary_calibration_error(probs, target, n_bins=10).item(), abs=1e-5)


def test_ece_bin_edges_follow_torchmetrics() -> None:
    # 0.5 sits on an edge (goes to the upper bin [0.5, 1.0)); 1.0 gets a bin of its own. Here the signs of
    # acc - conf differ between the bins, so merging 1.0 into [0.5, 1.0) or 0.5 into [0, 0.5) changes the value.
    probs = torch.tensor([0.95] * 10 + [1.0] + [0.5] * 4 + [0.25] * 4)
    target = torch.tensor([1] * 10 + [0] + [0] * 4 + [1] * 4)
    by_hand = (4 * 0.75 + abs(10 * 0.05 - 4 * 0.5) + 1.0) / 19  # per bin |sum(acc) - sum(conf)|, over N
    assert _naive_ece(probs.double().numpy(), target.numpy().astype(float), 2) == pytest.approx(by_hand)
    assert expected_calibration_error(probs, target, n_bins=2).item() == pytest.approx(by_hand, abs=1e-6)
    reference = binary_calibration_error(probs, target, n_bins=2).item()
    assert expected_calibration_error(probs, target, n_bins=2).item() == pytest.approx(reference, abs=1e-6)


def test_negative_log_likelihood_matches_naive_loop() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 5, generator=g)
    target = torch.randint(0, 5, (50,), generator=g)
    x = logits.double().numpy()
    expected = np.mean(
        [np.log(np.exp(row).sum()) - row[t] for row, t in zip(x, target.numpy())]  # -log softmax(row)[t]
    )
    assert negative_log_likelihood(logits, target).item() == pytest.approx(expected, abs=1e-5)


def test_counterfactual_flip_rate_matches_naive_loop() -> None:
    g = torch.Generator().manual_seed(0)
    preds = torch.randint(0, 3, (97,), generator=g)
    cf_preds = torch.randint(0, 3, (97,), generator=g)
    expected = sum(int(a) != int(b) for a, b in zip(preds, cf_preds)) / 97
    assert counterfactual_flip_rate(preds, cf_preds).item() == pytest.approx(expected, abs=1e-6)
    assert counterfactual_flip_rate(preds, preds).item() == 0.0


def test_empty_or_degenerate_inputs() -> None:
    empty = torch.zeros(0, dtype=torch.long)
    assert torch.isnan(demographic_parity_difference(empty, empty))
    assert torch.isnan(worst_group_accuracy(empty, empty, empty))
    assert torch.isnan(counterfactual_flip_rate(empty, empty))
    assert expected_calibration_error(torch.zeros(0), empty).item() == 0.0
    # no positive target in any group: equal opportunity is undefined
    ones = torch.ones(4, dtype=torch.long)
    assert torch.isnan(equal_opportunity_difference(ones, 0 * ones, torch.tensor([0, 1, 2, 0])))
    # one group only: no disparity
    assert demographic_parity_difference(torch.tensor([0, 1, 1]), torch.tensor([2, 2, 2])).item() == 0.0


BAD_INPUTS = [
    (
        "shape",
        lambda: demographic_parity_difference(torch.tensor([0, 1, 1]), torch.tensor([0, 1])),
        "same shape",
    ),
    (
        "nonbinary",
        lambda: demographic_parity_difference(torch.tensor([0, 2]), torch.tensor([0, 1])),
        "binary",
    ),
    (
        "float preds",
        lambda: demographic_parity_difference(torch.tensor([0.3, 0.7]), torch.tensor([0, 1])),
        "binary",
    ),
    (
        "nonbinary target",
        lambda: equal_opportunity_difference(
            torch.tensor([0, 1]), torch.tensor([0, 3]), torch.tensor([0, 1])
        ),
        "target",
    ),
    (
        "negative group",
        lambda: worst_group_accuracy(torch.tensor([0, 1]), torch.tensor([0, 1]), torch.tensor([0, -1])),
        "negative",
    ),
    (
        "float groups",
        lambda: group_accuracies(torch.tensor([0, 1]), torch.tensor([0, 1]), torch.tensor([0.0, 1.0])),
        "integer",
    ),
    (
        "group too large",
        lambda: group_accuracies(
            torch.tensor([0, 1]), torch.tensor([0, 1]), torch.tensor([0, 3]), num_groups=2
        ),
        "num_groups",
    ),
    (
        "float labels",
        lambda: worst_group_accuracy(torch.tensor([0.0, 1.0]), torch.tensor([0, 1]), torch.tensor([0, 1])),
        "argmax",
    ),
    ("flip shape", lambda: counterfactual_flip_rate(torch.tensor([0, 1]), torch.tensor([0])), "same shape"),
    ("flip float", lambda: counterfactual_flip_rate(torch.tensor([0.2]), torch.tensor([0.1])), "argmax"),
    (
        "ece range",
        lambda: expected_calibration_error(torch.tensor([1.5, 0.2]), torch.tensor([1, 0])),
        r"\[0, 1\]",
    ),
    ("ece shape", lambda: expected_calibration_error(torch.rand(3, 2), torch.tensor([1, 0])), "target"),
    ("ece class", lambda: expected_calibration_error(torch.rand(2, 2), torch.tensor([1, 2])), "classes"),
    (
        "ece int probs",
        lambda: expected_calibration_error(torch.tensor([0, 1]), torch.tensor([1, 0])),
        "floating",
    ),
    ("ece bins", lambda: expected_calibration_error(torch.rand(2), torch.tensor([1, 0]), n_bins=0), "n_bins"),
    ("nll shape", lambda: negative_log_likelihood(torch.rand(3), torch.tensor([1, 0, 0])), r"\[N, C\]"),
]


@pytest.mark.parametrize(("case", "call", "match"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_inputs_raise_value_error(case: str, call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()


def test_metrics_import_without_lightning() -> None:
    # the parent package is stubbed so that only icp_lightning.metrics (and what it imports) is checked
    code = (
        "import sys, types\n"
        "for name in ('lightning', 'lightning.pytorch', 'pytorch_lightning'):\n"
        "    sys.modules[name] = None  # any import of them now raises ImportError\n"
        "package = types.ModuleType('icp_lightning')\n"
        f"package.__path__ = [{str(ROOT / 'icp_lightning')!r}]\n"
        "sys.modules['icp_lightning'] = package\n"
        "import icp_lightning.metrics.functional, icp_lightning.metrics.lm, icp_lightning.metrics\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
