"""Masks under DDP and FSDP2 (``fully_shard``, DTensor parameters): two CPU processes, gloo backend.

Each rank checks, on the same input in the same process, that the distributed masked model computes what a
plain (non-distributed) copy of its current weights with the pruned columns zeroed by hand computes, before
and after AdamW steps with weight decay, and that the effective weight of pruned columns stays exactly zero.
"""

from __future__ import annotations

import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import transformers
from torch import nn

from icp_lightning.core.masks import (
    MASK_BUFFER,
    apply_masks,
    effective_weight,
    get_masks,
    make_permanent,
    remove_masks,
)
from icp_lightning.core.sites import find_sites

WORLD_SIZE = 2
TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(worker) -> None:
    """Spawn ``worker(rank, port)`` on two processes; fail (and kill them) if they hang."""
    ctx = mp.spawn(worker, args=(_free_port(),), nprocs=WORLD_SIZE, join=False)
    deadline = time.monotonic() + TIMEOUT_S
    while not ctx.join(timeout=2):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"distributed workers did not finish in {TIMEOUT_S} s")


def _init(rank: int, port: int) -> None:
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    os.environ["HF_HUB_OFFLINE"] = "1"
    transformers.logging.set_verbosity_error()
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)


def _tiny_bert() -> nn.Module:
    torch.manual_seed(0)  # the same initial weights on every rank
    cfg = transformers.BertConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=2,
    )  # fmt: skip
    return transformers.BertForSequenceClassification(cfg)


def _values(sites) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    out = {}
    for name, site in sites.items():
        v = (torch.rand(site.n_features, generator=g) < 0.6).float()
        v[0] = 0.0
        out[name] = v
    return out


def _batch(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(3, 99, (4, 6), generator=g),
        "labels": torch.randint(0, 2, (4,), generator=g),
    }


@torch.no_grad()
def _zeroed_reference(full_state: dict[str, torch.Tensor], sites, values) -> nn.Module:
    """A plain model with ``full_state`` (masks dropped) whose pruned weight columns are set to 0 by hand."""
    ref = _tiny_bert().eval()
    ref.load_state_dict({k: v for k, v in full_state.items() if not k.endswith(MASK_BUFFER)})
    modules = dict(ref.named_modules())
    for name, v in values.items():
        for f in range(sites[name].n_features):
            if v[f] == 0:
                modules[name].weight[:, f] = 0.0
    return ref


def _full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    return {
        k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
        for k, v in model.state_dict().items()
    }


def _check(model: nn.Module, sites, values, tag: str) -> None:
    """Masked output == hand-zeroed plain copy; effective pruned columns exactly 0 (collective calls)."""
    model.eval()
    probe = _batch(1000)["input_ids"]
    with torch.no_grad():
        out = model(input_ids=probe).logits
    ref = _zeroed_reference(_full_state(model), sites, values)
    with torch.no_grad():
        expected = ref(input_ids=probe).logits
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5, msg=lambda m: f"{tag}: {m}")
    for name, site in sites.items():
        ew = effective_weight(site.module)
        pruned = values[name] == 0
        assert ew.shape == (32, site.n_features), (tag, name, ew.shape)
        assert ew[:, pruned].abs().max() == 0, (tag, name)
        assert ew[:, ~pruned].abs().sum() > 0, (tag, name)


def _train(model: nn.Module, rank: int, steps: int) -> None:
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for step in range(steps):
        opt.zero_grad()
        model(**_batch(100 * rank + step)).loss.backward()  # different data on each rank
        opt.step()


def _fsdp_worker(rank: int, port: int) -> None:
    _init(rank, port)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import DTensor

        model = _tiny_bert()
        sites = find_sites(model)
        values = _values(sites)
        apply_masks(model, sites, values)  # before sharding
        mesh = init_device_mesh("cpu", (WORLD_SIZE,))
        for layer in model.bert.encoder.layer:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        assert all(isinstance(s.module.weight, DTensor) for s in sites.values())
        assert all(torch.equal(get_masks(model)[n], values[n]) for n in sites)
        _check(model, sites, values, "fsdp2 before training")
        _train(model, rank, steps=4)
        _check(model, sites, values, "fsdp2 after AdamW")
        # the raw (sharded) weights of pruned columns stayed exactly zero through AdamW: pruning lives in them
        name = sites.names[-1]
        raw = sites[name].module.weight.full_tensor()
        assert raw[:, values[name] == 0].abs().max() == 0
        # folding works on DTensor shards and keeps the outputs
        model.eval()
        probe = _batch(2000)["input_ids"]
        with torch.no_grad():
            before = model(input_ids=probe).logits
        make_permanent(model)
        assert get_masks(model) == {}
        with torch.no_grad():
            after = model(input_ids=probe).logits
        torch.testing.assert_close(after, before, atol=1e-6, rtol=1e-5)
        for name, site in sites.items():
            assert site.module.weight.full_tensor()[:, values[name] == 0].abs().max() == 0
        dist.barrier()  # no rank tears gloo down while the other still talks to it (seen: a SIGABRT at exit)
    finally:
        dist.destroy_process_group()


def _ddp_worker(rank: int, port: int) -> None:
    _init(rank, port)
    try:
        model = _tiny_bert()
        sites = find_sites(model)
        values = _values(sites)
        apply_masks(model, sites, values)  # before wrapping
        ddp = nn.parallel.DistributedDataParallel(model)
        _check(ddp.module, sites, values, "ddp before training")
        _train(ddp, rank, steps=4)
        _check(ddp.module, sites, values, "ddp after AdamW")
        # every rank holds the same weights (gradients were averaged) and the same masks
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(WORLD_SIZE)]
        dist.all_gather(gathered, flat)
        assert torch.equal(gathered[0], gathered[1])
        name = sites.names[-1]
        assert model.get_submodule(name).weight[:, values[name] == 0].abs().max() == 0  # still pruned
        remove_masks(model)
        assert get_masks(model) == {}
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_masks_under_fsdp2_fully_shard():
    _run(_fsdp_worker)


@pytest.mark.slow
def test_masks_under_ddp():
    _run(_ddp_worker)
