"""State dicts of earlier versions: icp_lightning < 0.2 saved *unfolded* weights plus ``<module>.icp_mask``
keys; today's hold pruned weights and no mask keys. :func:`load_masks_state` loads either kind and
:func:`fold_legacy_masks` folds the old keys into the weights (the pruning callback calls it on resume).
Both are importable from :mod:`icp_lightning.core.masks` as before.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from icp_lightning.core._guards import (
    MASK_BUFFER,
    _column_tensors,
    _column_values,
    _install,
    _is_wrapped_linear,
    _masked_modules,
    _scale_,
    _uninstall,
    _watch_parents,
)
from icp_lightning.core.sites import in_features_of, is_linear, named_modules

__all__ = ["fold_legacy_masks", "load_masks_state"]


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
        >>> from icp_lightning.core.masks import get_masks
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
    _watch_parents(model)
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
