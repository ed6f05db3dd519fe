"""Factual reliability in question answering: SmolLM2-135M-Instruct on BoolQ (ID + OOD topics) and NQ-open.

**Data** (:mod:`icp_lightning.recipes_qa`; one fixed split for every seed): BoolQ prompts
``"{title} -- {passage}\\nQuestion: {question}?\\nAnswer:"`` (passages cut to ``--passage-words`` words), answered
by the two tokens " yes" / " no"; the ID test and validation titles are unseen in training; the OOD test set is
a held-out *topic* (fiction and entertainment titles, a fixed keyword rule), unseen by every method until its
final numbers. Each BoolQ set also comes with an *irrelevant* twin: the same questions with another article's
passage, where no answer is supported. NQ-open: closed-book questions, greedy generation of a few tokens.

**Metrics** (:mod:`icp_lightning.metrics.qa`): accuracy; ECE (torchmetrics ``BinaryCalibrationError``, 15
bins), Brier and AUROC (torchmetrics ``BinaryAUROC``) of the confidence ``max(p_yes, p_no)`` for correctness;
*hallucination rate* = share of wrong answers among those given with confidence > ``--threshold`` (0.75);
*unsupported confident rate* = share of irrelevant-passage questions answered with confidence > 0.75 (each of
them a hallucination). NQ-open: exact match, contains-answer, and the same reliability numbers with the
probability of the greedy answer as its confidence.

**Methods** (same starting model, same training examples and steps for every trained method; each method
builds its own seeded generators, so its row does not depend on which methods ran before it):

- ``zero-shot``: the unedited model (seed-independent, evaluated once);
- ``LoRA``: LoRA (rank 8) on every projection but ``down_proj`` of the last ``--suffix-layers`` layers, binary
  cross-entropy on the yes/no log-odds, ``--epochs`` over ``--train`` training questions (the named baseline);
- ``LoRA + TS``: the LoRA model with one temperature fitted (NLL) on the validation questions;
- ``random prune``: as many random FFN neurons (``down_proj`` inputs of the same layers) as ICP prunes, then
  the same LoRA fine-tuning;
- ``ICP``: attribution -> pruning -> contrastive fine-tuning, below; ``ICP + TS`` its temperature-scaled twin.

**ICP for factual QA: which features are spurious?** A feature is spurious here when it makes the model
*confident without evidence*: it raises the confidence of the answer when the passage is irrelevant (the model
answers from priors: question-only cues, memorised associations), while it does not help the *correct* answer
when the real passage is there. With the engine (:func:`~icp_lightning.causal_effects`, gradient method, mask
intervention ``do(h_i = 0)``) on ``--attr`` training questions:

- ``E_unsupported[i]``: effect of neuron ``i`` on how far each answer's log-odds ``z = logit_yes - logit_no``
  departs from the batch mean with the irrelevant passage, ``|z - mean(z)|`` (what moves an answer without
  evidence is the question alone);
- ``E_evidence[i]``: effect on the correct answer's centred log-odds ``(2y - 1)(z - mean(z))`` with the real
  passage;
- score ``S = E_unsupported - E_evidence`` (:func:`~icp_lightning.spuriousness`, signed, dataset weights
  ``{"irrelevant": 1, "relevant": -1}``).

The top-k neurons by ``S`` are pruned with :func:`~icp_lightning.apply_masks` (hard masks). k comes from
``--k-grid`` and is chosen on the *validation* questions only (:func:`choose_k`): the k whose pruned starting
model has the lowest mean confidence on the irrelevant-passage validation questions, among those that lower it
and keep the validation AUROC of the log-odds (how well it reads the passage) within 0.02 of the unpruned
model's (else the smallest k). (A first version took the largest k within the AUROC tolerance: on seed 0 it
pruned 512 neurons, the answers flipped to a confident "yes" everywhere and the fine-tuning diverged; the
confidence check catches that overshoot.) Then the same LoRA fine-tuning with a counterfactual term: for each training question, x' is the
same question with an irrelevant passage, and ``L = BCE(M(x), y) + lambda * KL(u || M(x'))`` with ``u`` the
uniform yes/no distribution. (KL *between* M(x) and M(x'), the method's consistency term, would teach the very
prior-answering that is removed here: with no evidence, the counterfactual target is no preference.)

**Ablations** (``--ablations``): ICP pruning + plain fine-tuning (no KL), LoRA + the KL term (no pruning; its
temperature-scaled twin is a row too, :data:`WITH_TS`), and pruning with the unsupported-confidence effect alone
(no contrast with the evidence effect). At 512 training questions (``--train 512 --train-pool 768``) the KL term
alone is the variant that meets most targets; the pruning costs accuracy (``benchmarks/results/
factual_qa_train512/``).

**Compute**: the first ``30 - --suffix-layers`` layers are frozen in every method (LoRA and pruning live in the
last layers), so their outputs are computed once per prompt and cached (:class:`PrefixCache`, exact: the same
numbers as the full forward up to float rounding, checked in the tests); only the last layers run during
training and evaluation. NQ-open runs the whole model.

Run: ``python -m benchmarks.factual_qa --quick`` (one seed, small sets: under 15 minutes on one core) or
``python -m benchmarks.factual_qa --seeds 0 1 2 3 4``; per-seed, per-method parts go to ``--parts`` (written
atomically); ``--combine`` builds ``factual_qa.md`` / ``.json`` / ``factual_qa.png`` from whatever parts exist.
``--save-models DIR`` writes each method's final model per seed (``save_pretrained`` folder + tokenizer +
``manifest.json``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from icp_lightning.core.effects import causal_effects  # noqa: E402
from icp_lightning.core.masks import apply_masks, make_permanent, remove_masks  # noqa: E402
from icp_lightning.core.scores import spuriousness  # noqa: E402
from icp_lightning.core.selection import select_masks  # noqa: E402
from icp_lightning.core.sites import Sites, find_sites  # noqa: E402
from icp_lightning.metrics.qa import (  # noqa: E402
    calibrated_ece,
    contains_answer,
    exact_match,
    fit_temperature,
    qa_reliability,
)

MAIN_METHODS = ("LoRA", "LoRA + TS", "random prune", "ICP", "ICP + TS")
ABLATIONS = ("ICP prune, no KL", "LoRA + KL, no prune", "ICP unsupported-only score")
#: Methods whose temperature-scaled twin (one temperature fitted on validation, stored in every part) is a row.
WITH_TS = ("LoRA", "ICP", "LoRA + KL, no prune")
#: The ablations' temperature-scaled rows (the main methods' are in :data:`MAIN_METHODS`).
TS_ABLATIONS = tuple(f"{m} + TS" for m in WITH_TS if m in ABLATIONS)
#: Targets of the issue, against LoRA: hallucination and ECE down by at least this share ...
TARGET_DROP = 0.25
#: ... ID accuracy within this many points, OOD accuracy up; >= this many seeds of 5 for paired claims.
TARGET_ACC_POINTS = 1.0
TARGET_SEEDS = 4


# ------------------------------------------------------------------------------------------------------
# Prefix cache: the frozen first layers run once per prompt


class _Skip(nn.Module):
    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states


class _Stop(Exception):
    pass


class _PrefixRunner(nn.Module):
    """Stands in for decoder layer ``n_prefix - 1``: returns the cached output of layers ``0 .. n_prefix - 1``
    for every row whose tokens are cached, else runs those layers (and records their outputs when asked)."""

    def __init__(self, layers: Sequence[nn.Module], owner: PrefixCache) -> None:
        super().__init__()
        object.__setattr__(self, "_layers", list(layers))  # not registered: they stay in their own ModuleList
        object.__setattr__(self, "_owner", owner)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        owner: PrefixCache = self._owner  # type: ignore[assignment]
        keys = owner.row_keys()
        if keys is not None and kwargs.get("cache") is None and all(k in owner.store for k in keys):
            out = hidden_states.new_zeros(hidden_states.shape)
            for r, key in enumerate(keys):
                out[r, : len(key)] = owner.store[key].to(out.dtype)
            owner.hits += len(keys)
        else:
            out = hidden_states
            layers: list[nn.Module] = self._layers  # type: ignore[assignment]
            for layer in layers:
                out = layer(out, *args, **kwargs)
            if owner.record and keys is not None:
                for r, key in enumerate(keys):
                    owner.store[key] = out[r, : len(key)].detach().clone()
            owner.misses += hidden_states.shape[0]
        if owner.stop:
            raise _Stop
        return out


def _decoder(model: nn.Module) -> Any:
    """The module that holds the decoder layers (``LlamaModel``), also inside a PEFT wrapper."""
    for module in model.modules():
        if isinstance(getattr(module, "layers", None), nn.ModuleList) and hasattr(module, "embed_tokens"):
            return module
    raise ValueError(
        "no decoder with `layers` and `embed_tokens` found: the prefix cache needs a Llama-like model"
    )


@dataclass
class PrefixCache:
    """Outputs of the first ``n_prefix`` decoder layers per token sequence (right padding, no KV cache).

    Inside ``with cache.active(model):`` the model's own forward runs, but layers ``0 .. n_prefix - 1`` are
    replaced by a lookup: exact as long as those layers are frozen and unedited (LoRA and masks only in later
    layers). Rows not in the cache are computed (and stored when ``record``).
    """

    n_prefix: int
    store: dict[tuple[int, ...], torch.Tensor] = field(default_factory=dict)
    record: bool = True
    stop: bool = False
    hits: int = 0
    misses: int = 0
    _ids: torch.Tensor | None = None
    _mask: torch.Tensor | None = None

    def row_keys(self) -> list[tuple[int, ...]] | None:
        if self._ids is None:
            return None
        ids = self._ids
        lengths = self._mask.sum(-1).tolist() if self._mask is not None else [ids.shape[1]] * ids.shape[0]
        return [tuple(ids[r, : int(n)].tolist()) for r, n in enumerate(lengths)]

    @contextlib.contextmanager
    def active(self, model: nn.Module) -> Iterator[PrefixCache]:
        """Swap the first layers of ``model`` for the cache lookup while inside."""
        dec = _decoder(model)
        layers = dec.layers
        if not 0 < self.n_prefix < len(layers):
            raise ValueError(f"n_prefix must be in [1, {len(layers) - 1}], got {self.n_prefix}")
        runner = _PrefixRunner(list(layers[: self.n_prefix]), self)
        swapped = nn.ModuleList(
            [_Skip() for _ in range(self.n_prefix - 1)] + [runner] + list(layers[self.n_prefix :])
        )

        def grab(module: nn.Module, args: tuple, kwargs: dict) -> None:
            self._ids = kwargs.get("input_ids", args[0] if args else None)
            self._mask = kwargs.get("attention_mask")

        handle = dec.register_forward_pre_hook(grab, with_kwargs=True)
        dec.layers = swapped
        try:
            yield self
        finally:
            dec.layers = layers
            handle.remove()
            self._ids = self._mask = None

    def fill(self, model: nn.Module, sequences: Sequence[Sequence[int]], batch_size: int = 16) -> None:
        """Compute and store the prefix outputs of every sequence not cached yet (layers after it skipped)."""
        todo = sorted({tuple(s) for s in sequences} - set(self.store), key=len)
        was = model.training
        model.eval()
        try:
            with torch.no_grad(), self.active(model):
                self.record, self.stop = True, True
                for start in range(0, len(todo), batch_size):
                    ids, mask = _pad([list(t) for t in todo[start : start + batch_size]])
                    with contextlib.suppress(_Stop):
                        model(input_ids=ids, attention_mask=mask, use_cache=False)
        finally:
            self.stop = False
            model.train(was)


def _pad(rows: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, : len(row)] = torch.tensor(list(row), dtype=torch.long)
        mask[r, : len(row)] = 1
    return ids, mask


# ------------------------------------------------------------------------------------------------------
# Yes/no scoring, training, attribution (pieces tested on a tiny Llama in tests/benchmarks/test_factual_qa.py)


def yes_no_logodds_batch(
    model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, yes_id: int, no_id: int
) -> torch.Tensor:
    """``logit_yes - logit_no`` at each row's last real token (right padding); gradients flow if enabled.

    Only the positions that are some row's last token go through the output layer."""
    last = mask.sum(-1) - 1
    positions, inverse = torch.unique(last, return_inverse=True)
    logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=positions, use_cache=False).logits
    rows = logits[torch.arange(ids.shape[0]), inverse]
    return (rows[:, yes_id] - rows[:, no_id]).float()


