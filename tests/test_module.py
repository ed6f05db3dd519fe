"""ICPContrastiveModule: the loss by hand, plain fine-tuning at kl_weight=0, short fits with every counterfactual
strategy, per-set metrics, checkpoints, LoRA, and a causal LM with answer-only loss."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import peft
import pytest
import torch
import torch.nn.functional as F
import transformers
from torch.utils.data import DataLoader

from icp_lightning.core.sites import find_sites
from icp_lightning.module import ICPContrastiveModule

pytestmark = pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")

SITE = "bert.encoder.layer.0.output.dense"
FEATS = [1, 3, 6]
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "he", "she", "his", "her", "man", "woman"]
WORDS += [f"w{i}" for i in range(30 - len(WORDS))]


def bert_config() -> transformers.BertConfig:
    return transformers.BertConfig(
        vocab_size=30,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=8,
        max_position_embeddings=16,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        initializer_range=0.3,  # visible differences between x and x' in a 16-wide model
    )


def tiny_bert(seed: int = 0) -> transformers.BertForSequenceClassification:
    torch.manual_seed(seed)
    return transformers.BertForSequenceClassification(bert_config())


def scores() -> dict[str, torch.Tensor]:
    s = torch.zeros(8)
    s[FEATS] = 1.0
    return {SITE: s}


def make_batch(
    seed: int, n: int = 4, t: int = 6, groups: bool = False, paired: bool = False
) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 30, (n, t), generator=gen)
    ids[:, 0], ids[:, -1] = 2, 3
    mask = torch.ones(n, t, dtype=torch.long)
    ids[0, -2:], mask[0, -2:] = 0, 0  # one padded row
    batch: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "labels": torch.arange(n) % 2}
    if groups:
        batch["group"] = torch.arange(n) // 2 % 2
    if paired:
        cf = ids.clone()
        cf[:, 1] = torch.where(cf[:, 1] == 5, 6, 5)  # "he" <-> "she" at position 1
        batch["cf_input_ids"], batch["cf_attention_mask"] = cf, mask.clone()
    return batch


def loader(batches: list[dict[str, Any]]) -> DataLoader:
    return DataLoader(batches, batch_size=None)  # type: ignore[arg-type]


def trainer(tmp_path: Path | None = None, max_steps: int = 3, **kwargs: Any) -> pl.Trainer:
    return pl.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
        **kwargs,
    )


def hooked_logits(model: torch.nn.Module, batch: dict[str, Any], feats: list[int], site: str) -> torch.Tensor:
    """The forward with a hand-written pre-hook zeroing columns ``feats`` of ``site``'s input."""

    def hook(m: torch.nn.Module, args: tuple) -> tuple:
        h = args[0].clone()
        h[..., feats] = 0.0
        return (h,)

    handle = dict(model.named_modules())[site].register_forward_pre_hook(hook)
    try:
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    finally:
        handle.remove()


def kl_by_hand(logits: torch.Tensor, cf: torch.Tensor, direction: str) -> torch.Tensor:
    """Mean over rows of KL / JS, written as explicit sums p * log(p / q)."""
    p, q = logits.double().softmax(-1), cf.double().softmax(-1)

    def kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a * (a / b).log()).sum(-1)

    if direction == "forward":
        per_row = kl(p, q)
    elif direction == "reverse":
        per_row = kl(q, p)
    else:
        m = (p + q) / 2
        per_row = 0.5 * kl(p, m) + 0.5 * kl(q, m)
    return per_row.mean().float()


# ------------------------------------------------------------------------------------------------------------
# The loss


@pytest.mark.parametrize("direction", ["forward", "reverse", "symmetric"])
def test_loss_is_task_loss_plus_lambda_kl_by_hand(direction: str) -> None:
    module = ICPContrastiveModule(
        tiny_bert(),
        counterfactual="intervention",
        counterfactual_kwargs={"kind": "mask"},
        kl_weight=0.7,
        kl_direction=direction,  # type: ignore[arg-type]
        tau_c=0.5,
    )
    module.set_scores(scores())
    batch = make_batch(0)
    out = module.compute_loss(batch)

    model = module.model
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    cf = hooked_logits(model, batch, FEATS, SITE)
    ce = -logits.log_softmax(-1)[torch.arange(4), batch["labels"]].mean()
    kl = kl_by_hand(logits, cf, direction)
    assert float(out["kl"].detach()) > 1e-3
    torch.testing.assert_close(out["task_loss"], ce)
    torch.testing.assert_close(out["kl"], kl)
    torch.testing.assert_close(out["loss"], ce + 0.7 * kl)
    assert out["kl_weight"] == 0.7 and not out["kl_skipped"]


