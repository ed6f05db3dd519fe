"""Counterfactuals x' of a batch x for the KL term of ICP fine-tuning.

Each strategy is a small object with one method,

    build(model, batch, scores, sites) -> CounterfactualOutput | None

that returns either the ``logits`` of the counterfactual forward (representation-level strategies) or a new
input ``batch`` x' that the caller pushes through the model like any input, plus an ``info`` dict (reconstruction
errors, edited positions, ...). ``None`` means "no counterfactual for this batch" (no spuriousness scores yet,
or no feature selected); the caller then skips the KL term. Any object with such a ``build`` method can be
used in place of the built-in ones.

Built-in strategies, by registry name (see :func:`build_counterfactual`):

- ``"intervention"``: :class:`InterventionCounterfactual`, the model itself under do(h = v) on the spurious
  features (score > ``tau_c`` or the top-k), v from an in-batch partner (swap) or 0 (mask).
- ``"inversion"``: :class:`InversionCounterfactual`, x' = M^{-1}(M(x | do(h = v))) by optimising the input
  embeddings so that the *unintervened* model reproduces the intervened activations, optionally projected
  onto real tokens.
- ``"token_edit"``: :class:`TokenEditCounterfactual`, a discrete inverse: greedy HotFlip-style token edits.
- ``"paired"``: :class:`PairedCounterfactual`, x' carried by the batch (``cf_input_ids``, ...).
- ``"token_swap"``: :class:`TokenSwapCounterfactual`, a word-pair lexicon (he <-> she, ...) applied to the
  text or to the token ids.

Example:
    >>> import torch, transformers
    >>> from icp_lightning.core.sites import find_sites
    >>> _ = torch.manual_seed(0)
    >>> cfg = transformers.BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1,
    ...                               num_attention_heads=2, intermediate_size=8)
    >>> model = transformers.BertForSequenceClassification(cfg).eval()
    >>> sites = find_sites(model, target_modules=r".*layer\\.0\\.output\\.dense")
    >>> scores = {"bert.encoder.layer.0.output.dense": torch.tensor([0.0, 0.9, 0.0, 0.0, 0.7, 0.0, 0.0, 0.0])}
    >>> cf = build_counterfactual("intervention", kind="mask", tau_c=0.5)
    >>> out = cf.build(model, {"input_ids": torch.randint(5, 30, (2, 6))}, scores, sites)
    >>> out.logits.shape, out.info["n_features"]
    (torch.Size([2, 2]), 2)
"""

from __future__ import annotations

import inspect
import math
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from torch import nn

from icp_lightning.core.interventions import (
    Intervention,
    capture_site_inputs,
    counterfactual_batch,
    intervene,
    model_inputs,
    partner_permutation,
)
from icp_lightning.core.sites import Sites

CounterfactualName = Literal["intervention", "inversion", "token_edit", "paired", "token_swap"]
CounterfactualKind = Literal["swap", "mask"]
Partner = Literal["permutation", "paired"]
EditKind = Literal["mask", "delete", "hotflip"]
Projection = Literal["cosine", "l2"]


@dataclass
class CounterfactualOutput:
    """What a counterfactual strategy returns.

    Attributes:
        logits: the counterfactual forward's logits (representation-level strategies), or ``None``.
        batch: a new input batch x' (same keys as the batch: ``input_ids`` or ``inputs_embeds``, masks, labels)
            to push through the model like any input, or ``None``.
        info: diagnostics, e.g. ``reconstruction_error`` (per step), ``edited_positions``.
    """

    logits: torch.Tensor | None = None
    batch: dict[str, Any] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.logits is None) == (self.batch is None):
            raise ValueError(
                "a CounterfactualOutput needs exactly one of logits= (a forward) or batch= (inputs x')"
            )


@runtime_checkable
class CounterfactualStrategy(Protocol):
    """Anything with a ``build(model, batch, scores, sites)`` method is a counterfactual strategy."""

    def build(
        self,
        model: nn.Module,
        batch: Mapping[str, Any],
        scores: Mapping[str, torch.Tensor] | None,
        sites: Sites | None,
    ) -> CounterfactualOutput | None:
        """The counterfactual of ``batch`` (``None``: skip the KL term for this batch)."""
        ...


# ----------------------------------------------------------------------------------------------------------
# Shared helpers


def select_features(
    scores: Mapping[str, torch.Tensor],
    sites: Sites,
    tau_c: float | None = None,
    top_k: int | None = None,
) -> dict[str, torch.Tensor]:
    """The spurious features to intervene on: score > ``tau_c``, and/or the ``top_k`` highest scores.

    Args:
        scores: ``site name -> [n_features]`` spuriousness scores (a ``Scores`` or a plain dict); NaN never
            selected. Every scored site must be in ``sites``.
        sites: the sites the scores refer to.
        tau_c: threshold; with ``top_k`` too, the top-k among those above it. When both are ``None``: every
            feature with a positive score (``tau_c = 0``).
        top_k: how many features over all sites, highest score first (ties: site order, then feature order).

    Returns:
        ``site name -> sorted feature indices`` (``LongTensor``), only for sites with at least one feature.

    Example:
        >>> import transformers
        >>> from icp_lightning.core.sites import find_sites
        >>> cfg = transformers.BertConfig(vocab_size=9, hidden_size=8, num_hidden_layers=1,
        ...                               num_attention_heads=2, intermediate_size=4)
        >>> sites = find_sites(transformers.BertModel(cfg), target_modules=["0.output.dense"])
        >>> select_features({"encoder.layer.0.output.dense": torch.tensor([0.1, 0.9, 0.5, -1.0])}, sites, top_k=2)
        {'encoder.layer.0.output.dense': tensor([1, 2])}
    """
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k must be >= 0 or None, got {top_k}")
    unknown = [name for name in scores if name not in sites]
    if unknown:
        raise ValueError(
            f"scores name sites {unknown} that are not among the given sites {sites.names}: pass the Sites the "
            "scores were computed on (module.set_scores(scores, sites))"
        )
    threshold = 0.0 if tau_c is None and top_k is None else tau_c
    index: list[tuple[str, int]] = []
    values: list[torch.Tensor] = []
    for name in sites:
        if name not in scores:
            continue
        value = torch.as_tensor(scores[name]).detach().float().reshape(-1).cpu()
        if value.numel() != sites[name].n_features:
            raise ValueError(
                f"scores for {name!r} have {value.numel()} entries but the site has {sites[name].n_features} "
                f"features ({sites.granularity} granularity): scores and sites do not match"
            )
        index.extend((name, i) for i in range(value.numel()))
        values.append(value)
    if not values:
        return {}
    flat = torch.cat(values)
    keep = ~torch.isnan(flat)
    if threshold is not None:
        keep &= flat > threshold
    candidates = keep.nonzero().reshape(-1)
    if top_k is not None:
        order = torch.argsort(flat[candidates], descending=True, stable=True)
        candidates = candidates[order[:top_k]]
    chosen: dict[str, list[int]] = {}
    for j in candidates.tolist():
        name, i = index[j]
        chosen.setdefault(name, []).append(i)
    return {name: torch.tensor(sorted(chosen[name]), dtype=torch.long) for name in sites if name in chosen}


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode while inside (no dropout), restoring each one's own mode after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, mode in modes:
            module.training = mode


