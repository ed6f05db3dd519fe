"""Distributed and sharded plumbing of the ICP callbacks: where the HF model is, FSDP1/FSDP2 gathering,
sharded attribution data, cross-rank reductions of effects.

Private to :mod:`icp_lightning.callbacks` (the attribution and pruning callbacks share it); the behaviour is
described in :mod:`icp_lightning.callbacks.attribution`'s docstring.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import nn

from icp_lightning.core.effects import Effects
from icp_lightning.core.interventions import site_input_sums
from icp_lightning.core.masks import masks_folded
from icp_lightning.core.sites import Sites


def _sampler_kwargs(trainer: pl.Trainer) -> dict[str, Any]:
    """``num_replicas`` / ``rank`` of data parallelism (empty on a single device)."""
    kwargs = getattr(trainer.strategy, "distributed_sampler_kwargs", None)
    return dict(kwargs) if isinstance(kwargs, Mapping) else {}


def hf_model_of(pl_module: nn.Module, model_attr: str | None = None) -> nn.Module:
    """The Hugging Face model inside a LightningModule: the dotted ``model_attr``, else ``pl_module.model`` if that
    is a module, else the LightningModule itself; an FSDP1 wrapper found there is replaced by the module it wraps.
    Shared by the ICP callbacks.

    Raises:
        ValueError: ``model_attr`` names no attribute, or not an ``nn.Module``.
    """
    if model_attr is not None:
        obj: Any = pl_module
        for part in model_attr.split("."):
            if not hasattr(obj, part):
                children = [n for n, _ in pl_module.named_children()]
                raise ValueError(
                    f"model_attr={model_attr!r}: {type(obj).__name__} has no attribute {part!r}. "
                    f"Child modules of the LightningModule: {children}"
                )
            obj = getattr(obj, part)
        if not isinstance(obj, nn.Module):
            raise ValueError(f"model_attr={model_attr!r} is a {type(obj).__name__}, not an nn.Module")
        return _unwrap_fsdp1(obj)
    inner = getattr(pl_module, "model", None)
    return _unwrap_fsdp1(inner if isinstance(inner, nn.Module) else pl_module)


def sharding_root(trainer: pl.Trainer, pl_module: nn.Module) -> nn.Module:
    """The outermost module of the run: ``trainer.strategy.model`` (e.g. the FSDP1 root wrapper around the
    LightningModule, which owns the parameters of no nested FSDP unit), else ``pl_module``."""
    model = getattr(getattr(trainer, "strategy", None), "model", None)
    return model if isinstance(model, nn.Module) else pl_module


def _fsdp1_class() -> type[nn.Module] | None:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except Exception:  # pragma: no cover - torch without distributed
        return None
    return FullyShardedDataParallel


def _unwrap_fsdp1(module: nn.Module) -> nn.Module:
    """The module an FSDP1 wrapper holds (``.module``: also past an activation-checkpoint wrapper), else itself."""
    fsdp = _fsdp1_class()
    while fsdp is not None and isinstance(module, fsdp):
        wrapper: Any = module
        module = wrapper.module
    return module


def _has_fsdp1(root: nn.Module) -> bool:
    fsdp = _fsdp1_class()
    return fsdp is not None and any(isinstance(m, fsdp) for m in root.modules())


@contextmanager
def fsdp1_full_params(root: nn.Module, writeback: bool) -> Iterator[bool]:
    """FSDP1: every parameter under ``root`` unsharded (``summon_full_params(root, recurse=True)``) while inside.

    With ``use_orig_params=True`` the original parameters then hold their full values (views of the unsharded
    flat parameters); ``writeback=True`` copies in-place changes back into each rank's shard on exit. A
    collective: every rank must enter it. Yields whether ``root`` has FSDP1 modules (without any, it does
    nothing).
    """
    if not _has_fsdp1(root):
        yield False
        return
    from torch.distributed.fsdp import FullyShardedDataParallel

    with FullyShardedDataParallel.summon_full_params(root, recurse=True, writeback=writeback):
        yield True


@contextmanager
def _fsdp1_unwrapped(model: nn.Module) -> Iterator[None]:
    """Take every FSDP1 wrapper inside ``model`` out of the module tree while inside (its parent holds the wrapped
    module instead); put them back on exit, even when the body raises.

    Use inside :func:`fsdp1_full_params`: the wrapped modules then compute on the full parameters, and no
    wrapper forward runs (it would reshard after the forward, and all-gather at the next one: a collective that
    ranks doing different numbers of forwards would not all join). Module names are those of the unwrapped
    model, as the engine's patches (replay, readout) expect.
    """
    fsdp = _fsdp1_class()
    swaps: list[tuple[nn.Module, str, nn.Module]] = []
    if fsdp is not None:
        for parent in model.modules():
            for name, child in parent._modules.items():
                if child is not None and isinstance(child, fsdp):
                    swaps.append((parent, name, child))
    try:
        for parent, name, child in swaps:
            parent._modules[name] = child._fsdp_wrapped_module  # type: ignore[assignment]
        yield
    finally:
        for parent, name, child in reversed(swaps):
            parent._modules[name] = child


def _fsdp2_modules(model: nn.Module) -> list[nn.Module]:
    try:
        from torch.distributed.fsdp import FSDPModule
    except Exception:  # pragma: no cover - torch without distributed
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


_GROUP_FLAGS = ("post_forward_mesh_info", "reshard_after_backward", "reduce_grads", "all_reduce_grads")


@contextmanager
def _fsdp2_gathered(modules: list[nn.Module]) -> Iterator[None]:
    """Gather every FSDP2 module's parameters once and keep them unsharded until the context ends.

    Without this, every forward of a ``fully_shard`` module all-gathers its parameters (and a backward, for the
    gradient method, reshards and reduce-scatters), collectives that all ranks must join in the same order;
    ranks holding different numbers of attribution batches would hang. Inside, resharding after forward and
    backward and gradient reduction are off; on exit the previous settings are put back (FSDP2 has setters but
    no getters for them, so they are saved from the parameter groups) and the parameters are resharded.
    """
    if not modules:
        yield
        return
    saved = []
    for module in modules:
        state = module._get_fsdp_state()  # type: ignore[operator]
        groups = list(getattr(state, "_fsdp_param_groups", []))
        flags = [(g, {k: getattr(g, k) for k in _GROUP_FLAGS if hasattr(g, k)}) for g in groups]
        saved.append((state, getattr(state, "_auto_reshard_after_forward", None), flags))
    try:
        for module in modules:
            module.set_reshard_after_forward(False, recurse=False)  # type: ignore[operator]
            for setter in ("set_reshard_after_backward", "set_requires_gradient_sync"):  # not in every torch
                if hasattr(module, setter):
                    getattr(module, setter)(False, recurse=False)
        for module in modules:  # the same modules in the same order on every rank: one all-gather each
            module.unshard()  # type: ignore[operator]
        yield
    finally:
        for state, auto, flags in saved:
            if auto is not None:
                state._auto_reshard_after_forward = auto
            for group, values in flags:
                for key, value in values.items():
                    setattr(group, key, value)
        for module in modules:
            module.reshard()  # type: ignore[operator]


@contextmanager
def _attribution_context(
    model: nn.Module, root: nn.Module | None = None
) -> Iterator[Literal["auto", "never"]]:
    """Fold masks and gather sharded parameters once; yields the engine's ``replay``.

    FSDP1 (any ``FullyShardedDataParallel`` under ``root``, default ``model``): full parameters without
    writeback, wrappers out of ``model``'s tree, then fold (into the full parameters; restored before the
    gather ends). FSDP2: reshard (so folding touches the real shards), fold, gather once.
    """
    fsdp = _fsdp2_modules(model)
    for module in fsdp:
        module.reshard()  # type: ignore[operator]
    with ExitStack() as stack:
        if stack.enter_context(fsdp1_full_params(model if root is None else root, writeback=False)):
            stack.enter_context(_fsdp1_unwrapped(model))
        folded = stack.enter_context(masks_folded(model))
        stack.enter_context(_fsdp2_gathered(fsdp))
        # A mask hook on a site disables the engine's rank-1 replay; full forwards are then exact for
        # features whose mask is 1 (and pruned features are skipped by the pruning callback).
        yield "auto" if folded else "never"


@torch.no_grad()
def _global_site_means(
    trainer: pl.Trainer, model: nn.Module, sites: Sites, batches: Sequence[tuple[int, Mapping[str, Any]]]
) -> dict[str, torch.Tensor]:
    """Per-site mean input over the non-padding tokens of *all* ranks' batches (the ``mean`` intervention's
    value; the engine alone would average over this rank's shard only). Same rule as
    :func:`~icp_lightning.core.interventions.mean_site_inputs`: its sums and counts, all-reduced."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    sums, counts = site_input_sums(model, sites, (batch for _, batch in batches), device=device)
    names = list(sites)
    if trainer.world_size > 1:
        flat = torch.cat([sums[n] for n in names] + [counts[n] for n in names]).to(
            trainer.strategy.root_device
        )
        flat = trainer.strategy.reduce(flat, reduce_op="sum").cpu()
        sizes = [sums[n].numel() for n in names]
        parts = torch.split(flat, sizes + [1] * len(names))
        sums = dict(zip(names, parts[: len(names)]))
        counts = dict(zip(names, parts[len(names) :]))
    return {n: (sums[n] / counts[n].clamp_min(1.0)).float() for n in names}


