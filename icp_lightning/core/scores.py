"""Spuriousness scores: causal effects combined over interventions, metrics and data sets.

Two reductions:

* ``reduction="abs"`` is the method's literal formula,
  ``S = 1/(|I||M||X|) * sum_{I,M,X} w_I * w_m * w_X * |CE_{I,M,X}|``: it finds features that *matter*, not
  features that are spurious. Use it to rank features by importance (e.g. for plain structured pruning).
* ``reduction="signed"`` contrasts data sets: ``S = 1/(|I||M|) * sum_{I,M} w_I * w_m * sum_X w_X * CE_{I,M,X}``
  with ``dataset_weights={"id": 1, "ood": -1}``: a feature that helps in distribution (positive effect there)
  and hurts out of it (negative effect there) scores high. Use it whenever you have (or can build) data where
  the shortcut does not hold: this is what finds shortcuts; the ``abs`` average does no better than chance at
  that.

Effects are sums and counts, so the effects of several processes (or batches) add with ``+`` to exactly the
single-process effects; scores are then computed from the reduced effects (``|CE|`` is not additive, so it is
the effects, not the scores, that are reduced across ranks).

Example:
    >>> import torch
    >>> from icp_lightning.core.effects import Effects
    >>> def eff(values):
    ...     return Effects({"s": torch.tensor(values) * 4}, {"s": torch.full((len(values),), 4.0)})
    >>> effects = {("mask", "label_logprob", "id"): eff([0.9, 0.1]),
    ...            ("mask", "label_logprob", "ood"): eff([-0.8, 0.1])}
    >>> spuriousness(effects, dataset_weights={"id": 1.0, "ood": -1.0}, reduction="signed")["s"]
    tensor([1.7000, 0.0000])
    >>> spuriousness(effects, reduction="abs")["s"]
    tensor([0.8500, 0.1000])
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from icp_lightning.core.choices import Reduction
from icp_lightning.core.results import SiteValues
from icp_lightning.core.sites import model_description

EffectKey = tuple[str, str, str]


class Scores(SiteValues):
    """Spuriousness score per site and feature: ``scores[site]`` is ``[n_features]``; higher = more spurious.

    Same storage, ``+``, ``top_k``, ``save``/``load`` and JSON summary as :class:`SiteValues`. Scores describe
    themselves: ``meta`` holds ``granularity``, ``sites`` (site name -> feature count), ``model_type`` and
    ``model_class`` of the model they were computed on (written by :func:`spuriousness`), saved in the ``.pt``
    and the ``.json``. :func:`~icp_lightning.core.sites.sites_for_scores` rebuilds the sites from them and refuses
    scores of another model. Files written before icp_lightning 0.2 have none of these: ``sites_for_scores``
    then raises and says how to pass the granularity.

    Example:
        >>> s = Scores({"a": torch.zeros(3)}, {"a": torch.ones(3)}, {"granularity": "neuron"})
        >>> s.granularity, s.site_sizes
        ('neuron', {'a': 3})
    """

    @property
    def granularity(self) -> str | None:
        """``"neuron"`` or ``"head"`` (``None``: scores without metadata)."""
        value = self.meta.get("granularity")
        return str(value) if value is not None else None

    @property
    def site_sizes(self) -> dict[str, int]:
        """Site name -> number of features, in site order."""
        return {n: int(v.numel()) for n, v in self.sums.items()}

    @property
    def model_type(self) -> str | None:
        """The ``config.model_type`` of the model the scores were computed on (``None``: unknown)."""
        value = self.meta.get("model_type")
        return str(value) if value is not None else None


def _weight(weights: Mapping[str, float] | None, key: str, kind: str) -> float:
    if weights is None:
        return 1.0
    if key not in weights:
        raise ValueError(f"{kind}_weights has no entry for {key!r}; it has {sorted(weights)}")
    return float(weights[key])


def spuriousness(
    effects: Mapping[EffectKey, SiteValues] | Mapping[str, SiteValues],
    intervention_weights: Mapping[str, float] | None = None,
    metric_weights: Mapping[str, float] | None = None,
    dataset_weights: Mapping[str, float] | None = None,
    reduction: Reduction = "signed",
    model: nn.Module | None = None,
) -> Scores:
    """Combine effects keyed by ``(intervention, metric, dataset)`` into one score per feature.

    Args:
        effects: ``{(intervention, metric, dataset): Effects}``; a plain ``{dataset: Effects}`` is read as
            ``(effects.meta["intervention"], effects.meta["metric"], dataset)``.
        intervention_weights, metric_weights, dataset_weights: per-name weights (default 1 each). With
            ``reduction="signed"``, ``dataset_weights`` carries the contrast, e.g. ``{"id": 1, "ood": -1}``.
        reduction: ``"signed"`` (contrast data sets; finds shortcuts) or ``"abs"`` (the literal |CE| average;
            ranks importance).
        model: the model the effects were computed on: its ``model_type`` and class name go in the scores'
            metadata (default: the effects' own ``model_type`` / ``model_class`` metadata, if any).

    Returns:
        :class:`Scores` over the sites common to all effects, whose ``meta`` says what they are: ``granularity``
        (from the effects' metadata), ``sites`` (site name -> feature count), ``model_type``, ``model_class``.

    Raises:
        ValueError: unknown reduction, empty effects, missing weights, effects over different sites or at
            different granularities.
    """
    if reduction not in ("abs", "signed"):
        raise ValueError(f"reduction must be 'abs' or 'signed', got {reduction!r}")
    if not effects:
        raise ValueError("spuriousness needs at least one Effects")
    keyed: dict[EffectKey, SiteValues] = {}
    for key, eff in effects.items():
        if isinstance(key, tuple):
            if len(key) != 3:
                raise ValueError(f"effect keys are (intervention, metric, dataset) triples, got {key!r}")
            keyed[(str(key[0]), str(key[1]), str(key[2]))] = eff
        else:
            keyed[(str(eff.meta.get("intervention", "mask")), str(eff.meta.get("metric", "metric")), key)] = (
                eff
            )
    interventions = sorted({k[0] for k in keyed})
    metrics = sorted({k[1] for k in keyed})
    datasets = sorted({k[2] for k in keyed})
    site_sets = [set(e) for e in keyed.values()]
    if any(s != site_sets[0] for s in site_sets):
        raise ValueError("all effects must cover the same sites (compute them with the same Sites)")
    names = list(next(iter(keyed.values())))
    norm = len(interventions) * len(metrics) * (len(datasets) if reduction == "abs" else 1)

    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, torch.Tensor] = {}
    for name in names:
        total = None
        for (iv, me, ds), eff in keyed.items():
            w = (
                _weight(intervention_weights, iv, "intervention")
                * _weight(metric_weights, me, "metric")
                * _weight(dataset_weights, ds, "dataset")
            )
            ce = eff[name].double()
            term = w * (ce.abs() if reduction == "abs" else ce)
            total = term if total is None else total + term
        assert total is not None
        sums[name] = total / norm
        counts[name] = torch.ones_like(total)
    granularities = {
        str(e.meta["granularity"]) for e in keyed.values() if e.meta.get("granularity") is not None
    }
    if len(granularities) > 1:
        raise ValueError(f"the effects were computed at different granularities {sorted(granularities)}")
    first = next(iter(keyed.values())).meta
    described = model_description(model) if model is not None else {}
    meta = {
        "granularity": next(iter(granularities), None),
        "sites": {name: int(sums[name].numel()) for name in names},
        "model_type": described.get("model_type", first.get("model_type")),
        "model_class": described.get("model_class", first.get("model_class")),
        "reduction": reduction,
        "interventions": interventions,
        "metrics": metrics,
        "datasets": datasets,
        "intervention_weights": dict(intervention_weights or {}),
        "metric_weights": dict(metric_weights or {}),
        "dataset_weights": dict(dataset_weights or {}),
    }
    return Scores(sums, counts, meta)
