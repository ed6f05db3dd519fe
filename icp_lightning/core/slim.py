"""Slimming: physically remove hard-pruned FFN neurons and attention heads, and save / load the result.

After pruning (:func:`~icp_lightning.core.masks.apply_masks`), a pruned feature is a zero column of its site's
weight. :func:`slim` removes those columns together with the rows of the layers that produce them (an FFN
neuron: the up/gate projections' outputs; an attention head: its q/k/v rows and the head count bookkeeping),
so the model gets smaller and faster with the same outputs. Per-layer sizes then differ, which a Hugging Face
``config`` cannot say: :func:`save_slimmed` writes them next to the weights (``icp_slim.json``) and
:func:`load_slimmed` rebuilds the model from them.

Which layers produce an FFN site's input and how an attention module counts its heads is per-architecture
knowledge: :data:`~icp_lightning.core.architectures.ARCHITECTURES` says it (``ffn_down``, ``ffn_up``,
``attention``), and :func:`_resize_heads` knows each attention family's q/k/v projections.

Example:
    >>> import tempfile, torch, transformers
    >>> from icp_lightning.core.masks import apply_masks
    >>> from icp_lightning.core.sites import find_sites
    >>> cfg = transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2)
    >>> model = transformers.GPT2LMHeadModel(cfg).eval()
    >>> apply_masks(model, find_sites(model, granularity="head"), {"transformer.h.0.attn.c_proj": [0.0, 1.0]})
    >>> ids = torch.tensor([[1, 5, 7, 2]])
    >>> pruned = model(input_ids=ids).logits
    >>> model = slim(model)
    >>> model.transformer.h[0].attn.c_attn.weight.shape  # 2 heads of 8 columns -> 1 head, q/k/v fused
    torch.Size([16, 24])
    >>> with tempfile.TemporaryDirectory() as d:
    ...     save_slimmed(model, d)
    ...     loaded = load_slimmed(d, transformers.GPT2LMHeadModel)
    >>> bool(torch.allclose(loaded(input_ids=ids).logits, pruned, atol=1e-5))
    True
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from icp_lightning.core._guards import _column_mask, _masked_modules, _scale_columns, _uninstall
from icp_lightning.core.architectures import ARCHITECTURES, ATTENTION_LAYOUTS, site_kind
from icp_lightning.core.sites import in_features_of, is_linear, is_transposed

__all__ = ["SLIM_FILE", "load_slimmed", "save_slimmed", "slim"]

#: File written next to the weights by :func:`save_slimmed`, with the per-layer sizes.
SLIM_FILE = "icp_slim.json"


def _attn_family(model_type: str | None) -> str | None:
    """The attention family (a key of ``ATTENTION_LAYOUTS``) whose heads :func:`slim` removes, or ``None``."""
    arch = ARCHITECTURES.get(model_type or "")
    return None if arch is None else arch.attention


@torch.no_grad()
def _keep(layer: Any, idx: torch.Tensor, side: str) -> None:
    """Keep only the output features (``side="out"``) or input features (``"in"``) ``idx`` of a linear layer."""
    weight = layer.weight
    assert isinstance(weight, torch.Tensor)
    transposed = is_transposed(layer)
    idx = idx.to(weight.device)
    dim = (1 if transposed else 0) if side == "out" else (0 if transposed else 1)
    layer.weight = nn.Parameter(weight.index_select(dim, idx).clone(), requires_grad=weight.requires_grad)
    bias = getattr(layer, "bias", None)
    if side == "out" and isinstance(bias, torch.Tensor):
        layer.bias = nn.Parameter(bias.index_select(0, idx).clone(), requires_grad=bias.requires_grad)
    n = int(idx.numel())
    if transposed:
        if side == "out":
            layer.nf = n
    elif side == "out":
        layer.out_features = n
    else:
        layer.in_features = n


def _head_cols(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    return (heads[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)


def _ffn_producers(modules: Mapping[str, nn.Module], model_type: str | None, name: str) -> list[str]:
    """Names of the layers whose outputs are the inputs of FFN down-projection ``name`` (empty: not slimmable)."""
    arch = ARCHITECTURES.get(model_type or "")
    if arch is None or arch.ffn_down is None or not name.endswith(arch.ffn_down):
        return []
    prefix = name[: -len(arch.ffn_down)]
    return [prefix + s for s in arch.ffn_up if prefix + s in modules]


def _attn_module(modules: Mapping[str, nn.Module], family: str, name: str) -> Any:
    layout = ATTENTION_LAYOUTS[family]
    if not name.endswith(layout.out_proj):
        return None
    return modules.get(name[: -len(layout.out_proj)] + layout.module)


def _head_dim(family: str, attn: Any) -> int:
    return int(getattr(attn, ATTENTION_LAYOUTS[family].head_dim))


def _head_counts(family: str, attn: Any, out_proj: nn.Module) -> tuple[int, int]:
    """(query heads, key/value heads) of one attention, read from the weight shapes."""
    d = _head_dim(family, attn)
    heads = in_features_of(out_proj) // d
    return heads, (int(attn.k_proj.weight.shape[0]) // d if family == "llama" else heads)


def _resize_ffn(
    modules: Mapping[str, Any], producers: list[str], down: nn.Module, keep: torch.Tensor
) -> None:
    for p in producers:
        _keep(modules[p], keep, "out")
    _keep(down, keep, "in")
    for p in producers:  # LlamaMLP / others keep their size as an attribute: keep it truthful
        parent = modules[p.rsplit(".", 1)[0]] if "." in p else None
        if parent is not None and isinstance(getattr(parent, "intermediate_size", None), int):
            parent.intermediate_size = int(keep.numel())


def _resize_heads(
    family: str, attn: Any, out_proj: nn.Module, q_heads: torch.Tensor, kv_heads: torch.Tensor
) -> None:
    """Keep query heads ``q_heads`` and key/value heads ``kv_heads`` (indices may repeat) of one attention."""
    d = _head_dim(family, attn)
    q_cols = _head_cols(q_heads, d)
    n_q = int(q_heads.numel())
    if family == "bert":
        for proj in (attn.query, attn.key, attn.value):
            _keep(proj, q_cols, "out")
        attn.num_attention_heads = n_q
        attn.all_head_size = n_q * d
    elif family == "distilbert":
        for proj in (attn.q_lin, attn.k_lin, attn.v_lin):
            _keep(proj, q_cols, "out")
        attn.n_heads = n_q
    elif family == "gpt2":
        split = int(attn.split_size)
        _keep(attn.c_attn, torch.cat([q_cols, q_cols + split, q_cols + 2 * split]), "out")
        attn.num_heads = n_q
        attn.split_size = n_q * d
    else:  # llama-like, grouped-query attention
        kv_cols = _head_cols(kv_heads, d)
        _keep(attn.q_proj, q_cols, "out")
        _keep(attn.k_proj, kv_cols, "out")
        _keep(attn.v_proj, kv_cols, "out")
        attn.num_key_value_groups = n_q // int(kv_heads.numel())
        for attr, value in (("num_heads", n_q), ("num_key_value_heads", int(kv_heads.numel()))):
            if hasattr(attn, attr):
                setattr(attn, attr, value)
    _keep(out_proj, q_cols, "in")


def _gqa_kv_heads(q_heads: torch.Tensor, groups: int) -> torch.Tensor:
    """Key/value heads for the kept query heads: shared groups when uniform, else one copy per query head."""
    kv_of = torch.div(q_heads, groups, rounding_mode="floor")
    kv, counts = torch.unique_consecutive(kv_of, return_counts=True)
    if bool((counts == counts[0]).all()):
        return kv
    return kv_of  # non-uniform groups: duplicate kv heads so that num_key_value_groups == 1


def _plan_slim(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """Validate every mask for slimming before anything changes; return (name, module, kind)."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    modules = dict(model.named_modules())
    plan: list[tuple[str, nn.Module, str]] = []
    for name, module in _masked_modules(model):
        kind = site_kind(model_type, name)
        family = _attn_family(model_type)
        if getattr(module, "base_layer", None) is not None:
            raise NotImplementedError(
                f"cannot slim {name!r}: it is wrapped by a PEFT adapter. Merge first: "
                "masks = get_masks(model); merged = model.merge_and_unload(); apply_masks(merged, "
                "find_sites(merged), {name_in_merged: mask}); slim(merged)"
            )
        if kind == "ffn" and _ffn_producers(modules, model_type, name):
            plan.append((name, module, kind))
        elif kind == "attn" and family is not None:
            attn = _attn_module(modules, family, name)
            if attn is None or (family == "gpt2" and getattr(attn, "is_cross_attention", False)):
                raise NotImplementedError(
                    f"cannot slim attention site {name!r}: its q/k/v projections were not found"
                )
            plan.append((name, module, kind))
        else:
            raise NotImplementedError(
                f"cannot slim site {name!r} (kind {kind!r}, model_type {model_type!r}): slim removes FFN neurons "
                f"of {sorted(t for t, a in ARCHITECTURES.items() if a.ffn_down)} and attention heads of "
                f"{sorted(t for t, a in ARCHITECTURES.items() if a.attention)}. Use "
                "make_permanent(model) to fold this mask into the weights without shrinking them"
            )
    return plan


