"""Counterfactual strategies against hand-written references, and a planted trigger token the inverses must find."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import transformers

from icp_lightning.core.counterfactuals import (
    COUNTERFACTUALS,
    CounterfactualOutput,
    InterventionCounterfactual,
    InversionCounterfactual,
    PairedCounterfactual,
    TokenEditCounterfactual,
    TokenSwapCounterfactual,
    build_counterfactual,
    select_features,
    swap_map,
    swap_words,
)
from icp_lightning.core.interventions import partner_permutation
from icp_lightning.core.sites import Sites, find_sites

SITE = "bert.encoder.layer.0.output.dense"
SPECIAL = [0, 1, 2, 3, 4]  # [PAD] [UNK] [CLS] [SEP] [MASK]
TRIGGER = 17
PLANTED = [1, 5]


def tiny_bert(seed: int = 0, layers: int = 1) -> transformers.BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(
        vocab_size=30,
        hidden_size=16,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=8,
        max_position_embeddings=16,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return transformers.BertForSequenceClassification(cfg).eval()


def ffn_sites(model: torch.nn.Module) -> Sites:
    return find_sites(model, target_modules=r".*layer\.\d+\.output\.dense")


def trigger_bert() -> transformers.BertForSequenceClassification:
    """Layer-0 FFN neurons ``PLANTED`` fire strongly on token ``TRIGGER`` and (almost) nowhere else.

    Position / token-type embeddings and the attention output are zeroed, so the FFN input at a position is the
    layer-normed embedding u of its token; the planted rows read 0.8 u_trigger + 0.6 r (r orthogonal), with a
    bias that keeps them below zero unless the token is the trigger.
    """
    model = tiny_bert(seed=0)
    with torch.no_grad():
        emb = model.bert.embeddings
        emb.position_embeddings.weight.zero_()
        emb.token_type_embeddings.weight.zero_()
        layer = model.bert.encoder.layer[0]
        layer.attention.output.dense.weight.zero_()
        layer.attention.output.dense.bias.zero_()
        e = emb.word_embeddings.weight[TRIGGER]
        u = (e - e.mean()) / e.std(unbiased=False)
        r = torch.randn(16, generator=torch.Generator().manual_seed(1))
        r = r - r.mean()
        r = r - (r @ u) / (u @ u) * u
        r = r / r.norm() * u.norm()
        for j in PLANTED:
            layer.intermediate.dense.weight[j] = 20 / 16 * (0.8 * u + 0.6 * r)
            layer.intermediate.dense.bias[j] = -13.0
    return model


def trigger_batch() -> dict[str, torch.Tensor]:
    ids = torch.tensor(
        [
            [2, 8, 9, TRIGGER, 11, 12, 3, 0],
            [2, TRIGGER, 5, 6, 7, 3, 0, 0],
            [2, 5, 6, 7, 8, 9, 10, 3],  # no trigger
        ]
    )
    return {"input_ids": ids, "attention_mask": (ids != 0).long()}


def planted_scores() -> dict[str, torch.Tensor]:
    scores = torch.zeros(8)
    scores[PLANTED] = 1.0
    return {SITE: scores}


def site_input(model: torch.nn.Module, module: torch.nn.Module, **inputs: Any) -> torch.Tensor:
    """The input of ``module`` on a forward, read with a hand-written hook."""
    seen: list[torch.Tensor] = []
    handle = module.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    return seen[0]


# ------------------------------------------------------------------------------------------------------------
# Feature selection


def test_select_features_threshold_top_k_nan() -> None:
    model = tiny_bert(layers=2)
    sites = ffn_sites(model)
    a, b = sites.names
    scores = {
        a: torch.tensor([0.1, 0.9, 0.0, 0.0, 0.3, 0.0, 0.0, 0.0]),
        b: torch.tensor([0.0, 0.0, 0.8, 0.0, 0.0, 0.0, 0.0, -2.0]),
    }
    by_tau = select_features(scores, sites, tau_c=0.2)
    assert {k: v.tolist() for k, v in by_tau.items()} == {a: [1, 4], b: [2]}
    by_k = select_features(scores, sites, top_k=2)
    assert {k: v.tolist() for k, v in by_k.items()} == {a: [1], b: [2]}
    both = select_features(scores, sites, tau_c=0.5, top_k=5)
    assert {k: v.tolist() for k, v in both.items()} == {a: [1], b: [2]}
    positive = select_features(scores, sites)  # neither: score > 0
    assert {k: v.tolist() for k, v in positive.items()} == {a: [0, 1, 4], b: [2]}
    assert select_features(scores, sites, tau_c=5.0) == {}
    scores[a][2] = float("nan")  # pruning and the counterfactual choice never rank a NaN
    with pytest.raises(ValueError, match=rf"site '{a}' features \[2\]"):
        select_features(scores, sites, top_k=2)


def test_select_features_errors_name_the_problem() -> None:
    sites = ffn_sites(tiny_bert())
    with pytest.raises(ValueError, match=r"different model: they name sites \['nope'\]"):
        select_features({"nope": torch.zeros(8)}, sites)
    with pytest.raises(ValueError, match="different model: site .* has 3 scores but 8 features"):
        select_features({SITE: torch.zeros(3)}, sites)


# ------------------------------------------------------------------------------------------------------------
# Representation level


def manual_intervened_logits(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], feats: list[int], value: torch.Tensor | None
) -> torch.Tensor:
    """The forward with a hand-written pre-hook setting columns ``feats`` of the site's input to ``value``."""
    module = dict(model.named_modules())[SITE]

    def hook(m: torch.nn.Module, args: tuple) -> tuple:
        h = args[0].clone()
        h[..., feats] = 0.0 if value is None else value[..., feats]
        return (h,)

    handle = module.register_forward_pre_hook(hook)
    try:
        return model(**batch).logits
    finally:
        handle.remove()


