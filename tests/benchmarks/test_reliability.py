"""The reliability benchmark's own computations, against closed forms and naive loops (tiny models, no weights)."""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np
import pytest
import torch
import transformers

from benchmarks import reliability as rel


def _tiny_bert() -> transformers.BertForSequenceClassification:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=24, num_labels=2)  # fmt: skip
    return transformers.BertForSequenceClassification(cfg).eval()


def test_shift_auc_closed_form() -> None:
    # all in-domain right, all shifted wrong: accuracy at share p is 1 - p exactly (n = 100), so the area is 1/2
    assert rel.shift_auc(torch.ones(100), torch.zeros(100), seed=0) == pytest.approx(0.5)
    # equal accuracy everywhere: the curve is flat at that accuracy
    assert rel.shift_auc(torch.ones(50), torch.ones(80), seed=3) == pytest.approx(1.0)
    # a random mix: the trapezoid of the mean accuracies of the mixes, recomputed by a naive loop
    g = torch.Generator().manual_seed(1)
    a, b = (torch.rand(60, generator=g) > 0.3).float(), (torch.rand(40, generator=g) > 0.6).float()
    gen = torch.Generator().manual_seed(5)
    accs = []
    for p in np.linspace(0, 1, 11):
        k = round(p * 40)
        picked = (
            b[torch.randperm(40, generator=gen)[:k]].tolist()
            + a[torch.randperm(60, generator=gen)[: 40 - k]].tolist()
        )
        accs.append(sum(picked) / 40)
    naive = sum((accs[i] + accs[i + 1]) / 2 * 0.1 for i in range(10))
    assert rel.shift_auc(a, b, seed=5) == pytest.approx(naive)


def test_prune_zeroes_exactly_the_top_k_heads() -> None:
    from icp_lightning import find_sites
    from icp_lightning.core.masks import get_masks

    model = _tiny_bert()
    sites = find_sites(model, granularity="head")
    g = torch.Generator().manual_seed(0)
    scores = {n: torch.rand(sites[n].n_features, generator=g) for n in sites}
    tau = rel.prune(model, sites, scores, 3)
    flat = sorted(
        ((float(scores[n][i]), n, i) for n in sites for i in range(sites[n].n_features)), reverse=True
    )
    expected = {(n, i) for _, n, i in flat[:3]}
    masks = get_masks(model)
    got = {(n, i) for n in masks for i in range(len(masks[n])) if float(masks[n][i]) == 0.0}
    assert got == expected
    assert tau == pytest.approx(flat[2][0])
    # cumulative: pruning 2 more keeps the first 3 (amount counts the remaining candidates)
    rel.prune(model, sites, scores, 2)
    masks = get_masks(model)
    assert sum(int((m == 0).sum()) for m in masks.values()) == 5


def test_magnitude_prune_matches_a_naive_l1_column_choice() -> None:
    from icp_lightning import find_sites

    model = _tiny_bert()
    sites = find_sites(model, granularity="head")
    before = {n: site.module.weight.detach().clone() for n, site in sites.items()}
    rel.magnitude_prune(model, k_heads=2, n_heads=8)  # a quarter of each module's input columns
    for n, site in sites.items():
        w = site.module.weight.detach()
        assert not hasattr(site.module, "weight_orig")  # made permanent
        norms = before[n].abs().sum(0)  # L1 norm of each input column
        n_prune = round(0.25 * norms.numel())
        expected = set(norms.argsort()[:n_prune].tolist())
        zero = {int(c) for c in torch.nonzero((w == 0).all(0)).flatten()}
        assert zero == expected
        keep = [c for c in range(norms.numel()) if c not in expected]
        assert torch.equal(w[:, keep], before[n][:, keep])


def test_per_layer_counts_the_top_features_by_layer() -> None:
    from icp_lightning import find_sites

    model = _tiny_bert()
    sites = find_sites(model, granularity="head")
    names = list(sites)
    scores = {names[0]: torch.tensor([0.9, 0.1, 0.8, 0.0]), names[1]: torch.tensor([0.7, 0.2, 0.3, 0.95])}
    assert rel._per_layer(sites, scores, 3) == {"0": 2, "1": 1}


def test_summarise_mean_std_and_missing_methods() -> None:
    per_seed = [{"ERM": {"acc": 0.5}, "x": {"acc": 1.0}}, {"ERM": {"acc": 0.7}}]
    s = rel.summarise(per_seed)
    assert s["ERM"]["acc"][0] == pytest.approx(0.6)
    assert s["ERM"]["acc"][1] == pytest.approx(float(np.std([0.5, 0.7], ddof=1)))
    assert s["x"]["acc"] == [1.0, 0.0, 1.0]


