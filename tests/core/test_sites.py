"""Site selection: PEFT-style name matching, per-model_type defaults, head grouping, errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import transformers
from transformers.pytorch_utils import Conv1D

from icp_lightning import find_sites
from icp_lightning.core.sites import Sites, in_features_of, module_name
from tests.conftest import tiny_model

# (arch, granularity, expected site names for layer 0, features of each)
DEFAULTS = [
    ("bert", "neuron", ["bert.encoder.layer.0.attention.output.dense", "bert.encoder.layer.0.output.dense"], [32, 37]),
    ("bert", "head", ["bert.encoder.layer.0.attention.output.dense"], [4]),
    ("gpt2", "neuron", ["transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_proj"], [32, 128]),
    ("gpt2", "head", ["transformer.h.0.attn.c_proj"], [4]),
    ("llama", "neuron", ["model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj"], [32, 37]),
    ("llama", "head", ["model.layers.0.self_attn.o_proj"], [4]),
    ("t5", "neuron", ["encoder.block.0.layer.0.SelfAttention.o", "encoder.block.0.layer.1.DenseReluDense.wo"], [32, 37]),
    ("t5", "head", ["encoder.block.0.layer.0.SelfAttention.o"], [4]),
]  # fmt: skip


@pytest.mark.parametrize(("arch", "granularity", "names", "n_features"), DEFAULTS)
def test_defaults(arch, granularity, names, n_features):
    model = tiny_model(arch)
    sites = find_sites(model, granularity=granularity)
    first = "block.0." if arch == "t5" else ".0."
    layer0 = [n for n in sites.names if first in n and "decoder" not in n]
    assert layer0 == names
    assert [sites[n].n_features for n in names] == n_features
    for n in names:
        site = sites[n]
        assert site.n_features * site.group_size == site.in_features
        assert site.module is dict(model.named_modules())[n]
    assert site.kind == ("attn" if granularity == "head" else "ffn")
    assert len(sites) >= 2 * len(names)  # two layers


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        (r".*layer\.1\.output\.dense", ["bert.encoder.layer.1.output.dense"]),
        (["output.dense"], [
            "bert.encoder.layer.0.attention.output.dense", "bert.encoder.layer.0.output.dense",
            "bert.encoder.layer.1.attention.output.dense", "bert.encoder.layer.1.output.dense",
        ]),
        (["bert.encoder.layer.0.output.dense"], ["bert.encoder.layer.0.output.dense"]),
        (["classifier"], ["classifier"]),
        (r"output\.dense", None),  # fullmatch: a bare suffix regex matches nothing
        (["put.dense"], None),  # list entries match whole dotted parts, not substrings
    ],
)  # fmt: skip
def test_target_matching(pattern, expected):
    model = tiny_model("bert")
    if expected is None:
        with pytest.raises(ValueError, match="matched no linear module"):
            find_sites(model, target_modules=pattern)
    else:
        assert find_sites(model, target_modules=pattern).names == expected


def test_exclude_wins():
    model = tiny_model("bert")
    sites = find_sites(model, target_modules=["output.dense"], exclude_modules=["attention.output.dense"])
    assert sites.names == ["bert.encoder.layer.0.output.dense", "bert.encoder.layer.1.output.dense"]
    sites = find_sites(model, exclude_modules=r".*layer\.0\..*")
    assert all(".layer.1." in n for n in sites.names)


def test_gpt2_conv1d_counts_as_linear_and_is_transposed():
    sites = find_sites(tiny_model("gpt2"))
    site = sites["transformer.h.0.mlp.c_proj"]
    assert site.transposed and site.in_features == site.module.weight.shape[0] == 128


def test_errors_list_existing_modules():
    model = tiny_model("bert")
    with pytest.raises(ValueError, match="bert.encoder.layer.0.intermediate.dense"):
        find_sites(model, target_modules=["nope"])
    with pytest.raises(ValueError, match="attention output projections"):
        find_sites(model, target_modules=["intermediate.dense"], granularity="head")
    with pytest.raises(ValueError, match="granularity"):
        find_sites(model, granularity="channel")
    custom = torch.nn.Sequential(torch.nn.Linear(3, 4))
    with pytest.raises(ValueError, match="no default target_modules"):
        find_sites(custom)
    assert find_sites(custom, target_modules=["0"]).names == ["0"]


def test_peft_wrapped_layers_are_sites():
    import peft

    model = tiny_model("bert")
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["output.dense"]))
    sites = find_sites(wrapped)
    names = [n for n in sites.names if n.endswith("layer.0.output.dense")]
    assert len(names) == 1 and not any("lora_" in n or "base_layer" in n for n in sites.names)
    assert sites[names[0]].n_features == 37


def test_table_and_subset():
    sites = find_sites(tiny_model("llama"), granularity="head")
    text = repr(sites)
    assert "model.layers.1.self_attn.o_proj" in text and "2 sites, 8 features" in text
    sub = sites.subset(["model.layers.1.self_attn.o_proj"])
    assert isinstance(sub, Sites) and sub.names == ["model.layers.1.self_attn.o_proj"]
    assert sites.summary()[0]["group_size"] == 8


def test_core_imports_without_lightning():
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('lightning', 'pytorch_lightning'):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import icp_lightning.core.sites, icp_lightning.core.effects, icp_lightning.core.scores\n"
        "import icp_lightning.core.interventions\n"
        "import importlib, pkgutil, icp_lightning.core as c\n"
        "for m in pkgutil.iter_modules(c.__path__):\n"
        "    importlib.import_module('icp_lightning.core.' + m.name)\n"
        "assert not any(k.startswith(('lightning', 'pytorch_lightning')) for k in sys.modules)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_head_grouping_matches_config():
    cfg = transformers.BertConfig(vocab_size=20, hidden_size=24, num_hidden_layers=1, num_attention_heads=3)
    sites = find_sites(transformers.BertModel(cfg), granularity="head")
    site = sites.names[0]
    assert sites[site].n_features == 3 and sites[site].group_size == 8
    assert sites[site].column_mask([1]).nonzero().reshape(-1).tolist() == list(range(8, 16))


# ----------------------------------------------------------------------------------------------------------
# Wrapped models: FSDP1 / activation-checkpoint segments are dropped from names

WRAPPED_NAMES = [
    ("bert.encoder.layer.0.output.dense", "bert.encoder.layer.0.output.dense"),
    ("bert.encoder.layer.0._fsdp_wrapped_module.output.dense", "bert.encoder.layer.0.output.dense"),
    ("_fsdp_wrapped_module.model.bert.encoder.layer.1._fsdp_wrapped_module._checkpoint_wrapped_module.output.dense",
     "model.bert.encoder.layer.1.output.dense"),
    ("_fsdp_wrapped_module", ""),
    ("layer.0.my_fsdp_wrapped_module_x.dense", "layer.0.my_fsdp_wrapped_module_x.dense"),  # whole segments only
]  # fmt: skip


@pytest.mark.parametrize(("raw", "clean"), WRAPPED_NAMES)
def test_module_name_drops_wrapper_segments(raw, clean):
    assert module_name(raw) == clean


class _Wrapper(torch.nn.Module):
    """Stands in for an FSDP1 / CheckpointWrapper: holds the module under ``attr`` and forwards to it (the real
    ones need a process group; ``tests/callbacks/test_distributed.py`` runs real FSDP1)."""

    def __init__(self, module: torch.nn.Module, attr: str) -> None:
        super().__init__()
        self.attr = attr
        self.add_module(attr, module)

    def forward(self, *args, **kwargs):
        return getattr(self, self.attr)(*args, **kwargs)


def wrap_layers(model: torch.nn.Module) -> torch.nn.Module:
    """Wrap every BERT layer as FSDP1 + activation checkpointing would (``_fsdp_wrapped_module`` then
    ``_checkpoint_wrapped_module`` segments)."""
    layers = model.bert.encoder.layer
    for i, layer in enumerate(layers):
        layers[i] = _Wrapper(_Wrapper(layer, "_checkpoint_wrapped_module"), "_fsdp_wrapped_module")
    return model


@pytest.mark.parametrize("granularity", ["neuron", "head"])
def test_sites_of_a_wrapped_model_are_named_as_unwrapped(granularity):
    plain = find_sites(tiny_model("bert"), granularity=granularity)
    model = wrap_layers(tiny_model("bert"))
    sites = find_sites(model, granularity=granularity)
    assert sites.names == plain.names
    raw = {id(m): n for n, m in model.named_modules()}
    for name, site in sites.items():
        # the real (inner) Linear, found through the wrappers
        assert "_wrapped_module" in raw[id(site.module)]
        assert (site.n_features, site.group_size) == (plain[name].n_features, plain[name].group_size)
    assert sites.names == find_sites(model, target_modules=plain.names).names  # a list of names matches too


def test_in_features_of_a_flattened_weight_reads_the_layer():
    """FSDP1 (use_orig_params) outside summon_full_params: the weight is a flat view of the rank's shard."""
    linear = torch.nn.Linear(6, 4)
    linear.weight = torch.nn.Parameter(torch.zeros(0))  # this rank holds none of it
    assert in_features_of(linear) == 6
    conv = Conv1D(4, 6)  # nf=4 outputs, nx=6 inputs
    conv.weight = torch.nn.Parameter(torch.zeros(12))
    assert in_features_of(conv) == 6
    odd = torch.nn.Module()
    odd.weight = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match=r"summon_full_params"):
        in_features_of(odd)
