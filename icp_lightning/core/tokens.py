"""From spurious features back to input tokens, and pruning at the input: discover the tokens, then mask them.

Pruning features that carry a shortcut does not remove it when many features copy it (a planted token is read by
most heads of the last layers, and fine-tuning re-routes around masked ones; see
``benchmarks/results/reliability.md``). The discrete inverse of an intervention
(:class:`~icp_lightning.core.counterfactuals.TokenEditCounterfactual`) names, per example, the token whose removal
moves the top-scored features most. :func:`discover_tokens` counts those edits over a data set: a token that is
edited in most of the sentences that contain it, and in a fair share of all sentences, is what the features
read. :func:`mask_input_tokens` then prunes it at the input: the model reads it as another token (``[MASK]``)
from then on, in training and at inference, whatever the optimizer does to its embedding row.

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


def mask_input_tokens(model: nn.Module, token_ids: Sequence[int], mask_id: int) -> TokenMaskHandle:
    """Make ``model`` read every token in ``token_ids`` as ``mask_id``: a forward pre-hook on its input
    embeddings (``model.get_input_embeddings()``) replaces the ids before the lookup, so the edit holds under any
    optimizer (the tokens' own embedding rows are never read again) and needs no change to the data.

    Args:
        model: a Hugging Face model (or anything with ``get_input_embeddings()``).
        token_ids: the ids to mask.
        mask_id: the id they become (``tokenizer.mask_token_id``, else the pad id).

    Returns:
        A handle; ``remove()`` undoes it. The hook is not in the ``state_dict``: save the ids with the model
        (``config``) and call this again after loading.
    """
    get = getattr(model, "get_input_embeddings", None)
    embeddings = get() if callable(get) else None
    if not isinstance(embeddings, nn.Module):
        raise ValueError(f"{type(model).__name__} has no get_input_embeddings(): pass a Hugging Face model")
    ids = torch.as_tensor(list(token_ids), dtype=torch.long)
    n = getattr(embeddings, "num_embeddings", None)
    if n is not None and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= n or not 0 <= mask_id < n):
        raise ValueError(f"token ids and mask_id must be in [0, {n}), got {ids.tolist()} and {mask_id}")

    def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if not args or not isinstance(args[0], torch.Tensor):
            return None
        x = args[0]
        hit = torch.isin(x, ids.to(x.device))
        return (torch.where(hit, torch.full_like(x, mask_id), x), *args[1:])

    return TokenMaskHandle(embeddings.register_forward_pre_hook(hook), ids, mask_id)