def test_intervention_mask_equals_a_hand_hooked_forward() -> None:
    model = tiny_bert(seed=3)
    sites = ffn_sites(model)
    batch = {"input_ids": torch.randint(5, 30, (4, 6)), "attention_mask": torch.ones(4, 6, dtype=torch.long)}
    scores = {SITE: torch.tensor([0.0, 0.9, 0.0, 0.7, 0.0, 0.0, 0.95, 0.0])}
    cf = InterventionCounterfactual(tau_c=0.5, kind="mask")
    out = cf.build(model, batch, scores, sites)
    assert out is not None and out.logits is not None and out.batch is None
    expected = manual_intervened_logits(model, batch, [1, 3, 6], None)
    torch.testing.assert_close(out.logits, expected)
    assert not torch.allclose(out.logits, model(**batch).logits)
    assert out.info["n_features"] == 3


def test_intervention_swap_equals_a_hand_hooked_forward_with_partner_activations() -> None:
    model = tiny_bert(seed=4)
    sites = ffn_sites(model)
    batch = {"input_ids": torch.randint(5, 30, (5, 6))}
    scores = {SITE: torch.arange(8, dtype=torch.float)}  # top-2: features 6 and 7
    out = InterventionCounterfactual(top_k=2, kind="swap", seed=7).build(model, batch, scores, sites)
    assert out is not None and out.logits is not None
    h = site_input(model, dict(model.named_modules())[SITE], **batch)
    partner = h[partner_permutation(5, seed=7)]
    expected = manual_intervened_logits(model, batch, [6, 7], partner)
    torch.testing.assert_close(out.logits, expected)


def test_intervention_keeps_the_graph_for_the_kl_gradient() -> None:
    model = tiny_bert(seed=5)
    sites = ffn_sites(model)
    out = InterventionCounterfactual(top_k=3, kind="mask").build(
        model, {"input_ids": torch.randint(5, 30, (2, 4))}, {SITE: torch.rand(8)}, sites
    )
    assert out is not None and out.logits is not None and out.logits.requires_grad
    out.logits.sum().backward()
    assert model.classifier.weight.grad is not None


