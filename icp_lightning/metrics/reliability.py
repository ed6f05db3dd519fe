"""``ReliabilityMetrics``: every reliability metric of one evaluation set, fed from logits in one call."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import MeanMetric, Metric
from torchmetrics.classification import MulticlassAccuracy

from icp_lightning.metrics.classes import (
    CounterfactualFlipRate,
    DemographicParityDifference,
    EqualOpportunityDifference,
    ExpectedCalibrationError,
    GroupAccuracy,
)
from icp_lightning.metrics.functional import _check_groups, _check_labels, _check_same_shape

__all__ = ["ReliabilityMetrics"]


class ReliabilityMetrics(torch.nn.Module):
    """Accuracy, calibration, NLL, group fairness and counterfactual flips for one named evaluation set.

    A ``LightningModule`` keeps one per dataloader (e.g. ``"id"``, ``"ood"``) as a submodule, so the metric
    states follow the model's device, calls :meth:`update` in each step, and logs
    ``f"{split}/{name}/{key}"`` for each entry of :meth:`compute` at the end of the epoch. Every state is a
    fixed-size sum, and each metric syncs across processes inside its own ``compute()``, so under DDP all ranks
    get the value on the whole set.

    Keys returned by :meth:`compute`:

    - always: ``acc`` (top-1), ``ece`` (top-label, L1, ``n_bins`` bins), ``nll`` (mean cross-entropy);
    - with ``num_groups``: ``dp_diff`` and ``eo_diff`` (max - min over groups of the rate of predicting, and of
      recalling, ``positive_class``), ``worst_group_acc``, and ``group_acc/<g>`` for every group ``g``;
    - with ``counterfactual=True``: ``flip_rate`` (share of argmax predictions changed by the counterfactual).

    Args:
        num_classes: Number of classes ``C`` (columns of the logits), at least 2.
        num_groups: Number of groups; when given, :meth:`update` needs ``groups``.
        counterfactual: Whether to track the flip rate; when ``True``, :meth:`update` needs ``cf_logits``.
        n_bins: Number of equal-width calibration bins.
        positive_class: The class treated as "positive" by ``dp_diff`` and ``eo_diff``.

    Raises:
        ValueError: If an argument is out of range.

    Example:
        >>> metrics = ReliabilityMetrics(num_classes=2, num_groups=2, counterfactual=True)
        >>> logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [0.0, 1.0], [1.0, 0.0]])
        >>> metrics.update(logits, torch.tensor([0, 1, 0, 0]), groups=torch.tensor([0, 0, 1, 1]),
        ...                cf_logits=logits.roll(1, dims=0))
        >>> {key: round(float(value), 4) for key, value in metrics.compute().items()}  # doctest: +NORMALIZE_WHITESPACE
        {'acc': 0.75, 'ece': 0.1751, 'nll': 0.4701, 'dp_diff': 0.0, 'eo_diff': 0.0, 'worst_group_acc': 0.5,
         'group_acc/0': 1.0, 'group_acc/1': 0.5, 'flip_rate': 0.5}
    """

    def __init__(
        self,
        num_classes: int,
        num_groups: Optional[int] = None,
        counterfactual: bool = False,
        n_bins: int = 15,
        positive_class: int = 1,
    ) -> None:
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"Expected `num_classes` to be an integer >= 2, but got {num_classes!r}.")
        if num_groups is not None and (not isinstance(num_groups, int) or num_groups < 1):
            raise ValueError(
                f"Expected `num_groups` to be None or a positive integer, but got {num_groups!r}."
            )
        if not 0 <= positive_class < num_classes:
            raise ValueError(
                f"Expected `positive_class` in 0..{num_classes - 1} (num_classes={num_classes}), "
                f"but got {positive_class!r}."
            )
        self.num_classes = num_classes
        self.num_groups = num_groups
        self.counterfactual = counterfactual
        self.positive_class = positive_class
        metrics: dict[str, Metric] = {
            "acc": MulticlassAccuracy(num_classes=num_classes, average="micro"),
            "ece": ExpectedCalibrationError(n_bins=n_bins),
            "nll": MeanMetric(),
        }
        if num_groups is not None:
            metrics["dp_diff"] = DemographicParityDifference(num_groups)
            metrics["eo_diff"] = EqualOpportunityDifference(num_groups)
            metrics["group_acc"] = GroupAccuracy(num_groups)
        if counterfactual:
            metrics["flip_rate"] = CounterfactualFlipRate()
        self.metrics = torch.nn.ModuleDict(metrics)

    def __getitem__(self, name: str) -> Metric:
        """The underlying metric stored under ``name`` (``"acc"``, ``"ece"``, ``"nll"``, ``"dp_diff"``, ...)."""
        metric = self.metrics[name]
        assert isinstance(metric, Metric)
        return metric

    @torch.no_grad()
    def update(
        self,
        logits: Tensor,
        target: Tensor,
        groups: Optional[Tensor] = None,
        cf_logits: Optional[Tensor] = None,
    ) -> None:
        """Add one batch.

        Args:
            logits: ``[N, C]`` class scores.
            target: ``[N]`` integer labels.
            groups: ``[N]`` integer group ids; required when ``num_groups`` was given, ignored otherwise.
            cf_logits: ``[N, C]`` class scores on the counterfactual inputs; required when
                ``counterfactual=True``, ignored otherwise.

        Raises:
            ValueError: On wrong shapes, or when ``groups`` / ``cf_logits`` are missing but required.
        """
        if logits.ndim != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(
                f"Expected `logits` of shape [N, {self.num_classes}], but got {tuple(logits.shape)}."
            )
        if target.shape != logits.shape[:1] or target.is_floating_point():
            raise ValueError(
                f"Expected an integer `target` of shape [{logits.shape[0]}] to match `logits` "
                f"{tuple(logits.shape)}, but got shape {tuple(target.shape)} and dtype {target.dtype}."
            )
        _check_labels("target", target)
        if target.numel() and int(target.max()) >= self.num_classes:
            raise ValueError(
                f"Found target class {int(target.max())}, but this ReliabilityMetrics has {self.num_classes} classes."
            )
        if self.num_groups is not None:
            if groups is None:
                raise ValueError(
                    f"This ReliabilityMetrics tracks {self.num_groups} groups: pass `groups` ([N] group ids) to "
                    "`update`, or build it with `num_groups=None`."
                )
            _check_same_shape(target=target, groups=groups)
            _check_groups(groups, self.num_groups)
        if self.counterfactual:
            if cf_logits is None:
                raise ValueError(
                    "This ReliabilityMetrics tracks the counterfactual flip rate: pass `cf_logits` ([N, C] logits "
                    "on the counterfactual inputs) to `update`, or build it with `counterfactual=False`."
                )
            if cf_logits.shape != logits.shape:
                raise ValueError(
                    f"Expected `cf_logits` of the same shape as `logits` {tuple(logits.shape)}, but got "
                    f"{tuple(cf_logits.shape)}."
                )
        # every input is checked above, so a bad batch leaves all states untouched
        logits = logits.detach().float()
        preds = logits.argmax(dim=-1)
        self["acc"].update(preds, target)
        self["ece"].update(logits.softmax(dim=-1), target)
        self["nll"].update(F.cross_entropy(logits, target.long(), reduction="none"))
        if self.num_groups is not None and groups is not None:
            pred_pos = (preds == self.positive_class).long()
            self["dp_diff"].update(pred_pos, groups)
            self["eo_diff"].update(pred_pos, (target == self.positive_class).long(), groups)
            self["group_acc"].update(preds, target, groups)
        if self.counterfactual and cf_logits is not None:
            self["flip_rate"].update(preds, cf_logits.detach().argmax(dim=-1))

    def compute(self) -> dict[str, Tensor]:
        """All values on everything seen since the last :meth:`reset`, as a flat ``{key: scalar tensor}`` dict."""
        out: dict[str, Tensor] = {}
        for name in self.metrics:
            value = self[name].compute()
            if name == "group_acc":
                seen = value[~value.isnan()]
                out["worst_group_acc"] = seen.min() if seen.numel() else value.new_tensor(float("nan"))
                out.update({f"group_acc/{g}": value[g] for g in range(value.shape[0])})
            else:
                out[name] = value
        return out

    def reset(self) -> None:
        """Clear every state, e.g. at the start of an evaluation epoch."""
        for name in self.metrics:
            self[name].reset()