@torch.no_grad()
def yes_no_logodds(
    model: nn.Module, prompts: Sequence[Sequence[int]], yes_id: int, no_id: int, batch_size: int = 16
) -> torch.Tensor:
    """``logit_yes - logit_no`` per prompt (float64, CPU), batched in length order, in eval mode."""
    was = model.training
    model.eval()
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out = torch.zeros(len(prompts), dtype=torch.float64)
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            ids, mask = _pad([prompts[i] for i in chunk])
            out[torch.tensor(chunk)] = yes_no_logodds_batch(model, ids, mask, yes_id, no_id).double()
    finally:
        model.train(was)
    return out


def uniform_kl(logodds: torch.Tensor) -> torch.Tensor:
    """``KL(u || p)`` per row, ``u`` uniform over yes/no and ``p = sigmoid(logodds)``: 0 at log-odds 0.

    Example:
        >>> [round(v, 4) for v in uniform_kl(torch.tensor([0.0, 2.0])).tolist()]
        [0.0, 0.4338]
    """
    log_p = F.logsigmoid(logodds)
    log_q = F.logsigmoid(-logodds)
    return -math.log(2.0) - 0.5 * (log_p + log_q)


def lora_model(model: nn.Module, layers: Sequence[int], seed: int, rank: int = 8) -> nn.Module:
    """PEFT LoRA on q/k/v/o and gate/up projections of ``layers`` (``down_proj`` is left to the pruning
    masks), with a seeded initialisation."""
    from peft import LoraConfig, get_peft_model

    names = "|".join(str(i) for i in layers)
    pattern = rf".*layers\.({names})\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up)_proj)"
    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=pattern)
    return get_peft_model(model, config)


