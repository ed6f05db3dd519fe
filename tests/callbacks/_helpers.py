"""Shared pieces of the callback tests: a tiny BERT classifier in a LightningModule, deterministic data.

Importable by the multi-process worker (``python -m tests.callbacks._dist_worker``), so nothing here runs at
import time.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from collections.abc import Mapping  # noqa: E402
from typing import Any  # noqa: E402

import lightning.pytorch as pl  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from tests.conftest import TINY_CONFIGS, tiny_batch  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    """Run a test on one intra-op thread (restored after): on a small shared machine, two threads fighting
    other processes for two cores make these tiny models about ten times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_bert(seed: int = 0) -> transformers.BertForSequenceClassification:
    """The conftest tiny BERT without dropout (training is deterministic), in train mode."""
    cfg = TINY_CONFIGS["bert"]()
    cfg.num_labels = 2
    cfg.hidden_dropout_prob = 0.0
    cfg.attention_probs_dropout_prob = 0.0
    torch.manual_seed(seed)
    return transformers.BertForSequenceClassification(cfg).train()


class DictDataset(Dataset):
    """Rows of a dict of tensors."""

    def __init__(self, batch: Mapping[str, torch.Tensor]) -> None:
        self.batch = dict(batch)

    def __len__(self) -> int:
        return int(next(iter(self.batch.values())).shape[0])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.batch.items()}


def loader(n: int, batch_size: int, seed: int) -> DataLoader:
    """A fixed, unshuffled loader of ``n`` tiny BERT examples."""
    return DataLoader(DictDataset(tiny_batch("bert", n=n, seed=seed)), batch_size=batch_size, shuffle=False)


class TinyClassifier(pl.LightningModule):
    """A tiny BERT classifier as ``self.model``; validation sets ``id`` and ``ood`` (a dict of loaders)."""

    def __init__(
        self, lr: float = 0.05, n_train: int = 16, n_val: int = 10, val_batch: int = 4, seed: int = 0
    ) -> None:
        super().__init__()
        self.model = tiny_bert(seed)
        self.lr, self.n_train, self.n_val, self.val_batch = lr, n_train, n_val, val_batch

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.model(**batch).loss

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        pass

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)

    def train_dataloader(self) -> DataLoader:
        return loader(self.n_train, 4, seed=10)

    def val_dataloader(self) -> dict[str, DataLoader]:
        return {
            "id": loader(self.n_val, self.val_batch, seed=1),
            "ood": loader(self.n_val, self.val_batch, seed=2),
        }


def trainer(tmp_path: Any, callbacks: list, max_epochs: int = 1, **kwargs: Any) -> pl.Trainer:
    """A quiet single-process CPU trainer."""
    options: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=max_epochs,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        default_root_dir=str(tmp_path),
    )
    options.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **options)
