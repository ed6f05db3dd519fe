"""Two-process CPU worker for ``test_distributed.py``: fit a tiny BERT with both ICP callbacks under DDP, FSDP2 or
FSDP1.

Run as ``python -m tests.callbacks._dist_worker {ddp,fsdp2,fsdp1,fsdp1-configure_model} OUT_DIR [exact|gradient]``
from the repository root; Lightning
starts the second process itself (it runs this module again with the rank in the environment). Each rank
writes ``OUT_DIR/rank{r}.pt``: per round the scores and effects (sums, counts) and the masks chosen, and at the
end the masks on the model and the largest |effective weight| on pruned columns. Rank 0 also writes, per round,
the full model state (masks included) the round was computed on, so the test can redo the round in one process.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402

from icp_lightning.callbacks import CausalAttributionCallback, CausalPruningCallback  # noqa: E402
from icp_lightning.callbacks._distributed import fsdp1_full_params  # noqa: E402
from icp_lightning.core.masks import effective_weight, get_masks  # noqa: E402
from tests.callbacks._helpers import TinyClassifier  # noqa: E402

ROUNDS = 3
N_VAL, VAL_BATCH = 15, 5  # 3 batches per data set: rank 0 scores batches 0 and 2, rank 1 batch 1
# (5 per batch: the swap partners of batches 0, 1, 2 differ; with 4 they happen to coincide)
INTERVENTIONS = (
    "mask",
    "scale",
    "swap",
    "mean",
)  # swap: partners seeded per global batch; mean: global means


class FSDP2Classifier(TinyClassifier):
    """``fully_shard`` on every encoder layer, then on the HF model (the root), over the data-parallel mesh."""

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.model.bert.encoder.layer:
            fully_shard(layer, mesh=mesh)
        fully_shard(self.model, mesh=mesh)


class FSDP1Classifier(TinyClassifier):
    """FSDP1 applied by the module itself: each encoder layer, then the HF model, in its own
    ``FullyShardedDataParallel`` (``pl_module.model`` is then a wrapper; Lightning adds no root of its own)."""

    def configure_model(self) -> None:
        from torch.distributed.fsdp import FullyShardedDataParallel

        if isinstance(self.model, FullyShardedDataParallel):
            return
        kwargs: dict[str, Any] = {"device_id": torch.device("cpu"), "use_orig_params": True}
        for i, layer in enumerate(self.model.bert.encoder.layer):
            self.model.bert.encoder.layer[i] = FullyShardedDataParallel(layer, **kwargs)
        self.model = FullyShardedDataParallel(self.model, **kwargs)


def _cpu_fsdp1_strategy(**kwargs: Any) -> Any:
    """Lightning's ``FSDPStrategy`` on CPU with gloo, changed in one place.

    Lightning refuses ``FSDPStrategy`` without CUDA by checking ``type(strategy) is FSDPStrategy``, which a
    subclass passes. Its ``_setup_model`` wraps the LightningModule with ``device_id=root_device.index``, which
    is ``None`` on CPU, and torch's FSDP1 then asks for an accelerator; ``device_id=torch.device("cpu")`` works.
    So the subclass makes the same root wrapper (the strategy's own kwargs: ``use_orig_params=True``, the
    auto-wrap policy, the sharding strategy) with the CPU device, and leaves the rest of ``_setup_model`` and
    everything else (training steps, full state dicts, barriers) to Lightning.
    """
    import warnings

    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp import FullyShardedDataParallel

    class CPUFSDPStrategy(FSDPStrategy):
        def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
            if not any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
                model = FullyShardedDataParallel(
                    module=model,
                    cpu_offload=self.cpu_offload,
                    mixed_precision=self.mixed_precision_config,
                    sharding_strategy=self.sharding_strategy,
                    device_id=torch.device("cpu"),
                    **self.kwargs,
                )
            policy = self.kwargs.get("auto_wrap_policy")
            with warnings.catch_warnings():  # "the model is already wrapped": by the lines above
                warnings.filterwarnings("ignore", message=".*auto_wrap_policy.*")
                model = super()._setup_model(model)
            if policy is not None:  # Lightning drops it from its kwargs on an already wrapped model
                self.kwargs["auto_wrap_policy"] = policy
            return model

    return CPUFSDPStrategy(**kwargs)


def _full_state(trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, torch.Tensor]:
    """The HF model's whole state dict as plain CPU tensors, keys as without any wrapper (DTensors gathered, FSDP1
    through a full state dict of the root: collectives, so every rank calls it).

    FSDP1: not ``strategy.lightning_module_state_dict()``, whose ``offload_to_cpu=True`` makes torch 2.13's FSDP1
    segfault when the parameters already are on the CPU (also without the ICP callbacks).
    """
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.tensor import DTensor

    if isinstance(trainer.strategy, FSDPStrategy):
        root = trainer.strategy.model
        assert root is not None
        config = FullStateDictConfig(offload_to_cpu=False, rank0_only=False)
        with FSDP.state_dict_type(root, StateDictType.FULL_STATE_DICT, config):
            full = root.state_dict()
        return {
            k[len("model.") :]: v.detach().cpu().clone() for k, v in full.items() if k.startswith("model.")
        }
    out = {}
    for key, value in pl_module.model.state_dict().items():
        if isinstance(value, DTensor):
            value = value.full_tensor()
        out[key] = value.detach().cpu().clone()
    return out


def _values(obj: Any) -> dict[str, Any]:
    return {
        "sums": {k: v.clone() for k, v in obj.sums.items()},
        "counts": {k: v.clone() for k, v in obj.counts.items()},
    }


class Record(pl.Callback):
    """After both ICP callbacks: what each rank ended up with."""

    def __init__(
        self, out: Path, attribution: CausalAttributionCallback, pruning: CausalPruningCallback
    ) -> None:
        self.out, self.attribution, self.pruning = out, attribution, pruning
        self.rounds: list[dict[str, Any]] = []

    def snapshot(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, cb: CausalAttributionCallback
    ) -> None:
        """Attribution listener, registered before the pruning callback's: the state this round was scored on."""
        state = _full_state(trainer, pl_module)
        if trainer.global_rank == 0:
            torch.save(state, self.out / f"round{cb.round}_state.pt")
        self.rounds.append(
            {
                "scores": _values(cb.scores),
                "effects": {"|".join(k): _values(e) for k, e in cb.effects.items()},
            }
        )

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.rounds[-1]["masks"] = {n: m.clone() for n, m in self.pruning.masks.items()}

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from torch.distributed.fsdp import FullyShardedDataParallel

        sites = self.attribution.sites
        assert sites is not None
        pruned_max = {}
        # FSDP1: read each rank's shards (written back by make_permanent, if it ran) as full weights
        with fsdp1_full_params(trainer.strategy.model, writeback=False):  # type: ignore[arg-type]
            for name, mask in self.pruning.masks.items():
                weight = effective_weight(sites[name].module).detach()  # gathers a DTensor weight: every rank
                columns = weight[:, sites[name].expand(mask.to(weight.device)) == 0]
                pruned_max[name] = float(columns.abs().max()) if columns.numel() else 0.0
        torch.save(
            {
                "rounds": self.rounds,
                "model_masks": get_masks(pl_module.model),
                "pruned_max": pruned_max,
                "world_size": trainer.world_size,
                "strategy": type(trainer.strategy).__name__,
                "site_names": list(sites),
                "fsdp1_wrappers": sum(
                    isinstance(m, FullyShardedDataParallel)
                    for m in trainer.strategy.model.modules()  # type: ignore[union-attr]
                ),
            },
            self.out / f"rank{trainer.global_rank}.pt",
        )


