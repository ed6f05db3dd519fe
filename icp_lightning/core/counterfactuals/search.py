"""Search-based inverses: input-level counterfactuals x' found by searching for inputs whose *unintervened*
activations match those of the intervened forward.

- :class:`InversionCounterfactual`: continuous, Adam on the input embeddings (optionally projected onto tokens);
- :class:`TokenEditCounterfactual`: discrete, greedy HotFlip-style token edits.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from icp_lightning.core.counterfactuals.base import (
    CounterfactualKind,
    CounterfactualOutput,
    EditKind,
    Partner,
    Projection,
    _Batch,
    _Feats,
    _FeatureCounterfactual,
    _n_features,
    eval_mode,
)
from icp_lightning.core.interventions import capture_site_inputs, model_inputs
from icp_lightning.core.sites import Sites

# ----------------------------------------------------------------------------------------------------------
# Shared helpers


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


@dataclass
class _SiteTarget:
    """What a search matches: the site inputs under do(h = v) (``target``) on the chosen columns (``cols``).

    ``rest`` is the batch without its inputs; :meth:`activations` runs the model on ``rest`` plus new inputs.
    """

    model: nn.Module
    sites: Sites
    target: dict[str, torch.Tensor]
    cols: dict[str, torch.Tensor]
    rest: dict[str, Any]

    @property
    def n_columns(self) -> float:
        """How many columns are chosen, over all sites."""
        return sum(float(c.sum()) for c in self.cols.values())

    def activations(self, inputs: Mapping[str, Any], detach: bool = True) -> dict[str, torch.Tensor]:
        """The site inputs of the model on ``rest`` updated with ``inputs``."""
        store: dict[str, torch.Tensor] = {}
        with capture_site_inputs(self.sites, store, detach=detach):
            self.model(**model_inputs(self.model, {**self.rest, **inputs}))
        return store


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

    def _build(self, model: nn.Module, batch: _Batch, sub: Sites, feats: _Feats) -> CounterfactualOutput:
        """Optimise the input embeddings of ``batch`` toward the intervened activations."""
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
        goal = _SiteTarget(model, sub, target, _column_masks(sub, feats, ids.device), _without_inputs(batch))
        n_values = goal.n_columns * float(positions.sum())
        lr = self.lr * float(weight.float().pow(2).mean().sqrt())
        embeds, errors = self._optimise(goal, embedding(ids).detach().clone(), lr, positions, editable, clean)
        info: dict[str, Any] = {
            "reconstruction_error": errors,
            "initial_error": errors[0],
            "final_error": errors[-1],
            "n_features": _n_features(feats),
        }
        rest = goal.rest
        result = embeds.detach()
        if not self.project_to_tokens:
            return CounterfactualOutput(batch={**rest, "inputs_embeds": result}, info=info)
        new_ids = self._project(result, weight, special)
        new_ids = torch.where(editable, new_ids, ids)
        with torch.no_grad(), eval_mode(model):
            mis, _ = _mismatch(goal.activations({"input_ids": new_ids}), target, goal.cols, positions)
        info["projected_error"] = float(mis.sum()) / max(n_values, 1.0)
        info["changed_tokens"] = int((new_ids != ids).sum())
        return CounterfactualOutput(batch={**rest, "input_ids": new_ids}, info=info)

    def _optimise(
        self,
        goal: _SiteTarget,
        embeds: torch.Tensor,
        lr: float,
        positions: torch.Tensor,
        editable: torch.Tensor,
        clean: Mapping[str, torch.Tensor],
    ) -> tuple[torch.Tensor, list[float]]:
        """``steps`` Adam steps on ``embeds`` (editable tokens only); the mismatch before each and after the last."""
        n_values = goal.n_columns * float(positions.sum())
        adam = _SharedAdam(embeds, lr=lr)
        errors: list[float] = []
        with eval_mode(goal.model), torch.enable_grad():
            for step in range(self.steps + 1):
                embeds.requires_grad_(True)
                store = goal.activations({"inputs_embeds": embeds}, detach=False)
                mis, other = _mismatch(
                    store, goal.target, goal.cols, positions, clean if self.keep_weight else None
                )
                errors.append(float(mis.detach().sum()) / max(n_values, 1.0))
                if step == self.steps:
                    break
                loss = (mis.sum() + self.keep_weight * other.sum()) / max(n_values, 1.0)
                (grad,) = torch.autograd.grad(loss, embeds)
                embeds = adam.step(embeds.detach(), grad * editable[..., None].to(grad.dtype))
        return embeds, errors

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

    def _build(self, model: nn.Module, batch: _Batch, sub: Sites, feats: _Feats) -> CounterfactualOutput:
        """Greedy token edits of ``batch["input_ids"]`` toward the intervened activations."""
        ids0 = batch.get("input_ids")
        if not isinstance(ids0, torch.Tensor) or ids0.dim() != 2:
            raise ValueError(
                f"token edits need [N, T] 'input_ids' in the batch; the batch has keys {sorted(batch)}"
            )
        n, t = ids0.shape
        device = ids0.device
        target, _ = self._targets(model, batch, sub, feats)
        goal = _SiteTarget(model, sub, target, _column_masks(sub, feats, device), _without_inputs(batch))
        embedding = _input_embeddings(model)
        special = torch.tensor(_special_ids(model, self.special_token_ids), dtype=torch.long, device=device)
        replace = self._replacement(model)
        mask_dtype = (
            batch["attention_mask"].dtype if isinstance(batch.get("attention_mask"), torch.Tensor) else None
        )
        objective = _EditObjective(goal, embedding, mask_dtype)
        state = _EditState(
            ids=ids0.clone(),
            attention=_position_mask(batch, ids0.shape, device).long(),
            origin=torch.arange(t, device=device).expand(n, t).clone(),
            edited=torch.zeros(n, t, dtype=torch.bool, device=device),
        )
        positions, history, j0, j_final = self._search(objective, state, special, replace)
        rel = torch.where(j0 > 0, j_final / j0.clamp_min(1e-30), torch.zeros_like(j0))
        out_batch = {**goal.rest, "input_ids": state.ids}
        if mask_dtype is not None:
            out_batch["attention_mask"] = state.attention.to(mask_dtype)
        info = {
            "edited_positions": positions,
            "mismatch": history,
            "relative_mismatch": rel.tolist(),
            "n_features": _n_features(feats),
        }
        return CounterfactualOutput(batch=out_batch, info=info)

    def _search(
        self, objective: _EditObjective, state: _EditState, special: torch.Tensor, replace: int
    ) -> tuple[list[list[int]], list[float], torch.Tensor, torch.Tensor]:
        """Greedy edits of ``state`` in place: edited positions per example, mean J per round, J(x), final J."""
        n = state.ids.shape[0]
        embedding = objective.embedding
        weight = embedding.weight.detach()
        n_cols = objective.goal.n_columns
        positions: list[list[int]] = [[] for _ in range(n)]
        done = torch.zeros(n, dtype=torch.bool, device=state.ids.device)
        history: list[float] = []
        with eval_mode(objective.goal.model), torch.enable_grad():
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
                best_pos = self._best_edits(objective, state, j.detach(), est, substitute, replace)
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
        return positions, history, j0, j.detach()

    @torch.no_grad()
    def _best_edits(
        self,
        objective: _EditObjective,
        state: _EditState,
        j: torch.Tensor,
        est: torch.Tensor,
        substitute: torch.Tensor,
        replace: int,
    ) -> torch.Tensor:
        """Per example, the slot of the ``candidates`` best-ranked edit that lowers J most (-1: none does)."""
        n, t = state.ids.shape
        k = min(self.candidates, t)
        ranked = est.topk(k, dim=-1, largest=False)
        best_j = j.clone()
        best_pos = torch.full((n,), -1, dtype=torch.long, device=state.ids.device)
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
        return best_pos

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
class _EditObjective:
    """J per example: the squared mismatch of the chosen site columns over the real tokens of the edited ids."""

    goal: _SiteTarget
    embedding: nn.Embedding
    mask_dtype: torch.dtype | None

    def __call__(
        self, ids: torch.Tensor, attention: torch.Tensor, embeds: torch.Tensor | None = None
    ) -> torch.Tensor:
        inputs: dict[str, Any] = {"inputs_embeds": self.embedding(ids) if embeds is None else embeds}
        if self.mask_dtype is not None:
            inputs["attention_mask"] = attention.to(self.mask_dtype)
        store = self.goal.activations(inputs, detach=False)
        return _mismatch(store, self.goal.target, self.goal.cols, attention.bool())[0]


@dataclass
class _EditState:
    """Token ids being edited, their attention mask, each slot's original position, and edited slots."""

    ids: torch.Tensor
    attention: torch.Tensor
    origin: torch.Tensor
    edited: torch.Tensor

    def clone(self) -> _EditState:
        return _EditState(self.ids.clone(), self.attention.clone(), self.origin.clone(), self.edited.clone())
