"""Causal effects of interventions on features: exact (prefix cached, suffix replayed), gradient, screened.

``CE_i = mean over examples of m(M(x)) - m(M(x | do(h_i = v)))``.

How the exact engine avoids one full forward per feature (written by hand: no library replays a suffix of
an arbitrary Hugging Face model for many interventions at once; Captum and pyvene rerun the whole model):

1. *Trace* one clean forward per batch, recording when every submodule call starts and ends, its output,
   and each site's input ``h`` and output ``y``.
2. For a site, the *maximal* calls that ended before the site started (the embeddings, the earlier blocks, the
   attention sub-block before an FFN site, ...) are the prefix. During replay each of them returns its cached
   output, repeated K times, instead of running: the model's own forward code runs on a K*N batch, but only
   the layers after the site compute anything.
3. The site itself is not recomputed either: do(h_i = v) changes its output by ``(v - h_i) @ W[:, i]`` (a
   rank-``group_size`` update), so the patched site returns ``y + delta`` for K features x N examples at once.
4. Trailing padding columns are trimmed by sorting examples into length buckets.

A safety check replays each site once with no intervention: if that does not reproduce the clean metric (an
architecture whose prefix outputs are later modified in place, say), the site falls back to batched full
forwards with per-row interventions: slower, still exact.

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

import contextlib
import math
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

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
from icp_lightning.core.results import SiteValues
from icp_lightning.core.sites import Site, Sites

try:
    from transformers.pytorch_utils import Conv1D
except Exception:  # pragma: no cover
    Conv1D = None  # type: ignore[assignment,misc]

Method = Literal["exact", "gradient", "screened"]
Partner = Literal["permutation", "paired"]
METHODS = ("exact", "gradient", "screened")


class Effects(SiteValues):
    """Causal effects per site: ``effects[site]`` is a ``[n_features]`` float tensor of mean effects.

    Stored as float64 sums and per-feature example counts (see :class:`SiteValues`): effects over disjoint
    data add with ``+`` to the effect over the union. ``meta`` records intervention, metric, method;
    ``audit`` (screened method) says how the gradient ranking agreed with exact effects.
    """

    audit: dict[str, float] | None = None


# ----------------------------------------------------------------------------------------------------------
# Small helpers over nested outputs


def _map_tensors(obj: Any, fn: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):  # includes transformers ModelOutput
        items = {k: _map_tensors(v, fn) for k, v in obj.items()}
        try:
            return type(obj)(**items)
        except Exception:
            return items
    if isinstance(obj, tuple):
        mapped = [_map_tensors(v, fn) for v in obj]
        return type(obj)(*mapped) if hasattr(obj, "_fields") else tuple(mapped)
    if isinstance(obj, list):
        return [_map_tensors(v, fn) for v in obj]
    return obj


def _repeat_rows(obj: Any, k: int, n: int) -> Any:
    """Repeat every tensor whose first dimension is the batch size ``n`` K times: row ``k * n + i``."""

    def rep(t: torch.Tensor) -> torch.Tensor:
        if t.dim() == 0 or t.shape[0] != n:
            return t
        return t.repeat(k, *([1] * (t.dim() - 1)))

    return _map_tensors(obj, rep)


def _slice_rows(obj: Any, start: int, stop: int, total: int) -> Any:
    return _map_tensors(obj, lambda t: t[start:stop] if t.dim() and t.shape[0] == total else t)


def _to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def _batch_size(batch: Mapping[str, Any]) -> int:
    for key in ("input_ids", "inputs_embeds", "labels"):
        if isinstance(batch.get(key), torch.Tensor):
            return int(batch[key].shape[0])
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.dim():
            return int(value.shape[0])
    raise ValueError(f"cannot tell the batch size: no tensor in the batch (keys {sorted(batch)})")


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _length_buckets(
    batch: Mapping[str, Any], bucket_size: int
) -> list[tuple[torch.Tensor, dict[str, Any], int]]:
    """Split a right-padded batch into buckets of similar length, trimming trailing all-padding columns.

    Returns ``(row indices, sub-batch, kept length)`` triples. Trailing padding never changes what a real
    token computes (encoders mask padded keys; causal models never look ahead), so this is exact.
    """
    mask = batch.get("attention_mask")
    n = _batch_size(batch)
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return [(torch.arange(n), dict(batch), -1)]
    t_full = mask.shape[1]
    # Only trim when every row is right-padded (ones then zeros).
    right_padded = bool((mask[:, :-1] >= mask[:, 1:]).all()) if t_full > 1 else True
    if not right_padded:
        return [(torch.arange(n), dict(batch), -1)]
    lengths = mask.sum(1)
    order = torch.argsort(lengths.cpu(), stable=True)
    out = []
    for start in range(0, n, bucket_size):
        idx = order[start : start + bucket_size]
        keep = max(1, int(lengths[idx.to(lengths.device)].max()))
        sub: dict[str, Any] = {}
        for key, value in batch.items():
            if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == n:
                value = value[idx.to(value.device)]
                if value.dim() >= 2 and value.shape[1] == t_full:
                    value = value[:, :keep]
            sub[key] = value
        out.append((idx, sub, keep))
    return out


# ----------------------------------------------------------------------------------------------------------
# The trace: one clean forward, recording call order and outputs


@dataclass
class _Call:
    module: nn.Module
    start: int
    end: int = -1
    output: Any = None


@dataclass
class _Trace:
    calls: list[_Call] = field(default_factory=list)
    site_in: dict[str, torch.Tensor] = field(default_factory=dict)
    site_out: dict[str, torch.Tensor] = field(default_factory=dict)
    site_start: dict[str, int] = field(default_factory=dict)
    site_calls: dict[str, int] = field(default_factory=dict)
    outputs: Any = None


def _trace(model: nn.Module, inputs: Mapping[str, Any], sites: Sites) -> _Trace:
    trace = _Trace()
    clock = [0]
    open_calls: dict[int, list[_Call]] = {}
    site_by_module = {id(s.module): name for name, s in sites.items()}
    handles = []

    def pre(module: nn.Module, args: tuple, kwargs: dict) -> None:
        clock[0] += 1
        call = _Call(module, clock[0])
        trace.calls.append(call)
        open_calls.setdefault(id(module), []).append(call)
        name = site_by_module.get(id(module))
        if name is not None:
            trace.site_calls[name] = trace.site_calls.get(name, 0) + 1
            if name not in trace.site_start:
                trace.site_start[name] = clock[0]
                trace.site_in[name] = (args[0] if args else kwargs["input"]).detach()

    def post(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        clock[0] += 1
        call = open_calls[id(module)].pop()
        call.end = clock[0]
        call.output = output
        name = site_by_module.get(id(module))
        if name is not None and trace.site_calls.get(name) == 1:
            trace.site_out[name] = output.detach()

    root = model
    try:
        for module in root.modules():
            if module is root:
                continue
            handles.append(module.register_forward_pre_hook(pre, with_kwargs=True, prepend=True))
            handles.append(module.register_forward_hook(post, with_kwargs=True))
        trace.outputs = model(**inputs)
    finally:
        for h in handles:
            h.remove()
    return trace


def _prefix_plan(trace: _Trace, site_start: int) -> dict[int, tuple[nn.Module, list[Any]]]:
    """For each module: what its successive calls return during replay (a cached output, or ``None`` = run).

    The patched calls are the maximal calls that ended before the site started; calls nested inside a patched
    call never run during replay, so they are dropped from the module's sequence.
    """
    done = [c for c in trace.calls if c.end != -1 and c.end < site_start]
    done.sort(key=lambda c: c.start)
    maximal: list[_Call] = []
    reach = -1
    for c in done:
        if c.start > reach:
            maximal.append(c)
            reach = c.end
    patched_ids = {id(c) for c in maximal}
    spans = [(c.start, c.end) for c in maximal]

    def nested(c: _Call) -> bool:
        # inside a patched call (but not the call itself)
        return (
            any(s < c.start and c.end <= e for s, e in spans)
            if c.end != -1
            else any(s < c.start <= e for s, e in spans)
        )

    plan: dict[int, tuple[nn.Module, list[Any]]] = {}
    for c in trace.calls:
        if id(c) in patched_ids:
            plan.setdefault(id(c.module), (c.module, []))[1].append(_Cached(c.output))
        elif not nested(c):
            plan.setdefault(id(c.module), (c.module, []))[1].append(None)
    # Modules that are never patched need no wrapper.
    return {k: v for k, v in plan.items() if any(isinstance(x, _Cached) for x in v[1])}


@dataclass
class _Cached:
    output: Any


class _Replay:
    """Patches prefix modules (cached outputs, repeated K times) and the site (cached output + delta)."""

    def __init__(self, plan: dict[int, tuple[nn.Module, list[Any]]], k: int, n: int) -> None:
        self.plan, self.k, self.n = plan, k, n
        self.patched: list[nn.Module] = []

    def __enter__(self) -> _Replay:
        for module, seq in self.plan.values():
            orig = module.forward
            counter = [0]

            def forward(
                *args: Any, _seq: list = seq, _orig: Any = orig, _c: list = counter, **kwargs: Any
            ) -> Any:
                i = _c[0]
                _c[0] += 1
                entry = _seq[i] if i < len(_seq) else None
                if isinstance(entry, _Cached):
                    return _repeat_rows(entry.output, self.k, self.n)
                return _orig(*args, **kwargs)

            module.forward = forward  # type: ignore[method-assign]
            self.patched.append(module)
        return self

    def __exit__(self, *exc: Any) -> None:
        for module in self.patched:
            if "forward" in module.__dict__:
                del module.forward
        self.patched.clear()


class _SitePatch:
    """Replace the site's forward for K features x N examples at once.

    Plain linear layers: ``y + (v - h)[..., cols_k] @ W[:, cols_k]^T`` (the rank-``group_size`` identity, no
    recomputation of the layer). Other layers (PEFT adapters, hooked layers): the layer is recomputed on
    ``h + delta_k``, still without running anything before the site.
    """

    def __init__(
        self, site: Site, h: torch.Tensor, y: torch.Tensor, delta: torch.Tensor, feats: torch.Tensor
    ) -> None:
        self.site, self.h, self.y, self.delta, self.feats = site, h, y, delta, feats
        self.use_rank1 = _rank1_ok(site.module)

    def output(self) -> torch.Tensor:
        site, y, delta = self.site, self.y, self.delta
        n, k = y.shape[0], self.feats.numel()
        cols = _feature_columns(self.feats, site.group_size, delta.device)  # [K, g]
        d = delta.reshape(n, -1, delta.shape[-1])  # [N, P, C]
        if self.use_rank1:
            weight = site.module.weight
            assert isinstance(weight, torch.Tensor)
            w = weight[cols] if site.transposed else weight.t()[cols]  # [K, g, O]
            upd = torch.einsum("npkg,kgo->knpo", d[:, :, cols].to(w.dtype), w)
            out = y.reshape(n, -1, y.shape[-1]).unsqueeze(0) + upd.to(y.dtype)
            return out.reshape(k * n, *y.shape[1:])
        sel = torch.zeros(k, d.shape[-1], dtype=d.dtype, device=d.device).scatter_(1, cols, 1.0)
        h = self.h.reshape(n, -1, self.h.shape[-1])
        rows = (h.unsqueeze(0) + d.unsqueeze(0) * sel[:, None, None, :]).reshape(k * n, *self.h.shape[1:])
        return self._orig(rows)

    def __enter__(self) -> _SitePatch:
        module = self.site.module
        self._orig = module.forward
        module.forward = lambda *args, **kwargs: self.output()  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: Any) -> None:
        if "forward" in self.site.module.__dict__:
            del self.site.module.forward


class _FirstTokenReadout:
    """Fast path for encoders whose classification head reads only the first token (BERT, RoBERTa).

    In the last layer, keys and values still need every position, but queries, the attention output, the FFN
    and the residuals are computed for position 0 alone; the layer returns ``[B, 1, D]``, which is all the
    pooler / head reads. Written by hand because no library computes "only what the head reads". Used only when
    the site lies before the last layer; the replay check validates it like the rest of the replay.
    """

    HEADS = ("BertForSequenceClassification", "RobertaForSequenceClassification",
             "XLMRobertaForSequenceClassification")  # fmt: skip

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer

    @classmethod
    def for_site(cls, model: nn.Module, site_name: str) -> _FirstTokenReadout | None:
        if type(model).__name__ not in cls.HEADS:
            return None
        base = getattr(model, "bert", None) or getattr(model, "roberta", None)
        layers = getattr(getattr(base, "encoder", None), "layer", None)
        if not isinstance(layers, nn.ModuleList) or len(layers) < 2:
            return None
        last = layers[len(layers) - 1]
        modules = dict(model.named_modules())
        if any(m is last for n, m in modules.items() if site_name.startswith(n + ".") or n == site_name):
            return None  # the site is inside the last layer
        attn = getattr(getattr(last, "attention", None), "self", None)
        if attn is None or not all(
            hasattr(attn, a) for a in ("query", "key", "value", "attention_head_size")
        ):
            return None
        return cls(last)

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, *a: Any, **k: Any
    ) -> torch.Tensor:
        layer: Any = self.layer
        sa = layer.attention.self
        b, t, _ = hidden_states.shape
        hd = sa.attention_head_size
        first = hidden_states[:, :1]
        q = sa.query(first).view(b, 1, -1, hd).transpose(1, 2)
        key = sa.key(hidden_states).view(b, t, -1, hd).transpose(1, 2)
        val = sa.value(hidden_states).view(b, t, -1, hd).transpose(1, 2)
        mask = attention_mask
        if mask is not None and mask.dim() == 4 and mask.shape[-2] > 1:
            mask = mask[..., :1, :]
        ctx = F.scaled_dot_product_attention(q, key, val, attn_mask=mask, scale=getattr(sa, "scaling", None))
        ctx = ctx.transpose(1, 2).reshape(b, 1, -1)
        attn_out = layer.attention.output(ctx, first)
        return layer.output(layer.intermediate(attn_out), attn_out)

    def __enter__(self) -> _FirstTokenReadout:
        self.layer.forward = self.forward  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: Any) -> None:
        if "forward" in self.layer.__dict__:
            del self.layer.forward


def _feature_columns(feats: torch.Tensor, group_size: int, device: torch.device) -> torch.Tensor:
    """``[K, group_size]`` input-column indices of K features."""
    feats = feats.to(device)
    return feats[:, None] * group_size + torch.arange(group_size, device=device)[None, :]


def _rank1_ok(module: nn.Module) -> bool:
    plain = type(module) is nn.Linear or (Conv1D is not None and type(module) is Conv1D)
    return plain and not module._forward_hooks and not module._forward_pre_hooks


class _RowIntervention:
    """Fallback: a pre-hook adding a per-row delta to the site's input in a K*N batch of full forwards."""

    def __init__(self, site: Site, delta: torch.Tensor, feats: torch.Tensor) -> None:
        self.site, self.delta, self.feats = site, delta, feats

    def __enter__(self) -> _RowIntervention:
        site, feats, delta = self.site, self.feats, self.delta
        k = feats.numel()
        sel = torch.zeros(k, site.in_features, dtype=delta.dtype, device=delta.device)
        sel.scatter_(1, _feature_columns(feats, site.group_size, delta.device), 1.0)
        add = (delta.unsqueeze(0) * sel.reshape(k, *([1] * (delta.dim() - 1)), -1)).reshape(
            k * delta.shape[0], *delta.shape[1:]
        )

        def pre(module: nn.Module, args: tuple, kwargs: dict) -> Any:
            h = args[0] if args else kwargs["input"]
            new = h + add.to(h.dtype)
            if args:
                return (new, *args[1:]), kwargs
            kwargs = dict(kwargs)
            kwargs["input"] = new
            return args, kwargs

        self.handle = site.module.register_forward_pre_hook(pre, with_kwargs=True)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.handle.remove()


