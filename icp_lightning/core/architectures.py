"""Per-``model_type`` knowledge, in one table: default sites, head layout, and what slimming needs.

Everything icp_lightning knows about a Hugging Face architecture is an :class:`Architecture` in
:data:`ARCHITECTURES`, keyed by ``config.model_type``:

* **default sites** (:func:`~icp_lightning.core.sites.find_sites` without ``target_modules``): the regexes of
  the FFN down-projections (``ffn``) and of the attention output projections (``attn``), matched with
  ``re.fullmatch`` on the module's full name. They also give each site its kind (:func:`site_kind`).
* **head layout**: a head site splits its ``attn`` projection's input columns into ``config`` heads (the head
  count is the first positive one of :data:`HEAD_COUNT_ATTRS`); for slimming, the attention module that holds
  the q/k/v projections and the head size is described by an :class:`AttentionLayout` (``attention``).
* **slimming** (:func:`~icp_lightning.core.slim.slim`): the suffixes of the FFN down-projection and of the
  layers that produce its input (``ffn_down``, ``ffn_up``), and the attention family (``attention``, a key of
  :data:`ATTENTION_LAYOUTS`). An architecture without them still has sites, masks and scores; ``slim``
  refuses it and ``make_permanent`` folds its masks instead.

Adding an architecture:
    1. Print ``[n for n, _ in model.named_modules()]`` of a tiny instance (built from a config, no download)
       and find, in one layer, the FFN down-projection (whose *input* is the FFN's hidden neurons) and the
       attention output projection (whose input is the concatenated heads).
    2. Add an entry to :data:`ARCHITECTURES` with those two regexes (copy the style of ``"llama"``: anchor on
       the layer index, ``.*layers\\.\\d+\\.mlp\\.down_proj``). That is enough for ``find_sites``,
       attribution, pruning and folding; ``find_sites(model)`` should now list two sites per layer.
    3. For ``slim``: set ``ffn_down`` / ``ffn_up`` (the producers' outputs are the down-projection's inputs)
       and ``attention`` to a family of :data:`ATTENTION_LAYOUTS` whose q/k/v layout it shares (BERT-style
       separate ``query``/``key``/``value``, DistilBERT ``q_lin``..., GPT-2 fused ``c_attn``, LLaMA-style
       grouped-query ``q_proj``/``k_proj``/``v_proj``). A new q/k/v layout also needs a branch in
       ``icp_lightning.core.slim._resize_heads``.
    4. Test it like ``tests/core/test_masks.py`` does for the others: a tiny model from a config, sites found,
       ``slim`` output equal to the masked model's, ``save_slimmed`` / ``load_slimmed`` round trip.

Example:
    >>> ARCHITECTURES["gpt2"].ffn
    '.*h\\\\.\\\\d+\\\\.mlp\\\\.c_proj'
    >>> site_kind("gpt2", "transformer.h.3.attn.c_proj"), site_kind("gpt2", "lm_head"), site_kind(None, "x")
    ('attn', 'other', 'other')
    >>> sorted(t for t, a in ARCHITECTURES.items() if a.attention is None)  # slim keeps their heads
    ['t5']
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from icp_lightning.core.choices import SiteKind


@dataclass(frozen=True)
class AttentionLayout:
    """Where an attention family keeps what slimming its heads needs.

    Attributes:
        out_proj: suffix of the output projection's name (the ``attn`` site).
        module: suffix that replaces ``out_proj`` in the site's name to reach the module holding the q/k/v
            projections and the head counts (``""``: the parent of the output projection).
        head_dim: that module's attribute holding the size of one head.
    """

    out_proj: str
    module: str
    head_dim: str


#: Attention family -> its layout. The q/k/v projections and head-count attributes of each family are
#: handled by ``icp_lightning.core.slim._resize_heads``.
ATTENTION_LAYOUTS: dict[str, AttentionLayout] = {
    "bert": AttentionLayout(".output.dense", ".self", "attention_head_size"),
    "distilbert": AttentionLayout(".out_lin", "", "attention_head_size"),
    "llama": AttentionLayout(".o_proj", "", "head_dim"),
    "gpt2": AttentionLayout(".c_proj", "", "head_dim"),
}


@dataclass(frozen=True)
class Architecture:
    """What icp_lightning knows of one ``model_type``.

    Attributes:
        ffn: regex (``re.fullmatch`` on the full module name) of the FFN down-projections.
        attn: regex of the attention output projections (the only modules head granularity accepts).
        ffn_down: for slimming, the suffix of the FFN down-projection's name (``None``: FFN not slimmable).
        ffn_up: for slimming, the suffixes (replacing ``ffn_down``) of the layers whose outputs are the
            down-projection's inputs; those present in the model are resized together.
        attention: for slimming heads, the attention family, a key of :data:`ATTENTION_LAYOUTS` (``None``:
            heads not slimmable).
    """

    ffn: str
    attn: str
    ffn_down: str | None = None
    ffn_up: tuple[str, ...] = ()
    attention: str | None = None


_BERT_LIKE = ("bert", "roberta", "xlm-roberta")
_LLAMA_LIKE = ("llama", "mistral", "qwen2")

_BERT = Architecture(
    ffn=r".*layer\.\d+\.output\.dense",
    attn=r".*layer\.\d+\.attention\.output\.dense",
    ffn_down=".output.dense",
    ffn_up=(".intermediate.dense",),
    attention="bert",
)
_LLAMA = Architecture(
    ffn=r".*layers\.\d+\.mlp\.down_proj",
    attn=r".*layers\.\d+\.self_attn\.o_proj",
    ffn_down=".down_proj",
    ffn_up=(".gate_proj", ".up_proj"),
    attention="llama",
)

#: ``config.model_type`` -> what icp_lightning knows of it. Add new architectures here (see the module notes).
ARCHITECTURES: dict[str, Architecture] = {
    **{t: _BERT for t in _BERT_LIKE},
    "distilbert": Architecture(
        ffn=r".*layer\.\d+\.ffn\.lin2",
        attn=r".*layer\.\d+\.attention\.out_lin",
        ffn_down=".lin2",
        ffn_up=(".lin1",),
        attention="distilbert",
    ),
    "gpt2": Architecture(
        ffn=r".*h\.\d+\.mlp\.c_proj",
        attn=r".*h\.\d+\.attn\.c_proj",
        ffn_down=".c_proj",
        ffn_up=(".c_fc",),
        attention="gpt2",
    ),
    **{t: _LLAMA for t in _LLAMA_LIKE},
    "t5": Architecture(  # heads are not slimmable: the relative position bias is shared by all layers
        ffn=r".*block\.\d+\.layer\.\d+\.DenseReluDense\.wo",
        attn=r".*block\.\d+\.layer\.\d+\.(SelfAttention|EncDecAttention)\.o",
        ffn_down=".wo",
        ffn_up=(".wi", ".wi_0", ".wi_1"),
    ),
}

#: ``model_type`` -> (regex of FFN down-projections, regex of attention output projections): a copy of the
#: default sites of :data:`ARCHITECTURES`, kept for ``from icp_lightning.core.sites import DEFAULT_TARGETS``.
#: ``find_sites`` reads :data:`ARCHITECTURES`: add an architecture there, not here.
DEFAULT_TARGETS: dict[str, tuple[str, str]] = {t: (a.ffn, a.attn) for t, a in ARCHITECTURES.items()}

#: ``config`` attributes that hold the number of attention heads, in the order they are tried.
HEAD_COUNT_ATTRS = ("num_attention_heads", "n_head", "n_heads", "num_heads")


def site_kind(model_type: str | None, name: str) -> SiteKind:
    """``"ffn"`` / ``"attn"`` when ``name`` is one of the architecture's default sites, else ``"other"``."""
    arch = ARCHITECTURES.get(model_type or "")
    if arch is None:
        return "other"
    if re.fullmatch(arch.ffn, name):
        return "ffn"
    if re.fullmatch(arch.attn, name):
        return "attn"
    return "other"


def config_heads(config: object) -> int | None:
    """The number of attention heads a model ``config`` declares (``None``: it declares none)."""
    for attr in HEAD_COUNT_ATTRS:
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