def test_gradients_flow_through_both_branches_unless_detach_cf() -> None:
    """The KL alone: its gradient on the site's *input side* (layer 0 intermediate) comes through both passes."""
    batch = make_batch(1)
    grads = {}
    for detach in (False, True):
        module = ICPContrastiveModule(
            tiny_bert(),
            counterfactual_kwargs={"kind": "mask"},
            tau_c=0.5,
            detach_cf=detach,
        )
        module.set_scores(scores())
        module.compute_loss(batch)["kl"].backward()
        grads[detach] = module.model.classifier.weight.grad.clone()  # type: ignore[union-attr]

        # By hand: d KL / d W_classifier through the clean branch only (cf logits as constants).
        module.zero_grad()
        model = module.model
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        cf = hooked_logits(model, batch, FEATS, SITE).detach()
        kl_by_hand(logits, cf, "forward").backward()
        clean_only = model.classifier.weight.grad.clone()  # type: ignore[union-attr]
        if detach:
            torch.testing.assert_close(grads[detach], clean_only)
        else:
            assert not torch.allclose(grads[detach], clean_only)  # the counterfactual branch contributes
    assert grads[False].abs().sum() > 0


def test_kl_weight_zero_is_exactly_plain_fine_tuning() -> None:
    class Forbidden:
        def build(self, *args: Any) -> None:
            raise AssertionError("kl_weight=0 must not build a counterfactual")

    module = ICPContrastiveModule(tiny_bert(), counterfactual=Forbidden(), kl_weight=0.0)
    module.set_scores(scores())
    plain = copy.deepcopy(module.model)
    batch = make_batch(2)
    out = module.compute_loss(batch)
    out["loss"].backward()
    ce = F.cross_entropy(
        plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch["labels"]
    )
    ce.backward()
    assert torch.equal(out["loss"], ce)
    assert float(out["kl"].detach()) == 0.0 and not out["kl_skipped"]
    for (name, p), q in zip(module.model.named_parameters(), plain.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            assert torch.equal(p.grad, q.grad), name  # type: ignore[arg-type]


def test_without_scores_the_kl_term_is_skipped() -> None:
    module = ICPContrastiveModule(tiny_bert(), kl_weight=1.0)
    out = module.compute_loss(make_batch(3))
    assert out["kl_skipped"] and float(out["kl"]) == 0.0
    assert torch.equal(out["loss"], out["task_loss"])


def test_set_scores_finds_sites_by_name_and_checks_them() -> None:
    module = ICPContrastiveModule(tiny_bert())
    module.set_scores(scores())
    assert module.icp_sites is not None and module.icp_sites.names == [SITE]
    with pytest.raises(ValueError, match="matched no linear module"):
        module.set_scores({"bert.nope.dense": torch.zeros(8)})  # find_sites lists what exists
    with pytest.raises(ValueError, match="has 3 scores but 8 features|have 3 entries but the site has 8"):
        module.set_scores({SITE: torch.zeros(3)})
    module.set_scores(None)
    assert module.icp_scores is None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"task": "regression"}, "task must be one of"),
        ({"kl_direction": "both"}, "kl_direction must be"),
        ({"kl_weight": -1.0}, "kl_weight must be a number >= 0"),
        ({"kl_schedule": "cosine"}, "kl_schedule must be"),
        ({"eval_sets": ["a", "a"]}, "unique"),
        ({"eval_sets": "val"}, "non-empty list"),
        ({"counterfactual": "nope"}, "unknown counterfactual"),
        ({"peft": 3}, "peft must be"),
    ],
)
def test_bad_arguments_are_refused_with_the_allowed_values(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        ICPContrastiveModule(tiny_bert(), **kwargs)


# ------------------------------------------------------------------------------------------------------------
# Short fits with each strategy


def tokenizer() -> transformers.PreTrainedTokenizerBase:
    return transformers.BertTokenizer(vocab={w: i for i, w in enumerate(WORDS)})


STRATEGIES: dict[str, dict[str, Any]] = {
    "intervention": {"kind": "swap"},
    "inversion": {"steps": 2, "project_to_tokens": False, "special_token_ids": [0, 1, 2, 3, 4]},
    "token_edit": {"max_edits": 1, "candidates": 2, "special_token_ids": [0, 1, 2, 3, 4]},
    "paired": {},
    "token_swap": {"mode": "ids"},
}


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_fit_with_each_counterfactual_strategy(name: str) -> None:
    kwargs = dict(STRATEGIES[name])
    if name == "token_swap":
        kwargs["tokenizer"] = tokenizer()
    module = ICPContrastiveModule(
        tiny_bert(),
        counterfactual=name,  # type: ignore[arg-type]
        counterfactual_kwargs=kwargs,
        kl_weight=1.0,
        kl_schedule="linear_warmup",
        kl_warmup_steps=4,
        top_k_c=3,
        lr=1e-2,
    )
    module.set_scores(scores())
    before = copy.deepcopy(module.model.state_dict())
    batches = [make_batch(10 + i, paired=True) for i in range(3)]
    t = trainer()
    t.fit(module, loader(batches))
    assert t.global_step == 3
    metrics = t.callback_metrics
    assert float(metrics["train/kl_skipped"]) == 0.0
    assert float(metrics["train/kl"]) > 0.0
    assert math.isfinite(float(metrics["train/loss"]))
    assert module.current_kl_weight() == 1.0  # warm-up over after 3 steps (0.25, 0.5, 0.75, then 1)
    assert float(metrics["train/kl_weight_epoch"]) == pytest.approx((0.25 + 0.5 + 0.75) / 3)
    changed = [k for k, v in module.model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed


# ------------------------------------------------------------------------------------------------------------
# Evaluation sets, predictions, checkpoints


def test_validation_metrics_per_named_set_match_a_manual_computation() -> None:
    module = ICPContrastiveModule(tiny_bert(), eval_sets=["id", "ood"], num_groups=2, kl_weight=0.0)
    id_batches = [make_batch(20 + i, groups=True) for i in range(2)]
    ood_batches = [make_batch(30 + i, groups=True, paired=True) for i in range(2)]
    results = trainer().validate(module, [loader(id_batches), loader(ood_batches)], verbose=False)
    assert len(results) == 2
    logged = {k: v for r in results for k, v in r.items()}
    assert {"val/id/acc", "val/id/ece", "val/id/nll", "val/id/dp_diff", "val/id/worst_group_acc"} <= set(
        logged
    )
    assert "val/ood/flip_rate" in logged and "val/id/flip_rate" not in logged

    module.eval()
    with torch.no_grad():
        for name, batches in (("id", id_batches), ("ood", ood_batches)):
            logits = torch.cat([module.logits(b) for b in batches])
            labels = torch.cat([b["labels"] for b in batches])
            groups = torch.cat([b["group"] for b in batches])
            correct = (logits.argmax(-1) == labels).float()
            assert logged[f"val/{name}/acc"] == pytest.approx(float(correct.mean()), abs=1e-6)
            nll = F.cross_entropy(logits, labels)
            assert logged[f"val/{name}/nll"] == pytest.approx(float(nll), abs=1e-5)
            worst = min(float(correct[groups == g].mean()) for g in (0, 1))
            assert logged[f"val/{name}/worst_group_acc"] == pytest.approx(worst, abs=1e-6)
        cf_logits = torch.cat([module.logits({**b, "input_ids": b["cf_input_ids"]}) for b in ood_batches])
        ood_logits = torch.cat([module.logits(b) for b in ood_batches])
        flips = (cf_logits.argmax(-1) != ood_logits.argmax(-1)).float().mean()
        assert logged["val/ood/flip_rate"] == pytest.approx(float(flips), abs=1e-6)

    with pytest.raises(ValueError, match="one name per evaluation dataloader"):
        trainer().validate(module, [loader(id_batches)] * 3, verbose=False)


def predictions(module: ICPContrastiveModule, batches: list[dict[str, Any]]) -> torch.Tensor:
    out = trainer().predict(module, loader(batches))
    assert out is not None
    return torch.cat(out)  # type: ignore[arg-type]


def test_checkpoint_reload_gives_identical_predictions(tmp_path: Path) -> None:
    module = ICPContrastiveModule(tiny_bert(), counterfactual_kwargs={"kind": "mask"}, top_k_c=2, lr=1e-2)
    module.set_scores(scores())
    t = trainer(tmp_path)
    t.fit(module, loader([make_batch(40 + i) for i in range(3)]))
    path = tmp_path / "m.ckpt"
    t.save_checkpoint(path)

    batches = [make_batch(50), make_batch(51)]
    expected = predictions(module, batches)
    assert torch.allclose(expected.sum(-1), torch.ones(8))
    reloaded = ICPContrastiveModule.load_from_checkpoint(path, model=tiny_bert(seed=123))
    torch.testing.assert_close(predictions(reloaded, batches), expected, rtol=0, atol=0)
    assert reloaded.hparams["top_k_c"] == 2
    assert reloaded.icp_scores is not None and torch.equal(reloaded.icp_scores[SITE], scores()[SITE])
    assert reloaded.icp_sites is not None and reloaded.icp_sites.names == [SITE]


def test_checkpoint_of_a_model_given_by_path_reloads_from_hyperparameters_alone(tmp_path: Path) -> None:
    tiny_bert().save_pretrained(tmp_path / "hf")
    module = ICPContrastiveModule(str(tmp_path / "hf"), kl_weight=0.0, lr=1e-2)
    t = trainer(tmp_path, max_steps=2)
    t.fit(module, loader([make_batch(60), make_batch(61)]))
    t.save_checkpoint(tmp_path / "m.ckpt")
    reloaded = ICPContrastiveModule.load_from_checkpoint(tmp_path / "m.ckpt")
    batches = [make_batch(62)]
    torch.testing.assert_close(predictions(reloaded, batches), predictions(module, batches), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------------------
# LoRA


@pytest.mark.parametrize("as_dict", [False, True])
def test_lora_trains_adapters_reloads_and_exports_merged(tmp_path: Path, as_dict: bool) -> None:
    lora: Any = {"r": 2, "lora_alpha": 4, "target_modules": ["query", "value"]}
    if not as_dict:
        lora = peft.LoraConfig(**lora)
    module = ICPContrastiveModule(
        tiny_bert(), peft=lora, counterfactual_kwargs={"kind": "mask"}, top_k_c=3, lr=5e-2
    )
    assert module.is_peft and type(module.hf_model).__name__ == "BertForSequenceClassification"
    # The attribution callback works on self.model: its sites are the base model's modules.
    sites = find_sites(module.model, target_modules=r".*layer\.0\.output\.dense")
    module.set_scores({sites.names[0]: scores()[SITE]}, sites)
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    t = trainer(tmp_path)
    t.fit(module, loader([make_batch(70 + i) for i in range(3)]))
    assert float(t.callback_metrics["train/kl"]) > 0
    changed = {k for k, v in module.model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all("lora_" in k or "classifier" in k for k in changed), changed
    assert any("lora_B" in k for k in changed)

    t.save_checkpoint(tmp_path / "m.ckpt")
    batches = [make_batch(80)]
    expected = predictions(module, batches)
    reloaded = ICPContrastiveModule.load_from_checkpoint(tmp_path / "m.ckpt", model=tiny_bert(seed=5))
    assert reloaded.is_peft
    torch.testing.assert_close(predictions(reloaded, batches), expected, rtol=0, atol=0)

    out = module.merge_and_export(tmp_path / "merged")
    assert module.is_peft  # the module keeps its adapters
    merged = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    with torch.no_grad():
        probs = merged(input_ids=batches[0]["input_ids"], attention_mask=batches[0]["attention_mask"]).logits
    torch.testing.assert_close(probs.softmax(-1), expected, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------------------
# Causal LM: loss and KL on answer tokens only

LM_SITE = "model.layers.0.mlp.down_proj"


def tiny_llama(seed: int = 0) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=16,
        initializer_range=0.3,
    )
    return transformers.LlamaForCausalLM(cfg)


def lm_batch(seed: int) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 32, (3, 7), generator=gen)
    mask = torch.ones_like(ids)
    mask[2, -2:] = 0
    labels = ids.clone()
    labels[:, :4] = -100  # the prompt
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "group": torch.tensor([0, 1, 1])}


def test_causal_lm_loss_and_kl_cover_answer_tokens_only() -> None:
    module = ICPContrastiveModule(
        tiny_llama(), task="causal_lm", counterfactual_kwargs={"kind": "mask"}, kl_weight=0.5, tau_c=0.5
    )
    lm_scores = torch.zeros(16)
    lm_scores[[2, 9]] = 1.0
    module.set_scores({LM_SITE: lm_scores})
    batch = lm_batch(0)
    out = module.compute_loss(batch)

    model = module.model
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    cf = hooked_logits(model, batch, [2, 9], LM_SITE)
    ce_terms, kl_terms = [], []
    for b in range(3):
        for t in range(6):
            y = int(batch["labels"][b, t + 1])
            if y == -100:
                continue
            ce_terms.append(-logits[b, t].log_softmax(-1)[y])
            kl_terms.append(kl_by_hand(logits[b, t][None], cf[b, t][None], "forward"))
    assert len(ce_terms) == 7  # 3 + 3 + 1 answer tokens
    ce, kl = torch.stack(ce_terms).mean(), torch.stack(kl_terms).mean()
    torch.testing.assert_close(out["task_loss"], ce)
    torch.testing.assert_close(out["kl"], kl)
    torch.testing.assert_close(out["loss"], ce + 0.5 * kl)


def test_causal_lm_fit_and_token_metrics() -> None:
    module = ICPContrastiveModule(
        tiny_llama(),
        task="causal_lm",
        counterfactual_kwargs={"kind": "swap"},
        top_k_c=2,
        num_groups=2,
        lr=1e-2,
    )
    lm_scores = torch.zeros(16)
    lm_scores[[2, 9]] = 1.0
    module.set_scores({LM_SITE: lm_scores})
    t = trainer()
    val = [lm_batch(90)]
    t.fit(module, loader([lm_batch(91 + i) for i in range(3)]), loader(val))
    metrics = t.callback_metrics
    assert float(metrics["train/kl"]) > 0
    assert {"val/val/acc", "val/val/nll", "val/val/ppl", "val/val/worst_group_acc"} <= set(metrics)
    module.eval()
    with torch.no_grad():
        logits = module.logits(val[0])
    labels = val[0]["labels"]
    keep = labels[:, 1:] != -100
    correct = (logits[:, :-1].argmax(-1) == labels[:, 1:])[keep].float()
    assert float(metrics["val/val/acc"]) == pytest.approx(float(correct.mean()), abs=1e-6)
    assert float(metrics["val/val/ppl"]) == pytest.approx(math.exp(float(metrics["val/val/nll"])), rel=1e-5)


# ------------------------------------------------------------------------------------------------------------
# Seq2seq: decoder labels, aligned (no shift)


def test_seq2seq_loss_and_kl_over_decoder_labels() -> None:
    torch.manual_seed(0)
    cfg = transformers.T5Config(
        vocab_size=32,
        d_model=16,
        d_kv=8,
        d_ff=16,
        num_layers=1,
        num_decoder_layers=1,
        num_heads=2,
        decoder_start_token_id=0,
        pad_token_id=0,
        dropout_rate=0.0,
        initializer_factor=5.0,
    )
    model = transformers.T5ForConditionalGeneration(cfg)
    module = ICPContrastiveModule(model, task="seq2seq", counterfactual_kwargs={"kind": "mask"}, top_k_c=3)
    site = "encoder.block.0.layer.1.DenseReluDense.wo"
    s = torch.zeros(16)
    s[[1, 2, 3]] = 1.0
    module.set_scores({site: s})
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 32, (3, 5), generator=gen)
    labels = torch.randint(2, 32, (3, 4), generator=gen)
    labels[0, -1] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    out = module.compute_loss(batch)

    logits = model(input_ids=ids, attention_mask=batch["attention_mask"], labels=labels).logits

    def hook(m: torch.nn.Module, args: tuple) -> tuple:
        h = args[0].clone()
        h[..., [1, 2, 3]] = 0.0
        return (h,)

    handle = dict(model.named_modules())[site].register_forward_pre_hook(hook)
    try:
        cf = model(input_ids=ids, attention_mask=batch["attention_mask"], labels=labels).logits
    finally:
        handle.remove()
    keep = labels != -100
    ce = -logits.log_softmax(-1).gather(-1, labels.clamp_min(0)[..., None])[..., 0][keep].mean()
    torch.testing.assert_close(out["task_loss"], ce)
    torch.testing.assert_close(out["kl"], kl_by_hand(logits[keep], cf[keep], "forward"))
    assert float(out["kl"].detach()) > 1e-3


def test_causal_lm_module_with_a_logger_and_a_causal_lm_datamodule(tmp_path: Path) -> None:
    """A causal-LM data module has num_labels=None; the module's num_labels means nothing for a causal LM. With a
    logger, Lightning refused the fit ('num_labels ... has different values') before the module said so."""

    class LMData(pl.LightningDataModule):
        def __init__(self, num_labels: int | None = None) -> None:
            super().__init__()
            self.save_hyperparameters()

        def train_dataloader(self) -> DataLoader:
            return loader([lm_batch(91 + i) for i in range(2)])

    module = ICPContrastiveModule(tiny_llama(), task="causal_lm", kl_weight=0.0)
    t = pl.Trainer(max_steps=1, accelerator="cpu", logger=pl.loggers.CSVLogger(tmp_path), enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)  # fmt: skip
    t.fit(module, datamodule=LMData())
    assert t.global_step == 1
