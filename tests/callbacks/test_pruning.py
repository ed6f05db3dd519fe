"""CausalPruningCallback: arguments, the selection rule against naive loops, rounds in a real Trainer, soft
masks, make_permanent, logged metrics, rank-0 broadcast, and resume-from-checkpoint exactness."""

from __future__ import annotations

import math
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from icp_lightning.callbacks import (
    CausalAttributionCallback,
    CausalPruningCallback,
    default_factor,
    select_masks,
)
from icp_lightning.core.masks import effective_weight, get_masks
from icp_lightning.core.scores import Scores
from icp_lightning.core.sites import find_sites
from tests.callbacks._helpers import (
    TinyClassifier,
    one_thread,  # noqa: F401  (autouse fixture)
    tiny_bert,
    trainer,
)

ATTR = dict(progress=False, max_batches=1)

# ----------------------------------------------------------------------------------------------------------
# Arguments


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "give exactly one of threshold= .* not neither"),
        ({"threshold": 0.1, "amount": 3}, "give exactly one of threshold= .* not both"),
        ({"threshold": float("inf")}, "threshold must be a finite number"),
        ({"amount": 1.5}, r"amount=1.5: pass an int for a count or a fraction in \(0, 1\)"),
        ({"amount": 1.0}, r"amount=1.0: pass an int for a count or a fraction in \(0, 1\)"),
        ({"amount": 0.0}, r"amount=0.0: pass an int for a count or a fraction in \(0, 1\)"),
        ({"amount": -2}, "amount=-2: a count must be >= 0"),
        ({"amount": True}, "amount=True: pass an int for a count or a fraction in \\(0, 1\\)"),
        ({"amount": "10%"}, "amount='10%': pass an int for a count or a fraction in \\(0, 1\\)"),
        ({"amount": 0.1, "select_fn": 3}, "select_fn must be a callable"),
        ({"amount": 0.1, "scope": "layer"}, r"scope must be one of \('global', 'per_site'\)"),
        ({"amount": 0.1, "mode": "medium"}, r"mode must be one of \('hard', 'soft'\)"),
        ({"amount": 0.1, "min_keep": -1}, "min_keep must be an int >= 0"),
        ({"amount": 0.1, "factor_fn": 3}, "factor_fn must be a callable"),
        ({"amount": 0.1, "factor_fn": default_factor}, "factor_fn only applies to mode='soft'"),
        ({"amount": 0.1, "attribution": object()}, "attribution must be a CausalAttributionCallback"),
    ],
)
def test_bad_arguments_raise_value_errors_that_say_what_to_do(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CausalPruningCallback(**kwargs)


def test_the_attribution_callback_must_be_found(tmp_path):
    with pytest.raises(ValueError, match="needs one CausalAttributionCallback .* found 0"):
        trainer(tmp_path, [CausalPruningCallback(amount=1)]).fit(TinyClassifier())
    two = [CausalAttributionCallback(**ATTR), CausalAttributionCallback(reduction="abs", **ATTR)]
    with pytest.raises(ValueError, match="found 2: .* or pass attribution= to choose"):
        trainer(tmp_path, [*two, CausalPruningCallback(amount=1)]).fit(TinyClassifier())
    stray = CausalAttributionCallback(**ATTR)
    with pytest.raises(ValueError, match="not among the trainer's callbacks"):
        trainer(tmp_path, [*two, CausalPruningCallback(amount=1, attribution=stray)]).fit(TinyClassifier())


# ----------------------------------------------------------------------------------------------------------
# The selection rule, against naive loops


def _random_case(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    sizes = {"a": 7, "b": 5, "c": 9}
    scores = {n: torch.randn(k, generator=gen) for n, k in sizes.items()}
    scores["a"][1] = float("nan")  # a pruned feature: not a candidate, so its NaN is never looked at
    masks = {n: torch.ones(k) for n, k in sizes.items()}
    masks["a"][[1, 4]] = 0.0  # pruned before
    masks["b"][0] = 0.0
    return scores, masks


def _candidates(scores, masks):
    return [
        (float(scores[n][i]), n, i)
        for n in masks
        for i in range(masks[n].numel())
        if masks[n][i] > 0 and not math.isnan(float(scores[n][i]))
    ]


def _naive_hard(scores, masks, chosen):
    new = {n: m.clone() for n, m in masks.items()}
    for n, i in chosen:
        new[n][i] = 0.0
    return new


@pytest.mark.parametrize("amount", [0, 3, 0.25, 0.5, 100])
def test_global_amount_matches_a_naive_ranking(amount):
    scores, masks = _random_case()
    cands = _candidates(scores, masks)
    k = amount if isinstance(amount, int) else round(amount * len(cands))
    ranked = sorted(cands, key=lambda c: -c[0])[:k]
    expected = _naive_hard(scores, masks, [(n, i) for _, n, i in ranked])
    got = select_masks(scores, masks, amount=amount, min_keep=0)
    assert all(torch.equal(got[n], expected[n]) for n in masks)
    if amount == 100:  # a count above the candidates: all of them
        assert all(bool((got[n] == 0).all()) for n in ("a", "b", "c"))


@pytest.mark.parametrize("amount", [1, 2, 0.5])
def test_per_site_amount_matches_a_naive_ranking_in_each_site(amount):
    scores, masks = _random_case(1)
    chosen = []
    for n in masks:
        cands = [c for c in _candidates(scores, masks) if c[1] == n]
        k = amount if isinstance(amount, int) else round(amount * len(cands))
        chosen += [(n, i) for _, n, i in sorted(cands, key=lambda c: -c[0])[:k]]
    expected = _naive_hard(scores, masks, chosen)
    got = select_masks(scores, masks, amount=amount, scope="per_site", min_keep=0)
    assert all(torch.equal(got[n], expected[n]) for n in masks)


@pytest.mark.parametrize("scope", ["global", "per_site"])
def test_threshold_prunes_remaining_features_above_tau(scope):
    scores, masks = _random_case(2)
    chosen = [(n, i) for s, n, i in _candidates(scores, masks) if s > 0.3]
    expected = _naive_hard(scores, masks, chosen)
    got = select_masks(scores, masks, threshold=0.3, scope=scope, min_keep=0)
    assert all(torch.equal(got[n], expected[n]) for n in masks)


def test_min_keep_spares_the_lowest_scoring_features_of_a_site():
    scores = {"a": torch.tensor([5.0, 4.0, 3.0, 2.0]), "b": torch.tensor([0.1, 0.2])}
    masks = {"a": torch.tensor([1.0, 1.0, 1.0, 0.0]), "b": torch.ones(2)}
    got = select_masks(scores, masks, threshold=0.0, min_keep=2)
    assert got["a"].tolist() == [0.0, 1.0, 1.0, 0.0]  # 3 and 4 spared (lowest scores), 2 was pruned before
    assert got["b"].tolist() == [1.0, 1.0]
    got = select_masks(scores, masks, threshold=0.0, min_keep=0)
    assert got["a"].tolist() == [0.0, 0.0, 0.0, 0.0] and got["b"].tolist() == [0.0, 0.0]


def test_soft_mode_factors_are_standardized_scores_through_factor_fn():
    scores, masks = _random_case(3)
    masks["a"][2] = 0.5  # an earlier soft factor: multiplied again
    cands = _candidates(scores, masks)
    values = torch.tensor([c[0] for c in cands], dtype=torch.float64)
    mean, std = values.mean(), values.std(unbiased=False)
    ranked = sorted(cands, key=lambda c: -c[0])[:4]
    got = select_masks(scores, masks, amount=4, mode="soft")
    expected = {n: m.clone() for n, m in masks.items()}
    for s, n, i in ranked:
        z = (s - mean) / std
        expected[n][i] = masks[n][i] * (1 - torch.sigmoid(z)).float()
    for n in masks:
        torch.testing.assert_close(got[n], expected[n])
    assert all(bool(((got[n] >= 0) & (got[n] <= 1)).all()) for n in got)

    halve = select_masks(scores, masks, amount=4, mode="soft", factor_fn=lambda z: torch.full_like(z, 0.5))
    for _, n, i in ranked:
        assert halve[n][i] == masks[n][i] * 0.5
    with pytest.raises(ValueError, match=r"factor_fn must return factors in \[0, 1\]"):
        select_masks(scores, masks, amount=4, mode="soft", factor_fn=lambda z: z)


# ----------------------------------------------------------------------------------------------------------
# Rounds in a real Trainer


class Recorder(pl.Callback):
    """After the ICP callbacks' hook: the pruning callback's masks and the model's, per round."""

    def __init__(self, pruning: CausalPruningCallback) -> None:
        self.pruning, self.rounds = pruning, []

    def on_validation_epoch_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.rounds.append(
                ({n: m.clone() for n, m in self.pruning.masks.items()}, get_masks(pl_module.model))
            )


def test_three_rounds_of_cumulative_masks_with_a_scheduled_amount(tmp_path):
    amounts = []

    def amount(round_index: int) -> float:
        amounts.append(round_index)
        return [0.1, 0.2, 5][round_index]

    attribution = CausalAttributionCallback(**ATTR)
    pruning = CausalPruningCallback(amount=amount, verbose=False)
    recorder = Recorder(pruning)
    module = TinyClassifier()
    tr = trainer(tmp_path, [attribution, pruning, recorder], max_epochs=3, limit_train_batches=2)
    tr.fit(module)

    assert amounts == [0, 1, 2] and pruning.round == 3 and attribution.round == 3
    total = sum(s.n_features for s in attribution.sites.values())
    remaining, previous = total, None
    for (masks, model_masks), k in zip(recorder.rounds, [0.1, 0.2, 5]):
        assert all(torch.equal(masks[n], model_masks[n]) for n in masks)  # installed on the model
        pruned = sum(int((m == 0).sum()) for m in masks.values())
        expected = round(k * remaining) if isinstance(k, float) else k
        assert pruned == total - remaining + expected  # amount applies to the remaining features
        if previous is not None:
            for n in masks:
                assert bool((masks[n][previous[n] == 0] == 0).all())  # pruned stays pruned
        remaining, previous = total - pruned, masks
    # The training steps after each round could not revive anything; the effective weights are zero there.
    for name, mask in pruning.masks.items():
        w = effective_weight(attribution.sites[name].module)
        assert w[:, mask == 0].abs().max() == 0
        assert w[:, mask > 0].abs().min() >= 0 and w[:, mask > 0].abs().sum() > 0
    metrics = tr.callback_metrics
    assert metrics["icp/sparsity"].item() == pytest.approx(pruning.sparsity())
    assert metrics["icp/pruned"].item() == 5
    assert sum(metrics[f"icp/pruned/{n}"].item() for n in pruning.masks) == 5


def test_head_granularity_per_site_and_make_permanent_at_fit_end(tmp_path):
    attribution = CausalAttributionCallback(granularity="head", **ATTR)
    pruning = CausalPruningCallback(amount=2, scope="per_site", make_permanent=True, verbose=False)
    module = TinyClassifier()
    batch = next(iter(module.val_dataloader()["id"]))
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    seen = {}

    class Logits(pl.Callback):
        def on_train_end(self, trainer, pl_module):  # masks still installed here
            pl_module.model.eval()
            with torch.no_grad():
                seen["masked"] = pl_module.model(**inputs).logits

    trainer(tmp_path, [attribution, pruning, Logits()], max_epochs=2, limit_train_batches=1).fit(module)
    assert get_masks(module.model) == {}  # folded and removed in on_fit_end
    for name, mask in pruning.masks.items():
        # 2 heads per round, 2 rounds, but min_keep=1 of the 4 heads survives
        assert mask.shape == (4,) and int((mask == 0).sum()) == 3
        layer = attribution.sites[name].module
        columns = attribution.sites[name].expand(mask)
        assert layer.weight[:, columns == 0].abs().max() == 0
    with torch.no_grad():
        torch.testing.assert_close(module.model(**inputs).logits, seen["masked"])


def test_soft_mode_in_a_trainer_logs_the_mean_mask(tmp_path):
    attribution = CausalAttributionCallback(**ATTR)
    pruning = CausalPruningCallback(threshold=0.0, mode="soft", verbose=False)
    tr = trainer(tmp_path, [attribution, pruning], max_epochs=1, limit_train_batches=1)
    module = TinyClassifier()
    tr.fit(module)
    masks = get_masks(module.model)
    values = torch.cat(list(masks.values()))
    assert bool(((values > 0) & (values < 1)).any()) and bool((values > 0).all())
    assert tr.callback_metrics["icp/mask_mean"].item() == pytest.approx(values.mean().item(), rel=1e-6)
    assert tr.callback_metrics["icp/sparsity"].item() == 0.0


def test_masks_follow_rank_zero_broadcast():
    """Every rank installs what rank 0 decided, even if its own decision differed."""
    model = tiny_bert().eval()
    sites = find_sites(model)
    attribution = CausalAttributionCallback(**ATTR)
    attribution.sites = sites
    ones = {n: torch.ones(s.n_features, dtype=torch.float64) for n, s in sites.items()}
    attribution.scores = Scores(
        {n: torch.randn(s.n_features, dtype=torch.float64) for n, s in sites.items()}, ones
    )
    rank0 = {n: (torch.arange(s.n_features) % 3 != 0).float() for n, s in sites.items()}
    broadcasts = []

    class Strategy:
        def broadcast(self, obj, src=0):
            broadcasts.append((obj, src))
            return rank0

    logged = {}
    strategy = Strategy()
    strategy.model = model  # type: ignore[attr-defined]
    trainer_ = SimpleNamespace(strategy=strategy, current_epoch=0, optimizers=[])
    module = SimpleNamespace(model=model, log=lambda name, value, **kw: logged.__setitem__(name, value))
    pruning = CausalPruningCallback(amount=0.1, attribution=attribution, verbose=False)
    pruning._on_attribution(trainer_, module, attribution)
    assert len(broadcasts) == 1 and broadcasts[0][1] == 0
    local = broadcasts[0][0]
    assert any(not torch.equal(local[n], rank0[n]) for n in rank0)  # the local decision was different
    installed = get_masks(model)
    assert all(torch.equal(installed[n], rank0[n]) and torch.equal(pruning.masks[n], rank0[n]) for n in rank0)
    assert logged["icp/sparsity"] == pytest.approx(pruning.sparsity())


# ----------------------------------------------------------------------------------------------------------
# Resume


def _run(tmp_path, max_epochs, ckpt_path=None):
    pl.seed_everything(0)
    attribution = CausalAttributionCallback(interventions=("mask", "scale"), **ATTR)
    pruning = CausalPruningCallback(amount=0.1, verbose=False)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    module = TinyClassifier()
    tr = trainer(
        tmp_path, [attribution, pruning, checkpoint], max_epochs=max_epochs, limit_train_batches=2,
        enable_checkpointing=True,
    )  # fmt: skip
    tr.fit(module, ckpt_path=ckpt_path)
    return module, attribution, pruning


def test_resume_from_checkpoint_gives_identical_masks_scores_and_weights(tmp_path):
    straight, attr_a, prune_a = _run(tmp_path / "a", 4)
    _run(tmp_path / "b", 2)
    last = tmp_path / "b" / "ckpt" / "last.ckpt"
    state = torch.load(last, weights_only=False)
    # the masks travel in the weights (pruned columns are zero) and the callback's state, not as extra keys
    assert not any(k.endswith("icp_mask") for k in state["state_dict"])
    resumed, attr_b, prune_b = _run(tmp_path / "b", 4, ckpt_path=str(last))

    assert prune_a.round == prune_b.round == 4 and attr_a.round == attr_b.round == 4
    assert set(prune_a.masks) == set(prune_b.masks)
    for name in prune_a.masks:
        assert torch.equal(prune_a.masks[name], prune_b.masks[name])
        assert torch.equal(attr_a.scores.sums[name], attr_b.scores.sums[name])
    a, b = straight.state_dict(), resumed.state_dict()
    assert set(a) == set(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    for name, mask in prune_b.masks.items():
        w = effective_weight(attr_b.sites[name].module)
        assert w[:, mask == 0].abs().max() == 0


def test_select_fn_replaces_the_selection_and_gets_the_round_settings(tmp_path):
    calls = []

    def protect_attention(scores, masks, **kwargs):
        calls.append(kwargs)
        ffn = {n: m for n, m in masks.items() if "attention" not in n}
        new = select_masks({n: scores[n] for n in ffn}, ffn, **kwargs)
        return {**{n: m.clone() for n, m in masks.items()}, **new}

    attribution = CausalAttributionCallback(**ATTR)
    pruning = CausalPruningCallback(amount=3, select_fn=protect_attention, verbose=False)
    module = TinyClassifier()
    trainer(tmp_path, [attribution, pruning], max_epochs=1, limit_train_batches=1).fit(module)
    assert calls == [dict(threshold=None, amount=3, scope="global", min_keep=1, mode="hard", factor_fn=None)]
    masks = get_masks(module.model)
    assert sum(int((m == 0).sum()) for n, m in masks.items() if "attention" not in n) == 3
    assert all(bool((m == 1).all()) for n, m in masks.items() if "attention" in n)


def test_select_fn_must_return_a_mask_per_site(tmp_path):
    attribution = CausalAttributionCallback(**ATTR)
    pruning = CausalPruningCallback(amount=3, select_fn=lambda scores, masks, **kw: {}, verbose=False)
    with pytest.raises(ValueError, match="select_fn returned no mask for site"):
        trainer(tmp_path, [attribution, pruning], max_epochs=1, limit_train_batches=1).fit(TinyClassifier())
