"""Which batches the attribution callback reads: the validation dataloaders (named as the data module or
LightningModule names them) or the user's ``attribution_data``, and this process's share of them."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities.model_helpers import is_overridden

from icp_lightning.callbacks._distributed import _sampler_kwargs

#: The ``attribution_data`` value that names the data module's training sample rather than a validation set.
TRAIN_SAMPLE = "train"

__all__ = [
    "TRAIN_SAMPLE",
    "attribution_datasets",
    "checked_attribution_data",
    "naming_dataset",
    "set_names",
    "shard",
    "training_sample",
    "validation_loaders",
]


def checked_attribution_data(attribution_data: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """``attribution_data`` as a dict, or a ValueError saying what it must be."""
    if attribution_data is None:
        return None
    if not isinstance(attribution_data, Mapping) or not attribution_data:
        raise ValueError(
            "attribution_data must be a non-empty mapping data set name -> DataLoader (or -> the name of "
            f"a validation dataloader), or None for the validation dataloaders; got {attribution_data!r}"
        )
    for key, value in attribution_data.items():
        if not isinstance(key, str):
            raise ValueError(f"attribution_data keys must be data set names (str), got {key!r}")
        if not isinstance(value, str) and not isinstance(value, Iterable):
            raise ValueError(
                f"attribution_data[{key!r}] must be a DataLoader (an iterable of dict batches) or the "
                f"name of a validation dataloader, got {type(value).__name__}"
            )
    return dict(attribution_data)


def validation_loaders(trainer: pl.Trainer, pl_module: pl.LightningModule, who: str) -> dict[str, Iterable]:
    """Validation set name -> dataloader, from the datamodule, the module or ``fit(val_dataloaders=...)``,
    named by the owner's ``val_set_names`` / ``eval_set_names`` / ``eval_sets`` (else ``val_<i>``)."""
    datamodule: Any = getattr(trainer, "datamodule", None)
    loaders: Any = None
    if datamodule is not None and is_overridden("val_dataloader", datamodule):
        loaders = datamodule.val_dataloader()
    elif is_overridden("val_dataloader", pl_module):
        loaders = pl_module.val_dataloader()
    else:  # dataloaders passed to fit(val_dataloaders=...)
        source = getattr(
            getattr(getattr(trainer.fit_loop, "epoch_loop", None), "val_loop", None), "_data_source", None
        )
        instance = getattr(source, "instance", None)
        if instance is not None and not isinstance(instance, (pl.LightningModule, pl.LightningDataModule)):
            loaders = instance
    if loaders is None:
        raise ValueError(
            f"{who} found no validation dataloaders to attribute on: give "
            "attribution_data={name: DataLoader}, or define val_dataloader() on the datamodule or module"
        )
    if isinstance(loaders, Mapping):
        return {str(k): v for k, v in loaders.items()}
    if isinstance(loaders, (list, tuple)):
        names = set_names(datamodule, len(loaders)) or set_names(pl_module, len(loaders))
        names = names or [f"val_{i}" for i in range(len(loaders))]
        return dict(zip(names, loaders))
    names = set_names(datamodule, 1) or set_names(pl_module, 1) or ["val"]
    return {names[0]: loaders}


def training_sample(trainer: pl.Trainer, name: str) -> Iterable:
    """The data module's seeded sample of its training split (``attribution_dataloaders(["train"])`` of an
    :class:`~icp_lightning.data.ICPDataModule`): what ``attribution_data={name: "train"}`` reads, so that
    attribution need not read an evaluation set."""
    datamodule: Any = getattr(trainer, "datamodule", None)
    loaders = getattr(datamodule, "attribution_dataloaders", None)
    if not callable(loaders):
        raise ValueError(
            f"attribution_data[{name!r}] = {TRAIN_SAMPLE!r} reads the data module's training sample, but this fit "
            "has no data module with attribution_dataloaders() (an ICPDataModule has it): give a DataLoader instead"
        )
    return loaders([TRAIN_SAMPLE])[TRAIN_SAMPLE]  # type: ignore[no-any-return]


def attribution_datasets(
    trainer: pl.Trainer, pl_module: pl.LightningModule, attribution_data: Mapping[str, Any] | None, who: str
) -> dict[str, Iterable]:
    """Data set name -> iterable of batches, in a fixed order."""
    if attribution_data is None:
        return validation_loaders(trainer, pl_module, who)
    out: dict[str, Iterable] = {}
    val: dict[str, Iterable] | None = None
    for name, value in attribution_data.items():
        if isinstance(value, str):
            val = val if val is not None else validation_loaders(trainer, pl_module, who)
            if value in val:
                out[name] = val[value]
            elif value == TRAIN_SAMPLE:
                out[name] = training_sample(trainer, name)
            else:
                raise ValueError(
                    f"attribution_data[{name!r}] names the validation dataloader {value!r}, but the "
                    f"validation dataloaders are {list(val)} (or {TRAIN_SAMPLE!r}: the data module's "
                    "training sample)"
                )
        else:
            out[name] = value
    return out


def shard(
    trainer: pl.Trainer, name: str, loader: Iterable, max_batches: int | None
) -> list[tuple[int, Mapping[str, Any]]]:
    """This rank's ``(global index, batch)`` pairs: batch ``i`` (``i < max_batches``) goes to rank
    ``i % world_size``. Every rank walks the same batches, so all ranks raise together on an empty set."""
    kwargs = _sampler_kwargs(trainer)
    world = int(kwargs.get("num_replicas", trainer.world_size))
    rank = int(kwargs.get("rank", trainer.global_rank))
    out = []
    seen = 0
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        seen += 1
        if i % world == rank:
            out.append((i, batch))
    if seen == 0:
        raise ValueError(
            f"attribution data set {name!r} is empty (its DataLoader gave no batches): scores from it would "
            "be NaN. Give it data, or drop it from attribution_data and dataset_weights"
        )
    return out


@contextmanager
def naming_dataset(name: str) -> Iterator[None]:
    """Prefix a ValueError raised inside (a NaN effect, a metric of the wrong shape) with the data set's name."""
    try:
        yield
    except ValueError as err:
        raise ValueError(f"attribution data set {name!r}: {err}") from err


def set_names(owner: Any, n: int) -> list[str] | None:
    """Names of ``n`` validation sets from ``val_set_names`` / ``eval_set_names`` / ``eval_sets`` on ``owner``
    (if they fit); the one rule the attribution and repair callbacks use."""
    for attr in ("val_set_names", "eval_set_names", "eval_sets"):
        names = getattr(owner, attr, None)
        if isinstance(names, Mapping):
            names = list(names)
        if isinstance(names, (list, tuple)) and len(names) == n and all(isinstance(x, str) for x in names):
            return list(names)
    return None
