"""core/selection: one meaning of threshold / amount / scope / min_keep / NaN for every caller, and scores that do
not fit the model refused everywhere with the same message."""

from __future__ import annotations

import pytest
import torch
import transformers

from icp_lightning.callbacks.pruning import select_masks as callback_select_masks
from icp_lightning.core.counterfactuals import select_features
from icp_lightning.core.scores import Scores
from icp_lightning.core.selection import check_amount, count_of, select_masks
from icp_lightning.core.sites import check_scores_fit, find_sites, model_description, sites_for_scores


def _tiny_bert() -> transformers.BertForSequenceClassification:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=30, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=24
    )
    return transformers.BertForSequenceClassification(cfg)


def test_the_callback_re_exports_the_core_function():
    assert callback_select_masks is select_masks


@pytest.mark.parametrize(
    ("amount", "available", "count"),
    [(0, 10, 0), (3, 10, 3), (30, 10, 10), (0.25, 10, 2), (0.5, 5, 2), (0.05, 100, 5), (0.999, 10, 10)],
)
def test_an_int_is_a_count_and_a_float_a_fraction(amount, available, count):
    assert count_of(amount, available) == count


@pytest.mark.parametrize("amount", [1.0, 0.0, 1.5, -0.1, float("nan"), float("inf"), True, "5", None])
def test_other_amounts_raise_and_say_what_to_pass(amount):
    with pytest.raises(ValueError, match=r"pass an int for a count or a fraction in \(0, 1\)"):
        check_amount(amount)
    with pytest.raises(
        ValueError, match=r"pass an int for a count or a fraction in \(0, 1\)|needs threshold"
    ):
        select_masks({"a": torch.ones(3)}, amount=amount)


def test_negative_counts_raise():
    with pytest.raises(ValueError, match="a count must be >= 0"):
        check_amount(-1)


def test_masks_default_to_all_ones_and_int_zero_prunes_nothing():
    scores = {"a": torch.tensor([3.0, 1.0, 2.0]), "b": torch.tensor([0.5, 4.0])}
    assert {n: m.tolist() for n, m in select_masks(scores, amount=0).items()} == {
        "a": [1.0, 1.0, 1.0],
        "b": [1.0, 1.0],
    }
    got = select_masks(scores, amount=2, min_keep=0)
    assert got["a"].tolist() == [0.0, 1.0, 1.0] and got["b"].tolist() == [1.0, 0.0]


def test_threshold_and_amount_together_take_the_top_amount_above_the_threshold():
    scores = {"a": torch.tensor([3.0, 1.0, 2.0, 0.1]), "b": torch.tensor([0.5, 4.0])}
    got = select_masks(scores, threshold=0.4, amount=0.5, min_keep=0)  # 4 above 0.4 -> the top 2
    assert got["a"].tolist() == [0.0, 1.0, 1.0, 1.0] and got["b"].tolist() == [1.0, 0.0]


def test_nan_candidates_raise_naming_the_site_and_the_features():
    scores = {"a": torch.tensor([1.0, float("nan"), 0.5, float("nan")]), "b": torch.tensor([0.2, 0.1])}
    with pytest.raises(ValueError, match=r"site 'a' features \[1, 3\] \(2\).*never ranks a NaN"):
        select_masks(scores, amount=1)
    with pytest.raises(ValueError, match=r"site 'a' features \[1, 3\]"):
        select_masks(scores, threshold=0.0)
    # A NaN on a feature that is already pruned is not a candidate, so not an error.
    masks = {"a": torch.tensor([1.0, 0.0, 1.0, 0.0]), "b": torch.ones(2)}
    got = select_masks(scores, masks, amount=1, min_keep=0)
    assert got["a"].tolist() == [0.0, 0.0, 1.0, 0.0]


def test_cumulative_masks_never_choose_pruned_features_and_fractions_apply_to_the_rest():
    scores = {"a": torch.arange(10.0)}
    first = select_masks(scores, amount=0.5, min_keep=0)
    assert first["a"].tolist() == [1.0] * 5 + [0.0] * 5
    second = select_masks(scores, first, amount=0.4, min_keep=0)  # 40% of the 5 remaining = 2
    assert second["a"].tolist() == [1.0] * 3 + [0.0] * 7


