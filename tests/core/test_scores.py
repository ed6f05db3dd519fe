"""Spuriousness scores against the formulas written out by hand."""

from __future__ import annotations

import itertools

import pytest
import torch

from icp_lightning.core.effects import Effects
from icp_lightning.core.scores import Scores, spuriousness


def _eff(values, count=3.0):
    v = torch.as_tensor(values, dtype=torch.float64)
    return Effects(
        {"a": v[:2] * count, "b": v[2:] * count}, {"a": torch.full((2,), count), "b": torch.full((1,), count)}
    )


def _random_effects(seed=0):
    g = torch.Generator().manual_seed(seed)
    keys = list(itertools.product(["mask", "swap"], ["label_logprob", "accuracy"], ["id", "ood", "clean"]))
    return {k: _eff(torch.randn(3, generator=g).tolist()) for k in keys}


def test_abs_reduction_is_the_literal_formula():
    effects = _random_effects()
    wi, wm, wx = (
        {"mask": 2.0, "swap": 0.5},
        {"label_logprob": 1.0, "accuracy": 3.0},
        {"id": 1, "ood": 2, "clean": 1},
    )
    scores = spuriousness(effects, wi, wm, wx, reduction="abs")
    for site, idx in [("a", 0), ("a", 1), ("b", 0)]:
        total = 0.0
        for (i, m, x), e in effects.items():
            total += wi[i] * wm[m] * wx[x] * abs(float(e[site][idx]))
        assert float(scores[site][idx]) == pytest.approx(total / (2 * 2 * 3), rel=1e-6)


def test_signed_reduction_contrasts_datasets():
    effects = _random_effects(1)
    wx = {"id": 1.0, "ood": -1.0, "clean": 0.0}
    scores = spuriousness(effects, dataset_weights=wx, reduction="signed")
    for site, idx in [("a", 0), ("b", 0)]:
        total = sum(wx[x] * float(e[site][idx]) for (i, m, x), e in effects.items())
        assert float(scores[site][idx]) == pytest.approx(total / 4, rel=1e-6)


def test_signed_finds_what_abs_misses():
    # feature 0: helps ID, hurts OOD (a shortcut). feature 1: important everywhere. b: nothing.
    effects = {"id": _eff([0.5, 1.0, 0.0]), "ood": _eff([-0.5, 1.0, 0.0])}
    signed = spuriousness(effects, dataset_weights={"id": 1, "ood": -1})
    absolute = spuriousness(effects, reduction="abs")
    assert signed.top_k(1)[0][:2] == ("a", 0)
    assert absolute.top_k(1)[0][:2] == ("a", 1)


def test_errors_and_round_trip(tmp_path):
    effects = {"id": _eff([0.5, 1.0, 0.0])}
    with pytest.raises(ValueError, match="reduction"):
        spuriousness(effects, reduction="mean")
    with pytest.raises(ValueError, match="no entry for 'id'"):
        spuriousness(effects, dataset_weights={"ood": -1})
    with pytest.raises(ValueError, match="at least one"):
        spuriousness({})
    scores = spuriousness(effects)
    scores.save(tmp_path / "s.pt")
    back = Scores.load(tmp_path / "s.pt")
    assert torch.equal(back["a"], scores["a"]) and back.meta["reduction"] == "signed"
    raw = torch.load(tmp_path / "s.pt", weights_only=True)
    assert raw["class"] == "Scores"


def test_scores_describe_themselves_and_keep_it_through_pt_and_json(tmp_path):
    import json

    import transformers

    from icp_lightning.core.effects import causal_effects
    from icp_lightning.core.sites import find_sites, sites_for_scores

    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=4, intermediate_size=24
    )
    model = transformers.BertForSequenceClassification(cfg)
    sites = find_sites(model, granularity="head")
    batch = {
        "input_ids": torch.randint(1, 30, (4, 6)),
        "attention_mask": torch.ones(4, 6, dtype=torch.long),
        "labels": torch.tensor([0, 1, 0, 1]),
    }
    effects = {
        ds: causal_effects(model, [batch], sites, "mask", "label_logprob", "gradient") for ds in ("id", "ood")
    }
    scores = spuriousness(effects, dataset_weights={"id": 1, "ood": -1}, model=model)
    name = sites.names[0]
    assert scores.granularity == "head" and scores.model_type == "bert"
    assert scores.meta["model_class"] == "BertForSequenceClassification"
    assert scores.meta["sites"] == {name: 4} and scores.site_sizes == {name: 4}
    scores.save(tmp_path / "scores.pt")
    scores.to_json(tmp_path / "scores.json")
    loaded = Scores.load(tmp_path / "scores.pt")
    assert loaded.meta["granularity"] == "head" and loaded.meta["sites"] == {name: 4}
    assert loaded.meta["model_type"] == "bert"
    saved = json.loads((tmp_path / "scores.json").read_text())["meta"]
    assert saved["granularity"] == "head" and saved["model_type"] == "bert" and saved["sites"] == {name: 4}
    assert sites_for_scores(model, loaded).names == [name]  # the head sites, not guessed from lengths
    # Without model=: the effects' metadata still gives the granularity.
    assert spuriousness(effects, dataset_weights={"id": 1, "ood": -1}).granularity == "head"


def test_effects_at_different_granularities_do_not_mix():
    a, b = _eff([1.0, 2.0, 3.0]), _eff([1.0, 2.0, 3.0])
    a.meta["granularity"], b.meta["granularity"] = "neuron", "head"
    with pytest.raises(ValueError, match="different granularities"):
        spuriousness({("mask", "m", "id"): a, ("mask", "m", "ood"): b})
