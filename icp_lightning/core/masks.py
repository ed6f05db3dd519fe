"""Structured input-column masks: hard prune, soft reweight, fold.

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

Slimming (physically removing pruned neurons and heads: ``slim``, ``save_slimmed``, ``load_slimmed``) lives in
:mod:`icp_lightning.core.slim` and is importable from here too; the guard's hook and the weight-column
arithmetic live in :mod:`icp_lightning.core._guards`.

Other properties:
    * PEFT LoRA: masks are put on the adapter *wrapper* that ``find_sites`` returns, so the base path and the
      adapter path ``lora_B(lora_A(dropout(h)))`` both read the guarded input. A mask put on a plain
      ``nn.Linear`` that PEFT later wraps (masks applied before ``get_peft_model``) moves to the wrapper at the
      first forward after the wrapping: a pre-hook on the layer's parent module (installed with the mask)
      sees the wrapper before it runs, moves the guard and zeroes the new ``lora_A`` columns. So a plain
      training loop that never calls icp_lightning again, then ``merge_and_unload()``, keeps the pruning.
      :func:`apply_masks`, :func:`enforce_masks` and :func:`make_permanent` move such masks too.
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

import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from icp_lightning.core._guards import (  # _mask_pre_hook, GUARD_BUFFER: importable here as before
    GUARD_BUFFER,  # noqa: F401
    MASK_BUFFER,
    _check_foldable,
    _check_unflattened,
    _column_mask,
    _column_tensors,
    _column_values,
    _full,
    _guard,
    _has_mask,
    _install,
    _mask_pre_hook,  # noqa: F401  (pickled models of earlier versions name the hook by this module)
    _masked_modules,
    _relocate_stray,
    _scale_columns,
    _uninstall,
    _unwatch_parents,
    _watch_parents,
    _weight_of,
    _zero_optimizer_state,
)
from icp_lightning.core.legacy_masks import fold_legacy_masks, load_masks_state
from icp_lightning.core.sites import (  # Site: used by the doctests
    Site,  # noqa: F401
    Sites,
    is_transposed,
    named_modules,
)
from icp_lightning.core.slim import SLIM_FILE, load_slimmed, save_slimmed, slim

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


def _current_mask(module: nn.Module, like: torch.Tensor) -> torch.Tensor:
    """The module's cumulative mask (CPU float), or ones like ``like`` when it has none."""
    old = module._buffers.get(MASK_BUFFER)
    return torch.ones_like(like) if old is None else old.detach().float().cpu()


def _nonzero_features(module: nn.Module, n_features: int, lora: bool = True) -> torch.Tensor:
    """Per feature, whether any of its input columns is non-zero in the weight (and LoRA ``lora_A``)."""
    alive = torch.zeros(n_features, dtype=torch.bool)
    tensors = _column_tensors(module)
    for weight, dim in tensors if lora else tensors[:1]:
        cols = _full(weight).detach().abs().sum(dim=1 - dim).cpu()
        alive |= cols.view(n_features, -1).sum(dim=1) != 0
    return alive


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
        old = _current_mask(module, value)
        revived = ((old == 0) & (value > 0)).nonzero().flatten().tolist()
        if revived:
            raise ValueError(
                f"features {revived} of {name!r} are pruned (their weights are zero) and cannot be given a "
                "mask above 0: masks are cumulative; rebuild the model from unpruned weights to undo pruning "
                "(or use temporary_masks to try masks and restore the weights)"
            )
    for _, module, value in prepared:
        old = _current_mask(module, value)
        factor = torch.where(old > 0, value / old.clamp_min(1e-30), torch.zeros_like(value))
        _scale_columns(module, _column_values(module, factor))
        _zero_optimizer_state(module, _column_values(module, _guard(value)), optimizers)
        _install(module, value)
    _watch_parents(model)


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
    model: nn.Module,
    sites: Sites,
    values: Mapping[str, torch.Tensor | Sequence[float]] | None = None,
    rezero: bool = False,
) -> dict[str, torch.Tensor]:
    """Install the guards of masks whose values the weights already carry (a reloaded pruned model).

    The one call to make after ``fresh.load_state_dict(pruned.state_dict())`` (or ``from_pretrained`` of a
    pruned model) to keep training it without reviving pruned features. ``values=None``: a feature is pruned
    when all its input columns are exactly zero (soft factors cannot be read back from the weights: they are
    already folded in and need no guard). With ``values``: installed as they are, without touching the weights,
    unless ``rezero`` (a checkpoint whose pruned columns an optimizer moved before it was written, e.g. mid-epoch
    under FSDP1: they are set back to zero instead of raising).

    Returns:
        site name -> the installed ``[n_features]`` mask, for the sites with at least one pruned feature
        (``values=None``) or for every site in ``values``.

    Raises:
        ValueError: ``values`` names a feature as pruned whose weights are not zero (they belong to another
            model, or the weights were not saved after pruning), unless ``rezero``.

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
            alive = _nonzero_features(site.module, site.n_features)
            if not bool(alive.all()):
                installed[name] = alive.float()
    else:
        for name, module, value in _check_values(model, sites, values):
            if module._buffers.get(MASK_BUFFER) is None and _weight_of(module).ndim == 2 and not rezero:
                live = ((value == 0) & _nonzero_features(module, value.numel(), lora=False)).nonzero()
                if live.numel():
                    raise ValueError(
                        f"features {live.flatten().tolist()} of {name!r} are pruned in the masks but their weights "
                        "are not zero: these masks belong to other weights (restore them into the model they were "
                        "saved with, or call apply_masks to prune these weights)"
                    )
            installed[name] = value
    for name, value in installed.items():
        _install(sites[name].module, value)
    _watch_parents(model)
    if rezero:
        enforce_masks(model)
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
    _unwatch_parents(model)


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
        _watch_parents(model)


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
    _unwatch_parents(model)


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
        _watch_parents(model)
