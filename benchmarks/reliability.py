"""Reliability benchmark: ICP vs ERM, an oracle, pruning baselines, DFR and JTT on real MiniLM-L6 and real data.

Settings (all offline; see ``../shared/ASSETS.md``):

- **A, planted shortcut**: Rotten Tomatoes sentences; the token ``zeppelin`` is planted on 95% of positive and
  5% of negative training sentences. Evaluation: ``id`` (same correlation), ``ood`` (reversed), ``clean`` (no
  token).
- **B, domain shift**: VADER's human-rated movie-review snippets train; evaluation on held-out movie snippets
  (``id``) and on Amazon product-review snippets (``ood``); the area under the domain-shift curve (accuracy as
  the share of Amazon snippets in the evaluation mix grows from 0 to 1).
- **C, fairness**: a gendered first name starts every Rotten Tomatoes sentence; in training 90% of positive
  sentences get a male name and 90% of negative ones a female name; evaluation on a ``balanced`` test set
  (gender independent of the label): accuracy, demographic-parity and equal-opportunity differences between the
  genders, and the counterfactual flip rate (the name swapped for the other gender's).
- **D, causal-LM bias** (SmolLM2-135M, training-free) lives in :mod:`benchmarks.setting_d`.

Every setting has a small group-balanced held-out split (``heldout``, 256 rows); it is the only extra data any
method may use: DFR refits the last layer on it, ICP contrasts it with ``id`` to score features (signed
reduction, ``dataset_weights={"id": 1, "heldout": -1}``) and refits the head on it. Nobody is told the token or
attribute except the reference marked "told".

Every method continues from the same ERM model (``--erm-epochs`` epochs) with at most one more epoch (the same
budget), except the oracle (trained from scratch on data without the token or the names, for ERM epochs + 1)
and the training-free ones.

Run ``python -m benchmarks.reliability --quick`` (one seed of A, under 15 minutes on 2 cores, into
``benchmarks/results/quick/``) or
``python -m benchmarks.reliability`` (every setting, five seeds, ablations on seed 0 of A: hours). Each
(setting, seed) is stored in ``benchmarks/results/parts/`` as it finishes (``--settings``/``--seeds`` split a run
over processes; finished parts are skipped unless ``--force``), then ``reliability.json``, ``reliability.md`` and
the PNG plots are rebuilt from all parts (``--combine`` does only that).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.common import parse_args

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TOKEN = "zeppelin"
#: Setting C's names: pair i of MALE and FEMALE swap into each other for the counterfactual flip rate.
MALE = ["james", "john", "robert", "michael", "david", "william", "thomas", "daniel"]
FEMALE = ["mary", "patricia", "jennifer", "linda", "elizabeth", "susan", "jessica", "sarah"]
#: The ICP configuration fixed in advance as "ICP (best)" for the targets (not picked on test results).
ICP_MAIN = "ICP prune top {k} heads + head refit"
#: ICP's input-level variants (added after the first runs of this benchmark showed that pruning heads leaves the
#: shortcut in place; reported against the targets beside ICP_MAIN, not instead of it).
#: "masked at" (read as [MASK]) was the first version: fine-tuning learns [MASK] as the new shortcut (seeds 1-2 of A
#: measured it); "deleted from" replaced it.
INVERSE = "ICP inverse: discovered tokens deleted from the input, {what}"
INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")
HELDOUT = 256


def inputs_of(batch: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    return {k: batch[prefix + k] for k in INPUT_KEYS if prefix + k in batch}


@dataclass
class Bench:
    """One setting's data for one seed: loaders and what to report."""

    setting: str
    data: Any
    train: Any
    evals: dict[str, Any]
    heldout: Any
    attribution: dict[str, Any]
    oracle_train: Any = None
    told: bool = False  # the training batches carry a paired counterfactual told the token / attribute
    fairness: bool = False  # groups are 2 * label + gender; report DP / EO / flip rate
    tokenizer: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------------
# Data


def _module(seed: int, args: argparse.Namespace, **kwargs: Any) -> Any:
    from icp_lightning import ICPDataModule

    data = ICPDataModule(
        tokenizer="minilm", num_labels=2, max_length=48, batch_size=32, eval_batch_size=128,
        attribution_size=256, seed=seed, **kwargs,
    )  # fmt: skip
    data.setup("fit")
    return data


def bench_a(args: argparse.Namespace, seed: int) -> Bench:
    common = {"recipe": "rotten_tomatoes", "heldout_size": HELDOUT, "max_train_examples": args.train,
              "max_eval_examples": args.eval}  # fmt: skip
    data = _module(seed, args, shortcut_token=TOKEN, shortcut_rate=0.95, **common)
    loaders = data.eval_dataloaders()
    oracle = _module(seed, args, **common)  # the same rows, no token
    return Bench("A", data, data.train_dataloader(), {n: loaders[n] for n in ("id", "ood", "clean")},
                 data.heldout_dataloader(), data.attribution_dataloaders(["id", "heldout"]),
                 oracle_train=oracle.train_dataloader(), told=True, tokenizer=data.tokenizer)  # fmt: skip


