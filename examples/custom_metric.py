"""A custom metric m(outputs, batch): per example, or over the whole batch (a fairness gap).

.venv/bin/python examples/custom_metric.py
"""

from __future__ import annotations

import torch
import transformers

from icp_lightning import causal_effects, find_sites
from icp_lightning.core.effect_metrics import BatchMetric

torch.manual_seed(0)
cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=64, num_labels=2)  # fmt: skip
model = transformers.BertForSequenceClassification(cfg).eval()
batch = {"input_ids": torch.randint(5, 100, (16, 10)), "labels": torch.randint(0, 2, (16,)),
         "group": torch.arange(16) % 2}  # fmt: skip
sites = find_sites(model, target_modules=[r"encoder.layer.1.output.dense"])


def positive_logit(outputs, batch):
    """Per example: the positive class's logit."""
    return outputs.logits[:, 1]


def parity_gap(outputs, batch):
    """Over the batch: P(yhat = 1 | group 0) - P(yhat = 1 | group 1), with soft predictions."""
    p = outputs.logits.softmax(-1)[:, 1]
    return p[batch["group"] == 0].mean() - p[batch["group"] == 1].mean()


per_example = causal_effects(model, [batch], sites, metric=positive_logit, progress=False)
gap = causal_effects(model, [batch], sites, metric=BatchMetric(parity_gap), progress=False)
print("features moving the positive logit most:", per_example.top_k(3, by="abs"))
print("features carrying the parity gap most:", gap.top_k(3, by="abs"))
