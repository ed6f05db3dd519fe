"""Interventions on features: mask do(h=0), scale do(h=alpha*h), swap do(h=h'), mean do(h=E[h]).

Every intervention acts on the *input* of a site's linear layer, at every token position, through a forward
pre-hook installed by a context manager that removes it in ``finally`` (the pyvene / TransformerLens habit).

Example:
    >>> import torch, transformers
    >>> from icp_lightning.core.sites import find_sites
    >>> cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
    ...                               num_attention_heads=2, intermediate_size=8)
    >>> model = transformers.BertForSequenceClassification(cfg).eval()
    >>> sites = find_sites(model, target_modules=["output.dense"], exclude_modules=["attention.output.dense"])
    >>> ids = torch.tensor([[1, 5, 7, 2]])
    >>> with intervene(sites, {"bert.encoder.layer.0.output.dense": [0, 3]}, Intervention("mask")):
    ...     masked = model(input_ids=ids).logits
    >>> bool(torch.allclose(masked, model(input_ids=ids).logits))
    False
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from icp_lightning.core.choices import INTERVENTIONS, InterventionKind
from icp_lightning.core.sites import Sites

CF_PREFIX = "cf_"


def check_alpha(alpha: Any) -> float:
    """``alpha`` of ``do(h = alpha * h)`` as a float, or a ValueError: finite and >= 0.

    ``alpha = 0`` is the mask, ``0 < alpha < 1`` damps a feature, ``alpha > 1`` amplifies it, ``alpha = 1``
    changes nothing (every effect is 0: a null check); a negative alpha flips the feature's sign, which is not a
    scaling of it.

    Example:
        >>> check_alpha(-3)
        Traceback (most recent call last):
        ...
        ValueError: alpha (the factor of the 'scale' intervention do(h = alpha * h)) must be a finite number >= 0 (0 masks, (0, 1) damps, > 1 amplifies; a negative factor flips the sign), got -3
    """
    if (
        isinstance(alpha, bool)
        or not isinstance(alpha, (int, float))
        or not math.isfinite(alpha)
        or alpha < 0
    ):
        raise ValueError(
            "alpha (the factor of the 'scale' intervention do(h = alpha * h)) must be a finite number >= 0 "
            f"(0 masks, (0, 1) damps, > 1 amplifies; a negative factor flips the sign), got {alpha!r}"
        )
    return float(alpha)


@dataclass
class Intervention:
    """What value v a feature is set to.

    Args:
        kind: ``"mask"`` (v=0), ``"scale"`` (v=alpha*h), ``"swap"`` (v=h', the same feature's activation on a
            partner input), ``"mean"`` (v=the feature's mean over a data set).
        alpha: the factor of ``"scale"``.
        source: for ``"swap"``: per site, the partner activations, same shape as the site's input.
        mean: for ``"mean"``: per site, a ``[in_features]`` vector of means.

    Example:
        >>> h = torch.ones(1, 2, 3)
        >>> Intervention("scale", alpha=0.25).value("s", h)[0, 0]
        tensor([0.2500, 0.2500, 0.2500])
    """

    kind: InterventionKind = "mask"
    alpha: float = 0.5
    source: Mapping[str, torch.Tensor] | None = field(default=None, repr=False)
    mean: Mapping[str, torch.Tensor] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in INTERVENTIONS:
            raise ValueError(f"intervention must be one of {INTERVENTIONS}, got {self.kind!r}")
        check_alpha(self.alpha)

    def value(self, site_name: str, h: torch.Tensor) -> torch.Tensor:
        """The intervened value v for every column of ``h`` (``[..., in_features]``)."""
        if self.kind == "mask":
            return torch.zeros_like(h)
        if self.kind == "scale":
            return h * self.alpha
        if self.kind == "swap":
            if self.source is None or site_name not in self.source:
                raise ValueError(
                    f"swap needs partner activations for site {site_name!r}: pass source={{site: tensor}} "
                    "(see capture_site_inputs) or let causal_effects build them (partner='permutation'|'paired')"
                )
            src = self.source[site_name]
            if src.shape != h.shape:
                raise ValueError(
                    f"swap source for {site_name!r} has shape {tuple(src.shape)} but the activation has "
                    f"{tuple(h.shape)}: partner inputs must have the same shape as the inputs"
                )
            return src.to(h.dtype)
        # mean
        if self.mean is None or site_name not in self.mean:
            raise ValueError(
                f"mean ablation needs per-feature means for site {site_name!r}: pass mean= "
                "(see mean_site_inputs) or let causal_effects compute them from the batches"
            )
        return self.mean[site_name].to(h.dtype).expand_as(h)


def _as_column_mask(sites: Sites, name: str, features: Any, device: torch.device) -> torch.Tensor:
    site = sites[name]
    if isinstance(features, torch.Tensor) and features.dtype == torch.bool:
        if features.numel() != site.n_features:
            raise ValueError(f"boolean feature mask for {name!r} must have {site.n_features} entries")
        feats = features.nonzero().reshape(-1)
    else:
        feats = torch.as_tensor(features, dtype=torch.long).reshape(-1)
    if feats.numel() and (int(feats.min()) < 0 or int(feats.max()) >= site.n_features):
        raise ValueError(
            f"feature indices for {name!r} must lie in [0, {site.n_features}), got {feats.tolist()}"
        )
    return site.column_mask(feats).to(device)


@contextmanager
def intervene(
    sites: Sites,
    features: Mapping[str, Sequence[int] | torch.Tensor],
    intervention: Intervention,
) -> Iterator[None]:
    """Set ``features`` (per site: indices or a boolean mask) to the intervention's value while inside.

    Hooks are removed in ``finally``, also when the forward raises.
    """
    handles = []
    try:
        for name, feats in features.items():
            site = sites[name]

            def pre_hook(
                module: nn.Module, args: tuple, kwargs: dict, _name: str = name, _feats: Any = feats
            ):
                h = args[0] if args else kwargs["input"]
                cols = _as_column_mask(sites, _name, _feats, h.device)
                v = intervention.value(_name, h)
                new_h = torch.where(cols, v, h)
                if args:
                    return (new_h, *args[1:]), kwargs
                kwargs = dict(kwargs)
                kwargs["input"] = new_h
                return args, kwargs

            handles.append(site.module.register_forward_pre_hook(pre_hook, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def capture_site_inputs(sites: Sites, store: dict[str, torch.Tensor], detach: bool = True) -> Iterator[None]:
    """Record each site's input activation (``[..., in_features]``) into ``store`` while inside."""
    handles = []
    try:
        for name, site in sites.items():

            def pre_hook(module: nn.Module, args: tuple, kwargs: dict, _name: str = name) -> None:
                h = args[0] if args else kwargs["input"]
                store[_name] = h.detach() if detach else h

            handles.append(site.module.register_forward_pre_hook(pre_hook, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


def model_inputs(model: nn.Module, batch: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``batch`` that ``model.forward`` accepts (``labels`` only for encoder-decoders, which
    need them to build decoder inputs), plus ``use_cache=False`` where accepted."""
    params = inspect.signature(model.forward).parameters
    takes_kwargs = any(p.kind == p.VAR_KEYWORD for p in params.values())
    is_enc_dec = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if key.startswith(CF_PREFIX) or key in ("group", "groups"):
            continue
        if key == "labels" and not is_enc_dec:
            continue
        if key in params or (takes_kwargs and key in _HF_INPUT_KEYS):
            out[key] = value
    if "use_cache" in params:
        out["use_cache"] = False
    return out


_HF_INPUT_KEYS = {
    "input_ids",
    "attention_mask",
    "token_type_ids",
    "position_ids",
    "inputs_embeds",
    "decoder_input_ids",
    "decoder_attention_mask",
    "labels",
}


def counterfactual_batch(batch: Mapping[str, Any]) -> dict[str, Any]:
    """The paired counterfactual inputs carried under ``cf_``-prefixed keys, with the prefix removed.

    Entries with no ``cf_`` twin are copied (labels, token types, ...). Shapes must match the inputs.

    Example:
        >>> b = {"input_ids": torch.ones(2, 3), "cf_input_ids": torch.zeros(2, 3), "labels": torch.ones(2)}
        >>> sorted(counterfactual_batch(b))
        ['input_ids', 'labels']
    """
    cf = {k[len(CF_PREFIX) :]: v for k, v in batch.items() if k.startswith(CF_PREFIX)}
    if "input_ids" not in cf and "inputs_embeds" not in cf:
        raise ValueError(
            "paired counterfactuals need 'cf_input_ids' (and 'cf_attention_mask') in the batch; "
            f"the batch has keys {sorted(batch)}"
        )
    for key, value in cf.items():
        orig = batch.get(key)
        if isinstance(orig, torch.Tensor) and isinstance(value, torch.Tensor) and orig.shape != value.shape:
            raise ValueError(
                f"'cf_{key}' has shape {tuple(value.shape)} but '{key}' has {tuple(orig.shape)}: paired "
                "counterfactuals must be padded to the same shape as the inputs (pad both to one length)"
            )
    out = {k: v for k, v in batch.items() if not k.startswith(CF_PREFIX)}
    out.update(cf)
    return out


def partner_permutation(n: int, seed: int = 0, device: torch.device | None = None) -> torch.Tensor:
    """A seeded in-batch partner for each example: a random cyclic shift, so nobody is its own partner
    (for ``n >= 2``).

    Example:
        >>> p = partner_permutation(5, seed=1)
        >>> bool((p != torch.arange(5)).all()), sorted(p.tolist())
        (True, [0, 1, 2, 3, 4])
    """
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=gen)
    partner = torch.empty(n, dtype=torch.long)
    partner[order] = order.roll(-1)
    return partner.to(device) if device is not None else partner


@torch.no_grad()
def site_input_sums(
    model: nn.Module,
    sites: Sites,
    batches: Iterable[Mapping[str, Any]],
    device: torch.device | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per-site float64 sum of the input activations over every non-padding token of ``batches``, and the
    token count (a ``[1]`` tensor), on the CPU: the parts of :func:`mean_site_inputs`, kept apart so that
    distributed callers can all-reduce them before dividing. Batches are moved to ``device`` if given."""
    sums = {n: torch.zeros(s.in_features, dtype=torch.float64) for n, s in sites.items()}
    counts = {n: torch.zeros(1, dtype=torch.float64) for n in sites}
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            if device is not None:
                batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
            store: dict[str, torch.Tensor] = {}
            with capture_site_inputs(sites, store):
                model(**model_inputs(model, batch))
            mask = batch.get("attention_mask")
            for name, h in store.items():
                flat = h.reshape(-1, h.shape[-1]).double()
                if isinstance(mask, torch.Tensor) and mask.shape == h.shape[:-1]:
                    flat = flat[mask.reshape(-1).bool()]
                sums[name] += flat.sum(0).cpu()
                counts[name] += flat.shape[0]
    finally:
        model.train(was_training)
    return sums, counts


def mean_site_inputs(
    model: nn.Module, sites: Sites, batches: Iterable[Mapping[str, Any]]
) -> dict[str, torch.Tensor]:
    """Per-site mean input activation over every non-padding token of ``batches`` (for ``mean`` ablation)."""
    sums, counts = site_input_sums(model, sites, batches)
    return {name: (sums[name] / counts[name].clamp_min(1.0)).float() for name in sums}
