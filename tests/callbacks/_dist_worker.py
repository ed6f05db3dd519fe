"""Two-process CPU worker for ``test_distributed.py``: fit a tiny BERT with both ICP callbacks under DDP or FSDP2.

Run as ``python -m tests.callbacks._dist_worker {ddp,fsdp2} OUT_DIR [exact|gradient]`` from the repository root; Lightning
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


def _full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict as plain CPU tensors (DTensors gathered: a collective, so every rank calls it)."""
    from torch.distributed.tensor import DTensor

    out = {}
    for key, value in model.state_dict().items():
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
        state = _full_state(pl_module.model)
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
        sites = self.attribution.sites
        assert sites is not None
        pruned_max = {}
        for name, mask in self.pruning.masks.items():
            weight = effective_weight(sites[name].module)  # gathers a DTensor weight: every rank
            columns = weight[:, sites[name].expand(mask.to(weight.device)) == 0]
            pruned_max[name] = float(columns.abs().max()) if columns.numel() else 0.0
        torch.save(
            {
                "rounds": self.rounds,
                "model_masks": get_masks(pl_module.model),
                "pruned_max": pruned_max,
                "world_size": trainer.world_size,
                "strategy": type(trainer.strategy).__name__,
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
    else:
        raise SystemExit(f"unknown kind {kind!r}: ddp or fsdp2")
    attribution = CausalAttributionCallback(
        interventions=INTERVENTIONS,
        dataset_weights={"id": 1.0, "ood": -1.0},
        progress=False,
        method=method,
    )
    pruning = CausalPruningCallback(amount=0.1, verbose=False)
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
