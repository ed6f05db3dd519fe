"""One checked attribution configuration, and the loop that turns it into scores.

:class:`AttributionConfig` holds every choice of an attribution run (sites, interventions, metrics, weights,
reduction, method) and checks them in ``__post_init__``, once, for every caller: the
:class:`~icp_lightning.callbacks.attribution.CausalAttributionCallback`, ``icp attribute`` and the
benchmarks. :func:`attribute` is the single-process loop over every (intervention, metric, data set) that
reduces the effects to :class:`~icp_lightning.core.scores.Scores`; the callback runs the same loop sharded over
processes.

Example:
    >>> cfg = AttributionConfig(interventions=("mask", "scale"), dataset_weights={"id": 1.0, "ood": -1.0})
    >>> cfg.metric_names, cfg.to_dict()["interventions"]
    (['label_logprob'], ['mask', 'scale'])
    >>> AttributionConfig(reduction="mean")
    Traceback (most recent call last):
    ...
    ValueError: reduction must be one of ('signed', 'abs'), got 'mean'
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from icp_lightning.core.choices import ATTRIBUTION_PARTNERS as PARTNERS
from icp_lightning.core.choices import GRANULARITIES, REDUCTIONS, AttributionPartner, Partner
from icp_lightning.core.effect_metrics import METRICS, metric_name
from icp_lightning.core.effects import METHODS, Effects, Method, causal_effects
from icp_lightning.core.interventions import INTERVENTIONS, InterventionKind, check_alpha
from icp_lightning.core.scores import Reduction, Scores, spuriousness
from icp_lightning.core.sites import Granularity, Sites, find_sites

__all__ = ["AttributionConfig", "attribute", "check_weights"]


def check_weights(weights: Mapping[str, float] | None, allowed: Sequence[str], what: str) -> None:
    """Raise a ValueError unless ``weights`` gives one finite weight per name in ``allowed`` (``None``: 1 each).

    Example:
        >>> check_weights({"id": 1.0}, ["id", "ood"], "dataset")
        Traceback (most recent call last):
        ...
        ValueError: dataset_weights must give one weight per dataset ['id', 'ood']: missing ['ood'], unknown []
    """
    if weights is None:
        return
    if not isinstance(weights, Mapping):
        raise ValueError(f"{what}_weights must be a mapping name -> float, got {type(weights).__name__}")
    missing = [k for k in allowed if k not in weights]
    unknown = [k for k in weights if k not in allowed]
    if missing or unknown:
        raise ValueError(
            f"{what}_weights must give one weight per {what} {list(allowed)}: missing {missing}, unknown {unknown}"
        )
    for key, value in weights.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise ValueError(f"{what}_weights[{key!r}] must be a finite number, got {value!r}")


def _as_tuple(value: Any) -> tuple[Any, ...]:
    return (value,) if isinstance(value, str) or callable(value) else tuple(value)


@dataclass
class AttributionConfig:
    """Every choice of an attribution run, checked once.

    Args:
        target_modules: which linear layers are sites (see :func:`~icp_lightning.core.sites.find_sites`).
        exclude_modules: layers that are never sites.
        granularity: ``"neuron"`` (one feature per input column) or ``"head"`` (one per attention head).
        interventions: any of ``"mask"``, ``"scale"``, ``"swap"``, ``"mean"``.
        alpha: the factor of ``"scale"`` (finite, >= 0).
        metrics: built-in metric names or callables ``m(outputs, batch) -> Tensor[batch]``.
        intervention_weights, metric_weights, dataset_weights: one weight per intervention / metric / data set
            (default 1 each); ``dataset_weights`` names the data sets the run needs.
        reduction: ``"signed"`` (contrast data sets: finds shortcuts) or ``"abs"`` (rank importance).
        method: ``"gradient"``, ``"exact"`` or ``"screened"``.
        max_batches: at most this many batches of each data set; ``None``: all.
        partner: where ``swap`` takes h' from: ``"paired"``, ``"permutation"`` or ``"auto"``.
    """

    target_modules: str | Sequence[str] | None = None
    exclude_modules: str | Sequence[str] | None = None
    granularity: Granularity = "neuron"
    interventions: Sequence[InterventionKind] = ("mask",)
    alpha: float = 0.5
    metrics: Sequence[str | Callable[..., Any]] = ("label_logprob",)
    intervention_weights: Mapping[str, float] | None = None
    metric_weights: Mapping[str, float] | None = None
    dataset_weights: Mapping[str, float] | None = None
    reduction: Reduction = "signed"
    method: Method = "gradient"
    max_batches: int | None = 4
    partner: AttributionPartner = "auto"
    metric_names: list[str] = field(init=False)

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        self.interventions = _as_tuple(self.interventions)
        bad = [i for i in self.interventions if i not in INTERVENTIONS]
        if not self.interventions or bad:
            raise ValueError(
                f"interventions must be a non-empty list of {INTERVENTIONS}, got {list(self.interventions)}"
            )
        if len(set(self.interventions)) != len(self.interventions):
            raise ValueError(f"interventions has duplicates: {list(self.interventions)}")
        self.alpha = check_alpha(self.alpha)
        self.metrics = _as_tuple(self.metrics)
        if not self.metrics:
            raise ValueError(f"metrics must be a non-empty list of {sorted(METRICS)} or callables")
        for m in self.metrics:
            if isinstance(m, str) and m not in METRICS:
                raise ValueError(
                    f"unknown metric {m!r}: metrics must be among {sorted(METRICS)} or callables"
                )
            if not isinstance(m, str) and not callable(m):
                raise ValueError(f"metrics must be names among {sorted(METRICS)} or callables, got {m!r}")
        self.metric_names = [metric_name(m) for m in self.metrics]
        if len(set(self.metric_names)) != len(self.metric_names):
            raise ValueError(f"metrics have duplicate names: {self.metric_names}")
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {self.reduction!r}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.partner not in PARTNERS:
            raise ValueError(f"partner must be one of {PARTNERS}, got {self.partner!r}")
        if self.max_batches is not None and (
            not isinstance(self.max_batches, int)
            or isinstance(self.max_batches, bool)
            or self.max_batches < 1
        ):
            raise ValueError(
                f"max_batches must be an int >= 1 or None (all batches), got {self.max_batches!r}"
            )
        check_weights(self.intervention_weights, self.interventions, "intervention")
        check_weights(self.metric_weights, self.metric_names, "metric")
        if self.dataset_weights is not None:
            check_weights(self.dataset_weights, list(self.dataset_weights), "dataset")

    def check_datasets(self, names: Sequence[str]) -> None:
        """Raise before any computation unless ``dataset_weights`` (if given) weighs exactly ``names``."""
        check_weights(self.dataset_weights, list(names), "dataset")

    def sites(self, model: nn.Module) -> Sites:
        """The sites this configuration targets in ``model``."""
        return find_sites(model, self.target_modules, self.exclude_modules, self.granularity)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: saved beside the scores (callables by name)."""
        return {
            "target_modules": self.target_modules
            if self.target_modules is None or isinstance(self.target_modules, str)
            else list(self.target_modules),
            "exclude_modules": self.exclude_modules
            if self.exclude_modules is None or isinstance(self.exclude_modules, str)
            else list(self.exclude_modules),
            "granularity": self.granularity,
            "interventions": list(self.interventions),
            "alpha": self.alpha,
            "metrics": list(self.metric_names),
            "intervention_weights": dict(self.intervention_weights) if self.intervention_weights else None,
            "metric_weights": dict(self.metric_weights) if self.metric_weights else None,
            "dataset_weights": dict(self.dataset_weights) if self.dataset_weights else None,
            "reduction": self.reduction,
            "method": self.method,
            "max_batches": self.max_batches,
            "partner": self.partner,
        }


