"""Reliability metrics: calibration, group fairness, group accuracy, counterfactual flips, LM likelihood scores,
question answering (hallucination rate, unsupported confidence, Brier score, answer matching: :mod:`.qa`).

Functions (pure torch) live in :mod:`~icp_lightning.metrics.functional` and :mod:`~icp_lightning.metrics.lm`;
``torchmetrics.Metric`` classes with fixed-size, sum-reduced states in :mod:`~icp_lightning.metrics.classes`;
:class:`ReliabilityMetrics` bundles them for one evaluation set.
"""

from icp_lightning.metrics.bias import (
    BiasAmplification,
    CounterfactualProbabilityChange,
    FalsePositiveRateGap,
    bias_amplification,
    counterfactual_probability_change,
    false_positive_rate_gap,
    positive_rate,
)
from icp_lightning.metrics.classes import (
    CounterfactualFlipRate,
    DemographicParityDifference,
    EqualOpportunityDifference,
    ExpectedCalibrationError,
    GroupAccuracy,
    WorstGroupAccuracy,
)
from icp_lightning.metrics.functional import (
    counterfactual_flip_rate,
    demographic_parity_difference,
    equal_opportunity_difference,
    expected_calibration_error,
    group_accuracies,
    negative_log_likelihood,
    worst_group_accuracy,
)
from icp_lightning.metrics.lm import (
    continuation_logprobs,
    multiple_choice_accuracy,
    perplexity,
    score_token_ids,
    sentence_logprobs,
    sequence_logprob,
    stereotype_score,
    yes_no_accuracy,
)
from icp_lightning.metrics.qa import (
    BrierScore,
    HallucinationRate,
    UnsupportedConfidentRate,
    brier_score,
    contains_answer,
    exact_match,
    fit_temperature,
    hallucination_rate,
    normalize_answer,
    qa_reliability,
    unsupported_confident_rate,
    yes_no_confidence,
)
from icp_lightning.metrics.reliability import ReliabilityMetrics
from icp_lightning.metrics.reliance import FeatureReliance, feature_reliance

__all__ = [
    "BrierScore",
    "HallucinationRate",
    "UnsupportedConfidentRate",
    "brier_score",
    "contains_answer",
    "exact_match",
    "fit_temperature",
    "hallucination_rate",
    "normalize_answer",
    "qa_reliability",
    "unsupported_confident_rate",
    "yes_no_confidence",
    "BiasAmplification",
    "CounterfactualFlipRate",
    "CounterfactualProbabilityChange",
    "DemographicParityDifference",
    "EqualOpportunityDifference",
    "ExpectedCalibrationError",
    "FeatureReliance",
    "FalsePositiveRateGap",
    "GroupAccuracy",
    "ReliabilityMetrics",
    "WorstGroupAccuracy",
    "bias_amplification",
    "continuation_logprobs",
    "counterfactual_flip_rate",
    "counterfactual_probability_change",
    "demographic_parity_difference",
    "equal_opportunity_difference",
    "expected_calibration_error",
    "feature_reliance",
    "false_positive_rate_gap",
    "group_accuracies",
    "multiple_choice_accuracy",
    "negative_log_likelihood",
    "perplexity",
    "positive_rate",
    "score_token_ids",
    "sentence_logprobs",
    "sequence_logprob",
    "stereotype_score",
    "worst_group_accuracy",
    "yes_no_accuracy",
]