@pytest.mark.parametrize("scope", ["global", "per_site"])
def test_scope_against_a_naive_ranking(scope):
    gen = torch.Generator().manual_seed(3)
    scores = {"a": torch.randn(6, generator=gen), "b": torch.randn(4, generator=gen)}
    got = select_masks(scores, amount=2, scope=scope, min_keep=0)
    if scope == "global":
        flat = sorted(((float(v), n, i) for n in scores for i, v in enumerate(scores[n])), reverse=True)[:2]
        expected = {(n, i) for _, n, i in flat}
    else:
        expected = {(n, int(i)) for n in scores for i in torch.argsort(scores[n], descending=True)[:2]}
    pruned = {(n, i) for n in got for i in range(got[n].numel()) if got[n][i] == 0}
    assert pruned == expected


def test_scores_of_another_size_say_they_were_computed_for_a_different_model():
    with pytest.raises(
        ValueError, match=r"scores were computed for a different model: site 'a' has 3 scores but 4"
    ):
        select_masks({"a": torch.zeros(3)}, {"a": torch.ones(4)}, amount=1)
    sites = find_sites(_tiny_bert())
    name = sites.names[0]
    with pytest.raises(ValueError, match=rf"different model: site '{name}' has 72 scores but 16 features"):
        select_masks({name: torch.zeros(72)}, sites=sites, amount=1)
    with pytest.raises(ValueError, match="different model: they name sites \\['nope'\\]"):
        check_scores_fit({"nope": torch.zeros(3)}, sites)
    with pytest.raises(ValueError, match="scores were computed for a different model"):
        select_features({name: torch.zeros(3)}, sites)


def test_select_features_is_the_same_selection():
    sites = find_sites(_tiny_bert())
    gen = torch.Generator().manual_seed(0)
    scores = {n: torch.randn(s.n_features, generator=gen) for n, s in sites.items()}
    for tau_c, top_k in [(None, 5), (0.5, None), (0.2, 3), (None, None)]:
        chosen = select_features(scores, sites, tau_c=tau_c, top_k=top_k)
        threshold = 0.0 if tau_c is None and top_k is None else tau_c
        masks = select_masks(scores, sites=sites, threshold=threshold, amount=top_k, min_keep=0)
        expected = {n: (m == 0).nonzero().reshape(-1).tolist() for n, m in masks.items() if (m == 0).any()}
        assert {n: v.tolist() for n, v in chosen.items()} == expected


# ----------------------------------------------------------------------------------------------------------
# Scores that know their sites


def test_sites_for_scores_rebuilds_head_sites_from_the_metadata():
    model = _tiny_bert()
    heads = find_sites(model, granularity="head")
    meta = {"granularity": "head", **model_description(model)}
    scores = Scores({n: torch.zeros(4) for n in heads}, {n: torch.ones(4) for n in heads}, meta)
    sites = sites_for_scores(model, scores)
    assert sites.granularity == "head" and sites.names == heads.names
    assert all(sites[n].group_size == 4 for n in sites)


def test_sites_for_scores_refuses_another_model_and_old_files():
    model = _tiny_bert()
    name = "bert.encoder.layer.0.output.dense"
    scores = Scores({name: torch.zeros(24)}, {name: torch.ones(24)}, {"granularity": "neuron"})
    assert sites_for_scores(model, scores).names == [name]
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2)
    )
    other = Scores(scores.sums, scores.counts, {"granularity": "neuron", **model_description(gpt2)})
    with pytest.raises(
        ValueError, match=r"different model: model_type 'gpt2' \(GPT2LMHeadModel\), this model is 'bert'"
    ):
        sites_for_scores(model, other)
    wrong_size = Scores({name: torch.zeros(7)}, {name: torch.ones(7)}, {"granularity": "neuron"})
    with pytest.raises(ValueError, match="different model: site .* has 7 scores but 24 features"):
        sites_for_scores(model, wrong_size)
    missing = Scores({"h.0.mlp": torch.zeros(7)}, {"h.0.mlp": torch.ones(7)}, {"granularity": "neuron"})
    with pytest.raises(ValueError, match="different model"):
        sites_for_scores(model, missing)
    old = Scores(
        {name: torch.zeros(24)}, {name: torch.ones(24)}
    )  # no metadata: a file of icp_lightning < 0.2
    with pytest.raises(ValueError, match="do not say their granularity .* granularity="):
        sites_for_scores(model, old)
    assert sites_for_scores(model, old, granularity="neuron").names == [name]  # the documented fallback