def train_lora(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    labels: Sequence[int],
    irrelevant: Sequence[Sequence[int]] | None,
    yes_id: int,
    no_id: int,
    *,
    seed: int,
    epochs: int,
    batch_size: int,
    lr: float,
    kl_weight: float = 0.0,
) -> dict[str, Any]:
    """Fine-tune the trainable (LoRA) parameters of ``model`` with BCE on the yes/no log-odds, plus
    ``kl_weight * KL(u || M(x'))`` on the irrelevant-passage twins when ``kl_weight > 0``. The example order
    comes from a generator seeded with ``seed`` alone. Returns the mean losses per epoch."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters: wrap it with lora_model() first")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    y_all = torch.tensor(list(labels), dtype=torch.float32)
    model.train()
    history: dict[str, Any] = {"bce": [], "kl": []}
    for _ in range(epochs):
        order = torch.randperm(len(prompts), generator=gen).tolist()
        bces, kls = [], []
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            ids, mask = _pad([prompts[i] for i in chunk])
            z = yes_no_logodds_batch(model, ids, mask, yes_id, no_id)
            loss = F.binary_cross_entropy_with_logits(z, y_all[chunk])
            bces.append(float(loss.detach()))
            if kl_weight > 0 and irrelevant is not None:
                cf_ids, cf_mask = _pad([irrelevant[i] for i in chunk])
                kl = uniform_kl(yes_no_logodds_batch(model, cf_ids, cf_mask, yes_id, no_id)).mean()
                kls.append(float(kl.detach()))
                loss = loss + kl_weight * kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        history["bce"].append(statistics.mean(bces))
        history["kl"].append(statistics.mean(kls) if kls else None)
    model.eval()
    return history


def attribution_batches(
    prompts: Sequence[Sequence[int]], labels: Sequence[int], batch_size: int
) -> list[dict[str, torch.Tensor]]:
    """Batches for the engine: ``input_ids``, ``attention_mask``, ``logits_to_keep`` (the distinct last real
    positions: only they go through the output layer), ``pick`` (each row's entry among them) and ``sign``
    (+1 for a yes answer, -1 for no)."""
    out = []
    for start in range(0, len(prompts), batch_size):
        rows = list(prompts[start : start + batch_size])
        ids, mask = _pad(rows)
        positions, pick = torch.unique(mask.sum(-1) - 1, return_inverse=True)
        sign = torch.tensor([1.0 if y else -1.0 for y in labels[start : start + batch_size]])
        out.append(
            {
                "input_ids": ids,
                "attention_mask": mask,
                "logits_to_keep": positions,
                "pick": pick,
                "sign": sign,
            }
        )
    return out


def logodds_metric(yes_id: int, no_id: int, kind: str) -> Callable[[Any, Mapping[str, Any]], torch.Tensor]:
    """Engine metric per row, on the log-odds ``z = l_yes - l_no`` *centred on the batch mean* (so a feature
    that only shifts every answer toward yes or no, a global bias that fine-tuning resets anyway, scores 0):

    - ``"evidence"``: the correct answer's centred log-odds ``sign * (z - mean(z))``;
    - ``"unsupported"``: how far the answer departs from the batch's with no evidence, ``|z - mean(z)|``: with
      an irrelevant passage, what moves it is the question alone (priors, question-only cues)."""
    if kind not in ("evidence", "unsupported"):
        raise ValueError(f"kind must be 'evidence' or 'unsupported', got {kind!r}")

    def metric(outputs: Any, batch: Mapping[str, Any]) -> torch.Tensor:
        logits = outputs.logits
        pick = batch["pick"].to(logits.device)
        rows = logits[torch.arange(logits.shape[0], device=logits.device), pick]
        z = rows[:, yes_id] - rows[:, no_id]
        centred = z - z.mean()
        return batch["sign"].to(z.device) * centred if kind == "evidence" else centred.abs()

    metric.__name__ = f"{kind}_logodds"
    return metric


def icp_scores(
    model: nn.Module,
    sites: Sites,
    relevant: Sequence[Sequence[int]],
    irrelevant: Sequence[Sequence[int]],
    labels: Sequence[int],
    yes_id: int,
    no_id: int,
    batch_size: int = 8,
    contrast: bool = True,
) -> tuple[Any, dict[str, Any]]:
    """Spuriousness scores ``E_unsupported - E_evidence`` (``contrast=False``: ``E_unsupported`` alone) of
    every feature of ``sites``, from gradient mask effects."""
    effects = {}
    unsupported = causal_effects(
        model, attribution_batches(irrelevant, labels, batch_size), sites, "mask",
        logodds_metric(yes_id, no_id, "unsupported"), method="gradient", progress=False,
    )  # fmt: skip
    effects[("mask", "logodds", "irrelevant")] = unsupported
    weights = {"irrelevant": 1.0}
    if contrast:
        effects[("mask", "logodds", "relevant")] = causal_effects(
            model, attribution_batches(relevant, labels, batch_size), sites, "mask",
            logodds_metric(yes_id, no_id, "evidence"), method="gradient", progress=False,
        )  # fmt: skip
        weights["relevant"] = -1.0
    scores = spuriousness(effects, dataset_weights=weights, reduction="signed")
    return scores, {"effects": effects}


def top_k_values(sites: Sites, scores: Mapping[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Mask values: 0 on the ``k`` features with the highest score over all sites, 1 elsewhere (the package's
    selection, :func:`~icp_lightning.core.selection.select_masks`; ties go to the earlier site and feature)."""
    ones = {name: torch.ones(sites[name].n_features) for name in sites}
    return select_masks({name: scores[name] for name in sites}, ones, amount=int(k), min_keep=0)


def random_values(sites: Sites, k: int, seed: int) -> dict[str, torch.Tensor]:
    """Mask values: 0 on ``k`` features drawn at random (seeded) over all sites, 1 elsewhere."""
    flat = [(name, i) for name in sites for i in range(sites[name].n_features)]
    order = torch.randperm(len(flat), generator=torch.Generator().manual_seed(seed)).tolist()
    values = {name: torch.ones(sites[name].n_features) for name in sites}
    for j in order[:k]:
        name, i = flat[j]
        values[name][i] = 0.0
    return values


def removed(values: Mapping[str, torch.Tensor]) -> dict[str, list[int]]:
    """Per site, the indices of the pruned features (mask value 0)."""
    return {
        name: torch.nonzero(v == 0).flatten().tolist() for name, v in values.items() if bool((v == 0).any())
    }


def choose_k(
    evaluate: Callable[[int], tuple[float, float]],
    base: tuple[float, float],
    k_grid: Sequence[int],
    tolerance: float = 0.02,
) -> tuple[int, dict[str, list[float]]]:
    """Choose how many features to prune from validation numbers of the pruned starting model.

    ``evaluate(k)`` returns ``(auroc, unsupported)``: the AUROC of the log-odds for the labels with the real
    passage (how well the model reads evidence) and the mean confidence with an irrelevant passage. Among the k
    whose AUROC stays within ``tolerance`` of the unpruned ``base[0]`` and whose unsupported confidence is below
    the unpruned ``base[1]``, the k with the lowest unsupported confidence (pruning too much overshoots: the
    answers flip to the other side, confidently); else the smallest k. Returns it and the table.

    Example:
        >>> table = {8: (0.70, 0.80), 32: (0.69, 0.70), 128: (0.60, 0.55), 512: (0.70, 0.99)}
        >>> choose_k(table.__getitem__, (0.70, 0.85), [8, 32, 128, 512])[0]
        32
    """
    table = {str(k): list(evaluate(k)) for k in k_grid}
    ok = [k for k in k_grid if table[str(k)][0] >= base[0] - tolerance and table[str(k)][1] < base[1]]
    return (min(ok, key=lambda k: (table[str(k)][1], k)) if ok else min(k_grid)), table


# ------------------------------------------------------------------------------------------------------
# NQ-open: greedy generation of a short answer


#: Version of the NQ answer rule recorded in each part: 2 skips leading newlines (:func:`answer_length`); parts
#: without it cut every answer at a leading newline (empty answers).
NQ_GENERATION = 2


def answer_length(pieces: Sequence[str], ends: Sequence[bool]) -> int:
    """How many generated tokens the answer keeps: up to an end-of-sequence / padding token (``ends``), or up to
    the first newline once the answer has begun; newlines and spaces before it are skipped, not an end (instruct
    models often start with a newline, and cutting there left every NQ answer empty)."""
    started = False
    for j, (piece, end) in enumerate(zip(pieces, ends)):
        if end:
            return j
        if "\n" in piece and (started or piece.split("\n")[0].strip()):
            return j
        started = started or bool(piece.strip())
    return len(pieces)


@torch.no_grad()
def generate_answers(
    model: nn.Module, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int = 6, batch_size: int = 16
) -> tuple[list[str], torch.Tensor]:
    """Greedy answers (up to the first newline after the answer began: :func:`answer_length`) and their
    probabilities (product over the kept tokens, leading newlines included)."""
    was = model.training
    model.eval()
    gen: Any = model
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    texts: list[str] = []
    probs: list[float] = []
    try:
        for start in range(0, len(prompts), batch_size):
            enc = tokenizer(list(prompts[start : start + batch_size]), return_tensors="pt", padding=True)
            out = gen.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=False, output_scores=True,
                return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id,
            )  # fmt: skip
            new = out.sequences[:, enc["input_ids"].shape[1] :]
            logp = torch.stack([s.float().log_softmax(-1) for s in out.scores], 1)  # [B, steps, V]
            picked = logp.gather(-1, new.unsqueeze(-1)).squeeze(-1)
            for r in range(new.shape[0]):
                toks = new[r].tolist()
                ends = [t in (tokenizer.eos_token_id, tokenizer.pad_token_id) for t in toks]
                keep = answer_length([tokenizer.decode([t]) for t in toks], ends)
                text = tokenizer.decode(toks[:keep], skip_special_tokens=True).strip()
                texts.append(text)
                probs.append(float(picked[r, :keep].sum().exp()) if keep else 0.0)
    finally:
        tokenizer.padding_side = side
        model.train(was)
    return texts, torch.tensor(probs, dtype=torch.float64)


def _chat(tokenizer: Any, question: str) -> str:
    return str(tokenizer.apply_chat_template([{"role": "user", "content": f"Answer in a few words: {question}?"}],
                                             tokenize=False, add_generation_prompt=True))  # fmt: skip


#: The prompts :func:`nq_probe` tries (the benchmark's own first).
NQ_PROBE_PROMPTS: dict[str, Callable[[Any, str], str]] = {
    "the benchmark's (`Question: ...?\\nAnswer:`)": lambda tok, q: f"Question: {q}?\nAnswer:",
    "instruction first (`Answer with a few words only.`)": lambda tok, q: (
        f"Answer with a few words only.\nQuestion: {q}?\nAnswer:"
    ),
    "chat template (`Answer in a few words: ...?`)": _chat,
}


