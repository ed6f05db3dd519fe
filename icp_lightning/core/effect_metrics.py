"""The metrics m whose change under an intervention is a causal effect.

A per-example metric is ``m(outputs, batch) -> Tensor[batch]``. A metric defined over a whole batch (a gap
between groups) is a :class:`BatchMetric`: ``m(outputs, batch) -> scalar``; the engine evaluates it once per
intervened feature on the whole batch, weighted by the batch size.

Example:
    >>> import torch
    >>> from types import SimpleNamespace
    >>> out = SimpleNamespace(logits=torch.tensor([[2.0, 0.0], [0.0, 1.0]]))
    >>> batch = {"labels": torch.tensor([0, 0])}
    >>> resolve_metric("accuracy")(out, batch)
    tensor([1., 0.])
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

MetricFn = Callable[[Any, Mapping[str, Any]], torch.Tensor]


class BatchMetric:
    """Wraps a metric defined over a whole batch, e.g. a fairness gap between ``batch["group"]`` values.

    Example:
        >>> gap = BatchMetric(lambda out, batch: out.logits[:, 1].mean(), name="mean_logit")
        >>> gap.name
        'mean_logit'
    """

    per_batch = True

    def __init__(self, fn: Callable[[Any, Mapping[str, Any]], torch.Tensor], name: str | None = None) -> None:
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "batch_metric")

    def __call__(self, outputs: Any, batch: Mapping[str, Any]) -> torch.Tensor:
        return self.fn(outputs, batch)


def _logits(outputs: Any) -> torch.Tensor:
    logits = outputs.logits if hasattr(outputs, "logits") else outputs
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"metric expects model outputs with .logits, got {type(outputs).__name__}")
    return logits.float()


def _labels(batch: Mapping[str, Any]) -> torch.Tensor:
    if "labels" not in batch:
        raise KeyError(f"the metric needs batch['labels']; the batch has keys {sorted(batch)}")
    return batch["labels"]


def label_logprob(outputs: Any, batch: Mapping[str, Any]) -> torch.Tensor:
    """log p(y | x) of the gold label (classification)."""
    logp = F.log_softmax(_logits(outputs), dim=-1)
    return logp.gather(-1, _labels(batch).long().unsqueeze(-1)).squeeze(-1)


def label_prob(outputs: Any, batch: Mapping[str, Any]) -> torch.Tensor:
    """p(y | x) of the gold label."""
    return label_logprob(outputs, batch).exp()


def accuracy(outputs: Any, batch: Mapping[str, Any]) -> torch.Tensor:
    """1 where the arg-max class is the label, else 0."""
    return (_logits(outputs).argmax(-1) == _labels(batch)).float()


def neg_loss(outputs: Any, batch: Mapping[str, Any]) -> torch.Tensor:
    """Minus the cross-entropy loss (equals ``label_logprob`` for classification; kept for readability)."""
    return -F.cross_entropy(_logits(outputs), _labels(batch).long(), reduction="none")


def margin(outputs: Any, batch: Mapping[str, Any]) -> torch.Tensor:
    """Gold logit minus the largest other logit."""
    logits = _logits(outputs)
    y = _labels(batch).long()
    gold = logits.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    other = logits.scatter(-1, y.unsqueeze(-1), float("-inf")).amax(-1)
    return gold - other


def target_logprob(outputs: Any, batch: Mapping[str, Any]) -> torch.Tensor:
    """Sum of log-probs of the label tokens that are not -100 (causal LMs: shifted by one; seq2seq: aligned)."""
    logits = _logits(outputs)
    labels = _labels(batch).long()
    seq2seq = getattr(outputs, "encoder_last_hidden_state", None) is not None
    if not seq2seq:
        logits, labels = logits[:, :-1], labels[:, 1:]
    keep = labels != -100
    logp = F.log_softmax(logits, dim=-1).gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return (logp * keep).sum(-1)


METRICS: dict[str, MetricFn] = {
    "label_logprob": label_logprob,
    "label_prob": label_prob,
    "accuracy": accuracy,
    "neg_loss": neg_loss,
    "margin": margin,
    "target_logprob": target_logprob,
}


def resolve_metric(metric: str | MetricFn) -> MetricFn:
    """A built-in metric by name, or the callable itself."""
    if callable(metric):
        return metric
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; built-ins are {sorted(METRICS)}, or pass a callable")
    return METRICS[metric]


def metric_name(metric: str | MetricFn) -> str:
    """A printable name for a metric."""
    if isinstance(metric, str):
        return metric
    return str(getattr(metric, "name", getattr(metric, "__name__", type(metric).__name__)))


def is_batch_metric(metric: MetricFn) -> bool:
    """Whether the metric is defined over a whole batch."""
    return bool(getattr(metric, "per_batch", False))
