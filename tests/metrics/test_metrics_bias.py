"""Identity-term bias metrics against naive loops, fairlearn and scikit-learn; classes against functions."""

from __future__ import annotations

import pytest
import torch

from icp_lightning.metrics.bias import (
    BiasAmplification,
    CounterfactualProbabilityChange,
    FalsePositiveRateGap,
    bias_amplification,
    counterfactual_probability_change,
    false_positive_rate_gap,
    positive_rate,
)


def _data(
    seed: int, n: int = 300
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    target = (torch.rand(n, generator=g) < 0.5).long()
    identity = (torch.rand(n, generator=g) < 0.4).long()
    probs = torch.rand(n, generator=g) * 0.6 + 0.3 * identity  # identity mentions score higher
    cf_probs = (probs + torch.randn(n, generator=g) * 0.1).clamp(0, 1)
    return (probs > 0.5).long(), target, identity, probs, cf_probs


def _naive_fpr(preds: list[int], target: list[int], identity: list[int], group: int) -> float:
    fp = neg = 0
    for p, y, a in zip(preds, target, identity):
        if y == 0 and a == group:
            neg += 1
            fp += p == 1
    return fp / neg


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fpr_gap_matches_a_naive_loop_and_fairlearn(seed: int) -> None:
    from fairlearn.metrics import MetricFrame, false_positive_rate

    preds, target, identity, _, _ = _data(seed)
    p, y, a = preds.tolist(), target.tolist(), identity.tolist()
    naive = _naive_fpr(p, y, a, 1) - _naive_fpr(p, y, a, 0)
    assert float(false_positive_rate_gap(preds, target, identity)) == pytest.approx(naive, abs=1e-6)
    frame = MetricFrame(metrics=false_positive_rate, y_true=y, y_pred=p, sensitive_features=a)
    by_group = frame.by_group
    assert float(false_positive_rate_gap(preds, target, identity)) == pytest.approx(
        by_group[1] - by_group[0], abs=1e-6
    )
    # fairlearn's difference is the absolute gap
    assert abs(naive) == pytest.approx(frame.difference(), abs=1e-6)


def test_probability_change_and_bias_amplification_match_naive_loops() -> None:
    preds, target, identity, probs, cf_probs = _data(3)
    naive_change = sum(abs(a - b) for a, b in zip(probs.tolist(), cf_probs.tolist())) / len(probs)
    assert float(counterfactual_probability_change(probs, cf_probs)) == pytest.approx(naive_change, abs=1e-6)
    mentioned = [p for p, a in zip(preds.tolist(), identity.tolist()) if a == 1]
    label_rate = sum(y for y, a in zip(target.tolist(), identity.tolist()) if a == 1) / sum(identity.tolist())
    assert float(positive_rate(target, identity)) == pytest.approx(label_rate, abs=1e-6)
    naive_amp = sum(mentioned) / len(mentioned) - label_rate
    assert float(bias_amplification(preds, identity, label_rate)) == pytest.approx(naive_amp, abs=1e-6)


def test_classes_accumulate_batches_to_the_functional_value() -> None:
    preds, target, identity, probs, cf_probs = _data(4)
    gap, change, amp = (
        FalsePositiveRateGap(),
        CounterfactualProbabilityChange(),
        BiasAmplification(reference=0.6),
    )
    for chunk in torch.arange(len(preds)).split(37):
        gap.update(preds[chunk], target[chunk], identity[chunk])
        change.update(probs[chunk], cf_probs[chunk])
        amp.update(preds[chunk], identity[chunk])
    assert float(gap.compute()) == pytest.approx(
        float(false_positive_rate_gap(preds, target, identity)), abs=1e-6
    )
    assert float(change.compute()) == pytest.approx(float(counterfactual_probability_change(probs, cf_probs)))
    assert float(amp.compute()) == pytest.approx(float(bias_amplification(preds, identity, 0.6)), abs=1e-6)


def test_accuracy_and_balanced_accuracy_from_torchmetrics_match_sklearn() -> None:
    from sklearn.metrics import accuracy_score, balanced_accuracy_score
    from torchmetrics.classification import BinaryAccuracy, MulticlassAccuracy

    preds, target, _, _, _ = _data(5)
    target = torch.cat([target, torch.zeros(100, dtype=torch.long)])  # unbalanced classes
    preds = torch.cat([preds, torch.zeros(100, dtype=torch.long)])
    acc = float(BinaryAccuracy()(preds, target))
    bal = float(MulticlassAccuracy(num_classes=2, average="macro")(preds, target))
    assert acc == pytest.approx(accuracy_score(target, preds))
    assert bal == pytest.approx(balanced_accuracy_score(target, preds))


def test_empty_groups_give_nan_and_bad_inputs_raise() -> None:
    assert torch.isnan(
        false_positive_rate_gap(torch.tensor([1, 0]), torch.tensor([0, 0]), torch.tensor([1, 1]))
    )
    assert torch.isnan(counterfactual_probability_change(torch.zeros(0), torch.zeros(0)))
    assert torch.isnan(bias_amplification(torch.tensor([1]), torch.tensor([0]), 0.5))
    with pytest.raises(ValueError, match="binary"):
        false_positive_rate_gap(torch.tensor([2, 0]), torch.tensor([0, 0]), torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="same shape"):
        false_positive_rate_gap(torch.tensor([1, 0]), torch.tensor([0]), torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="float probabilities"):
        counterfactual_probability_change(torch.tensor([1]), torch.tensor([0]))
    with pytest.raises(ValueError, match="reference"):
        BiasAmplification(reference=1.5)