@pytest.mark.parametrize("name", ["intervention", "inversion", "token_edit"])
def test_feature_strategies_return_none_without_scores_or_features(name: str) -> None:
    model = tiny_bert()
    sites = ffn_sites(model)
    batch = {"input_ids": torch.randint(5, 30, (2, 4))}
    cf = build_counterfactual(name, tau_c=0.5)
    assert cf.build(model, batch, None, None) is None
    assert cf.build(model, batch, {SITE: torch.zeros(8)}, sites) is None  # nothing above tau_c
    with pytest.raises(ValueError, match="needs the Sites"):
        cf.build(model, batch, {SITE: torch.ones(8)}, None)


# ------------------------------------------------------------------------------------------------------------
# Input level: inversion and token edits on the planted trigger


def planted_activation(model: torch.nn.Module, **inputs: Any) -> torch.Tensor:
    h = site_input(model, dict(model.named_modules())[SITE], **inputs)
    return h[..., PLANTED]


def test_trigger_model_fires_only_on_the_trigger() -> None:
    model = trigger_bert()
    batch = trigger_batch()
    act = planted_activation(model, **batch)
    on_trigger = batch["input_ids"] == TRIGGER
    assert act[on_trigger].min() > 2.0
    assert act[~on_trigger].abs().max() < 0.2


def test_inversion_reduces_the_mismatch_and_moves_the_feature_toward_v() -> None:
    model = trigger_bert()
    batch = trigger_batch()
    cf = InversionCounterfactual(steps=15, tau_c=0.5, project_to_tokens=False, special_token_ids=SPECIAL)
    out = cf.build(model, batch, planted_scores(), ffn_sites(model))
    assert out is not None and out.batch is not None
    errors = out.info["reconstruction_error"]
    assert len(errors) == 16
    assert errors[-1] < 0.01 * errors[0]
    assert all(later <= earlier * 1.05 for earlier, later in zip(errors, errors[1:]))
    # x' as embeddings: the planted activations (v = 0 under mask) moved toward 0 on the trigger.
    assert "input_ids" not in out.batch
    before = planted_activation(model, **batch)
    after = planted_activation(
        model, inputs_embeds=out.batch["inputs_embeds"], attention_mask=batch["attention_mask"]
    )
    on_trigger = batch["input_ids"] == TRIGGER
    assert after[on_trigger].abs().max() < 0.1 * before[on_trigger].abs().min()
    # Special tokens and padding never move.
    emb = model.get_input_embeddings()(batch["input_ids"])
    frozen = (batch["input_ids"] < 5)[..., None].expand_as(emb)
    torch.testing.assert_close(out.batch["inputs_embeds"][frozen], emb[frozen].detach())


def test_inversion_keep_weight_keeps_the_other_columns_near_their_clean_values() -> None:
    model = trigger_bert()
    batch = trigger_batch()
    module = dict(model.named_modules())[SITE]
    clean = site_input(model, module, **batch)
    others = [i for i in range(8) if i not in PLANTED]
    drift = {}
    for keep in (0.0, 10.0):
        cf = InversionCounterfactual(
            steps=10, tau_c=0.5, project_to_tokens=False, keep_weight=keep, special_token_ids=SPECIAL
        )
        out = cf.build(model, batch, planted_scores(), ffn_sites(model))
        assert out is not None and out.batch is not None
        h = site_input(model, module, **out.batch)
        drift[keep] = float(((h - clean)[..., others] ** 2).sum())
        assert out.info["final_error"] < 0.1 * out.info["initial_error"]
    assert drift[10.0] < drift[0.0]


