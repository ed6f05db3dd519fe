"""Cost of the callbacks, and speed of a slimmed model, on real MiniLM-L6 weights.

1. Fine-tuning epochs of ICPContrastiveModule (kl_weight=0: plain fine-tuning) on Rotten Tomatoes sentences,
   without callbacks and with CausalAttributionCallback + CausalPruningCallback at their defaults (pruning:
   amount=0.05), in one process; prints the epoch-time ratio (goal: the callbacks add <= 10%).
2. ``slim`` at 30% FFN pruning: inference latency of the slimmed model vs the dense one on the same batch
   (goal: >= 1.3x faster), and the max abs difference between the slimmed and the masked model's logits.

Run: ``.venv/bin/python -m benchmarks.callback_overhead [--train 1024 --epochs 2]``; writes
``benchmarks/results/callback_overhead.md``.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import time
from pathlib import Path

import torch

from benchmarks.common import parse_args

os.environ.setdefault("HF_HUB_OFFLINE", "1")


class EpochTimer:
    """Wall time of each training epoch, callbacks included (measured from epoch start to the next start)."""

    def __init__(self) -> None:
        self.starts: list[float] = []

    def callback(self):  # noqa: ANN201
        import lightning.pytorch as pl

        timer = self

        class _Timer(pl.Callback):
            def on_train_epoch_start(self, trainer, pl_module):  # noqa: ANN001
                timer.starts.append(time.perf_counter())

            def on_train_end(self, trainer, pl_module):  # noqa: ANN001
                timer.starts.append(time.perf_counter())

        return _Timer()

    def epochs(self) -> list[float]:
        return [b - a for a, b in zip(self.starts, self.starts[1:])]


def fit_once(with_callbacks: bool, args: argparse.Namespace) -> tuple[list[float], int]:
    import lightning.pytorch as pl

    from icp_lightning import ICPContrastiveModule, ICPDataModule
    from icp_lightning.callbacks import CausalAttributionCallback, CausalPruningCallback

    pl.seed_everything(0, verbose=False)
    data = ICPDataModule(tokenizer="minilm", recipe="rotten_tomatoes", num_labels=2, max_length=48,
                         max_train_examples=args.train, max_eval_examples=256, batch_size=32)  # fmt: skip
    module = ICPContrastiveModule("minilm", kl_weight=0.0, lr=5e-5, eval_sets=data.eval_set_names)
    timer = EpochTimer()
    callbacks = [timer.callback()]
    if with_callbacks:
        callbacks += [
            CausalAttributionCallback(progress=False),
            CausalPruningCallback(amount=0.05, verbose=False),
        ]
    trainer = pl.Trainer(max_epochs=args.epochs, callbacks=callbacks, logger=False, enable_checkpointing=False,
                         default_root_dir="runs/callback_overhead",
                         enable_progress_bar=False, num_sanity_val_steps=0, accelerator="cpu",
                         enable_model_summary=False)  # fmt: skip
    trainer.fit(module, datamodule=data)
    pruned = 0
    if with_callbacks:
        pruned = sum(int((m == 0).sum()) for m in callbacks[2].masks.values())  # type: ignore[attr-defined]
    return timer.epochs(), pruned


def ffn_mac_bound(config: object, tokens: int, ffn_pruned: float, heads_pruned: float = 0.0) -> float:
    """Upper bound on the slim speed-up from multiply-accumulates alone (Amdahl): dense MACs / slimmed MACs per
    token for one BERT layer (Q, K, V, O projections, attention scores and mixing, FFN up and down), with
    ``ffn_pruned`` of the FFN neurons and ``heads_pruned`` of the heads removed. Embeddings, layer norms and
    activations are left out (they shrink too, a little)."""
    d = config.hidden_size  # type: ignore[attr-defined]
    f = config.intermediate_size  # type: ignore[attr-defined]

    def macs(ffn_keep: float, head_keep: float) -> float:
        qkv_o = 4 * d * d * head_keep  # Q, K, V read d and write d*keep; O reads d*keep
        scores = 2 * tokens * d * head_keep  # QK^T and attention x V per token
        return qkv_o + scores + 2 * d * f * ffn_keep

    return macs(1.0, 1.0) / macs(1.0 - ffn_pruned, 1.0 - heads_pruned)


def rank_agreement(args: argparse.Namespace) -> dict[str, float]:
    """How much the default ``max_batches`` (4) changes the ranking: Spearman and top-5% overlap of gradient
    scores from the default number of batches vs twice as many, on the pretrained MiniLM and the validation data
    of the fine-tuning runs."""
    import transformers

    from icp_lightning import ICPDataModule, causal_effects, find_sites, spuriousness
    from icp_lightning.callbacks import CausalAttributionCallback
    from icp_lightning.core.effects import spearman
    from icp_lightning.recipes import resolve_pretrained

    default = CausalAttributionCallback().max_batches
    assert default is not None
    data = ICPDataModule(tokenizer="minilm", recipe="rotten_tomatoes", num_labels=2, max_length=48,
                         max_train_examples=args.train, max_eval_examples=256, batch_size=32)  # fmt: skip
    data.setup("fit")
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        resolve_pretrained("minilm"), num_labels=2
    ).eval()
    sites = find_sites(model)
    out: dict[str, float] = {"default": float(default)}
    flat = {}
    for mb in (default, 2 * default):
        t0 = time.perf_counter()
        eff = {
            n: causal_effects(model, loader, sites, method="gradient", max_batches=mb, progress=False)
            for n, loader in zip(data.eval_set_names, data.val_dataloader())
        }
        out["seconds_default" if mb == default else "seconds_double"] = time.perf_counter() - t0
        scores = spuriousness(eff)
        flat[mb] = torch.cat([scores[n] for n in sites])
    a, b = flat[default], flat[2 * default]
    k = max(1, int(0.05 * a.numel()))
    out["spearman"] = spearman(a, b)
    out["top5_overlap"] = len(set(a.topk(k).indices.tolist()) & set(b.topk(k).indices.tolist())) / k
    out["sets"] = float(len(data.eval_set_names))
    return out


def slim_latency(args: argparse.Namespace, heads: float = 0.0) -> dict[str, float]:
    import transformers

    from icp_lightning import apply_masks, find_sites, slim
    from icp_lightning.recipes import resolve_pretrained

    path = resolve_pretrained("minilm")
    tok = transformers.AutoTokenizer.from_pretrained(path)
    dense = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    masked = copy.deepcopy(dense)
    sites = find_sites(masked, target_modules=r".*layer\.\d+\.output\.dense")  # the FFN down-projections
    g = torch.Generator().manual_seed(0)
    values = {}
    for name, site in sites.items():
        m = torch.ones(site.n_features)
        m[torch.randperm(site.n_features, generator=g)[: int(0.3 * site.n_features)]] = 0
        values[name] = m
    apply_masks(masked, sites, values)
    if heads:
        head_sites = find_sites(masked, granularity="head")  # the attention output projections, by head
        head_values = {}
        for name, site in head_sites.items():
            m = torch.ones(site.n_features)
            m[torch.randperm(site.n_features, generator=g)[: round(heads * site.n_features)]] = 0
            head_values[name] = m
        apply_masks(masked, head_sites, head_values)
    texts = ["a moving, beautifully acted film about loss and hope"] * args.latency_batch
    enc = tok(texts, padding="max_length", max_length=64, truncation=True, return_tensors="pt")
    with torch.no_grad():
        ref = masked(**enc).logits
        slimmed = slim(copy.deepcopy(masked)).eval()
        diff = float((slimmed(**enc).logits - ref).abs().max())

        def best(model: torch.nn.Module) -> float:
            times = []
            for _ in range(args.latency_repeats):
                t0 = time.perf_counter()
                model(**enc)
                times.append(time.perf_counter() - t0)
            return min(times)

        best(dense), best(slimmed)  # warm-up
        t_dense, t_masked, t_slim = best(dense), best(masked), best(slimmed)
    bound = ffn_mac_bound(dense.config, 64, 0.3, heads)
    return {"dense": t_dense, "masked": t_masked, "slim": t_slim, "diff": diff, "bound": bound}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train", type=int, default=1024)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="alternating fits of each kind")
    parser.add_argument("--latency-batch", type=int, default=32)
    parser.add_argument("--latency-repeats", type=int, default=20)
    parser.add_argument("--out", default="benchmarks/results/callback_overhead.md")
    args = parse_args(parser)

    lat = slim_latency(args)
    lat_h = slim_latency(args, heads=0.25)
    for name, r in (("30% FFN", lat), ("30% FFN + 3 of 12 heads", lat_h)):
        print(f"slim {name}: dense {r['dense'] * 1e3:.1f} ms, masked {r['masked'] * 1e3:.1f} ms, slim "
              f"{r['slim'] * 1e3:.1f} ms -> {r['dense'] / r['slim']:.2f}x faster (MAC bound {r['bound']:.2f}x); "
              f"max|diff| {r['diff']:.2e}")  # fmt: skip
    agree = rank_agreement(args)
    print("rank agreement", agree)
    # Alternate the two runs and compare the fastest epoch of each: on a shared machine, another process can
    # slow any single epoch by 20-40%, which swamps a 5-10% effect; the fastest epoch is the least disturbed.
    base: list[float] = []
    with_cb: list[float] = []
    pruned = 0
    for _ in range(args.repeats):
        base += fit_once(False, args)[0]
        epochs, pruned = fit_once(True, args)
        with_cb += epochs
    ratio = min(with_cb) / min(base)
    ratio_total = sum(with_cb) / sum(base)
    print(f"epochs without callbacks {[round(t, 1) for t in base]} s, with {[round(t, 1) for t in with_cb]} s: "
          f"fastest-epoch ratio {ratio:.3f}, total ratio {ratio_total:.3f} (goal <= 1.10); pruned {pruned}")  # fmt: skip
    mb = int(agree["default"])
    lines = [
        "# Callback overhead and slim latency (real MiniLM-L6)",
        "",
        f"Command: `.venv/bin/python -m benchmarks.callback_overhead --train {args.train} --epochs {args.epochs} "
        f"--repeats {args.repeats}" + (f" --threads {args.threads}`  " if args.threads else "`  "),
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, CPU.",
        "",
        "## Fine-tuning with the callbacks at their defaults",
        "",
        f"{args.train} Rotten Tomatoes sentences (max 48 tokens), batch 32, {args.epochs} epochs, validation on "
        "256 sentences each epoch; CausalAttributionCallback() (defaults: gradient effects, "
        f"max_batches={mb}) + CausalPruningCallback(amount=0.05).",
        "",
        f"{args.repeats} fits of each kind, alternating; every epoch of the runs with callbacks includes an "
        "attribution and a pruning round.",
        "",
        "| run | epoch seconds | fastest | total |",
        "|---|---|---|---|",
        f"| no callbacks | {', '.join(f'{t:.1f}' for t in base)} | {min(base):.1f} | {sum(base):.1f} |",
        f"| attribution + pruning | {', '.join(f'{t:.1f}' for t in with_cb)} | {min(with_cb):.1f} | "
        f"{sum(with_cb):.1f} |",
        "",
        f"- ratio with / without, fastest epochs: **{ratio:.3f}** (goal <= 1.10); all epochs: {ratio_total:.3f} "
        f"(more exposed to other load on the machine); {pruned} features pruned per fit",
        f"- the cost is fixed per round: gradient effects over {mb} batches of each of "
        f"{int(agree['sets'])} attribution set(s) took {agree['seconds_default']:.1f} s "
        f"({2 * mb} batches: {agree['seconds_double']:.1f} s), so "
        "the ratio falls as epochs grow",
        f"- what the default gives up: scores from {mb} batches vs "
        f"{2 * mb} rank the 11,520 FFN/attention features with Spearman "
        f"{agree['spearman']:.2f}, and share {100 * agree['top5_overlap']:.0f}% of their top 5% "
        "(pretrained model, `rank_agreement` in the script)",
        "",
        "## `slim` at 30% FFN pruning (random 30% of each layer's 1536 neurons)",
        "",
        f"Batch {args.latency_batch} x 64 tokens, best of {args.latency_repeats}. The MAC bound is the most any"
        " implementation can gain from the removed multiply-accumulates (`ffn_mac_bound`: FFN is about 65% of a"
        " MiniLM layer's MACs at 64 tokens, so removing 30% of it removes about 20%).",
        "",
        "| pruned | model | ms / batch | speed-up vs dense | MAC bound |",
        "|---|---|---|---|---|",
    ]
    for name, r in (("30% FFN", lat), ("30% FFN + 3 of 12 heads per layer", lat_h)):
        lines += [
            f"| {name} | dense | {r['dense'] * 1e3:.1f} | 1.00x | |",
            f"| {name} | masked (input-column masks) | {r['masked'] * 1e3:.1f} | {r['dense'] / r['masked']:.2f}x | |",
            f"| {name} | slimmed | {r['slim'] * 1e3:.1f} | **{r['dense'] / r['slim']:.2f}x** | {r['bound']:.2f}x |",
        ]
    lines += [
        "",
        f"- max abs difference slimmed vs masked logits: {lat['diff']:.2e} (FFN), {lat_h['diff']:.2e} (FFN + heads)",
        "- the issue's goal, >= 1.3x at 30% FFN pruning, is above the MAC bound for this model (about 1.24x): no"
        " implementation meets it by removing FFN neurons alone; removing 3 of 12 heads per layer as well raises"
        " the bound to about 1.39x",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
