"""Reliability metrics as pure functions: calibration, group fairness, group accuracy, counterfactual flips.

Every metric is split the torchmetrics way:

- ``_<metric>_update`` turns one batch into fixed-size sum tensors (per bin or per group), so batches and
  processes merge by plain addition;
- ``_<metric>_compute`` turns those sums into the value.

The public functions below run ``update`` then ``compute`` on one batch; the ``Metric`` classes in
:mod:`icp_lightning.metrics.classes` keep the sums as ``dist_reduce_fx="sum"`` states and call the same helpers,
so the maths lives in one place.

The fairness metrics report *differences* (``max - min`` over groups), as fairlearn does, where torchmetrics'
``BinaryFairness`` reports *ratios* (``min / max``); groups without examples are left out rather than counted as
a rate of 0.

This module is pure torch: it never imports lightning.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "counterfactual_flip_rate",
    "demographic_parity_difference",
    "equal_opportunity_difference",
    "expected_calibration_error",
    "group_accuracies",
    "negative_log_likelihood",
    "worst_group_accuracy",
]


# --------------------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------------------


def _check_same_shape(**tensors: Tensor) -> None:
    """Raise ``ValueError`` unless all tensors have the same shape."""
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"`{name}` {shape}" for name, shape in shapes.items())
        raise ValueError(f"Expected tensors of the same shape, one entry per example, but got {listed}.")


def _check_binary(name: str, values: Tensor) -> None:
    """Raise ``ValueError`` unless every entry of ``values`` is 0 or 1."""
    if values.is_complex():
        raise ValueError(f"Expected `{name}` to hold binary 0/1 labels, but got a complex tensor.")
    if values.numel() and not bool(((values == 0) | (values == 1)).all()):
        found = torch.unique(values.detach()).tolist()[:10]
        raise ValueError(
            f"Expected `{name}` to hold binary 0/1 labels, but found the values {found}. Threshold scores "
            "first, e.g. `(probs > 0.5).long()`, or compare class labels with the positive class, "
            "e.g. `(labels == 1).long()`."
        )


def _check_labels(name: str, values: Tensor) -> None:
    """Raise ``ValueError`` unless ``values`` is an integer (or bool) tensor of non-negative class labels."""
    if values.is_floating_point() or values.is_complex():
        raise ValueError(
            f"Expected `{name}` to be an integer tensor of class labels, but got dtype {values.dtype}. "
            "Take the argmax of logits or probabilities first, e.g. `logits.argmax(-1)`."
        )
    if values.numel() and int(values.min()) < 0:
        raise ValueError(
            f"Expected `{name}` to hold non-negative class labels, but found {int(values.min())}."
        )


def _check_groups(groups: Tensor, num_groups: Optional[int]) -> int:
    """Validate group ids and return the number of groups (``groups.max() + 1`` when not given)."""
    if groups.is_floating_point() or groups.is_complex() or groups.dtype == torch.bool:
        raise ValueError(
            f"Expected `groups` to be an integer tensor of group ids 0, 1, ..., num_groups - 1, but got dtype "
            f"{groups.dtype}. Map group names to ids first, e.g. with `torch.unique(x, return_inverse=True)`."
        )
    if num_groups is not None and (not isinstance(num_groups, int) or num_groups < 1):
        raise ValueError(f"Expected `num_groups` to be a positive integer, but got {num_groups!r}.")
    if groups.numel() == 0:
        return num_groups if num_groups is not None else 0
    low, high = int(groups.min()), int(groups.max())
    if low < 0:
        raise ValueError(
            f"Expected group ids 0, 1, ..., num_groups - 1, but found the negative id {low}. Re-number the "
            "groups, e.g. with `torch.unique(groups, return_inverse=True)`."
        )
    if num_groups is None:
        return high + 1
    if high >= num_groups:
        raise ValueError(
            f"Found group id {high}, but `num_groups` is {num_groups}: ids must lie in 0..{num_groups - 1}. "
            f"Pass `num_groups={high + 1}` or larger."
        )
    return num_groups


def _check_n_bins(n_bins: int) -> None:
    if not isinstance(n_bins, int) or isinstance(n_bins, bool) or n_bins < 1:
        raise ValueError(f"Expected `n_bins` to be a positive integer, but got {n_bins!r}.")


# --------------------------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------------------------


def _calibration_confidences(probs: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Validate ``probs``/``target`` and return ``(confidences, accuracies)``, both ``[N]`` float.

    Binary ``probs [N]``: confidence is the positive-class probability and "accuracy" the target itself, as in
    torchmetrics' ``binary_calibration_error``. Multiclass ``probs [N, C]``: confidence is the top probability and
    accuracy whether the top class is the target (top-label calibration, as ``multiclass_calibration_error``).
    """
    if not probs.is_floating_point():
        raise ValueError(
            f"Expected `probs` to be a floating point tensor of probabilities, but got {probs.dtype}."
        )
    _check_labels("target", target)
    if probs.ndim not in (1, 2):
        raise ValueError(
            f"Expected `probs` of shape [N] (binary, positive-class probability) or [N, C] (multiclass), "
            f"but got shape {tuple(probs.shape)}."
        )
    if target.ndim != 1 or target.shape[0] != probs.shape[0]:
        raise ValueError(
            f"Expected `target` of shape [N] = [{probs.shape[0]}] to match `probs` {tuple(probs.shape)}, but got "
            f"{tuple(target.shape)}."
        )
    if probs.numel() and (bool((probs < 0).any()) or bool((probs > 1).any()) or bool(probs.isnan().any())):
        raise ValueError(
            "Expected `probs` to hold probabilities in [0, 1], but found values outside it. Pass "
            "`logits.softmax(-1)` (multiclass) or `logits.sigmoid()` (binary)."
        )
    if probs.ndim == 1:
        _check_binary("target", target)
        return probs, target.to(probs.dtype)
    if target.numel() and int(target.max()) >= probs.shape[1]:
        raise ValueError(
            f"Found target class {int(target.max())}, but `probs` has only {probs.shape[1]} classes (columns)."
        )
    confidences, predictions = probs.max(dim=1)
    return confidences, predictions.eq(target).to(probs.dtype)