def test_inversion_projects_onto_tokens_and_replaces_the_trigger() -> None:
    model = trigger_bert()
    batch = trigger_batch()
    cf = InversionCounterfactual(steps=15, tau_c=0.5, project_to_tokens=True, special_token_ids=SPECIAL)
    out = cf.build(model, batch, planted_scores(), ffn_sites(model))
    assert out is not None and out.batch is not None
    new_ids = out.batch["input_ids"]
    assert new_ids.shape == batch["input_ids"].shape and new_ids.dtype == torch.long
    on_trigger = batch["input_ids"] == TRIGGER
    assert (new_ids[on_trigger] != TRIGGER).all()
    assert not torch.isin(
        new_ids[batch["attention_mask"].bool() & (batch["input_ids"] >= 5)], torch.tensor(SPECIAL)
    ).any()
    assert out.info["projected_error"] < 0.1 * out.info["initial_error"]
    assert planted_activation(model, **out.batch).abs().max() < 0.2


@pytest.mark.parametrize("edit", ["mask", "hotflip", "delete"])
@pytest.mark.parametrize("candidates", [1, 8])
def test_token_edit_finds_and_removes_the_planted_trigger(edit: str, candidates: int) -> None:
    model = trigger_bert()
    batch = trigger_batch()
    cf = TokenEditCounterfactual(
        max_edits=3,
        edit=edit,  # type: ignore[arg-type]
        replace_id=4,
        candidates=candidates,
        tau_c=0.5,
        atol=1e-3,
        special_token_ids=SPECIAL,
    )
    out = cf.build(model, batch, planted_scores(), ffn_sites(model))
    assert out is not None and out.batch is not None
    edited = out.info["edited_positions"]
    assert edited[0] == [3] and edited[1] == [1]  # the trigger's position, and nothing else
    assert edited[2] == []  # nothing fires: nothing to edit
    new_ids = out.batch["input_ids"]
    assert new_ids.shape == batch["input_ids"].shape
    assert not (new_ids == TRIGGER).any()
    assert out.info["relative_mismatch"][0] < 0.1 and out.info["relative_mismatch"][1] < 0.1
    ids = batch["input_ids"]
    if edit == "delete":
        assert new_ids[0].tolist() == [2, 8, 9, 11, 12, 3, 4, 0]
        assert out.batch["attention_mask"][0].tolist() == [1, 1, 1, 1, 1, 1, 0, 0]
    else:
        torch.testing.assert_close(out.batch["attention_mask"], batch["attention_mask"])
        changed = new_ids != ids
        assert changed.tolist() == (ids == TRIGGER).tolist()
        if edit == "mask":
            assert (new_ids[changed] == 4).all()
        else:
            assert not torch.isin(new_ids[changed], torch.tensor(SPECIAL)).any()


# ------------------------------------------------------------------------------------------------------------
# Given counterfactuals: paired inputs and word swaps


def test_paired_uses_the_cf_columns() -> None:
    batch = {
        "input_ids": torch.tensor([[2, 6, 3]]),
        "attention_mask": torch.tensor([[1, 1, 1]]),
        "cf_input_ids": torch.tensor([[2, 7, 3]]),
        "cf_attention_mask": torch.tensor([[1, 1, 0]]),
        "labels": torch.tensor([1]),
    }
    out = PairedCounterfactual().build(None, batch)
    assert out.batch is not None
    assert out.batch["input_ids"].tolist() == [[2, 7, 3]]
    assert out.batch["attention_mask"].tolist() == [[1, 1, 0]]
    assert out.batch["labels"].tolist() == [1]
    assert not any(k.startswith("cf_") for k in out.batch)


WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "he", "she", "his", "her", "man", "woman"]
WORDS += ["is", "a", "doctor", "said", "."]


def tokenizer() -> transformers.PreTrainedTokenizerBase:
    return transformers.BertTokenizer(vocab={w: i for i, w in enumerate(WORDS)})


