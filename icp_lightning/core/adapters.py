"""Adapter-only export of a pruned PEFT model: :func:`save_adapter` and :func:`load_adapter`.

``peft_model.save_pretrained(d)`` writes the adapter weights only. The pruning lives in the *base* weights (see
:mod:`icp_lightning.core.masks`: the weights are the truth), so ``PeftModel.from_pretrained(base, d)`` on the
original base model gives back an **unpruned** model, silently. These two functions close that path:

* :func:`save_adapter` calls ``save_pretrained`` and writes, beside the adapter, the masks that the base
  weights carry (:data:`MASKS_FILE`: per site, its name in the base model, the per-feature values and the
  columns per feature). It refuses a model whose guards are gone but whose weights hold all-zero feature
  columns (after ``make_permanent`` or a reload): those masks could not be written.
* :func:`load_adapter` applies those masks to the base model (:func:`~icp_lightning.core.masks.apply_masks`:
  the same folding into the weights) and then loads the adapter, so the result computes what was saved.

A merged export (``merge_and_unload().save_pretrained(d)``, ``ICPContrastiveModule.merge_and_export``) needs
neither: the merged weights carry the pruning.

Example:
    >>> import tempfile, torch, transformers, peft
    >>> from icp_lightning.core.masks import apply_masks
    >>> from icp_lightning.core.sites import find_sites
    >>> def base():
    ...     torch.manual_seed(0)
    ...     cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
    ...                                   num_attention_heads=2, intermediate_size=8)
    ...     return transformers.BertForSequenceClassification(cfg).eval()
    >>> model = peft.get_peft_model(base(), peft.LoraConfig(r=2, target_modules=["output.dense"]))
    >>> apply_masks(model, find_sites(model), {"base_model.model.bert.encoder.layer.0.output.dense": [0.0] + [1.0] * 7})
    >>> ids = torch.tensor([[1, 5, 7, 2]])
    >>> with tempfile.TemporaryDirectory() as d:
    ...     _ = save_adapter(model, d)
    ...     loaded = load_adapter(base(), d)
    >>> bool(torch.allclose(loaded(input_ids=ids).logits, model(input_ids=ids).logits))
    True
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from icp_lightning.core._guards import _is_wrapped_linear
from icp_lightning.core.masks import _nonzero_features, apply_masks, enforce_masks, get_masks
from icp_lightning.core.sites import Sites, find_sites, in_features_of, is_linear, named_modules

__all__ = ["MASKS_FILE", "load_adapter", "save_adapter"]

#: Written beside the adapter by :func:`save_adapter`: the masks the base weights carry.
MASKS_FILE = "icp_masks.json"
#: PEFT's prefix of the base model's module names inside a ``PeftModel``.
_PEFT_PREFIX = "base_model.model."


def _require_peft(model: nn.Module) -> None:
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        raise TypeError(
            f"save_adapter needs a peft.PeftModel, got {type(model).__name__}: a plain model keeps its pruning "
            "with save_pretrained alone"
        )


def _zero_column_layers(model: nn.Module) -> list[str]:
    """Linear layers (or LoRA base layers) with at least one all-zero input column."""
    return [
        name
        for name, module in named_modules(model).items()
        if (is_linear(module) or _is_wrapped_linear(module))
        and not name.endswith(".base_layer")  # counted through its wrapper
        and not bool(_nonzero_features(module, in_features_of(module), lora=False).all())
    ]


def save_adapter(
    model: nn.Module, path: str | Path, masks: Mapping[str, torch.Tensor] | None = None, **kwargs: Any
) -> Path:
    """``model.save_pretrained(path, **kwargs)`` plus :data:`MASKS_FILE`, the masks its base weights carry.

    Args:
        model: a ``peft.PeftModel`` (pruned with :func:`~icp_lightning.core.masks.apply_masks`, before or after
            the wrapping).
        path: output folder.
        masks: module name -> per-feature values; default: the model's installed masks (``get_masks``).
        **kwargs: passed to ``save_pretrained``.

    Returns:
        The output folder.

    Raises:
        TypeError: ``model`` is not a ``PeftModel``.
        ValueError: no masks are installed but some layer has all-zero input columns (``make_permanent`` or a
            reload removed the guards): call ``restore_masks`` first, or pass ``masks``.
    """
    _require_peft(model)
    # masks still on LoRA base layers move to the wrappers; pruned columns are exactly zero
    enforce_masks(model)
    values = get_masks(model) if masks is None else {n: torch.as_tensor(v).float() for n, v in masks.items()}
    if not values:
        zero = _zero_column_layers(model)
        if zero:
            raise ValueError(
                f"layers {zero} have all-zero input columns but no masks are installed (make_permanent or a "
                "reload removed the guards), so the adapter alone would load onto an unpruned base: call "
                "restore_masks(model, find_sites(model, granularity=...)) first, or pass masks="
            )
    modules = named_modules(model)
    entries = {}
    for name, value in values.items():
        if name not in modules:
            raise ValueError(f"masks name a module the model does not have: {name!r}")
        entries[name.removeprefix(_PEFT_PREFIX).removesuffix(".base_layer")] = {
            "values": value.tolist(),
            "group_size": in_features_of(modules[name]) // value.numel(),
        }
    out = Path(path)
    model.save_pretrained(out, **kwargs)  # type: ignore[operator]
    (out / MASKS_FILE).write_text(json.dumps({"format": 1, "masks": entries}, indent=1))
    return out


def load_adapter(base: nn.Module, path: str | Path, **kwargs: Any) -> nn.Module:
    """Apply the masks saved by :func:`save_adapter` to ``base``, then ``PeftModel.from_pretrained(base, path)``.

    Args:
        base: the unpruned base model the adapter was trained on (it is pruned in place).
        path: a folder written by :func:`save_adapter`.
        **kwargs: passed to ``PeftModel.from_pretrained`` (e.g. ``is_trainable=True``).

    Raises:
        FileNotFoundError: ``path`` has no :data:`MASKS_FILE` (a plain ``save_pretrained`` folder).
        ValueError: the masks do not fit ``base`` (another architecture or size).
    """
    from peft import PeftModel

    file = Path(path) / MASKS_FILE
    if not file.is_file():
        raise FileNotFoundError(
            f"{file} not found: {path} was not written by save_adapter, so it cannot say how the base was "
            "pruned (load it with PeftModel.from_pretrained if it was never pruned)"
        )
    entries = json.loads(file.read_text())["masks"]
    for granularity, wanted in (("neuron", True), ("head", False)):
        names = [n for n, e in entries.items() if (e["group_size"] == 1) == wanted]
        if not names:
            continue
        sites: Sites = find_sites(base, target_modules=names, granularity=granularity)  # type: ignore[arg-type]
        missing = sorted(set(names) - set(sites.names))
        bad = [n for n in names if n in sites and sites[n].group_size != entries[n]["group_size"]]
        if missing or bad:
            raise ValueError(
                f"the saved masks do not fit this base model: missing {missing}, other sizes {bad}"
            )
        apply_masks(base, sites, {n: torch.tensor(entries[n]["values"]) for n in names})
    return PeftModel.from_pretrained(base, str(path), **kwargs)