def slim(model: nn.Module) -> nn.Module:
    """Physically remove hard-pruned (mask == 0) FFN neurons and attention heads; fold the other masks.

    FFN neuron ``i`` is removed from the down-projection's input columns and the producing layers' output
    rows (BERT/RoBERTa ``intermediate.dense``, DistilBERT ``ffn.lin1``, GPT-2 ``mlp.c_fc``, LLaMA/Mistral/Qwen2
    ``mlp.gate_proj`` + ``mlp.up_proj``, T5 ``DenseReluDense.wi`` or ``wi_0`` + ``wi_1``). Attention head ``h``
    (all its ``head_dim`` columns zero; a neuron-granularity mask on an attention site removes only whole zero
    heads) is removed from the q/k/v rows (GPT-2: the fused ``c_attn``) and the output projection's columns,
    and the attention module's head count bookkeeping is updated (BERT/RoBERTa, DistilBERT, GPT-2, LLaMA-like).
    With grouped-query attention, a key/value head goes when all its query heads go; if the kept query heads
    no longer split evenly over the kept key/value heads, each kept query head gets its own copy of its
    key/value head (``num_key_value_groups = 1``), which is exact. A layer whose features are all pruned keeps
    one, with a zero column, so shapes stay valid. Soft factors are folded into the weights; all masks are
    removed. Outputs equal the masked model's up to float rounding.

    Works in place and returns ``model``. Per-layer sizes may differ afterwards, which ``config`` cannot say:
    save with :func:`save_slimmed` and load with :func:`load_slimmed`.

    Raises:
        NotImplementedError: a masked site that is neither a supported FFN down-projection nor a supported
            attention output projection (e.g. T5 heads, whose relative position bias is shared by all layers),
            or a PEFT-wrapped site. Raised before anything changes.

    Example:
        >>> import torch, transformers
        >>> from icp_lightning.core.masks import apply_masks
        >>> from icp_lightning.core.sites import find_sites
        >>> cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
        ...                               num_attention_heads=2, intermediate_size=8)
        >>> model = transformers.BertForSequenceClassification(cfg).eval()
        >>> sites = find_sites(model, target_modules=["output.dense"], exclude_modules=["attention.output.dense"])
        >>> apply_masks(model, sites, {"bert.encoder.layer.0.output.dense": torch.tensor([1.0, 0, 0, 1, 1, 1, 1, 1])})
        >>> ids = torch.tensor([[1, 5, 7, 2]])
        >>> masked = model(input_ids=ids).logits
        >>> model = slim(model)
        >>> model.bert.encoder.layer[0].intermediate.dense.weight.shape
        torch.Size([6, 16])
        >>> bool(torch.allclose(model(input_ids=ids).logits, masked, atol=1e-6))
        True
    """
    plan = _plan_slim(model)
    if not plan:
        return model
    config = getattr(model, "config", None)
    model_type = str(getattr(config, "model_type", ""))
    modules = dict(model.named_modules())
    for name, module, kind in plan:
        col = _column_mask(module).detach().cpu()
        _scale_columns(module, col)  # re-zero pruned columns (soft factors are already in the weights)
        _uninstall(module)
        if kind == "ffn":
            keep = col.ne(0).nonzero().reshape(-1)
            if keep.numel() == 0:
                keep = torch.zeros(1, dtype=torch.long)
            _resize_ffn(modules, _ffn_producers(modules, model_type, name), module, keep)
            continue
        family = _attn_family(model_type)
        assert family is not None
        attn = _attn_module(modules, family, name)
        assert attn is not None
        d = _head_dim(family, attn)
        q_heads = col.view(-1, d).ne(0).any(dim=1).nonzero().reshape(-1)
        if q_heads.numel() == 0:
            q_heads = torch.zeros(1, dtype=torch.long)
        kv_heads = q_heads
        if family == "llama":
            kv_heads = _gqa_kv_heads(q_heads, int(attn.num_key_value_groups))
        _resize_heads(family, attn, module, q_heads, kv_heads)
    return model


