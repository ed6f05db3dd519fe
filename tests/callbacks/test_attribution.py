"""CausalAttributionCallback in a real single-process Trainer: arguments, scores against a direct engine call,
sanity checking, schedule, files, TensorBoard events, state, masked models, a plain LightningModule."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader

import icp_lightning.callbacks._distributed as distributed_module
import icp_lightning.callbacks.attribution as attribution_module
from icp_lightning.callbacks import CausalAttributionCallback, CausalPruningCallback
from icp_lightning.core.effects import Effects, causal_effects
from icp_lightning.core.masks import apply_masks, get_masks, make_permanent, masks_folded
from icp_lightning.core.scores import Scores, spuriousness
from icp_lightning.core.sites import find_sites
from tests.callbacks._helpers import (
    DictDataset,
    TinyClassifier,
    loader,
    one_thread,  # noqa: F401  (autouse fixture)
    tiny_bert,
    trainer,
)
from tests.conftest import tiny_batch

FAST = dict(progress=False, max_batches=2, method="exact")


# ----------------------------------------------------------------------------------------------------------
# Arguments


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"granularity": "layer"}, r"granularity must be one of \('neuron', 'head'\)"),
        ({"interventions": ("mask", "zero")}, r"interventions must be a non-empty list of \('mask', 'scale'"),
        ({"interventions": ()}, "interventions must be a non-empty list"),
        ({"interventions": ("mask", "mask")}, "duplicates"),
        ({"metrics": ("label_logprob", "f1")}, r"unknown metric 'f1': metrics must be among \['accuracy'"),
        ({"metrics": ()}, "metrics must be a non-empty list"),
        ({"reduction": "mean"}, r"reduction must be one of \('signed', 'abs'\)"),
        ({"method": "fast"}, r"method must be one of \('exact', 'gradient', 'screened'\)"),
        ({"on": "test_epoch_end"}, r"on must be one of \('validation_epoch_end', 'train_epoch_end'\)"),
        ({"every_n_epochs": 0}, "every_n_epochs must be an int >= 1"),
        ({"max_batches": 0}, r"max_batches must be an int >= 1 or None"),
        ({"max_rounds": 0}, r"max_rounds must be an int >= 1 or None"),
        ({"top_k_log": -1}, "top_k_log must be an int >= 0"),
        ({"alpha": float("nan")}, "alpha .* must be a finite number"),
        ({"model_attr": ""}, "model_attr must be a dotted attribute path"),
        ({"intervention_weights": {"scale": 1.0}}, r"missing \['mask'\], unknown \['scale'\]"),
        ({"metric_weights": {"label_logprob": "x"}}, "must be a finite number"),
        ({"attribution_data": {}}, "attribution_data must be a non-empty mapping"),
        ({"attribution_data": {"id": 3}}, r"attribution_data\['id'\] must be a DataLoader"),
        (
            {"attribution_data": {"id": "val"}, "dataset_weights": {"id": 1.0, "ood": -1.0}},
            r"dataset_weights must give one weight per dataset \['id'\]: missing \[\], unknown \['ood'\]",
        ),
    ],
)
def test_bad_arguments_raise_value_errors_that_say_what_is_allowed(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CausalAttributionCallback(**kwargs)


def test_unknown_model_attr_lists_the_children(tmp_path):
    cb = CausalAttributionCallback(model_attr="encoder", **FAST)
    with pytest.raises(ValueError, match=r"has no attribute 'encoder'.*\['model'\]"):
        trainer(tmp_path, [cb]).fit(TinyClassifier())


def test_dataset_weights_must_name_the_validation_sets(tmp_path):
    cb = CausalAttributionCallback(dataset_weights={"in": 1.0, "out": -1.0}, **FAST)
    with pytest.raises(ValueError, match=r"missing \['id', 'ood'\], unknown \['in', 'out'\]"):
        trainer(tmp_path, [cb]).fit(TinyClassifier())


# ----------------------------------------------------------------------------------------------------------
# Scores


def test_scores_equal_a_direct_causal_effects_and_spuriousness_call(tmp_path):
    weights = {"id": 1.0, "ood": -1.0}
    interventions = ("mask", "scale", "swap", "mean")
    iv_weights = {"mask": 1.0, "scale": 0.5, "swap": 2.0, "mean": -1.0}
    cb = CausalAttributionCallback(
        interventions=interventions,
        alpha=0.25,
        metrics=("label_logprob", "margin"),
        intervention_weights=iv_weights,
        dataset_weights=weights,
        **FAST,
    )
    module = TinyClassifier(n_val=12)  # 3 batches per set: max_batches=2 keeps the first 2
    trainer(tmp_path, [cb], max_epochs=1).fit(module)  # the round ran at the end: weights unchanged since

    sites = find_sites(module.model)
    effects = {}
    for ds, dl in module.val_dataloader().items():
        batches = list(dl)[:2]
        for iv in interventions:
            for metric in ("label_logprob", "margin"):
                effects[(iv, metric, ds)] = causal_effects(
                    module.model, batches, sites, iv, metric, alpha=0.25, progress=False
                )
    expected = spuriousness(effects, iv_weights, None, weights, "signed")
    assert cb.round == 1 and cb.epoch == 0 and list(cb.scores) == sites.names
    assert set(cb.effects) == set(effects)
    for key, eff in effects.items():
        for name in sites:
            torch.testing.assert_close(cb.effects[key].sums[name], eff.sums[name], rtol=1e-12, atol=1e-12)
            assert torch.equal(cb.effects[key].counts[name], eff.counts[name])
            assert int(eff.counts[name][0]) == 8  # two batches of four
    for name in sites:
        torch.testing.assert_close(cb.scores[name], expected[name], rtol=1e-6, atol=1e-9)


def test_nothing_runs_during_sanity_checking_and_every_n_epochs_is_respected(tmp_path, monkeypatch):
    calls = []
    real = attribution_module.causal_effects

    def spy(*args, **kwargs):
        calls.append((tr.sanity_checking, tr.current_epoch))
        return real(*args, **kwargs)

    monkeypatch.setattr(attribution_module, "causal_effects", spy)
    cb = CausalAttributionCallback(every_n_epochs=2, **{**FAST, "max_batches": 1})
    tr = trainer(tmp_path, [cb], max_epochs=3, num_sanity_val_steps=2, limit_train_batches=1)
    tr.fit(TinyClassifier())
    assert calls == [(False, 1), (False, 1)]  # epoch index 1 only, two data sets, never in sanity checking
    assert cb.round == 1 and cb.epoch == 1

    calls.clear()
    cb = CausalAttributionCallback(max_rounds=2, **{**FAST, "max_batches": 1})
    tr = trainer(tmp_path, [cb], max_epochs=4, limit_train_batches=1)
    tr.fit(TinyClassifier())
    assert cb.round == 2 and cb.epoch == 1 and [e for _, e in calls] == [0, 0, 1, 1]


def test_on_train_epoch_end_and_names_from_val_set_names(tmp_path):
    class ListVal(TinyClassifier):
        val_set_names = ("clean", "shifted")

        def val_dataloader(self):
            return [loader(8, 4, seed=1), loader(8, 4, seed=2)]

    cb = CausalAttributionCallback(
        on="train_epoch_end",
        dataset_weights={"clean": 1.0, "shifted": -1.0},
        attribution_data=None,
        **{**FAST, "max_batches": 1},
    )
    tr = trainer(tmp_path, [cb], max_epochs=2, limit_train_batches=1, limit_val_batches=0)
    tr.fit(ListVal())  # no validation at all: the train-epoch-end hook still runs
    assert cb.round == 2 and {k[2] for k in cb.effects} == {"clean", "shifted"}


def test_attribution_data_by_loader_and_by_validation_name(tmp_path):
    extra = loader(4, 4, seed=7)
    cb = CausalAttributionCallback(
        attribution_data={"extra": extra, "ood": "ood"}, **{**FAST, "max_batches": 1}
    )
    module = TinyClassifier()
    trainer(tmp_path, [cb], limit_train_batches=1).fit(module)
    assert {k[2] for k in cb.effects} == {"extra", "ood"}
    sites = find_sites(module.model)
    direct = causal_effects(module.model, [next(iter(extra))], sites, progress=False)
    for name in sites:
        torch.testing.assert_close(cb.effects[("mask", "label_logprob", "extra")][name], direct[name])

    bad = CausalAttributionCallback(attribution_data={"x": "test"}, **FAST)
    with pytest.raises(
        ValueError, match=r"validation dataloader 'test', but the validation dataloaders are \['id', 'ood'\]"
    ):
        trainer(tmp_path, [bad], limit_train_batches=1).fit(TinyClassifier())


# ----------------------------------------------------------------------------------------------------------
# Files, TensorBoard, state


def test_files_tensorboard_events_and_state_dict_round_trip(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(str(tmp_path), name="tb")
    cb = CausalAttributionCallback(top_k_log=5, **{**FAST, "max_batches": 1})
    trainer(tmp_path, [cb], max_epochs=2, limit_train_batches=1, logger=logger).fit(TinyClassifier())

    log_dir = logger.log_dir
    for epoch in (0, 1):
        assert (tmp_path / "tb" / "version_0" / f"scores_epoch{epoch}.pt").exists()
    saved = Scores.load(f"{log_dir}/scores_epoch1.pt")
    for name in cb.scores:
        assert torch.equal(saved.sums[name], cb.scores.sums[name])
    summary = json.loads(open(f"{log_dir}/scores_epoch1.json").read())
    assert len(summary["top"]) == 5 and set(summary["sites"]) == set(cb.scores)
    assert summary["meta"]["epoch"] == 1 and summary["meta"]["round"] == 2

    events = EventAccumulator(log_dir, size_guidance={"histograms": 0, "images": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    assert {f"icp/scores/{n}" for n in cb.scores} <= set(tags["histograms"])
    assert "icp/score_heatmap" in tags["images"]
    assert any(t.startswith("icp/top_features") for t in tags["tensors"])
    assert len(events.Histograms(f"icp/scores/{next(iter(cb.scores))}")) == 2  # one per round

    state = cb.state_dict()
    torch.save(state, tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)  # plain types only
    fresh = CausalAttributionCallback(top_k_log=5, **{**FAST, "max_batches": 1})
    fresh.load_state_dict(state)
    assert fresh.round == 2 and fresh.epoch == 1 and set(fresh.effects) == set(cb.effects)
    for name in cb.scores:
        assert torch.equal(fresh.scores[name], cb.scores[name])
    for key in cb.effects:
        assert isinstance(fresh.effects[key], Effects)
        assert torch.equal(fresh.effects[key].sums[name], cb.effects[key].sums[name])
    assert fresh.state_key == cb.state_key
    other = CausalAttributionCallback(dataset_weights={"id": 1.0, "ood": -1.0})
    assert other.state_key != cb.state_key  # two instances coexist in one checkpoint


def test_save_dir_and_set_scores_on_the_module(tmp_path):
    class WithSetScores(TinyClassifier):
        received: list = []

        def set_scores(self, scores, sites):
            self.received.append((scores, sites))

    cb = CausalAttributionCallback(save_dir=tmp_path / "scores", **{**FAST, "max_batches": 1})
    module = WithSetScores()
    trainer(tmp_path, [cb], max_epochs=2, limit_train_batches=1).fit(module)
    assert sorted(p.name for p in (tmp_path / "scores").iterdir()) == [
        "scores_epoch0.json", "scores_epoch0.pt", "scores_epoch1.json", "scores_epoch1.pt",
    ]  # fmt: skip
    assert len(module.received) == 2 and module.received[-1][0] is cb.scores
    assert module.received[-1][1] is cb.sites


# ----------------------------------------------------------------------------------------------------------
# Masked models: effects of the model the forward computes


def test_fold_context_restores_weights_and_masks_bit_for_bit():
    model = tiny_bert().eval()
    sites = find_sites(model)
    gen = torch.Generator().manual_seed(0)
    masks = {n: (torch.rand(s.n_features, generator=gen) > 0.3).float() * 0.7 for n, s in sites.items()}
    apply_masks(model, sites, masks)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch = tiny_batch("bert", n=3)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    with masks_folded(model) as folded:
        assert folded and get_masks(model) == {}
        with torch.no_grad():
            inside = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        torch.testing.assert_close(inside, logits)
    after = model.state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_attribution_after_pruning_scores_the_effective_model(tmp_path):
    """Round 2 runs on a soft-masked model: its effects equal a direct call on a copy with the masks folded,
    and pruned features... here reweighted ones... are scored through their factor."""
    seen = []

    def reference(trainer_, pl_module, cb):
        folded = copy.deepcopy(pl_module.model)
        make_permanent(folded)
        sites = find_sites(folded)
        batches = list(pl_module.val_dataloader()["id"])[:1]
        seen.append(
            (get_masks(pl_module.model), causal_effects(folded, batches, sites, progress=False), cb.effects)
        )

    cb = CausalAttributionCallback(**{**FAST, "max_batches": 1})
    cb.add_listener(reference)  # before the pruning callback's listener: sees the masks used for this round
    pruning = CausalPruningCallback(amount=0.3, mode="soft", verbose=False)
    trainer(tmp_path, [cb, pruning], max_epochs=2, limit_train_batches=1).fit(TinyClassifier())
    assert len(seen) == 2
    masks, direct, effects = seen[1]
    assert masks and any(bool(((m > 0) & (m < 1)).any()) for m in masks.values())
    for name in direct:
        torch.testing.assert_close(
            effects[("mask", "label_logprob", "id")][name], direct[name], rtol=1e-5, atol=1e-6
        )


def test_hard_pruned_features_have_zero_effect_in_later_rounds(tmp_path):
    seen = []
    cb = CausalAttributionCallback(interventions=("mask", "scale"), **{**FAST, "max_batches": 1})
    cb.add_listener(lambda tr, module, c: seen.append((get_masks(module.model), dict(c.effects))))
    pruning = CausalPruningCallback(amount=0.2, verbose=False)
    trainer(tmp_path, [cb, pruning], max_epochs=2, limit_train_batches=1).fit(TinyClassifier())
    masks, effects = seen[1]  # round 2 ran with round 1's masks
    assert sum(int((m == 0).sum()) for m in masks.values()) == round(0.2 * 138)
    for eff in effects.values():
        for name, mask in masks.items():
            pruned = eff[name][mask == 0]
            alive = eff[name][mask > 0]
            assert pruned.abs().max() < 1e-5  # the feature no longer reaches the output
            assert alive.abs().max() > 1e-3


# ----------------------------------------------------------------------------------------------------------
# Drop-in: a plain LightningModule written here, not ours


class PlainClassifier(pl.LightningModule):
    """Minimal: a tiny BERT as self.model, CE loss, no-op validation, one val DataLoader of dict batches."""

    def __init__(self) -> None:
        super().__init__()
        self.model = tiny_bert()

    def training_step(self, batch, batch_idx):
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return F.cross_entropy(logits, batch["labels"])

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(DictDataset(tiny_batch("bert", n=8, seed=3)), batch_size=4)

    def val_dataloader(self):
        return DataLoader(DictDataset(tiny_batch("bert", n=8, seed=4)), batch_size=4)


def test_drop_in_around_a_plain_lightning_module(tmp_path):
    cb = CausalAttributionCallback(
        target_modules=["output.dense"], exclude_modules=["attention.output.dense"], **FAST
    )
    pruning = CausalPruningCallback(threshold=0.0, verbose=False)
    module = PlainClassifier()
    tr = pl.Trainer(
        accelerator="cpu", max_epochs=1, callbacks=[cb, pruning], enable_progress_bar=False,
        enable_model_summary=False, logger=False, enable_checkpointing=False, default_root_dir=str(tmp_path),
    )  # fmt: skip
    tr.fit(module)
    assert list(cb.scores) == ["bert.encoder.layer.0.output.dense", "bert.encoder.layer.1.output.dense"]
    assert set(cb.effects) == {("mask", "label_logprob", "val")}
    masks = get_masks(module.model)
    assert set(masks) == set(cb.scores) == set(pruning.masks)
    for name, mask in masks.items():
        assert torch.equal(mask, pruning.masks[name])
        expected = (cb.scores[name] <= 0).float()  # tau = 0: positive scores are pruned
        if not bool(expected.any()):  # min_keep=1: the lowest score survives
            expected[torch.argmin(cb.scores[name])] = 1.0
        assert torch.equal(mask, expected)


def test_fsdp1_strategy_is_accepted_in_setup():
    """FSDPStrategy (FSDP1) used to be refused in setup; now the sites resolve as with any strategy. (Real FSDP1
    runs, with Lightning's FSDPStrategy on two CPU processes: ``test_distributed.py``.)"""
    from lightning.pytorch.strategies import FSDPStrategy

    fake = SimpleNamespace(strategy=FSDPStrategy.__new__(FSDPStrategy))
    cb = CausalAttributionCallback(**FAST)
    module = TinyClassifier()
    cb.setup(fake, module, "fit")
    assert cb.sites is not None and cb.sites.names == find_sites(module.model).names


def test_attribution_context_without_fsdp_folds_and_restores():
    """The context the round runs in, on a plain model with a root given (as the callback passes
    ``trainer.strategy.model``): no FSDP1 module, so only masks are folded, then restored."""
    module = TinyClassifier()
    model = module.model.eval()
    sites = find_sites(model)
    apply_masks(model, sites, {n: torch.ones(s.n_features) for n, s in sites.items()})
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with attribution_module._attribution_context(model, module) as replay:
        assert replay == "auto" and get_masks(model) == {}
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert set(get_masks(model)) == set(sites.names)
    assert distributed_module.sharding_root(SimpleNamespace(), module) is module
