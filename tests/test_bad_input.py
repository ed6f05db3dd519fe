"""Scores never run silently empty, and bad input gets an error that names the fix, before long work.

Each case was seen on main before the fix (issue "A pruned model stays pruned on every path out, and every bad
input gets a clear error"): attribution that never ran, NaN scores ranked as the top features, an ``atol``
RuntimeError, an index error naming nothing, a seq2seq metric that failed under one method and passed under
the other, a negative alpha accepted, an error suggesting ``target_modules`` for a model outside ``self.model``.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import transformers
from torch.utils.data import DataLoader

from icp_lightning import CausalAttributionCallback, causal_effects, find_sites
from icp_lightning.core.interventions import Intervention
from tests.callbacks._helpers import DictDataset, TinyClassifier, loader, one_thread, tiny_bert, trainer  # noqa: F401
from tests.conftest import TINY_CONFIGS, tiny_batch

ATTR = dict(method="gradient", max_batches=2, progress=False, granularity="head")


class NoValidation(TinyClassifier):
    """A module with no validation loop at all."""

    validation_step = None  # type: ignore[assignment]
    val_dataloader = None  # type: ignore[assignment]


def test_attribution_without_a_validation_loop_runs_at_train_epoch_end(tmp_path, caplog):
    attribution = CausalAttributionCallback(attribution_data={"id": loader(8, 4, seed=1)}, **ATTR)
    with caplog.at_level("INFO"):
        trainer(tmp_path, [attribution], max_epochs=1, limit_train_batches=2).fit(NoValidation())
    assert attribution.scores is not None and attribution.round == 1
    assert "no validation loop" in caplog.text


def test_every_n_epochs_beyond_max_epochs_fails_at_fit_start(tmp_path):
    attribution = CausalAttributionCallback(every_n_epochs=3, **ATTR)
    with pytest.raises(ValueError, match="every_n_epochs=3 but the fit runs max_epochs=2"):
        trainer(tmp_path, [attribution], max_epochs=2, limit_train_batches=1).fit(TinyClassifier())


def test_a_fit_cut_short_by_max_steps_still_ends_with_scores(tmp_path):
    attribution = CausalAttributionCallback(**ATTR)
    trainer(tmp_path, [attribution], max_epochs=3, max_steps=1, limit_train_batches=2).fit(TinyClassifier())
    assert attribution.scores is not None


def test_empty_attribution_data_set_is_named(tmp_path):
    empty = DataLoader(DictDataset({k: v[:0] for k, v in tiny_batch("bert", n=2).items()}), batch_size=4)
    attribution = CausalAttributionCallback(attribution_data={"id": loader(8, 4, 1), "ood": empty}, **ATTR)
    with pytest.raises(ValueError, match="attribution data set 'ood' is empty"):
        trainer(tmp_path, [attribution], max_epochs=1, limit_train_batches=1).fit(TinyClassifier())


def test_nan_outputs_raise_naming_data_set_and_metric(tmp_path):
    module = TinyClassifier()
    with torch.no_grad():
        module.model.classifier.weight.fill_(float("nan"))
    attribution = CausalAttributionCallback(**ATTR)
    with pytest.raises(ValueError, match=r"data set 'id'.*metric 'label_logprob'.*non-finite"):
        trainer(tmp_path, [attribution], max_epochs=1, limit_train_batches=0).fit(module)


@pytest.mark.parametrize("method", ["exact", "gradient"])
def test_custom_metric_returning_nan_is_a_value_error(method):
    model = tiny_bert().eval()
    sites = find_sites(model, granularity="head")

    def nan_metric(outputs, batch):
        return torch.full((outputs.logits.shape[0],), float("nan"))

    with pytest.raises(ValueError, match="metric 'nan_metric' returned 5 non-finite values"):
        causal_effects(
            model, [tiny_batch("bert", n=5)], sites, metric=nan_metric, method=method, progress=False
        )


@pytest.mark.parametrize("method", ["exact", "gradient"])
def test_nan_input_embeddings_are_a_value_error(method):
    model = tiny_bert().eval()
    with torch.no_grad():
        model.bert.embeddings.word_embeddings.weight[5].fill_(float("nan"))
    batch = tiny_batch("bert", n=4)
    batch["input_ids"][:, 1] = 5
    with pytest.raises(ValueError, match="non-finite"):
        causal_effects(model, [batch], find_sites(model), method=method, progress=False)


@pytest.mark.parametrize("method", ["exact", "gradient"])
def test_labels_outside_num_labels_name_num_labels(method):
    model = tiny_bert().eval()
    batch = tiny_batch("bert", n=4)
    batch["labels"] = torch.tensor([0, 1, 3, 0])
    with pytest.raises(ValueError, match=r"num_labels=2\); got labels \[3\]"):
        causal_effects(model, [batch], find_sites(model), method=method, progress=False)


def _t5_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "input_ids": torch.randint(3, 99, (3, 6), generator=g),
        "attention_mask": torch.ones(3, 6, dtype=torch.long),
        "labels": torch.randint(3, 99, (3, 4), generator=g),
    }


@pytest.mark.parametrize("metric", ["label_logprob", "neg_loss"])
@pytest.mark.parametrize("method", ["exact", "gradient"])
def test_seq2seq_with_a_classifier_metric_names_target_logprob_under_both_methods(method, metric):
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(TINY_CONFIGS["t5"]()).eval()
    sites = find_sites(model)
    with pytest.raises(ValueError, match="use metric='target_logprob'"):
        causal_effects(model, [_t5_batch()], sites, metric=metric, method=method, progress=False)
    effects = causal_effects(
        model, [_t5_batch()], sites, metric="target_logprob", method=method, progress=False
    )
    assert all(torch.isfinite(effects[n]).all() for n in sites)


def test_alpha_outside_a_scale_is_refused_everywhere():
    for alpha in (-3, -0.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="alpha .* must be a finite number >= 0"):
            CausalAttributionCallback(alpha=alpha)
        with pytest.raises(ValueError, match="alpha"):
            Intervention("scale", alpha=alpha)
    model = tiny_bert().eval()
    with pytest.raises(ValueError, match="alpha"):
        causal_effects(model, [tiny_batch("bert", n=2)], find_sites(model), "scale", alpha=-3, progress=False)


class ElsewhereModule(pl.LightningModule):
    """The HF model under `net`, not `model`."""

    def __init__(self) -> None:
        super().__init__()
        self.net = tiny_bert()

    def training_step(self, batch, batch_idx):
        return self.net(**batch).loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return loader(8, 4, seed=0)


def test_model_outside_self_model_suggests_model_attr(tmp_path):
    attribution = CausalAttributionCallback(attribution_data={"id": loader(8, 4, 1)}, **ATTR)
    with pytest.raises(ValueError, match=r"model_attr='net'"):
        trainer(tmp_path, [attribution], max_epochs=1, limit_train_batches=1).fit(ElsewhereModule())


def test_training_with_labels_outside_num_labels_names_num_labels():
    from icp_lightning import ICPContrastiveModule

    module = ICPContrastiveModule(tiny_bert(), num_labels=2)
    batch = tiny_batch("bert", n=4)
    batch["labels"] = torch.tensor([0, 1, 3, 0])
    with pytest.raises(ValueError, match=r"num_labels=2\); got labels \[3\]"):
        module.task_loss(module.logits(batch), batch)


def test_a_non_differentiable_metric_under_gradient_names_the_fix():
    model = tiny_bert().eval()
    with pytest.raises(ValueError, match="'accuracy' is not differentiable .* method='exact'"):
        causal_effects(
            model, [tiny_batch("bert", n=4)], find_sites(model), metric="accuracy", method="gradient"
        )
    exact = causal_effects(
        model, [tiny_batch("bert", n=4)], find_sites(model), metric="accuracy", method="exact"
    )
    assert all(torch.isfinite(exact[n]).all() for n in exact)


def test_exact_effects_of_a_feature_subset_leave_other_sites_uncomputed_not_an_error():
    model = tiny_bert().eval()
    sites = find_sites(model)
    name = sites.names[0]
    effects = causal_effects(model, [tiny_batch("bert", n=3)], sites, features={name: [0, 2]}, progress=False)
    assert torch.isfinite(effects[name][[0, 2]]).all()
    assert torch.isnan(effects[sites.names[1]]).all()  # not asked for: NaN, and no error
