r"""CausalAttributionCallback: causal effects and spuriousness scores of a Hugging Face model, during ``fit``.

Every ``every_n_epochs`` epochs (at the end of validation, or of the training epoch) the callback computes the
causal effect of each intervention on each feature of each site, for each metric and data set, with
:func:`~icp_lightning.core.effects.causal_effects`, and combines them into spuriousness scores with
:func:`~icp_lightning.core.scores.spuriousness`. No maths lives here: the callback chooses data, shards it over
processes, reduces the results, logs them and tells its listeners (the
:class:`~icp_lightning.callbacks.pruning.CausalPruningCallback`) and the LightningModule (``set_scores``).

Processes (DDP, FSDP1, FSDP2): batch ``i`` of each attribution data set goes to the data-parallel rank
``i % world_size``; each rank computes the effects of its batches, then the float64 ``sums`` and ``counts`` of
the effects are all-reduced (``trainer.strategy.reduce(..., reduce_op="sum")``), so every rank holds the
same effects, equal to a single-process run over the same batches (up to float64 summation order), and
computes the same scores from them. ``swap`` partners are seeded by a batch's global index and ``mean`` values
are averaged over all ranks' batches, as in one process; ``method="screened"`` is the exception (each rank
screens its own batches; a warning says so).

Masks already on the model (an earlier pruning round) live in its weights; their guards are lifted while effects
are computed (and put back after): the engine then sees the model that the forward really computes, keeps its
fast suffix replay, and a pruned feature has an effect of exactly zero.

Sharded models: the parameters are gathered once before the attribution and kept unsharded until it ends, so
the ranks, which do different numbers of forwards, never wait on each other's collectives; this needs the
memory of the full model on every rank for the duration.

* FSDP2 (``ModelParallelStrategy`` with ``fully_shard``): ``FSDPModule.unshard`` with ``reshard_after_forward``
  off.
* FSDP1 (``FSDPStrategy``, ``FullyShardedDataParallel`` with ``use_orig_params=True``, Lightning's default):
  ``FullyShardedDataParallel.summon_full_params(trainer.strategy.model, writeback=False)``, and, while inside,
  every FSDP wrapper in the Hugging Face model is taken out of the module tree (its parent holds the wrapped
  module), so the engine runs the original modules on their full parameters; a wrapper's own forward would
  reshard them after each forward and all-gather them again, a collective. Site names drop the
  ``_fsdp_wrapped_module`` (and ``_checkpoint_wrapped_module``) segments, so sites, scores and masks are named
  as without FSDP. The pruning callback folds masks (``make_permanent``) inside ``summon_full_params(...,
  writeback=True)``. Tested with Lightning's ``FSDPStrategy`` on two CPU processes (gloo; a subclass gets past
  Lightning's CUDA check and gives torch ``device_id=cpu``), with the strategy's auto-wrap policy and with
  wrapping in ``configure_model``, exact and gradient methods: effects, scores and masks equal a one-process run
  of the unwrapped model (``tests/callbacks/test_distributed.py``). Not yet run on GPUs (CUDA, NCCL).

Example:
    >>> cb = CausalAttributionCallback(interventions=("mask", "scale"), dataset_weights={"id": 1.0, "ood": -1.0})
    >>> cb.config.interventions, cb.every_n_epochs
    (('mask', 'scale'), 1)
    >>> CausalAttributionCallback(method="fast")
    Traceback (most recent call last):
    ...
    ValueError: method must be one of ('exact', 'gradient', 'screened'), got 'fast'
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_only, rank_zero_warn
from torch import nn
from typing_extensions import override

from icp_lightning.callbacks._attribution_data import (
    attribution_datasets,
    checked_attribution_data,
    naming_dataset,
    shard,
    validation_loaders,
)
from icp_lightning.callbacks._distributed import (
    _attribution_context,
    _empty_effects,
    _global_site_means,
    _reduce,
    _sampler_kwargs,
    hf_model_of,
    sharding_root,
)
from icp_lightning.core.attribution import AttributionConfig
from icp_lightning.core.choices import AttributionPartner, Partner
from icp_lightning.core.effects import Effects, Method, causal_effects
from icp_lightning.core.interventions import InterventionKind
from icp_lightning.core.scores import Reduction, Scores, spuriousness
from icp_lightning.core.sites import Granularity, Sites
from icp_lightning.plotting import add_scores_to_tensorboard

log = logging.getLogger(__name__)

__all__ = ["AttributionListener", "CausalAttributionCallback"]

#: Called after every attribution round with ``(trainer, pl_module, attribution_callback)``.
AttributionListener = Callable[["pl.Trainer", "pl.LightningModule", "CausalAttributionCallback"], None]

_ON = ("validation_epoch_end", "train_epoch_end")


def _effect_key(intervention: str, metric: str, dataset: str) -> str:
    return f"{intervention}|{metric}|{dataset}"


class CausalAttributionCallback(Callback):
    """Compute causal effects and spuriousness scores every ``every_n_epochs`` epochs of ``fit``.

    Args:
        target_modules: which linear layers are sites (see :func:`~icp_lightning.core.sites.find_sites`);
            ``None``: the architecture's FFN down-projections and attention output projections.
        exclude_modules: layers that are never sites.
        granularity: ``"neuron"`` (one feature per input column) or ``"head"`` (one per attention head).
        interventions: any of ``"mask"``, ``"scale"``, ``"swap"``, ``"mean"``.
        alpha: the factor of ``"scale"``.
        metrics: built-in metric names (``"label_logprob"``, ``"label_prob"``, ``"accuracy"``, ``"neg_loss"``,
            ``"margin"``, ``"target_logprob"``) or callables ``m(outputs, batch) -> Tensor[batch]``.
        intervention_weights, metric_weights: one weight per intervention / metric (default 1 each).
        dataset_weights: one weight per attribution data set, e.g. ``{"id": 1.0, "ood": -1.0}`` (default 1 each).
        reduction: ``"signed"`` (contrast data sets: finds shortcuts) or ``"abs"`` (rank importance).
        attribution_data: data set name -> a ``DataLoader`` (any iterable of dict batches), or -> the name of one
            of the validation dataloaders (see below), or -> ``"train"``: the data module's seeded sample of
            its training split (``ICPDataModule.attribution_dataloaders(["train"])``), which keeps attribution
            off the evaluation sets, e.g. ``{"train": "train", "heldout": "heldout"}``. ``None``: all
            validation dataloaders. Validation
            dataloaders come from ``datamodule.val_dataloader()``, else ``LightningModule.val_dataloader()``,
            else the ``val_dataloaders`` given to ``fit``; a dict is named by its keys, a list by the
            ``val_set_names`` (or ``eval_sets``) attribute of the datamodule / module, else ``val_0``, ``val_1``,
            ...; a single dataloader is named ``val``. Give plain (not distributed) dataloaders without
            shuffling: the callback shards batches over ranks itself.
        method: ``"gradient"`` (default: one forward and one backward per batch for every feature; Spearman
            0.9+ with exact effects on MiniLM, see ``benchmarks/results/attribution_speed.md``), ``"exact"``
            (true effects; minutes per layer on a CPU) or ``"screened"`` (gradient, then exact for the top-k)
            (see :func:`~icp_lightning.core.effects.causal_effects`).
        max_batches: at most this many batches of each data set (over all ranks together); ``None``: all.
            The default, 4, keeps a round at 2-4 s per data set of 32-sentence batches for MiniLM-L6 on one
            CPU core (the callbacks add 3% to 1,024-sentence epochs); scores from 8 batches rank features with
            Spearman 0.84 to it (``benchmarks/results/callback_overhead.md``). Give more for steadier scores.
        every_n_epochs: attribute after epochs ``every_n_epochs - 1``, ``2 * every_n_epochs - 1``, ...
        max_rounds: stop attributing (and so pruning) after this many rounds; ``None``: no limit. Rounds restored
            from a checkpoint count.
        on: ``"validation_epoch_end"`` (after validation; skipped in epochs without validation) or
            ``"train_epoch_end"``.
        model_attr: dotted attribute path of the Hugging Face model in the LightningModule. ``None``:
            ``pl_module.model`` if that is a module, else the LightningModule itself.
        top_k_log: how many top features the logged table and the JSON summary list.
        progress: show the engine's progress bar (on global rank 0 only).
        save_dir: where ``scores_epoch{E}.pt`` / ``.json`` go. ``None``: ``trainer.log_dir`` (the logger's
            directory, or ``default_root_dir`` without logger).
        partner: where ``swap`` takes h' from: ``"paired"`` (the batch's ``cf_input_ids``), ``"permutation"``
            (a seeded in-batch partner), ``"auto"`` (paired when batches carry ``cf_input_ids``).

    Attributes:
        sites: the resolved :class:`~icp_lightning.core.sites.Sites` (after ``setup``).
        scores: the latest :class:`~icp_lightning.core.scores.Scores` (``None`` before the first round).
        effects: the latest effects, ``{(intervention, metric, dataset): Effects}``.
        round: how many attribution rounds have run.
        epoch: the epoch of the latest round.

    Raises:
        ValueError: an argument outside its allowed values (the message lists them).

    Example:
        >>> import lightning.pytorch as pl
        >>> attribution = CausalAttributionCallback(max_batches=4, dataset_weights={"id": 1.0, "ood": -1.0})
        >>> trainer = pl.Trainer(callbacks=[attribution], max_epochs=2)  # doctest: +SKIP
        >>> trainer.fit(module, datamodule=dm)  # val_dataloader() returns {"id": ..., "ood": ...}  # doctest: +SKIP
        >>> attribution.scores.top_k(5)  # doctest: +SKIP
    """

    def __init__(
        self,
        target_modules: str | Sequence[str] | None = None,
        exclude_modules: str | Sequence[str] | None = None,
        granularity: Granularity = "neuron",
        interventions: Sequence[InterventionKind] = ("mask",),
        alpha: float = 0.5,
        metrics: Sequence[str | Callable[..., Any]] = ("label_logprob",),
        intervention_weights: Mapping[str, float] | None = None,
        metric_weights: Mapping[str, float] | None = None,
        dataset_weights: Mapping[str, float] | None = None,
        reduction: Reduction = "signed",
        attribution_data: Mapping[str, Any] | None = None,
        method: Method = "gradient",
        max_batches: int | None = 4,
        every_n_epochs: int = 1,
        max_rounds: int | None = None,
        on: Literal["validation_epoch_end", "train_epoch_end"] = "validation_epoch_end",
        model_attr: str | None = None,
        top_k_log: int = 20,
        progress: bool = True,
        save_dir: str | os.PathLike[str] | None = None,
        partner: AttributionPartner = "auto",
    ) -> None:
        self.config = AttributionConfig(
            target_modules=target_modules,
            exclude_modules=exclude_modules,
            granularity=granularity,
            interventions=interventions,
            alpha=alpha,
            metrics=metrics,
            intervention_weights=intervention_weights,
            metric_weights=metric_weights,
            dataset_weights=dataset_weights,
            reduction=reduction,
            method=method,
            max_batches=max_batches,
            partner=partner,
        )
        if on not in _ON:
            raise ValueError(f"on must be one of {_ON}, got {on!r}")
        for name, value, low in (("every_n_epochs", every_n_epochs, 1), ("top_k_log", top_k_log, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if max_rounds is not None and (
            not isinstance(max_rounds, int) or isinstance(max_rounds, bool) or max_rounds < 1
        ):
            raise ValueError(f"max_rounds must be an int >= 1 or None (no limit), got {max_rounds!r}")
        if model_attr is not None and (not isinstance(model_attr, str) or not model_attr):
            raise ValueError(
                f"model_attr must be a dotted attribute path such as 'model', got {model_attr!r}"
            )
        self.attribution_data = checked_attribution_data(attribution_data)
        if self.attribution_data is not None:
            self.config.check_datasets(list(self.attribution_data))
        self.every_n_epochs = every_n_epochs
        self.max_rounds = max_rounds
        self.on = on
        self.model_attr = model_attr
        self.top_k_log = top_k_log
        self.progress = progress
        self.save_dir = save_dir

        self.sites: Sites | None = None
        self.scores: Scores | None = None
        self.effects: dict[tuple[str, str, str], Effects] = {}
        self.round = 0
        self.epoch: int | None = None
        self._listeners: list[AttributionListener] = []
        self._hook: str = on  # where rounds run: `on`, or train_epoch_end when the fit has no validation loop

    # ------------------------------------------------------------------------------------------------------
    # The configuration's choices, read-only (set them through the constructor)

    @property
    def granularity(self) -> Granularity:
        return self.config.granularity

    @property
    def interventions(self) -> tuple[InterventionKind, ...]:
        return tuple(self.config.interventions)

    @property
    def alpha(self) -> float:
        return self.config.alpha

    @property
    def metrics(self) -> tuple[str | Callable[..., Any], ...]:
        return tuple(self.config.metrics)

    @property
    def metric_names(self) -> list[str]:
        return self.config.metric_names

    @property
    def method(self) -> Method:
        return self.config.method

    @property
    def dataset_weights(self) -> Mapping[str, float] | None:
        return self.config.dataset_weights

    # ------------------------------------------------------------------------------------------------------
    # State

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            target_modules=self.config.target_modules,
            exclude_modules=self.config.exclude_modules,
            granularity=self.config.granularity,
            interventions=self.config.interventions,
            metrics=tuple(self.config.metric_names),
            dataset_weights=self.config.dataset_weights,
            reduction=self.config.reduction,
            model_attr=self.model_attr,
        )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "epoch": self.epoch,
            "scores": self.scores.state_dict() if self.scores is not None else None,
            "effects": {_effect_key(*key): eff.state_dict() for key, eff in self.effects.items()},
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.round = int(state_dict.get("round", 0))
        self.epoch = state_dict.get("epoch")
        scores = state_dict.get("scores")
        self.scores = Scores.from_state_dict(scores) if scores is not None else None
        self.effects = {}
        for key, eff in (state_dict.get("effects") or {}).items():
            iv, metric, dataset = key.split("|", 2)
            self.effects[(iv, metric, dataset)] = Effects.from_state_dict(eff)

    # ------------------------------------------------------------------------------------------------------
    # Listeners

    def _partner(self, batch: Mapping[str, Any]) -> Partner:
        if self.config.partner == "auto":
            return "paired" if "cf_input_ids" in batch else "permutation"
        return self.config.partner

    def add_listener(self, listener: AttributionListener) -> None:
        """Call ``listener(trainer, pl_module, self)`` after every attribution round (in registration order).

        Registering the same listener twice has no effect. The pruning callback registers itself in its
        ``setup``, so it prunes right after each round, inside the same hook.
        """
        if listener not in self._listeners:
            self._listeners.append(listener)

    def remove_listener(self, listener: AttributionListener) -> None:
        """Stop calling ``listener``."""
        if listener in self._listeners:
            self._listeners.remove(listener)

    # ------------------------------------------------------------------------------------------------------
    # Model and sites

    def model_of(self, pl_module: pl.LightningModule) -> nn.Module:
        """The Hugging Face model inside ``pl_module`` (``model_attr``, else ``pl_module.model``, else itself)."""
        return hf_model_of(pl_module, self.model_attr)

    def resolve_sites(self, pl_module: pl.LightningModule) -> Sites:
        """Find the sites in ``pl_module``'s HF model (after any wrapping) and keep them in ``self.sites``."""
        model = self.model_of(pl_module)
        try:
            self.sites = self.config.sites(model)
        except ValueError as err:
            if self.model_attr is not None or model is not pl_module:
                raise
            # No pl_module.model: the HF model probably sits under another attribute.
            inner = [n for n, m in pl_module.named_children() if hasattr(m, "config") or any(m.children())]
            raise ValueError(
                f"{err}\nThe LightningModule has no `model` attribute, so the callbacks searched the whole "
                f"{type(pl_module).__name__}. If your Hugging Face model sits under another attribute, pass "
                f"model_attr= (e.g. model_attr={inner[0]!r}); child modules: {inner}"
                if inner
                else f"{err}"
            ) from err
        return self.sites

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.resolve_sites(pl_module)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # configure_model (FSDP2 fully_shard, PEFT wrapping) and FSDP1 wrapping run after setup: find the sites
        # again (same names: wrapper segments are dropped; in_features_of reads flat FSDP1 weights' sizes).
        self.resolve_sites(pl_module)
        kwargs = _sampler_kwargs(trainer)
        if kwargs:
            replicas = kwargs.get("num_replicas", trainer.world_size)
            if replicas != trainer.world_size:
                raise ValueError(
                    f"{type(self).__name__} shards attribution data over all {trainer.world_size} processes, but "
                    f"the strategy has {replicas} data-parallel replicas (tensor parallelism): not supported; "
                    "use DDP or ModelParallelStrategy(tensor_parallel_size=1)"
                )

        if self.config.method == "screened" and trainer.world_size > 1:
            rank_zero_warn(
                "method='screened' on several processes: each rank picks the features it computes exactly from "
                "the gradient ranking of its own batches, so a feature's effect can mix exact and gradient "
                "values (still identical on all ranks, but not equal to a single-process screened run). Use "
                "method='exact' or 'gradient' for results independent of the number of processes"
            )

        self._hook = self.on
        if self.on == "validation_epoch_end" and not self._has_validation(trainer, pl_module):
            self._hook = "train_epoch_end"
            rank_zero_info(
                f"[icp] {type(self).__name__}: this fit has no validation loop, so attribution runs at the end "
                "of each training epoch instead (on='train_epoch_end'); pass on='train_epoch_end' to silence this"
            )
        max_epochs = trainer.max_epochs
        if max_epochs is not None and 0 < max_epochs < self.every_n_epochs and self.round == 0:
            raise ValueError(
                f"every_n_epochs={self.every_n_epochs} but the fit runs max_epochs={max_epochs}: attribution (and "
                f"so pruning) would never run. Lower every_n_epochs to at most {max_epochs} or train longer"
            )

    def _has_validation(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        """Whether this fit runs a validation loop (validation_step, dataloaders, limit_val_batches > 0)."""
        if not is_overridden("validation_step", pl_module) or trainer.limit_val_batches == 0:
            return False
        try:
            self._validation_loaders(trainer, pl_module)
        except ValueError:
            return False
        return True

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A fit that asked for attribution never ends without scores (e.g. max_steps stopped it mid-epoch).
        if self.scores is None and not trainer.interrupted:
            rank_zero_info(
                f"[icp] {type(self).__name__}: no attribution round ran during this fit; attributing once now"
            )
            self.attribute(trainer, pl_module)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Checkpoint state is restored by now (for every strategy): hand restored scores to the module.
        datasets = self._dataset_names(trainer, pl_module)
        self.config.check_datasets(datasets)
        if self.scores is not None:
            self._notify_module(pl_module)

    # ------------------------------------------------------------------------------------------------------
    # Data

    def _validation_loaders(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Iterable]:
        return validation_loaders(trainer, pl_module, type(self).__name__)

    def _datasets(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Iterable]:
        """Data set name -> iterable of batches, in a fixed order."""
        return attribution_datasets(trainer, pl_module, self.attribution_data, type(self).__name__)

    def _dataset_names(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[str]:
        if self.attribution_data is not None:
            return list(self.attribution_data)
        return list(self._validation_loaders(trainer, pl_module))

    # ------------------------------------------------------------------------------------------------------
    # Hooks

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._hook == "validation_epoch_end":
            self._maybe_attribute(trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._hook == "train_epoch_end":
            self._maybe_attribute(trainer, pl_module)

    def _should_run(self, trainer: pl.Trainer) -> bool:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return False
        if self.max_rounds is not None and self.round >= self.max_rounds:
            return False
        return (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def _maybe_attribute(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._should_run(trainer):
            self.attribute(trainer, pl_module)

    # ------------------------------------------------------------------------------------------------------
    # The round

    def attribute(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Scores:
        """Run one attribution round now: effects, scores, ``set_scores``, listeners, logs and files.

        Every rank must call it (the hooks do). Runs outside inference mode even when called from a validation
        hook, so that masks and gradients made here are ordinary tensors.
        """
        with torch.inference_mode(False):
            sites = self.sites if self.sites is not None else self.resolve_sites(pl_module)
            model = self.model_of(pl_module)
            datasets = self._datasets(trainer, pl_module)
            self.config.check_datasets(list(datasets))
            progress = bool(self.progress) and trainer.is_global_zero
            start = time.perf_counter()
            effects: dict[tuple[str, str, str], Effects] = {}
            local = {
                name: shard(trainer, name, loader, self.config.max_batches)
                for name, loader in datasets.items()
            }
            with _attribution_context(model, sharding_root(trainer, pl_module)) as replay:
                for ds_name, batches in local.items():
                    with naming_dataset(ds_name):
                        means = (
                            _global_site_means(trainer, model, sites, batches)
                            if "mean" in self.config.interventions
                            else None
                        )
                        for iv in self.config.interventions:
                            for metric, mname in zip(self.config.metrics, self.config.metric_names):
                                eff = self._local_effects(
                                    model, sites, batches, iv, metric, mname, means, replay, progress
                                )
                                effects[(iv, mname, ds_name)] = _reduce(trainer, eff)
            cfg = self.config
            scores = spuriousness(
                effects, cfg.intervention_weights, cfg.metric_weights, cfg.dataset_weights, cfg.reduction,
                model=model,
            )  # fmt: skip
            scores.meta.update(
                epoch=trainer.current_epoch, round=self.round + 1, granularity=sites.granularity,
                config=cfg.to_dict(),
            )  # fmt: skip
            self.effects, self.scores = effects, scores
            self.round += 1
            self.epoch = trainer.current_epoch
            seconds = time.perf_counter() - start
            directory = self._directory(trainer)  # a broadcast: every rank
            self._log_round(trainer, scores, directory, seconds)
            self._notify_module(pl_module)
            for listener in list(self._listeners):
                listener(trainer, pl_module, self)
        return scores

    def _local_effects(
        self,
        model: nn.Module,
        sites: Sites,
        batches: Sequence[tuple[int, Mapping[str, Any]]],
        intervention: str,
        metric: str | Callable[..., Any],
        name: str,
        means: dict[str, torch.Tensor] | None,
        replay: Literal["auto", "never"],
        progress: bool,
    ) -> Effects:
        """Effects over this rank's batches (zeros if it has none). Swap partners are seeded by the batch's
        global index, as in one process over all batches, so swap runs batch by batch."""
        if not batches:
            return _empty_effects(sites, intervention, name, self.config.method, self.config.alpha)
        groups = [[pair] for pair in batches] if intervention == "swap" else [list(batches)]
        out: Effects | None = None
        for group in groups:
            part = causal_effects(
                model,
                [batch for _, batch in group],
                sites,
                intervention,  # type: ignore[arg-type]
                metric,
                self.config.method,
                self.config.alpha,
                mean_values=means,
                partner=self._partner(group[0][1]),
                seed=group[0][0] if intervention == "swap" else 0,
                replay=replay,
                progress=progress,
            )
            out = part if out is None else out + part
        assert out is not None
        return out

    def _notify_module(self, pl_module: pl.LightningModule) -> None:
        set_scores = getattr(pl_module, "set_scores", None)
        if callable(set_scores) and self.scores is not None:
            set_scores(self.scores, self.sites)

    # ------------------------------------------------------------------------------------------------------
    # Logging (rank zero only)

    def _directory(self, trainer: pl.Trainer) -> Path:
        if self.save_dir is not None:
            return Path(self.save_dir)
        log_dir = trainer.log_dir
        return Path(log_dir if log_dir is not None else trainer.default_root_dir)

    @rank_zero_only
    def _log_round(self, trainer: pl.Trainer, scores: Scores, directory: Path, seconds: float) -> None:
        epoch = trainer.current_epoch
        directory.mkdir(parents=True, exist_ok=True)
        scores.save(directory / f"scores_epoch{epoch}.pt")
        scores.to_json(directory / f"scores_epoch{epoch}.json", k=self.top_k_log)
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if _is_tensorboard(logger) and experiment is not None:
                add_scores_to_tensorboard(experiment, scores, trainer.global_step, self.top_k_log, epoch)
        top = scores.top_k(min(3, self.top_k_log)) if self.top_k_log else []
        rank_zero_info(
            f"[icp] attribution round {self.round} (epoch {epoch}) in {seconds:.1f}s over "
            f"{len(scores)} sites; top features: {[(s, i, round(v, 4)) for s, i, v in top]}"
        )


# ----------------------------------------------------------------------------------------------------------
# Helpers


def _is_tensorboard(logger: Any) -> bool:
    try:
        from lightning.pytorch.loggers import TensorBoardLogger
    except Exception:  # pragma: no cover
        return False
    return isinstance(logger, TensorBoardLogger)