def _layer_sizes(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Per-layer sizes of every FFN and (supported) attention site, read from the weight shapes."""
    config = getattr(model, "config", None)
    model_type = str(getattr(config, "model_type", ""))
    modules = dict(model.named_modules())
    sizes: dict[str, dict[str, Any]] = {}
    for name, module in modules.items():
        if not name or not is_linear(module):
            continue
        kind = site_kind(model_type, name)
        family = _attn_family(model_type)
        if kind == "ffn" and _ffn_producers(modules, model_type, name):
            sizes[name] = {"kind": "ffn", "features": in_features_of(module)}
        elif kind == "attn" and family is not None:
            attn = _attn_module(modules, family, name)
            if attn is None:
                continue
            heads, kv = _head_counts(family, attn, module)
            sizes[name] = {"kind": "attn", "heads": heads, "kv_heads": kv}
    return sizes


def save_slimmed(model: nn.Module, directory: str | os.PathLike[str], **save_kwargs: Any) -> None:
    """Save a (slimmed) Hugging Face model: ``save_pretrained`` plus ``icp_slim.json`` with per-layer sizes.

    ``icp_slim.json`` records, for every FFN down-projection its number of neurons and for every attention
    output projection its query and key/value head counts; :func:`load_slimmed` rebuilds the model from the
    config, resizes those layers, then loads the weights. (``from_pretrained`` alone would fail on the shape
    mismatch, since a config has one ``intermediate_size`` / head count for all layers.)

    Args:
        model: a ``transformers.PreTrainedModel`` without masks (call :func:`slim` or
            :func:`make_permanent` first).
        directory: where to write.
        **save_kwargs: passed to ``save_pretrained``.

    Raises:
        ValueError: masks are still installed, or the model has no ``save_pretrained``.

    Example:
        >>> import tempfile, torch, transformers
        >>> cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
        ...                               num_attention_heads=2, intermediate_size=8)
        >>> model = transformers.BertForSequenceClassification(cfg).eval()
        >>> with tempfile.TemporaryDirectory() as d:
        ...     save_slimmed(model, d)
        ...     loaded = load_slimmed(d, transformers.BertForSequenceClassification)
        >>> type(loaded).__name__
        'BertForSequenceClassification'
    """
    if _masked_modules(model):
        raise ValueError(
            "the model still has masks: call slim(model) (or make_permanent(model)) before save_slimmed, or "
            "save model.state_dict() and restore it with load_masks_state"
        )
    save = getattr(model, "save_pretrained", None)
    if save is None:
        raise ValueError(f"save_slimmed needs a Hugging Face PreTrainedModel, got {type(model).__name__}")
    save(directory, **save_kwargs)
    spec = {
        "format": "icp_slim",
        "version": 1,
        "model_class": type(model).__name__,
        "model_type": getattr(getattr(model, "config", None), "model_type", None),
        "layers": _layer_sizes(model),
    }
    (Path(directory) / SLIM_FILE).write_text(json.dumps(spec, indent=2))


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if (directory / "model.safetensors").exists():
        return load_file(directory / "model.safetensors")
    index = directory / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        out: dict[str, torch.Tensor] = {}
        for shard in shards:
            out.update(load_file(directory / shard))
        return out
    if (directory / "pytorch_model.bin").exists():
        return torch.load(directory / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise ValueError(
        f"no model.safetensors(.index.json) or pytorch_model.bin in {directory}: save with save_slimmed"
    )


def _build(model_cls: Any, config: Any) -> nn.Module:
    if hasattr(model_cls, "from_config"):  # Auto* classes
        return model_cls.from_config(config)
    if hasattr(model_cls, "_from_config"):
        return model_cls._from_config(config)
    return model_cls(config)


def load_slimmed(directory: str | os.PathLike[str], model_cls: Any) -> nn.Module:
    """Load a model written by :func:`save_slimmed`, with its non-uniform per-layer sizes.

    Builds ``model_cls`` from the saved config, resizes each layer listed in ``icp_slim.json``, loads the
    weights (strictly: only tied weights such as a tied ``lm_head`` may be absent from the files) and returns
    the model in eval mode.

    Args:
        directory: what ``save_slimmed`` wrote.
        model_cls: the class that was saved (``BertForSequenceClassification``) or an ``AutoModel*`` class for
            the same head.

    Raises:
        ValueError: no ``icp_slim.json``, a layer name that the built model lacks (another ``model_cls``), or
            weights that do not fit.

    Example:
        See :func:`save_slimmed`.
    """
    import transformers

    directory = Path(directory)
    spec_file = directory / SLIM_FILE
    if not spec_file.exists():
        raise ValueError(
            f"{spec_file} not found: this directory was not written by save_slimmed; use "
            "model_cls.from_pretrained for an unslimmed model"
        )
    spec = json.loads(spec_file.read_text())
    config = transformers.AutoConfig.from_pretrained(directory)
    model = _build(model_cls, config)
    model_type = str(getattr(config, "model_type", ""))
    modules = dict(model.named_modules())
    for name, entry in spec["layers"].items():
        module = modules.get(name)
        if module is None:
            raise ValueError(
                f"layer {name!r} of {SLIM_FILE} is not in {type(model).__name__}: the model was saved as "
                f"{spec.get('model_class')}; pass that class (or its Auto class) as model_cls"
            )
        if entry["kind"] == "ffn":
            n = int(entry["features"])
            if n != in_features_of(module):
                keep = torch.arange(n) % in_features_of(module)  # any valid index: weights are loaded next
                _resize_ffn(modules, _ffn_producers(modules, model_type, name), module, keep)
        else:
            family = _attn_family(model_type)
            assert family is not None, (
                f"{SLIM_FILE} lists attention heads of {model_type!r}, which slim keeps"
            )
            attn = _attn_module(modules, family, name)
            assert attn is not None
            n_now, kv_now = _head_counts(family, attn, module)
            heads, kv = int(entry["heads"]), int(entry["kv_heads"])
            if (heads, kv) != (n_now, kv_now):
                _resize_heads(family, attn, module, torch.arange(heads) % n_now, torch.arange(kv) % kv_now)
    state = _read_weights(directory)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:
        raise ValueError(
            f"the weights in {directory} do not fit the resized {type(model).__name__}: {err}"
        ) from err
    if result.unexpected_keys:
        raise ValueError(
            f"unexpected weights {result.unexpected_keys} in {directory} for {type(model).__name__}"
        )
    loaded = {p.data_ptr() for k, p in model.state_dict().items() if k in state}
    untied = [k for k in result.missing_keys if model.state_dict()[k].data_ptr() not in loaded]
    if untied:
        raise ValueError(f"weights {untied} missing from {directory}")
    return model.eval()
