"""Where rows come from: local files (csv / tsv / json / parquet, compressed or not), the splits of a recipe or
hub data set, seeded row subsets, and the label-balanced held-out carve."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from datasets import Dataset, DatasetDict, load_dataset

__all__ = ["FileFormat", "carve_heldout"]

FileFormat = Literal["csv", "tsv", "json", "parquet"]

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


def _load_file_splits(
    train_files: str | Sequence[str] | None, eval_files: dict[str, Any] | None, file_format: str | None
) -> tuple[Dataset | None, dict[str, Dataset]]:
    """The training split (or None) and the evaluation sets of local files."""
    train = _load_files(train_files, "train", file_format) if train_files is not None else None
    evals = {name: _load_files(files, name, file_format) for name, files in (eval_files or {}).items()}
    return train, evals


def _load_hub(dataset: str, config: str | None) -> DatasetDict:
    """``load_dataset(dataset, config)``: a hub data set or local folder, which must have named splits."""
    loaded = load_dataset(dataset, config)
    if not isinstance(loaded, DatasetDict):
        raise ValueError(f"load_dataset({dataset!r}) did not return named splits")
    return loaded


def _hub_split_names(dataset: str, config: str | None) -> list[str]:
    """The split names of a hub data set, without loading it."""
    from datasets import get_dataset_split_names

    return list(get_dataset_split_names(dataset, config))


def _pick_splits(
    source: DatasetDict, what: str, train_split: str | None, raw_eval: dict[str, str]
) -> tuple[Dataset | None, dict[str, Dataset]]:
    """The training split (or None) and the evaluation sets (name -> split) of a recipe or hub data set."""
    wanted = ([train_split] if train_split else []) + list(raw_eval.values())
    missing = [s for s in wanted if s not in source]
    if missing:
        raise ValueError(f"{what} has no split(s) {missing}; its splits are {sorted(source)}")
    train = source[train_split] if train_split else None
    return train, {name: source[split] for name, split in raw_eval.items()}


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


def _column(ds: Dataset, name: str) -> list[Any]:
    """A column as a list (``datasets`` 5 returns a lazy ``Column`` for ``ds[name]``, slow to iterate)."""
    return list(ds[name][:])


def carve_heldout(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Indices of a label-balanced held-out set of ``size`` rows (seeded), sorted.

    Example:
        >>> carve_heldout(np.array([0, 0, 0, 1, 1, 1]), size=2, seed=0).size
        2
    """
    classes = np.unique(labels)
    rng = np.random.default_rng([seed, 1])
    per = [size // len(classes) + (i < size % len(classes)) for i in range(len(classes))]
    chosen = []
    for c, k in zip(classes, per):
        idx = np.flatnonzero(labels == c)
        if len(idx) <= k:
            raise ValueError(
                f"heldout_size={size} needs {k} training rows of label {c} (and some left to "
                f"train on), but the training split has {len(idx)}; lower heldout_size"
            )
        chosen.append(rng.permutation(idx)[:k])
    return np.sort(np.concatenate(chosen))
