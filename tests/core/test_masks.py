"""Input-column masks against an independent reference: a copy of the model with its weight columns scaled.

The reference never uses ``icp_lightning.core.masks``: it multiplies ``W[:, i]`` (rows of a GPT-2 ``Conv1D``
weight) by the feature's value, one column block at a time, in a plain loop.
"""

from __future__ import annotations

import collections
import copy
import warnings

import peft
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.pytorch_utils import Conv1D

from icp_lightning.core.masks import (
    MASK_BUFFER,
    SLIM_FILE,
    apply_masks,
    effective_weight,
    get_masks,
    load_masks_state,
    load_slimmed,
    make_permanent,
    masks_folded,
    remove_masks,
    restore_masks,
    save_slimmed,
    slim,
    temporary_masks,
)
from icp_lightning.core.sites import find_sites
from tests.conftest import tiny_batch, tiny_model
from tests.core.test_sites import wrap_layers

torch.set_num_threads(1)


# --------------------------------------------------------------------------------------------- helpers


def _inputs(arch, batch):
    keys = ["input_ids", "attention_mask"] + (["labels"] if arch == "t5" else [])
    return {k: batch[k] for k in keys}


@torch.no_grad()
def _logits(model, arch, batch):
    return model(**_inputs(arch, batch)).logits