def nq_probe(model: nn.Module, tokenizer: Any, questions: Sequence[str], answers: Sequence[Sequence[str]],
             budgets: Sequence[int] = (6, 16), prompts: Sequence[str] | None = None,
             batch_size: int = 8) -> list[dict[str, Any]]:  # fmt: skip
    """Whether the NQ columns can measure anything: the untrained model's greedy answers (:func:`generate_answers`)
    to ``questions`` under each prompt of :data:`NQ_PROBE_PROMPTS` (or ``prompts``, their names) and token budget:
    contains-answer and exact-match rates, empty answers, and the first three answers."""
    rows = []
    for name in prompts or list(NQ_PROBE_PROMPTS):
        fmt = NQ_PROBE_PROMPTS[name]
        for n in budgets:
            texts, _ = generate_answers(
                model, tokenizer, [fmt(tokenizer, q) for q in questions], n, batch_size
            )
            rows.append({"prompt": name, "tokens": n, "n": len(texts),
                         "contains": float(np.mean([contains_answer(t, a) for t, a in zip(texts, answers)])),
                         "exact_match": float(np.mean([exact_match(t, a) for t, a in zip(texts, answers)])),
                         "empty": sum(not t for t in texts), "examples": texts[:3]})  # fmt: skip
    return rows


def run_nq_probe(args: argparse.Namespace) -> str:
    """``--nq-probe N``: :func:`nq_probe` on the first N questions of NQ-open's *training* split (no test row),
    the zero-shot model; writes ``nq_probe.md`` under ``--out``."""
    import transformers

    from icp_lightning.recipes import smollm2_path
    from icp_lightning.recipes_qa import nq_open

    path = args.model_path or smollm2_path()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    rows = nq_open()["train"].select(range(args.nq_probe))
    table = nq_probe(model, tok, list(rows["question"]), list(rows["answers"]))
    lines = ["# NQ-open: can the zero-shot model answer at all?", "",
             f"`python -m benchmarks.factual_qa --nq-probe {args.nq_probe}`: greedy answers of the untrained model "
             f"to the first {args.nq_probe} questions of NQ-open's *training* split (no test question), per prompt "
             "and token budget.", "",
             "| prompt | tokens | contains answer | exact match | empty | first answers |", "|---|---|---|---|---|---|"]  # fmt: skip
    for r in table:
        ex = "; ".join(f"`{e}`" for e in r["examples"])
        lines.append(f"| {r['prompt']} | {r['tokens']} | {100 * r['contains']:.1f}% | "
                     f"{100 * r['exact_match']:.1f}% | {r['empty']} of {r['n']} | {ex} |")  # fmt: skip
    text = "\n".join(lines) + "\n"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "nq_probe.md").write_text(text)
    return text


# ------------------------------------------------------------------------------------------------------
# Memory and time of one method


class PeakMemory:
    """Peak resident memory (MB) of this process while inside, sampled every 0.1 s, and seconds elapsed."""

    def __enter__(self) -> PeakMemory:
        import psutil

        self._proc = psutil.Process()
        self.start_mb = self._proc.memory_info().rss / 2**20
        self.peak_mb = self.start_mb
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        self._t0 = time.perf_counter()
        return self

    def _watch(self) -> None:
        while not self._done.wait(0.1):
            self.peak_mb = max(self.peak_mb, self._proc.memory_info().rss / 2**20)

    def __exit__(self, *exc: Any) -> None:
        self.seconds = time.perf_counter() - self._t0
        self._done.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, self._proc.memory_info().rss / 2**20)


# ------------------------------------------------------------------------------------------------------
# Context: model, data, prefix cache (once per process)


@dataclass
class Context:
    path: str
    tokenizer: Any
    base: nn.Module
    yes_id: int
    no_id: int
    suffix: list[int]
    sites_pattern: str
    cache: PrefixCache
    sets: dict[str, dict[str, Any]]
    nq: dict[str, Any]
    load_model: Callable[[], nn.Module]


def _single_token(tokenizer: Any, text: str) -> int:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"{text!r} must be one token, got {ids}")
    return int(ids[0])


def _encode(tokenizer: Any, texts: Sequence[str], max_tokens: int) -> list[list[int]]:
    out = []
    for t in texts:
        ids = list(tokenizer(t, add_special_tokens=True)["input_ids"])
        out.append(ids[-max_tokens:])  # keep the question and "Answer:" when a prompt is too long
    return out


def build_context(args: argparse.Namespace, model_path: str | None = None) -> Context:
    """Load the model and tokenizer, the fixed data subsets, and fill the prefix cache."""
    import transformers

    from icp_lightning.recipes import smollm2_path
    from icp_lightning.recipes_qa import boolq_topics, nq_open

    path = model_path or smollm2_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token

    def load_model() -> nn.Module:
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        for p in model.parameters():
            p.requires_grad_(False)
        return model.eval()

    base = load_model()
    n_layers = len(_decoder(base).layers)
    suffix = list(range(n_layers - args.suffix_layers, n_layers))
    sites_pattern = rf".*layers\.({'|'.join(map(str, suffix))})\.mlp\.down_proj"
    ds = boolq_topics(seed=0, passage_words=args.passage_words)
    rng = np.random.default_rng(12345)  # one fixed sample of every set, for every seed and method

    def take(split: str, n: int) -> dict[str, Any]:
        data = ds[split]
        rows = sorted(rng.choice(data.num_rows, size=min(n, data.num_rows), replace=False).tolist())
        sub = data.select(rows)
        return {
            "prompts": _encode(tokenizer, sub["prompt"], args.max_tokens),
            "irrelevant": _encode(tokenizer, sub["irrelevant_prompt"], args.max_tokens),
            "labels": list(sub["label"]),
            "titles": list(sub["title"]),
        }

    sets = {
        "train": take("train", args.train_pool),
        "validation": take("validation", args.val),
        "id": take("test", args.eval),
        "ood": take("ood", args.eval),
    }
    nq_test = nq_open()["test"]
    nq_rows = sorted(
        rng.choice(nq_test.num_rows, size=min(args.nq, nq_test.num_rows), replace=False).tolist()
    )
    nq = {
        "prompts": list(nq_test.select(nq_rows)["prompt"]),
        "answers": list(nq_test.select(nq_rows)["answers"]),
    }
    cache = PrefixCache(n_prefix=suffix[0])
    everything = [s for part in sets.values() for key in ("prompts", "irrelevant") for s in part[key]]
    t0 = time.perf_counter()
    saved = Path(os.path.expanduser(args.prefix_cache)) if args.prefix_cache else None
    if saved is not None and saved.is_file():
        stored = torch.load(saved)
        if stored.get("path") == path and stored.get("n_prefix") == cache.n_prefix:
            cache.store.update(stored["store"])
    n_before = len(cache.store)
    cache.fill(base, everything, batch_size=args.batch_size)
    if saved is not None and len(cache.store) > n_before:
        saved.parent.mkdir(parents=True, exist_ok=True)
        tmp = saved.with_suffix(f".tmp{os.getpid()}")
        kept = trimmed(cache.store, everything, int(args.prefix_cache_gb * 2**30))
        torch.save({"path": path, "n_prefix": cache.n_prefix, "store": kept}, tmp)
        os.replace(tmp, saved)
    print(f"prefix cache: {len(cache.store)} prompts, layers 0-{suffix[0] - 1}, "
          f"{time.perf_counter() - t0:.0f}s", flush=True)  # fmt: skip
    yes_id, no_id = _single_token(tokenizer, " yes"), _single_token(tokenizer, " no")
    return Context(path, tokenizer, base, yes_id, no_id, suffix, sites_pattern, cache, sets, nq, load_model)


def trimmed(
    store: Mapping[tuple[int, ...], torch.Tensor], keep: Sequence[Sequence[int]], max_bytes: int
) -> dict[tuple[int, ...], torch.Tensor]:
    """The prefix store to write to disk: all of it while it fits in ``max_bytes``, else only the entries of
    ``keep`` (this run's prompts), so the file grows with one run's sets, not with every size ever run."""
    if sum(t.nbytes for t in store.values()) <= max_bytes:
        return dict(store)
    wanted = {tuple(s) for s in keep}
    return {k: v for k, v in store.items() if k in wanted}


# ------------------------------------------------------------------------------------------------------
# Evaluation of one model


