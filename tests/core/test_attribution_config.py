"""AttributionConfig (one checked configuration) and core.attribute (the single-process loop)."""

from __future__ import annotations

import pytest
import torch

from icp_lightning import CausalAttributionCallback, causal_effects, find_sites, spuriousness
from icp_lightning.core.attribution import AttributionConfig, attribute
from tests.callbacks._helpers import TinyClassifier, loader, one_thread, tiny_bert, trainer  # noqa: F401


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"granularity": "layer"}, "granularity must be one of"),
        ({"interventions": ()}, "interventions must be a non-empty list"),
        ({"interventions": ("mask", "mask")}, "duplicates"),
        ({"alpha": -1.0}, "alpha"),
        ({"metrics": ("nope",)}, "unknown metric 'nope'"),
        ({"reduction": "mean"}, "reduction must be one of"),
        ({"method": "fast"}, "method must be one of"),
        ({"partner": "random"}, "partner must be one of"),
        ({"max_batches": 0}, "max_batches must be an int >= 1"),
        ({"metric_weights": {"accuracy": 1.0}}, "metric_weights must give one weight per metric"),
        ({"dataset_weights": {"id": float("nan")}}, "must be a finite number"),
    ],
)
def test_config_refuses_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AttributionConfig(**kwargs)


def test_attribute_equals_effects_then_spuriousness_and_checks_data_sets_first():
    model = tiny_bert().eval()
    cfg = AttributionConfig(
        granularity="head", interventions=("mask", "scale"), dataset_weights={"id": 1.0, "ood": -1.0},
        max_batches=2,
    )  # fmt: skip
    data = {"id": loader(8, 4, seed=1), "ood": loader(8, 4, seed=2)}
    scores, effects = attribute(model, data, cfg)
    sites = find_sites(model, granularity="head")
    ref = {
        (iv, "label_logprob", ds): causal_effects(model, list(data[ds])[:2], sites, iv, method="gradient", progress=False)
        for ds in data
        for iv in ("mask", "scale")
    }  # fmt: skip
    expected = spuriousness(ref, dataset_weights={"id": 1.0, "ood": -1.0})
    for name in sites:
        torch.testing.assert_close(scores[name], expected[name], atol=1e-7, rtol=0)
    assert scores.meta["config"]["interventions"] == ["mask", "scale"]
    with pytest.raises(ValueError, match="missing \\[\\], unknown \\['ood'\\]"):
        attribute(model, {"id": data["id"]}, cfg)  # before computing anything


def test_callback_scores_equal_core_attribute(tmp_path):
    torch.manual_seed(0)
    data = {"id": loader(8, 4, seed=1), "ood": loader(8, 4, seed=2)}
    cb = CausalAttributionCallback(
        granularity="head", attribution_data=data, dataset_weights={"id": 1.0, "ood": -1.0}, max_batches=2,
        progress=False, on="train_epoch_end",
    )  # fmt: skip
    module = TinyClassifier()
    trainer(tmp_path, [cb], max_epochs=1, limit_train_batches=0, limit_val_batches=0).fit(module)
    scores, _ = attribute(module.model, data, cb.config)
    for name in scores:
        torch.testing.assert_close(cb.scores[name], scores[name], atol=1e-7, rtol=0)