def _partner(config: AttributionConfig, batch: Mapping[str, Any]) -> Partner:
    if config.partner != "auto":
        return config.partner
    return "paired" if "cf_input_ids" in batch else "permutation"


def attribute(
    model: nn.Module,
    datasets: Mapping[str, Iterable[Mapping[str, Any]]],
    config: AttributionConfig,
    sites: Sites | None = None,
    progress: bool = False,
) -> tuple[Scores, dict[tuple[str, str, str], Effects]]:
    """Effects of every (intervention, metric, data set) of ``config`` on ``model``, reduced to scores.

    Args:
        model: the Hugging Face model.
        datasets: data set name -> iterable of dict batches (at most ``config.max_batches`` are read).
        config: the checked configuration; its ``dataset_weights`` must weigh exactly ``datasets``.
        sites: the sites (default ``config.sites(model)``).
        progress: show the engine's progress bars.

    Returns:
        ``(scores, effects)``; the scores' metadata holds the model's type and the configuration.

    Raises:
        ValueError: data sets that ``dataset_weights`` does not weigh (before any computation), an empty data
            set, or NaN effects (naming the data set, site and metric).
    """
    config.check_datasets(list(datasets))
    sites = sites if sites is not None else config.sites(model)
    effects: dict[tuple[str, str, str], Effects] = {}
    for ds_name, loader in datasets.items():
        batches = [b for i, b in zip(range(config.max_batches or 2**62), loader)]
        if not batches:
            raise ValueError(f"attribution data set {ds_name!r} is empty (no batches)")
        for iv in config.interventions:
            for metric, mname in zip(config.metrics, config.metric_names):
                try:
                    effects[(iv, mname, ds_name)] = causal_effects(
                        model, batches, sites, iv, metric, config.method, config.alpha,
                        partner=_partner(config, batches[0]), progress=progress,
                    )  # fmt: skip
                except ValueError as err:
                    raise ValueError(f"attribution data set {ds_name!r}: {err}") from err
    scores = spuriousness(
        effects, config.intervention_weights, config.metric_weights, config.dataset_weights, config.reduction,
        model=model,
    )  # fmt: skip
    scores.meta["config"] = config.to_dict()
    return scores, effects
