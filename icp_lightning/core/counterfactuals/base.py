"""The counterfactual contract and the strategy that needs no new inputs.

:class:`CounterfactualOutput` is what every strategy returns and :class:`CounterfactualStrategy` the one method
it has; :func:`select_features` picks the spurious features a strategy acts on, and ``_FeatureCounterfactual``
holds the settings shared by the strategies that intervene on them (which features, and the value v of
do(h = v)) and their ``build``: select the features, then hand them to the strategy's ``_build``.
:class:`InterventionCounterfactual` is the representation-level strategy: the model itself under do(h = v).
The input-level inverses live in :mod:`.search`, the given ones in :mod:`.lexical`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from icp_lightning.core.choices import (  # EditKind, Projection, CounterfactualName: importable from here
    CounterfactualKind,
    CounterfactualName,  # noqa: F401
    EditKind,  # noqa: F401
    Partner,
    Projection,  # noqa: F401
)
from icp_lightning.core.interventions import (
    Intervention,
    capture_site_inputs,
    counterfactual_batch,
    intervene,
    model_inputs,
    partner_permutation,
)
from icp_lightning.core.selection import select_masks
from icp_lightning.core.sites import Sites, check_scores_fit

_Batch = Mapping[str, Any]
_Feats = Mapping[str, torch.Tensor]


@dataclass
class CounterfactualOutput:
    """What a counterfactual strategy returns.

    Attributes:
        logits: the counterfactual forward's logits (representation-level strategies), or ``None``.
        batch: a new input batch x' (same keys as the batch: ``input_ids`` or ``inputs_embeds``, masks, labels)
            to push through the model like any input, or ``None``.
        info: diagnostics, e.g. ``reconstruction_error`` (per step), ``edited_positions``.
    """

    logits: torch.Tensor | None = None
    batch: dict[str, Any] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.logits is None) == (self.batch is None):
            raise ValueError(
                "a CounterfactualOutput needs exactly one of logits= (a forward) or batch= (inputs x')"
            )


@runtime_checkable
class CounterfactualStrategy(Protocol):
    """Anything with a ``build(model, batch, scores, sites)`` method is a counterfactual strategy."""

    def build(
        self,
        model: nn.Module,
        batch: Mapping[str, Any],
        scores: Mapping[str, torch.Tensor] | None,
        sites: Sites | None,
    ) -> CounterfactualOutput | None:
        """The counterfactual of ``batch`` (``None``: skip the KL term for this batch)."""
        ...


# ----------------------------------------------------------------------------------------------------------
# Shared helpers


def select_features(
    scores: Mapping[str, torch.Tensor],
    sites: Sites,
    tau_c: float | None = None,
    top_k: int | None = None,
) -> dict[str, torch.Tensor]:
    """The spurious features to intervene on: score > ``tau_c``, and/or the ``top_k`` highest scores.

    The choice is :func:`~icp_lightning.core.selection.select_masks` (``threshold=tau_c``, ``amount=top_k``,
    ``min_keep=0``), the same selection that prunes.

    Args:
        scores: ``site name -> [n_features]`` spuriousness scores (a ``Scores`` or a plain dict). Every scored
            site must be in ``sites``, with as many scores as features.
        sites: the sites the scores refer to.
        tau_c: threshold; with ``top_k`` too, the top-k among those above it. When both are ``None``: every
            feature with a positive score (``tau_c = 0``).
        top_k: how many features over all sites, highest score first (ties: site order, then feature order).

    Returns:
        ``site name -> sorted feature indices`` (``LongTensor``), only for sites with at least one feature.

    Raises:
        ValueError: a negative ``top_k``; scores that do not fit ``sites`` ("scores were computed for a different
            model: ..."); NaN scores (naming the site and features).

    Example:
        >>> import transformers
        >>> from icp_lightning.core.sites import find_sites
        >>> cfg = transformers.BertConfig(vocab_size=9, hidden_size=8, num_hidden_layers=1,
        ...                               num_attention_heads=2, intermediate_size=4)
        >>> sites = find_sites(transformers.BertModel(cfg), target_modules=["0.output.dense"])
        >>> select_features({"encoder.layer.0.output.dense": torch.tensor([0.1, 0.9, 0.5, -1.0])}, sites, top_k=2)
        {'encoder.layer.0.output.dense': tensor([1, 2])}
    """
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
        raise ValueError(f"top_k must be an int >= 0 or None, got {top_k!r}")
    check_scores_fit(scores, sites)
    names = [name for name in sites if name in scores]
    if not names:
        return {}
    threshold = 0.0 if tau_c is None and top_k is None else tau_c
    masks = select_masks(
        {n: scores[n] for n in names},
        {n: torch.ones(sites[n].n_features) for n in names},
        threshold=threshold,
        amount=top_k,
        min_keep=0,
    )
    chosen = {n: (masks[n] == 0).nonzero().reshape(-1) for n in names}
    return {n: idx for n, idx in chosen.items() if idx.numel()}


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode while inside (no dropout), restoring each one's own mode after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, mode in modes:
            module.training = mode


def _batch_size(batch: Mapping[str, Any]) -> int:
    for key in ("input_ids", "inputs_embeds", "attention_mask"):
        value = batch.get(key)
        if isinstance(value, torch.Tensor):
            return int(value.shape[0])
    raise ValueError(f"the batch needs 'input_ids' or 'inputs_embeds'; it has keys {sorted(batch)}")


def _n_features(feats: _Feats) -> int:
    """How many features are selected, over all sites."""
    return sum(int(f.numel()) for f in feats.values())


def _check_kind(kind: str, partner: str) -> None:
    if kind not in ("swap", "mask"):
        raise ValueError(f"kind must be 'swap' or 'mask', got {kind!r}")
    if partner not in ("permutation", "paired"):
        raise ValueError(f"partner must be 'permutation' or 'paired', got {partner!r}")


class _FeatureCounterfactual:
    """Shared settings of the strategies that act on the selected spurious features."""

    def __init__(
        self,
        tau_c: float | None,
        top_k: int | None,
        kind: CounterfactualKind,
        partner: Partner,
        seed: int,
    ) -> None:
        _check_kind(kind, partner)
        if top_k is not None and top_k < 0:
            raise ValueError(f"top_k must be >= 0 or None, got {top_k}")
        self.tau_c = tau_c
        self.top_k = top_k
        self.kind: CounterfactualKind = kind
        self.partner: Partner = partner
        self.seed = seed

    def build(
        self,
        model: nn.Module,
        batch: Mapping[str, Any],
        scores: Mapping[str, torch.Tensor] | None,
        sites: Sites | None,
    ) -> CounterfactualOutput | None:
        """The counterfactual of ``batch`` on the selected features (``None``: no scores, or none selected)."""
        chosen = self._features(scores, sites)
        if chosen is None:
            return None
        return self._build(model, batch, *chosen)

    def _build(self, model: nn.Module, batch: _Batch, sites: Sites, feats: _Feats) -> CounterfactualOutput:
        """The strategy itself, on the sites of the selected features (``feats``: site -> feature indices)."""
        raise NotImplementedError

    def _features(
        self, scores: Mapping[str, torch.Tensor] | None, sites: Sites | None
    ) -> tuple[Sites, dict[str, torch.Tensor]] | None:
        if scores is None:
            return None
        if sites is None:
            raise ValueError(
                f"{type(self).__name__} needs the Sites the scores refer to: call module.set_scores(scores, sites) "
                "or pass sites to build()"
            )
        feats = select_features(scores, sites, self.tau_c, self.top_k)
        if not feats:
            return None
        return sites.subset(list(feats)), feats

    @torch.no_grad()
    def _intervention(self, model: nn.Module, batch: Mapping[str, Any], sites: Sites) -> Intervention:
        """The do(h = v) to apply: mask (v = 0) or swap (v = partner activations from a clean, eval-mode pass)."""
        if self.kind == "mask":
            return Intervention("mask")
        store: dict[str, torch.Tensor] = {}
        with eval_mode(model):
            if self.partner == "paired":
                with capture_site_inputs(sites, store):
                    model(**model_inputs(model, counterfactual_batch(batch)))
                return Intervention("swap", source=store)
            with capture_site_inputs(sites, store):
                model(**model_inputs(model, batch))
        perm = partner_permutation(_batch_size(batch), self.seed)
        return Intervention("swap", source={name: h[perm.to(h.device)] for name, h in store.items()})

    @torch.no_grad()
    def _targets(
        self,
        model: nn.Module,
        batch: Mapping[str, Any],
        sites: Sites,
        feats: Mapping[str, torch.Tensor],
        with_clean: bool = False,
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Site inputs under do(h = v) (the target) and, if asked, on the clean input; eval-mode passes."""
        intervention = self._intervention(model, batch, sites)
        target: dict[str, torch.Tensor] = {}
        clean: dict[str, torch.Tensor] = {}
        with eval_mode(model):
            # intervene's hooks are registered first, so the capture sees the intervened value.
            with intervene(sites, feats, intervention), capture_site_inputs(sites, target):
                model(**model_inputs(model, batch))
            if with_clean:
                with capture_site_inputs(sites, clean):
                    model(**model_inputs(model, batch))
        return target, clean


# ----------------------------------------------------------------------------------------------------------
# Representation level: do(h = v) inside the model


class InterventionCounterfactual(_FeatureCounterfactual):
    """The counterfactual forward is the model under do(h = v) on the spurious features.

    Args:
        tau_c: features with score > ``tau_c`` (see :func:`select_features`).
        top_k: or the top-k features by score.
        kind: ``"swap"`` (v = the same feature's activation on an in-batch partner) or ``"mask"`` (v = 0).
        partner: where swap takes v from: ``"permutation"`` (a seeded in-batch partner, see
            :func:`~icp_lightning.core.interventions.partner_permutation`) or ``"paired"`` (the batch's
            ``cf_input_ids``). Partner activations come from a no-grad eval-mode pass: v is a constant.
        seed: seeds the partner permutation.

    ``build`` returns ``None`` while there are no scores or no feature passes the selection. The intervened
    forward keeps its graph: the KL term's gradient reaches the weights through it.
    """

    def __init__(
        self,
        tau_c: float | None = None,
        top_k: int | None = None,
        kind: CounterfactualKind = "swap",
        partner: Partner = "permutation",
        seed: int = 0,
    ) -> None:
        super().__init__(tau_c, top_k, kind, partner, seed)

    def _build(self, model: nn.Module, batch: _Batch, sites: Sites, feats: _Feats) -> CounterfactualOutput:
        """The logits of ``model`` on ``batch`` with the selected features set to v."""
        intervention = self._intervention(model, batch, sites)
        with intervene(sites, feats, intervention):
            out = model(**model_inputs(model, batch))
        return CounterfactualOutput(
            logits=out.logits, info={"n_features": _n_features(feats), "sites": list(feats)}
        )