# ----------------------------------------------------------------------------------------------------------
# The engine


@dataclass
class _Accumulator:
    sites: Sites
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    counts: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, site in self.sites.items():
            self.sums[name] = torch.zeros(site.n_features, dtype=torch.float64)
            self.counts[name] = torch.zeros(site.n_features, dtype=torch.float64)

    def add(self, name: str, feats: torch.Tensor, total_effect: torch.Tensor, n: float) -> None:
        f = feats.cpu()
        self.sums[name].index_add_(0, f, total_effect.detach().double().cpu())
        self.counts[name].index_add_(0, f, torch.full((f.numel(),), float(n), dtype=torch.float64))


def _metric_rows(metric: MetricFn, outputs: Any, batch: Mapping[str, Any], k: int, n: int) -> torch.Tensor:
    """Per-row metric for a K*N batch, as ``[K, N]`` (per-example) or ``[K]`` (batch metric)."""
    if is_batch_metric(metric):
        vals = []
        for j in range(k):
            out_j = _slice_rows(outputs, j * n, (j + 1) * n, k * n)
            vals.append(torch.as_tensor(metric(out_j, batch)).reshape(()))
        return torch.stack(vals)
    big = _repeat_rows(dict(batch), k, n)
    m = metric(outputs, big)
    if m.shape != (k * n,):
        raise ValueError(
            f"metric {metric_name(metric)} returned shape {tuple(m.shape)} for {k * n} examples; a per-example "
            "metric must return one value per example (wrap whole-batch metrics in BatchMetric)"
        )
    return m.reshape(k, n)


