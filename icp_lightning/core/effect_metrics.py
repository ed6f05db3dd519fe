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


def check_class_labels(labels: torch.Tensor, num_labels: int) -> None:
    """Raise a ValueError naming ``num_labels`` unless every label is an index in ``[0, num_labels)``.

    Example:
        >>> check_class_labels(torch.tensor([0, 3]), 2)
        Traceback (most recent call last):
        ...
        ValueError: labels must be class indices in [0, num_labels=2); got labels [3]: give the model num_labels covering every label (ICPContrastiveModule(num_labels=...) / config.num_labels), or map the data's labels to 0 .. num_labels - 1
    """
    bad = labels[(labels < 0) | (labels >= num_labels)] if labels.numel() else labels
    if bad.numel():
        raise ValueError(
            f"labels must be class indices in [0, num_labels={num_labels}); got labels "
            f"{sorted({int(v) for v in bad.tolist()})}: give the model num_labels covering every label "
            "(ICPContrastiveModule(num_labels=...) / config.num_labels), or map the data's labels to "
            "0 .. num_labels - 1"
        )


def _class_inputs(outputs: Any, batch: Mapping[str, Any], name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits [batch, num_labels], labels [batch])`` of a classifier, or a ValueError naming the fix."""
    logits, labels = _logits(outputs), _labels(batch)
    if logits.ndim != 2 or labels.ndim != 1:
        raise ValueError(
            f"metric {name!r} is for classifiers (logits [batch, num_labels], labels [batch]); this model gives "
            f"logits {list(logits.shape)} and labels {list(labels.shape)}: for causal LMs and seq2seq models "
            "use metric='target_logprob' (log-probability of the label tokens)"
        )
    check_class_labels(labels, logits.shape[-1])
    return logits, labels.long()


def label_logprob(outputs: Any, batch: Mapping[str, Any]) -> torch.Tensor:
    """log p(y | x) of the gold label (classification)."""
    logits, labels = _class_inputs(outputs, batch, "label_logprob")
    return F.log_softmax(logits, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def label_prob(outputs: Any, batch: Mapping[str, Any]) -> torch.Tensor:
    """p(y | x) of the gold label."""
    return label_logprob(outputs, batch).exp()


def accuracy(outputs: Any, batch: Mapping[str, Any]) -> torch.Tensor:
    """1 where the arg-max class is the label, else 0."""
    logits, labels = _class_inputs(outputs, batch, "accuracy")
    return (logits.argmax(-1) == labels).float()


def neg_loss(outputs: Any, batch: Mapping[str, Any]) -> torch.Tensor:
    """Minus the cross-entropy loss (equals ``label_logprob`` for classification; kept for readability)."""
    logits, labels = _class_inputs(outputs, batch, "neg_loss")
    return -F.cross_entropy(logits, labels, reduction="none")


def margin(outputs: Any, batch: Mapping[str, Any]) -> torch.Tensor:
    """Gold logit minus the largest other logit."""
    logits, y = _class_inputs(outputs, batch, "margin")
    gold = logits.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    other = logits.scatter(-1, y.unsqueeze(-1), float("-inf")).amax(-1)
    return gold - other


def target_logprob(outputs: Any, batch: Mapping[str, Any]) -> torch.Tensor:
    """Sum of log-probs of the label tokens that are not -100 (causal LMs: shifted by one; seq2seq: aligned)."""
    logits = _logits(outputs)
    labels = _labels(batch).long()
    if logits.ndim != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"metric 'target_logprob' is for language models (logits [batch, seq, vocab], labels [batch, seq] "
            f"with -100 on ignored tokens); this model gives logits {list(logits.shape)} and labels "
            f"{list(labels.shape)}: for classifiers use metric='label_logprob'"
        )
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


def check_metric_values(values: Any, name: str, n: int, per_batch: bool) -> torch.Tensor:
    """The metric's values as a tensor, or a ValueError when their shape or finiteness is wrong.

    A per-example metric must return ``[n]`` finite values (one per example of the batch), a batch metric a
    finite scalar. The causal-effect engine calls this on the first batch before any long computation, so
    ``method="exact"`` and ``"gradient"`` refuse the same metrics.

    Example:
        >>> check_metric_values(torch.tensor([0.5, float("nan")]), "mine", 2, False)
        Traceback (most recent call last):
        ...
        ValueError: metric 'mine' returned 1 non-finite values (NaN or inf) of 2 on this batch: check the metric and the model's outputs (NaN weights or inputs give NaN effects)
    """
    if not isinstance(values, torch.Tensor):
        raise ValueError(f"metric {name!r} must return a tensor, got {type(values).__name__}")
    expected = () if per_batch else (n,)
    if tuple(values.shape) != expected:
        kind = "a scalar (a BatchMetric)" if per_batch else f"one value per example, shape [{n}]"
        raise ValueError(
            f"metric {name!r} returned shape {list(values.shape)}, expected {kind}: for causal LMs and seq2seq "
            "models use metric='target_logprob', for classifiers 'label_logprob'; a metric over the whole batch "
            "must be wrapped in BatchMetric"
        )
    bad = int((~torch.isfinite(values.detach())).sum())
    if bad:
        raise ValueError(
            f"metric {name!r} returned {bad} non-finite values (NaN or inf) of {values.numel()} on this batch: "
            "check the metric and the model's outputs (NaN weights or inputs give NaN effects)"
        )
    return values


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