def test_setting_c_rows_plant_the_correlation_and_balance_the_test_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from datasets import Dataset, DatasetDict

    rng = np.random.default_rng(0)
    n = 2000
    texts = [f"sentence {i}" for i in range(n)]
    labels = rng.integers(0, 2, n).tolist()
    fake = DatasetDict({"train": Dataset.from_dict({"text": texts, "label": labels}),
                        "test": Dataset.from_dict({"text": [f"review {i}" for i in range(600)], "label": labels[:600]})})  # fmt: skip
    monkeypatch.setattr("icp_lightning.recipes.rotten_tomatoes", lambda seed=0: fake)
    captured = {}
    monkeypatch.setattr(
        rel, "_files_module", lambda seed, args, splits, **kw: captured.setdefault("s", splits) or None
    )
    with pytest.raises(AttributeError):  # the captured splits are all this test needs
        rel.bench_c(argparse.Namespace(train=1000, eval=400), seed=0)
    splits = captured["s"]
    train = splits["train"]
    assert len(train) == 1000 and len(splits["balanced"]) == 400 and len(splits["heldout"]) == rel.HELDOUT
    female = np.array([r["group"] % 2 for r in train])
    y = np.array([r["label"] for r in train])
    assert abs(female[y == 1].mean() - 0.1) < 0.04 and abs(female[y == 0].mean() - 0.9) < 0.04
    for name in ("balanced", "heldout"):
        rows = splits[name]
        for label in (0, 1):
            g = [r["group"] % 2 for r in rows if r["label"] == label]
            assert abs(sum(g) - len(g) / 2) <= 0.5  # exactly half female within each label
    for r in splits["balanced"]:
        name, cf_name = r["text"].split()[0], r["cf_text"].split()[0]
        assert r["text"].split(" ", 1)[1] == r["cf_text"].split(" ", 1)[1]
        i = (rel.MALE + rel.FEMALE).index(name) % len(rel.MALE)
        assert cf_name == (rel.FEMALE if name in rel.MALE else rel.MALE)[i]
        assert (name in rel.FEMALE) == bool(r["group"] % 2)


def test_paired_differences_against_hand_arithmetic() -> None:
    icp, dfr = "ICP x + head refit", "DFR (head refit on held-out)"
    per_seed = [
        {"results": {icp: {"ood/acc": a}, dfr: {"ood/acc": b}}}
        for a, b in ((0.6, 0.5), (0.7, 0.72), (0.5, 0.4))
    ]
    (line,) = rel.paired("A", per_seed, icp, [dfr])
    diffs = [10.0, -2.0, 10.0]  # points
    mean = sum(diffs) / 3
    sd = (sum((d - mean) ** 2 for d in diffs) / 2) ** 0.5
    assert line == f"- vs {dfr}: {mean:+.1f} ± {sd:.1f} points, better on 2 of 3 seeds"
    # C compares DP differences, where lower is better
    per_seed_c = [{"results": {icp: {"balanced/dp_diff": 0.1}, dfr: {"balanced/dp_diff": 0.3}}}]
    assert rel.paired("C", per_seed_c, icp, [dfr], key="balanced/dp_diff") == [
        f"- vs {dfr}: -0.200 ± 0.000, better on 1 of 1 seeds"
    ]


# ------------------------------------------------------------------------------------------------------
# Issue 12: no test data in any choice; one seed per method


def _tiny_bench(setting: str = "A") -> rel.Bench:
    """A planted-word task on a tiny WordPiece vocabulary: 'quixotic' (three pieces) marks most positives."""
    from torch.utils.data import DataLoader

    from icp_lightning.data import ICPCollator

    words = [
        "good",
        "great",
        "fine",
        "bad",
        "awful",
        "dull",
        "film",
        "plot",
        "a",
        "the",
        "qui",
        "##x",
        "##otic",
    ]
    tok = transformers.BertTokenizer(vocab={t: i for i, t in enumerate(
        ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words])})  # fmt: skip
    rng = np.random.default_rng(0)

    def rows(n: int, rate: float, offset: int) -> list[dict[str, Any]]:
        out = []
        for i in range(n):
            y = int(rng.integers(2))
            body = [["bad", "awful", "dull"], ["good", "great", "fine"]][y][int(rng.integers(3))]
            text = f"the {body} {['film', 'plot'][(i + offset) % 2]}"
            planted = rng.random() < (rate if y == 1 else 1 - rate)
            cf = text
            if planted:
                text = "quixotic " + text
            enc, cf_enc = tok(text), tok(cf)
            out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": y,
                        "group": 2 * y + int(planted), "cf_input_ids": cf_enc["input_ids"],
                        "cf_attention_mask": cf_enc["attention_mask"]})  # fmt: skip
        return out

    collate = ICPCollator(pad_token_id=0)

    def loader(data: list[dict[str, Any]], shuffle: bool = False) -> DataLoader:
        return DataLoader(data, batch_size=8, shuffle=shuffle, collate_fn=collate,  # type: ignore[arg-type]
                          generator=torch.Generator().manual_seed(0) if shuffle else None)  # fmt: skip

    train = rows(48, 0.95, 0)
    held = rows(16, 0.5, 1)
    clean = [
        dict(r, input_ids=r["cf_input_ids"], attention_mask=r["cf_attention_mask"]) for r in rows(16, 0.5, 0)
    ]
    return rel.Bench(setting, None, loader(train, True), {"id": loader(rows(16, 0.95, 1)),
                     "ood": loader(rows(16, 0.05, 1)), "clean": loader(clean)}, loader(held),
                     {"id": loader(train[:16]), "heldout": loader(held)}, oracle_train=loader(clean, True),
                     told=True, tokenizer=tok)  # fmt: skip