def _empty_effects(sites: Sites, intervention: str, metric: str, method: str, alpha: float) -> Effects:
    zeros = {n: torch.zeros(s.n_features, dtype=torch.float64) for n, s in sites.items()}
    meta = {
        "intervention": intervention,
        "alpha": alpha if intervention == "scale" else None,
        "metric": metric,
        "method": method,
        "granularity": sites.granularity,
    }
    return Effects(zeros, {n: z.clone() for n, z in zeros.items()}, meta)


def _reduce(trainer: pl.Trainer, effects: Effects) -> Effects:
    """Sum the effects' ``sums`` and ``counts`` over all ranks (one all-reduce); meta from rank 0."""
    if trainer.world_size <= 1:
        return effects
    names = list(effects.sums)
    sizes = [effects.sums[n].numel() for n in names]
    flat = torch.cat([effects.sums[n] for n in names] + [effects.counts[n] for n in names])
    flat = trainer.strategy.reduce(flat.to(trainer.strategy.root_device), reduce_op="sum").cpu()
    parts = list(torch.split(flat, sizes + sizes))
    meta = trainer.strategy.broadcast(effects.meta, src=0)
    out = Effects(dict(zip(names, parts[: len(names)])), dict(zip(names, parts[len(names) :])), meta)
    out.audit = meta.get("audit") if isinstance(meta, dict) else None
    return out
