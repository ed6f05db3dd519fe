"""Planting a shortcut: a spurious token correlated with the label, with exact counts.

:func:`plant_shortcut` plants a rare word at a chosen rate per class (``id``), at the reversed rate (``ood``)
or not at all (``clean``), so a shortcut's harm and its removal are measurable; :func:`insert_token` is the
insertion itself. :func:`eval_plan` names the planted variants of a data module's evaluation sets.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Literal, get_args

import numpy as np
from datasets import Dataset

from icp_lightning.data.checks import _check_names
from icp_lightning.data.sources import _column

__all__ = ["ShortcutMode", "ShortcutPosition", "eval_plan", "insert_token", "plant_shortcut"]

ShortcutMode = Literal["id", "ood", "clean"]
ShortcutPosition = Literal["start", "end", "random"]

_MODES: tuple[str, ...] = get_args(ShortcutMode)
_POSITIONS: tuple[str, ...] = get_args(ShortcutPosition)


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


def _check_plant_args(
    dataset: Dataset, token: str, rate: float, mode: str, position: str, text_column: str, label_column: str
) -> np.ndarray:
    """Check :func:`plant_shortcut`'s arguments; the labels as ``int64``."""
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
    return labels.astype(np.int64)


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
    labels = _check_plant_args(dataset, token, rate, mode, position, text_column, label_column)
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


def _check_shortcut_args(
    shortcut_token: str | None,
    shortcut_rate: float,
    shortcut_position: str,
    shortcut_modes: Sequence[str] | Mapping[str, str] | None,
    group_column: str | None,
    cf_text_column: str | None,
) -> list[str] | dict[str, str]:
    """Check the data module's shortcut arguments; the modes (default ``["id", "ood", "clean"]``), copied."""
    if not 0.0 <= shortcut_rate <= 1.0:
        raise ValueError(f"shortcut_rate must be in [0, 1], got {shortcut_rate}")
    if shortcut_position not in _POSITIONS:
        raise ValueError(f"shortcut_position must be one of {list(_POSITIONS)}, got {shortcut_position!r}")
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
    return dict(modes) if isinstance(modes, Mapping) else list(modes)


def eval_plan(
    raw: Sequence[str],
    shortcut_token: str | None,
    shortcut_modes: Sequence[str] | Mapping[str, str],
    heldout_size: int,
) -> list[tuple[str, str, str | None]]:
    """The evaluation sets: ``(name, raw set name, shortcut mode or None)`` in dataloader order.

    Without a shortcut, each raw set as it is. With one, each raw set in each mode of ``shortcut_modes``
    (named by the mode alone when there is one raw set, else ``<set>_<mode>``), or, when ``shortcut_modes``
    maps raw set names to modes, each set in its own mode under its own name. With ``heldout_size``, a set
    ``heldout`` (planted ``id`` with a shortcut) comes last.

    Example:
        >>> eval_plan(["test"], "zeugma", ["id", "ood"], heldout_size=0)
        [('id', 'test', 'id'), ('ood', 'test', 'ood')]
        >>> eval_plan(["a", "b"], None, ["id"], heldout_size=8)
        [('a', 'a', None), ('b', 'b', None), ('heldout', 'heldout', None)]
    """
    raw = list(raw)
    plan: list[tuple[str, str, str | None]] = []
    if shortcut_token is None:
        plan = [(name, name, None) for name in raw]
    elif isinstance(shortcut_modes, Mapping):
        missing = [name for name in raw if name not in shortcut_modes]
        extra = [name for name in shortcut_modes if name not in raw]
        if missing or extra:
            raise ValueError(
                f"shortcut_modes as a dict needs one mode per evaluation set {raw}; missing {missing}, "
                f"unknown {extra}"
            )
        plan = [(name, name, shortcut_modes[name]) for name in raw]
    elif len(raw) == 1:
        plan = [(mode, raw[0], mode) for mode in shortcut_modes]
    else:
        plan = [(f"{name}_{mode}", name, mode) for name in raw for mode in shortcut_modes]
    if heldout_size:
        if "heldout" in raw:
            raise ValueError(
                "an evaluation set is named 'heldout', the name of the set heldout_size carves from the "
                "training data: rename that evaluation set, or set heldout_size=0 to use it as the held-out set"
            )
        plan.append(("heldout", "heldout", "id" if shortcut_token is not None else None))
    _check_names([p[0] for p in plan], "evaluation set")
    return plan
