"""From spurious features back to input tokens, and pruning at the input: discover the tokens, then mask them.

Pruning features that carry a shortcut does not remove it when many features copy it (a planted token is read by
most heads of the last layers, and fine-tuning re-routes around masked ones; see
``benchmarks/results/reliability.md``). The discrete inverse of an intervention
(:class:`~icp_lightning.core.counterfactuals.TokenEditCounterfactual`) names, per example, the token whose removal
moves the top-scored features most. :func:`discover_tokens` counts those edits over a data set: a token that is
edited in most of the sentences that contain it, and in a fair share of all sentences, is what the features
read. :func:`mask_input_tokens` then prunes it at the input, in training and at inference: the model reads it
as ``[MASK]`` (``mode="mask"``) or never sees it (``mode="delete"``).

Written by hand: no library maps attribution scores back to a data set's tokens (Captum and pyvene attribute per
example; they do not aggregate edits into a vocabulary-level decision or edit the model's input).

Example:
    >>> import torch, transformers
    >>> cfg = transformers.BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1,
    ...                               num_attention_heads=2, intermediate_size=8)
    >>> model = transformers.BertForSequenceClassification(cfg).eval()
    >>> handle = mask_input_tokens(model, [7, 9], mask_id=4)
    >>> ids = torch.tensor([[2, 7, 5, 9, 3]])
    >>> bool(torch.allclose(model(input_ids=ids).logits, model(input_ids=torch.tensor([[2, 4, 5, 4, 3]])).logits))
    True
    >>> handle.remove()
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from icp_lightning.core.sites import Sites

__all__ = ["DiscoveredToken", "TokenMaskHandle", "discover_tokens", "mask_input_tokens"]


@dataclass
class DiscoveredToken:
    """One token the inverse edited: ``edited`` of the ``present`` sentences containing it (of ``total``)."""

    token_id: int
    edited: int
    present: int
    total: int
    discovered: bool

    @property
    def rate(self) -> float:
        """Share of the sentences containing the token in which it was the edit."""
        return self.edited / max(self.present, 1)


def discover_tokens(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    scores: Mapping[str, torch.Tensor],
    sites: Sites,
    counterfactual: Any,
    *,
    min_share: float = 0.05,
    min_rate: float = 0.5,
    special_token_ids: Sequence[int] = (),
) -> list[DiscoveredToken]:
    """Count the tokens a discrete inverse edits over ``batches``; flag those it edits consistently.

    Args:
        model: the model (not changed).
        batches: dicts with ``input_ids``, ``attention_mask`` (and labels if the counterfactual needs them).
        scores: site -> feature scores; the counterfactual intervenes on its top features.
        sites: the sites the scores are on (of this model).
        counterfactual: a :class:`~icp_lightning.core.counterfactuals.TokenEditCounterfactual` (anything whose
            ``build(model, batch, scores, sites)`` returns ``info["edited_positions"]`` per example).
        min_share: a discovered token is edited in at least this share of all sentences ...
        min_rate: ... and in at least this share of the sentences that contain it.
        special_token_ids: never counted as present.

    Returns:
        Every edited token, most edited first (ties: smaller id first), with ``discovered`` set by the rule.

    Raises:
        ValueError: thresholds outside [0, 1], or no examples.
    """
    if not (0.0 <= min_share <= 1.0 and 0.0 <= min_rate <= 1.0):
        raise ValueError(f"min_share and min_rate must be in [0, 1], got {min_share}, {min_rate}")
    special = {int(t) for t in special_token_ids}
    edited: Counter[int] = Counter()
    present: Counter[int] = Counter()
    total = 0
    for batch in batches:
        out = counterfactual.build(model, dict(batch), scores, sites)
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        for b, positions in enumerate(out.info["edited_positions"]):
            total += 1
            row = ids[b] if mask is None else ids[b][mask[b].bool()]
            present.update({int(t) for t in row.tolist() if int(t) not in special})
            edited.update({int(ids[b, p]) for p in positions})
    if total == 0:
        raise ValueError("discover_tokens got no examples")
    found = [
        DiscoveredToken(
            t, c, present[t], total, c >= min_share * total and c / max(present[t], 1) >= min_rate
        )
        for t, c in edited.items()
    ]
    return sorted(found, key=lambda d: (-d.edited, d.token_id))


class TokenMaskHandle:
    """What :func:`mask_input_tokens` returns: the hook, its token ids and ``remove()``."""

    def __init__(self, handle: Any, token_ids: torch.Tensor, mask_id: int) -> None:
        self._handle = handle
        self.token_ids = token_ids
        self.mask_id = mask_id

    def remove(self) -> None:
        """Restore the model's own reading of the tokens."""
        self._handle.remove()


