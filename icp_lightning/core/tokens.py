"""From spurious features back to input tokens, and pruning at the input: discover the tokens, then mask them.

Pruning features that carry a shortcut does not remove it when many features copy it (a planted token is read by
most heads of the last layers, and fine-tuning re-routes around masked ones; see
``benchmarks/results/reliability.md``). The discrete inverse of an intervention
(:class:`~icp_lightning.core.counterfactuals.TokenEditCounterfactual`) names, per example, the token whose removal
moves the top-scored features most. :func:`discover_tokens` counts those edits over a data set: a token that is
edited in most of the sentences that contain it, and in a fair share of all sentences, is what the features
read. :func:`mask_input_tokens` then prunes it at the input, in training and at inference: the model reads it
as ``[MASK]`` (``mode="mask"``) or never sees it (``mode="delete"``).

Both act on whole words when told which pieces continue a word (:func:`word_continuation_ids`): an edit of
``qui`` in ``qui ##x ##otic`` counts for the word ``quixotic``, and deleting it removes all three pieces.

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
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from icp_lightning.core.sites import Sites

__all__ = [
    "DiscoveredToken",
    "TokenMaskHandle",
    "check_rule",
    "confirm_tokens",
    "discover_tokens",
    "find_shortcut_words",
    "mask_input_tokens",
    "nominate",
    "remove_input_tokens",
    "token_inverse",
    "word_continuation_ids",
]


@dataclass
class DiscoveredToken:
    """One token (or whole word) the inverse edited: ``edited`` of the ``present`` sentences containing it (of
    ``total``). ``token_ids`` holds all of a word's pieces (``(token_id,)`` for a one-piece token)."""

    token_id: int
    edited: int
    present: int
    total: int
    discovered: bool
    token_ids: tuple[int, ...] = ()
    #: Filled by :func:`confirm_tokens`: sentences holding the word in the reference (training) and balanced
    #: (held-out) sets, the mean drop of the label's probability when it is deleted from each, and their
    #: difference (``None``: not measured).
    reference_present: int = 0
    balanced_present: int = 0
    reference_drop: float | None = None
    balanced_drop: float | None = None
    contrast: float | None = None

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = (self.token_id,)

    @property
    def rate(self) -> float:
        """Share of the sentences containing the token in which it was the edit."""
        return self.edited / max(self.present, 1)


def word_continuation_ids(tokenizer: Any) -> frozenset[int]:
    """The ids of the pieces that continue a word in ``tokenizer``'s vocabulary.

    WordPiece (BERT): pieces written ``##...``. Vocabularies that mark a word's *start* instead (SentencePiece
    ``▁``, byte-level BPE ``Ġ``): every non-special piece without the marker. Other vocabularies: none
    (every token is its own word).

    Example:
        >>> class Tok:
        ...     all_special_ids = [0]
        ...     def get_vocab(self): return {"[PAD]": 0, "qui": 1, "##x": 2, "##otic": 3, "film": 4}
        >>> sorted(word_continuation_ids(Tok()))
        [2, 3]
    """
    vocab: dict[str, int] = tokenizer.get_vocab()
    special = {int(i) for i in getattr(tokenizer, "all_special_ids", [])}
    if any(t.startswith("##") for t in vocab):
        return frozenset(i for t, i in vocab.items() if t.startswith("##") and i not in special)
    for marker in ("\u2581", "\u0120"):
        if sum(t.startswith(marker) for t in vocab) > len(vocab) // 4:
            return frozenset(i for t, i in vocab.items() if not t.startswith(marker) and i not in special)
    return frozenset()


def _word_span(row: Sequence[int], p: int, cont: Collection[int]) -> tuple[int, int]:
    """[start, end) of the word holding position ``p`` of ``row`` (pieces in ``cont`` continue a word)."""
    start, end = p, p + 1
    while start > 0 and row[start] in cont:
        start -= 1
    while end < len(row) and row[end] in cont:
        end += 1
    return start, end


