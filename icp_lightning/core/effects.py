"""Causal effects of interventions on features: exact (prefix cached, suffix replayed), gradient, screened.

``CE_i = mean over examples of m(M(x)) - m(M(x | do(h_i = v)))``.

Three methods: ``exact`` (true effects; the replay machinery of :mod:`icp_lightning.core.replay` reruns only
the layers after a site, for many features at once), ``gradient`` (attribution patching: one forward and one
backward for every feature) and ``screened`` (gradient for all, exact for the gradient's top and a random
audit sample). The metric ``m`` comes from :mod:`icp_lightning.core.effect_metrics`.

Example:
    >>> import torch, transformers
    >>> from icp_lightning.core.sites import find_sites
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <...>
    >>> cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
    ...                               num_attention_heads=2, intermediate_size=8)
    >>> model = transformers.BertForSequenceClassification(cfg)
    >>> batch = {"input_ids": torch.randint(1, 50, (4, 6)), "labels": torch.tensor([0, 1, 0, 1])}
    >>> sites = find_sites(model, target_modules=r".*layer\\.1\\.output\\.dense")
    >>> effects = causal_effects(model, [batch], sites, progress=False)
    >>> effects["bert.encoder.layer.1.output.dense"].shape
    torch.Size([8])
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from icp_lightning.core.choices import METHODS, Method, Partner
from icp_lightning.core.effect_metrics import (
    MetricFn,
    check_metric_values,
    is_batch_metric,
    metric_name,
    resolve_metric,
)
from icp_lightning.core.interventions import (
    INTERVENTIONS,
    Intervention,
    InterventionKind,
    capture_site_inputs,
    counterfactual_batch,
    mean_site_inputs,
    model_inputs,
    partner_permutation,
)
from icp_lightning.core.masks import masks_folded
from icp_lightning.core.replay import (
    _Accumulator,
    _batch_size,
    _Engine,
    _length_buckets,
)
from icp_lightning.core.results import SiteValues
from icp_lightning.core.sites import Sites


class Effects(SiteValues):
    """Causal effects per site: ``effects[site]`` is a ``[n_features]`` float tensor of mean effects.

    Stored as float64 sums and per-feature example counts (see :class:`SiteValues`): effects over disjoint
    data add with ``+`` to the effect over the union. ``meta`` records intervention, metric, method;
    ``audit`` (screened method) says how the gradient ranking agreed with exact effects.
    """

    audit: dict[str, float] | None = None


def _normalise_features(
    sites: Sites, features: Mapping[str, Sequence[int] | torch.Tensor] | None
) -> dict[str, torch.Tensor]:
    out = {}
    for name, site in sites.items():
        if features is None:
            out[name] = torch.arange(site.n_features)
        elif name in features:
            f = torch.as_tensor(features[name], dtype=torch.long).reshape(-1)
            if f.numel() and (int(f.min()) < 0 or int(f.max()) >= site.n_features):
                raise ValueError(f"features for {name!r} must lie in [0, {site.n_features})")
            out[name] = f
    unknown = set(features or {}) - set(sites)
    if unknown:
        raise ValueError(f"features names unknown sites {sorted(unknown)}; sites are {sites.names}")
    return out


def _swap_source(
    model: nn.Module, sites: Sites, batch: dict[str, Any], partner: Partner, seed: int
) -> dict[str, torch.Tensor]:
    """Partner activations for ``swap``: a seeded in-batch permutation, or the batch's paired inputs."""
    store: dict[str, torch.Tensor] = {}
    if partner == "paired":
        cf = counterfactual_batch(batch)
        with torch.no_grad(), capture_site_inputs(sites, store):
            model(**model_inputs(model, cf))
        return store
    with torch.no_grad(), capture_site_inputs(sites, store):
        model(**model_inputs(model, batch))
    perm = partner_permutation(_batch_size(batch), seed)
    return {name: h[perm.to(h.device)] for name, h in store.items()}


