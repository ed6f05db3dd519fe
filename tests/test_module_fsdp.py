"""ICPContrastiveModule.configure_model: FSDP2 (fully_shard) under ModelParallelStrategy, block discovery.

The distributed test runs a real 2-process CPU fit (gloo) in a subprocess: Lightning's ModelParallelStrategy
launches the second process itself by running the same script again, so the script is a file written to
``tmp_path``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from icp_lightning.module import ICPContrastiveModule, transformer_blocks
from tests.conftest import tiny_model

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("arch", "lists"),
    [
        ("bert", ["bert.encoder.layer"]),
        ("gpt2", ["transformer.h"]),
        ("llama", ["model.layers"]),
        ("t5", ["encoder.block", "decoder.block"]),  # both stacks: comparable sizes
    ],
)
def test_transformer_blocks_are_the_block_lists(arch: str, lists: list[str]) -> None:
    model = tiny_model(arch)
    expected = [block for name in lists for block in model.get_submodule(name).children()]
    assert [id(b) for b in transformer_blocks(model)] == [id(b) for b in expected]


def test_transformer_blocks_edge_cases() -> None:
    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.small = nn.ModuleList([nn.Linear(2, 2) for _ in range(3)])  # identical, but small
            self.big = nn.ModuleList([nn.Linear(8, 8) for _ in range(2)])
            self.mixed = nn.ModuleList([nn.Linear(50, 50), nn.Conv1d(2, 2, 1)])  # not identical types
            self.empty = nn.ModuleList([nn.ReLU(), nn.ReLU()])  # no parameters

    model = Mixed()
    assert [id(b) for b in transformer_blocks(model)] == [id(b) for b in model.big]
    assert transformer_blocks(nn.Linear(2, 2)) == []
    peft = pytest.importorskip("peft")
    wrapped = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    assert len(transformer_blocks(wrapped)) == 2


def test_configure_model_without_a_mesh_does_nothing() -> None:
    module = ICPContrastiveModule(tiny_model("bert"), kl_weight=0.0)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    assert module.device_mesh is None
    module.configure_model()
    module.configure_model()
    from torch.distributed.fsdp import FSDPModule

    assert not any(isinstance(m, FSDPModule) for m in module.modules())
    after = module.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


SCRIPT = """
import json, os, sys
sys.path.insert(0, {repo!r})
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch
torch.set_num_threads(1)
import lightning.pytorch as pl
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader

from icp_lightning.module import ICPContrastiveModule
from tests.conftest import tiny_model

OUT = {out!r}


class Probe(pl.Callback):
    def __init__(self):
        self.steps = []

    def on_train_start(self, trainer, pl_module):
        self.fsdp_before = sum(isinstance(m, FSDPModule) for m in pl_module.modules())
        pl_module.configure_model()  # a second call must change nothing
        self.fsdp_after = sum(isinstance(m, FSDPModule) for m in pl_module.modules())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        params = list(pl_module.model.parameters())
        self.steps.append({{
            "loss": float(outputs["loss"]),
            "all_dtensor": all(isinstance(p, DTensor) for p in params),
            "local_numel": sum(p.to_local().numel() for p in params),
            "full_numel": sum(p.numel() for p in params),
            "rows": int(batch["input_ids"].shape[0]),
        }})

    def on_train_end(self, trainer, pl_module):
        blocks = [m for m in pl_module.model.bert.encoder.layer]
        record = {{
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "steps": self.steps,
            "fsdp_before": self.fsdp_before,
            "fsdp_after": self.fsdp_after,
            "blocks_sharded": all(isinstance(b, FSDPModule) for b in blocks),
            "root_sharded": isinstance(pl_module.model, FSDPModule),
            "mesh": list(pl_module.device_mesh.mesh_dim_names),
        }}
        with open(os.path.join(OUT, f"rank{{trainer.global_rank}}.json"), "w") as f:
            json.dump(record, f)


def main():
    pl.seed_everything(0)
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(8):
        ids = torch.randint(3, 99, (6,), generator=g)
        cf = ids.clone()
        cf[0] = 3 + (int(ids[0]) + 1) % 90
        rows.append({{"input_ids": ids, "attention_mask": torch.ones(6, dtype=torch.long),
                     "cf_input_ids": cf, "cf_attention_mask": torch.ones(6, dtype=torch.long),
                     "labels": torch.tensor(i % 2)}})
    loader = DataLoader(rows, batch_size=2, shuffle=False)
    module = ICPContrastiveModule(tiny_model("bert").train(), counterfactual="paired", kl_weight=1.0, lr=1e-3)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        max_steps=2,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Probe()],
        default_root_dir=OUT,
    )
    trainer.fit(module, train_dataloaders=loader)


if __name__ == "__main__":
    main()
"""


@pytest.mark.slow
def test_fsdp2_two_process_cpu_fit(tmp_path: Path) -> None:
    script = tmp_path / "fsdp_fit.py"
    script.write_text(textwrap.dedent(SCRIPT).format(repo=str(REPO), out=str(tmp_path)))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE"))}
    env.update({"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"})
    env.pop("MASTER_PORT", None)
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank, rec in enumerate(records):
        assert rec["rank"] == rank and rec["world_size"] == 2
        assert rec["mesh"] == ["data_parallel", "tensor_parallel"]
        assert rec["blocks_sharded"] and rec["root_sharded"]
        assert rec["fsdp_before"] == rec["fsdp_after"] == 3  # 2 encoder layers + the root
        assert len(rec["steps"]) == 2
        for step in rec["steps"]:
            assert step["all_dtensor"]
            assert step["rows"] == 2  # the distributed sampler gave each rank its own share
            assert torch.isfinite(torch.tensor(step["loss"]))
            assert step["local_numel"] < step["full_numel"]  # each rank holds a shard only
    total = sum(rec["steps"][0]["local_numel"] for rec in records)
    assert total == records[0]["steps"][0]["full_numel"]  # the two shards make up the whole model
