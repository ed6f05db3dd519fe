"""Reliability benchmark, setting A (planted shortcut): ICP vs ERM, an oracle, pruning baselines, DFR, JTT.

MiniLM-L6 (real weights) on Rotten Tomatoes sentences; the token ``zeppelin`` is planted on 95% of positive and
5% of negative training sentences. Evaluation: ``id`` (same correlation), ``ood`` (reversed), ``clean`` (no
token); a 256-example group-balanced held-out split (``heldout``) is the only extra data any method may use
(DFR trains its last layer on it; ICP contrasts it with ``id`` to score features; nobody is told the token,
except the ``paired KL (told the token)`` reference).

Every method continues from the same ERM model (``--erm-epochs`` epochs) for one more epoch (same budget), except
the oracle (trained from scratch on token-free data) and the training-free ones.

Run: ``python -m benchmarks.reliability --quick`` (one seed) or without ``--quick`` (``--seeds 0 1 2 3 4``).
Writes ``benchmarks/results/reliability.json`` and ``reliability.md``.

Settings B (domain shift), C (fairness) and D (causal-LM bias) of the benchmark issue are not implemented yet.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TOKEN = "zeppelin"


def build_data(args: argparse.Namespace, seed: int):  # noqa: ANN201
    from icp_lightning import ICPDataModule

    data = ICPDataModule(
        tokenizer="minilm", recipe="rotten_tomatoes", num_labels=2, shortcut_token=TOKEN, shortcut_rate=0.95,
        heldout_size=256, max_train_examples=args.train, max_eval_examples=args.eval, max_length=48,
        batch_size=32, eval_batch_size=128, attribution_size=256, seed=seed,
    )  # fmt: skip
    data.setup("fit")
    return data


def evaluate(model: torch.nn.Module, data: Any) -> dict[str, float]:
    """Accuracy, ECE, NLL and worst-group accuracy per evaluation set (torchmetrics-based package metrics)."""
    from icp_lightning.metrics import ReliabilityMetrics

    model.eval()
    out: dict[str, float] = {}
    loaders = data.eval_dataloaders()
    with torch.no_grad():
        for name, loader in loaders.items():
            if name == "heldout":
                continue
            metrics = ReliabilityMetrics(num_classes=2, num_groups=4)
            for batch in loader:
                inputs = {
                    k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")
                }
                metrics.update(model(**inputs).logits, batch["labels"], groups=batch["group"])
            res = metrics.compute()
            for key in ("acc", "ece", "nll", "worst_group_acc"):
                out[f"{name}/{key}"] = float(res[key])
    return out


def inputs_of(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


def train(
    model: torch.nn.Module,
    loader: Any,
    epochs: int,
    lr: float,
    loss_fn: Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor] | None = None,
    weights: torch.Tensor | None = None,
) -> float:
    """Plain AdamW fine-tuning; ``loss_fn`` replaces cross-entropy; returns seconds."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    t0 = time.perf_counter()
    for _ in range(epochs):
        model.train()
        for batch in loader:
            if loss_fn is not None:
                loss = loss_fn(model, batch)
            else:
                logits = model(**inputs_of(batch)).logits
                loss = F.cross_entropy(logits, batch["labels"], reduction="none")
                if weights is not None:
                    loss = loss * weights[batch["row"]] if "row" in batch else loss
                loss = loss.mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    return time.perf_counter() - t0


def load_model():  # noqa: ANN201
    import transformers

    from icp_lightning.recipes import resolve_pretrained

    return transformers.AutoModelForSequenceClassification.from_pretrained(
        resolve_pretrained("minilm"), num_labels=2
    )


def icp_scores(model: torch.nn.Module, data: Any, granularity: str, method: str = "gradient"):  # noqa: ANN201
    from icp_lightning import causal_effects, find_sites, spuriousness

    sites = find_sites(model, granularity=granularity)
    loaders = data.attribution_dataloaders(["id", "heldout"])
    t0 = time.perf_counter()
    effects = {
        name: causal_effects(model, loader, sites, method=method, progress=False)
        for name, loader in loaders.items()
    }
    scores = spuriousness(effects, dataset_weights={"id": 1.0, "heldout": -1.0})
    return sites, scores, time.perf_counter() - t0