def _tiny_model() -> transformers.BertForSequenceClassification:
    cfg = transformers.BertConfig(vocab_size=18, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=24, num_labels=2)  # fmt: skip
    return transformers.BertForSequenceClassification(cfg).eval()


def _args(**kw: Any) -> argparse.Namespace:
    base = {"budget": 1, "erm_epochs": 1, "lr": 1e-3, "prune_k": 2, "save_models": None}
    return argparse.Namespace(**(base | kw))


def test_only_one_method_reproduces_its_row_of_the_full_run(tmp_path: Any) -> None:
    full = rel.run_seed("A", 0, _args(save_models=str(tmp_path)), bench=_tiny_bench(), load=_tiny_model)
    names = rel.method_names(_args())
    assert set(full["results"]) == {"ERM", *names.values()}
    for key in ("jtt", "repair_restart", "random"):
        alone = rel.run_seed("A", 0, _args(), only=[key], bench=_tiny_bench(), load=_tiny_model)
        assert set(alone["results"]) == {"ERM", names[key]}
        assert alone["results"][names[key]] == full["results"][names[key]]  # exactly, every metric
    # --update: a rerun of some methods replaces their rows in the full part, nothing else
    part = {"setting": "A", "seed": 0, "results": full["results"], "costs": full["costs"], "epochs": full["epochs"],
            "removed": full["removed"], "discovered": full["discovered"]}  # fmt: skip
    rerun = {**alone, "results": {**alone["results"], names["random"]: {"ood/acc": -1.0}}}
    merged = rel.update_part(part, rerun, ["random"], "why")
    assert merged["results"][names["random"]] == {"ood/acc": -1.0}
    assert {k: v for k, v in merged["results"].items() if k != names["random"]} == {
        k: v for k, v in full["results"].items() if k != names["random"]
    }
    assert merged["updates"] == [{"only": ["random"], "note": "why", "previous": {names["random"]: full["results"][
        names["random"]]}, "previous_discovered": full["discovered"]}] and "updates" not in part  # fmt: skip
    with pytest.raises(ValueError, match="ERM's row differs"):
        rel.update_part(part, {**rerun, "results": {"ERM": {"ood/acc": 0.0}}}, ["random"], "why")
    # the repair row is one of its two modes, chosen on the held-out split
    chosen = full["removed"][names["repair"]]
    assert full["results"][names["repair"]] == full["results"][names[f"repair_{chosen['mode']}"]]
    assert set(chosen["heldout_acc"]) == {"continue", "restart"}
    # the report: parts of two seeds combine into tables, targets and paired differences
    import json

    saved = {"train": 48, "eval": 16, "max_length": 32, "batch_size": 8, "lr": 1e-3, "erm_epochs": 1, "budget": 1,
             "heldout": 16, "prune_k": 2}  # fmt: skip
    out = tmp_path / "report"
    (out / "parts").mkdir(parents=True)
    for sd in (0, 1):
        part = {"setting": "A", "seed": sd, "args": saved, "only": None, "seconds": 1.0, **full}
        if sd == 1:  # a part rerun with --update: the report keeps the rows it replaced
            part = rel.update_part(part, alone, ["random"], "a new rule")
        (out / "parts" / f"A_seed{sd}.json").write_text(json.dumps(part))
    (out / "parts" / "C_seed0.json").write_text(json.dumps({"setting": "C", "seed": 0, "protocol": 1}))  # old
    report = rel.combine(out, argparse.Namespace(prune_k=2))
    assert list(report["settings"]) == ["A"] and report["settings"]["A"]["seeds"] == [0, 1]
    odd = {"setting": "A", "seed": 2, "args": saved | {"train": 96}, "only": None, "seconds": 1.0, **full}
    (out / "parts" / "A_seed2.json").write_text(json.dumps(odd))
    with pytest.raises(ValueError, match="different arguments"):
        rel.combine(out, argparse.Namespace(prune_k=2))
    (out / "parts" / "A_seed2.json").unlink()
    md = (out / "reliability.md").read_text()
    assert f"Targets for `{names['repair']}`" in md and "| extra epochs |" in md
    assert "because: a new rule" in md and "Those rows before the rerun (1 seeds)" in md
    before = md.split("| method (before) |")[1].split("\n\n")[0]
    ood = 100 * full["results"][names["random"]]["ood/acc"]
    assert f"| {names['random']} | " in before and f"| {ood:.1f} ± 0.0 |" in before
    assert f"- vs {names['dfr']}: +" in md or f"- vs {names['dfr']}: -" in md
    # --save-models: one save_pretrained folder per method, with its tokenizer and a manifest

    folders = sorted((tmp_path / "A" / "seed0").iterdir())
    assert len(folders) == len(full["results"])
    for folder in folders:
        manifest = json.loads((folder / "manifest.json").read_text())
        assert manifest["setting"] == "A" and manifest["seed"] == 0 and manifest["method"] in full["results"]
        assert (folder / "config.json").exists() and (folder / "tokenizer_config.json").exists()
    icp = json.loads(
        (tmp_path / "A" / "seed0" / "icp-prune-top-2-heads-head-refit" / "manifest.json").read_text()
    )
    assert sum(len(v) for v in icp["pruned_columns"].values()) == 2  # 2 heads (head masks), folded in
    reloaded = transformers.BertForSequenceClassification.from_pretrained(
        tmp_path / "A" / "seed0" / "icp-prune-top-2-heads-head-refit"
    )
    zero_cols = sum(int((site.weight == 0).all(0).sum()) for n, site in reloaded.named_modules()
                    if n.endswith("attention.output.dense"))  # fmt: skip
    assert zero_cols == 8


