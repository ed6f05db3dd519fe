"""``torchmetrics.Metric`` classes for the functions in :mod:`icp_lightning.metrics.functional`.

Each class keeps only fixed-size sum states (per bin, per group, or scalars) declared with
``dist_reduce_fx="sum"``, and calls the functional ``_update`` / ``_compute`` helpers. So a metric accumulated over
many batches, or over many processes under DDP, equals the functional value on all the data at once, exactly.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from icp_lightning.metrics.functional import (
    _calibration_compute,
    _calibration_update,
    _check_n_bins,
    _demographic_parity_update,
    _equal_opportunity_update,
    _flip_rate_compute,
    _flip_rate_update,
    _group_accuracy_update,
    _group_rate_compute,
    _rate_difference_compute,
    _worst_group_compute,
)

__all__ = [
    "CounterfactualFlipRate",
    "DemographicParityDifference",
    "EqualOpportunityDifference",
    "ExpectedCalibrationError",
    "GroupAccuracy",
    "WorstGroupAccuracy",
]


def _validated_num_groups(num_groups: int) -> int:
    if not isinstance(num_groups, int) or isinstance(num_groups, bool) or num_groups < 1:
        raise ValueError(f"Expected `num_groups` to be a positive integer, but got {num_groups!r}.")
    return num_groups


class ExpectedCalibrationError(Metric):
    """Expected calibration error (L1, equal-width bins) with per-bin sum states.

    Gives the value of torchmetrics' ``CalibrationError(norm="l1")`` (binary for ``probs [N]``, top-label
    multiclass for ``probs [N, C]``), but stores three ``[n_bins + 1]`` sums instead of every confidence, so its
    memory does not grow with the data and DDP merges it by a sum.

    Args:
        n_bins: Number of equal-width bins on ``[0, 1]``.
        kwargs: Passed to ``torchmetrics.Metric``.

    Example:
        >>> metric = ExpectedCalibrationError(n_bins=2)
        >>> metric.update(torch.tensor([0.25, 0.25, 0.55]), torch.tensor([0, 0, 1]))
        >>> metric.update(torch.tensor([0.75, 0.75]), torch.tensor([1, 1]))
        >>> metric.compute()
        tensor(0.2900)
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False
    count: Tensor
    confidence_sum: Tensor
    accuracy_sum: Tensor

    def __init__(self, n_bins: int = 15, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        _check_n_bins(n_bins)
        self.n_bins = n_bins
        for name in ("count", "confidence_sum", "accuracy_sum"):
            self.add_state(name, torch.zeros(n_bins + 1, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, probs: Tensor, target: Tensor) -> None:
        """Add a batch of ``probs [N]`` or ``[N, C]`` and integer ``target [N]``."""
        count, confidence_sum, accuracy_sum = _calibration_update(probs, target, self.n_bins)
        self.count += count
        self.confidence_sum += confidence_sum
        self.accuracy_sum += accuracy_sum

    def compute(self) -> Tensor:
        """Calibration error over everything seen so far."""
        return _calibration_compute(self.count, self.confidence_sum, self.accuracy_sum)


class _GroupRateMetric(Metric):
    """Holds per-group ``numerator`` / ``denominator`` int64 counters, merged by a sum."""

    is_differentiable = False
    full_state_update = False
    numerator: Tensor
    denominator: Tensor

    def __init__(self, num_groups: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_groups = _validated_num_groups(num_groups)
        self.add_state("numerator", torch.zeros(num_groups, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("denominator", torch.zeros(num_groups, dtype=torch.long), dist_reduce_fx="sum")

    def _add(self, counts: tuple[Tensor, Tensor]) -> None:
        self.numerator += counts[0]
        self.denominator += counts[1]


class DemographicParityDifference(_GroupRateMetric):
    """Largest minus smallest positive-prediction rate over groups (fairlearn's definition); lower is fairer.

    Args:
        num_groups: Number of groups; group ids must lie in ``0 .. num_groups - 1``.
        kwargs: Passed to ``torchmetrics.Metric``.

    Example:
        >>> metric = DemographicParityDifference(num_groups=2)
        >>> metric.update(torch.tensor([1, 1, 0]), torch.tensor([0, 0, 0]))
        >>> metric.update(torch.tensor([1, 0, 0]), torch.tensor([1, 1, 1]))
        >>> metric.compute()
        tensor(0.3333)
    """

    higher_is_better = False

    def update(self, preds: Tensor, groups: Tensor) -> None:
        """Add binary 0/1 ``preds [N]`` with integer ``groups [N]``."""
        self._add(_demographic_parity_update(preds, groups, self.num_groups))

    def compute(self) -> Tensor:
        """``max - min`` positive-prediction rate over groups with examples."""
        return _rate_difference_compute(self.numerator, self.denominator)


class EqualOpportunityDifference(_GroupRateMetric):
    """Largest minus smallest true-positive rate over groups (fairlearn's definition); lower is fairer.

    Args:
        num_groups: Number of groups; group ids must lie in ``0 .. num_groups - 1``.
        kwargs: Passed to ``torchmetrics.Metric``.

    Example:
        >>> metric = EqualOpportunityDifference(num_groups=2)
        >>> metric.update(torch.tensor([1, 1, 0, 1]), torch.tensor([1, 1, 1, 1]), torch.tensor([0, 0, 0, 1]))
        >>> metric.update(torch.tensor([0, 0]), torch.tensor([1, 0]), torch.tensor([1, 1]))
        >>> metric.compute()
        tensor(0.1667)
    """

    higher_is_better = False

    def update(self, preds: Tensor, target: Tensor, groups: Tensor) -> None:
        """Add binary 0/1 ``preds [N]`` and ``target [N]`` with integer ``groups [N]``."""
        self._add(_equal_opportunity_update(preds, target, groups, self.num_groups))

    def compute(self) -> Tensor:
        """``max - min`` true-positive rate over groups with positive targets."""
        return _rate_difference_compute(self.numerator, self.denominator)


class GroupAccuracy(_GroupRateMetric):
    """Accuracy within each group, as a ``[num_groups]`` tensor (``nan`` for groups never seen).

    Args:
        num_groups: Number of groups; group ids must lie in ``0 .. num_groups - 1``.
        kwargs: Passed to ``torchmetrics.Metric``.

    Example:
        >>> metric = GroupAccuracy(num_groups=3)
        >>> metric.update(torch.tensor([1, 2, 0]), torch.tensor([1, 2, 2]), torch.tensor([0, 0, 0]))
        >>> metric.update(torch.tensor([1, 0, 0]), torch.tensor([1, 1, 0]), torch.tensor([2, 2, 2]))
        >>> metric.compute()
        tensor([0.6667,    nan, 0.6667])
    """

    higher_is_better = True

    def update(self, preds: Tensor, target: Tensor, groups: Tensor) -> None:
        """Add integer ``preds [N]`` and ``target [N]`` (any number of classes) with ``groups [N]``."""
        self._add(_group_accuracy_update(preds, target, groups, self.num_groups))

    def compute(self) -> Tensor:
        """Per-group accuracy."""
        return _group_rate_compute(self.numerator, self.denominator)


class WorstGroupAccuracy(GroupAccuracy):
    """Smallest accuracy over the groups seen so far.

    Args:
        num_groups: Number of groups; group ids must lie in ``0 .. num_groups - 1``.
        kwargs: Passed to ``torchmetrics.Metric``.

    Example:
        >>> metric = WorstGroupAccuracy(num_groups=2)
        >>> metric.update(torch.tensor([1, 1, 0]), torch.tensor([1, 1, 0]), torch.tensor([0, 0, 0]))
        >>> metric.update(torch.tensor([1, 0, 0]), torch.tensor([1, 1, 1]), torch.tensor([1, 1, 1]))
        >>> metric.compute()
        tensor(0.3333)
    """

    def compute(self) -> Tensor:
        """Smallest per-group accuracy."""
        return _worst_group_compute(self.numerator, self.denominator)


class CounterfactualFlipRate(Metric):
    """Fraction of examples whose predicted label changes on the counterfactual input; lower is more invariant.

    Args:
        kwargs: Passed to ``torchmetrics.Metric``.

    Example:
        >>> metric = CounterfactualFlipRate()
        >>> metric.update(torch.tensor([0, 1]), torch.tensor([0, 0]))
        >>> metric.update(torch.tensor([1, 2]), torch.tensor([1, 1]))
        >>> metric.compute()
        tensor(0.5000)
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False
    flips: Tensor
    examples: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("flips", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("examples", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, cf_preds: Tensor) -> None:
        """Add integer predicted labels on the original (``preds``) and counterfactual (``cf_preds``) inputs."""
        flips, examples = _flip_rate_update(preds, cf_preds)
        self.flips += flips
        self.examples += examples

    def compute(self) -> Tensor:
        """Flip rate over everything seen so far."""
        return _flip_rate_compute(self.flips, self.examples)