def _batch_size(batch: Mapping[str, Any]) -> int:
    for key in ("input_ids", "inputs_embeds", "attention_mask"):
        value = batch.get(key)
        if isinstance(value, torch.Tensor):
            return int(value.shape[0])
    raise ValueError(f"the batch needs 'input_ids' or 'inputs_embeds'; it has keys {sorted(batch)}")


def _position_mask(batch: Mapping[str, Any], shape: torch.Size, device: torch.device) -> torch.Tensor:
    """``[N, T]`` True on real (non-padding) tokens."""
    mask = batch.get("attention_mask")
    if isinstance(mask, torch.Tensor) and tuple(mask.shape) == tuple(shape):
        return mask.to(device).bool()
    return torch.ones(shape, dtype=torch.bool, device=device)


def _special_ids(model: nn.Module, special_token_ids: Sequence[int] | None) -> list[int]:
    if special_token_ids is not None:
        return sorted({int(i) for i in special_token_ids})
    config = getattr(model, "config", None)
    found = set()
    for attr in (
        "pad_token_id",
        "bos_token_id",
        "eos_token_id",
        "sep_token_id",
        "cls_token_id",
        "mask_token_id",
    ):
        value = getattr(config, attr, None)
        if isinstance(value, int):
            found.add(value)
        elif isinstance(value, (list, tuple)):
            found.update(int(v) for v in value)
    return sorted(found)


def _input_embeddings(model: nn.Module) -> nn.Embedding:
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if callable(get) else None
    if not isinstance(embedding, nn.Module) or not isinstance(
        getattr(embedding, "weight", None), torch.Tensor
    ):
        raise TypeError(
            f"{type(model).__name__} has no get_input_embeddings() returning an embedding layer: input-level "
            "counterfactuals (inversion, token_edit) need a Hugging Face model with token embeddings"
        )
    return embedding  # type: ignore[return-value]


def _check_kind(kind: str, partner: str) -> None:
    if kind not in ("swap", "mask"):
        raise ValueError(f"kind must be 'swap' or 'mask', got {kind!r}")
    if partner not in ("permutation", "paired"):
        raise ValueError(f"partner must be 'permutation' or 'paired', got {partner!r}")


class _FeatureCounterfactual:
    """Shared settings of the strategies that act on the selected spurious features."""

    def __init__(
        self,
        tau_c: float | None,
        top_k: int | None,
        kind: CounterfactualKind,
        partner: Partner,
        seed: int,
    ) -> None:
        _check_kind(kind, partner)
        if top_k is not None and top_k < 0:
            raise ValueError(f"top_k must be >= 0 or None, got {top_k}")
        self.tau_c = tau_c
        self.top_k = top_k
        self.kind: CounterfactualKind = kind
        self.partner: Partner = partner
        self.seed = seed

    def _features(
        self, scores: Mapping[str, torch.Tensor] | None, sites: Sites | None
    ) -> tuple[Sites, dict[str, torch.Tensor]] | None:
        if scores is None:
            return None
        if sites is None:
            raise ValueError(
                f"{type(self).__name__} needs the Sites the scores refer to: call module.set_scores(scores, sites) "
                "or pass sites to build()"
            )
        feats = select_features(scores, sites, self.tau_c, self.top_k)
        if not feats:
            return None
        return sites.subset(list(feats)), feats

    @torch.no_grad()
    def _intervention(self, model: nn.Module, batch: Mapping[str, Any], sites: Sites) -> Intervention:
        """The do(h = v) to apply: mask (v = 0) or swap (v = partner activations from a clean, eval-mode pass)."""
        if self.kind == "mask":
            return Intervention("mask")
        store: dict[str, torch.Tensor] = {}
        with eval_mode(model):
            if self.partner == "paired":
                with capture_site_inputs(sites, store):
                    model(**model_inputs(model, counterfactual_batch(batch)))
                return Intervention("swap", source=store)
            with capture_site_inputs(sites, store):
                model(**model_inputs(model, batch))
        perm = partner_permutation(_batch_size(batch), self.seed)
        return Intervention("swap", source={name: h[perm.to(h.device)] for name, h in store.items()})

    @torch.no_grad()
    def _targets(
        self,
        model: nn.Module,
        batch: Mapping[str, Any],
        sites: Sites,
        feats: Mapping[str, torch.Tensor],
        with_clean: bool = False,
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Site inputs under do(h = v) (the target) and, if asked, on the clean input; eval-mode passes."""
        intervention = self._intervention(model, batch, sites)
        target: dict[str, torch.Tensor] = {}
        clean: dict[str, torch.Tensor] = {}
        with eval_mode(model):
            # intervene's hooks are registered first, so the capture sees the intervened value.
            with intervene(sites, feats, intervention), capture_site_inputs(sites, target):
                model(**model_inputs(model, batch))
            if with_clean:
                with capture_site_inputs(sites, clean):
                    model(**model_inputs(model, batch))
        return target, clean


def _column_masks(
    sites: Sites, feats: Mapping[str, torch.Tensor], device: torch.device
) -> dict[str, torch.Tensor]:
    return {name: sites[name].column_mask(f).to(device) for name, f in feats.items()}


def _mismatch(
    store: Mapping[str, torch.Tensor],
    target: Mapping[str, torch.Tensor],
    cols: Mapping[str, torch.Tensor],
    positions: torch.Tensor,
    clean: Mapping[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example: summed squared error on the chosen columns (``[N]``) and, with ``clean``, on the others."""
    chosen = torch.zeros(positions.shape[0], device=positions.device)
    others = torch.zeros(positions.shape[0], device=positions.device)
    pos = positions.float()
    for name, col in cols.items():
        h = store[name]
        n, t = positions.shape
        h = h.reshape(n, t, h.shape[-1]).float()
        diff = (h - target[name].reshape(h.shape).float()) ** 2
        chosen = chosen + (diff * col.float() * pos[..., None]).sum((1, 2))
        if clean is not None:
            keep = (h - clean[name].reshape(h.shape).float()) ** 2
            others = others + (keep * (~col).float() * pos[..., None]).sum((1, 2))
    return chosen, others


def _without_inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in batch.items() if k not in ("input_ids", "inputs_embeds")}


