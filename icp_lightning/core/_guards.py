"""The guard of a masked module and the weight-column arithmetic behind :mod:`icp_lightning.core.masks`.

Private plumbing shared by masking (:mod:`~icp_lightning.core.masks`) and slimming
(:mod:`~icp_lightning.core.slim`); read the design in :mod:`icp_lightning.core.masks`. A guard is a
non-persistent ``icp_mask`` buffer (the cumulative per-feature mask), its 0/1 ``icp_guard`` buffer and a
forward pre-hook that multiplies the module's input by the guard. The column helpers scale the input columns
of a module's weight and of its PEFT LoRA ``lora_A`` weights (``W[:, j] *= c[j]``), shard by shard for DTensor
weights, and of the optimizer state that follows them.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from icp_lightning.core.sites import in_features_of, is_linear, is_transposed, module_name, named_modules

try:  # DTensor parameters (FSDP2 ``fully_shard``, tensor parallel).
    from torch.distributed.tensor import DTensor, distribute_tensor
except Exception:  # pragma: no cover - torch without distributed support
    DTensor = None  # type: ignore[assignment,misc]
    distribute_tensor = None  # type: ignore[assignment]

#: Name of the per-feature mask buffer registered on each masked module (``<module>.icp_mask``).
MASK_BUFFER = "icp_mask"
#: Name of the 0/1 guard buffer the forward pre-hook multiplies the input by (``icp_mask != 0``).
GUARD_BUFFER = "icp_guard"
#: Where the hook lived before this module existed: hooks pickled then still count as mask hooks.
_LEGACY_HOOK_MODULE = "icp_lightning.core.masks"

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
        getattr(hook, "__name__", None) == "_mask_pre_hook"
        and getattr(hook, "__module__", None) in (__name__, _LEGACY_HOOK_MODULE)
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
            "unmasked input until the next forward (or apply_masks / enforce_masks) moves them to the adapter "
            "wrappers",
            stacklevel=3,
        )
    return found


def _adopt(wrapper: nn.Module) -> bool:
    """Move the guard of ``wrapper.base_layer`` to the LoRA ``wrapper`` and zero its adapters' pruned columns.

    Returns whether it moved (not for non-LoRA wrappers, LoRA variants or FSDP1 flat adapter weights)."""
    base = getattr(wrapper, "base_layer", None)
    if not isinstance(base, nn.Module) or not _has_mask(base) or _has_mask(wrapper):
        return False
    if not _is_lora(wrapper) or getattr(wrapper, "lora_variant", None):
        return False
    if any(a.weight.ndim != 2 for a in wrapper.lora_A.values()):  # type: ignore[union-attr,operator]
        return False
    mask = base._buffers[MASK_BUFFER]
    assert mask is not None
    _uninstall(base)
    _install(wrapper, mask)
    _scale_columns(wrapper, _column_values(wrapper, _guard(mask)), base=False)
    return True


def _relocate_stray(model: nn.Module) -> None:
    """Move masks from PEFT ``base_layer`` modules to their LoRA wrappers and zero the adapters' columns."""
    modules = named_modules(model)
    for name, _ in _masked_modules(model, warn=False):
        wrapper = modules.get(name[: -len(".base_layer")]) if name.endswith(".base_layer") else None
        if wrapper is not None:
            _adopt(wrapper)


def _adopt_pre_hook(parent: nn.Module, args: tuple) -> None:
    """Forward pre-hook on the parent of a masked plain layer: if PEFT has wrapped that layer since the masks
    were applied (``get_peft_model`` after ``apply_masks``), move the guard to the LoRA wrapper before the
    wrapper runs, so the adapter path reads the pruned input from the first forward on (its ``lora_A`` columns
    get no gradient and a later ``merge_and_unload`` keeps the pruning). A few attribute reads otherwise."""
    for child in parent._modules.values():
        if child is not None:
            _adopt(child)


def _is_adopt_hook(hook: object) -> bool:
    return hook is _adopt_pre_hook or (
        getattr(hook, "__name__", None) == "_adopt_pre_hook" and getattr(hook, "__module__", None) == __name__
    )


def _watch_parents(model: nn.Module) -> None:
    """Put :func:`_adopt_pre_hook` (once) on every module with a masked plain linear child."""
    for parent in model.modules():
        if not any(_has_mask(c) and not _is_wrapped_linear(c) for c in parent.children()):
            continue
        if not any(_is_adopt_hook(h) for h in parent._forward_pre_hooks.values()):
            parent.register_forward_pre_hook(_adopt_pre_hook)


def _unwatch_parents(model: nn.Module) -> None:
    """Remove every :func:`_adopt_pre_hook` from ``model`` (by identity of the function)."""
    for module in model.modules():
        for key, hook in list(module._forward_pre_hooks.items()):
            if _is_adopt_hook(hook):
                del module._forward_pre_hooks[key]


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
