"""Refit the classification head on a small held-out split before the final validation (DFR-style).

Pairs with the pruning callback: ICP prunes the features that carry a shortcut (chosen by causal scores), then
the head is refit on a group-balanced held-out split, the only extra data ICP uses (the same split that DFR
uses). See :func:`icp_lightning.core.reweight.refit_head`.

Example:
    >>> refit = HeadRefitCallback(dataset="heldout", l2=1.0)
    >>> refit.at
    'last_epoch'
"""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from typing_extensions import override

from icp_lightning.callbacks._distributed import hf_model_of
from icp_lightning.core.reweight import refit_head


class HeadRefitCallback(Callback):
    """Refit the head (L2 logistic regression on frozen features) on a named data set during fit.

    Args:
        dataset: the data set: ``"heldout"`` (``datamodule.heldout_dataloader()``) or any name the datamodule's
            ``attribution_dataloaders`` knows.
        l2: L2 strength (``1 / C`` of scikit-learn).
        at: ``"last_epoch"`` (once, after the last training epoch and before its validation, so the final
            metrics include it) or ``"every_epoch"``.
        model_attr: where the Hugging Face model sits (default ``pl_module.model``, else the module itself).

    Raises:
        ValueError: a bad ``at`` or ``l2``.
    """

    def __init__(
        self,
        dataset: str = "heldout",
        l2: float = 1.0,
        at: Literal["last_epoch", "every_epoch"] = "last_epoch",
        model_attr: str | None = None,
    ) -> None:
        if at not in ("last_epoch", "every_epoch"):
            raise ValueError(f"at must be 'last_epoch' or 'every_epoch', got {at!r}")
        if not l2 >= 0:
            raise ValueError(f"l2 must be >= 0, got {l2!r}")
        self.dataset, self.l2, self.at, self.model_attr = dataset, float(l2), at, model_attr
        self.last_info: dict[str, Any] | None = None

    def _loader(self, trainer: pl.Trainer) -> Any:
        dm = trainer.datamodule  # type: ignore[attr-defined]
        if dm is None:
            raise ValueError(
                "HeadRefitCallback needs a datamodule with a heldout_dataloader() or named data sets"
            )
        if self.dataset == "heldout" and hasattr(dm, "heldout_dataloader"):
            return dm.heldout_dataloader()
        if hasattr(dm, "attribution_dataloaders"):
            return dm.attribution_dataloaders([self.dataset])[self.dataset]
        raise ValueError(f"the datamodule has no data set {self.dataset!r}")

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        if self.at == "last_epoch" and trainer.current_epoch != (trainer.max_epochs or 1) - 1:
            return
        model = hf_model_of(pl_module, self.model_attr)
        self.last_info = refit_head(model, self._loader(trainer), l2=self.l2)
        rank_zero_info(
            f"[icp] refit {self.last_info['head']} on {self.dataset!r} ({self.last_info['n_examples']} examples, "
            f"train acc {100 * self.last_info['train_acc']:.1f}%)"
        )