def boolq_logodds(
    ctx: Context, model: nn.Module, names: Sequence[str], args: argparse.Namespace
) -> dict[str, Any]:
    """Log-odds of every BoolQ set in ``names`` (relevant and irrelevant prompts), through the prefix cache."""
    out: dict[str, Any] = {}
    with ctx.cache.active(model):
        for name in names:
            part = ctx.sets[name]
            out[name] = yes_no_logodds(model, part["prompts"], ctx.yes_id, ctx.no_id, args.batch_size)
            out[f"{name}_irrelevant"] = yes_no_logodds(
                model, part["irrelevant"], ctx.yes_id, ctx.no_id, args.batch_size
            )
    return out


def boolq_metrics(
    ctx: Context, logodds: Mapping[str, torch.Tensor], temperature: float, threshold: float
) -> dict[str, Any]:
    """Per set: reliability numbers of the (temperature-scaled) answers; on the irrelevant twin the
    unsupported confident rate and the mean confidence."""
    out: dict[str, Any] = {}
    for name in (n for n in ("validation", "id", "ood") if n in logodds):
        y = torch.tensor(ctx.sets[name]["labels"], dtype=torch.bool)
        p = torch.sigmoid(logodds[name] / temperature)
        conf = torch.maximum(p, 1 - p)
        correct = (p > 0.5) == y
        row = qa_reliability(conf, correct, threshold)
        row["ece_floor"], row["ece_floor_sd"] = calibrated_ece(conf, draws=200)
        row["auroc_logodds"] = _auroc(logodds[name], y)
        row["yes_share"] = float((p > 0.5).double().mean())
        p_irr = torch.sigmoid(logodds[f"{name}_irrelevant"] / temperature)
        conf_irr = torch.maximum(p_irr, 1 - p_irr)
        row["unsupported_confident"] = float((conf_irr > threshold).double().mean())
        row["unsupported_mean_conf"] = float(conf_irr.mean())
        row["irrelevant_agreement"] = float(((p_irr > 0.5) == (p > 0.5)).double().mean())
        out[name] = row
    return out


def _auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    from torchmetrics.functional.classification import binary_auroc

    return float(binary_auroc(scores.float(), labels.long()))


def nq_metrics(ctx: Context, model: nn.Module, threshold: float, args: argparse.Namespace) -> dict[str, Any]:
    """NQ-open: exact match, contains-answer and reliability numbers of the greedy answers."""
    if not ctx.nq["prompts"]:
        return {}
    texts, probs = generate_answers(model, ctx.tokenizer, ctx.nq["prompts"], args.nq_tokens, args.batch_size)
    em = torch.tensor([exact_match(t, a) for t, a in zip(texts, ctx.nq["answers"])])
    contains = torch.tensor([contains_answer(t, a) for t, a in zip(texts, ctx.nq["answers"])])
    row: dict[str, Any] = dict(qa_reliability(probs.clamp(0, 1), contains, threshold))
    row["exact_match"] = float(em.double().mean())
    row["examples"] = [{"answer": t, "p": round(float(p), 4)} for t, p in list(zip(texts, probs))[:5]]
    row["generation"] = NQ_GENERATION
    return row


# ------------------------------------------------------------------------------------------------------
# Methods


def _method_seed(seed: int, method: str) -> int:
    """A seed per (seed, method) pair that does not depend on which methods ran before."""
    return seed * 1000 + sum(ord(c) for c in method) % 997


def _train_subset(ctx: Context, seed: int, n: int) -> list[int]:
    pool = len(ctx.sets["train"]["prompts"])
    return sorted(np.random.default_rng(seed).choice(pool, size=min(n, pool), replace=False).tolist())


def run_method(ctx: Context, method: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """Train (if needed) and evaluate one method for one seed; returns its part (metrics, costs, what ICP
    removed). ``LoRA + TS`` and ``ICP + TS`` come with ``LoRA`` and ``ICP``."""
    train = ctx.sets["train"]
    idx = _train_subset(ctx, seed, args.train)
    prompts = [train["prompts"][i] for i in idx]
    irrelevant = [train["irrelevant"][i] for i in idx]
    labels = [train["labels"][i] for i in idx]
    info: dict[str, Any] = {"method": method, "seed": seed, "train_rows": len(idx)}
    with PeakMemory() as mem:
        model = ctx.load_model()
        sites = find_sites(model, target_modules=ctx.sites_pattern)
        values = None
        prune = method in ("random prune", "ICP", "ICP prune, no KL", "ICP unsupported-only score")
        if prune:
            t0 = time.perf_counter()
            if method == "random prune":
                k = icp_k(ctx, seed, args)
                values = random_values(sites, k, _method_seed(seed, method))
            else:
                attr = list(range(min(args.attr, len(prompts))))
                with ctx.cache.active(model):
                    scores, _ = icp_scores(
                        model, sites, [prompts[i] for i in attr], [irrelevant[i] for i in attr],
                        [labels[i] for i in attr], ctx.yes_id, ctx.no_id, args.batch_size,
                        contrast=method != "ICP unsupported-only score",
                    )  # fmt: skip
                info["attribution_s"] = time.perf_counter() - t0
                t0 = time.perf_counter()
                y_val = torch.tensor(ctx.sets["validation"]["labels"])

                def val_numbers(k: int) -> tuple[float, float]:
                    if k:
                        apply_masks(model, sites, top_k_values(sites, scores, k))
                    try:
                        z = boolq_logodds(ctx, model, ["validation"], args)
                    finally:
                        remove_masks(model)
                    p_irr = torch.sigmoid(z["validation_irrelevant"])
                    return _auroc(z["validation"], y_val), float(torch.maximum(p_irr, 1 - p_irr).mean())

                base = val_numbers(0)
                k, table = choose_k(val_numbers, base, args.k_grid, args.auroc_tolerance)
                info.update(choose_k_s=time.perf_counter() - t0, k_table=table, base_val=list(base))
                values = top_k_values(sites, scores, k)
                if method == "ICP":
                    _save_k(args, seed, k)
            info["k"] = k
            info["removed"] = removed(values)
            info["removed_per_layer"] = {name.split(".")[-3]: len(v) for name, v in info["removed"].items()}
            apply_masks(model, sites, values)
        kl = args.kl_weight if method in ("ICP", "LoRA + KL, no prune", "ICP unsupported-only score") else 0.0
        model = lora_model(model, ctx.suffix, _method_seed(seed, method), args.rank)
        t0 = time.perf_counter()
        with ctx.cache.active(model):
            info["history"] = train_lora(
                model, prompts, labels, irrelevant if kl > 0 else None, ctx.yes_id, ctx.no_id,
                seed=seed, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, kl_weight=kl,
            )  # fmt: skip
        info["train_s"] = time.perf_counter() - t0
        info["kl_weight"] = kl
        t0 = time.perf_counter()
        logodds = boolq_logodds(ctx, model, ["validation", "id", "ood"], args)
        temperature = fit_temperature(logodds["validation"], torch.tensor(ctx.sets["validation"]["labels"]))
        info["temperature"] = temperature
        info["metrics"] = boolq_metrics(ctx, logodds, 1.0, args.threshold)
        info["metrics_ts"] = boolq_metrics(ctx, logodds, temperature, args.threshold)
        info["nq"] = nq_metrics(ctx, model, args.threshold, args)
        info["eval_s"] = time.perf_counter() - t0
        if args.save_models:
            save_model(ctx, model, method, seed, info, args)
    info["seconds"] = mem.seconds
    info["peak_rss_mb"] = mem.peak_mb
    info["extra_rss_mb"] = mem.peak_mb - mem.start_mb
    print(
        f"seed {seed} {method}: {_brief(info['metrics'])} T={temperature:.2f} ({mem.seconds:.0f}s)",
        flush=True,
    )
    return info


def _k_file(args: argparse.Namespace, seed: int) -> Path:
    return Path(args.parts) / f"seed{seed}_icp_k.json"


def _save_k(args: argparse.Namespace, seed: int, k: int) -> None:
    _atomic_write(_k_file(args, seed), {"seed": seed, "k": k})


def icp_k(ctx: Context, seed: int, args: argparse.Namespace) -> int:
    """The k ICP chose for ``seed`` (random pruning prunes as many neurons); ICP's part must exist."""
    path = _k_file(args, seed)
    if not path.is_file():
        raise RuntimeError(f"random prune needs ICP's k for seed {seed}: run the ICP method first ({path})")
    return int(json.loads(path.read_text())["k"])


def zero_shot(ctx: Context, args: argparse.Namespace) -> dict[str, Any]:
    """The unedited model (no training: the same for every seed)."""
    with PeakMemory() as mem:
        logodds = boolq_logodds(ctx, ctx.base, ["validation", "id", "ood"], args)
        temperature = fit_temperature(logodds["validation"], torch.tensor(ctx.sets["validation"]["labels"]))
        info: dict[str, Any] = {
            "method": "zero-shot", "seed": None, "temperature": temperature,
            "metrics": boolq_metrics(ctx, logodds, 1.0, args.threshold),
            "metrics_ts": boolq_metrics(ctx, logodds, temperature, args.threshold),
            "nq": nq_metrics(ctx, ctx.base, args.threshold, args),
        }  # fmt: skip
    info.update(seconds=mem.seconds, peak_rss_mb=mem.peak_mb, extra_rss_mb=mem.peak_mb - mem.start_mb)
    print(f"zero-shot: {_brief(info['metrics'])}", flush=True)
    return info


def save_model(
    ctx: Context, model: nn.Module, method: str, seed: int, info: Mapping[str, Any], args: argparse.Namespace
) -> None:
    """Merge LoRA, fold the masks and write ``save_pretrained`` + tokenizer + ``manifest.json``."""
    wrapped: Any = model
    merged: Any = wrapped.merge_and_unload() if hasattr(wrapped, "merge_and_unload") else wrapped
    make_permanent(merged)
    folder = (
        Path(args.save_models)
        / f"seed{seed}"
        / method.replace(" ", "_").replace("+", "plus").replace(",", "")
    )
    folder.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(folder)
    ctx.tokenizer.save_pretrained(folder)
    manifest = {
        "method": method, "seed": seed, "setting": "factual_qa: BoolQ (ID titles) fine-tuning, SmolLM2-135M",
        "base_model": ctx.path, "lora_layers": ctx.suffix, "train_rows": info.get("train_rows"),
        "removed": info.get("removed", {}), "k": info.get("k", 0), "temperature": info.get("temperature"),
        "note": "temperature: divide the yes/no log-odds by it for the '+ TS' variant; removed: down_proj input "
                "columns (FFN neurons) zeroed in the saved weights",
    }  # fmt: skip
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))