def _compact(x: torch.Tensor, keep: torch.Tensor, fill: Any) -> torch.Tensor:
    """Each row of ``x`` with its kept entries moved left, in order, and ``fill`` after them."""
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices  # kept first, order preserved
    out = torch.gather(x, 1, order)
    n_keep = keep.sum(1, keepdim=True)
    tail = torch.arange(x.shape[1], device=x.device).unsqueeze(0) >= n_keep
    return out.masked_fill(tail, fill)


def mask_input_tokens(
    model: nn.Module, token_ids: Sequence[int], mask_id: int | None = None, mode: str = "mask"
) -> TokenMaskHandle:
    """Prune ``token_ids`` at the input of ``model``, in training and at inference, whatever the optimizer does to
    their embedding rows.

    ``mode="mask"``: a forward pre-hook on the input embeddings (``model.get_input_embeddings()``) replaces them by
    ``mask_id`` before the lookup. The model still sees *that a token was there*: fine-tuning can learn the
    replacement as the new shortcut (``benchmarks/results/reliability.md`` measures it). ``mode="delete"``: a
    forward pre-hook on the model removes them from ``input_ids`` and from the matching ``attention_mask`` and
    ``token_type_ids`` entries (later tokens shift left; padding, with mask 0, fills the end), so nothing marks
    where they were. ``delete`` needs the model called with keyword ``input_ids`` (as Hugging Face models are)
    and right padding; position ids are the model's defaults.

    Args:
        model: a Hugging Face model (or anything with ``get_input_embeddings()``).
        token_ids: the ids to prune.
        mask_id: ``"mask"``: the id they become (``tokenizer.mask_token_id``, else the pad id). ``"delete"``: the
            pad id written at the freed end (default ``config.pad_token_id``, else 0).
        mode: ``"mask"`` or ``"delete"``.

    Returns:
        A handle; ``remove()`` undoes it. The hook is not in the ``state_dict``: save the ids with the model
        (``config``) and call this again after loading.
    """
    if mode not in ("mask", "delete"):
        raise ValueError(f"mode must be 'mask' or 'delete', got {mode!r}")
    get = getattr(model, "get_input_embeddings", None)
    embeddings = get() if callable(get) else None
    if not isinstance(embeddings, nn.Module):
        raise ValueError(f"{type(model).__name__} has no get_input_embeddings(): pass a Hugging Face model")
    if mask_id is None:
        if mode == "mask":
            raise ValueError("mode='mask' needs mask_id (e.g. tokenizer.mask_token_id)")
        mask_id = getattr(getattr(model, "config", None), "pad_token_id", None) or 0
    ids = torch.as_tensor(list(token_ids), dtype=torch.long)
    n = getattr(embeddings, "num_embeddings", None)
    if n is not None and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= n or not 0 <= mask_id < n):
        raise ValueError(f"token ids and mask_id must be in [0, {n}), got {ids.tolist()} and {mask_id}")
    fill = int(mask_id)

    if mode == "mask":

        def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
            if not args or not isinstance(args[0], torch.Tensor):
                return None
            x = args[0]
            hit = torch.isin(x, ids.to(x.device))
            return (torch.where(hit, torch.full_like(x, fill), x), *args[1:])

        return TokenMaskHandle(embeddings.register_forward_pre_hook(hook), ids, fill)

    def delete(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        x = kwargs.get("input_ids")
        if not isinstance(x, torch.Tensor) or x.ndim != 2:
            if args:
                raise ValueError("mask_input_tokens(mode='delete') needs the model called with input_ids=...")
            return None
        keep = ~torch.isin(x, ids.to(x.device))
        if bool(keep.all()):
            return None
        kwargs = dict(kwargs)
        kwargs["input_ids"] = _compact(x, keep, fill)
        attention = kwargs.get("attention_mask")
        kwargs["attention_mask"] = _compact(
            attention if isinstance(attention, torch.Tensor) else torch.ones_like(x), keep, 0
        )
        if isinstance(kwargs.get("token_type_ids"), torch.Tensor):
            kwargs["token_type_ids"] = _compact(kwargs["token_type_ids"], keep, 0)
        return args, kwargs

    return TokenMaskHandle(model.register_forward_pre_hook(delete, with_kwargs=True), ids, fill)
