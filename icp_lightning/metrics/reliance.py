"""Feature reliance: how much a model's predictions depend on features (tokens, pruned units) that are removed.

For each example the model is run twice, on ``x`` and on ``x`` with the features removed (discovered tokens
deleted from the input, pruned heads or neurons masked). The metric gives, over an evaluation set:

- ``changed``: the share of examples whose predicted class changes;
- ``prob_change``: the mean of ``p(y | x) - p(y | x without them)``, the probability of the true label lost when
  the features go (positive: the model used them to support the label; negative: they hurt it);
- ``abs_prob_change``: the mean absolute change of that probability.

A model that no longer relies on a shortcut scores near 0 on all three, on every evaluation set.

The maths lives once in :func:`_reliance_update` / :func:`_reliance_compute`; :class:`FeatureReliance` keeps
three scalar sums (``dist_reduce_fx="sum"``), so batches and DDP processes merge exactly.

Example:
    >>> import torch
    >>> full = torch.tensor([[2.0, 0.0], [0.0, 2.0], [0.0, 1.0]])
    >>> removed = torch.tensor([[0.0, 2.0], [0.0, 2.0], [0.0, 1.0]])
    >>> out = feature_reliance(full, removed, torch.tensor([0, 1, 1]))
    >>> round(float(out["changed"]), 4), round(float(out["prob_change"]), 4)
    (0.3333, 0.2539)
"""

from __future__ import annotations

from torch import Tensor
from torchmetrics import Metric

__all__ = ["FeatureReliance", "feature_reliance"]


def _reliance_update(
    logits: Tensor, removed_logits: Tensor, labels: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Sums over a batch: predictions changed, label-probability change, its absolute value, examples."""
    if logits.shape != removed_logits.shape or logits.ndim != 2:
        raise ValueError(
            f"logits and removed_logits must both be [N, C], got {tuple(logits.shape)} and "
            f"{tuple(removed_logits.shape)}"
        )
    if labels.shape != logits.shape[:1] or labels.is_floating_point():
        raise ValueError(
            f"labels must be [N] integer class ids, got shape {tuple(labels.shape)}, {labels.dtype}"
        )
    changed = (logits.argmax(-1) != removed_logits.argmax(-1)).sum()
    idx = labels.long().unsqueeze(-1)
    p = logits.float().softmax(-1).gather(-1, idx).squeeze(-1)
    q = removed_logits.float().softmax(-1).gather(-1, idx).squeeze(-1)
    delta = p - q
    return changed.float(), delta.sum(), delta.abs().sum(), labels.new_tensor(labels.numel()).float()


def _reliance_compute(changed: Tensor, delta: Tensor, abs_delta: Tensor, total: Tensor) -> dict[str, Tensor]:
    return {"changed": changed / total, "prob_change": delta / total, "abs_prob_change": abs_delta / total}


def feature_reliance(logits: Tensor, removed_logits: Tensor, labels: Tensor) -> dict[str, Tensor]:
    """Share of predictions that change, and mean change of the label's probability, when features are removed.

    Args:
        logits: ``[N, C]`` on the inputs as they are.
        removed_logits: ``[N, C]`` on the same inputs with the features removed.
        labels: ``[N]`` true class ids.

    Returns:
        ``{"changed", "prob_change", "abs_prob_change"}`` scalar tensors (``nan`` for no examples).

    Raises:
        ValueError: shapes that do not match, or float labels.
    """
    return _reliance_compute(*_reliance_update(logits, removed_logits, labels))


class FeatureReliance(Metric):
    """:func:`feature_reliance` accumulated over batches (three scalar sum states, merged by a sum under DDP).

    Example:
        >>> import torch
        >>> metric = FeatureReliance()
        >>> metric.update(torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 2.0]]), torch.tensor([0]))
        >>> metric.update(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.0, 1.0]]), torch.tensor([1]))
        >>> {k: round(float(v), 4) for k, v in metric.compute().items()}
        {'changed': 0.5, 'prob_change': 0.3808, 'abs_prob_change': 0.3808}
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False
    changed: Tensor
    delta: Tensor
    abs_delta: Tensor
    total: Tensor

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        for name in ("changed", "delta", "abs_delta", "total"):
            self.add_state(name, default=_zero(), dist_reduce_fx="sum")

    def update(self, logits: Tensor, removed_logits: Tensor, labels: Tensor) -> None:  # type: ignore[override]
        """Add a batch: logits on ``x`` and on ``x`` with the features removed, and the labels."""
        changed, delta, abs_delta, total = _reliance_update(logits, removed_logits, labels)
        self.changed += changed.to(self.changed.device)
        self.delta += delta.to(self.delta.device)
        self.abs_delta += abs_delta.to(self.abs_delta.device)
        self.total += total.to(self.total.device)

    def compute(self) -> dict[str, Tensor]:  # type: ignore[override]
        """``{"changed", "prob_change", "abs_prob_change"}`` over everything seen."""
        return _reliance_compute(self.changed, self.delta, self.abs_delta, self.total)


def _zero() -> Tensor:
    import torch

    return torch.tensor(0.0)
