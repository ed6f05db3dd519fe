"""Checks of the data module's arguments and of the rows it loads; every failure is a ValueError that says
what was wrong and what to do."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal, get_args

import numpy as np
from datasets import Dataset

from icp_lightning.data.collate import PairLabels
from icp_lightning.data.sources import FileFormat, _column
from icp_lightning.recipes import RECIPES

__all__ = ["DataTask", "group_ids"]

DataTask = Literal["sequence_classification", "causal_lm"]


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


def _texts_by_role(
    ds: Dataset, split: str, rows: Sequence[int], texts: Mapping[str, str], group_column: str | None
) -> Dataset:
    """The text columns (source -> role) checked, then kept with the group column and renamed to their roles."""
    mapping = dict(texts)
    for source in mapping:
        _check_texts(_column(ds, source), rows, split, source)
    keep = list(mapping) + ([group_column] if group_column else [])
    out = ds.select_columns(keep)
    if group_column:
        mapping[group_column] = "group"
    out = out.rename_columns({s: f"__{t}" for s, t in mapping.items()})
    return out.rename_columns({f"__{t}": t for t in mapping.values()})


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


def _check_names(names: Sequence[str], what: str) -> None:
    bad = [n for n in names if not isinstance(n, str) or not n or "." in n or "/" in n]
    if bad:
        raise ValueError(f"{what} names must be non-empty strings without '.' or '/', got {bad}")
    dupes = sorted({n for n in names if list(names).count(n) > 1})
    if dupes:
        raise ValueError(f"{what} names must be unique; repeated: {dupes} in {list(names)}")


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


def _check_source_args(
    recipe: str | None,
    train_files: str | list[str] | None,
    eval_files: Mapping[str, Any] | None,
    dataset: str | None,
    train_split: str | None,
    eval_splits: Mapping[str, str] | None,
    file_format: str | None,
) -> None:
    """Exactly one data source (recipe, local files or hub), a known recipe, split names only where they apply."""
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


def _check_counts(
    *,
    max_length: int,
    batch_size: int,
    eval_batch_size: int | None,
    max_train_examples: int | None,
    max_eval_examples: int | None,
    attribution_size: int,
    num_labels: int | None,
    num_workers: int,
    heldout_size: int,
) -> None:
    """Sizes and counts are ints in range (``None`` where the argument allows it)."""
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


def _check_label_map(label_map: Mapping[str, int] | None, num_labels: int | None) -> None:
    if label_map is not None:
        if not label_map or not all(isinstance(v, int) and v >= 0 for v in label_map.values()):
            raise ValueError(f"label_map must map label strings to ints >= 0, got {label_map!r}")
        if num_labels is not None and max(label_map.values()) >= num_labels:
            raise ValueError(f"label_map has ids up to {max(label_map.values())} but num_labels={num_labels}")


def group_ids(
    values_by_split: Mapping[str, tuple[list[Any], list[int]]], column: str | None
) -> tuple[dict[str, list[int]], list[str]]:
    """Group ids per split and the group names: ints >= 0 as they are, else names mapped in sorted order.

    Args:
        values_by_split: split -> (the group column's values, their row indices for messages).
        column: the group column's name, for messages.

    Example:
        >>> group_ids({"train": (["b", "a"], [0, 1]), "test": (["a"], [0])}, "g")
        ({'train': [1, 0], 'test': [0]}, ['a', 'b'])
    """
    everything = [v for values, _ in values_by_split.values() for v in values]
    for split, (values, rows) in values_by_split.items():
        for row, v in zip(rows, values):
            if v is None:
                raise ValueError(f"row {row} of split {split!r}: the group in column {column!r} is missing")
    if all(isinstance(v, (int, np.integer, bool, np.bool_)) for v in everything):
        for split, (values, rows) in values_by_split.items():
            for row, v in zip(rows, values):
                if int(v) < 0:
                    raise ValueError(
                        f"row {row} of split {split!r}: group {v} in column {column!r} is negative"
                    )
        names = [str(i) for i in range(max(int(v) for v in everything) + 1)]
        return {s: [int(v) for v in values] for s, (values, _) in values_by_split.items()}, names
    names = sorted({str(v) for v in everything})
    index = {n: i for i, n in enumerate(names)}
    return {s: [index[str(v)] for v in values] for s, (values, _) in values_by_split.items()}, names


def check_data_args(args: Mapping[str, Any]) -> list[str] | dict[str, str]:
    """Every argument check of :class:`~icp_lightning.data.ICPDataModule`, run in its ``__init__`` before
    anything loads. ``args``: the module's constructor arguments by name. Returns the shortcut modes,
    normalized (a list, or evaluation set -> mode)."""
    from icp_lightning.data.planting import _check_shortcut_args  # planting imports this module

    _check_task_args(
        args["task"],
        args["prompt_column"],
        args["answer_column"],
        args["pair_labels"],
        text_pair_column=args["text_pair_column"],
        label_map=args["label_map"],
        num_labels=args["num_labels"],
        shortcut_token=args["shortcut_token"],
        heldout_size=args["heldout_size"],
    )
    sources = ("recipe", "train_files", "eval_files", "dataset", "train_split", "eval_splits", "file_format")
    _check_source_args(**{k: args[k] for k in sources})
    counts = ("max_length", "batch_size", "eval_batch_size", "max_train_examples", "max_eval_examples")
    _check_counts(
        **{k: args[k] for k in counts + ("attribution_size", "num_labels", "num_workers", "heldout_size")}
    )
    shortcut = ("shortcut_token", "shortcut_rate", "shortcut_position", "shortcut_modes", "group_column")
    modes = _check_shortcut_args(**{k: args[k] for k in shortcut + ("cf_text_column",)})
    _check_label_map(args["label_map"], args["num_labels"])
    for what in ("eval_files", "eval_splits"):
        if args[what] is not None:
            _check_names(list(args[what]), what)
    return modes
