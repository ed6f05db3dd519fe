"""Hugging Face models for the ICP module: loading by task, PEFT configs, transformer blocks for FSDP wrapping.

Pure transformers / PEFT helpers of :class:`~icp_lightning.module.ICPContrastiveModule` (which re-exports
them), in their own file so the module holds only the LightningModule.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from torch import nn

Task = Literal["sequence_classification", "causal_lm", "seq2seq"]
TASKS: tuple[str, ...] = ("sequence_classification", "causal_lm", "seq2seq")
_PEFT_TASK_TYPES = {"sequence_classification": "SEQ_CLS", "causal_lm": "CAUSAL_LM", "seq2seq": "SEQ_2_SEQ_LM"}


def load_hf_model(
    model: str | Path | nn.Module,
    task: Task = "sequence_classification",
    num_labels: int = 2,
    model_kwargs: Mapping[str, Any] | None = None,
) -> nn.Module:
    """The Hugging Face model for ``task``: loaded from a hub name / local path, or returned as given.

    Example:
        >>> import transformers
        >>> cfg = transformers.BertConfig(vocab_size=9, hidden_size=8, num_hidden_layers=1,
        ...                               num_attention_heads=2, intermediate_size=8)
        >>> type(load_hf_model(transformers.BertForSequenceClassification(cfg))).__name__
        'BertForSequenceClassification'
    """
    if isinstance(model, nn.Module):
        return model
    if not isinstance(model, (str, Path)):
        raise TypeError(
            f"model must be a hub name, a local path or a PreTrainedModel, got {type(model).__name__}"
        )
    import transformers

    from icp_lightning.recipes import resolve_pretrained

    model = resolve_pretrained(str(model))  # offline aliases such as "minilm"
    kwargs = dict(model_kwargs or {})
    if task == "sequence_classification":
        return transformers.AutoModelForSequenceClassification.from_pretrained(  # type: ignore[no-any-return]
            str(model), num_labels=num_labels, **kwargs
        )
    if task == "causal_lm":
        return transformers.AutoModelForCausalLM.from_pretrained(str(model), **kwargs)  # type: ignore[no-any-return]
    if task == "seq2seq":
        return transformers.AutoModelForSeq2SeqLM.from_pretrained(str(model), **kwargs)  # type: ignore[no-any-return]
    raise ValueError(f"task must be one of {TASKS}, got {task!r}")


def peft_config(config: Any, task: Task) -> Any:
    """A ``peft.PeftConfig`` from a config object or a dict (``peft_type`` defaults to LORA, ``task_type`` to
    the task's), or ``None``."""
    if config is None:
        return None
    import peft as peft_lib

    if isinstance(config, Mapping):
        values = dict(config)
        values.setdefault("peft_type", "LORA")
        values.setdefault("task_type", _PEFT_TASK_TYPES[task])
        try:
            return peft_lib.get_peft_config(values)
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(
                f"cannot build a PEFT config from {values}: {err}. Pass the fields of e.g. peft.LoraConfig "
                "(r, lora_alpha, target_modules, ...)"
            ) from None
    if isinstance(config, peft_lib.PeftConfig):
        config = copy.deepcopy(config)
        if getattr(config, "task_type", None) is None:
            config.task_type = _PEFT_TASK_TYPES[task]
        return config
    raise TypeError(f"peft must be a peft.PeftConfig, a dict or None, got {type(config).__name__}")


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a model: the members of its largest ``nn.ModuleList`` of identical blocks.

    A candidate is an ``nn.ModuleList`` whose members all have one type and parameters (``bert.encoder.layer``,
    ``model.layers``, ``transformer.h``, ...); the largest by parameter count wins. Another list that holds at
    least half as many parameters and is not inside the chosen blocks is taken too (the encoder and decoder
    stacks of T5 / BART), in module order. These are the units FSDP2 shards one by one.

    Args:
        model: any module (a Hugging Face model, possibly wrapped in PEFT).

    Returns:
        The blocks, in module order (empty when the model has no such list).

    Example:
        >>> import transformers
        >>> cfg = transformers.BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=3,
        ...                               num_attention_heads=2, intermediate_size=8)
        >>> blocks = transformer_blocks(transformers.BertForSequenceClassification(cfg))
        >>> len(blocks), type(blocks[0]).__name__
        (3, 'BertLayer')
    """
    lists: list[tuple[str, nn.ModuleList, int]] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            kinds = {type(m) for m in module}
            size = _n_params(module)
            if len(kinds) == 1 and size > 0:
                lists.append((name, module, size))
    if not lists:
        return []
    lists.sort(key=lambda item: -item[2])
    largest = lists[0][2]
    chosen: list[tuple[str, nn.ModuleList, int]] = []
    for name, module, size in lists:
        if size * 2 < largest:
            break
        nested = any(name.startswith(f"{other}.") or other.startswith(f"{name}.") for other, _, _ in chosen)
        if not nested:
            chosen.append((name, module, size))
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    chosen.sort(key=lambda item: order[item[0]])
    return [block for _, module, _ in chosen for block in module]


def _plain(value: Any) -> bool:
    """True for values a checkpoint can hold under ``torch.load(weights_only=True)``."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, Mapping):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


def _peft_dict(config: Any) -> dict[str, Any]:
    """A JSON-safe dict of a PEFT config (sets become sorted lists, enums their values)."""

    def default(obj: Any) -> Any:
        if isinstance(obj, (set, frozenset)):
            return sorted(obj)
        return getattr(obj, "value", str(obj))

    raw = {k: v for k, v in config.to_dict().items() if v is not None}
    return json.loads(json.dumps(raw, default=default))  # type: ignore[no-any-return]