def _calibration_update(probs: Tensor, target: Tensor, n_bins: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-bin sums for the calibration error.

    Bins are torchmetrics': ``n_bins`` equal-width half-open bins ``[k / n_bins, (k + 1) / n_bins)`` plus one
    last bin that holds confidences of exactly 1.0.

    Args:
        probs: ``[N]`` positive-class probabilities or ``[N, C]`` class probabilities.
        target: ``[N]`` integer labels.
        n_bins: Number of equal-width bins on [0, 1].

    Returns:
        ``(count, confidence_sum, accuracy_sum)``, each of shape ``[n_bins + 1]`` and dtype float64.
    """
    _check_n_bins(n_bins)
    confidences, accuracies = _calibration_confidences(probs, target)
    boundaries = torch.linspace(0, 1, n_bins + 1, dtype=confidences.dtype, device=confidences.device)
    index = torch.bucketize(confidences, boundaries, right=True) - 1
    zeros = torch.zeros(n_bins + 1, dtype=torch.float64, device=confidences.device)
    count = zeros.index_add(0, index, torch.ones_like(confidences, dtype=torch.float64))
    confidence_sum = zeros.index_add(0, index, confidences.double())
    accuracy_sum = zeros.index_add(0, index, accuracies.double())
    return count, confidence_sum, accuracy_sum


def _calibration_compute(count: Tensor, confidence_sum: Tensor, accuracy_sum: Tensor) -> Tensor:
    """L1 calibration error from per-bin sums: ``sum_b (n_b / N) * |acc_b - conf_b|`` (0 when ``N == 0``)."""
    total = count.sum()
    if total == 0:
        return torch.zeros((), dtype=torch.float32, device=count.device)
    gap = (accuracy_sum - confidence_sum).abs()  # = n_b * |acc_b - conf_b|
    return (gap.sum() / total).float()


def expected_calibration_error(probs: Tensor, target: Tensor, n_bins: int = 15) -> Tensor:
    """Expected calibration error (L1, equal-width bins), the same value as torchmetrics' ``CalibrationError``.

    Binary ``probs [N]`` (positive-class probabilities) give torchmetrics' ``binary_calibration_error``;
    multiclass ``probs [N, C]`` give the top-label ``multiclass_calibration_error``: confidence is the largest
    probability, correctness whether its class is the target. ``ECE = sum_b (n_b / N) |acc_b - conf_b|``.

    Args:
        probs: ``[N]`` positive-class probabilities or ``[N, C]`` class probabilities, all in ``[0, 1]``.
        target: ``[N]`` integer labels (0/1 when binary).
        n_bins: Number of equal-width bins on ``[0, 1]``.

    Returns:
        Scalar float tensor; 0 for empty input.

    Raises:
        ValueError: On shape mismatch, probabilities outside ``[0, 1]``, or labels out of range.

    Example:
        >>> probs = torch.tensor([0.25, 0.25, 0.55, 0.75, 0.75])
        >>> target = torch.tensor([0, 0, 1, 1, 1])
        >>> expected_calibration_error(probs, target, n_bins=2)
        tensor(0.2900)
    """
    return _calibration_compute(*_calibration_update(probs, target, n_bins))


# --------------------------------------------------------------------------------------------------------------
# Negative log-likelihood
# --------------------------------------------------------------------------------------------------------------


def _nll_update(logits: Tensor, target: Tensor) -> Tensor:
    """Per-example cross-entropy ``-log softmax(logits)[target]``, shape ``[N]``."""
    if not logits.is_floating_point() or logits.ndim != 2:
        raise ValueError(
            f"Expected `logits` to be a float tensor of shape [N, C], but got dtype {logits.dtype} and shape "
            f"{tuple(logits.shape)}."
        )
    _check_labels("target", target)
    if target.shape != logits.shape[:1]:
        raise ValueError(
            f"Expected `target` of shape [{logits.shape[0]}] to match `logits` {tuple(logits.shape)}, but got "
            f"{tuple(target.shape)}."
        )
    if target.numel() and int(target.max()) >= logits.shape[1]:
        raise ValueError(
            f"Found target class {int(target.max())}, but `logits` has only {logits.shape[1]} classes."
        )
    return F.cross_entropy(logits.float(), target.long(), reduction="none")


def negative_log_likelihood(logits: Tensor, target: Tensor) -> Tensor:
    """Mean negative log-likelihood (cross-entropy) of the targets under ``softmax(logits)``.

    Args:
        logits: ``[N, C]`` unnormalised class scores.
        target: ``[N]`` integer labels.

    Returns:
        Scalar float tensor (``nan`` for empty input).

    Example:
        >>> logits = torch.log(torch.tensor([[0.5, 0.5], [0.2, 0.8]]))
        >>> negative_log_likelihood(logits, torch.tensor([0, 1]))
        tensor(0.4581)
    """
    return _nll_update(logits, target).mean()


# --------------------------------------------------------------------------------------------------------------
# Group rates
# --------------------------------------------------------------------------------------------------------------


def _group_counts(mask: Tensor, groups: Tensor, num_groups: int) -> Tensor:
    """Per-group count of the ``True`` entries of ``mask``, shape ``[num_groups]`` (int64)."""
    return torch.bincount(groups.reshape(-1)[mask.reshape(-1)].long(), minlength=num_groups)


def _demographic_parity_update(
    preds: Tensor, groups: Tensor, num_groups: Optional[int] = None
) -> tuple[Tensor, Tensor]:
    """Per-group ``(positive_predictions, examples)``, each ``[num_groups]`` int64."""
    _check_same_shape(preds=preds, groups=groups)
    _check_binary("preds", preds)
    num_groups = _check_groups(groups, num_groups)
    positives = _group_counts(preds == 1, groups, num_groups)
    examples = _group_counts(torch.ones_like(groups, dtype=torch.bool), groups, num_groups)
    return positives, examples


def _equal_opportunity_update(
    preds: Tensor, target: Tensor, groups: Tensor, num_groups: Optional[int] = None
) -> tuple[Tensor, Tensor]:
    """Per-group ``(true_positives, actual_positives)``, each ``[num_groups]`` int64."""
    _check_same_shape(preds=preds, target=target, groups=groups)
    _check_binary("preds", preds)
    _check_binary("target", target)
    num_groups = _check_groups(groups, num_groups)
    true_positives = _group_counts((preds == 1) & (target == 1), groups, num_groups)
    actual_positives = _group_counts(target == 1, groups, num_groups)
    return true_positives, actual_positives


def _group_accuracy_update(
    preds: Tensor, target: Tensor, groups: Tensor, num_groups: Optional[int] = None
) -> tuple[Tensor, Tensor]:
    """Per-group ``(correct, examples)``, each ``[num_groups]`` int64. Labels may be multiclass."""
    _check_same_shape(preds=preds, target=target, groups=groups)
    _check_labels("preds", preds)
    _check_labels("target", target)
    num_groups = _check_groups(groups, num_groups)
    correct = _group_counts(preds == target, groups, num_groups)
    examples = _group_counts(torch.ones_like(groups, dtype=torch.bool), groups, num_groups)
    return correct, examples


def _group_rate_compute(numerator: Tensor, denominator: Tensor) -> Tensor:
    """Per-group rate ``numerator / denominator`` (float), ``nan`` where the denominator is 0."""
    num, den = numerator.double(), denominator.double()
    rate = num / den.clamp(min=1)
    return torch.where(den > 0, rate, torch.full_like(rate, float("nan"))).float()


def _rate_difference_compute(numerator: Tensor, denominator: Tensor) -> Tensor:
    """``max - min`` of the per-group rates over groups with a non-zero denominator (``nan`` if there are none)."""
    rates = _group_rate_compute(numerator, denominator)
    rates = rates[denominator > 0]
    if rates.numel() == 0:
        return torch.tensor(float("nan"), device=numerator.device)
    return rates.max() - rates.min()


def _worst_group_compute(correct: Tensor, examples: Tensor) -> Tensor:
    """Smallest per-group accuracy over groups with examples (``nan`` if there are none)."""
    accuracies = _group_rate_compute(correct, examples)[examples > 0]
    if accuracies.numel() == 0:
        return torch.tensor(float("nan"), device=correct.device)
    return accuracies.min()


def demographic_parity_difference(preds: Tensor, groups: Tensor, num_groups: Optional[int] = None) -> Tensor:
    """Largest minus smallest positive-prediction rate ``P(pred = 1 | group)`` over groups.

    Same value as ``fairlearn.metrics.demographic_parity_difference``. Groups with no examples are left out;
    0 means parity.

    Args:
        preds: ``[N]`` binary 0/1 predictions.
        groups: ``[N]`` integer group ids ``0 .. num_groups - 1``.
        num_groups: Number of groups; ``groups.max() + 1`` when ``None``.

    Returns:
        Scalar float tensor in ``[0, 1]`` (``nan`` when there are no examples).

    Raises:
        ValueError: On shape mismatch, non-binary ``preds``, or negative / too large group ids.

    Example:
        >>> preds = torch.tensor([1, 1, 0, 1, 0, 0])
        >>> groups = torch.tensor([0, 0, 0, 1, 1, 1])
        >>> demographic_parity_difference(preds, groups)
        tensor(0.3333)
    """
    return _rate_difference_compute(*_demographic_parity_update(preds, groups, num_groups))


def equal_opportunity_difference(
    preds: Tensor, target: Tensor, groups: Tensor, num_groups: Optional[int] = None
) -> Tensor:
    """Largest minus smallest true-positive rate ``P(pred = 1 | target = 1, group)`` over groups.

    Same value as ``fairlearn.metrics.equal_opportunity_difference``. Groups with no positive targets are
    left out.

    Args:
        preds: ``[N]`` binary 0/1 predictions.
        target: ``[N]`` binary 0/1 labels.
        groups: ``[N]`` integer group ids ``0 .. num_groups - 1``.
        num_groups: Number of groups; ``groups.max() + 1`` when ``None``.

    Returns:
        Scalar float tensor in ``[0, 1]`` (``nan`` when no group has a positive target).

    Raises:
        ValueError: On shape mismatch, non-binary ``preds``/``target``, or negative / too large group ids.

    Example:
        >>> preds = torch.tensor([1, 1, 0, 1, 0, 0])
        >>> target = torch.tensor([1, 1, 1, 1, 1, 0])
        >>> groups = torch.tensor([0, 0, 0, 1, 1, 1])
        >>> equal_opportunity_difference(preds, target, groups)
        tensor(0.1667)
    """
    return _rate_difference_compute(*_equal_opportunity_update(preds, target, groups, num_groups))


def group_accuracies(
    preds: Tensor, target: Tensor, groups: Tensor, num_groups: Optional[int] = None
) -> Tensor:
    """Accuracy within each group.

    Args:
        preds: ``[N]`` integer predicted labels (binary or multiclass).
        target: ``[N]`` integer true labels.
        groups: ``[N]`` integer group ids ``0 .. num_groups - 1``.
        num_groups: Number of groups; ``groups.max() + 1`` when ``None``.

    Returns:
        ``[num_groups]`` float tensor; ``nan`` for groups without examples.

    Raises:
        ValueError: On shape mismatch, float labels, or negative / too large group ids.

    Example:
        >>> preds = torch.tensor([1, 2, 0, 1, 0, 0])
        >>> target = torch.tensor([1, 2, 2, 1, 1, 0])
        >>> groups = torch.tensor([0, 0, 0, 2, 2, 2])
        >>> group_accuracies(preds, target, groups)
        tensor([0.6667,    nan, 0.6667])
    """
    return _group_rate_compute(*_group_accuracy_update(preds, target, groups, num_groups))


def worst_group_accuracy(
    preds: Tensor, target: Tensor, groups: Tensor, num_groups: Optional[int] = None
) -> Tensor:
    """Smallest accuracy over groups that have examples.

    Args:
        preds: ``[N]`` integer predicted labels (binary or multiclass).
        target: ``[N]`` integer true labels.
        groups: ``[N]`` integer group ids ``0 .. num_groups - 1``.
        num_groups: Number of groups; ``groups.max() + 1`` when ``None``.

    Returns:
        Scalar float tensor (``nan`` when there are no examples).

    Raises:
        ValueError: On shape mismatch, float labels, or negative / too large group ids.

    Example:
        >>> preds = torch.tensor([1, 1, 0, 1, 0, 0])
        >>> target = torch.tensor([1, 1, 0, 1, 1, 1])
        >>> groups = torch.tensor([0, 0, 0, 1, 1, 1])
        >>> worst_group_accuracy(preds, target, groups)
        tensor(0.3333)
    """
    return _worst_group_compute(*_group_accuracy_update(preds, target, groups, num_groups))


# --------------------------------------------------------------------------------------------------------------
# Counterfactual flips
# --------------------------------------------------------------------------------------------------------------


def _flip_rate_update(preds: Tensor, cf_preds: Tensor) -> tuple[Tensor, Tensor]:
    """``(flips, examples)`` as int64 scalars: how many predictions changed under the counterfactual."""
    _check_same_shape(preds=preds, cf_preds=cf_preds)
    if preds.is_floating_point() or cf_preds.is_floating_point():
        raise ValueError(
            f"Expected integer predicted labels for `preds` and `cf_preds`, but got dtypes {preds.dtype} and "
            f"{cf_preds.dtype}. Take the argmax of the logits first, e.g. `logits.argmax(-1)`."
        )
    flips = (preds != cf_preds).sum()
    return flips, torch.tensor(preds.numel(), device=preds.device)


def _flip_rate_compute(flips: Tensor, examples: Tensor) -> Tensor:
    """``flips / examples`` (``nan`` when there are no examples)."""
    if int(examples) == 0:
        return torch.tensor(float("nan"), device=flips.device)
    return flips.float() / examples.float()


def counterfactual_flip_rate(preds: Tensor, cf_preds: Tensor) -> Tensor:
    """Fraction of examples whose predicted label changes on the counterfactual input.

    Args:
        preds: ``[N]`` integer predicted labels on the original inputs.
        cf_preds: ``[N]`` integer predicted labels on the counterfactual inputs.

    Returns:
        Scalar float tensor in ``[0, 1]`` (``nan`` for empty input).

    Raises:
        ValueError: On shape mismatch or float inputs.

    Example:
        >>> counterfactual_flip_rate(torch.tensor([0, 1, 1, 2]), torch.tensor([0, 0, 1, 1]))
        tensor(0.5000)
    """
    return _flip_rate_compute(*_flip_rate_update(preds, cf_preds))