def _brief(m: Mapping[str, Any]) -> str:
    return ", ".join(
        f"{name} acc {100 * m[name]['accuracy']:.1f} ECE {m[name]['ece']:.3f} hal {m[name]['hallucination']:.3f} "
        f"unsup {m[name]['unsupported_confident']:.3f}"
        for name in ("id", "ood")
        if name in m
    )


# ------------------------------------------------------------------------------------------------------
# Parts and report


def _atomic_write(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=1, default=float))
    os.replace(tmp, path)


def _part_name(method: str, seed: int | None) -> str:
    slug = method.replace(" ", "_").replace("+", "plus").replace(",", "")
    return f"{slug}.json" if seed is None else f"seed{seed}_{slug}.json"


def _variant(part: Mapping[str, Any], ts: bool) -> dict[str, Any]:
    return {"metrics": part["metrics_ts" if ts else "metrics"], "nq": part.get("nq", {}), "part": part}


def load_parts(parts_dir: Path) -> tuple[dict[str, Any] | None, dict[str, dict[int, dict[str, Any]]]]:
    """``(zero-shot part, {method: {seed: {"metrics", "nq", "part"}}})`` from the part files; the ``+ TS``
    rows are read from their base method's part."""
    zero = None
    rows: dict[str, dict[int, dict[str, Any]]] = {}
    for path in sorted(parts_dir.glob("*.json")):
        if path.name.endswith("_icp_k.json"):
            continue
        part = json.loads(path.read_text())
        if part["method"] == "zero-shot":
            zero = part
            continue
        seed = int(part["seed"])
        rows.setdefault(part["method"], {})[seed] = _variant(part, False)
        if part["method"] in WITH_TS:
            rows.setdefault(f"{part['method']} + TS", {})[seed] = _variant(part, True)
    return zero, rows


KEYS = (
    ("id", "accuracy"), ("id", "ece"), ("id", "brier"), ("id", "auroc"), ("id", "hallucination"),
    ("id", "confident_share"), ("id", "unsupported_confident"), ("ood", "accuracy"), ("ood", "ece"),
    ("ood", "brier"), ("ood", "auroc"), ("ood", "hallucination"), ("ood", "unsupported_confident"),
    ("nq", "contains"), ("nq", "exact_match"), ("nq", "ece"), ("nq", "hallucination"),
)  # fmt: skip


def _value(row: Mapping[str, Any], where: str, key: str) -> float:
    if where == "nq":
        nq = row["nq"]
        return float(nq.get("accuracy" if key == "contains" else key, math.nan)) if nq else math.nan
    return float(row["metrics"][where][key])