def _words(row: Sequence[int], cont: Collection[int]) -> list[tuple[int, ...]]:
    out: list[tuple[int, ...]] = []
    for i, t in enumerate(row):
        if i > 0 and t in cont and out:
            out[-1] = (*out[-1], t)
        else:
            out.append((t,))
    return out


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
    continuation_ids: Collection[int] | None = None,
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
        continuation_ids: the pieces that continue a word (:func:`word_continuation_ids`): edits and presence
            are counted per whole word (an edit of any piece counts for its word, once per sentence), and each
            result's ``token_ids`` lists the word's pieces. ``None``: per token.

    Returns:
        Every edited token or word, most edited first (ties: smaller ids first), with ``discovered`` set by the
        rule.

    Raises:
        ValueError: thresholds outside [0, 1], or no examples.
    """
    if not (0.0 <= min_share <= 1.0 and 0.0 <= min_rate <= 1.0):
        raise ValueError(f"min_share and min_rate must be in [0, 1], got {min_share}, {min_rate}")
    special = {int(t) for t in special_token_ids}
    cont = frozenset(int(t) for t in continuation_ids) if continuation_ids is not None else frozenset()
    edited: Counter[tuple[int, ...]] = Counter()
    present: Counter[tuple[int, ...]] = Counter()
    total = 0
    for batch in batches:
        out = counterfactual.build(model, dict(batch), scores, sites)
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        for b, positions in enumerate(out.info["edited_positions"]):
            total += 1
            keep = ids[b] if mask is None else ids[b][mask[b].bool()]
            kept = [int(t) for t in keep.tolist()]
            present.update({w for w in _words(kept, cont) if w[0] not in special})
            full = [int(t) for t in ids[b].tolist()]
            words = set()
            for p in positions:
                start, end = _word_span(full, int(p), cont) if cont else (int(p), int(p) + 1)
                words.add(tuple(full[start:end]))
            edited.update(words)
    if total == 0:
        raise ValueError("discover_tokens got no examples")
    found = [
        DiscoveredToken(
            w[0], c, present[w], total, c >= min_share * total and c / max(present[w], 1) >= min_rate, w
        )
        for w, c in edited.items()
    ]
    return sorted(found, key=lambda d: (-d.edited, d.token_ids))


def _deletion_drops(
    model: nn.Module, batches: Iterable[Mapping[str, Any]], words: Sequence[tuple[int, ...]], pad_id: int
) -> dict[tuple[int, ...], list[float]]:
    """Per word: ``p(y | x) - p(y | x without the word)`` for every sentence of ``batches`` that holds it."""
    drops: dict[tuple[int, ...], list[float]] = {w: [] for w in words}
    for batch in batches:
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        real = mask.bool() if mask is not None else torch.ones_like(ids, dtype=torch.bool)
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
        y = batch["labels"].long().unsqueeze(-1)
        p = model(**inputs).logits.float().softmax(-1).gather(-1, y).squeeze(-1)
        for w in words:
            singles, multi = _split_words([w])
            rows = (_hits(ids, singles, multi) & real).any(1)
            if not rows.any():
                continue
            out = remove_input_tokens(ids[rows], [w], pad_id, None if mask is None else mask[rows],
                                      batch["token_type_ids"][rows] if "token_type_ids" in batch else None)  # fmt: skip
            q = model(**out).logits.float().softmax(-1).gather(-1, y[rows]).squeeze(-1)
            drops[w].extend((p[rows] - q).tolist())
    return drops


@torch.no_grad()
def confirm_tokens(
    model: nn.Module,
    found: Sequence[DiscoveredToken],
    reference: Iterable[Mapping[str, Any]],
    balanced: Iterable[Mapping[str, Any]],
    *,
    pad_id: int = 0,
    min_contrast: float = 0.1,
    min_present: int = 2,
) -> list[DiscoveredToken]:
    """Keep the candidates (``discovered`` by :func:`discover_tokens`) whose deletion contrast marks a shortcut.

    The signed contrast of the attribution, at the level of words: for each candidate, the mean drop of the true
    label's probability when the word is deleted (every piece of every occurrence, as
    :func:`remove_input_tokens` does), over the sentences of ``reference`` (training data, where the shortcut
    goes with the label) that hold it, minus the same over those of ``balanced`` (a held-out split whose groups
    are balanced, where it does not). A shortcut supports the label only where it is correlated with it (large
    contrast); a word that carries the task supports it in both (contrast near 0); a word the model ignores
    moves nothing. Counting edits alone misses a shortcut the inverse edits in few sentences (the inverse
    stops when the top features barely fire), and accepts a frequent task word it happens to edit.

    Args:
        model: the model (evaluation mode is the caller's; run under ``torch.no_grad``).
        found: :func:`discover_tokens`' result; only its ``discovered`` entries are candidates.
        reference, balanced: batches with ``input_ids``, ``labels`` (``attention_mask``, ``token_type_ids``).
        pad_id: written at the freed end of a row when a word is deleted.
        min_contrast: a candidate is kept when its contrast is at least this (in probability).
        min_present: ... and both sets hold it in at least this many sentences (else it cannot be measured).

    Returns:
        ``found`` in its order, each a copy with the measurements filled in for the candidates and
        ``discovered`` set by this rule (non-candidates stay undiscovered, unmeasured).

    Raises:
        ValueError: ``min_present < 1`` or ``min_contrast < 0`` (:func:`check_rule`).
    """
    check_rule(min_present=min_present, min_contrast=min_contrast)
    words = [d.token_ids for d in found if d.discovered]
    ref = _deletion_drops(model, reference, words, pad_id)
    bal = _deletion_drops(model, balanced, words, pad_id)
    out: list[DiscoveredToken] = []
    for d in found:
        d = replace(d)
        if d.discovered:
            r, b = ref[d.token_ids], bal[d.token_ids]
            d.reference_present, d.balanced_present = len(r), len(b)
            d.reference_drop = float(np.mean(r)) if r else None
            d.balanced_drop = float(np.mean(b)) if b else None
            ok = len(r) >= min_present and len(b) >= min_present
            d.contrast = d.reference_drop - d.balanced_drop if ok else None  # type: ignore[operator]
            d.discovered = ok and d.contrast is not None and d.contrast >= min_contrast
        out.append(d)
    return out


def check_rule(
    *, min_share: float = 0.05, min_rate: float | None = 0.5, min_present: int = 2, min_contrast: float = 0.1
) -> None:
    """Validate the thresholds of the discovery rule (:func:`nominate`, :func:`confirm_tokens`) before any work.

    Raises:
        ValueError: ``min_share`` or ``min_rate`` outside [0, 1], ``min_present < 1`` or ``min_contrast < 0``.

    Example:
        >>> check_rule(min_rate=None)
        >>> check_rule(min_share=2.0)
        Traceback (most recent call last):
        ...
        ValueError: min_share and min_rate must be in [0, 1], got 2.0, 0.5
    """
    if not 0.0 <= min_share <= 1.0 or (min_rate is not None and not 0.0 <= min_rate <= 1.0):
        raise ValueError(f"min_share and min_rate must be in [0, 1], got {min_share}, {min_rate}")
    if min_present < 1:
        raise ValueError(f"min_present must be >= 1, got {min_present}")
    if not min_contrast >= 0.0:
        raise ValueError(
            f"min_contrast must be >= 0 (a lower bar keeps words that carry the task), got {min_contrast}"
        )


def nominate(
    found: Sequence[DiscoveredToken],
    *,
    min_share: float = 0.05,
    min_rate: float | None = 0.5,
    min_present: int = 2,
) -> list[DiscoveredToken]:
    """The candidates :func:`confirm_tokens` measures: the edited words the inverse edits often *or* consistently.

    A word is a candidate when the inverse edits it in at least ``min_share`` of all sentences (a frequent
    shortcut: A's planted token, which the inverse edits in only 14-33 of the 78 sentences holding it because it
    stops early where the top features barely fire), or in at least ``min_rate`` of the sentences that hold it,
    when at least ``min_present`` hold it (a rare one: a name held by 8 of 128 sentences, edited in most of them).

    Args:
        found: :func:`discover_tokens`' result (its own ``discovered`` flag is ignored).
        min_share, min_rate, min_present: the two paths above; ``min_rate=None`` keeps the share path only.

    Returns:
        Copies of ``found`` in its order, ``discovered`` set by this rule.

    Raises:
        ValueError: a threshold outside [0, 1] or ``min_present < 1``.
    """
    check_rule(min_share=min_share, min_rate=min_rate, min_present=min_present)
    out = []
    for d in found:
        often = d.edited >= min_share * d.total
        consistent = min_rate is not None and d.present >= min_present and d.rate >= min_rate
        out.append(replace(d, discovered=bool(often or consistent)))
    return out


def token_inverse(tokenizer: Any, top_k: int = 8) -> Any:
    """The discrete inverse discovery runs: one ``[MASK]`` edit per sentence, the two best-ranked edits checked
    exactly, on the ``top_k`` top-scored features (a
    :class:`~icp_lightning.core.counterfactuals.TokenEditCounterfactual`)."""
    from icp_lightning.core.counterfactuals import TokenEditCounterfactual

    return TokenEditCounterfactual(max_edits=1, candidates=2, top_k=top_k, replace_id=tokenizer.mask_token_id,
                                   special_token_ids=tokenizer.all_special_ids)  # fmt: skip


def find_shortcut_words(
    model: nn.Module,
    reference: Sequence[Mapping[str, Any]],
    balanced: Sequence[Mapping[str, Any]],
    scores: Mapping[str, torch.Tensor],
    sites: Sites,
    tokenizer: Any,
    *,
    top_k: int = 8,
    min_share: float = 0.05,
    min_rate: float | None = 0.5,
    min_contrast: float = 0.1,
    min_present: int = 2,
) -> list[DiscoveredToken]:
    """The shortcut words of ``model``, told nothing: the one rule the repair callback and the benchmarks use.

    1. The discrete inverse (:class:`~icp_lightning.core.counterfactuals.TokenEditCounterfactual`: one ``[MASK]``
       edit per sentence, two candidates checked exactly) of masking the ``top_k`` top-scored features, over the
       ``reference`` (training) batches, names whole words; :func:`nominate` makes those edited in at least
       ``min_share`` of the sentences, or in at least ``min_rate`` of the (``min_present`` or more) sentences
       holding them, candidates.
    2. :func:`confirm_tokens` keeps the candidates whose deletion lowers the label's probability on
       ``reference`` more than on ``balanced`` (the held-out split) by ``min_contrast``.

    Both lists of batches need ``input_ids``, ``attention_mask`` and ``labels``; no evaluation set belongs here.
    The model is put in evaluation mode for the search and restored.

    Returns:
        :func:`confirm_tokens`' result: every edited word, most edited first, ``discovered`` by the rule.
    """
    check_rule(min_share=min_share, min_rate=min_rate, min_present=min_present, min_contrast=min_contrast)
    edit = token_inverse(tokenizer, top_k)
    was_training = model.training
    model.eval()
    try:
        found = discover_tokens(model, reference, scores, sites, edit, min_share=0.0, min_rate=0.0,
                                special_token_ids=tokenizer.all_special_ids,
                                continuation_ids=word_continuation_ids(tokenizer))  # fmt: skip
        found = nominate(found, min_share=min_share, min_rate=min_rate, min_present=min_present)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        return confirm_tokens(model, found, reference, balanced, pad_id=int(pad), min_contrast=min_contrast,
                              min_present=min_present)  # fmt: skip
    finally:
        model.train(was_training)


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


def _split_words(token_ids: Sequence[int | Sequence[int]]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Single ids (and one-piece words) as one tensor; multi-piece words each as a tensor of their pieces."""
    singles: list[int] = []
    words: list[torch.Tensor] = []
    for t in token_ids:
        if isinstance(t, (int, np.integer)) or (isinstance(t, torch.Tensor) and t.ndim == 0):
            singles.append(int(t))
            continue
        pieces = [int(v) for v in t]
        if not pieces:
            raise ValueError("an empty word in token_ids: give each word as a non-empty list of piece ids")
        if len(pieces) == 1:
            singles.append(pieces[0])
        else:
            words.append(torch.tensor(pieces, dtype=torch.long))
    return torch.tensor(singles, dtype=torch.long), words


def _hits(x: torch.Tensor, singles: torch.Tensor, words: Sequence[torch.Tensor]) -> torch.Tensor:
    """Positions of ``x`` ([B, T]) holding one of ``singles`` or a piece of a whole occurrence of a ``words``
    sequence."""
    hit = torch.isin(x, singles.to(x.device))
    for w in words:
        n = len(w)
        if x.shape[1] < n:
            continue
        match = (x.unfold(1, n, 1) == w.to(x.device)).all(-1)  # [B, T - n + 1]: an occurrence starts here
        for j in range(n):
            hit[:, j : j + match.shape[1]] |= match
    return hit


def remove_input_tokens(
    input_ids: torch.Tensor,
    token_ids: Sequence[int | Sequence[int]],
    pad_id: int = 0,
    attention_mask: torch.Tensor | None = None,
    token_type_ids: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """``input_ids`` (right padded) with ``token_ids`` deleted: later tokens shift left, ``pad_id`` fills the end.

    What :func:`mask_input_tokens` (``mode="delete"``) does inside the model, as a function of the batch (to build
    ``x`` without the tokens beside ``x``, e.g. for a consistency loss).

    Args:
        input_ids: ``[B, T]``.
        token_ids: ids, or whole words as sequences of piece ids (every piece of each occurrence goes).
        pad_id: written at the freed end.
        attention_mask, token_type_ids: compacted the same way (the mask gets 0 at the end).

    Returns:
        ``input_ids``, ``attention_mask`` (and ``token_type_ids`` when given).

    Example:
        >>> out = remove_input_tokens(torch.tensor([[2, 7, 8, 9, 5, 3]]), [[7, 8, 9]], pad_id=0)
        >>> out["input_ids"].tolist(), out["attention_mask"].tolist()
        ([[2, 5, 3, 0, 0, 0]], [[1, 1, 1, 0, 0, 0]])
    """
    singles, words = _split_words(token_ids)
    keep = ~_hits(input_ids, singles, words)
    attention = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    out = {
        "input_ids": _compact(input_ids, keep, int(pad_id)),
        "attention_mask": _compact(attention, keep, 0),
    }
    if token_type_ids is not None:
        out["token_type_ids"] = _compact(token_type_ids, keep, 0)
    return out


def mask_input_tokens(
    model: nn.Module, token_ids: Sequence[int | Sequence[int]], mask_id: int | None = None, mode: str = "mask"
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
        token_ids: the ids to prune; a whole word is a sequence of its piece ids (``[qui, ##x, ##otic]``, e.g.
            :attr:`DiscoveredToken.token_ids`): every piece of each of its occurrences is pruned.
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
    singles, words = _split_words(token_ids)
    ids = torch.cat([singles, *words]) if words else singles
    n = getattr(embeddings, "num_embeddings", None)
    if n is not None and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= n or not 0 <= mask_id < n):
        raise ValueError(f"token ids and mask_id must be in [0, {n}), got {ids.tolist()} and {mask_id}")
    fill = int(mask_id)

    if mode == "mask":

        def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
            if not args or not isinstance(args[0], torch.Tensor):
                return None
            x = args[0]
            hit = _hits(x, singles, words) if x.ndim == 2 else torch.isin(x, ids.to(x.device))
            return (torch.where(hit, torch.full_like(x, fill), x), *args[1:])

        return TokenMaskHandle(embeddings.register_forward_pre_hook(hook), ids, fill)

    def delete(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        x = kwargs.get("input_ids")
        if not isinstance(x, torch.Tensor) or x.ndim != 2:
            if args:
                raise ValueError("mask_input_tokens(mode='delete') needs the model called with input_ids=...")
            return None
        keep = ~_hits(x, singles, words)
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
