"""Feature sites: which hidden features exist and where they are read.

A *feature* h_{l,i} is one input column of a target linear layer (or a block of ``head_dim`` columns for an
attention head). The weights ``theta_{l+1,:,i}`` that read it are what pruning later zeroes. Sites are chosen
PEFT-style (``target_modules`` / ``exclude_modules``), with per-``model_type`` defaults: the FFN
down-projection and the attention output projection of every layer (the table is
:data:`~icp_lightning.core.architectures.ARCHITECTURES`).

Names are the module names of the *unwrapped* model: the segments that FSDP1 (``FullyShardedDataParallel``,
``_fsdp_wrapped_module``) and activation checkpointing (``CheckpointWrapper``, ``_checkpoint_wrapped_module``) add
are dropped (:func:`module_name`, as FSDP's own state dicts do), so sites, scores and masks are named the same
whether or not the model is wrapped.

Example:
    >>> import transformers
    >>> cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
    ...                               num_attention_heads=4, intermediate_size=24)
    >>> model = transformers.BertForSequenceClassification(cfg)
    >>> sites = find_sites(model)
    >>> sites.names[:2]
    ['bert.encoder.layer.0.attention.output.dense', 'bert.encoder.layer.0.output.dense']
    >>> sites["bert.encoder.layer.0.output.dense"].n_features
    24
    >>> find_sites(model, granularity="head").total_features
    8
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from icp_lightning.core.architectures import (  # DEFAULT_TARGETS, SiteKind: importable here as before
    ARCHITECTURES,
    DEFAULT_TARGETS,  # noqa: F401
    SiteKind,
    config_heads,
    site_kind,
)
from icp_lightning.core.choices import Granularity

try:  # GPT-2 style layers store the weight transposed; they count as linear.
    from transformers.pytorch_utils import Conv1D
except Exception:  # pragma: no cover - transformers is a hard dependency, but keep core importable
    Conv1D = None  # type: ignore[assignment,misc]


def is_linear(module: nn.Module) -> bool:
    """True for ``nn.Linear`` (and subclasses) and GPT-2's transposed ``Conv1D``."""
    return isinstance(module, nn.Linear) or (Conv1D is not None and isinstance(module, Conv1D))


def _base_layer(module: nn.Module) -> nn.Module:
    """The plain linear layer inside a PEFT adapter wrapper (``lora.Linear.base_layer``), else the module."""
    base = getattr(module, "base_layer", None)
    return base if isinstance(base, nn.Module) and is_linear(base) else module


def is_transposed(module: nn.Module) -> bool:
    """True when the weight is stored ``[in_features, out_features]`` (GPT-2 ``Conv1D``)."""
    base = _base_layer(module)
    return Conv1D is not None and isinstance(base, Conv1D)


def in_features_of(module: nn.Module) -> int:
    """Number of input columns of a linear-like module.

    Read from the weight's shape; a weight that is not 2-D (FSDP1 with ``use_orig_params=True`` outside
    ``summon_full_params``: a flat view of this rank's shard, possibly empty) falls back to the layer's
    ``in_features`` (``nn.Linear``) or ``nx`` (GPT-2 ``Conv1D``).
    """
    base = _base_layer(module)
    weight = base.weight
    assert isinstance(weight, torch.Tensor)
    if weight.ndim == 2:
        return int(weight.shape[0] if is_transposed(base) else weight.shape[1])
    n_in = getattr(base, "nx" if is_transposed(base) else "in_features", None)
    if isinstance(n_in, int) and not isinstance(n_in, bool):
        return n_in
    raise ValueError(
        f"cannot tell the input columns of {type(base).__name__}: its weight has shape {list(weight.shape)} (a "
        "flattened FSDP1 shard?) and it has no in_features attribute; read it inside "
        "FullyShardedDataParallel.summon_full_params(model)"
    )


#: Module-name segments that wrappers insert: FSDP1 (``FullyShardedDataParallel``) and activation checkpointing.
WRAPPER_SEGMENTS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module")


def module_name(name: str) -> str:
    """``name`` without the segments that FSDP1 and activation-checkpoint wrappers insert.

    Example:
        >>> module_name("bert.encoder.layer.0._fsdp_wrapped_module._checkpoint_wrapped_module.output.dense")
        'bert.encoder.layer.0.output.dense'
        >>> module_name("_fsdp_wrapped_module")
        ''
    """
    if not any(seg in name for seg in WRAPPER_SEGMENTS):
        return name
    return ".".join(p for p in name.split(".") if p not in WRAPPER_SEGMENTS)


