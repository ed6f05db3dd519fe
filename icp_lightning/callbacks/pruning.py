r"""CausalPruningCallback: prune (or reweight) the most spurious features right after each attribution round.

The pruning callback does not compute anything itself: it registers as a listener of a
:class:`~icp_lightning.callbacks.attribution.CausalAttributionCallback` in ``setup`` and, each time that callback
has new scores, chooses features with ``select_fn`` (default :func:`~icp_lightning.core.selection.select_masks`,
the one selection function of the package, re-exported here) and installs the masks with
:func:`~icp_lightning.core.masks.apply_masks` (an input mask per site, so training cannot revive a pruned
feature). It runs inside the attribution callback's hook, right after the scores are computed, whatever the
order of the callbacks in ``Trainer(callbacks=...)``.

Rounds: with ``every_n_epochs=n`` on the attribution callback, ICP is iterative: attribute -> prune -> fine-tune
``n`` epochs -> attribute -> ... Masks are cumulative: a pruned feature stays pruned, is no longer a candidate,
and ``amount`` applies to the remaining features.

Processes: every rank computes the same masks from the same all-reduced scores, then rank 0's masks are
broadcast (``trainer.strategy.broadcast``) so every rank installs exactly the same ones.

Saving: pruning lives in the weights (see :mod:`icp_lightning.core.masks`): masks are folded in when they are
applied, the trainer's optimizers get their state zeroed on pruned columns, and pruned columns are re-zeroed
after every training batch (:func:`~icp_lightning.core.masks.enforce_masks`). So every checkpoint holds pruned
weights and only the model's own keys: ``MyModule.load_from_checkpoint(path)``, ``Trainer.validate(model,
ckpt_path=path)`` without this callback, ``save_pretrained`` and PEFT ``merge_and_unload`` all give the pruned
model.

Resume: the masks and the round counter are in the callback's ``state_dict``; ``on_train_start`` installs the
restored masks' guards again (:func:`~icp_lightning.core.masks.restore_masks`: the weights already carry them),
before the first training step. Checkpoints of icp_lightning < 0.2 (``<site>.icp_mask`` keys, unfolded weights)
are converted as they load by a ``load_state_dict`` pre-hook.

Sharded models: FSDP2 DTensor weights are folded shard by shard; under FSDP1 masks are folded inside
``FullyShardedDataParallel.summon_full_params(..., writeback=True)`` and re-zeroed before each validation and at
each epoch end (not each batch: that would gather the parameters every step), so epoch-end checkpoints hold
zeros; a checkpoint taken mid-epoch under FSDP1 may hold optimizer drift on pruned columns.

Example:
    >>> cb = CausalPruningCallback(amount=0.1, scope="per_site")
    >>> cb.mode, cb.min_keep
    ('hard', 1)
    >>> CausalPruningCallback(threshold=0.5, amount=0.1)
    Traceback (most recent call last):
    ...
    ValueError: give exactly one of threshold= (prune features scoring above tau) or amount= (a fraction, a count, or a callable of the round), not both
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor
from typing_extensions import override

from icp_lightning.callbacks._distributed import _has_fsdp1, fsdp1_full_params, sharding_root
from icp_lightning.callbacks.attribution import CausalAttributionCallback
from icp_lightning.core.masks import (
    apply_masks,
    enforce_masks,
    fold_legacy_masks,
    make_permanent,
    restore_masks,
)
from icp_lightning.core.selection import (
    Mode,
    Scope,
    check_amount,
    check_selection_args,
    default_factor,
    select_masks,
)
from icp_lightning.core.sites import check_scores_fit, named_modules

__all__ = ["CausalPruningCallback", "default_factor", "select_masks"]

Amount = int | float | Callable[[int], int | float]


class CausalPruningCallback(Callback):
    """Prune (``mode="hard"``) or reweight (``"soft"``) the most spurious features after each attribution round.

    Args:
        threshold: prune the remaining features whose score is above this tau.
        amount: how many of the remaining features to prune each round: an int (a count; 0 prunes nothing), a
            float in (0, 1) (a fraction of the remaining features; ``1.0`` is an error: pass ``1`` for one
            feature) or a callable ``amount(round) -> int | float`` of the pruning round (0, 1, 2, ...). Exactly
            one of ``threshold`` / ``amount``. Same meaning as ``icp prune --amount`` (see
            :mod:`icp_lightning.core.selection`).
        scope: ``"global"`` (rank all sites' features together) or ``"per_site"`` (``amount`` in every site).
        min_keep: every site keeps at least this many features (1: a site is never emptied).
        mode: ``"hard"`` (mask 0) or ``"soft"`` (multiply the mask by a factor in [0, 1] computed from the
            standardized score, ``factor_fn(z)``, default ``1 - sigmoid(z)``; see :func:`select_masks`).
        factor_fn: the soft factor, a function of a tensor of standardized scores (``mode="soft"`` only).
        select_fn: the selection itself, like ``ModelPruning``'s ``pruning_fn``: called each round as
            ``select_fn(scores, current_masks, threshold=, amount=, scope=, min_keep=, mode=, factor_fn=)``
            (``amount`` already evaluated for the round) and returning site -> new ``[n_features]`` masks in
            [0, 1] for the sites of ``current_masks``. Default
            :func:`~icp_lightning.core.selection.select_masks`; wrap it to change the choice, e.g. to protect
            some sites.
        make_permanent: fold the masks into the weights at the end of ``fit`` (``on_fit_end``) and remove them.
        attribution: the attribution callback to follow; ``None``: the only one in ``trainer.callbacks``.
        verbose: print a line per round (rank 0).

    Attributes:
        masks: site -> ``[n_features]`` current masks (CPU float32), identical on every rank.
        round: how many pruning rounds have run.

    Raises:
        ValueError: an argument outside its allowed values (the message lists them).

    Example:
        >>> import lightning.pytorch as pl
        >>> from icp_lightning.callbacks import CausalAttributionCallback
        >>> attribution = CausalAttributionCallback(every_n_epochs=2)
        >>> pruning = CausalPruningCallback(amount=0.05, make_permanent=True)
        >>> trainer = pl.Trainer(callbacks=[attribution, pruning], max_epochs=6)  # doctest: +SKIP
        >>> trainer.fit(module, datamodule=dm)  # 3 rounds of attribute -> prune -> fine-tune  # doctest: +SKIP
    """

    def __init__(
        self,
        threshold: float | None = None,
        amount: Amount | None = None,
        scope: Scope = "global",
        min_keep: int = 1,
        mode: Mode = "hard",
        factor_fn: Callable[[Tensor], Tensor] | None = None,
        select_fn: Callable[..., Mapping[str, Tensor]] | None = None,
        make_permanent: bool = False,
        attribution: CausalAttributionCallback | None = None,
        verbose: bool = True,
    ) -> None:
        if (threshold is None) == (amount is None):
            raise ValueError(
                "give exactly one of threshold= (prune features scoring above tau) or amount= (a fraction, a "
                f"count, or a callable of the round), not {'both' if threshold is not None else 'neither'}"
            )
        threshold, amount = check_selection_args(
            threshold, amount, scope, min_keep, mode, factor_fn, finite_threshold=True, callable_amount=True
        )
        if select_fn is not None and not callable(select_fn):
            raise ValueError(
                "select_fn must be a callable (scores, masks, *, threshold, amount, scope, min_keep, mode, "
                f"factor_fn) -> masks, like icp_lightning.core.selection.select_masks; got {select_fn!r}"
            )
        if attribution is not None and not isinstance(attribution, CausalAttributionCallback):
            raise ValueError(
                f"attribution must be a CausalAttributionCallback (or None to find it among the trainer's "
                f"callbacks), got {type(attribution).__name__}"
            )
        self.threshold = threshold
        self.amount = amount
        self.scope: Scope = scope
        self.min_keep = min_keep
        self.mode: Mode = mode
        self.factor_fn = factor_fn
        self.select_fn: Callable[..., Mapping[str, Tensor]] = (
            select_fn if select_fn is not None else select_masks
        )
        self.make_permanent = bool(make_permanent)
        self.attribution = attribution
        self.verbose = verbose

        self.masks: dict[str, Tensor] = {}
        self.round = 0
        self._load_hook: Any = None

    # ------------------------------------------------------------------------------------------------------
    # State

    @property
    @override
    def state_key(self) -> str:
        amount: Any = self.amount
        if callable(amount):  # a stable name, not a memory address
            amount = getattr(amount, "__qualname__", type(amount).__name__)
        return self._generate_state_key(
            threshold=self.threshold, amount=amount, scope=self.scope, mode=self.mode
        )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"round": self.round, "masks": {n: m.clone() for n, m in self.masks.items()}}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.round = int(state_dict.get("round", 0))
        self.masks = {n: torch.as_tensor(m).float().cpu() for n, m in (state_dict.get("masks") or {}).items()}

    # ------------------------------------------------------------------------------------------------------
    # Hooks

    def _find_attribution(self, trainer: pl.Trainer) -> CausalAttributionCallback:
        found = [cb for cb in trainer.callbacks if isinstance(cb, CausalAttributionCallback)]  # type: ignore[attr-defined]
        if self.attribution is not None:
            if not any(cb is self.attribution for cb in found):
                raise ValueError(
                    "the attribution callback given to CausalPruningCallback is not among the trainer's callbacks: "
                    "pass it in Trainer(callbacks=[attribution, pruning])"
                )
            return self.attribution
        if len(found) != 1:
            raise ValueError(
                f"CausalPruningCallback needs one CausalAttributionCallback among the trainer's callbacks, found "
                f"{len(found)}: add one to Trainer(callbacks=...)"
                + (" or pass attribution= to choose" if found else "")
            )
        return found[0]

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.attribution = self._find_attribution(trainer)
        self.attribution.add_listener(self._on_attribution)
        if self._load_hook is None:
            self._load_hook = pl_module.register_load_state_dict_pre_hook(self._create_masks_before_load)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._load_hook is not None:
            self._load_hook.remove()
            self._load_hook = None

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After every checkpoint restore (some strategies restore after on_fit_start), before the first step.
        if self.masks:
            assert self.attribution is not None
            sites = self.attribution.sites
            if sites is None:
                sites = self.attribution.resolve_sites(pl_module)
            unknown = [n for n in self.masks if n not in sites]
            if unknown:
                raise ValueError(
                    f"restored masks name sites {unknown} that the model does not have: {sites.names}"
                )
            with torch.inference_mode(False), self._full_params(trainer, pl_module):
                restore_masks(self.attribution.model_of(pl_module), sites, self.masks, rezero=True)

    def _full_params(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        """FSDP1: the full parameters, written back to every rank's shard; otherwise nothing."""
        return fsdp1_full_params(sharding_root(trainer, pl_module), writeback=True)

    def _enforce(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.masks and self.attribution is not None:
            with torch.no_grad(), self._full_params(trainer, pl_module):
                enforce_masks(self.attribution.model_of(pl_module))

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # After the optimizer step: pruned columns that an optimizer moved go back to zero, so every
        # checkpoint and export holds them at zero. Under FSDP1 this waits for the epoch end.
        if not _has_fsdp1(sharding_root(trainer, pl_module)):
            self._enforce(trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._enforce(trainer, pl_module)

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # ModelCheckpoint saves at the validation end by default, before the train epoch ends: under FSDP1
        # (no per-batch re-zeroing) pruned columns must be zero by then.
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._enforce(trainer, pl_module)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.make_permanent and self.masks:
            assert self.attribution is not None
            # FSDP1: fold into the full parameters and write them back to every rank's shard.
            with fsdp1_full_params(sharding_root(trainer, pl_module), writeback=True):
                make_permanent(self.attribution.model_of(pl_module))
            if self.verbose:
                rank_zero_info("[icp] masks folded into the weights (make_permanent=True)")

    def _create_masks_before_load(
        self, module: Any, state_dict: dict[str, Any], prefix: str, *args: Any
    ) -> None:
        """``load_state_dict`` pre-hook: fold the masks of a checkpoint of icp_lightning < 0.2 into its weights."""
        if any(k.startswith(prefix) and k.endswith(".icp_mask") for k in state_dict):
            fold_legacy_masks(state_dict, named_modules(module), prefix)

    # ------------------------------------------------------------------------------------------------------
    # A round

    def _amount_for(self, round_index: int) -> int | float | None:
        if self.amount is None or not callable(self.amount):
            return self.amount
        return check_amount(self.amount(round_index), where=f"amount({round_index})")

    def _select(self, scores: Mapping[str, Tensor], current: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """This round's masks from ``select_fn``, checked: one ``[n_features]`` mask in [0, 1] per site."""
        new = self.select_fn(
            scores,
            current,
            threshold=self.threshold,
            amount=self._amount_for(self.round),
            scope=self.scope,
            min_keep=self.min_keep,
            mode=self.mode,
            factor_fn=self.factor_fn,
        )
        out: dict[str, Tensor] = {}
        for name, mask in current.items():
            value = new.get(name) if isinstance(new, Mapping) else None
            if value is None:
                raise ValueError(f"select_fn returned no mask for site {name!r}; it must return one per site")
            value = torch.as_tensor(value).detach().to("cpu", torch.float32).reshape(-1)
            if value.numel() != mask.numel() or not bool(((value >= 0) & (value <= 1)).all()):
                raise ValueError(
                    f"select_fn returned a mask for site {name!r} of {value.numel()} values (want {mask.numel()}) "
                    "or with values outside [0, 1]"
                )
            out[name] = value
        return out

    def _on_attribution(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, attribution: CausalAttributionCallback
    ) -> None:
        """Listener: prune from the attribution callback's new scores (every rank)."""
        sites, scores = attribution.sites, attribution.scores
        assert sites is not None and scores is not None
        current = {n: self.masks.get(n, torch.ones(s.n_features)) for n, s in sites.items()}
        check_scores_fit(scores, sites)
        new = self._select(scores, current)
        new = trainer.strategy.broadcast(new, src=0)  # identical on every rank, whatever happened locally
        with torch.inference_mode(False), self._full_params(trainer, pl_module):
            apply_masks(attribution.model_of(pl_module), sites, new, optimizers=trainer.optimizers)
        changed = {n: int((new[n] != current[n]).sum()) for n in new}
        self.masks = {n: m.detach().to("cpu", torch.float32).clone() for n, m in new.items()}
        self.round += 1
        self._log_round(trainer, pl_module, changed)

    def sparsity(self) -> float:
        """The share of features whose mask is 0, over all sites."""
        total = sum(m.numel() for m in self.masks.values())
        return sum(int((m == 0).sum()) for m in self.masks.values()) / total if total else 0.0

    def _log_round(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, changed: Mapping[str, int]
    ) -> None:
        sparsity = self.sparsity()
        for name, n in changed.items():
            pl_module.log(f"icp/pruned/{name}", float(n), sync_dist=True)
        pl_module.log("icp/pruned", float(sum(changed.values())), sync_dist=True)
        pl_module.log("icp/sparsity", sparsity, sync_dist=True)
        if self.mode == "soft":
            mean = torch.cat(list(self.masks.values())).mean().item() if self.masks else 1.0
            pl_module.log("icp/mask_mean", mean, sync_dist=True)
        if self.verbose:
            verb = "pruned" if self.mode == "hard" else "reweighted"
            rank_zero_info(
                f"[icp] pruning round {self.round} (epoch {trainer.current_epoch}): {verb} "
                f"{sum(changed.values())} features; sparsity {sparsity:.1%}"
            )
