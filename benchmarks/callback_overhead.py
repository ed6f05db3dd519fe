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


def slim_latency(args: argparse.Namespace) -> dict[str, float]:
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
    return {"dense": t_dense, "masked": t_masked, "slim": t_slim, "diff": diff}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train", type=int, default=1024)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--latency-batch", type=int, default=32)
    parser.add_argument("--latency-repeats", type=int, default=20)
    parser.add_argument("--out", default="benchmarks/results/callback_overhead.md")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()

    lat = slim_latency(args)
    print(f"slim 30% FFN: dense {lat['dense'] * 1e3:.1f} ms, masked {lat['masked'] * 1e3:.1f} ms, slim "
          f"{lat['slim'] * 1e3:.1f} ms -> {lat['dense'] / lat['slim']:.2f}x faster; max|diff| {lat['diff']:.2e}")  # fmt: skip
    base, _ = fit_once(False, args)
    with_cb, pruned = fit_once(True, args)
    ratio = sum(with_cb) / sum(base)
    print(f"epochs without callbacks {[round(t, 1) for t in base]} s, with {[round(t, 1) for t in with_cb]} s: "
          f"ratio {ratio:.3f} (goal <= 1.10); pruned {pruned} features")  # fmt: skip
    lines = [
        "# Callback overhead and slim latency (real MiniLM-L6)",
        "",
        f"Command: `.venv/bin/python -m benchmarks.callback_overhead --train {args.train} --epochs {args.epochs}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, CPU.",
        "",
        "## Fine-tuning with the callbacks at their defaults",
        "",
        f"{args.train} Rotten Tomatoes sentences (max 48 tokens), batch 32, {args.epochs} epochs, validation on "
        "3 x 256 sentences each epoch; CausalAttributionCallback() (defaults) + CausalPruningCallback(amount=0.05).",
        "",
        "| run | epoch seconds | total |",
        "|---|---|---|",
        f"| no callbacks | {', '.join(f'{t:.1f}' for t in base)} | {sum(base):.1f} |",
        f"| attribution + pruning | {', '.join(f'{t:.1f}' for t in with_cb)} | {sum(with_cb):.1f} |",
        "",
        f"- ratio with / without: **{ratio:.3f}** (goal <= 1.10); {pruned} features pruned",
        "",
        "## `slim` at 30% FFN pruning (random 30% of each layer's 1536 neurons)",
        "",
        f"Batch {args.latency_batch} x 64 tokens, best of {args.latency_repeats}.",
        "",
        "| model | ms / batch | speed-up vs dense |",
        "|---|---|---|",
        f"| dense | {lat['dense'] * 1e3:.1f} | 1.00x |",
        f"| masked (input-column masks) | {lat['masked'] * 1e3:.1f} | {lat['dense'] / lat['masked']:.2f}x |",
        f"| slimmed | {lat['slim'] * 1e3:.1f} | **{lat['dense'] / lat['slim']:.2f}x** (goal >= 1.3x) |",
        "",
        f"- max abs difference slimmed vs masked logits: {lat['diff']:.2e}",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
