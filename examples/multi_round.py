"""Iterative multi-round ICP: attribute -> prune -> fine-tune, three rounds, masks cumulative.

The pruning amount is a callable of the round number; every_n_epochs=1 makes every epoch a round.

    .venv/bin/python examples/multi_round.py
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import transformers
from torch.utils.data import DataLoader

from icp_lightning import ICPContrastiveModule
from icp_lightning.callbacks import CausalAttributionCallback, CausalPruningCallback

pl.seed_everything(0)
cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=64, num_labels=2)  # fmt: skip
module = ICPContrastiveModule(transformers.BertForSequenceClassification(cfg), counterfactual="intervention",
                              top_k_c=8, lr=1e-3)  # fmt: skip
g = torch.Generator().manual_seed(0)
ids = torch.randint(5, 100, (96, 12), generator=g)
labels = torch.randint(0, 2, (96,), generator=g)
rows = [{"input_ids": i, "attention_mask": torch.ones_like(i), "labels": y} for i, y in zip(ids, labels)]
train, val = DataLoader(rows[:64], batch_size=16), DataLoader(rows[64:], batch_size=16)

attribution = CausalAttributionCallback(method="gradient", every_n_epochs=1, progress=False)
pruning = CausalPruningCallback(amount=lambda round_: [0.02, 0.04, 0.08][min(round_, 2)], scope="global")
trainer = pl.Trainer(max_epochs=3, callbacks=[attribution, pruning], logger=False, enable_checkpointing=False,
                     default_root_dir="runs/examples",
                     enable_progress_bar=False, accelerator="cpu")  # fmt: skip
trainer.fit(module, train, val)
pruned = sum(int((m == 0).sum()) for m in pruning.masks.values())
total = sum(m.numel() for m in pruning.masks.values())
print(f"after {attribution.round} rounds: {pruned}/{total} features pruned ({100 * pruned / total:.1f}%)")
