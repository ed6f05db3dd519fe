"""Tokenising and collating: rows of text to token ids (classification or causal LM), and batches of tensors.

:func:`tokenize_classification` / :func:`tokenize_lm` tokenise a canonical data set (columns ``text``,
``text_pair``, ``answer``, ``cf_text``, ``label``, ``group``, ``row``) with ``datasets.map``;
:class:`ICPCollator` right-pads tokenised rows into a batch.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from datasets import Dataset

from icp_lightning.assets import resolve_pretrained
from icp_lightning.data.sources import _column

__all__ = ["ICPCollator", "PairLabels", "load_tokenizer", "tokenize_classification", "tokenize_lm"]

PairLabels = Literal["full", "shared_suffix"]

_SEQ_KEYS = ("input_ids", "attention_mask", "token_type_ids")
_IGNORE_INDEX = -100


def _tokenize_batch(
    batch: dict[str, list[Any]],
    *,
    tokenizer: Any,
    max_length: int,
    has_pair: bool,
    has_cf: bool,
    has_group: bool,
    split: str,
    columns: dict[str, str],
) -> dict[str, list[Any]]:
    texts, pairs = batch["text"], (batch["text_pair"] if has_pair else None)
    enc = tokenizer(texts, pairs, truncation=True, max_length=max_length, return_special_tokens_mask=True)
    for i, special in enumerate(enc["special_tokens_mask"]):
        counts = _segment_counts(enc, i, special, has_pair)
        for segment, count in enumerate(counts):
            if count == 0:
                column = columns["text_pair" if segment else "text"]
                value = (pairs if segment else texts)[i]  # type: ignore[index]
                raise ValueError(
                    f"row {batch['row'][i]} of split {split!r}: the text {value!r} in column {column!r} "
                    "tokenises to nothing (no tokens besides the special ones); drop or fix that row"
                )
    out: dict[str, list[Any]] = {k: enc[k] for k in _SEQ_KEYS if k in enc}
    out["labels"] = batch["label"]
    if has_group:
        out["group"] = batch["group"]
    if has_cf:
        cf = tokenizer(batch["cf_text"], pairs, truncation=True, max_length=max_length)
        out.update({f"cf_{k}": cf[k] for k in _SEQ_KEYS if k in cf})
    return out


def _segment_counts(enc: Any, i: int, special: list[int], has_pair: bool) -> list[int]:
    """Non-special tokens of each segment of row ``i`` (one count when segments are unknown)."""
    try:
        sequence_ids = enc.sequence_ids(i)
    except (ValueError, AttributeError):  # slow tokenizers
        sequence_ids = None
    if sequence_ids is None or not has_pair:
        return [len(special) - sum(special)]
    return [sum(1 for s in sequence_ids if s == seg) for seg in (0, 1)]


def _leading_special(ids: Sequence[int], special_ids: set[int]) -> int:
    """How many of the first ids are special tokens (a BOS, say)."""
    n = 0
    while n < len(ids) and ids[n] in special_ids:
        n += 1
    return n


def _lm_row(
    tokenizer: Any,
    prompt: str | None,
    answer: str,
    max_length: int,
    special_ids: set[int],
) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of one causal-LM row: the prompt (with the tokenizer's special tokens, e.g. BOS)
    then the answer (without), labels -100 except on the answer's non-special tokens. Too long: the prompt
    loses tokens from its left (after its leading special tokens), then the answer from its right."""
    if prompt is None:
        ids = list(tokenizer(answer, add_special_tokens=True)["input_ids"])
        ids = ids[:max_length]
        return ids, [t if t not in special_ids else _IGNORE_INDEX for t in ids]
    prompt_ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    answer_ids = list(tokenizer(answer, add_special_tokens=False)["input_ids"])
    lead = _leading_special(prompt_ids, special_ids)
    excess = len(prompt_ids) + len(answer_ids) - max_length
    if excess > 0:
        cut = min(excess, len(prompt_ids) - lead)
        prompt_ids = prompt_ids[:lead] + prompt_ids[lead + cut :]
        answer_ids = answer_ids[: max_length - len(prompt_ids)]
    labels = [_IGNORE_INDEX] * len(prompt_ids) + [
        t if t not in special_ids else _IGNORE_INDEX for t in answer_ids
    ]
    return prompt_ids + answer_ids, labels


def _shared_suffix(
    a: Sequence[int], b: Sequence[int], a_labels: Sequence[int], b_labels: Sequence[int]
) -> int:
    """The length of the common tail of two rows: the same tokens, labelled (or not) alike in both."""
    k = 0
    while (
        k < min(len(a), len(b))
        and a[-1 - k] == b[-1 - k]
        and (a_labels[-1 - k] == _IGNORE_INDEX) == (b_labels[-1 - k] == _IGNORE_INDEX)
    ):
        k += 1
    return k


