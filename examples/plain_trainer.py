"""The two callbacks dropped into a plain Lightning Trainer around your own LightningModule.

Nothing here is icp_lightning's module or data module: any LightningModule that keeps its Hugging Face model
in ``self.model`` works (else pass ``model_attr=``). A tiny BERT built from a config keeps it fast.

    .venv/bin/python examples/plain_trainer.py
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import transformers
from torch.utils.data import DataLoader

from icp_lightning.callbacks import CausalAttributionCallback, CausalPruningCallback


class MyClassifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=4, intermediate_size=64, num_labels=2)  # fmt: skip
        self.model = transformers.BertForSequenceClassification(cfg)

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        self.log("val_loss", self.model(**batch).loss, add_dataloader_idx=True)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def loader(seed: int, shortcut: bool) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 100, (64, 12), generator=g)
    labels = torch.randint(0, 2, (64,), generator=g)
    if shortcut:  # token 3 marks the positive class
        ids[labels == 1, 1] = 3
    rows = [{"input_ids": i, "attention_mask": torch.ones_like(i), "labels": y} for i, y in zip(ids, labels)]
    return DataLoader(rows, batch_size=16)


attribution = CausalAttributionCallback(
    granularity="neuron",
    attribution_data={"id": loader(1, True), "ood": loader(2, False)},
    dataset_weights={"id": 1.0, "ood": -1.0},
    max_batches=2,
    progress=False,
)
pruning = CausalPruningCallback(amount=0.05, scope="global")
trainer = pl.Trainer(max_epochs=3, callbacks=[attribution, pruning], logger=False, enable_checkpointing=False,
                     default_root_dir="runs/examples",
                     enable_progress_bar=False, accelerator="cpu")  # fmt: skip
trainer.fit(MyClassifier(), train_dataloaders=loader(0, True), val_dataloaders=loader(3, True))
print("top features:", attribution.scores.top_k(5))
print("pruned per site:", {k: int((v == 0).sum()) for k, v in pruning.masks.items()})
