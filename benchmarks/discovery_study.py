"""How many of setting C's planted names token discovery confirms, under the committed candidate rule and a
per-word one, reading the training sample and the held-out split only (no evaluation set, no retraining).

The committed rule (:func:`icp_lightning.find_shortcut_words`) nominates words the inverse edits in at least 5%
of the sampled sentences; a name is held by about 8 of the 128, so most names are never candidates. The
per-word rule nominates words edited in at least half of the sentences that hold them (and held by at least 2);
both keep a candidate by the same deletion contrast (:func:`icp_lightning.confirm_tokens`). ERM, attribution
and discovery are the benchmark's own (:mod:`benchmarks.reliability`, same seeds), so the committed rule's counts
equal the benchmark parts'.

Run: ``python -m benchmarks.discovery_study --seeds 0 1 2 3 4 --threads 1`` (about 2.5 single-core minutes per
seed); one JSON line per seed.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch

from benchmarks import reliability as R
from benchmarks.common import parse_args


def study(seed: int, args: argparse.Namespace) -> dict[str, Any]:
    from icp_lightning import confirm_tokens, discover_tokens
    from icp_lightning.core.tokens import word_continuation_ids

    bench = R.BENCHES["C"](args, seed)
    run = R.Runner(bench, seed, args, R.load_model)
    run.run_erm()
    icp = run.icp()  # the benchmark's attribution and committed discovery, from their own seeds
    tok = bench.tokenizer
    ref = [R.inputs_of(b) | {"labels": b["labels"]} for b in bench.attribution["id"]]
    held = [R.inputs_of(b) | {"labels": b["labels"]} for b in bench.attribution["heldout"]]
    names = set(R.MALE) | set(R.FEMALE)
    out: dict[str, Any] = {"seed": seed}
    torch.manual_seed(R.method_seed(seed, "discovery"))
    run.erm.eval()
    found = discover_tokens(run.erm, ref, icp["scores"], icp["sites"], R.token_edit(tok), min_share=0.0,
                            min_rate=0.5, special_token_ids=tok.all_special_ids,
                            continuation_ids=word_continuation_ids(tok))  # fmt: skip
    for d in found:
        d.discovered = d.discovered and d.present >= 2
    per_word = confirm_tokens(run.erm, found, ref, held, pad_id=tok.pad_token_id)
    committed = [tok.decode(list(w)) for w in icp["words"]]
    for rule, words in (("committed", committed),
                        ("per_word", [tok.decode(list(d.token_ids)) for d in per_word if d.discovered])):  # fmt: skip
        out[rule] = {"names": sum(w in names for w in words), "other_words": [w for w in words if w not in names],
                     "confirmed": words}  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    args = parse_args(parser)
    for key, value in {"train": 512, "eval": 160, "heldout": 128, "max_length": 32, "batch_size": 16,
                       "erm_epochs": 2, "budget": 2, "lr": 1e-4, "prune_k": 24, "quick": False}.items():  # fmt: skip
        setattr(args, key, value)  # the committed reliability run's sizes
    for seed in args.seeds:
        print(json.dumps(study(seed, args)), flush=True)


if __name__ == "__main__":
    main()
