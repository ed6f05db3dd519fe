"""Repair after diagnosis: remove the discovered shortcut words and make the model learn the task again.

Pruning the features that carry a planted shortcut leaves it in place when many features copy it, and refitting
the head on frozen features stops near the accuracy the old features allow (``benchmarks/results``). The repair
acts at the input: from ``start_epoch`` on, the words (given, or discovered by the token-edit inverse of the
attribution callback's scores over *training* batches) are deleted from every training and evaluation batch
(:func:`~icp_lightning.core.tokens.mask_input_tokens`, ``mode="delete"``, whole words), and

- ``mode="continue"``: fine-tuning goes on from the current weights, with the contrastive KL between ``x``
  without the words and ``x`` as it was (the batch's ``cf_input_ids``; a module that reads paired
  counterfactuals, e.g. ``ICPContrastiveModule(counterfactual="paired")``, adds ``KL(M(x') || M(x))``);
- ``mode="restart"``: the weights go back to what they were when fit started (the pretrained model) and the
  optimizer state is cleared, then training runs on the inputs without the words.

Which mode is better depends on how deep the shortcut went; choose on a held-out split only
(:func:`choose_repair`), never on evaluation data. After fit the model keeps deleting the words (save
:attr:`TokenRepairCallback.token_ids` with it and call ``mask_input_tokens`` after loading).

Example:
    >>> cb = TokenRepairCallback(token_ids=[[2034, 2595, 20214]], start_epoch=1, mode="restart")
    >>> cb.mode, cb.start_epoch, cb.token_ids
    ('restart', 1, [(2034, 2595, 20214)])
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from icp_lightning.callbacks._attribution_data import set_names
from icp_lightning.core.tokens import (
    check_rule,
    discover_tokens,
    find_shortcut_words,
    mask_input_tokens,
    remove_input_tokens,
    token_inverse,
    word_continuation_ids,
)
from icp_lightning.metrics.reliance import FeatureReliance

__all__ = ["TokenRepairCallback", "choose_repair"]

_MODES = ("continue", "restart")
_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def _hf_model(pl_module: pl.LightningModule) -> nn.Module:
    model = getattr(pl_module, "model", None)
    if not isinstance(model, nn.Module):
        raise ValueError(
            f"TokenRepairCallback needs the LightningModule to keep its Hugging Face model in `self.model`; "
            f"{type(pl_module).__name__} has no such attribute"
        )
    return model


def choose_repair(
    candidates: Mapping[str, nn.Module], heldout: Iterable[Mapping[str, Any]], metric: str = "acc"
) -> str:
    """The candidate (e.g. ``{"continue": m1, "restart": m2}``) with the best held-out accuracy.

    Args:
        candidates: name -> repaired model (each with its deletion hook installed).
        heldout: batches with ``input_ids`` (``attention_mask``, ...) and ``labels``: a held-out split, never an
            evaluation set.
        metric: ``"acc"`` (accuracy) or ``"worst_group_acc"`` (needs ``group`` in the batches).

    Returns:
        The best name (ties: the first in ``candidates``).

    Example:
        >>> class Const(nn.Module):
        ...     def __init__(self, c):
        ...         super().__init__(); self.c = c
        ...     def forward(self, input_ids, **kw):
        ...         out = torch.zeros(len(input_ids), 2); out[:, self.c] = 1
        ...         return type("O", (), {"logits": out})()
        >>> batch = {"input_ids": torch.ones(3, 2, dtype=torch.long), "labels": torch.tensor([1, 1, 0])}
        >>> choose_repair({"continue": Const(0), "restart": Const(1)}, [batch])
        'restart'
    """
    if metric not in ("acc", "worst_group_acc"):
        raise ValueError(f"metric must be 'acc' or 'worst_group_acc', got {metric!r}")
    if not candidates:
        raise ValueError("choose_repair needs at least one candidate model")
    batches = list(heldout)
    best, best_value = "", -1.0
    for name, model in candidates.items():
        was_training = model.training
        model.eval()
        right: dict[int, list[int]] = {}
        with torch.no_grad():
            for batch in batches:
                inputs = {k: batch[k] for k in _INPUT_KEYS if k in batch}
                ok = (model(**inputs).logits.argmax(-1) == batch["labels"]).long()
                groups = batch["group"] if metric == "worst_group_acc" else torch.zeros_like(ok)
                for g, v in zip(groups.tolist(), ok.tolist()):
                    right.setdefault(int(g), []).append(v)
        model.train(was_training)
        accs = [sum(v) / len(v) for v in right.values()]
        value = (
            min(accs)
            if metric == "worst_group_acc"
            else sum(map(sum, right.values())) / max(sum(map(len, right.values())), 1)
        )
        if value > best_value:
            best, best_value = name, value
    return best


class TokenRepairCallback(Callback):
    """From ``start_epoch`` on, delete shortcut words from every batch and keep training (``continue``) or start
    again from the pretrained weights (``restart``).

    Args:
        token_ids: the words to remove, each an id or a sequence of piece ids (``DiscoveredToken.token_ids``).
            ``None``: discover them at ``start_epoch`` with :func:`discover_tokens` over
            ``discovery_batches`` training batches and the data module's tokenizer, using the scores the
            attribution callback gave the module (``pl_module.icp_scores`` / ``icp_sites``) or, with no such
            callback, its own: gradient mask effects of the attention heads on training batches against the
            data module's held-out split (``heldout_dataloader()``), signed. No evaluation set is read.
        start_epoch: the epoch from which the words are removed (0: from the start; nothing to restart then).
        mode: ``"continue"`` or ``"restart"`` (see the module docstring).
        kl: put ``x`` as it was into the batch as its paired counterfactual (``cf_input_ids``, ...), so a module
            that reads paired counterfactuals adds the KL between ``x`` without the words and ``x``. The
            callback then owns the training batches' ``cf_`` fields: a data set's own (which may tell the
            shortcut, e.g. a planted token's removal) are dropped, and before ``start_epoch`` ``x' = x``.
        discovery_batches: training batches the inverse reads when ``token_ids`` is ``None``.
        top_k: the inverse intervenes on the ``top_k`` top-scored features.
        pad_token_id: the id written at the freed end of a row (default: the tokenizer's or the model's).
        min_share, min_rate, min_contrast: the discovery rule (:func:`~icp_lightning.core.tokens.nominate`,
            :func:`~icp_lightning.core.tokens.confirm_tokens`): a candidate is edited in ``min_share`` of the
            sentences or in ``min_rate`` of those holding it (``None``: the share alone), and kept when its deletion
            contrast is at least ``min_contrast``. Without a held-out split, edit counts alone decide (share *and*
            rate). Checked here, before any training.
        log_reliance: after each validation, log ``val/<set>/reliance_changed`` and
            ``val/<set>/reliance_prob_change`` (:class:`~icp_lightning.metrics.FeatureReliance`: how much the
            predictions still depend on the words when they are *not* removed).

    Raises:
        ValueError: a mode, epoch, count or discovery threshold outside the allowed values.
    """

    def __init__(
        self,
        token_ids: Sequence[int | Sequence[int]] | None = None,
        start_epoch: int = 1,
        mode: Literal["continue", "restart"] = "continue",
        kl: bool = True,
        discovery_batches: int = 8,
        top_k: int = 8,
        pad_token_id: int | None = None,
        log_reliance: bool = True,
        min_share: float = 0.05,
        min_rate: float | None = 0.5,
        min_contrast: float = 0.1,
    ) -> None:
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {list(_MODES)}, got {mode!r}")
        if not isinstance(start_epoch, int) or start_epoch < 0:
            raise ValueError(f"start_epoch must be an integer >= 0, got {start_epoch!r}")
        if mode == "restart" and start_epoch == 0:
            raise ValueError("mode='restart' needs start_epoch >= 1 (at epoch 0 there is nothing to restart)")
        if discovery_batches < 1 or top_k < 1:
            raise ValueError(f"discovery_batches and top_k must be >= 1, got {discovery_batches}, {top_k}")
        check_rule(min_share=min_share, min_rate=min_rate, min_contrast=min_contrast)
        self.min_share, self.min_rate, self.min_contrast = min_share, min_rate, min_contrast
        self.token_ids: list[tuple[int, ...]] | None = (
            None if token_ids is None else [_as_word(t) for t in token_ids]
        )
        self.start_epoch = start_epoch
        self.mode = mode
        self.kl = kl
        self.discovery_batches = discovery_batches
        self.top_k = top_k
        self.pad_token_id = pad_token_id
        self.log_reliance = log_reliance
        self.applied = False
        self._initial: dict[str, torch.Tensor] | None = None
        self._handle: Any = None
        self._model: nn.Module | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(mode=self.mode, start_epoch=self.start_epoch)

    # ------------------------------------------------------------------------------------------------------
    # the deletion hook: on for evaluation, off in training (the batch itself is rewritten there)

    def _pad(self, trainer: pl.Trainer, model: nn.Module) -> int:
        if self.pad_token_id is not None:
            return self.pad_token_id
        tok = getattr(_datamodule(trainer), "tokenizer", None)
        pad = getattr(tok, "pad_token_id", None)
        if pad is None:
            pad = getattr(getattr(model, "config", None), "pad_token_id", None)
        return int(pad or 0)

    def _set_hook(self, trainer: pl.Trainer, model: nn.Module, on: bool) -> None:
        if on and self._handle is None and self.applied and self.token_ids:
            self._handle = mask_input_tokens(model, self.token_ids, self._pad(trainer, model), mode="delete")
        elif not on and self._handle is not None:
            self._handle.remove()
            self._handle = None

    # ------------------------------------------------------------------------------------------------------
    # hooks

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        model = _hf_model(pl_module)
        self._model = model
        if stage == "fit" and self.mode == "restart" and self._initial is None:
            self._initial = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.applied or trainer.current_epoch < self.start_epoch:
            return
        model = _hf_model(pl_module)
        if self.token_ids is None:
            self.token_ids = self._discover(trainer, pl_module, model)
        if self.mode == "restart" and self._initial is not None:
            model.load_state_dict({k: v.to(p.device) for (k, v), p in zip(
                self._initial.items(), model.state_dict().values())})  # fmt: skip
            for opt in trainer.optimizers:
                opt.state.clear()
        self.applied = True
        rank_zero_info(
            f"TokenRepairCallback: from epoch {trainer.current_epoch}, {len(self.token_ids)} word(s) deleted from "
            f"every batch ({self.mode})"
        )

    def _discover(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, model: nn.Module
    ) -> list[tuple[int, ...]]:
        tok = getattr(_datamodule(trainer), "tokenizer", None)
        if tok is None:
            raise ValueError(
                "TokenRepairCallback(token_ids=None) discovers the words with the data module's tokenizer; use a "
                "data module with a `tokenizer` attribute (ICPDataModule has one), or pass token_ids"
            )
        batches = _first(trainer.train_dataloader, self.discovery_batches, pl_module.device)
        scores = getattr(pl_module, "icp_scores", None)
        sites = getattr(pl_module, "icp_sites", None)
        held = self._heldout_batches(trainer, pl_module)
        if scores is None or sites is None:
            scores, sites = self._scores(model, batches, held)
        was_training = model.training
        model.eval()
        if held is not None:  # the rule the benchmarks use: inverse candidates, kept by the deletion contrast
            found = find_shortcut_words(model, batches, held, scores, sites, tok, top_k=self.top_k,
                                        min_share=self.min_share, min_rate=self.min_rate,
                                        min_contrast=self.min_contrast)  # fmt: skip
        else:  # no held-out split to contrast with: the inverse's edit counts alone
            rank_zero_warn(
                "TokenRepairCallback: the data module has no held-out split (heldout_dataloader()), so discovered "
                "words are not checked by their deletion contrast; pass heldout_size to ICPDataModule"
            )
            cf = token_inverse(tok, self.top_k)
            found = discover_tokens(model, batches, scores, sites, cf, min_share=self.min_share,
                                    min_rate=0.5 if self.min_rate is None else self.min_rate,
                                    special_token_ids=tok.all_special_ids,
                                    continuation_ids=word_continuation_ids(tok))  # fmt: skip
        model.train(was_training)
        words = [d.token_ids for d in found if d.discovered]
        rank_zero_info(f"TokenRepairCallback: discovered {[tok.decode(list(w)) for w in words]}")
        return words

    def _heldout_batches(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> list[dict[str, Any]] | None:
        heldout = getattr(_datamodule(trainer), "heldout_dataloader", None)
        if not callable(heldout) or not getattr(_datamodule(trainer), "heldout_size", 1):
            return None
        return _first(heldout(), self.discovery_batches, pl_module.device)

    def _scores(
        self, model: nn.Module, train: list[dict[str, Any]], held: list[dict[str, Any]] | None
    ) -> tuple[Any, Any]:
        """Signed spuriousness of the attention heads: training batches (``id``) against the data module's
        held-out split (gradient mask effects on the label log-probability), as the benchmark scores them."""
        from icp_lightning.core.effects import causal_effects
        from icp_lightning.core.scores import spuriousness
        from icp_lightning.core.sites import find_sites

        if held is None:
            raise ValueError(
                "TokenRepairCallback(token_ids=None) without a CausalAttributionCallback scores the heads itself, "
                "contrasting training batches with the data module's held-out split: give the data module a "
                "heldout_dataloader() (ICPDataModule(heldout_size=...)), run an attribution callback before "
                "start_epoch, or pass token_ids"
            )
        sites = find_sites(model, granularity="head")
        was_training = model.training
        model.eval()
        effects = {
            ("mask", "label_logprob", name): causal_effects(
                model, data, sites, "mask", method="gradient", progress=False
            )  # fmt: skip
            for name, data in (("id", train), ("heldout", held))
        }
        model.train(was_training)
        return spuriousness(effects, dataset_weights={"id": 1.0, "heldout": -1.0}), sites

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        model = _hf_model(pl_module)
        self._set_hook(trainer, model, False)
        if not isinstance(batch, dict) or "input_ids" not in batch:
            return
        original = {k: batch[k] for k in _INPUT_KEYS if k in batch}
        if self.kl:  # the callback owns the training pair: a data set's own cf_ fields may tell the shortcut
            for key in [k for k in batch if k.startswith("cf_")]:
                del batch[key]
            if not (self.applied and self.token_ids):  # before the repair: x' = x (R-Drop-like, told nothing)
                batch.update({f"cf_{k}": v for k, v in original.items()})
        if not self.applied or not self.token_ids:
            return
        cut = remove_input_tokens(original["input_ids"], self.token_ids, self._pad(trainer, model),
                                  original.get("attention_mask"), original.get("token_type_ids"))  # fmt: skip
        batch.update(cut)
        if self.kl:
            batch.update({f"cf_{k}": v for k, v in original.items()})

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._set_hook(trainer, _hf_model(pl_module), True)

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._set_hook(trainer, _hf_model(pl_module), True)

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._set_hook(trainer, _hf_model(pl_module), True)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._set_hook(trainer, _hf_model(pl_module), True)  # the fitted model keeps deleting the words

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not self.log_reliance or not self.applied or not self.token_ids:
            return
        model = _hf_model(pl_module)
        loaders = trainer.val_dataloaders
        loaders = [loaders] if not isinstance(loaders, (list, tuple)) else list(loaders)
        names = _eval_names(trainer, pl_module, len(loaders))
        was_training = model.training
        model.eval()
        self._set_hook(trainer, model, False)
        for name, loader in zip(names, loaders):
            metric = FeatureReliance().to(pl_module.device)
            with torch.no_grad():
                for batch in loader:
                    x = {k: batch[k].to(pl_module.device) for k in _INPUT_KEYS if k in batch}
                    cut = remove_input_tokens(x["input_ids"], self.token_ids, self._pad(trainer, model),
                                              x.get("attention_mask"), x.get("token_type_ids"))  # fmt: skip
                    metric.update(
                        model(**x).logits, model(**cut).logits, batch["labels"].to(pl_module.device)
                    )
            values = metric.compute()
            pl_module.log(f"val/{name}/reliance_changed", values["changed"], sync_dist=True)
            pl_module.log(f"val/{name}/reliance_prob_change", values["prob_change"], sync_dist=True)
        self._set_hook(trainer, model, True)
        model.train(was_training)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"token_ids": None if self.token_ids is None else [list(w) for w in self.token_ids],
                "applied": self.applied, "initial": self._initial}  # fmt: skip

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        ids = state_dict.get("token_ids")
        self.token_ids = None if ids is None else [tuple(int(t) for t in w) for w in ids]
        self.applied = bool(state_dict.get("applied", False))
        if state_dict.get("initial") is not None:
            self._initial = copy.copy(state_dict["initial"])


def _as_word(t: int | Sequence[int]) -> tuple[int, ...]:
    if isinstance(t, int) or (isinstance(t, torch.Tensor) and t.ndim == 0):
        return (int(t),)
    word = tuple(int(v) for v in t)
    if not word:
        raise ValueError(
            "an empty word in token_ids: give each word as an id or a non-empty list of piece ids"
        )
    return word


def _eval_names(trainer: pl.Trainer, pl_module: pl.LightningModule, n: int) -> list[str]:
    for owner in (_datamodule(trainer), pl_module):
        names = set_names(owner, n) if owner is not None else None
        if names is not None:
            return names
    return [str(i) for i in range(n)] if n > 1 else ["val"]


def _datamodule(trainer: pl.Trainer) -> Any:
    return getattr(trainer, "datamodule", None)


def _first(loader: Any, n: int, device: torch.device) -> list[dict[str, Any]]:
    out = []
    for i, batch in enumerate(loader):
        if i >= n:
            break
        out.append({k: v.to(device) for k, v in batch.items() if k in (*_INPUT_KEYS, "labels")})
    return out