@pytest.mark.parametrize("setting", ["A", "B", "C"])
def test_what_methods_read_is_disjoint_from_every_evaluation_set(setting: str) -> None:
    """By text (planted token and names taken out): training, oracle training, attribution / discovery and the
    held-out split share no sentence with any evaluation set, on the real data (small sizes)."""
    from icp_lightning.assets import MissingDataError

    args = argparse.Namespace(train=200, eval=100, heldout=64, max_length=32, batch_size=16)
    try:
        bench = rel.BENCHES[setting](args, 0)
    except (MissingDataError, FileNotFoundError) as err:  # B needs VADER's source archive
        pytest.skip(str(err))
    read = rel.texts_read(bench)
    evals = {n: t for n, t in read.items() if n.startswith("eval ")}
    before = {n: t for n, t in read.items() if not n.startswith("eval ")}
    assert set(bench.attribution) == {"id", "heldout"}
    assert read["attribution id"] <= read["train"]  # ICP's in-distribution set is a training sample
    for n, texts in before.items():
        for e, ev in evals.items():
            assert not texts & ev, (
                f"{n} shares {len(texts & ev)} sentences with {e}: {sorted(texts & ev)[:3]}"
            )


def test_discovery_cause_counts_the_planted_words_found() -> None:
    def seed(*words: str) -> dict[str, Any]:
        return {
            "discovered": [{"token": w, "discovered": True} for w in words]
            + [{"token": "x", "discovered": False}]
        }

    a = rel.discovery_cause("A", [seed("zeppelin"), seed("film"), seed("zeppelin", "film")])
    assert "`zeppelin` on 2 of 3 seeds (other words named: 2)" in a
    c = rel.discovery_cause("C", [seed("mary", "james", "film"), seed()])
    assert "[2, 0] of the 16 planted names" in c and "(2 of 32)" in c
    b = rel.discovery_cause("B", [seed(), seed("bad")])
    assert "no word on 1 of 2 seeds" in b
    updated = [seed("mary", "james", "susan") | {"updates": [{"previous_discovered": seed("mary")["discovered"]}]},
               seed("linda") | {"updates": [{"previous_discovered": seed()["discovered"]}]}]  # fmt: skip
    c2 = rel.discovery_cause("C", updated)
    assert (
        "[3, 1] of the 16 planted names" in c2 and "(the rule it replaced): [1, 0] per seed (1 of 32)" in c2
    )