def _tokenize_lm_batch(
    batch: dict[str, list[Any]],
    *,
    tokenizer: Any,
    max_length: int,
    has_answer: bool,
    has_cf: bool,
    has_group: bool,
    pair_labels: str,
    split: str,
    columns: dict[str, str],
) -> dict[str, list[Any]]:
    """Causal-LM rows: ``input_ids``, ``attention_mask``, token ``labels`` (and the ``cf_`` twins)."""
    special_ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    out: dict[str, list[Any]] = {"input_ids": [], "attention_mask": [], "labels": []}
    if has_cf:
        out.update({"cf_input_ids": [], "cf_attention_mask": [], "cf_labels": []})
    if has_group:
        out["group"] = batch["group"]
    for i in range(len(batch["text"])):
        answer = batch["answer"][i] if has_answer else batch["text"][i]
        prompt = batch["text"][i] if has_answer else None
        ids, labels = _lm_row(tokenizer, prompt, answer, max_length, special_ids)
        cf_ids: list[int] = []
        cf_labels: list[int] = []
        if has_cf:
            cf_prompt = batch["cf_text"][i] if has_answer else None
            cf_answer = answer if has_answer else batch["cf_text"][i]
            cf_ids, cf_labels = _lm_row(tokenizer, cf_prompt, cf_answer, max_length, special_ids)
        for row_labels, role in ((labels, "answer" if has_answer else "text"), (cf_labels, "cf_text")):
            if role == "cf_text" and not has_cf:
                continue
            if all(t == _IGNORE_INDEX for t in row_labels):
                column = columns[role]
                value = batch[role][i] if role in batch else answer
                raise ValueError(
                    f"row {batch['row'][i]} of split {split!r}: the text {value!r} in column {column!r} leaves no "
                    f"answer token (it tokenises to special tokens only, or max_length={max_length} cuts it "
                    "off); drop or fix that row, or raise max_length"
                )
        if has_cf and pair_labels == "shared_suffix":
            k = _shared_suffix(ids, cf_ids, labels, cf_labels)
            labels = [_IGNORE_INDEX] * (len(ids) - k) + labels[len(ids) - k :]
            cf_labels = [_IGNORE_INDEX] * (len(cf_ids) - k) + cf_labels[len(cf_ids) - k :]
        out["input_ids"].append(ids)
        out["attention_mask"].append([1] * len(ids))
        out["labels"].append(labels)
        if has_cf:
            out["cf_input_ids"].append(cf_ids)
            out["cf_attention_mask"].append([1] * len(cf_ids))
            out["cf_labels"].append(cf_labels)
    return out


@dataclass
class ICPCollator:
    """Right-pads a list of tokenised rows into a batch of tensors; ``cf_*`` fields get the same length.

    Token ``labels`` / ``cf_labels`` (lists, for causal language models) are padded with -100 to that length
    too; integer labels (classification) stay ``[B]``.

    Args:
        pad_token_id: the id that pads ``input_ids`` / ``cf_input_ids`` (masks and token types pad with 0).
        pad_to_multiple_of: round the padded length up to a multiple of this (``None``: no rounding).

    Example:
        >>> collate = ICPCollator(pad_token_id=0)
        >>> batch = collate([
        ...     {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": 1, "cf_input_ids": [5, 6],
        ...      "cf_attention_mask": [1, 1]},
        ...     {"input_ids": [5], "attention_mask": [1], "labels": 0, "cf_input_ids": [5, 9, 9, 9],
        ...      "cf_attention_mask": [1, 1, 1, 1]},
        ... ])
        >>> batch["input_ids"]
        tensor([[5, 6, 7, 0],
                [5, 0, 0, 0]])
        >>> batch["cf_attention_mask"]
        tensor([[1, 1, 0, 0],
                [1, 1, 1, 1]])
        >>> collate([{"input_ids": [5, 6], "labels": [-100, 6]}, {"input_ids": [7], "labels": [7]}])["labels"]
        tensor([[-100,    6],
                [   7, -100]])
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """Collate ``features`` (dicts of lists / ints) into a dict of tensors."""
        if not features:
            raise ValueError("cannot collate an empty list of rows")
        keys = list(features[0])
        seq_keys = [
            k
            for k in keys
            if k.removeprefix("cf_") in _SEQ_KEYS
            or (k.removeprefix("cf_") == "labels" and isinstance(features[0][k], (list, tuple)))
        ]
        length = max((len(f[k]) for f in features for k in seq_keys), default=0)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch: dict[str, torch.Tensor] = {}
        for key in keys:
            if key in seq_keys:
                pad = (
                    self.pad_token_id
                    if key.endswith("input_ids")
                    else (_IGNORE_INDEX if key.endswith("labels") else 0)
                )
                out = torch.full((len(features), length), pad, dtype=torch.long)
                for i, f in enumerate(features):
                    values = f[key]
                    out[i, : len(values)] = torch.as_tensor(values, dtype=torch.long)
                batch[key] = out
            else:
                batch[key] = torch.as_tensor([f[key] for f in features], dtype=torch.long)
        return batch


def load_tokenizer(name: str, kwargs: Mapping[str, Any]) -> Any:
    """``AutoTokenizer.from_pretrained`` of ``name`` (an offline alias resolved), padding on the right, with a
    pad token (the EOS token when it has none)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_pretrained(name), **kwargs)
    tok.padding_side = "right"
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ValueError(f"tokenizer {name!r} has neither a pad nor an EOS token; give one that does")
        tok.pad_token = tok.eos_token
    return tok