def main(kind: str, out: Path, method: str = "exact") -> None:
    out.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(0)
    if kind == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        strategy: Any = DDPStrategy(process_group_backend="gloo")
        module: TinyClassifier = TinyClassifier(n_val=N_VAL, val_batch=VAL_BATCH)
    elif kind == "fsdp2":
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(
            data_parallel_size=2, tensor_parallel_size=1, process_group_backend="gloo"
        )
        module = FSDP2Classifier(n_val=N_VAL, val_batch=VAL_BATCH)
    elif kind == "fsdp1":
        from transformers.models.bert.modeling_bert import BertLayer

        # Lightning wraps the LightningModule in the FSDP root and each BertLayer in its own FSDP unit.
        strategy = _cpu_fsdp1_strategy(auto_wrap_policy={BertLayer}, process_group_backend="gloo")
        module = TinyClassifier(n_val=N_VAL, val_batch=VAL_BATCH)
    elif kind == "fsdp1-configure_model":
        strategy = _cpu_fsdp1_strategy(process_group_backend="gloo")
        module = FSDP1Classifier(n_val=N_VAL, val_batch=VAL_BATCH)
    else:
        raise SystemExit(f"unknown kind {kind!r}: ddp, fsdp2, fsdp1 or fsdp1-configure_model")
    attribution = CausalAttributionCallback(
        interventions=INTERVENTIONS,
        dataset_weights={"id": 1.0, "ood": -1.0},
        progress=False,
        method=method,
    )
    # FSDP1: fold the masks at the end, inside summon_full_params(writeback=True); the test reads the shards.
    pruning = CausalPruningCallback(amount=0.1, verbose=False, make_permanent=kind.startswith("fsdp1"))
    record = Record(out, attribution, pruning)
    attribution.add_listener(record.snapshot)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_epochs=ROUNDS,
        limit_train_batches=2,
        callbacks=[attribution, pruning, record],
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        default_root_dir=str(out),
    )
    trainer.fit(module)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1], Path(sys.argv[2]), *sys.argv[3:4])