def _ms(vals: Sequence[float]) -> tuple[float, float]:
    vals = [v for v in vals if not math.isnan(v)]
    if not vals:
        return math.nan, math.nan
    return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def summarise(rows: Mapping[str, Mapping[int, Mapping[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per method and metric: mean, std and the seeds they cover."""
    out: dict[str, dict[str, Any]] = {}
    for method, per_seed in rows.items():
        seeds = sorted(per_seed)
        out[method] = {"seeds": seeds}
        for where, key in KEYS:
            m, s = _ms([_value(per_seed[sd], where, key) for sd in seeds])
            out[method][f"{where}.{key}"] = [m, s]
    return out


def paired(
    rows: Mapping[str, Mapping[int, Mapping[str, Any]]], method: str, baseline: str, where: str, key: str,
    lower_is_better: bool,
) -> dict[str, Any]:  # fmt: skip
    """Per-seed differences ``method - baseline`` over the seeds both have: mean, std, seeds won, and the
    relative change of the means."""
    common = sorted(set(rows.get(method, {})) & set(rows.get(baseline, {})))
    seeds = [  # seeds where both numbers exist (a hallucination rate is undefined without confident answers)
        s
        for s in common
        if not math.isnan(_value(rows[method][s], where, key))
        and not math.isnan(_value(rows[baseline][s], where, key))
    ]
    diffs = [_value(rows[method][s], where, key) - _value(rows[baseline][s], where, key) for s in seeds]
    base = [_value(rows[baseline][s], where, key) for s in seeds]
    won = sum(1 for d in diffs if (d < 0 if lower_is_better else d > 0))
    m, sd = _ms(diffs)
    bm = statistics.mean(base) if base else math.nan
    return {"seeds": seeds, "diffs": diffs, "mean": m, "std": sd, "won": won,
            "relative": (m / bm) if bm and not math.isnan(bm) else math.nan}  # fmt: skip


def targets(rows: Mapping[str, Mapping[int, Mapping[str, Any]]], method: str = "ICP") -> dict[str, Any]:
    """The issue's targets for ``method`` against LoRA (and LoRA + TS for ECE), paired per seed."""
    hal = paired(rows, method, "LoRA", "id", "hallucination", True)
    unsup = paired(rows, method, "LoRA", "id", "unsupported_confident", True)
    ece = paired(rows, method, "LoRA", "id", "ece", True)
    acc = paired(rows, method, "LoRA", "id", "accuracy", False)
    ood = paired(rows, method, "LoRA", "ood", "accuracy", False)
    ece_ts = paired(rows, method, "LoRA + TS", "id", "ece", True)
    need = TARGET_SEEDS  # of 5: fewer seeds (or seeds without a defined value) never meet a target

    def drop_ok(p: dict[str, Any]) -> bool:
        return bool(p["relative"] <= -TARGET_DROP and p["won"] >= need)

    return {
        "hallucination_id": {**hal, "met": drop_ok(hal)},
        "unsupported_confident_id": {**unsup, "met": drop_ok(unsup)},
        "ece_id": {**ece, "met": drop_ok(ece)},
        "accuracy_id_within_1": {**acc, "met": bool(100 * acc["mean"] >= -TARGET_ACC_POINTS)},
        "accuracy_ood_up": {**ood, "met": bool(ood["mean"] > 0 and ood["won"] >= need)},
        "ece_vs_ts": {**ece_ts, "met": bool(ece_ts["mean"] <= 0 and ece_ts["won"] >= need)},
    }


def write_report(args: argparse.Namespace) -> None:
    """``factual_qa.json``, ``factual_qa.md`` and ``factual_qa.png`` from the parts that exist."""
    parts_dir = Path(args.parts)
    zero, rows = load_parts(parts_dir)
    all_rows = dict(rows)
    if zero is not None:
        all_rows["zero-shot"] = {0: _variant(zero, False)}
    order = ["zero-shot", *MAIN_METHODS, *ABLATIONS, *TS_ABLATIONS]
    all_rows = {m: all_rows[m] for m in order if m in all_rows}
    summary = summarise(all_rows)
    checks = {m: targets(rows, m) for m in ("ICP", "ICP + TS", *ABLATIONS, *TS_ABLATIONS)
              if m in rows and "LoRA" in rows}  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    costs = _costs(zero, rows)
    payload = {
        "setting": "factual QA (BoolQ ID / OOD topic, NQ-open), SmolLM2-135M-Instruct",
        "args": {k: v for k, v in vars(args).items() if k != "func"}, "summary": summary, "targets": checks,
        "costs": costs, "zero_shot": zero,
        "per_seed": {m: {str(s): r["part"] for s, r in per.items()} for m, per in rows.items()},
    }  # fmt: skip
    (out / "factual_qa.json").write_text(json.dumps(payload, indent=1, default=float))
    lines = _markdown(summary, checks, costs, rows, args)
    (out / "factual_qa.md").write_text("\n".join(lines) + "\n")
    with contextlib.suppress(Exception):
        _plot(summary, out / "factual_qa.png")
    print("\n".join(lines))


def _costs(
    zero: Mapping[str, Any] | None, rows: Mapping[str, Mapping[int, Mapping[str, Any]]]
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if zero is not None:
        out["zero-shot"] = {"seconds": zero["seconds"], "peak_rss_mb": zero["peak_rss_mb"]}
    for method, per in rows.items():
        if method.endswith("+ TS"):
            continue
        parts = [r["part"] for r in per.values()]
        out[method] = {
            key: statistics.mean(p[key] for p in parts if key in p)
            for key in (
                "seconds",
                "train_s",
                "eval_s",
                "attribution_s",
                "choose_k_s",
                "peak_rss_mb",
                "extra_rss_mb",
            )
            if any(key in p for p in parts)
        }
        ks = [p.get("k") for p in parts if p.get("k") is not None]
        if ks:
            out[method]["k"] = ks
    return out


def _fmt(pair: Sequence[float], pct: bool) -> str:
    m, s = pair
    if math.isnan(m):
        return "n/a"
    return f"{100 * m:.1f} ± {100 * s:.1f}" if pct else f"{m:.3f} ± {s:.3f}"


def _nq_caveat(rows: Mapping[str, Any]) -> list[str]:
    """A warning line when some parts' NQ numbers predate :data:`NQ_GENERATION` (answers cut at a leading
    newline, so empty: their NQ columns measure nothing)."""
    unique = {id(r.get("part")): r.get("part") or {} for per_seed in rows.values() for r in per_seed.values()}
    parts = list(unique.values())  # the "+ TS" rows share their base method's part
    old = sum(1 for p in parts if p.get("nq") and p["nq"].get("generation") != NQ_GENERATION)
    if not old:
        return []
    return [
        f"**NQ columns: {old} of {len(parts)} trained parts were generated before the answer rule was fixed** "
        "(answers cut at a leading newline, so most answers were empty and contains-answer is near 0 for that "
        "reason); rerun the "
        "benchmark to refresh them. The BoolQ columns are not affected.",
        "",
    ]


#: Arguments that say what was run: the report's command names those that differ from the defaults.
COMMAND_ARGS = ("train", "train_pool", "val", "eval", "passage_words", "epochs", "parts", "out")


def _command(args: argparse.Namespace) -> str:
    """The command that gives the report: ``--quick``, or the sizes and folders that differ from the defaults."""
    if args.quick:
        return "python -m benchmarks.factual_qa --quick"
    defaults = vars(parse([]))
    flags = [
        f"--{k.replace('_', '-')} {getattr(args, k)}" for k in COMMAND_ARGS if getattr(args, k) != defaults[k]
    ]
    return " ".join(["python -m benchmarks.factual_qa", *flags])


def _markdown(
    summary: Mapping[str, Any], checks: Mapping[str, Any], costs: Mapping[str, Any],
    rows: Mapping[str, Any], args: argparse.Namespace,
) -> list[str]:  # fmt: skip
    command = _command(args)
    lines = [
        "# Factual reliability in QA: SmolLM2-135M-Instruct, BoolQ (ID titles / OOD topic) and NQ-open",
        "",
        f"Command: `{command}` (then `--combine`); machine: {platform.machine()}, {os.cpu_count()} cores shared "
        f"with other jobs, CPU, {args.threads or torch.get_num_threads()} torch thread(s). Sets (fixed for every "
        f"seed): {args.train} training questions per seed (drawn from a pool of {args.train_pool}), "
        f"{args.val} validation, {args.eval} ID test and {args.eval} OOD-topic test questions, each also with an "
        f"irrelevant passage; {args.nq} NQ-open questions. Passages cut to {args.passage_words} words. LoRA "
        f"rank {args.rank} on the last {args.suffix_layers} layers, {args.epochs} epoch(s), batch "
        f"{args.batch_size}, lr {args.lr}. Confidence threshold {args.threshold}. Mean ± std over seeds "
        "(zero-shot: one deterministic model).",
        "",
        "Hallucination = wrong answers among those with confidence > threshold; unsupported = share of "
        "irrelevant-passage questions answered with confidence > threshold; AUROC of the confidence for "
        "correctness. All in %, ECE and Brier as fractions.",
        "",
        *_nq_caveat(rows),
        "| method | seeds | ID acc | ID ECE | ID Brier | ID AUROC | ID halluc. | ID unsupported | OOD acc | OOD ECE "
        "| OOD halluc. | OOD unsupported | NQ contains | NQ halluc. |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method, row in summary.items():
        lines.append(
            f"| {method} | {len(row['seeds'])} | {_fmt(row['id.accuracy'], True)} | {_fmt(row['id.ece'], False)} | "
            f"{_fmt(row['id.brier'], False)} | {_fmt(row['id.auroc'], False)} | "
            f"{_fmt(row['id.hallucination'], True)} | {_fmt(row['id.unsupported_confident'], True)} | "
            f"{_fmt(row['ood.accuracy'], True)} | {_fmt(row['ood.ece'], False)} | "
            f"{_fmt(row['ood.hallucination'], True)} | {_fmt(row['ood.unsupported_confident'], True)} | "
            f"{_fmt(row['nq.contains'], True)} | {_fmt(row['nq.hallucination'], True)} |"
        )
    lines += [
        "",
        "Does any model read the passage? Per method (ID test, mean over seeds): the share of yes answers (the ID "
        "test sample's yes share is the majority-class accuracy), the AUROC of the log-odds for the label "
        "(0.5: no evidence used), the share of questions answered the same with the real and an irrelevant "
        "passage, the mean confidence with an irrelevant passage, and the fitted temperature.",
        "",
        "| method | yes share | AUROC of log-odds | same answer with irrelevant passage | mean conf., irrelevant | "
        "temperature |",
        "|---|---|---|---|---|---|",
    ]
    for method, per in rows.items():
        if method.endswith("+ TS"):
            continue
        parts = [r["part"] for r in per.values()]
        ids = [p["metrics"]["id"] for p in parts]
        lines.append(
            f"| {method} | {_fmt(_ms([m['yes_share'] for m in ids]), True)} | "
            f"{_fmt(_ms([m['auroc_logodds'] for m in ids]), False)} | "
            f"{_fmt(_ms([m['irrelevant_agreement'] for m in ids]), True)} | "
            f"{_fmt(_ms([m['unsupported_mean_conf'] for m in ids]), False)} | "
            f"{_fmt(_ms([p['temperature'] for p in parts]), False)} |"
        )
    lines += ["", "## Targets (paired per seed against LoRA; ECE also against LoRA + TS)", ""]
    lines += ["| method | target | paired difference (mean ± std) | relative | seeds won | met |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    names = {
        "hallucination_id": "ID hallucination -25%", "unsupported_confident_id": "ID unsupported confident -25%",
        "ece_id": "ID ECE -25%", "accuracy_id_within_1": "ID accuracy within 1 point",
        "accuracy_ood_up": "OOD accuracy up", "ece_vs_ts": "ID ECE <= LoRA + TS",
    }  # fmt: skip
    for method, c in checks.items():
        for key, label in names.items():
            p = c[key]
            pct = "accuracy" in key or "hallucination" in key or "unsupported" in key
            scale = 100 if pct else 1
            rel = f"{100 * p['relative']:+.0f}%" if not math.isnan(p["relative"]) else "n/a"
            lines.append(
                f"| {method} | {label} | {scale * p['mean']:+.3f} ± {scale * p['std']:.3f} | {rel} | "
                f"{p['won']} / {len(p['seeds'])} | {'yes' if p['met'] else 'no'} |"
            )
    lines += ["", ece_floor_line(rows)]
    lines += ["", "## Costs (mean per seed)", "", "| method | seconds | train s | eval s | attribution s | "
              "choose-k s | peak RSS MB | k per seed |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for method, c in costs.items():
        lines.append(
            f"| {method} | {c.get('seconds', math.nan):.0f} | {c.get('train_s', math.nan):.0f} | "
            f"{c.get('eval_s', math.nan):.0f} | {c.get('attribution_s', math.nan):.0f} | "
            f"{c.get('choose_k_s', math.nan):.0f} | {c.get('peak_rss_mb', math.nan):.0f} | {c.get('k', '')} |"
        )
    icp = rows.get("ICP", {})
    for seed in sorted(icp):
        part = icp[seed]["part"]
        lines.append(
            f"- ICP seed {seed}: k = {part.get('k')}, pruned neurons per layer {part.get('removed_per_layer')}, "
            f"validation (AUROC, mean confidence with irrelevant passages) per k {_round(part.get('k_table'))}, "
            f"unpruned {_round(part.get('base_val'))}; training BCE {_round(part['history']['bce'])}, "
            f"KL {_round(part['history']['kl'])}."
        )
    lines += [
        "",
        "A hallucination rate of n/a means no answer was confident (above the threshold): temperature scaling "
        "with a large fitted temperature makes every answer unconfident.",
    ]
    return lines


def ece_floor_line(rows: Mapping[str, Mapping[int, Mapping[str, Any]]]) -> str:
    """What ECE differences mean at this size: the ECE a perfectly calibrated model shows on as many ID questions
    (:func:`~icp_lightning.metrics.qa.calibrated_ece`): per row with its own confidences where the parts hold
    them (``ece_floor``), else for confidences spread evenly over [0.5, 0.9]."""
    sizes = {
        r["part"]["metrics"]["id"]["n"] for seeds in rows.values() for r in seeds.values() if "part" in r
    }
    if len(sizes) != 1:
        return f"ECE noise floor: not computed (ID set sizes {sorted(sizes)})."
    n = sizes.pop()
    own = {
        method: [r["metrics"]["id"]["ece_floor"] for r in seeds.values()]
        for method, seeds in rows.items()
        if seeds and all("ece_floor" in r["metrics"]["id"] for r in seeds.values())
    }
    if own:
        listed = "; ".join(f"{m} {statistics.mean(v):.3f}" for m, v in own.items())
        return (
            f"ECE noise floor: the ECE a perfectly calibrated model with each row's own ID confidences shows on "
            f"these {n} questions (mean over seeds; 200 draws of which answers are right; `calibrated_ece`): "
            f"{listed}. A row's ECE near its floor is as calibrated as this set's size can show."
        )
    mean, sd = calibrated_ece(torch.linspace(0.5, 0.9, n))
    return (
        f"ECE noise floor: a perfectly calibrated model whose confidences spread evenly over [0.5, 0.9] shows an "
        f"ECE of {mean:.3f} ± {sd:.3f} on {n} ID questions (15 bins, 1000 draws of which answers are right; "
        "`calibrated_ece`). ECE differences smaller than that spread are within what the set's size allows."
    )


def _round(obj: Any) -> Any:
    if isinstance(obj, float):
        return round(obj, 3)
    if isinstance(obj, dict):
        return {k: _round(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_round(v) for v in obj]
    return obj


def _plot(summary: Mapping[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("id.ece", "ID ECE"), ("id.hallucination", "ID hallucination"),
               ("id.unsupported_confident", "ID unsupported confident"), ("ood.accuracy", "OOD accuracy")]  # fmt: skip
    methods = list(summary)
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 4))
    for ax, (key, title) in zip(axes, metrics):
        means = [summary[m][key][0] for m in methods]
        stds = [summary[m][key][1] for m in methods]
        ax.bar(range(len(methods)), means, yerr=stds, color="tab:blue")
        ax.set_xticks(range(len(methods)))
        ax.set_xticklabels(methods, rotation=60, ha="right", fontsize=8)
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------------
# Entry point


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="seed 0, small sets (under 15 minutes)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--methods", nargs="+", default=None, help=f"among {MAIN_METHODS + ABLATIONS}")
    parser.add_argument("--ablations", action="store_true", help="also run the ablations")
    parser.add_argument("--no-zero-shot", action="store_true")
    parser.add_argument("--combine", action="store_true", help="only build the report from the parts")
    parser.add_argument("--train", type=int, default=64)
    parser.add_argument("--train-pool", type=int, default=96)
    parser.add_argument("--val", type=int, default=64)
    parser.add_argument("--eval", type=int, default=96)
    parser.add_argument("--nq", type=int, default=24)
    parser.add_argument("--nq-tokens", type=int, default=6)
    parser.add_argument("--nq-probe", type=int, default=0, metavar="N",
                        help="only probe the zero-shot model's NQ answers on N training questions (nq_probe.md)")  # fmt: skip
    parser.add_argument("--attr", type=int, default=32, help="training questions for attribution")
    parser.add_argument("--passage-words", type=int, default=40)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--suffix-layers", type=int, default=4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--kl-weight", type=float, default=1.0)
    parser.add_argument("--k-grid", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--auroc-tolerance", type=float, default=0.02)
    parser.add_argument("--threshold", type=float, default=0.75)
    parser.add_argument("--parts", default="benchmarks/results/factual_qa_parts")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument(
        "--prefix-cache",
        default="~/.cache/icp_lightning/factual_qa_prefix.pt",
        help="file keeping the frozen layers' outputs between runs ('' : none)",
    )
    parser.add_argument(
        "--prefix-cache-gb",
        type=float,
        default=2.0,
        help="above this size the cache file keeps only the current run's prompts",
    )
    parser.add_argument("--save-models", default=None, help="write each final model here")
    parser.add_argument("--model-path", default=None, help="a local model folder instead of SmolLM2")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:  # its own folders: a quick run never mixes with the committed results
        args.seeds = [0]
        if args.parts == parser.get_default("parts"):
            args.parts = "runs/factual_qa_quick/parts"
        if args.out == parser.get_default("out"):
            args.out = "runs/factual_qa_quick"
        args.train, args.train_pool, args.val, args.eval, args.nq, args.epochs = 32, 32, 32, 48, 8, 1
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse(argv)
    import transformers

    transformers.logging.set_verbosity_error()
    if args.combine:
        write_report(args)
        return
    if args.nq_probe:
        print(run_nq_probe(args))
        return
    methods = list(args.methods or MAIN_METHODS)
    if args.ablations and args.methods is None:
        methods += list(ABLATIONS)
    methods = [m for m in methods if not m.endswith("+ TS")]  # they come with their base method
    if "random prune" in methods and "ICP" in methods:  # random prunes as many neurons as ICP
        methods.remove("random prune")
        methods.insert(methods.index("ICP") + 1, "random prune")
    bad = [m for m in methods if m not in MAIN_METHODS + ABLATIONS]
    if bad:
        raise SystemExit(f"unknown method(s) {bad}; choose among {MAIN_METHODS + ABLATIONS}")
    ctx = build_context(args, args.model_path)
    parts = Path(args.parts)
    if not args.no_zero_shot and not (parts / _part_name("zero-shot", None)).is_file():
        _atomic_write(parts / _part_name("zero-shot", None), zero_shot(ctx, args))
    for seed in args.seeds:
        for method in methods:
            if (parts / _part_name(method, seed)).is_file():
                print(f"seed {seed} {method}: part exists, skipped", flush=True)
                continue
            _atomic_write(parts / _part_name(method, seed), run_method(ctx, method, seed, args))
    write_report(args)


if __name__ == "__main__":
    main()