def causal_effects(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    sites: Sites,
    intervention: InterventionKind | Intervention = "mask",
    metric: str | MetricFn = "label_logprob",
    method: Method = "exact",
    alpha: float = 0.5,
    *,
    partner: Partner = "permutation",
    mean_values: Mapping[str, torch.Tensor] | None = None,
    features: Mapping[str, Sequence[int] | torch.Tensor] | None = None,
    max_batches: int | None = None,
    seed: int = 0,
    memory_budget_mb: float = 1024.0,
    rows_per_forward: int | None = None,
    trim_padding: bool = True,
    bucket_size: int = 8,
    replay: Literal["auto", "always", "never"] = "auto",
    top_k: int = 64,
    audit: int = 64,
    progress: bool = True,
) -> Effects:
    """Causal effect of intervening on each feature of each site.

    Args:
        model: a Hugging Face (or any) model; left exactly as it was (mode, hooks, gradients).
        batches: dicts of model inputs with ``labels`` (and ``cf_*`` keys for paired swaps).
        sites: from :func:`~icp_lightning.core.sites.find_sites`.
        intervention: ``"mask"``, ``"scale"``, ``"swap"``, ``"mean"`` or an :class:`Intervention`.
        metric: a built-in name (``label_logprob``, ``label_prob``, ``accuracy``, ``neg_loss``, ``margin``,
            ``target_logprob``) or a callable ``m(outputs, batch) -> Tensor[batch]`` (or a ``BatchMetric``).
        method: ``"exact"`` (true effects, suffix replay), ``"gradient"`` (attribution patching: one forward and
            one backward for every feature), ``"screened"`` (gradient for all, exact for the gradient's ``top_k``
            plus ``audit`` random features, with agreement statistics in ``effects.audit``).
        alpha: the factor of ``scale``.
        partner: where ``swap`` takes h' from: ``"permutation"`` (seeded in-batch partner) or ``"paired"``
            (``cf_input_ids`` / ``cf_attention_mask`` in the batch).
        mean_values: per-site mean activations for ``mean`` (computed from ``batches`` when omitted).
        features: per site, which features to compute (default all); others are NaN.
        max_batches: stop after this many batches.
        seed: seeds the swap partners (batch ``b`` uses ``seed + b``) and the screened audit sample.
        memory_budget_mb: bounds K (features per forward) of the exact engine.
        rows_per_forward: fix K*N instead of using the memory budget.
        trim_padding: sort examples into length buckets of ``bucket_size`` and drop trailing padding.
        replay: ``"auto"`` (suffix replay where it checks out), ``"always"`` (error if not), ``"never"``.
        top_k, audit: for ``screened``.
        progress: show a tqdm bar.

    Returns:
        :class:`Effects`, ``effects[site]`` of shape ``[n_features]``.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if partner not in ("permutation", "paired"):
        raise ValueError(f"partner must be 'permutation' or 'paired', got {partner!r}")
    if replay not in ("auto", "always", "never"):
        raise ValueError(f"replay must be 'auto', 'always' or 'never', got {replay!r}")
    if isinstance(intervention, str):
        if intervention not in INTERVENTIONS:
            raise ValueError(f"intervention must be one of {INTERVENTIONS}, got {intervention!r}")
        intervention = Intervention(intervention, alpha=alpha)
    metric_fn = resolve_metric(metric)
    feats = _normalise_features(sites, features)
    device = _model_device(model)
    batch_list = _take(batches, max_batches, device)
    if not batch_list:
        raise ValueError("causal_effects got no batches")
    if intervention.kind == "mean" and intervention.mean is None:
        means = mean_values if mean_values is not None else mean_site_inputs(model, sites, batch_list)
        intervention = Intervention("mean", mean=means)

    meta = {
        "intervention": intervention.kind,
        "alpha": intervention.alpha if intervention.kind == "scale" else None,
        "metric": metric_name(metric),
        "method": method,
        "partner": partner if intervention.kind == "swap" else None,
        "granularity": sites.granularity,
    }
    opts = _ExactOptions(
        partner, seed, memory_budget_mb, rows_per_forward, trim_padding, bucket_size, replay, progress
    )
    was_training = model.training
    grad_flags = [p.requires_grad for p in model.parameters()]
    model.eval()
    t0 = time.perf_counter()
    folded = masks_folded(model)  # pruned features have zero weights inside: interventions on them do nothing
    folded.__enter__()
    try:
        if method == "gradient":
            acc = _gradient(model, sites, batch_list, intervention, metric_fn, partner, seed, progress)
            out = Effects(acc.sums, acc.counts, meta)
        elif method == "exact":
            acc, stats = _exact(model, sites, batch_list, intervention, metric_fn, feats, opts)
            meta.update(stats)
            out = Effects(acc.sums, acc.counts, meta)
        else:
            out = _screened(model, sites, batch_list, intervention, metric_fn, opts, top_k, audit, meta)
    finally:
        folded.__exit__(None, None, None)
        model.train(was_training)
        for p, flag in zip(model.parameters(), grad_flags):
            p.requires_grad_(flag)
    out.meta["seconds"] = time.perf_counter() - t0
    _check_finite(out, feats if method == "exact" else None)
    return out


def _check_finite(effects: Effects, features: Mapping[str, torch.Tensor] | None) -> None:
    """Raise a ValueError naming the site and metric when a computed effect is NaN or inf (features that were
    not asked for, ``features`` given without their site, stay NaN: not computed)."""
    for name, values in effects.items():
        if features is not None and name not in features:
            continue
        idx = features.get(name) if features is not None else None
        chosen = values if idx is None else values[idx]
        bad = (~torch.isfinite(chosen)).nonzero().flatten()
        if bad.numel():
            which = (bad if idx is None else idx[bad]).tolist()
            raise ValueError(
                f"effects of site {name!r} are NaN or inf for {len(which)} features (first {which[:8]}) under "
                f"intervention {effects.meta.get('intervention')!r}, metric {effects.meta.get('metric')!r}: the "
                "model's outputs or weights hold NaN/inf (check the inputs and the last training steps)"
            )


def _to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _take(batches: Iterable[Mapping[str, Any]], max_batches: int | None, device: torch.device) -> list[dict]:
    out = []
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        if not isinstance(batch, Mapping):
            raise TypeError(f"each batch must be a dict of model inputs, got {type(batch).__name__}")
        out.append(_to_device(batch, device))
    return out


@dataclass(frozen=True)
class _ExactOptions:
    """The exact engine's knobs, as given to :func:`causal_effects`."""

    partner: Partner
    seed: int
    memory_budget_mb: float
    rows_per_forward: int | None
    trim_padding: bool
    bucket_size: int
    replay: str
    progress: bool