# ----------------------------------------------------------------------------------------------------------
# Representation level: do(h = v) inside the model


class InterventionCounterfactual(_FeatureCounterfactual):
    """The counterfactual forward is the model under do(h = v) on the spurious features.

    Args:
        tau_c: features with score > ``tau_c`` (see :func:`select_features`).
        top_k: or the top-k features by score.
        kind: ``"swap"`` (v = the same feature's activation on an in-batch partner) or ``"mask"`` (v = 0).
        partner: where swap takes v from: ``"permutation"`` (a seeded in-batch partner, see
            :func:`~icp_lightning.core.interventions.partner_permutation`) or ``"paired"`` (the batch's
            ``cf_input_ids``). Partner activations come from a no-grad eval-mode pass: v is a constant.
        seed: seeds the partner permutation.

    ``build`` returns ``None`` while there are no scores or no feature passes the selection. The intervened
    forward keeps its graph: the KL term's gradient reaches the weights through it.
    """

    def __init__(
        self,
        tau_c: float | None = None,
        top_k: int | None = None,
        kind: CounterfactualKind = "swap",
        partner: Partner = "permutation",
        seed: int = 0,
    ) -> None:
        super().__init__(tau_c, top_k, kind, partner, seed)

    def build(
        self,
        model: nn.Module,
        batch: Mapping[str, Any],
        scores: Mapping[str, torch.Tensor] | None,
        sites: Sites | None,
    ) -> CounterfactualOutput | None:
        """The logits of ``model`` on ``batch`` with the selected features set to v."""
        chosen = self._features(scores, sites)
        if chosen is None:
            return None
        sub, feats = chosen
        intervention = self._intervention(model, batch, sub)
        with intervene(sub, feats, intervention):
            out = model(**model_inputs(model, batch))
        n_features = sum(int(f.numel()) for f in feats.values())
        return CounterfactualOutput(logits=out.logits, info={"n_features": n_features, "sites": list(feats)})


# ----------------------------------------------------------------------------------------------------------
# Input level, continuous: invert the intervened activations into input embeddings


