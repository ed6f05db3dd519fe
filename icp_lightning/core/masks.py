"""Structured input-column masks: hard prune, soft reweight, fold, slim.

A mask is one value per feature of a site (``Site.n_features``): ``0`` prunes the feature, ``1`` keeps it, a
factor in between reweights it. Feature ``i`` of a site owns the input columns ``Site.columns(i)`` of the
site's linear layer (one column for a neuron, ``head_dim`` columns for an attention head).

Design: **the weights are the truth.** A pruned model must stay pruned on every path out of the process
(``save_pretrained``, a Lightning checkpoint loaded by a class that knows nothing of ICP, ``torch.save`` of a
``state_dict``, PEFT ``merge_and_unload``, ONNX, ...). Every exporter copies weights, so the pruning lives in the
weights themselves, and exporters are right by construction:

* :func:`apply_masks` multiplies the mask into the weight columns at once (``W[:, i] *= m_i``; for a PEFT LoRA
  wrapper also the columns of every adapter's ``lora_A``, so ``B @ A`` has the same zero columns and a merge
  keeps them). A soft factor is a one-time reweighting of the weights; a hard ``0`` zeroes the columns.
* A **guard** keeps hard-pruned columns zero while training goes on: a non-persistent buffer ``icp_mask``
  (the cumulative mask, ``[n_features]``) and a forward pre-hook that multiplies the module's input by
  ``icp_mask != 0`` (one elementwise product; soft factors are already in the weights, so the guard is 0/1).
  The pruned input is zero, so the gradient of a pruned column is exactly zero; with ``optimizers=`` the
  optimizer's per-parameter state (AdamW moments, SGD momentum) is zeroed on those columns too, so no step
  moves them (weight decay of zero is zero). :func:`enforce_masks` re-zeroes pruned columns (the pruning
  callback calls it after every training batch, which also covers optimizers whose state we cannot see).
* The buffer is **not persistent**: ``state_dict()`` holds only the model's own keys, so any loader (strict
  ``load_state_dict``, ``from_pretrained``, ``load_from_checkpoint``) takes it and computes the pruned
  outputs. To keep training a reloaded model with its guards, call :func:`restore_masks` (it finds the
  all-zero feature columns); the pruning callback keeps its masks in its own state and re-installs them on
  resume. :func:`load_masks_state` still reads state dicts written by earlier versions (with ``icp_mask``
  keys and unfolded weights): it folds those masks into the weights as it loads.
* A pruned feature cannot be revived (its weights are zero): :func:`apply_masks` refuses to raise a mask
  from 0, and :func:`remove_masks` removes the guards but keeps the weights as they are. To try masks and
  undo them, use :func:`temporary_masks`, which restores the weights bit for bit.

Other properties:
    * PEFT LoRA: masks are put on the adapter *wrapper* that ``find_sites`` returns, so the base path and the
      adapter path ``lora_B(lora_A(dropout(h)))`` both read the guarded input. A mask put on a plain
      ``nn.Linear`` that PEFT later wraps (masks applied before ``get_peft_model``) is moved to the wrapper by
      the next :func:`apply_masks` / :func:`enforce_masks` call, which also zeroes the new ``lora_A`` columns.
    * DDP replicates the fold; FSDP2 (``fully_shard``, DTensor parameters) folds shard by shard (every rank
      calls); FSDP1 (``FullyShardedDataParallel``, flat parameters) must fold inside
      ``FullyShardedDataParallel.summon_full_params(model, writeback=True)`` (the callbacks do).
    * Hooks are removed by identity of the hook function, not through a stored handle, so removal also works
      on a ``copy.deepcopy`` or an unpickled model.

Example:
    >>> import torch, transformers
    >>> from icp_lightning.core.sites import find_sites
    >>> cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
    ...                               num_attention_heads=2, intermediate_size=8)
    >>> model = transformers.BertForSequenceClassification(cfg).eval()
    >>> sites = find_sites(model)
    >>> name = "bert.encoder.layer.0.output.dense"
    >>> apply_masks(model, sites, {name: torch.tensor([1.0, 0, 1, 1, 0, 1, 1, 1])})
    >>> get_masks(model)[name].tolist()
    [1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0]
    >>> sites[name].module.weight[:, 1].abs().sum().item()  # the weights themselves are pruned
    0.0
    >>> [k for k in model.state_dict() if "icp_mask" in k]  # nothing an exporter would drop
    []
    >>> remove_masks(model)
    >>> get_masks(model), sites[name].module.weight[:, 1].abs().sum().item()
    ({}, 0.0)
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from icp_lightning.core.sites import (  # Site: used by the doctests
    DEFAULT_TARGETS,
    Site,  # noqa: F401
    Sites,
    in_features_of,
    is_linear,
    is_transposed,
    module_name,
    named_modules,
)

try:  # DTensor parameters (FSDP2 ``fully_shard``, tensor parallel).
    from torch.distributed.tensor import DTensor, distribute_tensor
except Exception:  # pragma: no cover - torch without distributed support
    DTensor = None  # type: ignore[assignment,misc]
    distribute_tensor = None  # type: ignore[assignment]

__all__ = [
    "MASK_BUFFER",
    "SLIM_FILE",
    "apply_masks",
    "effective_weight",
    "get_masks",
    "load_masks_state",
    "load_slimmed",
    "make_permanent",
    "enforce_masks",
    "fold_legacy_masks",
    "remove_masks",
    "restore_masks",
    "save_slimmed",
    "slim",
    "temporary_masks",
]

#: Name of the per-feature mask buffer registered on each masked module (``<module>.icp_mask``).
MASK_BUFFER = "icp_mask"
#: Name of the 0/1 guard buffer the forward pre-hook multiplies the input by (``icp_mask != 0``).
GUARD_BUFFER = "icp_guard"
#: File written next to the weights by :func:`save_slimmed`, with the per-layer sizes.
SLIM_FILE = "icp_slim.json"

# ----------------------------------------------------------------------------------------------------------
# The hook and its bookkeeping
# ----------------------------------------------------------------------------------------------------------

_INPUT_KWARGS = ("input", "x", "hidden_states")


def _mask_input(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``h * mask`` over the last dim, ``mask`` having one value per feature (a block of columns)."""
    if mask.dtype != h.dtype or mask.device != h.device:  # e.g. autocast / mixed precision inputs
        mask = mask.to(device=h.device, dtype=h.dtype)
    n_features, n_cols = mask.shape[0], h.shape[-1]
    if n_features == n_cols:
        return h * mask
    # Heads: view h as [..., n_heads, head_dim] and broadcast; still one elementwise product.
    return (h.unflatten(-1, (n_features, n_cols // n_features)) * mask.unsqueeze(-1)).flatten(-2)


def _guard(mask: torch.Tensor) -> torch.Tensor:
    """The 0/1 guard of a cumulative mask: soft factors are already in the weights, pruned features are not."""
    return (mask != 0).to(mask.dtype)


def _mask_pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Forward pre-hook: zero the module's input on its hard-pruned features (``icp_mask == 0``)."""
    guard = module._buffers[GUARD_BUFFER]
    assert guard is not None
    if args:
        return (_mask_input(args[0], guard), *args[1:]), kwargs
    for key in _INPUT_KWARGS:
        if key in kwargs:
            kwargs = dict(kwargs)
            kwargs[key] = _mask_input(kwargs[key], guard)
            return args, kwargs
    raise RuntimeError(
        f"masked module {type(module).__name__} was called without a positional input and none of the "
        f"keywords {_INPUT_KWARGS}: call it as module(h)"
    )


def _is_mask_hook(hook: object) -> bool:
    # Identity, or the same function after a module reload.
    return hook is _mask_pre_hook or (
        getattr(hook, "__name__", None) == "_mask_pre_hook" and getattr(hook, "__module__", None) == __name__
    )


def _has_mask(module: nn.Module) -> bool:
    return module._buffers.get(MASK_BUFFER) is not None


def _masked_modules(model: nn.Module, warn: bool = True) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every masked module; names without FSDP1 / checkpoint wrapper segments."""
    found = [(module_name(n), m) for n, m in model.named_modules() if _has_mask(m)]
    stray = [n for n, _ in found if n.endswith(".base_layer")]
    if stray and warn:
        warnings.warn(
            f"masks sit on PEFT base layers {stray} (applied before get_peft_model): the adapter path reads the "
            "unmasked input until apply_masks or enforce_masks moves them to the adapter wrappers",
            stacklevel=3,
        )
    return found


def _relocate_stray(model: nn.Module) -> None:
    """Move masks from PEFT ``base_layer`` modules to their LoRA wrappers and zero the adapters' columns."""
    modules = named_modules(model)
    for name, module in _masked_modules(model, warn=False):
        parent = modules.get(name[: -len(".base_layer")]) if name.endswith(".base_layer") else None
        if parent is None or not _is_lora(parent) or getattr(parent, "lora_variant", None):
            continue
        mask = module._buffers[MASK_BUFFER]
        assert mask is not None
        _uninstall(module)
        _install(parent, mask)
        _scale_columns(parent, _column_values(parent, _guard(mask)), base=False)


def _weight_of(module: nn.Module) -> torch.Tensor:
    base = getattr(module, "base_layer", None)
    layer = base if isinstance(base, nn.Module) and is_linear(base) else module
    weight = layer.weight
    assert isinstance(weight, torch.Tensor)
    return weight


def _check_unflattened(name: str, module: nn.Module) -> None:
    """Raise unless the weights of ``module`` are 2-D (not FSDP1 flat shards)."""
    weights = [_weight_of(module)]
    if _is_lora(module):
        lora: Any = module
        weights += [a.weight for a in lora.lora_A.values()]
    if any(w.ndim != 2 for w in weights):
        raise ValueError(
            f"the weight of {name!r} has shape {list(weights[0].shape)}, not [out, in]: an FSDP1 "
            "(FullyShardedDataParallel) flat shard. Call this on every rank inside "
            "FullyShardedDataParallel.summon_full_params(model, writeback=True)"
        )


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (a collective), else the tensor itself."""
    return tensor.full_tensor() if DTensor is not None and isinstance(tensor, DTensor) else tensor


def _install(module: nn.Module, per_feature: torch.Tensor) -> None:
    """Register (or replace) the guard: the non-persistent mask buffer and the pre-hook. Weights untouched."""
    weight = _weight_of(module)
    dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
    device = (
        weight.to_local().device if DTensor is not None and isinstance(weight, DTensor) else weight.device
    )
    value = per_feature.detach().to(device=device, dtype=dtype).clone()
    current = module._buffers.get(MASK_BUFFER)
    if current is not None and current.shape == value.shape:
        with torch.no_grad():  # in place: DDP and optimizers that hold the buffer see the new values
            current.copy_(value.to(current.dtype))
            module._buffers[GUARD_BUFFER].copy_(_guard(current))  # type: ignore[union-attr]
    else:
        module._buffers.pop(MASK_BUFFER, None)
        module.register_buffer(MASK_BUFFER, value, persistent=False)
        module.register_buffer(GUARD_BUFFER, _guard(value), persistent=False)
    if not any(_is_mask_hook(h) for h in module._forward_pre_hooks.values()):
        module.register_forward_pre_hook(_mask_pre_hook, with_kwargs=True)


def _uninstall(module: nn.Module) -> None:
    for key, hook in list(module._forward_pre_hooks.items()):
        if _is_mask_hook(hook):
            del module._forward_pre_hooks[key]
            module._forward_pre_hooks_with_kwargs.pop(key, None)
    module._buffers.pop(MASK_BUFFER, None)
    module._buffers.pop(GUARD_BUFFER, None)


def _column_values(module: nn.Module, per_feature: torch.Tensor) -> torch.Tensor:
    """Per-feature values expanded to one value per input column (``Site.expand``)."""
    n_in = in_features_of(module)
    return per_feature.repeat_interleave(n_in // per_feature.shape[0])


def _column_mask(module: nn.Module) -> torch.Tensor:
    """The module's guard (0/1) expanded to one value per input column."""
    mask = module._buffers[MASK_BUFFER]
    assert mask is not None
    return _column_values(module, _guard(mask))


def _is_wrapped_linear(module: nn.Module) -> bool:
    base = getattr(module, "base_layer", None)
    return isinstance(base, nn.Module) and is_linear(base)


def _is_lora(module: nn.Module) -> bool:
    return isinstance(getattr(module, "lora_A", None), nn.ModuleDict)


def _check_foldable(name: str, module: nn.Module) -> None:
    """Raise unless folding the input mask into the weights is exact for this module."""
    base = getattr(module, "base_layer", None)
    if not (isinstance(base, nn.Module) and is_linear(base)):
        return
    if not _is_lora(module):
        raise NotImplementedError(
            f"{name!r} is a {type(module).__name__} adapter wrapper: only PEFT LoRA adapters can be folded. "
            "Merge the adapter first (model.merge_and_unload()), then apply the masks again and fold"
        )
    variants = {a: type(v).__name__ for a, v in getattr(module, "lora_variant", {}).items() if v is not None}
    if variants:
        raise NotImplementedError(
            f"{name!r} uses LoRA variants {variants} (e.g. DoRA), whose output is not linear in the weight "
            "columns: merge the adapter first (model.merge_and_unload()), apply the masks again, then fold"
        )


@torch.no_grad()
def _scale_(weight: torch.Tensor, factor: torch.Tensor, dim: int) -> None:
    """In place ``weight *= factor`` along ``dim`` (``factor`` 1-D); DTensor weights scale their own shard."""
    shape = [1] * weight.ndim
    shape[dim] = -1
    if DTensor is not None and isinstance(weight, DTensor):
        local = weight.to_local()
        full = (
            factor.to(device=local.device, dtype=weight.dtype).view(shape).expand(weight.shape).contiguous()
        )
        # src_data_rank=None: every rank cuts its own shard from the (identical) full tensor, no communication.
        dfactor = distribute_tensor(full, weight.device_mesh, weight.placements, src_data_rank=None)
        weight.mul_(dfactor)
        return
    weight.mul_(factor.to(device=weight.device, dtype=weight.dtype).view(shape))


def _column_tensors(module: nn.Module, base: bool = True) -> list[tuple[torch.Tensor, int]]:
    """``(parameter, input-column dim)`` of the module's weight (``base``) and of every LoRA ``lora_A``."""
    out = []
    if base:
        wrapped = getattr(module, "base_layer", None)
        layer = wrapped if isinstance(wrapped, nn.Module) and is_linear(wrapped) else module
        out.append((_weight_of(module), 0 if is_transposed(layer) else 1))
    if _is_lora(module):
        lora: Any = module
        # lora_A is an nn.Linear(in, r), also for fan_in_fan_out layers
        out += [(a.weight, 1) for a in lora.lora_A.values()]
    return out


def _scale_columns(module: nn.Module, col: torch.Tensor, base: bool = True) -> None:
    """``W[:, j] *= col[j]`` on the module's weight and its LoRA ``lora_A`` weights (``B @ (A * c) == (B @ A) * c``)."""
    for weight, dim in _column_tensors(module, base):
        _scale_(weight, col, dim)


def _zero_optimizer_state(module: nn.Module, col: torch.Tensor, optimizers: Sequence[Any]) -> None:
    """Scale the per-parameter optimizer state (moments, momentum) of the module's columns by ``col`` (0/1)."""
    for weight, dim in _column_tensors(module):
        for optimizer in optimizers:
            state = getattr(optimizer, "state", {}).get(weight, {})
            for value in state.values():
                if isinstance(value, torch.Tensor) and value.shape == weight.shape and value.ndim == 2:
                    _scale_(value, col, dim)


# ----------------------------------------------------------------------------------------------------------
# Public API: apply, read, enforce, restore, remove
# ----------------------------------------------------------------------------------------------------------


def _check_values(
    model: nn.Module, sites: Sites, values: Mapping[str, torch.Tensor | Sequence[float]]
) -> list[tuple[str, nn.Module, torch.Tensor]]:
    """``(name, module, [n_features] float CPU values)`` for each entry, or a ValueError naming what is wrong."""
    if not isinstance(values, Mapping):
        raise ValueError(
            f"values must be a mapping site name -> [n_features] tensor, got {type(values).__name__}"
        )
    unknown = [n for n in values if n not in sites]
    if unknown:
        raise ValueError(
            f"unknown sites {unknown}: values must be keyed by site names, which are {sites.names}"
        )
    owned = {id(m) for m in model.modules()}
    prepared: list[tuple[str, nn.Module, torch.Tensor]] = []
    for name, raw in values.items():
        site = sites[name]
        if id(site.module) not in owned:
            raise ValueError(
                f"site {name!r} belongs to another model: call find_sites on the model you pass to "
                "apply_masks (after any get_peft_model / wrapping)"
            )
        value = torch.as_tensor(raw.detach() if isinstance(raw, torch.Tensor) else raw).float().cpu()
        if value.shape != (site.n_features,):
            hint = (
                f" ({site.n_features} heads x {site.group_size} columns: pass one value per head)"
                if site.group_size > 1
                else ""
            )
            raise ValueError(
                f"mask values for {name!r} must have shape [{site.n_features}] (one per feature{hint}), "
                f"got {list(value.shape)}"
            )
        if not bool(torch.isfinite(value).all()) or value.numel() and (value.min() < 0 or value.max() > 1):
            raise ValueError(
                f"mask values for {name!r} must lie in [0, 1] (0 prunes a feature, 1 keeps it, a factor in "
                f"between reweights it); got min {value.min().item()}, max {value.max().item()}"
            )
        prepared.append((name, site.module, value))
    return prepared


def apply_masks(
    model: nn.Module,
    sites: Sites,
    values: Mapping[str, torch.Tensor | Sequence[float]],
    optimizers: Sequence[torch.optim.Optimizer] = (),
) -> None:
    """Prune (0) or reweight (factors in [0, 1]) the features of ``sites``, in the weights themselves.

    ``values`` are *cumulative* masks: calling again with a site's new mask multiplies the weights by
    ``new / old`` (a feature already at 0 stays at 0), and installs the guard that keeps hard-pruned columns
    zero during training (see the module notes). Other sites keep theirs. Nothing changes unless every value
    is valid.

    Args:
        model: the model that owns the sites (for a PEFT model, the wrapped model: see the module notes).
        sites: from ``find_sites(model, ...)``.
        values: site name -> ``[n_features]`` tensor of per-feature values in ``[0, 1]``.
        optimizers: optimizers training ``model``: their per-parameter state (AdamW moments, momentum) is
            zeroed on the pruned columns, so no later step moves them.

    Raises:
        ValueError: an unknown site name, a value of the wrong length, a value outside ``[0, 1]`` or not
            finite, a site whose module is not part of ``model``, or a raise of a pruned feature above 0.

    Example:
        >>> import torch, transformers
        >>> from icp_lightning.core.sites import find_sites
        >>> cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
        ...                               num_attention_heads=2, intermediate_size=8)
        >>> model = transformers.BertForSequenceClassification(cfg).eval()
        >>> heads = find_sites(model, granularity="head")
        >>> apply_masks(model, heads, {"bert.encoder.layer.0.attention.output.dense": [1.0, 0.0]})
        >>> apply_masks(model, heads, {"bert.encoder.layer.0.attention.output.dense": [1.0, 2.0]})
        Traceback (most recent call last):
        ...
        ValueError: mask values for 'bert.encoder.layer.0.attention.output.dense' must lie in [0, 1] (0 prunes a feature, 1 keeps it, a factor in between reweights it); got min 1.0, max 2.0
    """
    prepared = _check_values(model, sites, values)
    _relocate_stray(model)
    for name, module, value in prepared:
        _check_foldable(name, module)
        _check_unflattened(name, module)
        old = module._buffers.get(MASK_BUFFER)
        old = torch.ones_like(value) if old is None else old.detach().float().cpu()
        revived = ((old == 0) & (value > 0)).nonzero().flatten().tolist()
        if revived:
            raise ValueError(
                f"features {revived} of {name!r} are pruned (their weights are zero) and cannot be given a "
                "mask above 0: masks are cumulative; rebuild the model from unpruned weights to undo pruning "
                "(or use temporary_masks to try masks and restore the weights)"
            )
    for _, module, value in prepared:
        old = module._buffers.get(MASK_BUFFER)
        old = torch.ones_like(value) if old is None else old.detach().float().cpu()
        factor = torch.where(old > 0, value / old.clamp_min(1e-30), torch.zeros_like(value))
        _scale_columns(module, _column_values(module, factor))
        _zero_optimizer_state(module, _column_values(module, _guard(value)), optimizers)
        _install(module, value)


def enforce_masks(model: nn.Module) -> None:
    """Re-zero the hard-pruned columns of every masked module (and its LoRA ``lora_A`` columns).

    A no-op on weights that are already right. The pruning callback calls it after every training batch;
    call it after ``optimizer.step()`` in your own loop when the optimizer keeps state that
    :func:`apply_masks` could not zero (or you did not pass ``optimizers=``). It also moves masks that sit on
    PEFT base layers to their adapter wrappers.

    Example:
        >>> import torch
        >>> layer = torch.nn.Linear(3, 2)
        >>> apply_masks(layer, Sites([Site("", layer, 3)]), {"": torch.tensor([1.0, 0.0, 1.0])})
        >>> with torch.no_grad():
        ...     _ = layer.weight.add_(1.0)  # an optimizer step that moved a pruned column
        >>> enforce_masks(layer)
        >>> layer.weight[:, 1].abs().sum().item()
        0.0
    """
    _relocate_stray(model)
    for name, module in _masked_modules(model):
        mask = module._buffers[MASK_BUFFER]
        assert mask is not None
        if bool((mask != 0).all()):
            continue
        _check_unflattened(name, module)
        _scale_columns(module, _column_mask(module))


def restore_masks(
    model: nn.Module, sites: Sites, values: Mapping[str, torch.Tensor | Sequence[float]] | None = None
) -> dict[str, torch.Tensor]:
    """Install the guards of masks whose values the weights already carry (a reloaded pruned model).

    The one call to make after ``fresh.load_state_dict(pruned.state_dict())`` (or ``from_pretrained`` of a
    pruned model) to keep training it without reviving pruned features. ``values=None``: a feature is pruned
    when all its input columns are exactly zero (soft factors cannot be read back from the weights: they are
    already folded in and need no guard). With ``values``: installed as they are, without touching the weights.

    Returns:
        site name -> the installed ``[n_features]`` mask, for the sites with at least one pruned feature
        (``values=None``) or for every site in ``values``.

    Raises:
        ValueError: ``values`` names a feature as pruned whose weights are not zero (they belong to another
            model, or the weights were not saved after pruning).

    Example:
        >>> import torch
        >>> layer = torch.nn.Linear(4, 2)
        >>> apply_masks(layer, Sites([Site("", layer, 2, 2)]), {"": torch.tensor([0.0, 1.0])})
        >>> fresh = torch.nn.Linear(4, 2)
        >>> fresh.load_state_dict(layer.state_dict())
        <All keys matched successfully>
        >>> {k: v.tolist() for k, v in restore_masks(fresh, Sites([Site("", fresh, 2, 2)])).items()}
        {'': [0.0, 1.0]}
    """
    installed: dict[str, torch.Tensor] = {}
    if values is None:
        for name, site in sites.items():
            _check_unflattened(name, site.module)
            alive = torch.zeros(site.n_features, dtype=torch.bool)
            for weight, dim in _column_tensors(site.module):
                cols = _full(weight).detach().abs().sum(dim=1 - dim).cpu()
                alive |= cols.view(site.n_features, -1).sum(dim=1) != 0
            if not bool(alive.all()):
                installed[name] = alive.float()
    else:
        for name, module, value in _check_values(model, sites, values):
            if module._buffers.get(MASK_BUFFER) is None and _weight_of(module).ndim == 2:
                for weight, dim in _column_tensors(module, base=True)[:1]:
                    cols = _full(weight).detach().abs().sum(dim=1 - dim).cpu().view(value.numel(), -1)
                    live = ((value == 0) & (cols.sum(dim=1) != 0)).nonzero().flatten().tolist()
                    if live:
                        raise ValueError(
                            f"features {live} of {name!r} are pruned in the masks but their weights are not zero: "
                            "these masks belong to other weights (restore them into the model they were saved "
                            "with, or call apply_masks to prune these weights)"
                        )
            installed[name] = value
    for name, value in installed.items():
        _install(sites[name].module, value)
    return installed


def get_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """The current per-feature masks, by module full name: ``[n_features]`` CPU float32 copies.

    Example:
        >>> import torch, transformers
        >>> from icp_lightning.core.sites import find_sites
        >>> cfg = transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2)
        >>> model = transformers.GPT2Model(cfg)
        >>> sites = find_sites(model, target_modules=["mlp.c_proj"])
        >>> apply_masks(model, sites, {"h.0.mlp.c_proj": torch.ones(64)})
        >>> {k: tuple(v.shape) for k, v in get_masks(model).items()}
        {'h.0.mlp.c_proj': (64,)}
    """
    out = {}
    for name, module in _masked_modules(model):
        mask = module._buffers[MASK_BUFFER]
        assert mask is not None
        out[name] = mask.detach().to(device="cpu", dtype=torch.float32).clone()
    return out


def remove_masks(model: nn.Module) -> None:
    """Remove every guard (buffer and hook). The weights stay pruned: pruning lives in the weights.

    To undo pruning, rebuild the model from unpruned weights; to try masks and undo them, use
    :func:`temporary_masks`.

    Example:
        >>> import torch, transformers
        >>> from icp_lightning.core.sites import find_sites
        >>> cfg = transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2)
        >>> model = transformers.GPT2Model(cfg)
        >>> apply_masks(model, find_sites(model), {"h.0.mlp.c_proj": torch.zeros(64)})
        >>> remove_masks(model)
        >>> get_masks(model), model.h[0].mlp.c_proj.weight.abs().sum().item()
        ({}, 0.0)
    """
    for _, module in _masked_modules(model, warn=False):
        _uninstall(module)


@contextmanager
def temporary_masks(
    model: nn.Module, sites: Sites, values: Mapping[str, torch.Tensor | Sequence[float]]
) -> Iterator[None]:
    """Masks applied while inside; on exit the weights and the guards are restored bit for bit.

    For evaluating an edit without keeping it (e.g. a training-free benchmark row).

    Example:
        >>> import torch
        >>> layer = torch.nn.Linear(3, 2)
        >>> before = layer.weight.clone()
        >>> with temporary_masks(layer, Sites([Site("", layer, 3)]), {"": torch.tensor([0.0, 1.0, 1.0])}):
        ...     layer.weight[:, 0].abs().sum().item()
        0.0
        >>> bool(torch.equal(layer.weight, before)), get_masks(layer)
        (True, {})
    """
    params = [p for name in values if name in sites for p in sites[name].module.parameters()]
    saved = [(p, p.detach().clone()) for p in params]
    masks = get_masks(model)
    try:
        apply_masks(model, sites, values)
        yield
    finally:
        remove_masks(model)
        with torch.no_grad():
            for param, copy in saved:
                param.copy_(copy)
        modules = named_modules(model)
        for name, mask in masks.items():
            _install(modules[name], mask)


def effective_weight(module: nn.Module) -> torch.Tensor:
    """The weight the forward really applies, ``[out_features, in_features]``, with the guard folded in.

    ``(W + sum_a scaling_a * B_a @ A_a) * g`` over input columns: ``W`` in ``nn.Linear`` layout (GPT-2
    ``Conv1D`` weights are transposed), the active, unmerged LoRA adapters of a PEFT wrapper added, and the
    per-column guard ``g`` (0 on hard-pruned columns, 1 elsewhere; soft factors are already in ``W``). A
    DTensor (FSDP2) weight is gathered with ``full_tensor()``, a collective: call it on every rank. An FSDP1
    weight must be read inside ``FullyShardedDataParallel.summon_full_params``. Differentiable w.r.t. the
    parameters.

    Raises:
        NotImplementedError: a PEFT wrapper other than plain LoRA (DoRA and other variants).
        ValueError: the weight is an FSDP1 flat shard (outside ``summon_full_params``).

    Example:
        >>> import torch
        >>> layer = torch.nn.Linear(3, 2)
        >>> original = layer.weight.detach().clone()
        >>> apply_masks(layer, Sites([Site("", layer, 3)]), {"": torch.tensor([1.0, 0.5, 0.0])})
        >>> bool(torch.allclose(effective_weight(layer), original * torch.tensor([1.0, 0.5, 0.0])))
        True
    """
    _check_unflattened(type(module).__name__, module)
    weight = _full(_weight_of(module))
    if is_transposed(module):
        weight = weight.t()
    if getattr(module, "base_layer", None) is not None:
        _check_foldable(type(module).__name__, module)
        lora: Any = module
        if not getattr(module, "disable_adapters", False):
            merged = set(getattr(module, "merged_adapters", []))
            for adapter in getattr(module, "active_adapters", []):
                if adapter not in lora.lora_A or adapter in merged:
                    continue
                a, b = _full(lora.lora_A[adapter].weight), _full(lora.lora_B[adapter].weight)
                weight = weight + (b @ a) * lora.scaling[adapter]
    if _has_mask(module):
        weight = weight * _column_mask(module).to(weight.dtype)
    return weight


# ----------------------------------------------------------------------------------------------------------
# State dicts
# ----------------------------------------------------------------------------------------------------------


def load_masks_state(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool = True
) -> nn.modules.module._IncompatibleKeys:
    """Load a state dict of a masked model, including one written by icp_lightning < 0.2 (``icp_mask`` keys).

    Today's state dicts carry pruned weights and no mask keys: this loads them and restores nothing (call
    :func:`restore_masks` for guards). A state dict from an earlier version holds *unfolded* weights plus
    ``<module>.icp_mask`` keys: the masks are folded into the weights as they load and their guards
    installed, so the model computes what the saved one did.

    Args:
        model: the model to load into (same architecture and wrapping as the one saved).
        state_dict: a state dict, with or without ``icp_mask`` keys.
        strict: passed to ``load_state_dict``.

    Returns:
        What ``load_state_dict`` returns (missing / unexpected keys when ``strict=False``).

    Raises:
        ValueError: a mask key names a module that does not exist or is not linear, or whose size does not
            divide its input columns.

    Example:
        >>> import torch
        >>> layer = torch.nn.Linear(4, 2)
        >>> legacy = {**layer.state_dict(), "icp_mask": torch.tensor([0.0, 1.0])}
        >>> fresh = torch.nn.Linear(4, 2)
        >>> load_masks_state(fresh, legacy)
        <All keys matched successfully>
        >>> get_masks(fresh)[""].tolist(), fresh.weight[:, :2].abs().sum().item()
        ([0.0, 1.0], 0.0)
    """
    modules = {**dict(model.named_modules()), **named_modules(model)}
    plain = dict(state_dict)
    wanted = fold_legacy_masks(plain, modules)
    for name, module in _masked_modules(model):
        if name not in wanted:
            _uninstall(module)
    result = model.load_state_dict(plain, strict=strict)
    for name, value in wanted.items():
        _install(modules[name], value)
    return result


def fold_legacy_masks(
    state_dict: dict[str, Any], modules: Mapping[str, nn.Module], prefix: str = ""
) -> dict[str, torch.Tensor]:
    """Fold the ``<module>.icp_mask`` entries of a state dict from icp_lightning < 0.2 into its weights.

    Those state dicts hold unfolded weights plus the masks; today's hold pruned weights and no masks. In
    place: each mask multiplies the input columns of its module's weight (and LoRA ``lora_A``) entries, and
    its key is removed. ``prefix`` is stripped from keys to find modules (a Lightning checkpoint's
    ``state_dict`` is keyed from the LightningModule: pass its ``named_modules``).

    Returns:
        module name -> mask, for the masks that were folded.

    Raises:
        ValueError: a mask key names a module that does not exist or is not linear, or whose size does not
            divide its input columns.
    """
    folded: dict[str, torch.Tensor] = {}
    for key in [k for k in state_dict if k.startswith(prefix)]:
        if key[len(prefix) :] != MASK_BUFFER and not key.endswith("." + MASK_BUFFER):
            continue
        name = key[len(prefix) : -len(MASK_BUFFER)].rstrip(".")
        module = modules.get(name)
        if module is None or not (is_linear(module) or _is_wrapped_linear(module)):
            raise ValueError(
                f"state dict has a mask {key!r} but the model has no linear module {name!r}: load into the "
                "same architecture (and the same PEFT / DDP wrapping) as the model that was saved"
            )
        value = state_dict.pop(key)
        n_in = in_features_of(module)
        if (
            not isinstance(value, torch.Tensor)
            or value.ndim != 1
            or value.numel() == 0
            or n_in % value.numel()
        ):
            raise ValueError(
                f"mask {key!r} has shape {list(getattr(value, 'shape', []))}, which does not split the {n_in} "
                f"input columns of {name!r} into features: expected [n_features] with n_features dividing {n_in}"
            )
        col = _column_values(module, value.float().cpu())
        weights = {id(w): dim for w, dim in _column_tensors(module)}
        start = prefix + (name + "." if name else "")
        for sub, param in module.named_parameters():
            if id(param) in weights and start + sub in state_dict:
                tensor = state_dict[start + sub].clone()
                _scale_(tensor, col, weights[id(param)])
                state_dict[start + sub] = tensor
        folded[name] = value.float().cpu()
    return folded


# ----------------------------------------------------------------------------------------------------------
# Folding
# ----------------------------------------------------------------------------------------------------------


def make_permanent(model: nn.Module) -> None:
    """Re-zero the pruned columns, then remove every guard: a plain model with its pruning in the weights.

    The weights already carry the masks (:func:`apply_masks` folds them); this re-zeroes hard-pruned columns
    that an optimizer step may have moved (:func:`enforce_masks`) and removes the buffers and hooks. For a
    PEFT LoRA wrapper the ``lora_A`` columns are zero too, so ``merge_and_unload()`` keeps the pruning, before
    or after this call. DTensor (FSDP2) weights are handled shard by shard, so every rank must call this.
    FSDP1 (flat) weights must be unflattened first: call it on every rank inside
    ``FullyShardedDataParallel.summon_full_params(model, writeback=True)``.

    Raises:
        NotImplementedError: a masked PEFT wrapper whose output is not linear in the weight columns (DoRA and
            other LoRA variants, non-LoRA adapters): nothing is changed.
        ValueError: a masked module's weight is an FSDP1 flat shard (outside ``summon_full_params``): nothing
            is changed.

    Example:
        >>> import torch
        >>> layer = torch.nn.Linear(3, 2)
        >>> apply_masks(layer, Sites([Site("", layer, 3)]), {"": torch.tensor([1.0, 0.0, 0.5])})
        >>> x = torch.randn(4, 3)
        >>> before = layer(x)
        >>> make_permanent(layer)
        >>> bool(torch.allclose(layer(x), before)), layer.weight[:, 1].abs().sum().item(), get_masks(layer)
        (True, 0.0, {})
    """
    _relocate_stray(model)
    masked = _masked_modules(model)
    for name, module in masked:
        _check_foldable(name, module)
        _check_unflattened(name, module)
    enforce_masks(model)
    for _, module in masked:
        _uninstall(module)


# ----------------------------------------------------------------------------------------------------------
# Slimming: physically remove hard-pruned FFN neurons and attention heads
# ----------------------------------------------------------------------------------------------------------

_BERT_LIKE = ("bert", "roberta", "xlm-roberta")
_LLAMA_LIKE = ("llama", "mistral", "qwen2")

#: model_type -> (suffix of the FFN down-projection, suffixes of the layers that produce its input).
_FFN_PRODUCERS: dict[str, tuple[str, tuple[str, ...]]] = {
    **{t: (".output.dense", (".intermediate.dense",)) for t in _BERT_LIKE},
    "distilbert": (".lin2", (".lin1",)),
    "gpt2": (".c_proj", (".c_fc",)),
    **{t: (".down_proj", (".gate_proj", ".up_proj")) for t in _LLAMA_LIKE},
    "t5": (".wo", (".wi", ".wi_0", ".wi_1")),
}
#: model_type -> attention family whose heads :func:`slim` can remove.
_ATTN_FAMILY: dict[str, str] = {
    **{t: "bert" for t in _BERT_LIKE},
    "distilbert": "distilbert",
    **{t: "llama" for t in _LLAMA_LIKE},
    "gpt2": "gpt2",
}
#: family -> (suffix of the output projection, suffix of the attention module in place of it).
_ATTN_MODULE: dict[str, tuple[str, str]] = {
    "bert": (".output.dense", ".self"),
    "distilbert": (".out_lin", ""),
    "llama": (".o_proj", ""),
    "gpt2": (".c_proj", ""),
}


def _site_kind(model_type: str | None, name: str) -> str:
    defaults = DEFAULT_TARGETS.get(model_type or "")
    if defaults is None:
        return "other"
    if re.fullmatch(defaults[0], name):
        return "ffn"
    if re.fullmatch(defaults[1], name):
        return "attn"
    return "other"


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


def _ffn_producers(modules: Mapping[str, nn.Module], model_type: str, name: str) -> list[str]:
    suffix, producer_suffixes = _FFN_PRODUCERS[model_type]
    if not name.endswith(suffix):
        return []
    prefix = name[: -len(suffix)]
    if model_type in _BERT_LIKE:  # layer.N.output.dense <- layer.N.intermediate.dense
        return [prefix + producer_suffixes[0]] if prefix + producer_suffixes[0] in modules else []
    return [prefix + s for s in producer_suffixes if prefix + s in modules]


def _attn_module(modules: Mapping[str, nn.Module], family: str, name: str) -> Any:
    suffix, attn_suffix = _ATTN_MODULE[family]
    if not name.endswith(suffix):
        return None
    return modules.get(name[: -len(suffix)] + attn_suffix)


def _head_dim(family: str, attn: Any) -> int:
    attr = "attention_head_size" if family in ("bert", "distilbert") else "head_dim"
    return int(getattr(attn, attr))


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
    plan = []
    for name, module in _masked_modules(model):
        kind = _site_kind(model_type, name)
        if getattr(module, "base_layer", None) is not None:
            raise NotImplementedError(
                f"cannot slim {name!r}: it is wrapped by a PEFT adapter. Merge first: "
                "masks = get_masks(model); merged = model.merge_and_unload(); apply_masks(merged, "
                "find_sites(merged), {name_in_merged: mask}); slim(merged)"
            )
        if kind == "ffn" and model_type in _FFN_PRODUCERS and _ffn_producers(modules, model_type, name):
            plan.append((name, module, kind))
        elif kind == "attn" and model_type in _ATTN_FAMILY:
            family = _ATTN_FAMILY[model_type]
            attn = _attn_module(modules, family, name)
            if attn is None or (family == "gpt2" and getattr(attn, "is_cross_attention", False)):
                raise NotImplementedError(
                    f"cannot slim attention site {name!r}: its q/k/v projections were not found"
                )
            plan.append((name, module, kind))
        else:
            raise NotImplementedError(
                f"cannot slim site {name!r} (kind {kind!r}, model_type {model_type!r}): slim removes FFN neurons "
                f"of {sorted(_FFN_PRODUCERS)} and attention heads of {sorted(_ATTN_FAMILY)}. Use "
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
        family = _ATTN_FAMILY[model_type]
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
        kind = _site_kind(model_type, name)
        if kind == "ffn" and model_type in _FFN_PRODUCERS and _ffn_producers(modules, model_type, name):
            sizes[name] = {"kind": "ffn", "features": in_features_of(module)}
        elif kind == "attn" and model_type in _ATTN_FAMILY:
            family = _ATTN_FAMILY[model_type]
            attn = _attn_module(modules, family, name)
            if attn is None:
                continue
            d = _head_dim(family, attn)
            heads = in_features_of(module) // d
            kv = int(attn.k_proj.weight.shape[0]) // d if family == "llama" else heads
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
            family = _ATTN_FAMILY[model_type]
            attn = _attn_module(modules, family, name)
            assert attn is not None
            d = _head_dim(family, attn)
            n_now = in_features_of(module) // d
            kv_now = int(attn.k_proj.weight.shape[0]) // d if family == "llama" else n_now
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


@contextmanager
def masks_folded(model: nn.Module) -> Iterator[bool]:
    """Inside, the model is guard-free and its weights are the effective ones; the guards come back after.

    ``causal_effects`` runs inside this, so an intervention on a pruned feature has no effect (its weights
    are zero) and the exact engine's rank-1 replay sees the effective weights. The weights already carry the
    masks (:func:`apply_masks` folds them); this only re-zeroes pruned columns and lifts the hooks.

    Yields whether the model is mask-free inside (``False`` when a mask cannot be folded: a non-LoRA adapter).
    Under FSDP1 enter it inside ``FullyShardedDataParallel.summon_full_params``.
    """
    masks = get_masks(model)
    if not masks:
        yield True
        return
    modules = named_modules(model)
    try:
        for name in masks:
            _check_foldable(name, modules[name])
    except NotImplementedError as err:
        warnings.warn(
            f"masks cannot be folded ({err}); attributing with full forwards through the masks", stacklevel=3
        )
        yield False
        return
    enforce_masks(model)
    remove_masks(model)
    try:
        yield True
    finally:
        for name, mask in masks.items():
            _install(modules[name], mask)