def prune_top(model: torch.nn.Module, sites: Any, ranking: list[tuple[str, int, float]], k: int) -> None:
    from icp_lightning import apply_masks, find_sites

    sites = find_sites(
        model, target_modules=list(sites), granularity=sites.granularity
    )  # this copy's modules
    values = {n: torch.ones(sites[n].n_features) for n in sites}
    for name, feat, _ in ranking[:k]:
        values[name][feat] = 0.0
    apply_masks(model, sites, values)


def dfr(model: torch.nn.Module, data: Any, seed: int) -> torch.nn.Module:
    """Deep feature reweighting: refit the head (L2 logistic regression, l2=1) on the held-out split's frozen
    features. The same estimator serves DFR (no pruning) and ICP + refit (after causal pruning)."""
    from icp_lightning import refit_head

    refit_head(model, data.heldout_dataloader(), l2=1.0)
    return model


def run_seed(seed: int, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    import lightning.pytorch as pl

    from icp_lightning import TokenEditCounterfactual, counterfactual_kl, find_sites
    from icp_lightning.core.interventions import counterfactual_batch

    pl.seed_everything(seed, verbose=False)
    data = build_data(args, seed)
    train_loader = data.train_dataloader()
    results: dict[str, dict[str, float]] = {}
    costs: dict[str, float] = {}

    erm = load_model()
    costs["erm_train_s"] = train(erm, train_loader, args.erm_epochs, args.lr)
    results["ERM"] = evaluate(erm, data)
    print(seed, "ERM", _brief(results["ERM"]), flush=True)

    def cont(name: str, fn: Callable[[torch.nn.Module], torch.nn.Module]) -> None:
        t0 = time.perf_counter()
        model = fn(copy.deepcopy(erm))
        costs[f"{name} s"] = time.perf_counter() - t0
        results[name] = evaluate(model, data)
        print(seed, name, _brief(results[name]), f"({costs[f'{name} s']:.0f}s)", flush=True)

    cont("ERM + 1 epoch CE (control)", lambda m: (train(m, train_loader, 1, args.lr), m)[1])

    def paired_kl(m: torch.nn.Module) -> torch.nn.Module:
        def loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
            logits = model(**inputs_of(batch)).logits
            cf = counterfactual_batch(batch)
            cf_logits = model(**inputs_of(cf)).logits
            return F.cross_entropy(logits, batch["labels"]) + counterfactual_kl(logits, cf_logits)

        train(m, train_loader, 1, args.lr, loss)
        return m

    cont("paired KL (told the token)", paired_kl)
    cont("DFR (head refit on held-out, no pruning)", lambda m: dfr(m, data, seed))

    def jtt(m: torch.nn.Module) -> torch.nn.Module:
        # upweight ERM's training errors x20 and fine-tune one epoch
        def loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
            with torch.no_grad():
                wrong = (erm.eval()(**inputs_of(batch)).logits.argmax(-1) != batch["labels"]).float()
            logits = model(**inputs_of(batch)).logits
            w = 1.0 + 19.0 * wrong
            return (F.cross_entropy(logits, batch["labels"], reduction="none") * w).sum() / w.sum()

        train(m, train_loader, 1, args.lr, loss)
        return m

    cont("JTT (x20 errors, 1 epoch)", jtt)

    # ICP: scores from the signed contrast id vs held-out, attention heads
    sites, scores, t_attr = icp_scores(erm, data, "head")
    costs["attribution s (72 heads, gradient)"] = t_attr
    ranking = scores.top_k(sites.total_features)
    for k in args.prune_k:
        cont(f"ICP prune top {k} heads", lambda m, _k=k: (prune_top(m, sites, ranking, _k), m)[1])
    g = torch.Generator().manual_seed(seed)
    flat = [(n, i, 0.0) for n in sites for i in range(sites[n].n_features)]
    random_rank = [flat[j] for j in torch.randperm(len(flat), generator=g).tolist()]
    k_main = args.prune_k[-1]
    cont(f"random prune {k_main} heads", lambda m: (prune_top(m, sites, random_rank, k_main), m)[1])
    for k in args.prune_k:
        cont(f"ICP prune top {k} heads + head refit",
             lambda m, _k=k: dfr((prune_top(m, sites, ranking, _k), m)[1], data, seed))  # fmt: skip
    cont(f"random prune {k_main} heads + head refit",
         lambda m: dfr((prune_top(m, sites, random_rank, k_main), m)[1], data, seed))  # fmt: skip

    def icp_token_edit(m: torch.nn.Module, refit: bool = False) -> torch.nn.Module:
        prune_top(m, sites, ranking, k_main)
        m_sites = find_sites(m, granularity="head")  # hooks must go on this copy's modules
        cf = TokenEditCounterfactual(max_edits=1, candidates=2, top_k=8, replace_id=data.tokenizer.mask_token_id,
                                     special_token_ids=data.tokenizer.all_special_ids)  # fmt: skip

        def loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
            model.eval()
            out = cf.build(model, inputs_of(batch) | {"labels": batch["labels"]}, scores, m_sites)
            model.train()
            logits = model(**inputs_of(batch)).logits
            cf_logits = model(**inputs_of(out.batch)).logits
            return (F.cross_entropy(logits, batch["labels"]) + F.cross_entropy(cf_logits, batch["labels"])
                    + counterfactual_kl(logits, cf_logits))  # fmt: skip

        train(m, train_loader, 1, args.lr, loss)
        return dfr(m, data, seed) if refit else m

    if not args.quick:
        cont(f"ICP prune {k_main} + token-edit KL epoch", icp_token_edit)
    cont(
        f"ICP prune {k_main} + token-edit KL epoch + head refit (quickstart recipe)",
        lambda m: icp_token_edit(m, True),
    )
    results["_costs"] = costs
    return results


def _brief(r: dict[str, float]) -> str:
    return " ".join(f"{k.split('/')[0]} {100 * r[k]:.1f}" for k in r if k.endswith("/acc"))


def summarise(per_seed: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, list[float]]]:
    methods = [m for m in per_seed[0] if not m.startswith("_")]
    out: dict[str, dict[str, list[float]]] = {}
    for m in methods:
        out[m] = {}
        for key in per_seed[0][m]:
            vals = [s[m][key] for s in per_seed]
            out[m][key] = [statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one seed of setting A")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--eval", type=int, default=1000)
    parser.add_argument("--erm-epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--prune-k", type=int, nargs="+", default=[8, 24])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    seeds = [0] if args.quick else args.seeds
    if args.quick:  # one seed of setting A in about 15 minutes on 2 cores
        args.train, args.eval, args.prune_k = min(args.train, 1600), min(args.eval, 500), [24]
    t0 = time.perf_counter()
    per_seed = [run_seed(s, args) for s in seeds]
    summary = summarise(per_seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python -m benchmarks.reliability" + (" --quick" if args.quick else "")
    payload = {"setting": "A (planted shortcut)", "command": command, "seeds": seeds, "args": vars(args),
               "summary": summary, "per_seed": per_seed, "seconds": time.perf_counter() - t0}  # fmt: skip
    (out / "reliability.json").write_text(json.dumps(payload, indent=2))
    lines = [
        "# Reliability benchmark, setting A: planted shortcut (MiniLM-L6, Rotten Tomatoes)",
        "",
        f"Command: `{command}`; seeds {seeds}; {args.train} training sentences, {args.eval} per evaluation set; "
        f"machine: {platform.machine()}, {os.cpu_count()} cores, CPU; total {payload['seconds'] / 60:.0f} min.",
        "",
        "| method | ID acc | OOD acc | clean acc | OOD worst-group | OOD ECE | OOD NLL |",
        "|---|---|---|---|---|---|---|",
    ]

    def cell(m: str, key: str, pct: bool) -> str:
        mean, std = summary[m][key]
        scale = 100 if pct else 1
        return f"{scale * mean:.1f} ± {scale * std:.1f}" if pct else f"{mean:.3f} ± {std:.3f}"

    for m in summary:
        lines.append(
            f"| {m} | {cell(m, 'id/acc', True)} | {cell(m, 'ood/acc', True)} | {cell(m, 'clean/acc', True)} | "
            f"{cell(m, 'ood/worst_group_acc', True)} | {cell(m, 'ood/ece', False)} | {cell(m, 'ood/nll', False)} |"
        )
    costs = per_seed[0]["_costs"]
    lines += ["", "Costs (seed 0): " + ", ".join(f"{k} {v:.0f}" for k, v in costs.items())]
    (out / "reliability.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