def _effect_totals(m0: torch.Tensor, m: torch.Tensor, batch_metric: bool, n: int) -> torch.Tensor:
    """Sum over examples of m(clean) - m(intervened), per feature."""
    if batch_metric:
        return (m0.reshape(()) - m) * n
    return (m0.unsqueeze(0) - m).sum(1)


def _chunk_size(
    site: Site, h: torch.Tensor, n: int, budget_bytes: float, rows: int | None, width: int
) -> int:
    if rows is not None:
        return max(1, rows // max(n, 1))
    positions = max(1, h[0].numel() // h.shape[-1])
    per_row = 4.0 * positions * (6 * max(width, h.shape[-1]) + 4 * positions)
    return int(max(1, min(site.n_features, budget_bytes // (per_row * max(n, 1)))))


class _Engine:
    def __init__(
        self,
        model: nn.Module,
        sites: Sites,
        intervention: Intervention,
        metric: MetricFn,
        memory_budget_mb: float,
        rows_per_forward: int | None,
        replay: str,
    ) -> None:
        self.model, self.sites, self.intervention, self.metric = model, sites, intervention, metric
        self.budget = memory_budget_mb * 2**20
        self.rows = rows_per_forward
        self.replay = replay
        self.checked: dict[str, bool] = {}
        self.width = int(getattr(getattr(model, "config", None), "hidden_size", 0) or 0)
        self.stats = {"forwards": 0, "rows": 0, "fallback_sites": 0}

    def run_batch(
        self,
        batch: dict[str, Any],
        features: Mapping[str, torch.Tensor],
        acc: _Accumulator,
        source: Mapping[str, torch.Tensor] | None,
        bar: Any,
    ) -> None:
        model, metric = self.model, self.metric
        n = _batch_size(batch)
        inputs = model_inputs(model, batch)
        trace = _trace(model, inputs, self.sites)
        batch_metric = is_batch_metric(metric)
        m0 = check_metric_values(metric(trace.outputs, batch), metric_name(metric), n, batch_metric)
        for name, site in self.sites.items():
            feats = features.get(name)
            if feats is None or feats.numel() == 0:
                continue
            if name not in trace.site_in:
                raise RuntimeError(f"site {name!r} was never called in the forward pass")
            h = trace.site_in[name]
            iv = self.intervention
            if iv.kind == "swap" and source is not None:
                iv = Intervention("swap", source={name: source[name]})
            delta = iv.value(name, h) - h
            k = _chunk_size(site, h, n, self.budget, self.rows, self.width)
            use_replay = self.replay != "never" and trace.site_calls.get(name) == 1 and name in trace.site_out
            if use_replay and name not in self.checked:
                self.checked[name] = self._check_replay(trace, site, h, batch, m0, n)
                if not self.checked[name]:
                    self.stats["fallback_sites"] += 1
                    if self.replay == "always":
                        raise RuntimeError(f"suffix replay does not reproduce the clean forward at {name!r}")
                    warnings.warn(
                        f"suffix replay is not exact at {name!r}; using batched full forwards there",
                        stacklevel=3,
                    )
            use_replay = use_replay and self.checked.get(name, False)
            plan = _prefix_plan(trace, trace.site_start[name]) if use_replay else {}
            readout = self._readout(name)
            for start in range(0, feats.numel(), k):
                chunk = feats[start : start + k].to(h.device)
                kk = chunk.numel()
                big_inputs = _repeat_rows(inputs, kk, n)
                if use_replay:
                    with (
                        _Replay(plan, kk, n),
                        _SitePatch(site, h, trace.site_out[name], delta, chunk),
                        readout,
                    ):
                        out = model(**big_inputs)
                else:
                    with _RowIntervention(site, delta, chunk):
                        out = model(**big_inputs)
                self.stats["forwards"] += 1
                self.stats["rows"] += kk * n
                m = _metric_rows(metric, out, batch, kk, n)
                acc.add(name, chunk, _effect_totals(m0, m, batch_metric, n), n)
                bar.update(kk)

    def _readout(self, site_name: str) -> Any:
        fast = _FirstTokenReadout.for_site(self.model, site_name)
        return fast if fast is not None else contextlib.nullcontext()

    def _check_replay(
        self, trace: _Trace, site: Site, h: torch.Tensor, batch: Mapping[str, Any], m0: torch.Tensor, n: int
    ) -> bool:
        plan = _prefix_plan(trace, trace.site_start[site.name])
        zero = torch.zeros_like(h)
        feats = torch.zeros(1, dtype=torch.long, device=h.device)
        try:
            with (
                _Replay(plan, 1, n),
                _SitePatch(site, h, trace.site_out[site.name], zero, feats),
                self._readout(site.name),
            ):
                out = self.model(**model_inputs(self.model, batch))
            m = _metric_rows(self.metric, out, batch, 1, n)[0]
        except Exception as err:  # an architecture the replay cannot handle: fall back, exactly
            warnings.warn(
                f"suffix replay failed at {site.name!r} ({type(err).__name__}: {err})", stacklevel=4
            )
            return False
        scale = 1.0 + float(m0.abs().max()) if m0.numel() else 1.0
        return bool(torch.allclose(m.reshape(m0.shape), m0, atol=1e-5 * scale, rtol=1e-5))


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
    """Raise a ValueError naming the site and metric when a computed effect is NaN or inf."""
    for name, values in effects.items():
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