@torch.no_grad()
def _exact(
    model: nn.Module,
    sites: Sites,
    batches: list[dict],
    intervention: Intervention,
    metric: MetricFn,
    feats: Mapping[str, torch.Tensor],
    opts: _ExactOptions,
) -> tuple[_Accumulator, dict[str, Any]]:
    partner, seed, trim_padding, bucket_size, progress = (
        opts.partner, opts.seed, opts.trim_padding, opts.bucket_size, opts.progress
    )  # fmt: skip
    engine = _Engine(
        model,
        sites,
        intervention,
        metric,
        opts.memory_budget_mb,
        opts.rows_per_forward,
        opts.replay,
    )
    acc = _Accumulator(sites)
    is_enc_dec = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    total = len(batches) * sum(int(f.numel()) for f in feats.values())
    with tqdm(total=total, desc="exact effects", unit="feat", disable=not progress, leave=False) as bar:
        for b, batch in enumerate(batches):
            source = None
            if intervention.kind == "swap":
                source = intervention.source or _swap_source(model, sites, batch, partner, seed + b)
            can_trim = trim_padding and not is_enc_dec and not is_batch_metric(metric)
            if can_trim:
                buckets = _length_buckets(batch, bucket_size)
                if len(buckets) > 1:
                    bar.total += (len(buckets) - 1) * sum(int(f.numel()) for f in feats.values())
            else:
                buckets = [(torch.arange(_batch_size(batch)), batch, -1)]
            for idx, sub, keep in buckets:
                sub_source = None
                if source is not None:
                    sub_source = {}
                    for name, h in source.items():
                        s = h[idx.to(h.device)]
                        sub_source[name] = s[:, :keep] if keep > 0 and s.dim() >= 3 else s
                engine.run_batch(sub, feats, acc, sub_source, bar)
    return acc, dict(engine.stats)


