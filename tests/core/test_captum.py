"""Exact mask effects equal Captum's LayerFeatureAblation on the same layer and inputs."""

from __future__ import annotations

import pytest
import torch

from icp_lightning import causal_effects, find_sites
from icp_lightning.core.effect_metrics import label_logprob
from tests.conftest import tiny_batch, tiny_model

captum_attr = pytest.importorskip("captum.attr")


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize("granularity", ["neuron", "head"])
def test_exact_mask_equals_captum_layer_feature_ablation(arch, granularity):
    model = tiny_model(arch)
    batch = tiny_batch(arch, n=6, seed=11)
    sites = find_sites(model, granularity=granularity)
    effects = causal_effects(model, [batch], sites, "mask", progress=False)
    for name, site in sites.items():

        def forward(input_ids, attention_mask, labels):
            out = model(input_ids=input_ids, attention_mask=attention_mask)
            return label_logprob(out, {"labels": labels})

        ablation = captum_attr.LayerFeatureAblation(forward, site.module)
        # one group per feature: column c belongs to feature c // group_size
        layer_mask = (torch.arange(site.in_features) // site.group_size).view(1, 1, -1)
        with torch.no_grad():
            attr = ablation.attribute(
                batch["input_ids"],
                additional_forward_args=(batch["attention_mask"], batch["labels"]),
                layer_baselines=0.0,
                layer_mask=layer_mask,
                attribute_to_layer_input=True,
                perturbations_per_eval=4,
            )
        # Captum's attribution is f(x) - f(x with the group ablated), spread over the group's elements
        captum_ce = attr[:, 0, :].reshape(-1, site.n_features, site.group_size)[:, :, 0].mean(0)
        torch.testing.assert_close(effects[name], captum_ce, atol=1e-5, rtol=0)
