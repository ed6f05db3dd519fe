"""Question-answering reliability: hallucination rate, Brier score, temperature scaling, answer matching.

What torchmetrics already has is used as is: ``BinaryCalibrationError`` (ECE, 15 equal-width bins, L1) and
``BinaryAUROC`` (of the confidence for correctness: how well confidence ranks right above wrong answers, the
quality of selective prediction). This module adds only what it lacks:

- **hallucination rate** at a stated confidence threshold ``tau``: among the answers given with confidence
  ``> tau`` (*confident* answers), the share that are wrong. When a question has no supported answer (BoolQ
  with an *irrelevant* passage, from another article), every confident answer is a hallucination: the
  **unsupported confident rate** is the share of such questions answered with confidence ``> tau``;
- the **Brier score** of the confidence for correctness, ``mean (confidence - correct)^2`` (for a yes/no answer
  this equals the binary Brier score of ``p(yes)`` against the label);
- **temperature scaling** (:func:`fit_temperature`): the one-parameter calibration map any practitioner fits on
  a validation split;
- SQuAD-style answer normalisation, exact match and contains-answer for generated short answers (NQ-open).

Confidence of a yes/no answer: ``max(p, 1 - p)`` with ``p = softmax(logit_yes, logit_no)[0]`` (the two answer
tokens renormalised); of a generated answer: the probability of the greedy tokens (their product).

Metric classes keep scalar sum states (``dist_reduce_fx="sum"``), so they merge exactly across batches and
processes. Pure torch + torchmetrics: no lightning.

Example:
    >>> conf = torch.tensor([0.9, 0.8, 0.6, 0.95])
    >>> correct = torch.tensor([1, 0, 1, 1])
    >>> out = qa_reliability(conf, correct, threshold=0.75)
    >>> round(out["hallucination"], 4), round(out["confident_share"], 4), round(out["accuracy"], 4)
    (0.3333, 0.75, 0.75)
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.functional.classification import binary_auroc, binary_calibration_error

__all__ = [
    "BrierScore",
    "HallucinationRate",
    "UnsupportedConfidentRate",
    "brier_score",
    "calibrated_ece",
    "contains_answer",
    "exact_match",
    "fit_temperature",
    "hallucination_rate",
    "normalize_answer",
    "qa_reliability",
    "unsupported_confident_rate",
    "yes_no_confidence",
]

#: The default confidence threshold of the hallucination rate.
DEFAULT_THRESHOLD = 0.75


def _check_threshold(threshold: float) -> float:
    if not 0.0 <= float(threshold) < 1.0:
        raise ValueError(f"Expected `threshold` in [0, 1), but got {threshold!r}.")
    return float(threshold)


def _check_pair(confidence: Tensor, correct: Tensor) -> tuple[Tensor, Tensor]:
    confidence, correct = torch.as_tensor(confidence), torch.as_tensor(correct)
    if confidence.shape != correct.shape or confidence.ndim != 1:
        raise ValueError(
            f"Expected `confidence` and `correct` of the same shape [N], but got {tuple(confidence.shape)} and "
            f"{tuple(correct.shape)}."
        )
    if confidence.numel() and (confidence.min() < 0 or confidence.max() > 1):
        raise ValueError("Expected `confidence` in [0, 1] (probabilities); apply a softmax or sigmoid first.")
    return confidence.double(), correct.bool()


def yes_no_confidence(logit_yes: Tensor, logit_no: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(p_yes, answer_yes, confidence)`` from the logits of the two answer tokens.

    ``p_yes = softmax([logit_yes, logit_no])[0]``, the answer is yes when ``p_yes > 0.5`` (a tie says no) and the
    confidence is ``max(p_yes, 1 - p_yes)``.

    Example:
        >>> p, yes, conf = yes_no_confidence(torch.tensor([2.0, -1.0]), torch.tensor([0.0, 0.0]))
        >>> yes.tolist(), [round(c, 4) for c in conf.tolist()]
        ([True, False], [0.8808, 0.7311])
    """
    p_yes = torch.sigmoid(logit_yes.double() - logit_no.double())
    return p_yes, p_yes > 0.5, torch.maximum(p_yes, 1 - p_yes)