def test_swap_map_and_swap_words() -> None:
    mapping = swap_map([("he", "she"), ("his", "her"), ("him", "her")])
    assert mapping["her"] == "his" and mapping["him"] == "her"
    assert swap_words("He said HIS wife, hello", mapping) == "She said HER wife, hello"
    with pytest.raises(ValueError, match="pair of non-empty words"):
        swap_map([("he", "")])


def test_token_swap_ids_mode_maps_single_token_words_both_ways() -> None:
    tok = tokenizer()
    ids = {w: i for i, w in enumerate(WORDS)}
    cf = TokenSwapCounterfactual(tokenizer=tok, mode="ids")
    enc = tok(
        ["he said his doctor is a woman .", "she is"],
        padding="max_length",
        max_length=10,
        return_tensors="pt",
    )
    out = cf.build(None, dict(enc))
    assert out.batch is not None
    expected = enc["input_ids"].clone()
    for a, b in [("he", "she"), ("his", "her"), ("woman", "man"), ("she", "he")]:
        expected[enc["input_ids"] == ids[a]] = ids[b]
    assert out.batch["input_ids"].tolist() == expected.tolist()
    assert out.info["n_swapped"] == 4
    assert "himself" in out.info["skipped"]  # not in this vocabulary
    torch.testing.assert_close(out.batch["attention_mask"], enc["attention_mask"])


def test_token_swap_text_mode_retokenises_to_the_batch_length() -> None:
    tok = tokenizer()
    texts = ["He said his doctor is a man.", "the woman"]
    enc = tok(texts, padding="max_length", max_length=9, truncation=True, return_tensors="pt")
    batch = {**enc, "text": texts, "labels": torch.tensor([0, 1])}
    out = TokenSwapCounterfactual(lexicon={"he": "she", "his": "her", "man": "woman"}, tokenizer=tok).build(
        None, batch
    )
    assert out.batch is not None and out.info["mode"] == "text"
    assert out.batch["text"] == ["She said her doctor is a woman.", "the man"]
    expected = tok(
        out.batch["text"], padding="max_length", max_length=9, truncation=True, return_tensors="pt"
    )
    assert out.batch["input_ids"].tolist() == expected["input_ids"].tolist()
    assert out.batch["input_ids"].shape == batch["input_ids"].shape
    assert out.batch["labels"].tolist() == [0, 1]


def test_token_swap_needs_a_tokenizer_and_text_when_asked() -> None:
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        TokenSwapCounterfactual()
    cf = TokenSwapCounterfactual(tokenizer=tokenizer(), mode="text")
    with pytest.raises(ValueError, match="needs the raw strings"):
        cf.build(None, {"input_ids": torch.tensor([[2, 3]])})


# ------------------------------------------------------------------------------------------------------------
# Registry


def test_build_counterfactual_by_name_with_defaults_and_custom_objects() -> None:
    assert set(COUNTERFACTUALS) >= {"intervention", "inversion", "token_edit", "paired", "token_swap"}
    cf = build_counterfactual("intervention", defaults={"tau_c": 0.3, "top_k": 2}, kind="mask")
    assert isinstance(cf, InterventionCounterfactual)
    assert (cf.tau_c, cf.top_k, cf.kind) == (0.3, 2, "mask")
    assert isinstance(build_counterfactual("paired", defaults={"tau_c": 0.3}), PairedCounterfactual)

    class Mine:
        def build(self, model: Any, batch: Any, scores: Any, sites: Any) -> CounterfactualOutput:
            return CounterfactualOutput(batch=dict(batch))

    mine = Mine()
    assert build_counterfactual(mine) is mine
    with pytest.raises(ValueError, match="unknown counterfactual 'nope'; built-ins are"):
        build_counterfactual("nope")
    with pytest.raises(TypeError, match="build"):
        build_counterfactual(object())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="bad arguments for counterfactual 'paired'"):
        build_counterfactual("paired", steps=3)
    with pytest.raises(ValueError, match="kind must be 'swap' or 'mask'"):
        build_counterfactual("intervention", kind="scale")