def named_modules(model: nn.Module) -> dict[str, nn.Module]:
    """``{module_name(name): module}`` over ``model.named_modules()``, in model order.

    A wrapper and the module it wraps share a name; the wrapped (innermost) module wins, so the result is what
    ``dict(model.named_modules())`` gives for the unwrapped model.
    """
    out: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        out[module_name(name)] = module
    return out


def _is_target_candidate(module: nn.Module) -> bool:
    if is_linear(module):
        return True
    base = getattr(module, "base_layer", None)  # a PEFT-wrapped linear layer
    return isinstance(base, nn.Module) and is_linear(base)


def _matches(name: str, pattern: str | Sequence[str]) -> bool:
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(name == p or name.endswith("." + p) for p in pattern)


def _model_type(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


@dataclass(frozen=True)
class Site:
    """One target linear layer whose input columns are features.

    Attributes:
        name: the module's full name, as in ``model.named_modules()`` (without FSDP1 / checkpoint wrapper
            segments: :func:`module_name`).
        module: the module itself.
        n_features: how many features (neurons, or heads).
        group_size: input columns per feature (1 for neurons, ``head_dim`` for heads).
        kind: ``"ffn"`` / ``"attn"`` for the architecture's known FFN / attention output projections.
    """

    name: str
    module: nn.Module
    n_features: int
    group_size: int = 1
    kind: SiteKind = "other"

    @property
    def in_features(self) -> int:
        """Input columns of the layer (``n_features * group_size``)."""
        return self.n_features * self.group_size

    @property
    def transposed(self) -> bool:
        """Whether the weight is stored transposed (GPT-2 ``Conv1D``)."""
        return is_transposed(self.module)

    def columns(self, feature: int) -> slice:
        """The input columns of one feature."""
        if not 0 <= feature < self.n_features:
            raise IndexError(f"feature {feature} out of range for site {self.name!r} ({self.n_features})")
        return slice(feature * self.group_size, (feature + 1) * self.group_size)

    def column_mask(self, features: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """A boolean ``[in_features]`` mask that is True on the columns of ``features``."""
        feats = torch.as_tensor(features, dtype=torch.long).reshape(-1)
        mask = torch.zeros(self.n_features, dtype=torch.bool)
        mask[feats] = True
        return mask.repeat_interleave(self.group_size)

    def expand(self, per_feature: torch.Tensor) -> torch.Tensor:
        """Expand a ``[..., n_features]`` tensor to ``[..., in_features]`` (one value per column)."""
        return per_feature.repeat_interleave(self.group_size, dim=-1)


class Sites(Mapping[str, Site]):
    """An ordered mapping ``site name -> Site``, printable as a table.

    Example:
        >>> import transformers
        >>> cfg = transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2)
        >>> sites = find_sites(transformers.GPT2LMHeadModel(cfg), target_modules=["mlp.c_proj"])
        >>> print(sites)  # doctest: +NORMALIZE_WHITESPACE
        site                      kind  features  cols/feature
        transformer.h.0.mlp.c_proj ffn  64        1
        1 site, 64 features
    """

    def __init__(self, sites: Sequence[Site], granularity: Granularity = "neuron") -> None:
        self._sites = {s.name: s for s in sites}
        self.granularity: Granularity = granularity

    def __getitem__(self, name: str) -> Site:
        try:
            return self._sites[name]
        except KeyError:
            raise KeyError(f"no site named {name!r}; sites are: {list(self._sites)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._sites)

    def __len__(self) -> int:
        return len(self._sites)

    @property
    def names(self) -> list[str]:
        """Site names in model order."""
        return list(self._sites)

    @property
    def total_features(self) -> int:
        """Features over all sites."""
        return sum(s.n_features for s in self._sites.values())

    def subset(self, names: Sequence[str]) -> Sites:
        """A ``Sites`` with only ``names`` (in model order)."""
        wanted = set(names)
        missing = wanted - set(self._sites)
        if missing:
            raise KeyError(f"unknown sites {sorted(missing)}; sites are: {list(self._sites)}")
        return Sites([s for n, s in self._sites.items() if n in wanted], self.granularity)

    def summary(self) -> list[dict[str, object]]:
        """One dict per site (name, kind, n_features, group_size): JSON-friendly."""
        return [
            {"name": s.name, "kind": s.kind, "n_features": s.n_features, "group_size": s.group_size}
            for s in self._sites.values()
        ]

    def __repr__(self) -> str:
        rows = [("site", "kind", "features", "cols/feature")]
        rows += [(s.name, s.kind, str(s.n_features), str(s.group_size)) for s in self._sites.values()]
        width = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, width)).rstrip() for r in rows]
        n = len(self._sites)
        lines.append(f"{n} site{'s' if n != 1 else ''}, {self.total_features} features")
        return "\n".join(lines)