def _hallucination_update(confidence: Tensor, correct: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
    confident = confidence > threshold
    return confident.sum(), (confident & ~correct).sum()


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    return num.double() / den.double() if den > 0 else torch.tensor(math.nan, dtype=torch.float64)


def hallucination_rate(confidence: Tensor, correct: Tensor, threshold: float = DEFAULT_THRESHOLD) -> Tensor:
    """Share of wrong answers among the answers given with confidence ``> threshold`` (NaN when there are none).

    Args:
        confidence: ``[N]`` confidences in [0, 1].
        correct: ``[N]`` whether each answer is right (bool or 0/1).
        threshold: the confidence above which an answer counts as confident.

    Example:
        >>> float(hallucination_rate(torch.tensor([0.9, 0.9, 0.6]), torch.tensor([1, 0, 0]), 0.75))
        0.5
    """
    confidence, correct = _check_pair(confidence, correct)
    n_confident, n_wrong = _hallucination_update(confidence, correct, _check_threshold(threshold))
    return _ratio(n_wrong, n_confident)


def unsupported_confident_rate(confidence: Tensor, threshold: float = DEFAULT_THRESHOLD) -> Tensor:
    """Share of answers given with confidence ``> threshold`` where no answer is supported (every one of them a
    hallucination), e.g. BoolQ questions paired with another article's passage.

    Example:
        >>> float(unsupported_confident_rate(torch.tensor([0.9, 0.7, 0.8, 0.5]), 0.75))
        0.5
    """
    confidence = torch.as_tensor(confidence).double()
    if confidence.ndim != 1:
        raise ValueError(f"Expected `confidence` of shape [N], but got {tuple(confidence.shape)}.")
    confident = confidence > _check_threshold(threshold)
    return _ratio(confident.sum(), torch.tensor(confidence.numel()))


def brier_score(confidence: Tensor, correct: Tensor) -> Tensor:
    """Mean squared difference between confidence and correctness (0: perfect; lower is better).

    Example:
        >>> round(float(brier_score(torch.tensor([0.9, 0.6]), torch.tensor([1, 0]))), 4)
        0.185
    """
    confidence, correct = _check_pair(confidence, correct)
    return ((confidence - correct.double()) ** 2).mean() if confidence.numel() else torch.tensor(math.nan)


class HallucinationRate(Metric):
    """:func:`hallucination_rate` as a ``torchmetrics.Metric`` with two scalar sum states.

    Args:
        threshold: the confidence above which an answer counts as confident.
        kwargs: passed to ``torchmetrics.Metric``.

    Example:
        >>> metric = HallucinationRate(threshold=0.75)
        >>> metric.update(torch.tensor([0.9, 0.6]), torch.tensor([0, 0]))
        >>> metric.update(torch.tensor([0.8]), torch.tensor([1]))
        >>> float(metric.compute())
        0.5
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False
    confident: Tensor
    confident_wrong: Tensor

    def __init__(self, threshold: float = DEFAULT_THRESHOLD, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.threshold = _check_threshold(threshold)
        self.add_state("confident", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("confident_wrong", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, confidence: Tensor, correct: Tensor) -> None:
        """Add a batch of confidences and correctness flags."""
        confidence, correct = _check_pair(confidence, correct)
        n_confident, n_wrong = _hallucination_update(confidence, correct, self.threshold)
        self.confident += n_confident.to(self.confident.device)
        self.confident_wrong += n_wrong.to(self.confident.device)

    def compute(self) -> Tensor:
        """The share of wrong answers among the confident ones (NaN when none is confident)."""
        return _ratio(self.confident_wrong, self.confident)


class UnsupportedConfidentRate(Metric):
    """:func:`unsupported_confident_rate` as a ``torchmetrics.Metric`` with two scalar sum states.

    Example:
        >>> metric = UnsupportedConfidentRate(threshold=0.75)
        >>> metric.update(torch.tensor([0.9, 0.6, 0.8, 0.7]))
        >>> float(metric.compute())
        0.5
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False
    confident: Tensor
    total: Tensor

    def __init__(self, threshold: float = DEFAULT_THRESHOLD, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.threshold = _check_threshold(threshold)
        self.add_state("confident", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, confidence: Tensor) -> None:
        """Add a batch of confidences (of questions without a supported answer)."""
        confidence = torch.as_tensor(confidence)
        self.confident += (confidence > self.threshold).sum().to(self.confident.device)
        self.total += confidence.numel()

    def compute(self) -> Tensor:
        """The share of confident answers."""
        return _ratio(self.confident, self.total)


class BrierScore(Metric):
    """:func:`brier_score` as a ``torchmetrics.Metric`` (a sum of squared errors and a count).

    Example:
        >>> metric = BrierScore()
        >>> metric.update(torch.tensor([0.9]), torch.tensor([1]))
        >>> metric.update(torch.tensor([0.6]), torch.tensor([0]))
        >>> round(float(metric.compute()), 4)
        0.185
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False
    sum_squared: Tensor
    total: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("sum_squared", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, confidence: Tensor, correct: Tensor) -> None:
        """Add a batch of confidences and correctness flags."""
        confidence, correct = _check_pair(confidence, correct)
        self.sum_squared += ((confidence - correct.double()) ** 2).sum().to(self.sum_squared.device)
        self.total += confidence.numel()

    def compute(self) -> Tensor:
        """The mean squared error."""
        return _ratio(self.sum_squared, self.total)


def qa_reliability(
    confidence: Tensor, correct: Tensor, threshold: float = DEFAULT_THRESHOLD, n_bins: int = 15
) -> dict[str, float]:
    """Accuracy, ECE (torchmetrics ``binary_calibration_error``, ``n_bins`` bins), Brier, AUROC of confidence
    for correctness (torchmetrics ``binary_auroc``; NaN when all answers are right or all wrong), hallucination
    rate and the share of confident answers, for one set of answers.

    Example:
        >>> out = qa_reliability(torch.tensor([0.9, 0.8, 0.6]), torch.tensor([1, 0, 1]), threshold=0.75)
        >>> sorted(out)
        ['accuracy', 'auroc', 'brier', 'confident_share', 'ece', 'hallucination', 'n']
    """
    confidence, correct = _check_pair(confidence, correct)
    target = correct.long()
    both = bool(target.min() != target.max()) if target.numel() else False
    return {
        "n": int(target.numel()),
        "accuracy": float(correct.double().mean()),
        "ece": float(binary_calibration_error(confidence.float(), target, n_bins=n_bins, norm="l1")),
        "brier": float(brier_score(confidence, correct)),
        "auroc": float(binary_auroc(confidence.float(), target)) if both else math.nan,
        "hallucination": float(hallucination_rate(confidence, correct, threshold)),
        "confident_share": float(unsupported_confident_rate(confidence, threshold)),
    }


def calibrated_ece(
    confidence: Tensor, n_bins: int = 15, draws: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """Mean and standard deviation of the ECE that a *perfectly calibrated* model shows on a finite set.

    ECE is biased upward on small sets: each bin's gap between accuracy and confidence is mostly sampling noise.
    This is that floor for the given confidences: each answer is drawn right with probability equal to its
    confidence (so the model is calibrated by construction), and the ECE (torchmetrics, ``n_bins`` bins, L1) is
    averaged over ``draws`` draws. Two models whose ECE differ by less than about this spread on a set of this
    size cannot be told apart by ECE.

    Example:
        >>> mean, sd = calibrated_ece(torch.full((96,), 0.7), draws=200)
        >>> 0.02 < mean < 0.06  # one bin: E|k/96 - 0.7| with k ~ Binomial(96, 0.7), about 0.037
        True
    """
    confidence = torch.as_tensor(confidence, dtype=torch.float32).flatten()
    if confidence.numel() == 0 or not bool(((confidence >= 0) & (confidence <= 1)).all()):
        raise ValueError("confidence must be a non-empty tensor of values in [0, 1]")
    if draws < 2:
        raise ValueError(f"draws must be >= 2, got {draws}")
    gen = torch.Generator().manual_seed(seed)
    values = torch.tensor(
        [
            float(binary_calibration_error(confidence, (torch.rand(confidence.shape, generator=gen) < confidence)
                                           .long(), n_bins=n_bins, norm="l1"))
            for _ in range(draws)
        ]
    )  # fmt: skip
    return float(values.mean()), float(values.std())


def _nll(logits: Tensor, labels: Tensor, temperature: float) -> float:
    if logits.ndim == 1:  # binary log-odds
        return float(
            torch.nn.functional.binary_cross_entropy_with_logits(logits / temperature, labels.double())
        )
    return float(torch.nn.functional.cross_entropy(logits / temperature, labels.long()))


def fit_temperature(
    logits: Tensor, labels: Tensor, bounds: tuple[float, float] = (0.05, 20.0), iters: int = 80
) -> float:
    """The temperature ``T`` that minimises the negative log-likelihood of ``softmax(logits / T)``.

    A golden-section search on ``log T`` within ``bounds`` (the NLL is unimodal in ``T`` for fixed logits),
    deterministic and without gradients.

    Args:
        logits: ``[N]`` binary log-odds (e.g. ``logit_yes - logit_no``) or ``[N, C]`` class logits.
        labels: ``[N]`` labels (0/1 for log-odds, class ids otherwise).
        bounds: the search interval for ``T``.
        iters: golden-section steps (80 narrow the interval by a factor 1e-16).

    Returns:
        The fitted temperature (> 1 softens over-confident logits).

    Example:
        >>> logits = torch.tensor([4.0, -4.0, 4.0, -4.0, 4.0])
        >>> labels = torch.tensor([1, 0, 0, 0, 1])
        >>> fit_temperature(logits, labels) > 1
        True
    """
    logits, labels = torch.as_tensor(logits).double(), torch.as_tensor(labels)
    if logits.shape[0] != labels.shape[0] or logits.ndim not in (1, 2):
        raise ValueError(f"Expected logits [N] or [N, C] and labels [N], got {tuple(logits.shape)}, "
                         f"{tuple(labels.shape)}.")  # fmt: skip
    if not 0 < bounds[0] < bounds[1]:
        raise ValueError(f"Expected 0 < bounds[0] < bounds[1], got {bounds}.")
    lo, hi = math.log(bounds[0]), math.log(bounds[1])
    ratio = (math.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = _nll(logits, labels, math.exp(a)), _nll(logits, labels, math.exp(b))
    for _ in range(iters):
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = _nll(logits, labels, math.exp(a))
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = _nll(logits, labels, math.exp(b))
    return math.exp((lo + hi) / 2)


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD / NQ-open answer normalisation: lower case, no punctuation, no articles, single spaces.

    Example:
        >>> normalize_answer("The  Beatles!")
        'beatles'
    """
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, answers: Sequence[str]) -> bool:
    """Whether the normalised prediction equals one of the normalised answers.

    Example:
        >>> exact_match("The Beatles.", ["Beatles", "John Lennon"])
        True
    """
    pred = normalize_answer(prediction)
    return any(pred == normalize_answer(a) for a in answers)


def contains_answer(prediction: str, answers: Sequence[str]) -> bool:
    """Whether one of the normalised answers occurs in the normalised prediction as whole words.

    Example:
        >>> contains_answer("It was John Lennon, I think", ["john lennon"]), contains_answer("Lennonism", ["Lennon"])
        (True, False)
    """
    pred = f" {normalize_answer(prediction)} "
    return any(normalize_answer(a) and f" {normalize_answer(a)} " in pred for a in answers)
