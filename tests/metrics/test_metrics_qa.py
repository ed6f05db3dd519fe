"""QA reliability metrics, each number against an independent computation (naive loops, sklearn)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from icp_lightning.metrics.qa import (
    BrierScore,
    HallucinationRate,
    UnsupportedConfidentRate,
    brier_score,
    calibrated_ece,
    contains_answer,
    exact_match,
    fit_temperature,
    hallucination_rate,
    normalize_answer,
    qa_reliability,
    unsupported_confident_rate,
    yes_no_confidence,
)


def _data(n: int = 200, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    conf = 0.5 + 0.5 * torch.rand(n, generator=gen, dtype=torch.float64)
    correct = torch.rand(n, generator=gen, dtype=torch.float64) < conf  # roughly calibrated
    return conf, correct


def _naive_hallucination(conf: list[float], correct: list[bool], tau: float) -> float:
    confident = wrong = 0
    for c, ok in zip(conf, correct):
        if c > tau:
            confident += 1
            wrong += 0 if ok else 1
    return wrong / confident if confident else math.nan


def _naive_ece(conf: list[float], correct: list[bool], n_bins: int = 15) -> float:
    total = 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        idx = [i for i, c in enumerate(conf) if (lo < c <= hi) or (b == 0 and c == 0)]
        if idx:
            acc = sum(correct[i] for i in idx) / len(idx)
            avg = sum(conf[i] for i in idx) / len(idx)
            total += len(idx) / len(conf) * abs(acc - avg)
    return total


@pytest.mark.parametrize("tau", [0.5, 0.75, 0.9])
def test_hallucination_rate_matches_a_loop(tau: float) -> None:
    conf, correct = _data()
    expected = _naive_hallucination(conf.tolist(), correct.tolist(), tau)
    assert float(hallucination_rate(conf, correct, tau)) == pytest.approx(expected, abs=1e-12)
    metric = HallucinationRate(threshold=tau)
    for start in range(0, 200, 37):  # batches of uneven size
        metric.update(conf[start : start + 37], correct[start : start + 37])
    assert float(metric.compute()) == pytest.approx(expected, abs=1e-12)


def test_hallucination_rate_is_nan_without_confident_answers_and_checks_inputs() -> None:
    assert math.isnan(float(hallucination_rate(torch.tensor([0.6, 0.7]), torch.tensor([1, 0]), 0.75)))
    with pytest.raises(ValueError, match="same shape"):
        hallucination_rate(torch.tensor([0.6, 0.7]), torch.tensor([1]))
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        hallucination_rate(torch.tensor([1.5]), torch.tensor([1]))
    with pytest.raises(ValueError, match="threshold"):
        HallucinationRate(threshold=1.0)


def test_unsupported_confident_rate_matches_a_loop() -> None:
    conf, _ = _data(seed=1)
    expected = sum(1 for c in conf.tolist() if c > 0.75) / len(conf)
    assert float(unsupported_confident_rate(conf, 0.75)) == pytest.approx(expected)
    metric = UnsupportedConfidentRate(0.75)
    metric.update(conf[:50])
    metric.update(conf[50:])
    assert float(metric.compute()) == pytest.approx(expected)


def test_brier_matches_sklearn() -> None:
    from sklearn.metrics import brier_score_loss

    conf, correct = _data(seed=2)
    expected = brier_score_loss(correct.numpy().astype(int), conf.numpy())
    assert float(brier_score(conf, correct)) == pytest.approx(expected, abs=1e-12)
    metric = BrierScore()
    metric.update(conf[:77], correct[:77])
    metric.update(conf[77:], correct[77:])
    assert float(metric.compute()) == pytest.approx(expected, abs=1e-12)


def test_yes_no_brier_equals_the_binary_brier_of_p_yes() -> None:
    gen = torch.Generator().manual_seed(3)
    z_yes, z_no = torch.randn(50, generator=gen), torch.randn(50, generator=gen)
    labels = torch.rand(50, generator=gen) < 0.6
    p_yes, answer, conf = yes_no_confidence(z_yes, z_no)
    correct = answer == labels
    binary = float(((p_yes - labels.double()) ** 2).mean())
    assert float(brier_score(conf, correct)) == pytest.approx(binary, abs=1e-12)


def test_yes_no_confidence_matches_a_two_way_softmax() -> None:
    z = torch.tensor([[2.0, -1.0], [0.0, 0.0], [-3.0, 1.0]])
    p, yes, conf = yes_no_confidence(z[:, 0], z[:, 1])
    soft = z.double().softmax(-1)
    assert torch.allclose(p, soft[:, 0])
    assert yes.tolist() == [True, False, False]  # a tie says no
    assert torch.allclose(conf, soft.max(-1).values)


def test_qa_reliability_matches_naive_ece_and_sklearn_auroc() -> None:
    from sklearn.metrics import roc_auc_score

    conf, correct = _data(n=300, seed=4)
    out = qa_reliability(conf, correct, threshold=0.75)
    assert out["n"] == 300
    assert out["accuracy"] == pytest.approx(float(correct.double().mean()))
    assert out["ece"] == pytest.approx(_naive_ece(conf.tolist(), correct.tolist()), abs=1e-6)
    assert out["auroc"] == pytest.approx(roc_auc_score(correct.numpy(), conf.numpy()), abs=1e-6)
    assert out["hallucination"] == pytest.approx(_naive_hallucination(conf.tolist(), correct.tolist(), 0.75))
    assert out["confident_share"] == pytest.approx(float((conf > 0.75).double().mean()))
    assert math.isnan(qa_reliability(conf[:3], torch.tensor([True, True, True]))["auroc"])


def test_calibrated_ece_matches_the_binomial_closed_form_in_one_bin() -> None:
    # All confidences equal c (one bin): ECE = |k/n - c| with k ~ Binomial(n, c); its mean is a finite sum.
    n, c = 96, 0.7
    pmf = [math.comb(n, k) * c**k * (1 - c) ** (n - k) for k in range(n + 1)]
    exact = sum(p * abs(k / n - c) for k, p in enumerate(pmf))
    mean, sd = calibrated_ece(torch.full((n,), c), draws=2000)
    assert abs(mean - exact) < 3 * sd / math.sqrt(2000) + 1e-3
    # more answers, lower floor; bad input refused
    conf = _data(480)[0].float()
    assert calibrated_ece(conf, draws=200)[0] < calibrated_ece(conf[:96], draws=200)[0]
    with pytest.raises(ValueError, match="values in"):
        calibrated_ece(torch.tensor([1.5]))


def test_fit_temperature_finds_the_nll_minimum_of_a_dense_grid() -> None:
    gen = torch.Generator().manual_seed(5)
    labels = (torch.rand(400, generator=gen) < 0.5).long()
    logodds = 3.0 * (2 * labels - 1) * torch.rand(400, generator=gen) + torch.randn(400, generator=gen) * 2
    temps = np.exp(np.linspace(np.log(0.05), np.log(20), 4001))

    def nll(t: float) -> float:
        z = logodds.double() / t
        y = labels.double()
        return float(
            -(y * torch.nn.functional.logsigmoid(z) + (1 - y) * torch.nn.functional.logsigmoid(-z)).mean()
        )

    best = float(temps[int(np.argmin([nll(t) for t in temps]))])
    fitted = fit_temperature(logodds, labels)
    assert fitted == pytest.approx(best, rel=2e-3)
    # multiclass logits: the same search with a softmax NLL
    logits = torch.stack([torch.zeros(400), logodds], 1)
    assert fit_temperature(logits, labels) == pytest.approx(fitted, rel=1e-6)
    with pytest.raises(ValueError, match="bounds"):
        fit_temperature(logodds, labels, bounds=(2.0, 1.0))


@pytest.mark.parametrize(
    ("prediction", "answers", "em", "contains"),
    [
        ("The Beatles", ["Beatles"], True, True),
        ("the beatles, a band", ["Beatles"], False, True),
        ("Lennonism", ["Lennon"], False, False),
        ("1969.", ["1969"], True, True),
        ("", ["x"], False, False),
        ("John Lennon", ["paul", "john lennon"], True, True),
    ],
)
def test_answer_matching(prediction: str, answers: list[str], em: bool, contains: bool) -> None:
    assert exact_match(prediction, answers) is em
    assert contains_answer(prediction, answers) is contains


def test_normalize_answer() -> None:
    assert normalize_answer("  An  Apple, the Pie! ") == "apple pie"
