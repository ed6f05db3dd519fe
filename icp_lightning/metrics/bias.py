"""Identity-term bias metrics of a binary classifier (setting F): functional forms and ``torchmetrics`` classes.

- :func:`false_positive_rate_gap` / :class:`FalsePositiveRateGap`: ``FPR(identity) - FPR(no identity)`` on the
  negatives (an equal-opportunity style gap for the negative class; signed: > 0 means texts that mention an
  identity are wrongly flagged more often).
- :func:`counterfactual_probability_change` / :class:`CounterfactualProbabilityChange`: mean ``|p(x) - p(x')|``
  of the positive class over counterfactual pairs (sensitivity to the protected attribute; the flip rate is
  :class:`~icp_lightning.metrics.CounterfactualFlipRate`).
- :func:`bias_amplification` / :class:`BiasAmplification`: ``P(pred = 1 | identity) - reference``, where the
  reference is the training labels' ``P(y = 1 | identity)`` (:func:`positive_rate`): how much more often the model
  predicts the positive class for identity mentions than the training labels do.

Accuracy and balanced accuracy come from torchmetrics itself (``BinaryAccuracy``, ``MulticlassAccuracy(
num_classes=2, average="macro")``). As in :mod:`~icp_lightning.metrics.functional`, each metric is an ``_update``
(fixed-size sums) and a ``_compute``; the classes keep the sums as ``dist_reduce_fx="sum"`` states. Pure torch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from icp_lightning.metrics.functional import _check_binary, _check_same_shape

__all__ = [
    "BiasAmplification",
    "CounterfactualProbabilityChange",
    "FalsePositiveRateGap",
    "bias_amplification",
    "counterfactual_probability_change",
    "false_positive_rate_gap",
    "positive_rate",
]


def _nan(device: torch.device) -> Tensor:
    return torch.tensor(float("nan"), device=device)


def _fpr_gap_update(preds: Tensor, target: Tensor, identity: Tensor) -> tuple[Tensor, Tensor]:
    """``(false_positives [2], negatives [2])`` int64, indexed by ``identity`` (0: no mention, 1: a mention)."""
    _check_same_shape(preds=preds, target=target, identity=identity)
    for name, t in (("preds", preds), ("target", target), ("identity", identity)):
        _check_binary(name, t)
    neg = target.reshape(-1) == 0
    ident = identity.reshape(-1).long()
    false_pos = torch.bincount(ident[neg & (preds.reshape(-1) == 1)], minlength=2)
    negatives = torch.bincount(ident[neg], minlength=2)
    return false_pos, negatives


def _fpr_gap_compute(false_pos: Tensor, negatives: Tensor) -> Tensor:
    """``FPR[1] - FPR[0]`` (``nan`` when either group has no negatives)."""
    if int(negatives.min()) == 0:
        return _nan(false_pos.device)
    rates = false_pos.double() / negatives.double()
    return (rates[1] - rates[0]).float()


def false_positive_rate_gap(preds: Tensor, target: Tensor, identity: Tensor) -> Tensor:
    """False-positive rate on negatives that mention an identity minus that on negatives that do not.

    Args:
        preds: ``[N]`` binary 0/1 predicted labels.
        target: ``[N]`` binary 0/1 labels (1 = positive, e.g. hate).
        identity: ``[N]`` 1 where the text mentions an identity term.

    Returns:
        Scalar float tensor in ``[-1, 1]``; ``nan`` when one of the two groups has no negatives.

    Example:
        >>> preds, target = torch.tensor([1, 0, 0, 0, 1]), torch.tensor([0, 0, 0, 0, 1])
        >>> false_positive_rate_gap(preds, target, torch.tensor([1, 1, 0, 0, 0]))
        tensor(0.5000)
    """
    return _fpr_gap_compute(*_fpr_gap_update(preds, target, identity))


def _prob_change_update(probs: Tensor, cf_probs: Tensor) -> tuple[Tensor, Tensor]:
    """``(sum |probs - cf_probs|, pairs)`` as float64 / int64 scalars."""
    _check_same_shape(probs=probs, cf_probs=cf_probs)
    if not (probs.is_floating_point() and cf_probs.is_floating_point()):
        raise ValueError(
            f"Expected float probabilities for `probs` and `cf_probs`, but got dtypes {probs.dtype} and "
            f"{cf_probs.dtype}. Use `logits.softmax(-1)[:, 1]` for the positive class."
        )
    total = (probs.double() - cf_probs.double()).abs().sum()
    return total, torch.tensor(probs.numel(), device=probs.device)


def _prob_change_compute(total: Tensor, pairs: Tensor) -> Tensor:
    if int(pairs) == 0:
        return _nan(total.device)
    return (total / pairs.double()).float()


def counterfactual_probability_change(probs: Tensor, cf_probs: Tensor) -> Tensor:
    """Mean ``|p(x) - p(x')|`` of the positive class over counterfactual pairs.

    Args:
        probs: ``[N]`` positive-class probabilities on the original texts.
        cf_probs: ``[N]`` the same on their counterfactuals.

    Returns:
        Scalar float tensor in ``[0, 1]`` (``nan`` for no pairs).

    Example:
        >>> counterfactual_probability_change(torch.tensor([0.9, 0.2]), torch.tensor([0.5, 0.2]))
        tensor(0.2000)
    """
    return _prob_change_compute(*_prob_change_update(probs, cf_probs))


def _positive_update(values: Tensor, identity: Tensor) -> tuple[Tensor, Tensor]:
    """``(positives among identity mentions, identity mentions)`` as int64 scalars."""
    _check_same_shape(values=values, identity=identity)
    _check_binary("values", values)
    _check_binary("identity", identity)
    ident = identity.reshape(-1) == 1
    return (values.reshape(-1)[ident] == 1).sum(), ident.sum()


def _positive_compute(positives: Tensor, mentions: Tensor) -> Tensor:
    if int(mentions) == 0:
        return _nan(positives.device)
    return (positives.double() / mentions.double()).float()


def positive_rate(values: Tensor, identity: Tensor) -> Tensor:
    """``P(value = 1 | identity = 1)``: of labels (the reference of :func:`bias_amplification`) or predictions.

    Example:
        >>> positive_rate(torch.tensor([1, 1, 0, 0]), torch.tensor([1, 1, 1, 0]))
        tensor(0.6667)
    """
    return _positive_compute(*_positive_update(values, identity))


def bias_amplification(preds: Tensor, identity: Tensor, reference: float) -> Tensor:
    """``P(pred = 1 | identity) - reference``: how much more often the model predicts the positive class for
    identity mentions than the training labels do (``reference = positive_rate(train_labels, train_identity)``).

    Args:
        preds: ``[N]`` binary 0/1 predicted labels.
        identity: ``[N]`` 1 where the text mentions an identity term.
        reference: the training labels' positive rate among identity mentions, in ``[0, 1]``.

    Returns:
        Scalar float tensor in ``[-1, 1]`` (``nan`` when no text mentions an identity).

    Raises:
        ValueError: ``reference`` outside ``[0, 1]``.

    Example:
        >>> bias_amplification(torch.tensor([1, 1, 1, 0]), torch.tensor([1, 1, 1, 0]), reference=0.5)
        tensor(0.5000)
    """
    _check_reference(reference)
    return _positive_compute(*_positive_update(preds, identity)) - reference


def _check_reference(reference: float) -> None:
    if not 0.0 <= float(reference) <= 1.0:
        raise ValueError(
            f"Expected `reference` (a rate of training labels) in [0, 1], but got {reference!r}."
        )


class FalsePositiveRateGap(Metric):
    """``FPR(identity) - FPR(no identity)`` on the negatives, from two ``[2]`` counters merged by a sum.

    Example:
        >>> metric = FalsePositiveRateGap()
        >>> metric.update(torch.tensor([1, 0]), torch.tensor([0, 0]), torch.tensor([1, 1]))
        >>> metric.update(torch.tensor([0, 0, 1]), torch.tensor([0, 0, 1]), torch.tensor([0, 0, 0]))
        >>> metric.compute()
        tensor(0.5000)
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False
    false_pos: Tensor
    negatives: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("false_pos", torch.zeros(2, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("negatives", torch.zeros(2, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor, identity: Tensor) -> None:
        """Add binary ``preds``, ``target`` and ``identity`` (each ``[N]``)."""
        false_pos, negatives = _fpr_gap_update(preds, target, identity)
        self.false_pos += false_pos
        self.negatives += negatives

    def compute(self) -> Tensor:
        """The signed gap over everything seen so far."""
        return _fpr_gap_compute(self.false_pos, self.negatives)


class CounterfactualProbabilityChange(Metric):
    """Mean ``|p(x) - p(x')|`` of the positive class over counterfactual pairs (a sum and a count).

    Example:
        >>> metric = CounterfactualProbabilityChange()
        >>> metric.update(torch.tensor([0.9]), torch.tensor([0.5]))
        >>> metric.update(torch.tensor([0.2]), torch.tensor([0.2]))
        >>> metric.compute()
        tensor(0.2000)
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False
    total: Tensor
    pairs: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("total", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("pairs", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, probs: Tensor, cf_probs: Tensor) -> None:
        """Add positive-class probabilities on the originals and on their counterfactuals."""
        total, pairs = _prob_change_update(probs, cf_probs)
        self.total += total
        self.pairs += pairs

    def compute(self) -> Tensor:
        """The mean absolute change over everything seen so far."""
        return _prob_change_compute(self.total, self.pairs)


class BiasAmplification(Metric):
    """``P(pred = 1 | identity) - reference`` (see :func:`bias_amplification`), from two counters.

    Args:
        reference: the training labels' positive rate among identity mentions, in ``[0, 1]``.
        kwargs: Passed to ``torchmetrics.Metric``.

    Example:
        >>> metric = BiasAmplification(reference=0.5)
        >>> metric.update(torch.tensor([1, 1]), torch.tensor([1, 1]))
        >>> metric.update(torch.tensor([1, 0, 0]), torch.tensor([1, 0, 0]))
        >>> metric.compute()
        tensor(0.5000)
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False
    positives: Tensor
    mentions: Tensor

    def __init__(self, reference: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        _check_reference(reference)
        self.reference = float(reference)
        self.add_state("positives", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("mentions", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, identity: Tensor) -> None:
        """Add binary predicted labels and identity flags."""
        positives, mentions = _positive_update(preds, identity)
        self.positives += positives
        self.mentions += mentions

    def compute(self) -> Tensor:
        """The amplification over everything seen so far."""
        return _positive_compute(self.positives, self.mentions) - self.reference
