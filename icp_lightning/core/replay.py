"""The exact engine's replay: the layers after a site, rerun for K features x N examples at once.

:func:`~icp_lightning.core.effects.causal_effects` with ``method="exact"`` computes every feature's effect
with the machinery here. How it avoids one full forward per feature (written by hand: no library replays a
suffix of an arbitrary Hugging Face model for many interventions at once; Captum and pyvene rerun the whole
model):

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

Pieces, in the order a batch meets them: :func:`_length_buckets` (trailing padding trimmed), :func:`_trace`
(the clean forward), :func:`_prefix_plan` and :class:`_Replay` (the cached prefix), :class:`_SitePatch` (the
site's rank-``group_size`` update), :class:`_FirstTokenReadout` (the BERT/RoBERTa last-layer fast path),
:class:`_RowIntervention` (the exact fallback), :class:`_Engine` (chunks of K features, the replay check) and
:class:`_Accumulator` (sums and counts per feature).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from icp_lightning.core.effect_metrics import MetricFn, check_metric_values, is_batch_metric, metric_name
from icp_lightning.core.interventions import Intervention, model_inputs
from icp_lightning.core.sites import Site, Sites

try:
    from transformers.pytorch_utils import Conv1D
except Exception:  # pragma: no cover
    Conv1D = None  # type: ignore[assignment,misc]


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


def _batch_size(batch: Mapping[str, Any]) -> int:
    for key in ("input_ids", "inputs_embeds", "labels"):
        if isinstance(batch.get(key), torch.Tensor):
            return int(batch[key].shape[0])
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.dim():
            return int(value.shape[0])
    raise ValueError(f"cannot tell the batch size: no tensor in the batch (keys {sorted(batch)})")


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