def _map_rows(
    ds: Dataset,
    fn: Callable[..., dict[str, list[Any]]],
    split: str,
    tokenizer: Any,
    max_length: int,
    columns: dict[str, str],
    flag: str,
    flag_column: str,
    **more: Any,
) -> Dataset:
    """``ds.map`` of a batched tokenising ``fn`` over a canonical set, replacing its columns with ``fn``'s.

    ``fn`` gets ``flag`` (whether ``ds`` has the column ``flag_column``), ``has_cf`` and ``has_group`` (whether it
    has ``cf_text`` / ``group``), ``more``, and the tokenizer, ``max_length``, ``split`` and ``columns``.
    """
    present = ds.column_names
    return ds.map(
        fn,
        batched=True,
        remove_columns=present,
        fn_kwargs={
            "tokenizer": tokenizer,
            "max_length": max_length,
            flag: flag_column in present,
            "has_cf": "cf_text" in present,
            "has_group": "group" in present,
            **more,
            "split": split,
            "columns": columns,
        },
        desc=f"tokenizing {split}",
    )


def tokenize_classification(
    ds: Dataset, split: str, tokenizer: Any, max_length: int, columns: dict[str, str]
) -> Dataset:
    """Classification rows: ``input_ids``, masks, ``labels`` (and ``group``, the ``cf_`` twins) of a canonical set.

    ``columns`` names the user's ``text`` / ``text_pair`` columns, for error messages.
    """
    return _map_rows(ds, _tokenize_batch, split, tokenizer, max_length, columns, "has_pair", "text_pair")


def tokenize_lm(
    ds: Dataset, split: str, tokenizer: Any, max_length: int, pair_labels: str, columns: dict[str, str]
) -> Dataset:
    """Causal-LM rows (see :func:`_tokenize_lm_batch`) of a canonical set; warns about pairs that lose labels.

    ``columns`` names the user's ``text`` / ``answer`` / ``cf_text`` columns, for error messages.
    """
    has_cf = "cf_text" in ds.column_names
    out = _map_rows(
        ds,
        _tokenize_lm_batch,
        split,
        tokenizer,
        max_length,
        columns,
        "has_answer",
        "answer",
        pair_labels=pair_labels,
    )
    if has_cf and pair_labels == "full":
        _warn_uneven_pairs(out, split)
    if has_cf and pair_labels == "shared_suffix":
        empty = sum(all(t == _IGNORE_INDEX for t in row) for row in _column(out, "labels"))
        if empty:
            warnings.warn(
                f"split {split!r}: {empty} of {len(out)} pair(s) share no final answer token (they differ "
                "in their last token), so pair_labels='shared_suffix' leaves them no label: they add nothing "
                "to the loss or the metrics",
                stacklevel=3,
            )
    return out


def _warn_uneven_pairs(ds: Dataset, split: str) -> None:
    uneven = sum(
        sum(t != _IGNORE_INDEX for t in a) != sum(t != _IGNORE_INDEX for t in b)
        for a, b in zip(_column(ds, "labels"), _column(ds, "cf_labels"))
    )
    if uneven:
        warnings.warn(
            f"split {split!r}: in {uneven} of {len(ds)} pair(s) the text and its counterfactual have different "
            "numbers of answer tokens; ICPContrastiveModule(counterfactual='paired') compares answer positions "
            "one to one and raises on batches holding such pairs. Pass pair_labels='shared_suffix' to label "
            "only the tokens both share at the end (swap effects and the task loss work either way)",
            stacklevel=4,
        )
