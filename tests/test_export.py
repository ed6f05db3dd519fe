"""Every way out of the process keeps the pruning (issue: "A pruned model stays pruned on every path out").

For hard masks and soft reweighting installed by the callbacks or by ``apply_masks``: ``save_pretrained`` ->
plain ``from_pretrained``; PEFT ``merge_and_unload``; a Lightning checkpoint -> ``load_from_checkpoint`` of the
user's own class and ``Trainer.validate(ckpt_path=...)`` without the ICP callbacks; ``torch.save(state_dict)``
-> ``load_state_dict`` into a fresh model (+ ``restore_masks``). Each must give the pruned model's outputs.
"""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import peft
import pytest
import torch
import transformers
from lightning.pytorch.callbacks import ModelCheckpoint

from icp_lightning import CausalAttributionCallback, CausalPruningCallback
from icp_lightning.core import masks as M
from icp_lightning.core.adapters import load_adapter, save_adapter
from icp_lightning.core.masks import apply_masks, get_masks
from icp_lightning.core.sites import find_sites
from tests.callbacks._helpers import TinyClassifier, one_thread, tiny_bert, trainer  # noqa: F401
from tests.conftest import tiny_batch

ATTR = dict(
    metrics=("label_logprob",),
    dataset_weights={"id": 1.0, "ood": -1.0},
    granularity="head",
    method="gradient",
    max_batches=2,
    progress=False,
)


def _values(sites, mode: str) -> dict[str, torch.Tensor]:
    """Feature 1 of every site pruned (hard) or reweighted by 0.3 (soft), feature 0 by 0.6 when soft."""
    out = {}
    for name, site in sites.items():
        v = torch.ones(site.n_features)
        v[1] = 0.0 if mode == "hard" else 0.3
        if mode == "soft":
            v[0] = 0.6
        out[name] = v
    return out


