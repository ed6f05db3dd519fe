"""Per-set evaluation of a LightningModule: :class:`EvalSetsModule` names each validation / test dataloader,
updates torchmetrics' reliability metrics (and the counterfactual flip rate when batches carry ``cf_*``
inputs) per set, and logs ``{stage}/{set}/{metric}`` at epoch end.

:class:`~icp_lightning.module.ICPContrastiveModule` inherits it; the subclass provides ``task``,
``eval_sets``, ``logits(batch)``, ``task_loss(logits, batch)`` and ``_answer_mask(batch)`` and calls
:meth:`EvalSetsModule._init_eval_metrics` in its ``__init__``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import nn
from typing_extensions import override

from icp_lightning.core.interventions import CF_PREFIX, counterfactual_batch
from icp_lightning.metrics import CounterfactualFlipRate, ReliabilityMetrics

__all__ = ["EvalSetsModule"]

_GROUP_KEYS = ("group", "groups")


class EvalSetsModule(pl.LightningModule):
    """Validation and test steps over named evaluation sets, with per-set reliability metrics."""

    task: str
    eval_sets: list[str]

    def logits(self, batch: Mapping[str, Any]) -> torch.Tensor:  # pragma: no cover - provided by subclasses
        raise NotImplementedError

    def task_loss(self, logits: torch.Tensor, batch: Mapping[str, Any]) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def _answer_mask(self, batch: Mapping[str, Any]) -> torch.Tensor | None:  # pragma: no cover
        raise NotImplementedError

    def _init_eval_metrics(self, num_classes: int, num_groups: int | None) -> None:
        """One :class:`ReliabilityMetrics` and one flip rate per evaluation set and stage."""
        self._seen: dict[str, set[str]] = {"val": set(), "test": set()}
        self.val_metrics = nn.ModuleDict(
            {name: ReliabilityMetrics(num_classes, num_groups=num_groups) for name in self.eval_sets}
        )
        self.test_metrics = nn.ModuleDict(
            {name: ReliabilityMetrics(num_classes, num_groups=num_groups) for name in self.eval_sets}
        )
        self.val_flip = nn.ModuleDict({name: CounterfactualFlipRate() for name in self.eval_sets})
        self.test_flip = nn.ModuleDict({name: CounterfactualFlipRate() for name in self.eval_sets})

    @override
    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step("val", batch, dataloader_idx)

    @override
    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step("test", batch, dataloader_idx)

    @override
    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val")

    @override
    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")

    def _set_name(self, dataloader_idx: int) -> str:
        if not 0 <= dataloader_idx < len(self.eval_sets):
            raise ValueError(
                f"got dataloader_idx {dataloader_idx} but eval_sets names {len(self.eval_sets)} set(s) "
                f"{self.eval_sets}: pass eval_sets=[...] with one name per evaluation dataloader"
            )
        return self.eval_sets[dataloader_idx]

    def _metric_inputs(
        self, logits: torch.Tensor, batch: Mapping[str, Any], cf_logits: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """``(logits [M, C], targets [M], groups [M] or None, cf logits [M, C] or None)``: one row per example,
        or per answer token for language models."""
        groups = next((batch[k] for k in _GROUP_KEYS if isinstance(batch.get(k), torch.Tensor)), None)
        labels = batch["labels"]
        if self.task == "sequence_classification":
            return logits, labels, groups, cf_logits
        mask = self._answer_mask(batch)
        assert mask is not None
        target = labels[:, 1:] if self.task == "causal_lm" else labels
        target_at = torch.zeros_like(labels)
        target_at[:, : target.shape[1]] = target
        rows = logits[mask]
        row_groups = groups.reshape(-1, 1).expand(mask.shape)[mask] if groups is not None else None
        cf_rows = None
        if cf_logits is not None and cf_logits.shape == logits.shape:
            cf_rows = cf_logits[mask]
        return rows, target_at[mask], row_groups, cf_rows

    def _eval_step(self, stage: Literal["val", "test"], batch: dict[str, Any], dataloader_idx: int) -> None:
        name = self._set_name(dataloader_idx)
        logits = self.logits(batch)
        loss = self.task_loss(logits, batch)
        self.log(
            f"{stage}/{name}/loss",
            loss,
            on_step=False,
            on_epoch=True,
            add_dataloader_idx=False,
            sync_dist=True,
            batch_size=_batch_size(batch),
        )
        cf_logits = None
        if any(k.startswith(CF_PREFIX) for k in batch):
            cf_logits = self.logits(counterfactual_batch(batch))
        rows, target, groups, cf_rows = self._metric_inputs(logits, batch, cf_logits)
        self._metrics(stage, name).update(rows, target, groups=groups)
        if cf_rows is not None:
            self._flip(stage, name).update(rows.argmax(-1), cf_rows.argmax(-1))
            self._seen[stage].add(f"{name}/flip")
        self._seen[stage].add(name)

    def _metrics(self, stage: str, name: str) -> ReliabilityMetrics:
        metrics = (self.val_metrics if stage == "val" else self.test_metrics)[name]
        assert isinstance(metrics, ReliabilityMetrics)
        return metrics

    def _flip(self, stage: str, name: str) -> CounterfactualFlipRate:
        flip = (self.val_flip if stage == "val" else self.test_flip)[name]
        assert isinstance(flip, CounterfactualFlipRate)
        return flip

    def _log_metrics(self, stage: Literal["val", "test"]) -> None:
        for name in self.eval_sets:
            metrics, flip = self._metrics(stage, name), self._flip(stage, name)
            if name in self._seen[stage]:
                values = dict(metrics.compute())
                if f"{name}/flip" in self._seen[stage]:
                    values["flip_rate"] = flip.compute()
                if self.task != "sequence_classification" and "nll" in values:
                    values["ppl"] = values["nll"].exp()
                for key, value in values.items():
                    self.log(
                        f"{stage}/{name}/{key}",
                        value.float(),
                        add_dataloader_idx=False,
                        sync_dist=True,
                    )
            metrics.reset()
            flip.reset()
        self._seen[stage].clear()


def _batch_size(batch: Mapping[str, Any]) -> int:
    for key in ("input_ids", "inputs_embeds", "labels"):
        value = batch.get(key)
        if isinstance(value, torch.Tensor) and value.dim():
            return int(value.shape[0])
    return 1