def _random_values(sites, seed=0, soft=False, keep=0.6):
    """Per site: 0/1 (or factors in [0, 1]) per feature, never all ones."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, site in sites.items():
        v = (
            torch.rand(site.n_features, generator=g)
            if soft
            else (torch.rand(site.n_features, generator=g) < keep)
        )
        v = v.float()
        v[0] = 0.0
        out[name] = v
    return out


@torch.no_grad()
def _scaled_reference(model, sites, values):
    """A copy of the unmasked ``model`` whose weight columns of feature f are multiplied by values[f]."""
    ref = copy.deepcopy(model)
    for m in ref.modules():  # a reference without any hook or buffer of the code under test
        m._buffers.pop(MASK_BUFFER, None)
        m._forward_pre_hooks.clear()
    modules = dict(ref.named_modules())
    for name, v in values.items():
        site = sites[name]
        module = modules[name]
        layer = getattr(module, "base_layer", module)
        for f in range(site.n_features):
            cols = slice(f * site.group_size, (f + 1) * site.group_size)
            if isinstance(layer, Conv1D):
                layer.weight[cols, :] *= float(v[f])
            else:
                layer.weight[:, cols] *= float(v[f])
    return ref


def _count_ops(fn):
    views = {"view", "_unsafe_view", "unsqueeze", "reshape", "expand", "t", "transpose", "alias", "detach"}

    class Counter(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name not in views:
                self.ops[name] += 1
            return func(*args, **(kwargs or {}))

    with Counter() as counter:
        fn()
    return counter.ops


# --------------------------------------------------------------------------------------------- mechanism


@pytest.mark.parametrize("group_size", [1, 4])
def test_one_elementwise_product_per_masked_module(group_size):
    torch.manual_seed(0)
    layer = nn.Linear(8, 3)
    x = torch.randn(2, 5, 8)
    plain = _count_ops(lambda: layer(x))
    from icp_lightning.core.sites import Site, Sites

    n = 8 // group_size
    apply_masks(layer, Sites([Site("", layer, n, group_size)]), {"": torch.linspace(0, 1, n)})
    masked = _count_ops(lambda: layer(x))
    assert masked - plain == collections.Counter({"mul": 1})
    assert plain - masked == collections.Counter()


def test_whole_model_adds_one_product_per_site():
    model = tiny_model("bert")
    batch = tiny_batch("bert")
    sites = find_sites(model)
    plain = _count_ops(lambda: _logits(model, "bert", batch))
    apply_masks(model, sites, _random_values(sites))
    masked = _count_ops(lambda: _logits(model, "bert", batch))
    assert masked - plain == collections.Counter({"mul": len(sites)})


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama", "t5"])
@pytest.mark.parametrize("soft", [False, True])
def test_masked_forward_equals_scaled_weight_columns(arch, soft):
    model = tiny_model(arch)
    batch = tiny_batch(arch)
    sites = find_sites(model)
    values = _random_values(sites, soft=soft)
    unmasked = _logits(model, arch, batch)
    ref = _scaled_reference(model, sites, values)
    apply_masks(model, sites, values)
    out = _logits(model, arch, batch)
    torch.testing.assert_close(out, _logits(ref, arch, batch), atol=1e-6, rtol=1e-5)
    assert not torch.allclose(out, unmasked, atol=1e-4)  # the masks do something
    for name, v in values.items():
        torch.testing.assert_close(get_masks(model)[name], v, atol=0, rtol=0)


@pytest.mark.parametrize("arch", ["bert", "llama", "gpt2"])
def test_head_mask_covers_its_group_of_columns(arch):
    model = tiny_model(arch)
    batch = tiny_batch(arch)
    sites = find_sites(model, granularity="head")
    values = {name: torch.tensor([1.0, 0.0, 0.25, 1.0]) for name in sites}
    ref = _scaled_reference(model, sites, values)
    original = {name: site.module.weight.detach().clone() for name, site in sites.items()}
    apply_masks(model, sites, values)
    torch.testing.assert_close(_logits(model, arch, batch), _logits(ref, arch, batch), atol=1e-6, rtol=1e-5)
    for name, site in sites.items():
        assert site.group_size == 8
        assert get_masks(model)[name].shape == (4,)
        ew = effective_weight(site.module)
        weight = original[name].t() if site.transposed else original[name]
        torch.testing.assert_close(ew, weight * site.expand(values[name]), atol=1e-7, rtol=1e-6)
        assert ew[:, 8:16].abs().sum() == 0 and ew[:, 16:24].abs().sum() > 0


def test_effective_weight_conv1d_is_in_linear_layout():
    model = tiny_model("gpt2")
    sites = find_sites(model, target_modules=["mlp.c_proj"])
    name = sites.names[0]
    v = _random_values(sites)[name]
    apply_masks(model, sites, {name: v})
    layer = sites[name].module
    assert isinstance(layer, Conv1D)
    ew = effective_weight(layer)
    assert ew.shape == (32, 128)
    torch.testing.assert_close(ew, layer.weight.detach().t() * v, atol=0, rtol=0)
    assert ew[:, v == 0].abs().sum() == 0


def test_bad_values_raise_and_install_nothing():
    model = tiny_model("bert")
    sites = find_sites(model)
    a, b = sites.names[:2]
    good = torch.ones(sites[a].n_features)
    cases = [
        ({"nope": good}, "unknown sites"),
        ({a: good, b: torch.ones(3)}, f"shape \\[{sites[b].n_features}\\]"),
        ({a: good, b: torch.full((sites[b].n_features,), 1.5)}, "must lie in \\[0, 1\\]"),
        ({a: good, b: torch.full((sites[b].n_features,), -0.1)}, "must lie in \\[0, 1\\]"),
        ({a: good, b: torch.full((sites[b].n_features,), float("nan"))}, "must lie in \\[0, 1\\]"),
    ]
    for values, message in cases:
        with pytest.raises(ValueError, match=message):
            apply_masks(model, sites, values)
        assert get_masks(model) == {}
    other = find_sites(tiny_model("bert", seed=1))
    with pytest.raises(ValueError, match="belongs to another model"):
        apply_masks(model, other, {a: good})
    heads = find_sites(model, granularity="head")
    with pytest.raises(ValueError, match="one value per head"):
        apply_masks(model, heads, {a: torch.ones(32)})


def test_apply_again_replaces_the_mask_cumulatively():
    model = tiny_model("llama")
    batch = tiny_batch("llama")
    sites = find_sites(model)
    first = _random_values(sites, seed=1)
    second = {n: v * _random_values(sites, seed=2)[n] for n, v in first.items()}  # masks are cumulative
    ref = _scaled_reference(model, sites, second)
    apply_masks(model, sites, first)
    apply_masks(model, sites, second)
    torch.testing.assert_close(
        _logits(model, "llama", batch), _logits(ref, "llama", batch), atol=1e-6, rtol=1e-5
    )
    assert all(torch.equal(get_masks(model)[n], second[n]) for n in sites)
    # one hook per module, whatever the number of calls
    assert all(len(site.module._forward_pre_hooks) == 1 for site in sites.values())
    # a pruned feature cannot come back: its weights are zero
    name = sites.names[0]
    revived = torch.ones(sites[name].n_features)
    with pytest.raises(ValueError, match="are pruned .* cannot be given a mask above 0"):
        apply_masks(model, sites, {name: revived})
    assert torch.equal(get_masks(model)[name], second[name])  # nothing changed


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_remove_masks_keeps_the_pruning_and_temporary_masks_restore_bit_for_bit(arch):
    model = tiny_model(arch)
    batch = tiny_batch(arch)
    before = _logits(model, arch, batch)
    keys = set(model.state_dict())
    sites = find_sites(model)
    values = _random_values(sites)
    with temporary_masks(model, sites, values):
        masked = _logits(model, arch, batch)
        assert not torch.equal(masked, before)
    assert torch.equal(_logits(model, arch, batch), before)  # weights and guards restored bit for bit
    assert get_masks(model) == {} and all(not mod._forward_pre_hooks for mod in model.modules())
    apply_masks(model, sites, values)
    assert set(model.state_dict()) == keys  # the guards are not in the state dict
    clone = copy.deepcopy(model)  # removal must not depend on stored hook handles
    for m in (model, clone):
        remove_masks(m)
        assert torch.equal(_logits(m, arch, batch), masked)  # the pruning lives in the weights
        assert set(m.state_dict()) == keys
        assert all(not mod._forward_pre_hooks for mod in m.modules())
        assert get_masks(m) == {}


# --------------------------------------------------------------------------------------------- training


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_pruned_columns_stay_zero_under_adamw_with_momentum(arch):
    torch.manual_seed(0)
    model = tiny_model(arch).train()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    batch = tiny_batch(arch, n=8)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)

    def step():
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()

    for _ in range(10):  # momentum built before pruning
        step()
    sites = find_sites(model)
    values = _random_values(sites, seed=3)
    raw_before = {n: s.module.weight.detach().clone() for n, s in sites.items()}
    apply_masks(model, sites, values)
    for _ in range(10):
        step()
    model.eval()
    for name, site in sites.items():
        pruned = values[name] == 0
        ew = effective_weight(site.module)
        assert ew[:, pruned].abs().max() == 0 and ew[:, ~pruned].abs().sum() > 0
        # the raw weight of pruned columns did move (momentum + decay): only the mask keeps them out
        raw, before = site.module.weight.detach(), raw_before[name]
        raw, before = (raw.t(), before.t()) if site.transposed else (raw, before)
        assert (raw[:, pruned] != before[:, pruned]).all() and raw[:, pruned].abs().min() > 0
    ref = _scaled_reference(model, sites, values)  # trained weights, columns zeroed by hand
    torch.testing.assert_close(_logits(model, arch, batch), _logits(ref, arch, batch), atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------------------------- PEFT LoRA


def _lora_bert():
    model = tiny_model("bert")
    cfg = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["output.dense"], init_lora_weights=False, lora_dropout=0.0
    )
    return peft.get_peft_model(model, cfg).eval()


def test_lora_adapter_path_reads_the_masked_input():
    model = _lora_bert()
    batch = tiny_batch("bert")
    sites = find_sites(model)
    assert all(isinstance(s.module, peft.tuners.lora.LoraLayer) for s in sites.values())
    values = _random_values(sites, seed=4)
    apply_masks(model, sites, values)
    out = _logits(model, "bert", batch)
    name = sites.names[1]
    lora_a = sites[name].module.lora_A["default"].weight
    pruned = values[name] == 0
    with torch.no_grad():
        saved = lora_a.detach().clone()
        lora_a[:, pruned] += 100.0
        assert torch.equal(_logits(model, "bert", batch), out)  # pruned adapter columns change nothing
        lora_a.copy_(saved)
        lora_a[:, ~pruned] += 1.0
        assert not torch.allclose(_logits(model, "bert", batch), out, atol=1e-4)  # the others do
        lora_a.copy_(saved)
    # independent reference: merge the adapters, then zero the columns by hand
    merged = copy.deepcopy(model)
    remove_masks(merged)
    merged = merged.merge_and_unload()
    ref = _scaled_reference(
        merged, find_sites(merged), {n.removeprefix("base_model.model."): v for n, v in values.items()}
    )
    torch.testing.assert_close(out, _logits(ref, "bert", batch), atol=1e-6, rtol=1e-5)
    for n, site in sites.items():
        layer = site.module
        delta = layer.lora_B["default"].weight @ layer.lora_A["default"].weight * layer.scaling["default"]
        expected = (layer.base_layer.weight + delta) * values[n]
        torch.testing.assert_close(effective_weight(layer), expected, atol=1e-6, rtol=1e-5)


def test_lora_make_permanent_folds_lora_a_columns():
    model = _lora_bert()
    batch = tiny_batch("bert")
    sites = find_sites(model)
    values = _random_values(sites, seed=5, soft=True)
    apply_masks(model, sites, values)
    out = _logits(model, "bert", batch)
    make_permanent(model)
    assert get_masks(model) == {}
    torch.testing.assert_close(_logits(model, "bert", batch), out, atol=1e-6, rtol=1e-5)
    for name, site in sites.items():
        zero = values[name] == 0
        assert site.module.lora_A["default"].weight[:, zero].abs().sum() == 0
        assert site.module.base_layer.weight[:, zero].abs().sum() == 0


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_masks_applied_before_peft_wrapping_survive_training_and_merge(arch):
    """Prune, then ``get_peft_model``, then a plain training loop that never calls our code, then merge: the
    adapter path must read the pruned input from the first forward on, so the merged weights keep the pruning."""
    model = tiny_model(arch)
    batch = tiny_batch(arch)
    sites = find_sites(model)
    values = _random_values(sites, seed=9)  # hard zeros and ones
    apply_masks(model, sites, values)
    targets = sorted({name.rsplit(".", 1)[-1] for name in sites.names})
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=targets, lora_dropout=0.0))
    optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-2)
    wrapped.train()
    for _ in range(3):  # B starts at zero: the first step moves B, the later ones A through B
        optimizer.zero_grad()
        wrapped(**_inputs(arch, batch)).logits.float().pow(2).mean().backward()
        optimizer.step()
    wrapped.eval()
    out = _logits(wrapped, arch, batch)
    merged = wrapped.merge_and_unload()
    remove_masks(merged)  # no guard left: the weights alone must carry the pruning
    assert not any(m._forward_pre_hooks for m in merged.modules())
    for name, value in values.items():
        layer = merged.get_submodule(name)
        w = layer.weight.t() if isinstance(layer, Conv1D) else layer.weight
        assert w.detach()[:, sites[name].expand(value) == 0].abs().max() == 0, name
    torch.testing.assert_close(_logits(merged, arch, batch), out, atol=1e-5, rtol=1e-4)


def test_masks_applied_before_peft_wrapping_warn():
    model = tiny_model("bert")
    sites = find_sites(model)
    apply_masks(model, sites, _random_values(sites))
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["output.dense"]))
    with pytest.warns(UserWarning, match="adapter path reads the unmasked input"):
        get_masks(wrapped)


# --------------------------------------------------------------------------------------------- folding


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
def test_make_permanent_keeps_outputs_and_removes_everything(arch):
    model = tiny_model(arch)
    batch = tiny_batch(arch)
    keys = set(model.state_dict())
    sites = find_sites(model)
    values = _random_values(sites, seed=6, soft=True)
    apply_masks(model, sites, values)
    out = _logits(model, arch, batch)
    make_permanent(model)
    torch.testing.assert_close(_logits(model, arch, batch), out, atol=1e-6, rtol=1e-5)
    assert set(model.state_dict()) == keys
    assert all(not m._forward_pre_hooks for m in model.modules())
    for name, site in sites.items():
        w = site.module.weight.detach()
        w = w.t() if site.transposed else w
        assert w[:, values[name] == 0].abs().sum() == 0


def test_wrapped_model_masks_are_named_as_unwrapped_and_fold():
    """FSDP1 / checkpoint wrapper segments: get_masks, masks_folded and load_masks_state use unwrapped names."""
    plain, model = tiny_model("bert"), wrap_layers(tiny_model("bert"))
    batch = tiny_batch("bert")
    sites = find_sites(model)
    values = _random_values(sites, seed=8)
    apply_masks(model, sites, values)
    apply_masks(plain, find_sites(plain), values)
    assert list(get_masks(model)) == sites.names
    out = _logits(model, "bert", batch)
    torch.testing.assert_close(out, _logits(plain, "bert", batch), atol=0, rtol=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with masks_folded(model) as folded:
        assert folded and get_masks(model) == {}
        torch.testing.assert_close(_logits(model, "bert", batch), out, atol=1e-6, rtol=1e-5)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # restored bit for bit
    assert list(get_masks(model)) == sites.names
    fresh = wrap_layers(tiny_model("bert", seed=1))
    # Unwrapped keys, as FSDP1's own state dicts write them (a legacy state dict with mask keys); the stand-in
    # wrapper lacks FSDP's hooks that rename keys for load_state_dict, so only the masks (installed by
    # load_masks_state itself) are checked here.
    legacy = {**plain.state_dict(), **{f"{n}.{MASK_BUFFER}": v for n, v in values.items()}}
    load_masks_state(fresh, legacy, strict=False)
    loaded = get_masks(fresh)
    assert list(loaded) == sites.names
    assert all(torch.equal(loaded[n], values[n]) for n in sites)


def test_make_permanent_refuses_flattened_weights_and_changes_nothing():
    """FSDP1 outside summon_full_params: weights are flat shards; folding must wait for the full parameters."""
    model = tiny_model("bert")
    sites = find_sites(model)
    apply_masks(model, sites, _random_values(sites))
    last = sites[sites.names[-1]].module
    last.weight = torch.nn.Parameter(last.weight.detach().reshape(-1).clone())  # a flat (sharded) view
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"FSDP1.*summon_full_params\(model, writeback=True\)"):
        make_permanent(model)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert list(get_masks(model)) == sites.names
    with pytest.raises(ValueError, match="flat shard"):
        effective_weight(last)


# --------------------------------------------------------------------------------------------- state dicts


@pytest.mark.parametrize(("arch", "granularity"), [("bert", "neuron"), ("llama", "head"), ("gpt2", "neuron")])
def test_state_dict_into_fresh_model_gives_identical_outputs(arch, granularity):
    model = tiny_model(arch)
    batch = tiny_batch(arch)
    sites = find_sites(model, granularity=granularity)
    values = _random_values(sites, seed=7, soft=True)
    unpruned = model.state_dict()
    unpruned = {k: v.clone() for k, v in unpruned.items()}
    apply_masks(model, sites, values)
    state = model.state_dict()
    assert not any(k.endswith(MASK_BUFFER) for k in state)
    fresh = tiny_model(arch, seed=1)  # other weights, no masks
    fresh.load_state_dict(state)  # strict, plain torch
    assert torch.equal(_logits(fresh, arch, batch), _logits(model, arch, batch))
    hard = {n: (v != 0).float() for n, v in values.items()}
    restored = restore_masks(fresh, find_sites(fresh, granularity=granularity))
    assert restored.keys() == {n for n, v in hard.items() if (v == 0).any()}
    assert all(torch.equal(restored[n], hard[n]) for n in restored)
    # A legacy state dict (icp_lightning < 0.2): unfolded weights plus mask keys; load_masks_state folds them.
    legacy = {**unpruned, **{f"{n}.{MASK_BUFFER}": v for n, v in values.items()}}
    older = tiny_model(arch, seed=2)
    with pytest.raises(RuntimeError, match="icp_mask"):
        older.load_state_dict(legacy)
    load_masks_state(older, legacy)
    torch.testing.assert_close(_logits(older, arch, batch), _logits(model, arch, batch), atol=1e-6, rtol=1e-5)
    assert all(torch.equal(get_masks(older)[n], values[n]) for n in sites)
    # a state dict without mask keys removes the guards of the model it is loaded into
    load_masks_state(older, state)
    assert get_masks(older) == {}
    with pytest.raises(ValueError, match="no linear module"):
        load_masks_state(fresh, {"bert.nothing.icp_mask": torch.ones(3)})


# --------------------------------------------------------------------------------------------- slim


SLIM_CASES = {
    # arch: (granularity, per layer: (ffn mask or None, head mask or None))
    "bert": [([1] * 20 + [0] * 17, [1, 0, 1, 1]), ([0] * 30 + [1] * 7, [0, 0, 0, 0])],
    "llama": [([1] * 5 + [0] * 32, [1, 1, 0, 0]), ([0, 1] * 18 + [1], [0, 1, 1, 1])],
    "gpt2": [([1] * 100 + [0] * 28, [1, 1, 0, 1]), ([0] * 128, [0, 1, 0, 0])],
}


def _slim_masks(arch, model):
    """FFN neuron masks and head masks (two calls: the same model, two granularities)."""
    ffn = find_sites(model, granularity="neuron")
    ffn = ffn.subset([n for n, s in ffn.items() if s.kind == "ffn"])
    heads = find_sites(model, granularity="head")
    layers = SLIM_CASES[arch]
    apply_masks(model, ffn, {n: torch.tensor(layers[i][0], dtype=torch.float) for i, n in enumerate(ffn)})
    apply_masks(model, heads, {n: torch.tensor(layers[i][1], dtype=torch.float) for i, n in enumerate(heads)})
    return ffn, heads


@pytest.mark.parametrize("arch", ["bert", "llama", "gpt2"])
def test_slim_equals_masked_model_and_round_trips(arch, tmp_path):
    model = tiny_model(arch)
    batch = tiny_batch(arch)
    ffn, heads = _slim_masks(arch, model)
    # soft factors on kept features are folded, not lost
    soft = {n: get_masks(model)[n] * torch.linspace(0.5, 1.0, ffn[n].n_features) for n in ffn}
    apply_masks(model, ffn, soft)
    masked = _logits(model, arch, batch)
    n_params = sum(p.numel() for p in model.parameters())
    slimmed = slim(model)
    assert slimmed is model and get_masks(model) == {}
    assert sum(p.numel() for p in model.parameters()) < n_params
    torch.testing.assert_close(_logits(model, arch, batch), masked, atol=1e-5, rtol=1e-5)
    modules = dict(model.named_modules())
    for i, name in enumerate(ffn):
        kept = max(1, sum(SLIM_CASES[arch][i][0]))  # an all-pruned layer keeps one zero neuron
        prefix = name.rsplit(".", 2 if arch == "bert" else 1)[0]
        producers = {
            "bert": [prefix + ".intermediate.dense"],
            "llama": [prefix + ".gate_proj", prefix + ".up_proj"],
            "gpt2": [prefix + ".c_fc"],
        }[arch]
        assert effective_weight(modules[name]).shape[1] == kept
        for p in producers:
            assert effective_weight(modules[p]).shape[0] == kept
    for i, name in enumerate(heads):
        kept = max(1, sum(SLIM_CASES[arch][i][1]))
        assert effective_weight(modules[name]).shape[1] == kept * 8
    if arch == "llama":  # layer 0: kept heads {0, 1} share kv head 0; layer 1: {1, 2, 3} split unevenly
        attn0, attn1 = model.model.layers[0].self_attn, model.model.layers[1].self_attn
        assert attn0.k_proj.weight.shape[0] == 8 and attn0.num_key_value_groups == 2
        assert attn1.k_proj.weight.shape[0] == 24 and attn1.num_key_value_groups == 1

    save_slimmed(model, tmp_path)
    assert (tmp_path / SLIM_FILE).exists()
    loaded = load_slimmed(tmp_path, type(model))
    torch.testing.assert_close(_logits(loaded, arch, batch), _logits(model, arch, batch), atol=0, rtol=0)
    assert {k: v.shape for k, v in loaded.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }


def test_slim_then_train_step_runs():
    model = tiny_model("llama").train()
    _slim_masks("llama", model)
    slim(model)
    batch = tiny_batch("llama")
    model(**batch).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_save_slimmed_refuses_masks_and_load_needs_spec(tmp_path):
    model = tiny_model("bert")
    sites = find_sites(model)
    apply_masks(model, sites, _random_values(sites))
    with pytest.raises(ValueError, match="call slim"):
        save_slimmed(model, tmp_path)
    with pytest.raises(ValueError, match="not written by save_slimmed"):
        load_slimmed(tmp_path, type(model))


def test_slim_unsupported_site_raises_before_changing_anything():
    model = tiny_model("t5")
    sites = find_sites(model, granularity="head")
    apply_masks(model, sites, {n: torch.tensor([1.0, 0.0, 1.0, 1.0]) for n in sites})
    with pytest.raises(NotImplementedError, match="SelfAttention.o"):
        slim(model)
    assert len(get_masks(model)) == len(sites)
    lora = _lora_bert()
    lora_sites = find_sites(lora)
    apply_masks(lora, lora_sites, _random_values(lora_sites))
    with pytest.raises(NotImplementedError, match="merge_and_unload"):
        slim(lora)


def test_slim_t5_ffn():
    model = tiny_model("t5")
    batch = tiny_batch("t5")
    sites = find_sites(model)
    ffn = sites.subset([n for n, s in sites.items() if s.kind == "ffn"])
    apply_masks(model, ffn, _random_values(ffn, seed=8))
    masked = _logits(model, "t5", batch)
    slim(model)
    torch.testing.assert_close(_logits(model, "t5", batch), masked, atol=1e-5, rtol=1e-5)
    assert model.encoder.block[0].layer[1].DenseReluDense.wi.weight.shape[0] < 37


def test_no_warnings_on_the_normal_path():
    model = tiny_model("bert")
    sites = find_sites(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply_masks(model, sites, _random_values(sites))
        get_masks(model)
        make_permanent(model)
