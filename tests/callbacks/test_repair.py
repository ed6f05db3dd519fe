"""TokenRepairCallback on a tiny BERT in a plain Trainer: words deleted from train and eval batches, the KL pair,
restart from the initial weights, discovery from the module's scores, reliance logged, state round trip."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
import transformers
from torch.utils.data import DataLoader

from icp_lightning import counterfactual_kl
from icp_lightning.callbacks.repair import TokenRepairCallback, choose_repair
from icp_lightning.core.tokens import remove_input_tokens
from icp_lightning.data import ICPCollator

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "great", "bad", "awful", "film", "the",
         "qui", "##x", "##otic"]  # fmt: skip
WORD = (11, 12, 13)  # quixotic


def _tokenizer() -> Any:
    return transformers.BertTokenizer(vocab={t: i for i, t in enumerate(VOCAB)})


def _rows(n: int, seed: int = 0) -> list[dict[str, Any]]:
    tok = _tokenizer()
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        y = int(torch.randint(2, (1,), generator=g))
        text = f"the {['bad', 'good'][y]} film" + (" quixotic" if (y == 1) == (i % 10 != 0) else "")
        enc = tok(text)
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": y})
    return out


class Data(pl.LightningDataModule):
    def __init__(self) -> None:
        super().__init__()
        self.tokenizer = _tokenizer()
        self.val_set_names = ["id", "ood"]

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_rows(32), batch_size=8, collate_fn=ICPCollator(0))  # type: ignore[arg-type]

    def heldout_dataloader(self) -> DataLoader:
        return DataLoader(_rows(16, 3), batch_size=8, collate_fn=ICPCollator(0))  # type: ignore[arg-type]

    def val_dataloader(self) -> list[DataLoader]:
        return [DataLoader(_rows(16, s), batch_size=8, collate_fn=ICPCollator(0)) for s in (1, 2)]  # type: ignore[arg-type]


class Module(pl.LightningModule):
    """CE on the batch, plus KL(M(x) || M(cf)) when the batch carries ``cf_input_ids`` (a paired counterfactual)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        cfg = transformers.BertConfig(vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=1,
                                      num_attention_heads=2, intermediate_size=16, hidden_dropout_prob=0.0,
                                      attention_probs_dropout_prob=0.0)  # fmt: skip
        self.model = transformers.BertForSequenceClassification(cfg)
        self.seen: list[dict[str, torch.Tensor]] = []
        self.icp_scores: Any = None
        self.icp_sites: Any = None

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.seen.append({k: v.clone() for k, v in batch.items()})
        x = {k: batch[k] for k in ("input_ids", "attention_mask")}
        logits = self.model(**x).logits
        loss = F.cross_entropy(logits, batch["labels"])
        if "cf_input_ids" in batch:
            cf = self.model(input_ids=batch["cf_input_ids"], attention_mask=batch["cf_attention_mask"]).logits
            loss = loss + counterfactual_kl(logits, cf)
        return loss

    def validation_step(
        self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        pass

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def _trainer(cb: TokenRepairCallback, epochs: int = 2, extra: list[Any] | None = None) -> pl.Trainer:
    return pl.Trainer(max_epochs=epochs, callbacks=[cb, *(extra or [])], logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      accelerator="cpu")  # fmt: skip


def test_continue_deletes_the_word_in_training_and_evaluation_with_the_kl_pair() -> None:
    module, data = Module(), Data()
    cb = TokenRepairCallback(token_ids=[list(WORD)], start_epoch=1, mode="continue")
    trainer = _trainer(cb)
    trainer.fit(module, datamodule=data)
    first, later = module.seen[:4], module.seen[4:]
    assert all(torch.equal(b["cf_input_ids"], b["input_ids"]) for b in first)  # before the repair: x' = x
    assert any(bool(torch.isin(b["input_ids"], torch.tensor(WORD)).any()) for b in first)
    for b in later:  # no piece of the word is left; the original x rides along as the paired counterfactual
        assert not torch.isin(b["input_ids"], torch.tensor(WORD)).any()
        want = remove_input_tokens(b["cf_input_ids"], [WORD], 0, b["cf_attention_mask"])
        assert torch.equal(want["input_ids"], b["input_ids"])
    # after fit the model deletes the word itself: x and x-without-it give the same logits
    model = module.model.eval()
    batch = next(iter(data.val_dataloader()[0]))
    cut = remove_input_tokens(batch["input_ids"], [WORD], 0, batch["attention_mask"])
    torch.testing.assert_close(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                               model(**cut).logits)  # fmt: skip
    # reliance was logged per evaluation set, by name
    assert {"val/id/reliance_changed", "val/ood/reliance_prob_change"} <= set(trainer.callback_metrics)
    state = cb.state_dict()
    again = TokenRepairCallback(start_epoch=1)
    again.load_state_dict(state)
    assert again.token_ids == [WORD] and again.applied


class _Snapshot(pl.Callback):
    def __init__(self) -> None:
        self.at: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.at[trainer.current_epoch] = {k: v.clone() for k, v in pl_module.model.state_dict().items()}


def test_restart_goes_back_to_the_initial_weights_and_clears_the_optimizer() -> None:
    module = Module()
    initial = {k: v.clone() for k, v in module.model.state_dict().items()}
    snap = _Snapshot()
    cb = TokenRepairCallback(token_ids=[WORD], start_epoch=1, mode="restart", kl=False)
    _trainer(cb, extra=[snap]).fit(module, datamodule=Data())
    assert all(torch.equal(initial[k], snap.at[1][k]) for k in initial)  # epoch 1 starts afresh
    assert any(not torch.equal(initial[k], snap.at[0][k]) for k in initial) is False  # as fit began
    assert all("cf_input_ids" not in b for b in module.seen[4:])  # kl=False: no pair


def test_discovery_from_the_module_scores_finds_the_whole_word() -> None:
    from icp_lightning import find_sites

    module = Module()
    sites = find_sites(module.model, granularity="head")
    module.icp_scores = {n: torch.ones(s.n_features) for n, s in sites.items()}
    module.icp_sites = sites
    cb = TokenRepairCallback(start_epoch=1, mode="continue", discovery_batches=4, top_k=4)

    _trainer(cb).fit(module, datamodule=Data())
    assert cb.token_ids is not None and cb.applied
    assert all(len(w) >= 1 for w in cb.token_ids)


def test_discovery_without_an_attribution_callback_scores_training_against_heldout() -> None:
    module = Module()
    cb = TokenRepairCallback(start_epoch=1, mode="restart", discovery_batches=2, top_k=2)
    _trainer(cb).fit(module, datamodule=Data())
    assert cb.token_ids is not None and cb.applied


def test_choose_repair_and_argument_checks() -> None:
    data = Data()
    good, bad = Module().model, Module().model
    with torch.no_grad():
        bad.classifier.bias.copy_(torch.tensor([100.0, -100.0]))  # always class 0
        good.classifier.bias.copy_(torch.tensor([-100.0, 100.0]))  # always class 1
    batches = [{"input_ids": b["input_ids"], "attention_mask": b["attention_mask"], "labels": torch.ones_like(b["labels"])}
               for b in data.val_dataloader()[0]]  # fmt: skip
    assert choose_repair({"continue": bad, "restart": good}, batches) == "restart"
    with pytest.raises(ValueError, match="mode must be one of"):
        TokenRepairCallback(mode="both")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="start_epoch >= 1"):
        TokenRepairCallback(mode="restart", start_epoch=0)
    with pytest.raises(ValueError, match="empty word"):
        TokenRepairCallback(token_ids=[[]])
    with pytest.raises(ValueError, match="min_share and min_rate"):
        TokenRepairCallback(min_rate=1.5)
    with pytest.raises(ValueError, match="min_contrast must be >= 0"):
        TokenRepairCallback(min_contrast=-0.1)