def _logits(model, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@pytest.fixture
def batch():
    return tiny_batch("bert", n=6, seed=3)


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_save_pretrained_then_plain_from_pretrained_keeps_the_pruning(tmp_path, batch, mode):
    model = tiny_bert()
    unpruned = _logits(model, batch)
    sites = find_sites(model, granularity="head")
    apply_masks(model, sites, _values(sites, mode))
    pruned = _logits(model, batch)
    assert not torch.allclose(pruned, unpruned, atol=1e-4)
    model.save_pretrained(tmp_path)
    # No icp_lightning at load time: the standard loader, strict about nothing we add.
    loaded, info = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path, output_loading_info=True
    )
    assert not info["unexpected_keys"] and not info["missing_keys"]
    torch.testing.assert_close(_logits(loaded, batch), pruned, atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_peft_merge_and_unload_keeps_the_pruning(batch, mode):
    model = peft.get_peft_model(
        tiny_bert(),
        peft.LoraConfig(r=2, target_modules=["attention.output.dense", "query"], init_lora_weights=False),
    )
    sites = find_sites(model, granularity="head")
    apply_masks(model, sites, _values(sites, mode))
    pruned = _logits(model, batch)
    merged = model.merge_and_unload()
    # W + B @ A is one more rounding: equal in float32 terms (the pruning itself moves logits by > 1e-3)
    torch.testing.assert_close(_logits(merged, batch), pruned, atol=1e-6, rtol=1e-5)


def test_masks_applied_before_get_peft_model_still_survive_the_merge(batch):
    """A mask on a plain Linear that PEFT later wraps: the adapter must not read (or revive) the pruned column."""
    base = tiny_bert()
    sites = find_sites(base, granularity="head")
    apply_masks(base, sites, _values(sites, "hard"))
    model = peft.get_peft_model(
        base, peft.LoraConfig(r=2, target_modules=["attention.output.dense"], init_lora_weights=False)
    )
    M.enforce_masks(model)  # moves the guard to the adapter wrapper and zeroes lora_A's pruned columns
    pruned = _logits(model, batch)
    merged = model.merge_and_unload()
    torch.testing.assert_close(_logits(merged, batch), pruned, atol=1e-6, rtol=1e-5)
    for name in sites.names:
        w = dict(merged.named_modules())[name].weight
        assert w.view(w.shape[0], 4, -1)[:, 1].abs().max() == 0


@pytest.mark.parametrize("when", ["after", "before"])
def test_adapter_only_export_keeps_the_pruning(tmp_path, batch, when):
    """PEFT's adapter-only save_pretrained drops the pruned base weights; save_adapter / load_adapter keep them.
    Heads (hard and soft) and FFN neurons, masks applied after or before get_peft_model."""
    cfg = peft.LoraConfig(
        r=2, target_modules=["attention.output.dense", "output.dense"], init_lora_weights=False
    )
    model = tiny_bert()
    if when == "before":
        heads = find_sites(model, granularity="head")
        apply_masks(model, heads, _values(heads, "soft"))
        neurons = find_sites(model, target_modules=r".*layer\.\d+\.output\.dense")
        apply_masks(model, neurons, _values(neurons, "hard"))
        model = peft.get_peft_model(model, cfg)
    else:
        model = peft.get_peft_model(model, cfg)
        heads = find_sites(model, granularity="head")
        apply_masks(model, heads, _values(heads, "soft"))
        neurons = find_sites(model, target_modules=r".*layer\.\d+\.output\.dense")
        apply_masks(model, neurons, _values(neurons, "hard"))
    # "before": the masks still sit on the LoRA base layers (no forward yet)
    save_adapter(model, tmp_path / "icp")
    pruned = _logits(model, batch)
    loaded = load_adapter(tiny_bert(), tmp_path / "icp")
    torch.testing.assert_close(_logits(loaded, batch), pruned, atol=1e-6, rtol=1e-5)
    # what the plain PEFT path gives: the adapter on an unpruned base, silently another model
    model.save_pretrained(tmp_path / "plain")
    plain = peft.PeftModel.from_pretrained(tiny_bert(), tmp_path / "plain")
    assert not torch.allclose(_logits(plain, batch), pruned, atol=1e-3)
    with pytest.raises(FileNotFoundError, match="not written by save_adapter"):
        load_adapter(tiny_bert(), tmp_path / "plain")


def test_save_adapter_refuses_a_pruned_model_without_guards(tmp_path, batch):
    model = peft.get_peft_model(tiny_bert(), peft.LoraConfig(r=2, target_modules=["attention.output.dense"]))
    heads = find_sites(model, granularity="head")
    apply_masks(model, heads, _values(heads, "hard"))
    pruned = _logits(model, batch)
    M.make_permanent(model)
    with pytest.raises(ValueError, match="all-zero input columns but no masks are installed"):
        save_adapter(model, tmp_path / "a")
    M.restore_masks(model, find_sites(model, granularity="head"))
    save_adapter(model, tmp_path / "a")
    torch.testing.assert_close(
        _logits(load_adapter(tiny_bert(), tmp_path / "a"), batch), pruned, atol=1e-6, rtol=1e-5
    )
    with pytest.raises(TypeError, match="needs a peft.PeftModel"):
        save_adapter(tiny_bert(), tmp_path / "b")


def test_state_dict_round_trip_and_restore_masks(batch):
    model = tiny_bert()
    sites = find_sites(model, granularity="head")
    apply_masks(model, sites, _values(sites, "hard"))
    pruned = _logits(model, batch)
    fresh = tiny_bert(seed=5)
    fresh.load_state_dict(model.state_dict())  # strict: no extra keys
    torch.testing.assert_close(_logits(fresh, batch), pruned, atol=1e-6, rtol=0)
    restored = M.restore_masks(fresh, find_sites(fresh, granularity="head"))  # the one documented call
    assert {n: m.tolist() for n, m in restored.items()} == {
        n: m.tolist() for n, m in get_masks(model).items()
    }
    assert {n: m.tolist() for n, m in get_masks(fresh).items()} == {
        n: m.tolist() for n, m in restored.items()
    }


def test_pruned_columns_stay_exactly_zero_under_adamw_with_momentum(batch):
    """Masks installed mid-training (AdamW moments already non-zero): the weights stay zero step after step."""
    model = tiny_bert()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    for _ in range(2):  # build momentum on every column
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    sites = find_sites(model, granularity="head")
    M.apply_masks(model, sites, _values(sites, "hard"), optimizers=[optimizer])
    for _ in range(3):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, site in sites.items():
        w = site.module.weight
        assert w.view(w.shape[0], 4, -1)[:, 1].abs().max() == 0, name


class UserModule(pl.LightningModule):
    """A user's own LightningModule, knowing nothing about ICP."""

    def __init__(self) -> None:
        super().__init__()
        self.model = tiny_bert()

    def forward(self, **batch):
        return self.model(**batch).logits

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        self.log("val_loss", self.model(**batch).loss)


class Pruned(TinyClassifier):
    def __init__(self) -> None:
        super().__init__()
        self.save_hyperparameters()


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_lightning_checkpoint_loads_the_standard_way_without_icp(tmp_path, batch, mode):
    pl.seed_everything(0)
    module = Pruned()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    callbacks = [
        CausalAttributionCallback(**ATTR),
        CausalPruningCallback(amount=2, mode=mode, verbose=False),
        checkpoint,
    ]
    trainer(tmp_path, callbacks, max_epochs=2, limit_train_batches=2, enable_checkpointing=True).fit(module)
    pruned = _logits(module.model, batch)
    last = str(tmp_path / "ckpt" / "last.ckpt")

    state = torch.load(last, weights_only=False)
    assert not [k for k in state["state_dict"] if "icp_mask" in k]
    # The user's class, the strict standard loader, no ICP callbacks.
    loaded = Pruned.load_from_checkpoint(last)
    torch.testing.assert_close(_logits(loaded.model, batch), pruned, atol=1e-6, rtol=0)
    user = UserModule.load_from_checkpoint(last)
    torch.testing.assert_close(_logits(user.model, batch), pruned, atol=1e-6, rtol=0)
    # Trainer.validate / predict with the checkpoint, no ICP callbacks.
    fresh = Pruned()
    trainer(tmp_path, []).validate(fresh, ckpt_path=last, verbose=False)
    torch.testing.assert_close(_logits(fresh.model, batch), pruned, atol=1e-6, rtol=0)


def test_resumed_training_keeps_pruned_columns_zero(tmp_path):
    pl.seed_everything(0)
    module = TinyClassifier()
    pruning = CausalPruningCallback(amount=2, verbose=False)
    trainer(tmp_path, [CausalAttributionCallback(**ATTR), pruning], max_epochs=3, limit_train_batches=2).fit(
        module
    )
    model = copy.deepcopy(module.model)
    for name, mask in pruning.masks.items():
        w = dict(model.named_modules())[name].weight
        assert w.view(w.shape[0], mask.numel(), -1)[:, mask == 0].abs().max() == 0, name


def test_resuming_a_checkpoint_of_an_earlier_version_folds_its_masks(tmp_path, batch):
    """Checkpoints of icp_lightning < 0.2 held unfolded weights plus `icp_mask` keys: resuming folds them."""
    pl.seed_everything(0)
    module = TinyClassifier()
    pruning = CausalPruningCallback(amount=2, verbose=False)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    tr = trainer(tmp_path, [CausalAttributionCallback(**ATTR), pruning, checkpoint], max_epochs=1,
                 limit_train_batches=2, enable_checkpointing=True)  # fmt: skip
    tr.fit(module)
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    # Turn it into an old-format checkpoint: pruned columns hold (random) unfolded values, masks as keys.
    gen = torch.Generator().manual_seed(0)
    for name, mask in pruning.masks.items():
        w = state["state_dict"][f"model.{name}.weight"]
        cols = mask.repeat_interleave(w.shape[1] // mask.numel()) == 0
        w[:, cols] = torch.randn(w.shape[0], int(cols.sum()), generator=gen)
        state["state_dict"][f"model.{name}.icp_mask"] = mask
    legacy = tmp_path / "legacy.ckpt"
    torch.save(state, legacy)

    resumed = TinyClassifier()
    pruning_b = CausalPruningCallback(amount=2, verbose=False)
    trainer(tmp_path / "b", [CausalAttributionCallback(**ATTR), pruning_b], max_epochs=1,
            limit_train_batches=2).fit(resumed, ckpt_path=str(legacy))  # fmt: skip
    torch.testing.assert_close(_logits(resumed.model, batch), _logits(module.model, batch), atol=1e-6, rtol=0)
    assert {n: m.tolist() for n, m in pruning_b.masks.items()} == {
        n: m.tolist() for n, m in pruning.masks.items()
    }


def test_restore_masks_refuses_or_rezeroes_drifted_pruned_columns(batch):
    """A checkpoint written before pruned columns were re-zeroed (mid-epoch under FSDP1): refuse by default,
    re-zero with rezero=True (what the pruning callback does on resume)."""
    model = tiny_bert()
    sites = find_sites(model, granularity="head")
    values = _values(sites, "hard")
    apply_masks(model, sites, values)
    pruned = _logits(model, batch)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    name = sites.names[0]
    state[f"{name}.weight"][:, 8:16] = 0.5  # drift on head 1's columns
    fresh = tiny_bert(seed=5)
    fresh.load_state_dict(state)
    fresh_sites = find_sites(fresh, granularity="head")
    with pytest.raises(
        ValueError, match=r"features \[1\] .* are pruned in the masks but their weights are not zero"
    ):
        M.restore_masks(fresh, fresh_sites, values)
    M.restore_masks(fresh, fresh_sites, values, rezero=True)
    torch.testing.assert_close(_logits(fresh, batch), pruned, atol=1e-6, rtol=0)
    assert fresh_sites[name].module.weight[:, 8:16].abs().max() == 0
