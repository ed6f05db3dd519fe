"""The module reads the granularity of its scores from their metadata; it never guesses it from their lengths."""

from __future__ import annotations

import pytest
import torch
import transformers

from icp_lightning.core.scores import Scores
from icp_lightning.core.sites import find_sites, model_description
from icp_lightning.module import ICPContrastiveModule


def _module() -> ICPContrastiveModule:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=4, intermediate_size=24
    )
    return ICPContrastiveModule(transformers.BertForSequenceClassification(cfg))


def test_head_scores_with_metadata_give_head_sites():
    module = _module()
    heads = find_sites(module.model, granularity="head")
    meta = {"granularity": "head", **model_description(module.model)}
    scores = Scores({n: torch.arange(4.0) for n in heads}, {n: torch.ones(4) for n in heads}, meta)
    module.set_scores(scores)
    assert module.icp_sites is not None and module.icp_sites.granularity == "head"
    assert module.icp_sites.names == heads.names


def test_head_length_scores_without_metadata_are_not_guessed():
    module = _module()
    name = find_sites(module.model, granularity="head").names[0]
    with pytest.raises(ValueError, match="has 4 scores but 16 features .*pass sites="):
        module.set_scores({name: torch.arange(4.0)})
    module.set_scores({name: torch.arange(4.0)}, find_sites(module.model, granularity="head"))  # told: fine
    assert module.icp_sites is not None and module.icp_sites.granularity == "head"


def test_scores_of_another_model_type_are_refused():
    module = _module()
    name = find_sites(module.model).names[0]
    scores = Scores(
        {name: torch.zeros(16)}, {name: torch.ones(16)}, {"granularity": "neuron", "model_type": "gpt2"}
    )
    with pytest.raises(ValueError, match="scores were computed for a different model: model_type 'gpt2'"):
        module.set_scores(scores)