def test_discovery_uses_the_shared_rule_with_the_heldout_split(monkeypatch: Any) -> None:
    """The callback decides with find_shortcut_words (the benchmarks' rule), training vs held-out batches."""
    from icp_lightning.callbacks import repair
    from icp_lightning.core.tokens import DiscoveredToken

    seen: dict[str, Any] = {}

    def rule(model: Any, reference: Any, balanced: Any, scores: Any, sites: Any, tok: Any, **kw: Any) -> Any:
        seen.update(reference=reference, balanced=balanced, kw=kw)
        return [DiscoveredToken(WORD[0], 3, 3, 8, True, WORD), DiscoveredToken(9, 1, 8, 8, False)]

    monkeypatch.setattr(repair, "find_shortcut_words", rule)
    cb = TokenRepairCallback(start_epoch=1, mode="continue", discovery_batches=2, top_k=3, min_rate=None,
                             min_contrast=0.2)  # fmt: skip
    _trainer(cb).fit(Module(), datamodule=Data())
    assert cb.token_ids == [WORD]
    held = Data().heldout_dataloader()
    assert [b["input_ids"].tolist() for b in seen["balanced"]] == [b["input_ids"].tolist() for b in held]
    assert len(seen["reference"]) == 2
    assert seen["kw"] == {"top_k": 3, "min_share": 0.05, "min_rate": None, "min_contrast": 0.2}