def _write(rows: list[dict[str, Any]], path: Path) -> str:
    with path.open("w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def _balanced(labels: np.ndarray, rows: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` rows of ``rows`` with the two labels equally often (as far as they go)."""
    out = []
    for y in (0, 1):
        pool = rows[labels[rows] == y]
        out.append(rng.permutation(pool)[: n // 2])
    return np.concatenate(out)


def _files_module(
    seed: int, args: argparse.Namespace, splits: dict[str, list[dict[str, Any]]], **kw: Any
) -> Any:
    folder = Path(tempfile.mkdtemp(prefix="icp_bench_"))
    files = {name: _write(rows, folder / f"{name}.jsonl") for name, rows in splits.items()}
    train = files.pop("train")
    return _module(seed, args, train_files=train, eval_files=files, group_column="group", **kw)


def bench_c(args: argparse.Namespace, seed: int) -> Bench:
    """Gendered names: 90% of positive training sentences get a male name, 90% of negative ones a female name."""
    from icp_lightning.recipes import rotten_tomatoes

    raw = rotten_tomatoes(seed=seed)
    rng = np.random.default_rng(seed)
    tr_text, tr_y = list(raw["train"]["text"][:]), np.asarray(raw["train"]["label"][:])
    te_text, te_y = list(raw["test"]["text"][:]), np.asarray(raw["test"]["label"][:])
    held = _balanced(tr_y, np.arange(len(tr_y)), HELDOUT, rng)
    rest = np.setdiff1d(np.arange(len(tr_y)), held)
    train_rows = rng.permutation(rest)[: args.train]
    test_rows = _balanced(te_y, np.arange(len(te_y)), args.eval, rng)

    def row(text: str, y: int, female: int) -> dict[str, Any]:
        i = int(rng.integers(len(MALE)))
        names = (MALE, FEMALE)
        return {"text": f"{names[female][i]} wrote: {text}", "cf_text": f"{names[1 - female][i]} wrote: {text}",
                "label": int(y), "group": 2 * int(y) + female}  # fmt: skip

    def correlated(y: int) -> int:  # 90% male for positives, 90% female for negatives
        return int(rng.random() < (0.1 if y == 1 else 0.9))

    def balanced(rows: np.ndarray, ys: np.ndarray) -> list[int]:  # gender independent of the label, exactly
        out = np.zeros(len(rows), dtype=int)
        for y in (0, 1):
            idx = np.flatnonzero(ys[rows] == y)
            out[rng.permutation(idx)[: len(idx) // 2]] = 1
        return out.tolist()

    splits = {
        "train": [row(tr_text[i], tr_y[i], correlated(tr_y[i])) for i in train_rows],
        "id": [row(te_text[i], te_y[i], correlated(te_y[i])) for i in test_rows],
        "balanced": [row(te_text[i], te_y[i], g) for i, g in zip(test_rows, balanced(test_rows, te_y))],
        "heldout": [row(tr_text[i], tr_y[i], g) for i, g in zip(held, balanced(held, tr_y))],
    }
    data = _files_module(seed, args, splits, cf_text_column="cf_text")
    oracle_rows = [{"text": tr_text[i], "label": int(tr_y[i]), "group": 2 * int(tr_y[i])} for i in train_rows]
    oracle = _files_module(seed, args, {"train": oracle_rows, "id": oracle_rows[:8]})
    loaders = data.eval_dataloaders()
    return Bench("C", data, data.train_dataloader(), {n: loaders[n] for n in ("id", "balanced")},
                 loaders["heldout"], data.attribution_dataloaders(["id", "heldout"]),
                 oracle_train=oracle.train_dataloader(), told=True, fairness=True,
                 tokenizer=data.tokenizer)  # fmt: skip


def bench_b(args: argparse.Namespace, seed: int) -> Bench:
    """VADER: movie snippets train; movie (id) and Amazon (ood) evaluate; held-out: 128 of each, label-balanced."""
    from icp_lightning.recipes import vader_domains

    raw = vader_domains(seed=seed)
    rng = np.random.default_rng(seed)
    cols = {k: (list(raw[k]["text"][:]), np.asarray(raw[k]["label"][:])) for k in ("train", "test", "ood")}
    tr_text, tr_y = cols["train"]
    am_text, am_y = cols["ood"]
    held_movie = _balanced(tr_y, np.arange(len(tr_y)), HELDOUT // 2, rng)
    held_amazon = _balanced(am_y, np.arange(len(am_y)), HELDOUT // 2, rng)
    train_rows = rng.permutation(np.setdiff1d(np.arange(len(tr_y)), held_movie))[: args.train]
    ood_rows = rng.permutation(np.setdiff1d(np.arange(len(am_y)), held_amazon))[: args.eval]
    te_text, te_y = cols["test"]
    id_rows = rng.permutation(len(te_y))[: args.eval]

    def rows(text: list[str], ys: np.ndarray, idx: np.ndarray, domain: int) -> list[dict[str, Any]]:
        return [{"text": text[i], "label": int(ys[i]), "group": 2 * int(ys[i]) + domain} for i in idx]

    splits = {
        "train": rows(tr_text, tr_y, train_rows, 0),
        "id": rows(te_text, te_y, id_rows, 0),
        "ood": rows(am_text, am_y, ood_rows, 1),
        "heldout": rows(tr_text, tr_y, held_movie, 0) + rows(am_text, am_y, held_amazon, 1),
    }
    data = _files_module(seed, args, splits)
    loaders = data.eval_dataloaders()
    return Bench("B", data, data.train_dataloader(), {n: loaders[n] for n in ("id", "ood")}, loaders["heldout"],
                 data.attribution_dataloaders(["id", "heldout"]), tokenizer=data.tokenizer)  # fmt: skip


BENCHES = {"A": bench_a, "B": bench_b, "C": bench_c}


# ------------------------------------------------------------------------------------------------------
# Evaluation


def evaluate(model: torch.nn.Module, bench: Bench, seed: int = 0) -> dict[str, float]:
    """Per evaluation set: accuracy, ECE, NLL, worst-group accuracy (package metrics, checked against
    torchmetrics and fairlearn in tests/metrics); C: DP / EO differences between the genders and the
    counterfactual flip rate; B: the area under the domain-shift curve."""
    from icp_lightning.metrics import (
        ReliabilityMetrics,
        counterfactual_flip_rate,
        demographic_parity_difference,
        equal_opportunity_difference,
    )

    model.eval()
    out: dict[str, float] = {}
    correct: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, loader in bench.evals.items():
            metrics = ReliabilityMetrics(num_classes=2, num_groups=4)
            preds, cf_preds, labels, groups = [], [], [], []
            for batch in loader:
                logits = model(**inputs_of(batch)).logits
                metrics.update(logits, batch["labels"], groups=batch["group"])
                preds.append(logits.argmax(-1))
                labels.append(batch["labels"])
                groups.append(batch["group"])
                if bench.fairness:
                    cf_preds.append(model(**inputs_of(batch, "cf_")).logits.argmax(-1))
            res = metrics.compute()
            for key in ("acc", "ece", "nll", "worst_group_acc"):
                out[f"{name}/{key}"] = float(res[key])
            p, y, g = torch.cat(preds), torch.cat(labels), torch.cat(groups)
            correct[name] = (p == y).float()
            if bench.fairness:
                gender = g % 2
                out[f"{name}/dp_diff"] = float(demographic_parity_difference(p, gender, num_groups=2))
                out[f"{name}/eo_diff"] = float(equal_opportunity_difference(p, y, gender, num_groups=2))
                out[f"{name}/flip_rate"] = float(counterfactual_flip_rate(p, torch.cat(cf_preds)))
    if bench.setting == "B":
        out["shift_auc"] = shift_auc(correct["id"], correct["ood"], seed)
    return out


def shift_auc(id_correct: torch.Tensor, ood_correct: torch.Tensor, seed: int, steps: int = 11) -> float:
    """Area under accuracy vs the share p of shifted examples in an evaluation mix of n examples (p = 0, 0.1, ...,
    1; each mix drawn without replacement), by the trapezoid rule."""
    g = torch.Generator().manual_seed(seed)
    n = min(len(id_correct), len(ood_correct))
    accs = []
    for p in torch.linspace(0, 1, steps).tolist():
        k = round(p * n)
        mix = torch.cat([ood_correct[torch.randperm(len(ood_correct), generator=g)[:k]],
                         id_correct[torch.randperm(len(id_correct), generator=g)[: n - k]]])  # fmt: skip
        accs.append(float(mix.mean()))
    return float(np.trapezoid(accs, dx=1.0 / (steps - 1)))


# ------------------------------------------------------------------------------------------------------
# Training and the methods' building blocks


def train(
    model: torch.nn.Module,
    loader: Any,
    epochs: float,
    lr: float,
    loss_fn: Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor] | None = None,
) -> float:
    """Plain AdamW fine-tuning (``epochs`` may be fractional: the first part of an epoch); ``loss_fn`` replaces
    cross-entropy; returns seconds."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    t0 = time.perf_counter()
    steps_left = round(epochs * len(loader))
    while steps_left > 0:
        model.train()
        for batch in loader:
            if steps_left <= 0:
                break
            if loss_fn is not None:
                loss = loss_fn(model, batch)
            else:
                loss = F.cross_entropy(model(**inputs_of(batch)).logits, batch["labels"])
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps_left -= 1
    model.eval()
    return time.perf_counter() - t0


def load_model() -> torch.nn.Module:
    import transformers

    from icp_lightning.recipes import resolve_pretrained

    return transformers.AutoModelForSequenceClassification.from_pretrained(
        resolve_pretrained("minilm"), num_labels=2
    )


def icp_scores(
    model: torch.nn.Module,
    bench: Bench,
    granularity: str = "head",
    method: str = "gradient",
    target_modules: Any = None,
    interventions: tuple[str, ...] = ("mask",),
    reduction: str = "signed",
) -> tuple[Any, Any, float]:
    """Signed contrast ``id`` vs ``heldout`` (the data the held-out split shows: a feature that helps on ``id``
    and not on balanced data is spurious); ``reduction="abs"``: the literal |CE| average."""
    from icp_lightning import causal_effects, find_sites, spuriousness

    sites = find_sites(model, target_modules=target_modules, granularity=granularity)
    t0 = time.perf_counter()
    effects = {
        (iv, "label_logprob", name): causal_effects(
            model, loader, sites, iv, method=method, progress=False, partner="permutation"
        )  # fmt: skip
        for iv in interventions
        for name, loader in bench.attribution.items()
    }
    weights = {"id": 1.0, "heldout": -1.0} if reduction == "signed" else None
    scores = spuriousness(effects, dataset_weights=weights, reduction=reduction)  # type: ignore[arg-type]
    return sites, scores, time.perf_counter() - t0


def prune(model: torch.nn.Module, sites: Any, scores: Any, k: int, mode: str = "hard") -> float:
    """Mask (``"hard"``) or reweight (``"soft"``) the ``k`` top-scored features of ``sites`` on this copy of the
    model, with the pruning callback's own selection (:func:`select_masks`); returns the threshold tau (the
    k-th score)."""
    from icp_lightning import apply_masks, find_sites
    from icp_lightning.callbacks.pruning import select_masks
    from icp_lightning.core.masks import get_masks

    mine = find_sites(model, target_modules=list(sites), granularity=sites.granularity)
    current = get_masks(model)
    masks = {n: current.get(n, torch.ones(mine[n].n_features)) for n in mine}
    values = select_masks({n: scores[n] for n in mine}, masks, amount=k, mode=mode)  # type: ignore[arg-type]
    apply_masks(model, mine, values)
    flat = torch.cat([scores[n].reshape(-1) for n in mine])
    return float(flat.topk(k).values[-1])


def random_scores(sites: Any, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(sites[n].n_features, generator=g) for n in sites}


def refit(model: torch.nn.Module, bench: Bench) -> torch.nn.Module:
    """DFR's step: refit the head (L2 logistic regression, l2=1) on the held-out split's frozen features."""
    from icp_lightning import refit_head

    refit_head(model, bench.heldout, l2=1.0)
    return model


def magnitude_prune(model: torch.nn.Module, k_heads: int, n_heads: int) -> torch.nn.Module:
    """Lightning's ``ModelPruning`` (L1 structured, input columns) on the attention output projections, the
    same modules and the same number of columns as ``k_heads`` pruned heads; applied once, made permanent."""
    from lightning.pytorch.callbacks import ModelPruning

    from icp_lightning import find_sites

    sites = find_sites(model, granularity="head")
    params = [(site.module, "weight") for site in sites.values()]
    cb = ModelPruning("ln_structured", parameters_to_prune=params, use_global_unstructured=False,
                      amount=k_heads / n_heads, pruning_dim=1, pruning_norm=1,
                      use_lottery_ticket_hypothesis=False, verbose=0)  # fmt: skip
    cb.setup(None, model, "fit")  # type: ignore[arg-type]  # only resolves parameters_to_prune
    cb.apply_pruning(k_heads / n_heads)
    cb.make_pruning_permanent(model)  # type: ignore[arg-type]
    return model


def token_edit(tokenizer: Any, top_k: int = 8) -> Any:
    """The discrete inverse both ICP steps use: one [MASK] edit per example, two candidates checked exactly."""
    from icp_lightning import TokenEditCounterfactual

    return TokenEditCounterfactual(max_edits=1, candidates=2, top_k=top_k, replace_id=tokenizer.mask_token_id,
                                   special_token_ids=tokenizer.all_special_ids)  # fmt: skip


def told_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The reference told the token / attribute: CE on x and on its paired counterfactual x' (the token removed
    or added, the name swapped), plus KL(M(x) || M(x'))."""
    from icp_lightning import counterfactual_kl
    from icp_lightning.core.interventions import counterfactual_batch

    logits = model(**inputs_of(batch)).logits
    cf_logits = model(**inputs_of(counterfactual_batch(batch))).logits
    return (F.cross_entropy(logits, batch["labels"]) + F.cross_entropy(cf_logits, batch["labels"])
            + counterfactual_kl(logits, cf_logits))  # fmt: skip


def token_edit_epoch(model: torch.nn.Module, bench: Bench, scores: Any, args: argparse.Namespace,
                     top_k: int = 8, epochs: float = 1.0) -> None:  # fmt: skip
    """ICP's contrastive fine-tuning told nothing: x' comes from the discrete inverse of interventions on the
    ``top_k`` top-scored features (:class:`TokenEditCounterfactual`: the token whose removal moves those features
    most is replaced by [MASK]); the same loss as :func:`told_loss`."""
    from icp_lightning import counterfactual_kl, find_sites

    m_sites = find_sites(model, granularity="head")  # hooks must go on this copy's modules
    tok = bench.tokenizer
    cf = token_edit(tok, top_k)

    def loss(m: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        m.eval()
        out = cf.build(m, inputs_of(batch) | {"labels": batch["labels"]}, scores, m_sites)
        m.train()
        logits = m(**inputs_of(batch)).logits
        cf_logits = m(**inputs_of(out.batch)).logits
        return (F.cross_entropy(logits, batch["labels"]) + F.cross_entropy(cf_logits, batch["labels"])
                + counterfactual_kl(logits, cf_logits))  # fmt: skip

    train(model, bench.train, epochs, args.lr, loss)


def inverse_methods(run: Runner, bench: Bench, scores: Any, args: argparse.Namespace) -> list[dict[str, Any]]:
    """ICP's input-level step, told nothing: map the top-scored heads back to tokens over the ``id`` attribution
    set (:func:`discover_tokens` over :class:`TokenEditCounterfactual` edits), then prune the discovered tokens at
    the input (:func:`mask_input_tokens`, ``mode="delete"``: the model never sees them), alone, with the head refit, or with
    one epoch of plain CE. Returns the most edited tokens, for the report."""
    from icp_lightning import discover_tokens, find_sites, mask_input_tokens

    tok = bench.tokenizer
    erm = run.erm
    m_sites = find_sites(erm, granularity="head")
    cf = token_edit(tok)
    t0 = time.perf_counter()
    batches = [inputs_of(b) | {"labels": b["labels"]} for b in bench.attribution["id"]]
    found = discover_tokens(erm, batches, scores, m_sites, cf, special_token_ids=tok.all_special_ids)
    run.costs["token discovery (inverse over 256 id sentences)"] = time.perf_counter() - t0
    ids = [d.token_id for d in found if d.discovered]
    print(bench.setting, run.seed, "discovered", tok.convert_ids_to_tokens(ids), flush=True)
    pad = tok.pad_token_id

    def cut(m: torch.nn.Module) -> Any:
        return mask_input_tokens(m, ids, pad, mode="delete")

    run.cont(INVERSE.format(what="alone"), cut)
    run.cont(INVERSE.format(what="+ head refit"), lambda m: (cut(m), refit(m, bench)))
    run.cont(INVERSE.format(what="+ 1 epoch CE"), lambda m: (cut(m), train(m, bench.train, 1, args.lr)))
    return [{"token": tok.convert_ids_to_tokens(d.token_id), "edited": d.edited, "present": d.present,
             "total": d.total, "discovered": d.discovered} for d in found[:20]]  # fmt: skip


def jtt_loss(erm: torch.nn.Module) -> Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor]:
    """JTT: ERM's training errors weigh 20x (one epoch)."""

    def loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            wrong = (erm.eval()(**inputs_of(batch)).logits.argmax(-1) != batch["labels"]).float()
        logits = model(**inputs_of(batch)).logits
        w = 1.0 + 19.0 * wrong
        return (F.cross_entropy(logits, batch["labels"], reduction="none") * w).sum() / w.sum()

    return loss


# ------------------------------------------------------------------------------------------------------
# One setting, one seed


class Runner:
    """Runs methods on copies of the ERM model and records metrics and seconds."""

    def __init__(self, bench: Bench, seed: int, erm: torch.nn.Module) -> None:
        self.bench, self.seed, self.erm = bench, seed, erm
        self.results: dict[str, dict[str, float]] = {}
        self.costs: dict[str, float] = {}

    def record(self, name: str, model: torch.nn.Module, seconds: float) -> None:
        self.results[name] = evaluate(model, self.bench, self.seed)
        self.costs[name] = seconds
        print(
            self.bench.setting, self.seed, name, _brief(self.results[name]), f"({seconds:.0f}s)", flush=True
        )

    def cont(self, name: str, fn: Callable[[torch.nn.Module], Any]) -> torch.nn.Module:
        t0 = time.perf_counter()
        model = copy.deepcopy(self.erm)
        fn(model)
        self.record(name, model, time.perf_counter() - t0)
        return model


def run_seed(setting: str, seed: int, args: argparse.Namespace, only: str | None = None) -> dict[str, Any]:
    """Every method of ``setting`` on one seed; ``only="inverse"``: ERM (retrained: it is deterministic, and the
    report checks it against the main part's) and the inverse methods, for parts that predate them."""
    import lightning.pytorch as pl

    pl.seed_everything(seed, verbose=False)
    bench = BENCHES[setting](args, seed)
    k = args.prune_k
    erm = load_model()
    t_erm = train(erm, bench.train, args.erm_epochs, args.lr)
    run = Runner(bench, seed, erm)
    run.record("ERM", erm, t_erm)
    if only == "inverse":
        _, scores, t_attr = icp_scores(erm, bench)
        run.costs["attribution (72 heads, gradient, id + heldout)"] = t_attr
        found = inverse_methods(run, bench, scores, args)
        return {"results": run.results, "costs": run.costs, "discovered": found}
    if bench.oracle_train is not None:
        pl.seed_everything(seed, verbose=False)
        oracle = load_model()
        run.record("oracle (no token / names in training)",
                   oracle, train(oracle, bench.oracle_train, args.erm_epochs + 1, args.lr))  # fmt: skip
    run.cont("ERM + 1 epoch CE (control)", lambda m: train(m, bench.train, 1, args.lr))
    if bench.told:
        run.cont("counterfactual KL + augmentation, told the token (reference)",
                 lambda m: train(m, bench.train, 1, args.lr, told_loss))  # fmt: skip
    run.cont("DFR (head refit on held-out)", lambda m: refit(m, bench))
    run.cont("JTT (x20 errors, 1 epoch)", lambda m: train(m, bench.train, 1, args.lr, jtt_loss(erm)))

    sites, scores, t_attr = icp_scores(erm, bench)
    run.costs["attribution (72 heads, gradient, id + heldout)"] = t_attr
    n_heads = sites.total_features
    rand = random_scores(sites, seed)
    run.cont(f"random prune {k} heads + head refit", lambda m: refit((prune(m, sites, rand, k), m)[1], bench))
    run.cont(f"magnitude prune {k}/{n_heads} of attention columns (ModelPruning) + head refit",
             lambda m: refit(magnitude_prune(m, k, n_heads), bench))  # fmt: skip
    run.cont(f"ICP prune top {k} heads", lambda m: prune(m, sites, scores, k))
    run.cont(ICP_MAIN.format(k=k), lambda m: refit((prune(m, sites, scores, k), m)[1], bench))

    def multi_round(m: torch.nn.Module, rounds: int = 3) -> None:
        """Rounds of attribute -> prune k / rounds -> a third of an epoch of CE, then the head refit."""
        for r in range(rounds):
            r_sites, r_scores, _ = icp_scores(m, bench)
            prune(m, r_sites, r_scores, k // rounds)
            if r < rounds - 1:
                train(m, bench.train, 1.0 / (rounds - 1), args.lr)
        refit(m, bench)

    run.cont(f"multi-round ICP (3 x {k // 3} heads, CE between rounds) + head refit", multi_round)
    if setting != "B":  # no token to find in a domain shift

        def token_edit(m: torch.nn.Module) -> None:
            prune(m, sites, scores, k)
            token_edit_epoch(m, bench, scores, args)
            refit(m, bench)

        run.cont(f"ICP prune {k} + token-edit counterfactual KL epoch + head refit", token_edit)
    found = inverse_methods(run, bench, scores, args) if setting != "B" else []
    return {"results": run.results, "costs": run.costs, "discovered": found}


def run_ablations(args: argparse.Namespace, seed: int = 0) -> dict[str, Any]:
    """Setting A, one seed: scores (interventions, reduction), prune vs soft, k (tau) sweep, sites, contrastive
    fine-tuning without pruning and tau_c, and where the pruned features sit (layer-wise counts)."""
    import resource

    import lightning.pytorch as pl

    memory: dict[str, float] = {}

    def peak(stage: str) -> None:
        """The process's peak resident memory so far (MB; Linux reports KB): it only grows, so a stage that
        raises it set a new peak."""
        memory[stage] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    pl.seed_everything(seed, verbose=False)
    bench = bench_a(args, seed)
    k = args.prune_k
    erm = load_model()
    peak("data and model loaded")
    t_erm = train(erm, bench.train, args.erm_epochs, args.lr)
    peak("after ERM training (batch 32)")
    run = Runner(bench, seed, erm)
    run.record("ERM", erm, t_erm)
    sites, grad_scores, t = icp_scores(erm, bench)
    peak("after gradient attribution (72 heads)")
    run.costs["attribution gradient mask"] = t
    tau: dict[str, float] = {}
    from icp_lightning import causal_effects, spuriousness

    all_scores = {"gradient mask (default)": grad_scores}
    exact: dict[tuple[str, str, str], Any] = {}
    for iv in ("mask", "scale", "swap"):  # exact effects once per intervention; combinations reuse them
        t0 = time.perf_counter()
        for name, loader in bench.attribution.items():
            exact[(iv, "label_logprob", name)] = causal_effects(erm, loader, sites, iv, method="exact",
                                                                progress=False, partner="permutation")  # fmt: skip
        run.costs[f"attribution exact {iv}"] = time.perf_counter() - t0
        peak(f"after exact {iv} attribution")
    contrast = {"id": 1.0, "heldout": -1.0}
    for ivs in (("mask",), ("scale",), ("swap",), ("mask", "scale", "swap")):
        chosen = {key: eff for key, eff in exact.items() if key[0] in ivs}
        all_scores["exact " + " + ".join(ivs)] = spuriousness(chosen, dataset_weights=contrast)
    _, s_abs, t = icp_scores(erm, bench, reduction="abs")
    run.costs["attribution gradient mask, literal |CE| average"] = t
    all_scores["gradient mask, literal |CE| average"] = s_abs
    for name, s in all_scores.items():
        run.cont(
            f"scores: {name} -> prune {k} heads + refit",
            lambda m, _s=s: refit((prune(m, sites, _s, k), m)[1], bench),
        )
    run.cont(f"soft reweighting of top {k} heads + refit",
             lambda m: refit((prune(m, sites, grad_scores, k, "soft"), m)[1], bench))  # fmt: skip
    for kk in args.k_sweep:
        run.cont(f"k sweep: prune {kk} heads + refit",
                 lambda m, _k=kk: tau.__setitem__(str(_k), prune(m, sites, grad_scores, _k)) or refit(m, bench))  # fmt: skip
        run.cont(f"k sweep: prune {kk} heads", lambda m, _k=kk: prune(m, sites, grad_scores, _k))
    ffn_sub, ffn_scores, t = icp_scores(erm, bench, "neuron", target_modules=r".*layer\.\d+\.output\.dense")
    run.costs["attribution 9,216 FFN neurons (gradient)"] = t
    peak("after gradient attribution (9,216 FFN neurons)")
    n_ffn = args.ffn_k
    run.cont(f"sites: FFN neurons, prune top {n_ffn} + refit",
             lambda m: refit((prune(m, ffn_sub, ffn_scores, n_ffn), m)[1], bench))  # fmt: skip
    run.cont(f"sites: heads {k} + FFN neurons {n_ffn} + refit",
             lambda m: refit((prune(m, sites, grad_scores, k), prune(m, ffn_sub, ffn_scores, n_ffn), m)[2], bench))  # fmt: skip
    run.cont("contrastive (token-edit KL) without pruning + refit",
             lambda m: (token_edit_epoch(m, bench, grad_scores, args), refit(m, bench)))  # fmt: skip
    run.cont(f"prune {k} + token-edit KL with tau_c = top 24 features + refit",
             lambda m: (prune(m, sites, grad_scores, k), token_edit_epoch(m, bench, grad_scores, args, top_k=24),
                        refit(m, bench)))  # fmt: skip
    # Diagnosis (told): is the token's own input the carrier? Read it as [MASK] and refit the head.
    from icp_lightning import mask_input_tokens

    told_id = bench.tokenizer.convert_tokens_to_ids(TOKEN)
    run.cont(f"diagnosis, told: `{TOKEN}` masked at the input + head refit",
             lambda m: (mask_input_tokens(m, [told_id], bench.tokenizer.mask_token_id), refit(m, bench)))  # fmt: skip
    peak("after the token-edit epochs and the rest")
    layers = {"heads": _per_layer(sites, grad_scores, k), "ffn": _per_layer(ffn_sub, ffn_scores, n_ffn)}
    return {"results": run.results, "costs": run.costs, "tau": tau, "layers": layers, "peak_rss_mb": memory}


def _per_layer(sites: Any, scores: Any, k: int) -> dict[str, int]:
    """How many of the top-``k`` features sit in each layer (``layer.<i>`` of the site name)."""
    import re

    flat = [(n, float(v)) for n in sites for v in scores[n].reshape(-1).tolist()]
    top = sorted(range(len(flat)), key=lambda i: -flat[i][1])[:k]
    counts: dict[str, int] = {}
    for n in sites:
        counts[re.search(r"layer\.(\d+)", n).group(1)] = 0  # type: ignore[union-attr]
    for i in top:
        counts[re.search(r"layer\.(\d+)", flat[i][0]).group(1)] += 1  # type: ignore[union-attr]
    return counts


def _brief(r: dict[str, float]) -> str:
    return " ".join(f"{k.split('/')[0]} {100 * r[k]:.1f}" for k in r if k.endswith("/acc"))


# ------------------------------------------------------------------------------------------------------
# Report


def summarise(per_seed: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, list[float]]]:
    """method -> metric -> [mean, std over seeds, n]; methods missing from a seed are averaged over the rest."""
    out: dict[str, dict[str, list[float]]] = {}
    for m in dict.fromkeys(m for s in per_seed for m in s):
        runs = [s[m] for s in per_seed if m in s]
        out[m] = {}
        for key in runs[0]:
            vals = [r[key] for r in runs]
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            out[m][key] = [statistics.mean(vals), sd, float(len(vals))]
    return out


COLUMNS = {
    "A": [("ID acc", "id/acc", True), ("OOD acc", "ood/acc", True), ("clean acc", "clean/acc", True),
          ("OOD worst-group", "ood/worst_group_acc", True), ("OOD ECE", "ood/ece", False),
          ("OOD NLL", "ood/nll", False)],
    "B": [("movie acc (ID)", "id/acc", True), ("Amazon acc (OOD)", "ood/acc", True),
          ("shift AUC", "shift_auc", True), ("Amazon worst-group", "ood/worst_group_acc", True),
          ("Amazon ECE", "ood/ece", False), ("Amazon NLL", "ood/nll", False)],
    "C": [("balanced acc", "balanced/acc", True), ("DP diff", "balanced/dp_diff", False),
          ("EO diff", "balanced/eo_diff", False), ("flip rate", "balanced/flip_rate", False),
          ("worst-group", "balanced/worst_group_acc", True), ("ECE", "balanced/ece", False),
          ("ID acc (correlated)", "id/acc", True)],
}  # fmt: skip
TITLES = {
    "A": "A: planted shortcut (MiniLM-L6, Rotten Tomatoes, token `zeppelin` on 95% / 5%)",
    "B": "B: domain shift (MiniLM-L6, VADER movie snippets -> Amazon product snippets)",
    "C": "C: fairness (MiniLM-L6, Rotten Tomatoes, gendered names on 90% / 10%)",
}


def _cell(summary: dict[str, dict[str, list[float]]], m: str, key: str, pct: bool) -> str:
    if key not in summary[m]:
        return "-"
    mean, std, _ = summary[m][key]
    return f"{100 * mean:.1f} ± {100 * std:.1f}" if pct else f"{mean:.3f} ± {std:.3f}"


def _mean(summary: dict[str, dict[str, list[float]]], m: str, key: str) -> float:
    return summary[m][key][0]


def targets(setting: str, s: dict[str, dict[str, list[float]]], icp: str) -> list[str]:
    """The issue's targets for ``setting``, checked on the means, for the ICP configuration ``icp``."""
    if "ERM" not in s or icp not in s:
        return []
    erm = s["ERM"]

    def line(ok: bool, text: str) -> str:
        return f"- {'met' if ok else '**missed**'}: {text}"

    def get(m: str, key: str) -> float:
        return s[m][key][0] if m in s and key in s[m] else float("nan")

    out = []
    if setting == "A":
        oracle = "oracle (no token / names in training)"
        out.append(
            line(
                get(icp, "ood/acc") >= get("ERM", "ood/acc") + 0.30,
                f"OOD {100 * get(icp, 'ood/acc'):.1f} >= ERM {100 * get('ERM', 'ood/acc'):.1f} + 30",
            )
        )
        out.append(
            line(
                get(icp, "clean/acc") >= get(oracle, "clean/acc") - 0.05,
                f"clean {100 * get(icp, 'clean/acc'):.1f} within 5 of the oracle's "
                f"{100 * get(oracle, 'clean/acc'):.1f}",
            )
        )
        for m in s:
            if m.startswith(("random", "magnitude", "DFR", "JTT", "counterfactual KL")):
                out.append(
                    line(
                        get(icp, "ood/acc") >= get(m, "ood/acc"),
                        f"OOD {100 * get(icp, 'ood/acc'):.1f} >= {m} {100 * get(m, 'ood/acc'):.1f}",
                    )
                )
        out.append(
            line(
                get(icp, "ood/ece") <= get("ERM", "ood/ece") / 2,
                f"OOD ECE {get(icp, 'ood/ece'):.3f} <= half of ERM's {get('ERM', 'ood/ece'):.3f}",
            )
        )
    elif setting == "B":
        out.append(
            line(
                get(icp, "ood/acc") >= get("ERM", "ood/acc") + 0.03,
                f"Amazon acc {100 * get(icp, 'ood/acc'):.1f} >= ERM {100 * get('ERM', 'ood/acc'):.1f} + 3",
            )
        )
        out.append(
            line(
                get(icp, "ood/ece") <= get("ERM", "ood/ece") / 2,
                f"Amazon ECE {get(icp, 'ood/ece'):.3f} <= half of ERM's {get('ERM', 'ood/ece'):.3f}",
            )
        )
    elif setting == "C":
        for key, name in (("balanced/dp_diff", "DP"), ("balanced/eo_diff", "EO")):
            out.append(
                line(
                    get(icp, key) <= get("ERM", key) / 2,
                    f"{name} diff {get(icp, key):.3f} <= half of ERM's {get('ERM', key):.3f}",
                )
            )
        out.append(
            line(
                get(icp, "balanced/acc") >= get("ERM", "balanced/acc") - 0.02,
                f"accuracy {100 * get(icp, 'balanced/acc'):.1f} no more than 2 below ERM's "
                f"{100 * get('ERM', 'balanced/acc'):.1f}",
            )
        )
        out.append(
            line(
                get(icp, "balanced/ece") <= get("ERM", "balanced/ece") / 2,
                f"ECE {get(icp, 'balanced/ece'):.3f} <= half of ERM's {get('ERM', 'balanced/ece'):.3f}",
            )
        )
    del erm
    return out


#: The metric the paired comparisons use, per setting, and whether higher is better.
PAIRED = {"A": ("ood/acc", True), "B": ("ood/acc", True), "C": ("balanced/dp_diff", False)}


def paired(setting: str, per_seed: list[dict[str, Any]], icp: str) -> list[str]:
    """Per-seed differences ``icp - baseline`` on the setting's key metric (the seeds share data and ERM, so the
    paired difference is less noisy than comparing means): mean ± std and how many seeds favour ICP."""
    key, higher = PAIRED[setting]
    out = []
    for base in dict.fromkeys(m for r in per_seed for m in r["results"]):
        if not base.startswith(("DFR", "JTT", "random", "magnitude", "counterfactual KL")):
            continue
        diffs = [r["results"][icp][key] - r["results"][base][key] for r in per_seed
                 if icp in r["results"] and base in r["results"]]  # fmt: skip
        if not diffs:
            continue
        wins = sum((d > 0) if higher else (d < 0) for d in diffs)
        sd = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
        pct = key.endswith("acc")
        mean, spread = (100 * statistics.mean(diffs), 100 * sd) if pct else (statistics.mean(diffs), sd)
        text = f"{mean:+.1f} ± {spread:.1f} points" if pct else f"{mean:+.3f} ± {spread:.3f}"
        out.append(f"- vs {base}: {text}, better on {wins} of {len(diffs)} seeds")
    return out


def _table(
    setting: str, summary: dict[str, dict[str, list[float]]], costs: dict[str, list[float]]
) -> list[str]:
    cols = COLUMNS[setting]
    lines = ["| method | " + " | ".join(c[0] for c in cols) + " | seconds | seeds |",
             "|---" * (len(cols) + 3) + "|"]  # fmt: skip
    for m in summary:
        any_key = next(iter(summary[m]))
        secs = statistics.mean(costs.get(m, [float("nan")]))
        lines.append(f"| {m} | " + " | ".join(_cell(summary, m, key, pct) for _, key, pct in cols)
                     + f" | {secs:.0f} | {int(summary[m][any_key][2])} |")  # fmt: skip
    return lines


def _plots(out: Path, report: dict[str, Any]) -> list[str]:
    """PNG plots: each setting's headline metric per method (mean ± std), the layer-wise distribution of pruned
    features and the k sweep."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    head = {
        "A": ("ood/acc", "OOD accuracy"),
        "B": ("ood/acc", "Amazon accuracy"),
        "C": ("balanced/dp_diff", "DP diff"),
    }
    for setting, (key, label) in head.items():
        if setting not in report["settings"]:
            continue
        s = report["settings"][setting]["summary"]
        names = [m for m in s if key in s[m]]
        fig, ax = plt.subplots(figsize=(10, 0.35 * len(names) + 1.4))
        colors = ["C3" if "ICP" in m else "C7" if m.startswith(("ERM", "oracle")) else "C0" for m in names]
        ax.barh(
            range(len(names)), [s[m][key][0] for m in names], xerr=[s[m][key][1] for m in names], color=colors
        )
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel(f"{label} (mean ± std over seeds)")
        ax.set_title(TITLES[setting] + "\nred: ICP; grey: ERM and oracle; blue: baselines", fontsize=8)
        fig.tight_layout()
        fig.savefig(out / f"reliability_{setting}.png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        made.append(f"reliability_{setting}.png")
    abl = report.get("ablations")
    if abl:
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
        for ax, (kind, counts) in zip(axes, abl["layers"].items()):
            ax.bar(list(counts), list(counts.values()), color="C1")
            ax.set_xlabel("layer")
            ax.set_ylabel("top-scored features")
            ax.set_title(f"A: where the top {sum(counts.values())} {kind} sit", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / "layers_A.png", dpi=110)
        plt.close(fig)
        r = abl["results"]
        ks = sorted(int(m.split()[3]) for m in r if m.startswith("k sweep") and m.endswith("+ refit"))
        fig, ax = plt.subplots(figsize=(5, 3.2))
        for suffix, name in ((" heads + refit", "prune + head refit"), (" heads", "prune only")):
            ax.plot(ks, [100 * r[f"k sweep: prune {k}{suffix}"]["ood/acc"] for k in ks], "o-", label=name)
        ax.axhline(100 * r["ERM"]["ood/acc"], color="gray", ls="--", label="ERM")
        ax.set_xlabel("heads pruned (k; tau = k-th score)")
        ax.set_ylabel("OOD accuracy, seed 0")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "k_sweep_A.png", dpi=110)
        plt.close(fig)
        made += ["layers_A.png", "k_sweep_A.png"]
    return made


def _write_part(path: Path, payload: dict[str, Any]) -> None:
    """Write atomically (another process may be combining the parts at the same moment)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(path)


def combine(out: Path, args: argparse.Namespace) -> dict[str, Any]:
    parts = out / "parts"
    report: dict[str, Any] = {"settings": {}, "machine": f"{platform.machine()}, {os.cpu_count()} cores, CPU",
                              "torch": torch.__version__}  # fmt: skip
    for setting in "ABC":
        files = sorted(f for f in parts.glob(f"{setting}_seed*.json") if not f.stem.endswith("_inverse"))
        if not files:
            continue
        runs = [json.loads(f.read_text()) for f in files]
        erm_check = []
        for (
            r
        ) in runs:  # merge the inverse-only parts: their ERM must be the main part's (deterministic training)
            extra = parts / f"{setting}_seed{r['seed']}_inverse.json"
            if extra.exists():
                e = json.loads(extra.read_text())
                erm_check.append(
                    max(abs(e["results"]["ERM"][k] - r["results"]["ERM"][k]) for k in r["results"]["ERM"])
                )
                r["results"].update({m: v for m, v in e["results"].items() if m != "ERM"})
                r["costs"].update({m: v for m, v in e["costs"].items() if m not in r["costs"]})
                r["discovered"] = e.get("discovered", [])
        seeds = [r["seed"] for r in runs]
        summary = summarise([r["results"] for r in runs])
        costs: dict[str, list[float]] = {}
        for r in runs:
            for name, sec in r["costs"].items():
                costs.setdefault(name, []).append(sec)
        report["settings"][setting] = {"seeds": seeds, "summary": summary, "costs": costs, "per_seed": runs,
                                       "args": runs[0]["args"], "erm_rerun_max_diff": erm_check}  # fmt: skip
    abl = parts / "A_ablations_seed0.json"
    if abl.exists():
        report["ablations"] = json.loads(abl.read_text())
    d_file = out / "reliability_d.json"
    if d_file.exists():
        report["settings"]["D"] = json.loads(d_file.read_text())
    (out / "reliability.json").write_text(json.dumps(report, indent=1))
    plots = _plots(out, report)
    lines = ["# Reliability benchmark", "",
             "Every number below comes from `python -m benchmarks.reliability` (the parts listed per setting; "
             "`--combine` rebuilds this file from `benchmarks/results/parts/`). Mean ± std over the seeds shown; "
             f"machine: {report['machine']}, torch {report['torch']}. "
             f"The targets are checked for `{ICP_MAIN.format(k=args.prune_k)}` (fixed before any run) and for the "
             "input-level `ICP inverse` variants (added after the first seed of A showed head pruning leaves the "
             "shortcut in place). ICP is told nothing about the token or the names and uses only the held-out "
             "split DFR uses.", ""]  # fmt: skip
    for setting in "ABC":
        if setting not in report["settings"]:
            continue
        rep = report["settings"][setting]
        a = rep["args"]
        lines += [f"## {TITLES[setting]}", "",
                  f"Seeds {rep['seeds']}; {a['train']} training sentences, {a['eval']} per evaluation set, "
                  f"{a['erm_epochs']} ERM epochs, held-out split {HELDOUT}.", ""]  # fmt: skip
        lines += _table(setting, rep["summary"], rep["costs"])
        lines.append("")
        for name in [ICP_MAIN.format(k=a["prune_k"])] + [
            m for m in rep["summary"] if m.startswith("ICP inverse") and "deleted" in m
        ]:
            checks = targets(setting, rep["summary"], name)
            if checks:
                lines += [f"Targets for `{name}` (on the means):", *checks, ""]
            pairs = paired(setting, rep["per_seed"], name) if name.endswith("head refit") else []
            if pairs:
                key = PAIRED[setting][0]
                lines += [f"Paired per-seed differences of `{name}` on `{key}`:", *pairs, ""]
        found = [
            (r["seed"], [d["token"] for d in r.get("discovered", []) if d["discovered"]])
            for r in rep["per_seed"]
        ]
        if any(toks for _, toks in found):
            lines += ["Tokens the inverse discovered (told nothing), per seed: "
                      + "; ".join(f"seed {sd}: {', '.join(f'`{t}`' for t in toks) or 'none'}" for sd, toks in found),
                      ""]  # fmt: skip
        if rep["erm_rerun_max_diff"]:
            lines += [f"The inverse methods of {len(rep['erm_rerun_max_diff'])} seed(s) ran in a second process that "
                      "retrained ERM; its metrics differ from the first ERM's by at most "
                      f"{max(rep['erm_rerun_max_diff']):.2g}.", ""]  # fmt: skip
        attr = [v for n, v in rep["costs"].items() if n.startswith("attribution")]
        if attr:
            lines += [f"Attribution time per round: {statistics.mean(attr[0]):.1f} s (72 heads, gradient, "
                      "256 `id` + 256 `heldout` sentences).", ""]  # fmt: skip
        if f"reliability_{setting}.png" in plots:
            lines += [f"![{setting}](reliability_{setting}.png)", ""]
    if "D" in report["settings"]:
        lines += [
            "## D: causal-LM bias (SmolLM2-135M)",
            "",
            "See `reliability_d.md` (`python -m benchmarks.setting_d`).",
            "",
        ]
    if "ablations" in report:
        abl_r = report["ablations"]
        lines += ["## Ablations (setting A, seed 0)", ""]
        lines += _table("A", summarise([abl_r["results"]]), {k: [v] for k, v in abl_r["costs"].items()})
        lines += ["", "Thresholds tau (the k-th signed score) of the k sweep: "
                  + ", ".join(f"k={k}: {v:.4f}" for k, v in abl_r["tau"].items()),
                  "", "Attribution seconds: " + ", ".join(f"{k[12:]} {v:.1f}" for k, v in abl_r["costs"].items()
                                                        if k.startswith("attribution")),
                  "", "Layer-wise distribution of the top-scored features: "
                  + "; ".join(f"{kind}: " + ", ".join(f"L{layer} {c}" for layer, c in counts.items())
                              for kind, counts in abl_r["layers"].items()),
                  "", "![layers](layers_A.png) ![k sweep](k_sweep_A.png)", ""]  # fmt: skip
        if abl_r.get("peak_rss_mb"):
            lines += ["Peak resident memory of the process (MB, monotonic: a stage that raises it set a new peak): "
                      + ", ".join(f"{k} {v:.0f}" for k, v in abl_r["peak_rss_mb"].items()), ""]  # fmt: skip
    (out / "reliability.md").write_text("\n".join(lines) + "\n")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one seed of setting A, no ablations")
    parser.add_argument("--settings", nargs="+", default=["A", "C", "B"], choices=["A", "B", "C"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--ablations", choices=["auto", "yes", "no", "only"], default="auto",
                        help="auto: with setting A when not --quick")  # fmt: skip
    parser.add_argument("--train", type=int, default=1200)
    parser.add_argument("--eval", type=int, default=400)
    parser.add_argument("--erm-epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--prune-k", type=int, default=24, help="heads ICP and the baselines prune")
    parser.add_argument("--k-sweep", type=int, nargs="+", default=[8, 16, 24, 36, 48])
    parser.add_argument("--ffn-k", type=int, default=1024, help="FFN neurons pruned in the sites ablation")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--force", action="store_true", help="rerun parts that exist")
    parser.add_argument("--only", choices=["inverse"], default=None,
                        help="ERM and the inverse methods only, into <setting>_seed<n>_inverse.json (for main parts "
                        "that predate them; --combine merges them)")  # fmt: skip
    parser.add_argument("--combine", action="store_true", help="only rebuild the report from the parts")
    args = parse_args(parser)
    if args.quick:
        args.settings, args.seeds = ["A"], [0]
        if args.out == "benchmarks/results":  # its own folder: a rerun, never the committed full results
            args.out = "benchmarks/results/quick"
    out = Path(args.out)
    (out / "parts").mkdir(parents=True, exist_ok=True)
    saved = {k: v for k, v in vars(args).items() if k not in ("force", "combine", "out", "only")}
    if not args.combine:
        jobs: list[tuple[str, int]] = (
            [] if args.ablations == "only" else [(s, i) for s in args.settings for i in args.seeds]
        )
        for setting, seed in jobs:
            part = (
                out / "parts" / (f"{setting}_seed{seed}" + (f"_{args.only}" if args.only else "") + ".json")
            )
            if part.exists() and not args.force:
                print(f"{part} exists; skipping (--force reruns it)")
                continue
            t0 = time.perf_counter()
            res = run_seed(setting, seed, args, args.only)
            _write_part(part, {"setting": setting, "seed": seed, "args": saved,
                               "seconds": time.perf_counter() - t0, **res})  # fmt: skip
        want_abl = args.ablations in ("yes", "only") or (
            args.ablations == "auto" and not args.quick and "A" in args.settings
        )
        part = out / "parts" / "A_ablations_seed0.json"
        if want_abl and (args.force or not part.exists()):
            t0 = time.perf_counter()
            res = run_ablations(args)
            _write_part(part, {"args": saved, "seconds": time.perf_counter() - t0, **res})
    combine(out, args)
    print((out / "reliability.md").read_text())


if __name__ == "__main__":
    main()