class _SharedAdam:
    """Adam on input embeddings with one second-moment estimate shared by all tokens.

    The shared estimate is the largest per-token mean squared gradient, so the token with the largest gradient
    moves by about ``lr`` per coordinate and every other token in proportion to its gradient. Per-coordinate
    Adam would move every token by about ``lr`` whatever its gradient, and the projection onto tokens would
    then change tokens that do not matter.
    """

    def __init__(self, like: torch.Tensor, lr: float, betas: tuple[float, float] = (0.9, 0.999)) -> None:
        self.lr, self.betas = lr, betas
        self.m = torch.zeros_like(like)
        self.v = 0.0
        self.t = 0

    def step(self, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        b1, b2 = self.betas
        self.t += 1
        self.m = b1 * self.m + (1 - b1) * grad
        per_token = grad.float().pow(2).mean(-1)
        self.v = b2 * self.v + (1 - b2) * float(per_token.max()) if per_token.numel() else self.v
        m_hat = self.m / (1 - b1**self.t)
        v_hat = self.v / (1 - b2**self.t)
        return x - self.lr * m_hat / (math.sqrt(v_hat) + 1e-12)


class InversionCounterfactual(_FeatureCounterfactual):
    """x' = M^{-1}(M(x | do(h = v))): inputs whose *unintervened* activations match the intervened ones.

    From x's input embeddings, ``steps`` Adam steps on ``inputs_embeds`` minimise the squared error between the
    model's site activations and the target activations of the intervened forward (captured once), on the
    chosen feature columns (plus ``keep_weight`` times the error on the other columns against their clean
    values). Only real, non-special tokens move. With ``project_to_tokens`` each moved embedding is replaced by
    its nearest token (cosine or L2 to the embedding matrix, special tokens excluded) and x' is real
    ``input_ids``; otherwise x' is ``inputs_embeds``. The optimisation runs in eval mode and never touches the
    model's ``.grad``; x' is a constant for the caller.

    Args:
        steps: Adam steps. The Adam variant shares one second-moment estimate over all tokens, so tokens move
            in proportion to their gradient (tokens that do not matter stay put).
        lr: step size in units of the embedding matrix's root mean square entry.
        project_to_tokens: return the nearest real tokens instead of embeddings.
        projection: ``"cosine"`` or ``"l2"`` nearest-token rule.
        keep_weight: weight of the error on the other columns (keeps x' near x).
        tau_c, top_k, kind, partner, seed: feature selection and value v, as in
            :class:`InterventionCounterfactual` (default ``kind="mask"``).
        special_token_ids: token ids never edited nor produced (default: the ids in ``model.config``:
            pad/bos/eos/sep/cls); pass ``tokenizer.all_special_ids`` for BERT-style [CLS]/[SEP].

    ``info``: ``reconstruction_error`` (mean squared mismatch per chosen value, before each step and after the
    last), ``initial_error``, ``final_error``, with projection ``projected_error`` and ``changed_tokens``.
    """

    def __init__(
        self,
        steps: int = 20,
        lr: float = 0.5,
        project_to_tokens: bool = True,
        projection: Projection = "cosine",
        keep_weight: float = 0.0,
        tau_c: float | None = None,
        top_k: int | None = None,
        kind: CounterfactualKind = "mask",
        partner: Partner = "permutation",
        seed: int = 0,
        special_token_ids: Sequence[int] | None = None,
    ) -> None:
        super().__init__(tau_c, top_k, kind, partner, seed)
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if projection not in ("cosine", "l2"):
            raise ValueError(f"projection must be 'cosine' or 'l2', got {projection!r}")
        if keep_weight < 0:
            raise ValueError(f"keep_weight must be >= 0, got {keep_weight}")
        self.steps = steps
        self.lr = lr
        self.project_to_tokens = project_to_tokens
        self.projection: Projection = projection
        self.keep_weight = keep_weight
        self.special_token_ids = special_token_ids

    def build(
        self,
        model: nn.Module,
        batch: Mapping[str, Any],
        scores: Mapping[str, torch.Tensor] | None,
        sites: Sites | None,
    ) -> CounterfactualOutput | None:
        """Optimise the input embeddings of ``batch`` toward the intervened activations."""
        chosen = self._features(scores, sites)
        if chosen is None:
            return None
        sub, feats = chosen
        ids = batch.get("input_ids")
        if not isinstance(ids, torch.Tensor):
            raise ValueError(
                f"inversion starts from the batch's 'input_ids'; the batch has keys {sorted(batch)}"
            )
        embedding = _input_embeddings(model)
        weight = embedding.weight.detach()
        target, clean = self._targets(model, batch, sub, feats, with_clean=self.keep_weight > 0)
        positions = _position_mask(batch, ids.shape, ids.device)
        special = torch.tensor(
            _special_ids(model, self.special_token_ids), dtype=torch.long, device=ids.device
        )
        editable = positions & ~torch.isin(ids, special)
        cols = _column_masks(sub, feats, ids.device)
        n_values = sum(float(c.sum()) for c in cols.values()) * float(positions.sum())
        rest = _without_inputs(batch)

        embeds = embedding(ids).detach().clone()
        adam = _SharedAdam(embeds, lr=self.lr * float(weight.float().pow(2).mean().sqrt()))
        errors: list[float] = []
        with eval_mode(model), torch.enable_grad():
            for step in range(self.steps + 1):
                embeds.requires_grad_(True)
                store: dict[str, torch.Tensor] = {}
                with capture_site_inputs(sub, store, detach=False):
                    model(**model_inputs(model, {**rest, "inputs_embeds": embeds}))
                mis, other = _mismatch(store, target, cols, positions, clean if self.keep_weight else None)
                errors.append(float(mis.detach().sum()) / max(n_values, 1.0))
                if step == self.steps:
                    break
                loss = (mis.sum() + self.keep_weight * other.sum()) / max(n_values, 1.0)
                (grad,) = torch.autograd.grad(loss, embeds)
                embeds = adam.step(embeds.detach(), grad * editable[..., None].to(grad.dtype))
        info: dict[str, Any] = {
            "reconstruction_error": errors,
            "initial_error": errors[0],
            "final_error": errors[-1],
            "n_features": sum(int(f.numel()) for f in feats.values()),
        }
        result = embeds.detach()
        if not self.project_to_tokens:
            return CounterfactualOutput(batch={**rest, "inputs_embeds": result}, info=info)
        new_ids = self._project(result, weight, special)
        new_ids = torch.where(editable, new_ids, ids)
        with torch.no_grad(), eval_mode(model):
            store = {}
            with capture_site_inputs(sub, store):
                model(**model_inputs(model, {**rest, "input_ids": new_ids}))
            mis, _ = _mismatch(store, target, cols, positions)
        info["projected_error"] = float(mis.sum()) / max(n_values, 1.0)
        info["changed_tokens"] = int((new_ids != ids).sum())
        return CounterfactualOutput(batch={**rest, "input_ids": new_ids}, info=info)

    def _project(self, embeds: torch.Tensor, weight: torch.Tensor, special: torch.Tensor) -> torch.Tensor:
        """Nearest token of each embedding (special tokens excluded), row by row to bound memory."""
        w = weight.float()
        banned = torch.zeros(w.shape[0], dtype=torch.bool, device=w.device)
        banned[special[special < w.shape[0]].to(w.device)] = True
        out = []
        for row in embeds.float():
            if self.projection == "cosine":
                sim = nn.functional.normalize(row, dim=-1) @ nn.functional.normalize(w, dim=-1).t()
            else:
                sim = -torch.cdist(row, w)
            sim[:, banned] = -math.inf
            out.append(sim.argmax(-1))
        return torch.stack(out).to(embeds.device)


# ----------------------------------------------------------------------------------------------------------
# Input level, discrete: greedy HotFlip-style token edits


class TokenEditCounterfactual(_FeatureCounterfactual):
    """A discrete inverse: greedy HotFlip-style token edits until the site activations approach v.

    The objective J(x) is the summed squared error, over real tokens, between the model's activations on the
    chosen feature columns and the target of the intervened forward (v for ``mask``). Each round:

    1. the gradient of J with respect to the one-hot tokens ranks the possible edits, one per position
       (non-special, non-padding, not yet edited tokens only). ``"hotflip"``: by the first-order change of J,
       replacing token a by b at position i changes J by about ``(E[b] - E[a]) . dJ/de_i``, minimised over b.
       ``"mask"`` / ``"delete"``: by the bound ``|dJ/de_i| * |E[r] - E[a]|`` on that change (the plain estimate
       of one fixed replacement is unreliable: LayerNorm makes the gradient orthogonal to E[a]);
    2. the ``candidates`` best-ranked edits are evaluated exactly, one batched no-grad forward each (as
       AutoPrompt does), and the one that lowers J most is applied, per example; an example with no edit that
       lowers J is done.

    The search stops after ``max_edits`` edits, once J / J(x) <= ``tol``, or once the mean squared mismatch per
    chosen activation value is <= ``atol`` (an example on which the features barely fire needs no edit). When
    the chosen features fire on a spurious token, this finds and removes that token.

    Args:
        max_edits: edits per example at most.
        edit: ``"mask"`` (replace with ``replace_id``), ``"hotflip"`` (replace with the best first-order
            substitute of the whole vocabulary, special tokens excluded) or ``"delete"`` (remove the token, shift
            the rest left and put ``replace_id`` at the freed last real position, whose attention mask becomes 0;
            the target is then compared position by position).
        replace_id: the id used by ``"mask"`` / ``"delete"`` (default ``config.mask_token_id``, else
            ``config.pad_token_id``, else 0); pass ``tokenizer.mask_token_id`` for [MASK].
        candidates: edits evaluated exactly per round (1: trust the gradient ranking, only checking that the
            edit lowers J). Each costs one no-grad forward of the batch.
        tol: relative mismatch J / J(x) at which an example is done.
        atol: mean squared mismatch per chosen value at which an example is done.
        tau_c, top_k, kind, partner, seed: feature selection and value v, as in
            :class:`InterventionCounterfactual` (default ``kind="mask"``).
        special_token_ids: ids never edited (nor produced by hotflip); default from ``model.config``
            (pad/bos/eos/sep/cls); pass ``tokenizer.all_special_ids`` for BERT-style [CLS]/[SEP].

    ``info``: ``edited_positions`` (per example, positions in the original x, in edit order), ``mismatch`` (mean
    J per round), ``relative_mismatch`` (per example, final J / J(x)). ``input_ids`` keep their shape; the
    attention mask is unchanged except with ``"delete"``.
    """

    def __init__(
        self,
        max_edits: int = 3,
        edit: EditKind = "mask",
        replace_id: int | None = None,
        candidates: int = 8,
        tol: float = 0.1,
        atol: float = 1e-4,
        tau_c: float | None = None,
        top_k: int | None = None,
        kind: CounterfactualKind = "mask",
        partner: Partner = "permutation",
        seed: int = 0,
        special_token_ids: Sequence[int] | None = None,
    ) -> None:
        super().__init__(tau_c, top_k, kind, partner, seed)
        if max_edits < 0:
            raise ValueError(f"max_edits must be >= 0, got {max_edits}")
        if edit not in ("mask", "delete", "hotflip"):
            raise ValueError(f"edit must be 'mask', 'delete' or 'hotflip', got {edit!r}")
        if candidates < 1:
            raise ValueError(f"candidates must be >= 1, got {candidates}")
        if tol < 0 or atol < 0:
            raise ValueError(f"tol and atol must be >= 0, got tol={tol}, atol={atol}")
        self.max_edits = max_edits
        self.edit: EditKind = edit
        self.replace_id = replace_id
        self.candidates = candidates
        self.tol = tol
        self.atol = atol
        self.special_token_ids = special_token_ids

    def _replacement(self, model: nn.Module) -> int:
        if self.replace_id is not None:
            return int(self.replace_id)
        config = getattr(model, "config", None)
        for attr in ("mask_token_id", "pad_token_id"):
            value = getattr(config, attr, None)
            if isinstance(value, int):
                return value
        return 0

    def build(
        self,
        model: nn.Module,
        batch: Mapping[str, Any],
        scores: Mapping[str, torch.Tensor] | None,
        sites: Sites | None,
    ) -> CounterfactualOutput | None:
        """Greedy token edits of ``batch["input_ids"]`` toward the intervened activations."""
        chosen = self._features(scores, sites)
        if chosen is None:
            return None
        sub, feats = chosen
        ids0 = batch.get("input_ids")
        if not isinstance(ids0, torch.Tensor) or ids0.dim() != 2:
            raise ValueError(
                f"token edits need [N, T] 'input_ids' in the batch; the batch has keys {sorted(batch)}"
            )
        n, t = ids0.shape
        device = ids0.device
        target, _ = self._targets(model, batch, sub, feats)
        cols = _column_masks(sub, feats, device)
        n_cols = sum(float(c.sum()) for c in cols.values())
        embedding = _input_embeddings(model)
        weight = embedding.weight.detach()
        special = torch.tensor(_special_ids(model, self.special_token_ids), dtype=torch.long, device=device)
        replace = self._replacement(model)
        rest = _without_inputs(batch)
        mask_dtype = (
            batch["attention_mask"].dtype if isinstance(batch.get("attention_mask"), torch.Tensor) else None
        )

        def objective(
            ids: torch.Tensor, attention: torch.Tensor, embeds: torch.Tensor | None = None
        ) -> torch.Tensor:
            inputs: dict[str, Any] = {**rest, "inputs_embeds": embedding(ids) if embeds is None else embeds}
            if mask_dtype is not None:
                inputs["attention_mask"] = attention.to(mask_dtype)
            store: dict[str, torch.Tensor] = {}
            with capture_site_inputs(sub, store, detach=False):
                model(**model_inputs(model, inputs))
            return _mismatch(store, target, cols, attention.bool())[0]

        state = _EditState(
            ids=ids0.clone(),
            attention=_position_mask(batch, ids0.shape, device).long(),
            origin=torch.arange(t, device=device).expand(n, t).clone(),
            edited=torch.zeros(n, t, dtype=torch.bool, device=device),
        )
        positions: list[list[int]] = [[] for _ in range(n)]
        done = torch.zeros(n, dtype=torch.bool, device=device)
        history: list[float] = []
        with eval_mode(model), torch.enable_grad():
            embeds = embedding(state.ids).detach().requires_grad_(True)
            j = objective(state.ids, state.attention, embeds)
            j0 = j.detach().clone()
            for round_ in range(self.max_edits + 1):
                history.append(float(j.detach().mean()))
                n_values = n_cols * state.attention.sum(1)
                done |= (j.detach() <= self.tol * j0) | (j.detach() <= self.atol * n_values) | (j0 <= 0)
                if round_ == self.max_edits or bool(done.all()):
                    break
                (grad,) = torch.autograd.grad(j.sum(), embeds)
                est, substitute = self._estimates(grad, embeds.detach(), weight, state.ids, special, replace)
                blocked = (
                    ~state.attention.bool() | torch.isin(state.ids, special) | state.edited | done[:, None]
                )
                est = est.masked_fill(blocked, math.inf)
                k = min(self.candidates, t)
                ranked = est.topk(k, dim=-1, largest=False)
                best_j = j.detach().clone()
                best_pos = torch.full((n,), -1, dtype=torch.long, device=device)
                with torch.no_grad():
                    for c in range(k):
                        pos = ranked.indices[:, c]
                        valid = torch.isfinite(ranked.values[:, c])
                        if not valid.any():
                            break
                        trial = state.clone()
                        rows = valid.nonzero().reshape(-1).tolist()
                        for b in rows:
                            self._apply(trial, b, int(pos[b]), int(substitute[b, pos[b]]), replace)
                        j_trial = objective(trial.ids, trial.attention)
                        better = valid & (j_trial < best_j)
                        best_j = torch.where(better, j_trial, best_j)
                        best_pos = torch.where(better, pos, best_pos)
                moved = best_pos >= 0
                done |= ~moved
                if not moved.any():
                    break
                for b in moved.nonzero().reshape(-1).tolist():
                    i = int(best_pos[b])
                    positions[b].append(int(state.origin[b, i]))
                    self._apply(state, b, i, int(substitute[b, i]), replace)
                embeds = embedding(state.ids).detach().requires_grad_(True)
                j = objective(state.ids, state.attention, embeds)

        j_final = j.detach()
        rel = torch.where(j0 > 0, j_final / j0.clamp_min(1e-30), torch.zeros_like(j0))
        out_batch = {**rest, "input_ids": state.ids}
        if mask_dtype is not None:
            out_batch["attention_mask"] = state.attention.to(mask_dtype)
        info = {
            "edited_positions": positions,
            "mismatch": history,
            "relative_mismatch": rel.tolist(),
            "n_features": sum(int(f.numel()) for f in feats.values()),
        }
        return CounterfactualOutput(batch=out_batch, info=info)

    def _estimates(
        self,
        grad: torch.Tensor,
        embeds: torch.Tensor,
        weight: torch.Tensor,
        ids: torch.Tensor,
        special: torch.Tensor,
        replace: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A ranking key per position (``[N, T]``, lowest first) and the substitute token of its edit.

        hotflip: the first-order change of J for the best substitute. mask / delete: minus the bound
        ``|dJ/de_i| * |E[r] - E[a]|`` on the first-order change (the plain estimate is unreliable for one fixed
        replacement: LayerNorm makes the gradient orthogonal to the token's own embedding).
        """
        if self.edit != "hotflip":
            step = weight[replace].to(grad.dtype) - embeds
            return -(grad.norm(dim=-1) * step.norm(dim=-1)), torch.full_like(ids, replace)
        current = (grad * embeds).sum(-1)  # [N, T]
        w = weight.to(grad.dtype)
        banned = torch.zeros(w.shape[0], dtype=torch.bool, device=w.device)
        banned[special[special < w.shape[0]]] = True
        ests, subs = [], []
        for b in range(grad.shape[0]):  # [T, V] per example bounds memory
            change = grad[b] @ w.t() - current[b][:, None]
            change[:, banned] = math.inf
            change.scatter_(1, ids[b][:, None], math.inf)  # keeping the token is not an edit
            value, index = change.min(-1)
            ests.append(value)
            subs.append(index)
        return torch.stack(ests), torch.stack(subs)

    def _apply(self, state: _EditState, b: int, i: int, substitute: int, replace: int) -> None:
        """Apply one edit at slot ``i`` of example ``b`` in place."""
        if self.edit != "delete":
            state.ids[b, i] = substitute
            state.edited[b, i] = True
            return
        real = state.attention[b].nonzero()
        last = int(real.max()) if real.numel() else i
        for tensor in (state.ids, state.origin, state.edited):
            tensor[b, i:last] = tensor[b, i + 1 : last + 1].clone()
        state.ids[b, last] = replace
        state.attention[b, last] = 0
        state.edited[b, last] = True


@dataclass
class _EditState:
    """Token ids being edited, their attention mask, each slot's original position, and edited slots."""

    ids: torch.Tensor
    attention: torch.Tensor
    origin: torch.Tensor
    edited: torch.Tensor

    def clone(self) -> _EditState:
        return _EditState(self.ids.clone(), self.attention.clone(), self.origin.clone(), self.edited.clone())


# ----------------------------------------------------------------------------------------------------------
# Input level, given: paired inputs and word-pair lexicons


class PairedCounterfactual:
    """x' is carried by the batch under ``cf_`` keys (``cf_input_ids``, ``cf_attention_mask``, ...).

    Works without scores. Entries without a ``cf_`` twin (labels, token types) are copied from x.

    Example:
        >>> batch = {"input_ids": torch.tensor([[1, 2]]), "cf_input_ids": torch.tensor([[1, 3]])}
        >>> PairedCounterfactual().build(None, batch).batch["input_ids"]
        tensor([[1, 3]])
    """

    def build(
        self,
        model: nn.Module | None,
        batch: Mapping[str, Any],
        scores: Mapping[str, torch.Tensor] | None = None,
        sites: Sites | None = None,
    ) -> CounterfactualOutput:
        """The batch's own counterfactual inputs."""
        return CounterfactualOutput(batch=counterfactual_batch(batch), info={})


#: Gendered word pairs, each swapped both ways. A word already mapped keeps its first partner, so ``her``
#: becomes ``his`` (not ``him``) and ``him`` becomes ``her``.
DEFAULT_GENDER_LEXICON: list[tuple[str, str]] = [
    ("he", "she"),
    ("his", "her"),
    ("him", "her"),
    ("himself", "herself"),
    ("man", "woman"),
    ("men", "women"),
    ("boy", "girl"),
    ("boys", "girls"),
    ("male", "female"),
    ("males", "females"),
    ("father", "mother"),
    ("fathers", "mothers"),
    ("dad", "mom"),
    ("son", "daughter"),
    ("sons", "daughters"),
    ("brother", "sister"),
    ("brothers", "sisters"),
    ("husband", "wife"),
    ("husbands", "wives"),
    ("boyfriend", "girlfriend"),
    ("uncle", "aunt"),
    ("nephew", "niece"),
    ("grandfather", "grandmother"),
    ("king", "queen"),
    ("kings", "queens"),
    ("gentleman", "lady"),
    ("gentlemen", "ladies"),
    ("mr", "mrs"),
    ("sir", "madam"),
]


def swap_map(lexicon: Mapping[str, str] | Sequence[tuple[str, str]]) -> dict[str, str]:
    """A lower-case ``word -> word`` map applying each pair both ways (first mapping of a word wins).

    Example:
        >>> swap_map([("he", "she"), ("his", "her"), ("him", "her")])
        {'he': 'she', 'she': 'he', 'his': 'her', 'her': 'his', 'him': 'her'}
    """
    pairs = list(lexicon.items()) if isinstance(lexicon, Mapping) else list(lexicon)
    out: dict[str, str] = {}
    for pair in pairs:
        if len(pair) != 2 or not all(isinstance(w, str) and w.strip() for w in pair):
            raise ValueError(f"each lexicon entry must be a pair of non-empty words, got {pair!r}")
        a, b = pair[0].strip().lower(), pair[1].strip().lower()
        out.setdefault(a, b)
        out.setdefault(b, a)
    return out


def swap_words(text: str, mapping: Mapping[str, str]) -> str:
    """Swap whole words of ``text`` by ``mapping`` (case-insensitive, keeping UPPER / Title case).

    Example:
        >>> swap_words("He said his dog likes HIM.", swap_map([("he", "she"), ("his", "her"), ("him", "her")]))
        'She said her dog likes HER.'
    """
    if not mapping:
        return text
    words = sorted(mapping, key=len, reverse=True)
    pattern = re.compile(r"\b(" + "|".join(re.escape(w) for w in words) + r")\b", re.IGNORECASE)

    def repl(match: re.Match[str]) -> str:
        word = match.group(0)
        new = mapping[word.lower()]
        if word.isupper() and len(word) > 1:
            return new.upper()
        if word[0].isupper():
            return new[:1].upper() + new[1:]
        return new

    return pattern.sub(repl, text)


class TokenSwapCounterfactual:
    """x' swaps the words of a lexicon (by default gendered pairs: he <-> she, his <-> her, man <-> woman, ...).

    Two ways, chosen by ``mode``:

    - ``"text"``: swap words in the batch's raw strings (``batch[text_key]``, a list of str) and re-tokenise to
      the batch's length (pad / truncate to ``input_ids.shape[1]``); for single-text classification batches.
    - ``"ids"``: map token ids both ways, for every lexicon word that is a single token of the tokenizer (as is,
      capitalised, and with a leading space for BPE vocabularies). Positions and masks are unchanged, so this
      also suits causal-LM batches. Words that are not single tokens are listed in ``info["skipped"]``.
    - ``"auto"`` (default): ``"text"`` when the batch carries ``text_key`` strings, else ``"ids"``.

    Args:
        lexicon: ``{word: word}`` or ``[(word, word), ...]``, applied both ways (see :func:`swap_map`);
            default :data:`DEFAULT_GENDER_LEXICON`.
        tokenizer: the Hugging Face tokenizer of the model (needed in both modes).
        mode: ``"auto"``, ``"text"`` or ``"ids"``.
        text_key: the batch key holding raw strings.

    Works without scores.
    """

    def __init__(
        self,
        lexicon: Mapping[str, str] | Sequence[tuple[str, str]] | None = None,
        tokenizer: Any = None,
        mode: Literal["auto", "text", "ids"] = "auto",
        text_key: str = "text",
    ) -> None:
        if mode not in ("auto", "text", "ids"):
            raise ValueError(f"mode must be 'auto', 'text' or 'ids', got {mode!r}")
        if tokenizer is None:
            raise ValueError(
                "TokenSwapCounterfactual needs the model's tokenizer (tokenizer=AutoTokenizer.from_pretrained(...)) "
                "to re-tokenise swapped text or to find the lexicon's token ids"
            )
        self.mapping = swap_map(DEFAULT_GENDER_LEXICON if lexicon is None else lexicon)
        self.tokenizer = tokenizer
        self.mode = mode
        self.text_key = text_key
        self._id_pairs: dict[int, int] | None = None
        self.skipped: list[str] = []

    def id_map(self) -> dict[int, int]:
        """``token id -> token id`` for every lexicon word that is a single token (cached)."""
        if self._id_pairs is not None:
            return self._id_pairs
        out: dict[int, int] = {}
        skipped = []
        for a, b in self.mapping.items():
            found = False
            for form_a, form_b in ((a, b), (a.capitalize(), b.capitalize()), (" " + a, " " + b)):
                ia = self.tokenizer(form_a, add_special_tokens=False)["input_ids"]
                ib = self.tokenizer(form_b, add_special_tokens=False)["input_ids"]
                if len(ia) == 1 and len(ib) == 1 and ia[0] != ib[0]:
                    if ia[0] == getattr(self.tokenizer, "unk_token_id", None):
                        continue
                    if ib[0] == getattr(self.tokenizer, "unk_token_id", None):
                        continue
                    out.setdefault(int(ia[0]), int(ib[0]))
                    found = True
            if not found:
                skipped.append(a)
        self._id_pairs, self.skipped = out, skipped
        return out

    def build(
        self,
        model: nn.Module | None,
        batch: Mapping[str, Any],
        scores: Mapping[str, torch.Tensor] | None = None,
        sites: Sites | None = None,
    ) -> CounterfactualOutput:
        """The batch with the lexicon's words swapped."""
        ids = batch.get("input_ids")
        if not isinstance(ids, torch.Tensor):
            raise ValueError(f"token swaps need the batch's 'input_ids'; the batch has keys {sorted(batch)}")
        texts = batch.get(self.text_key)
        has_text = isinstance(texts, (list, tuple)) and all(isinstance(s, str) for s in texts)
        mode = self.mode if self.mode != "auto" else ("text" if has_text else "ids")
        if mode == "text":
            if not has_text:
                raise ValueError(
                    f"mode='text' needs the raw strings in batch[{self.text_key!r}] (a list of str); the batch has "
                    f"keys {sorted(batch)}. Keep the text column in the collate function, or use mode='ids'"
                )
            return self._from_text(batch, list(texts), ids)  # type: ignore[arg-type]
        mapping = self.id_map()
        size = max([len(self.tokenizer), int(ids.max()) + 1, *(max(k, v) + 1 for k, v in mapping.items())])
        lut = torch.arange(size, device=ids.device)
        if mapping:
            src = torch.tensor(list(mapping), device=ids.device)
            lut[src] = torch.tensor(list(mapping.values()), device=ids.device)
        new_ids = lut[ids]
        info = {"mode": "ids", "n_swapped": int((new_ids != ids).sum()), "skipped": list(self.skipped)}
        return CounterfactualOutput(batch={**batch, "input_ids": new_ids}, info=info)

    def _from_text(
        self, batch: Mapping[str, Any], texts: list[str], ids: torch.Tensor
    ) -> CounterfactualOutput:
        swapped = [swap_words(s, self.mapping) for s in texts]
        enc = self.tokenizer(
            swapped, padding="max_length", truncation=True, max_length=int(ids.shape[1]), return_tensors="pt"
        )
        out = dict(batch)
        out[self.text_key] = swapped
        for key in ("input_ids", "attention_mask", "token_type_ids"):
            if key in enc and (key == "input_ids" or key in batch):
                ref = batch[key]
                out[key] = enc[key].to(device=ref.device, dtype=ref.dtype)
        info = {"mode": "text", "n_swapped": sum(a != b for a, b in zip(texts, swapped))}
        return CounterfactualOutput(batch=out, info=info)


# ----------------------------------------------------------------------------------------------------------
# Registry


COUNTERFACTUALS: dict[str, type] = {
    "intervention": InterventionCounterfactual,
    "inversion": InversionCounterfactual,
    "token_edit": TokenEditCounterfactual,
    "paired": PairedCounterfactual,
    "token_swap": TokenSwapCounterfactual,
}


def register_counterfactual(name: str, cls: type) -> type:
    """Make ``build_counterfactual(name)`` build ``cls`` (a class with a ``build`` method)."""
    if not callable(getattr(cls, "build", None)):
        raise TypeError(f"{cls!r} has no build(model, batch, scores, sites) method")
    COUNTERFACTUALS[name] = cls
    return cls


def build_counterfactual(
    name_or_obj: str | CounterfactualStrategy,
    defaults: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> CounterfactualStrategy:
    """A counterfactual strategy by registry name (or the object itself, if it has a ``build`` method).

    Args:
        name_or_obj: ``"intervention"``, ``"inversion"``, ``"token_edit"``, ``"paired"``, ``"token_swap"`` (or a
            name added with :func:`register_counterfactual`), or a strategy object.
        defaults: arguments passed only to classes whose constructor takes them (e.g. ``tau_c``, ``top_k``).
        kwargs: arguments for the constructor, passed as they are.

    Example:
        >>> build_counterfactual("inversion", defaults={"top_k": 3}, steps=2).top_k
        3
        >>> type(build_counterfactual("paired", defaults={"top_k": 3})).__name__
        'PairedCounterfactual'
    """
    if not isinstance(name_or_obj, str):
        if not callable(getattr(name_or_obj, "build", None)):
            raise TypeError(
                f"counterfactual must be one of {sorted(COUNTERFACTUALS)} or an object with a "
                f"build(model, batch, scores, sites) method, got {type(name_or_obj).__name__}"
            )
        if kwargs:
            warnings.warn(
                f"counterfactual arguments {sorted(kwargs)} ignored: a built strategy was given", stacklevel=2
            )
        return name_or_obj
    if name_or_obj not in COUNTERFACTUALS:
        raise ValueError(
            f"unknown counterfactual {name_or_obj!r}; built-ins are {sorted(COUNTERFACTUALS)}, or pass an object "
            "with a build(model, batch, scores, sites) method"
        )
    cls = COUNTERFACTUALS[name_or_obj]
    params = inspect.signature(cls).parameters
    merged = {k: v for k, v in (defaults or {}).items() if k in params and k not in kwargs}
    merged.update(kwargs)
    try:
        return cls(**merged)  # type: ignore[no-any-return]
    except TypeError as err:
        raise TypeError(
            f"bad arguments for counterfactual {name_or_obj!r}: {err}. It takes {list(params)}"
        ) from None