def _gradient(
    model: nn.Module,
    sites: Sites,
    batches: list[dict],
    intervention: Intervention,
    metric: MetricFn,
    partner: Partner,
    seed: int,
    progress: bool,
) -> _Accumulator:
    acc = _Accumulator(sites)
    batch_metric = is_batch_metric(metric)
    for b, batch in enumerate(tqdm(batches, desc="gradient effects", disable=not progress, leave=False)):
        n = _batch_size(batch)
        iv = intervention
        if iv.kind == "swap" and iv.source is None:
            iv = Intervention("swap", source=_swap_source(model, sites, batch, partner, seed + b))
        zs: dict[str, torch.Tensor] = {}
        hs: dict[str, torch.Tensor] = {}
        handles = []

        def pre(
            module: nn.Module, args: tuple, kwargs: dict, _name: str = "", _zs: dict = zs, _hs: dict = hs
        ) -> Any:
            h = args[0] if args else kwargs["input"]
            z = torch.zeros_like(h, requires_grad=True)
            _zs[_name], _hs[_name] = z, h.detach()
            new = h + z
            if args:
                return (new, *args[1:]), kwargs
            kwargs = dict(kwargs)
            kwargs["input"] = new
            return args, kwargs

        try:
            for name, site in sites.items():
                handles.append(
                    site.module.register_forward_pre_hook(
                        lambda m, a, k, _n=name, _pre=pre: _pre(m, a, k, _n), with_kwargs=True
                    )
                )
            with torch.enable_grad():
                out = model(**model_inputs(model, batch))
                m = check_metric_values(metric(out, batch), metric_name(metric), n, batch_metric)
                if not m.requires_grad:
                    raise ValueError(
                        f"metric {metric_name(metric)!r} is not differentiable (e.g. an arg-max), so "
                        "method='gradient' cannot attribute it: use a smooth metric ('label_logprob', 'margin', "
                        "'label_prob') or method='exact'"
                    )
                total = m.reshape(()) * n if batch_metric else m.sum()
                names = list(zs)
                grads = torch.autograd.grad(total, [zs[k] for k in names], allow_unused=True)
        finally:
            for handle in handles:
                handle.remove()
        for name, grad in zip(names, grads):
            site = sites[name]
            h = hs[name]
            if grad is None:
                contrib = torch.zeros(site.n_features)
            else:
                per_col = ((h - iv.value(name, h)) * grad).reshape(-1, h.shape[-1]).sum(0)  # [C]
                contrib = per_col.reshape(site.n_features, site.group_size).sum(1)
            acc.add(name, torch.arange(site.n_features), contrib, n)
    return acc


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two 1-D tensors (average ranks for ties).

    Example:
        >>> round(spearman(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0, 30.0, 20.0])), 6)
        0.5
    """
    if a.numel() != b.numel() or a.numel() < 2:
        return math.nan

    def ranks(x: torch.Tensor) -> torch.Tensor:
        x = x.double()
        order = torch.argsort(x, stable=True)
        r = torch.empty_like(x)
        r[order] = torch.arange(x.numel(), dtype=torch.float64)
        # average ties
        uniq, inv = torch.unique(x, return_inverse=True)
        if uniq.numel() < x.numel():
            sums = torch.zeros(uniq.numel(), dtype=torch.float64).index_add_(0, inv, r)
            cnt = torch.zeros(uniq.numel(), dtype=torch.float64).index_add_(0, inv, torch.ones_like(r))
            r = (sums / cnt)[inv]
        return r

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / denom if denom > 0 else math.nan


def _screened(
    model: nn.Module,
    sites: Sites,
    batches: list[dict],
    intervention: Intervention,
    metric: MetricFn,
    opts: _ExactOptions,
    top_k: int,
    audit: int,
    meta: dict[str, Any],
) -> Effects:
    seed = opts.seed
    grad_acc = _gradient(model, sites, batches, intervention, metric, opts.partner, seed, opts.progress)
    grad = Effects(grad_acc.sums, grad_acc.counts, meta)
    index = [(n, i) for n in sites for i in range(sites[n].n_features)]
    flat = grad.flat().double()
    order = torch.argsort(flat.abs(), descending=True, stable=True)
    top = order[: min(top_k, len(index))]
    rest = order[min(top_k, len(index)) :]
    gen = torch.Generator().manual_seed(seed)
    sample = rest[torch.randperm(rest.numel(), generator=gen)[: min(audit, rest.numel())]]
    chosen: dict[str, list[int]] = {}
    for j in torch.cat([top, sample]).tolist():
        chosen.setdefault(index[j][0], []).append(index[j][1])
    feats = {n: torch.tensor(sorted(v), dtype=torch.long) for n, v in chosen.items()}
    exact_acc, stats = _exact(model, sites, batches, intervention, metric, feats, opts)
    exact = Effects(exact_acc.sums, exact_acc.counts, meta)
    sums, counts = {}, {}
    for n in sites:
        computed = exact.counts[n] > 0
        sums[n] = torch.where(computed, exact.sums[n], grad.sums[n])
        counts[n] = torch.where(computed, exact.counts[n], grad.counts[n])
    out = Effects(sums, counts, {**meta, **stats, "top_k": top_k, "audit": audit})
    ex_flat = exact.flat().double()
    out.audit = {
        "n_exact": int(top.numel() + sample.numel()),
        "n_random_audit": int(sample.numel()),
        "spearman_random": spearman(flat[sample], ex_flat[sample]) if sample.numel() > 1 else math.nan,
        "spearman_all_exact": spearman(flat[torch.cat([top, sample])], ex_flat[torch.cat([top, sample])]),
        "top_k_precision": _top_overlap(flat, ex_flat, top, sample),
    }
    out.meta["audit"] = dict(out.audit)
    return out


def _top_overlap(grad: torch.Tensor, exact: torch.Tensor, top: torch.Tensor, sample: torch.Tensor) -> float:
    """Of the exactly computed features, the share of the exact top-|top| that the gradient also put on top."""
    both = torch.cat([top, sample])
    if top.numel() == 0:
        return math.nan
    k = top.numel()
    ex_top = both[torch.argsort(exact[both].abs(), descending=True)[:k]]
    return len(set(ex_top.tolist()) & set(top.tolist())) / k