def linear_module_names(model: nn.Module) -> list[str]:
    """Names of every linear-like module (what ``target_modules`` can match), wrapper segments dropped."""
    return [
        n
        for n, m in named_modules(model).items()
        if n and _is_target_candidate(m) and not _is_inside_adapter(n)
    ]


def _is_inside_adapter(name: str) -> bool:
    # PEFT puts its own Linear layers (lora_A / lora_B / base_layer) under the wrapped module.
    parts = name.split(".")
    return any(p in ("lora_A", "lora_B", "base_layer", "lora_magnitude_vector") for p in parts)


def find_sites(
    model: nn.Module,
    target_modules: str | Sequence[str] | None = None,
    exclude_modules: str | Sequence[str] | None = None,
    granularity: Granularity = "neuron",
) -> Sites:
    """Find the feature sites of a model.

    Args:
        model: any ``nn.Module``; Hugging Face models get per-``model_type`` defaults.
        target_modules: a regex (``re.fullmatch`` on the full module name) or a list of names, each matching a
            module's full name or its last dotted parts (``"mlp.c_proj"``). ``None``: the architecture's FFN
            down-projections and attention output projections (``"head"``: attention output projections only).
        exclude_modules: same forms; a module matched here is never a site, whatever ``target_modules`` says.
        granularity: ``"neuron"`` (one feature per input column) or ``"head"`` (one per attention head,
            ``head_dim`` columns each, head count read from ``model.config``).

    Returns:
        The sites in model order.

    Raises:
        ValueError: nothing matched, an unknown granularity, no default for this architecture, or ``"head"`` on
            a module that is not an attention output projection. The message lists the linear modules that
            exist.
    """
    if granularity not in ("neuron", "head"):
        raise ValueError(f"granularity must be 'neuron' or 'head', got {granularity!r}")
    model_type = _model_type(model)
    arch = ARCHITECTURES.get(model_type or "")
    available = linear_module_names(model)
    if target_modules is None:
        if arch is None:
            raise ValueError(
                f"no default target_modules for model_type={model_type!r} (defaults exist for "
                f"{sorted(ARCHITECTURES)}); pass target_modules=. Linear modules: {_short(available)}"
            )
        target_modules = arch.attn if granularity == "head" else f"(?:{arch.ffn})|(?:{arch.attn})"
    if isinstance(target_modules, (list, tuple)) and not target_modules:
        raise ValueError("target_modules is an empty list; pass None for the architecture's defaults")

    config = getattr(model, "config", None)
    n_heads = config_heads(config) if config is not None else None
    modules = named_modules(model)
    sites: list[Site] = []
    for name in available:
        if not _matches(name, target_modules):
            continue
        if exclude_modules is not None and _matches(name, exclude_modules):
            continue
        module = modules[name]
        kind: SiteKind = site_kind(model_type, name)
        n_in = in_features_of(module)
        if granularity == "head":
            if kind != "attn":
                attn_names = [n for n in available if arch and re.fullmatch(arch.attn, n)]
                raise ValueError(
                    f"granularity='head' needs attention output projections, but {name!r} is not one "
                    f"(model_type={model_type!r}). Attention output projections: {_short(attn_names)}"
                )
            if n_heads is None or n_in % n_heads:
                raise ValueError(
                    f"cannot split {name!r} ({n_in} inputs) into heads: config head count is {n_heads}"
                )
            sites.append(Site(name, module, n_heads, n_in // n_heads, kind))
        else:
            sites.append(Site(name, module, n_in, 1, kind))
    if not sites:
        raise ValueError(
            f"target_modules={target_modules!r} (exclude_modules={exclude_modules!r}) matched no linear "
            f"module. Linear modules that exist: {_short(available)}"
        )
    return Sites(sites, granularity)


def _short(names: Sequence[str], limit: int = 40) -> str:
    if len(names) <= limit:
        return str(list(names))
    return str(list(names[:limit]))[:-1] + f", ... ({len(names) - limit} more)]"


# ----------------------------------------------------------------------------------------------------------
# Scores and the model they belong to


def model_description(model: nn.Module) -> dict[str, str | None]:
    """``{"model_type": ..., "model_class": ...}`` of a (possibly PEFT-wrapped) model, for scores' metadata.

    Example:
        >>> import transformers
        >>> cfg = transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2)
        >>> model_description(transformers.GPT2LMHeadModel(cfg))
        {'model_type': 'gpt2', 'model_class': 'GPT2LMHeadModel'}
    """
    base = model
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base) and hasattr(model, "peft_config"):
        base = get_base()
    return {"model_type": _model_type(base), "model_class": type(base).__name__}


def _size_of(value: object) -> int:
    if isinstance(value, Site):
        return value.n_features
    if isinstance(value, int):
        return value
    return int(torch.as_tensor(value).numel())


def check_scores_fit(
    scores: Mapping[str, object],
    sites: Mapping[str, Site] | Mapping[str, int],
    granularity: str | None = None,
) -> None:
    """Raise unless every scored site is among ``sites`` with as many features as it has scores.

    Every caller that applies scores to a model (the pruning callback, ``icp prune``, the module's
    ``set_scores``, :func:`~icp_lightning.core.selection.select_masks`) checks them here, so scores of another
    model (or another granularity) always fail the same way.

    Args:
        scores: site -> ``[n_features]`` scores (a ``Scores`` or a plain dict of tensors).
        sites: the model's ``Sites``, or site -> feature count (e.g. the current masks' sizes).
        granularity: the scores' granularity, for the message (default: read from ``scores.meta``).

    Raises:
        ValueError: "scores were computed for a different model: ..." naming the site and both sizes.

    Example:
        >>> check_scores_fit({"a": torch.zeros(3)}, {"a": 4})
        Traceback (most recent call last):
        ...
        ValueError: scores were computed for a different model: site 'a' has 3 scores but 4 features in this model
    """
    meta = getattr(scores, "meta", None) or {}
    g = granularity or meta.get("granularity")
    model_g = getattr(sites, "granularity", None)
    unknown = [n for n in scores if n not in sites]
    if unknown:
        raise ValueError(
            f"scores were computed for a different model: they name sites {_short(unknown, 5)} that this model "
            f"does not have (its sites: {_short(list(sites), 5)})"
        )
    for name in scores:
        have, want = _size_of(scores[name]), _size_of(sites[name])
        if have != want:
            detail = ""
            if g is not None or model_g is not None:
                detail = (
                    f" (scores at {g or 'unknown'} granularity, sites at {model_g or 'unknown'} granularity)"
                )
            raise ValueError(
                f"scores were computed for a different model: site {name!r} has {have} scores but {want} "
                f"features in this model{detail}"
            )


def sites_for_scores(
    model: nn.Module, scores: Mapping[str, object], granularity: Granularity | None = None
) -> Sites:
    """The sites of ``model`` that ``scores`` refer to, rebuilt from the scores' metadata.

    Reads ``scores.meta["granularity"]`` (written by :func:`~icp_lightning.core.scores.spuriousness` and the
    attribution callback) and checks ``scores.meta["model_type"]`` against the model's, then each site's size.

    Args:
        model: the model to apply the scores to.
        scores: a ``Scores`` (with metadata) or a plain dict.
        granularity: only for scores without metadata (files of icp_lightning < 0.2, or plain dicts): the
            granularity they were computed at. Scores whose metadata says otherwise raise.

    Returns:
        The scored sites, in model order.

    Raises:
        ValueError: no granularity (old files: pass ``granularity=``), another ``model_type``, sites the model does
            not have, or sizes that do not fit ("scores were computed for a different model: ...").

    Example:
        >>> import transformers
        >>> from icp_lightning.core.scores import Scores
        >>> cfg = transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2)
        >>> model = transformers.GPT2LMHeadModel(cfg)
        >>> name = "transformer.h.0.attn.c_proj"
        >>> scores = Scores({name: torch.zeros(2)}, {name: torch.ones(2)},
        ...                 {"granularity": "head", "model_type": "gpt2"})
        >>> sites_for_scores(model, scores)[name].group_size
        8
    """
    meta = getattr(scores, "meta", None) or {}
    saved = meta.get("granularity")
    if saved is not None and granularity is not None and saved != granularity:
        raise ValueError(
            f"the scores were computed at {saved!r} granularity, not {granularity!r}: drop granularity="
        )
    g = saved or granularity
    if g is None:
        raise ValueError(
            "these scores do not say their granularity (a file written before icp_lightning 0.2, or a plain dict): "
            "recompute them with `icp attribute` (or the attribution callback), or in Python pass "
            "sites_for_scores(model, scores, granularity='neuron' | 'head')"
        )
    want_type = meta.get("model_type")
    have = model_description(model)
    if want_type is not None and have["model_type"] is not None and want_type != have["model_type"]:
        raise ValueError(
            f"scores were computed for a different model: model_type {want_type!r} "
            f"({meta.get('model_class')}), this model is {have['model_type']!r} ({have['model_class']})"
        )
    names = list(scores)
    if not names:
        raise ValueError("the scores name no site")
    try:
        found = find_sites(model, target_modules=names, granularity=g)
    except ValueError as err:
        raise ValueError(f"scores were computed for a different model: {err}") from None
    check_scores_fit(scores, found, g)
    return found.subset(names)
