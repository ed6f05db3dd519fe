"""The factual-QA benchmark's pieces on a tiny random Llama, each against an independent computation; and a
tiny end-to-end run (parts, report, saved models with manifests)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from benchmarks.factual_qa import (
    PrefixCache,
    _pad,
    attribution_batches,
    choose_k,
    ece_floor_line,
    icp_scores,
    logodds_metric,
    lora_model,
    main,
    paired,
    random_values,
    removed,
    targets,
    top_k_values,
    train_lora,
    trimmed,
    uniform_kl,
    yes_no_logodds,
    yes_no_logodds_batch,
)
from icp_lightning.core.sites import find_sites
from tests.wordlevel import BOS, WORDS, word_tokenizer

torch.set_num_threads(1)
VOCAB = {w: i for i, w in enumerate(WORDS)}
YES, NO = VOCAB["yes"], VOCAB["no"]
PROMPTS = [
    [BOS] + [VOCAB[w] for w in "the sky is blue . question : is the sky blue ? answer :".split()],
    [BOS] + [VOCAB[w] for w in "fire is hot question : is water cold ? answer :".split()],
    [BOS] + [VOCAB[w] for w in "the dog runs answer :".split()],
    [BOS] + [VOCAB[w] for w in "a cat sleeps . question : is the cat tall ? answer :".split()],
]
LABELS = [1, 0, 1, 0]


def _config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=24, pad_token_id=0, bos_token_id=BOS, eos_token_id=2,
        initializer_range=0.3,
    )  # fmt: skip


@pytest.fixture()
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(_config()).eval()


def _naive_logodds(model: torch.nn.Module, ids: list[int]) -> float:
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1]
    return float(logits[YES] - logits[NO])


def test_yes_no_logodds_match_one_prompt_at_a_time(model: LlamaForCausalLM) -> None:
    got = yes_no_logodds(model, PROMPTS, YES, NO, batch_size=3)
    expected = torch.tensor([_naive_logodds(model, p) for p in PROMPTS], dtype=torch.float64)
    assert torch.allclose(got, expected, atol=1e-5)


def test_ece_floor_line_uses_each_rows_own_floor_else_a_spread() -> None:
    def row(floor: float | None) -> dict:
        ident = {"n": 96, **({"ece_floor": floor} if floor is not None else {})}
        return {"metrics": {"id": ident}, "part": {"metrics": {"id": {"n": 96}}}}

    own = ece_floor_line({"LoRA": {0: row(0.08), 1: row(0.1)}, "LoRA + TS": {0: row(0.05), 1: row(0.07)}})
    assert "on these 96 questions" in own and "LoRA 0.090; LoRA + TS 0.060." in own
    spread = ece_floor_line({"LoRA": {0: row(None)}})
    assert "spread evenly over [0.5, 0.9]" in spread and "on 96 ID questions" in spread


def test_trimmed_keeps_everything_that_fits_else_only_this_runs_prompts() -> None:
    store = {(1, 2): torch.zeros(2, 4), (3,): torch.zeros(1, 4), (5, 6, 7): torch.zeros(3, 4)}  # 32+16+48 B
    assert trimmed(store, [[3]], max_bytes=96) == store
    kept = trimmed(store, [[3], [5, 6, 7], [8]], max_bytes=95)
    assert list(kept) == [(3,), (5, 6, 7)]


def test_prefix_cache_gives_the_full_forward_and_passes_gradients(model: LlamaForCausalLM) -> None:
    cache = PrefixCache(n_prefix=2)
    cache.fill(model, PROMPTS[:3], batch_size=2)
    assert len(cache.store) == 3
    cache.hits = cache.misses = 0
    ids, mask = _pad(PROMPTS)
    with torch.no_grad():
        full = yes_no_logodds_batch(model, ids, mask, YES, NO)
        with cache.active(model):
            cached_rows = yes_no_logodds_batch(model, *_pad(PROMPTS[:3]), YES, NO)
            assert cache.hits == 3
            mixed = yes_no_logodds_batch(model, ids, mask, YES, NO)  # row 3 is not cached: computed
            assert cache.misses == 4
    assert torch.allclose(cached_rows, full[:3], atol=1e-5)
    assert torch.allclose(mixed, full, atol=1e-5)
    assert len(model.model.layers) == 4 and all(
        type(m).__name__ == "LlamaDecoderLayer" for m in model.model.layers
    )
    # LoRA in the last layers trains through the cached prefix: its gradients equal the uncached ones
    peft = lora_model(model, [2, 3], seed=0, rank=2)
    for p in peft.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.1)
    grads = []
    for use_cache in (False, True):
        peft.zero_grad()
        with cache.active(peft) if use_cache else torch.enable_grad():
            yes_no_logodds_batch(peft, *_pad(PROMPTS[:3]), YES, NO).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in peft.parameters() if p.grad is not None]))
    assert grads[0].abs().sum() > 0
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


def test_uniform_kl_matches_the_definition() -> None:
    z = torch.tensor([-3.0, 0.0, 0.5, 4.0])
    p = torch.sigmoid(z.double())
    expected = 0.5 * torch.log(0.5 / p) + 0.5 * torch.log(0.5 / (1 - p))
    assert torch.allclose(uniform_kl(z).double(), expected, atol=1e-6)


def test_engine_metrics_read_the_last_real_token(model: LlamaForCausalLM) -> None:
    (batch,) = attribution_batches(PROMPTS, LABELS, batch_size=4)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "logits_to_keep")}
    with torch.no_grad():
        out = model(**inputs)
    z = torch.tensor([_naive_logodds(model, p) for p in PROMPTS])
    sign = torch.tensor([1.0, -1.0, 1.0, -1.0])
    centred = z - z.mean()
    assert torch.allclose(logodds_metric(YES, NO, "evidence")(out, batch), sign * centred, atol=1e-5)
    assert torch.allclose(logodds_metric(YES, NO, "unsupported")(out, batch), centred.abs(), atol=1e-5)
    with pytest.raises(ValueError, match="kind"):
        logodds_metric(YES, NO, "other")


def test_icp_scores_are_the_gradient_mask_effects_contrasted(model: LlamaForCausalLM) -> None:
    sites = find_sites(model, target_modules=r".*layers\.(2|3)\.mlp\.down_proj")
    relevant, irrelevant = PROMPTS[:2], PROMPTS[2:]
    scores, _ = icp_scores(model, sites, relevant, irrelevant, LABELS[:2], YES, NO, batch_size=2)
    only, _ = icp_scores(
        model, sites, relevant, irrelevant, LABELS[:2], YES, NO, batch_size=2, contrast=False
    )

    # attribution patching by hand, one forward per prompt: mean over rows of sum_t h_t,i * dM/dh_t,i, where M
    # is the batch's summed metric on the centred log-odds (mask: do(h_i = 0))
    effects: dict[str, dict[str, torch.Tensor]] = {}
    for kind, prompts in (("evidence", relevant), ("unsupported", irrelevant)):
        stores, zs = [], []
        for ids in prompts:
            store: dict[str, torch.Tensor] = {}
            handles = []
            for name, site in sites.items():

                def pre(module: torch.nn.Module, args: tuple, _n: str = name, _s: dict = store) -> tuple:
                    z = torch.zeros_like(args[0], requires_grad=True)  # d M / d z = d M / d h, all paths kept
                    _s[_n], _s[f"{_n}.h"] = z, args[0].detach()
                    return (args[0] + z,)

                handles.append(site.module.register_forward_pre_hook(pre))
            try:
                out = model(torch.tensor([ids])).logits[0, -1]
            finally:
                for h in handles:
                    h.remove()
            stores.append(store)
            zs.append(out[YES] - out[NO])
        zt = torch.stack(zs)
        centred = zt - zt.mean()
        signs = torch.tensor([1.0 if y else -1.0 for y in LABELS[: len(prompts)]])
        total = (signs * centred).sum() if kind == "evidence" else centred.abs().sum()
        leaves = [st[n] for st in stores for n in sites]
        grads = dict(zip(range(len(leaves)), torch.autograd.grad(total, leaves)))
        sums = {name: torch.zeros(site.n_features, dtype=torch.float64) for name, site in sites.items()}
        j = 0
        for st in stores:
            for name in sites:
                sums[name] += (st[f"{name}.h"] * grads[j]).sum((0, 1)).double()
                j += 1
        effects[kind] = {name: v / len(prompts) for name, v in sums.items()}
    for name in sites:
        expected = effects["unsupported"][name] - effects["evidence"][name]
        assert torch.allclose(scores[name].double(), expected, atol=1e-4)
        assert torch.allclose(only[name].double(), effects["unsupported"][name], atol=1e-4)


def test_top_k_random_and_removed() -> None:
    sites_n = {"a": 3, "b": 2}

    class _Site:
        def __init__(self, n: int) -> None:
            self.n_features = n

    sites = {k: _Site(n) for k, n in sites_n.items()}
    scores = {"a": torch.tensor([0.1, 0.9, -1.0]), "b": torch.tensor([0.5, 0.2])}
    values = top_k_values(sites, scores, 2)  # type: ignore[arg-type]
    assert values["a"].tolist() == [1, 0, 1] and values["b"].tolist() == [0, 1]
    assert removed(values) == {"a": [1], "b": [0]}
    rand = random_values(sites, 3, seed=7)  # type: ignore[arg-type]
    assert sum(int((v == 0).sum()) for v in rand.values()) == 3
    assert random_values(sites, 3, seed=7)["a"].tolist() == rand["a"].tolist()  # type: ignore[arg-type]


def test_choose_k_takes_the_least_unsupported_confidence_within_the_auroc_tolerance() -> None:
    table = {8: (0.71, 0.80), 32: (0.69, 0.70), 128: (0.60, 0.55), 512: (0.70, 0.99)}
    k, got = choose_k(table.__getitem__, (0.70, 0.85), [8, 32, 128, 512])
    assert k == 32 and got == {str(k): list(v) for k, v in table.items()}
    assert (
        choose_k(table.__getitem__, (0.90, 0.85), [8, 32, 128, 512])[0] == 8
    )  # none qualifies: the smallest
    assert choose_k(table.__getitem__, (0.70, 0.60), [8, 32, 128, 512])[0] == 8  # none lowers it


def test_training_lowers_the_loss_and_the_kl_term_removes_unsupported_confidence(
    model: LlamaForCausalLM,
) -> None:
    prompts, labels = PROMPTS[:2] * 4, LABELS[:2] * 4
    irrelevant = PROMPTS[2:] * 4
    peft = lora_model(model, [2, 3], seed=0, rank=4)
    hist = train_lora(peft, prompts, labels, None, YES, NO, seed=0, epochs=15, batch_size=4, lr=0.05)
    assert hist["bce"][-1] < hist["bce"][0]
    torch.manual_seed(1)
    base = LlamaForCausalLM(_config()).eval()
    before = yes_no_logodds(base, PROMPTS[2:], YES, NO).abs().mean()
    peft = lora_model(base, [2, 3], seed=0, rank=4)
    train_lora(
        peft, prompts, labels, irrelevant, YES, NO, seed=0, epochs=15, batch_size=4, lr=0.05, kl_weight=5.0
    )
    after = yes_no_logodds(peft, PROMPTS[2:], YES, NO).abs().mean()
    assert after < before


def test_paired_and_targets_on_made_up_rows() -> None:
    def row(hal: float, ece: float, acc: float, ood: float, unsup: float) -> dict:
        metrics = {
            "id": {"hallucination": hal, "ece": ece, "accuracy": acc, "unsupported_confident": unsup},
            "ood": {"accuracy": ood},
        }
        return {"metrics": metrics, "nq": {}}

    rows = {
        "LoRA": {s: row(0.4, 0.2, 0.70, 0.60, 0.9) for s in range(5)},
        "LoRA + TS": {s: row(0.3, 0.12, 0.70, 0.60, 0.5) for s in range(5)},
        "ICP": {s: row(0.2 + 0.7 * (s == 4), 0.1, 0.695, 0.62, 0.5) for s in range(5)},
    }
    p = paired(rows, "ICP", "LoRA", "id", "hallucination", True)
    diffs = [0.2 - 0.4] * 4 + [0.9 - 0.4]
    assert p["won"] == 4 and p["mean"] == pytest.approx(sum(diffs) / 5)
    assert p["relative"] == pytest.approx((sum(diffs) / 5) / 0.4)
    checks = targets(rows, "ICP")
    assert checks["hallucination_id"]["met"] is False  # -15%: not 25%
    assert checks["ece_id"]["met"] and checks["ece_vs_ts"]["met"]
    assert checks["accuracy_id_within_1"]["met"] and checks["accuracy_ood_up"]["met"]


def test_tiny_end_to_end_run_writes_parts_report_and_models(tmp_path: Path) -> None:
    torch.manual_seed(0)
    folder = tmp_path / "tiny"
    LlamaForCausalLM(_config()).save_pretrained(folder)
    word_tokenizer(list(WORDS)).save_pretrained(folder)
    parts, out, saved = tmp_path / "parts", tmp_path / "out", tmp_path / "models"
    common = [
        "--model-path", str(folder), "--parts", str(parts), "--out", str(out), "--prefix-cache", "",
        "--train", "8", "--train-pool", "8", "--val", "8", "--eval", "8", "--nq", "2", "--attr", "4",
        "--suffix-layers", "2", "--k-grid", "2", "4", "--batch-size", "4", "--threads", "1",
    ]  # fmt: skip
    main([*common, "--seeds", "0", "1", "--save-models", str(saved)])
    names = sorted(p.name for p in parts.glob("*.json"))
    assert "zero-shot.json" in names and "seed1_ICP.json" in names and "seed0_random_prune.json" in names
    report = json.loads((out / "factual_qa.json").read_text())
    assert report["summary"]["ICP"]["seeds"] == [0, 1]
    assert "ICP + TS" in report["summary"] and "hallucination_id" in report["targets"]["ICP"]
    assert (out / "factual_qa.md").read_text().startswith("# Factual reliability")
    icp_part = json.loads((parts / "seed0_ICP.json").read_text())
    rnd_part = json.loads((parts / "seed0_random_prune.json").read_text())
    assert icp_part["k"] == rnd_part["k"] == sum(len(v) for v in icp_part["removed"].values())
    manifest = json.loads((saved / "seed0" / "ICP" / "manifest.json").read_text())
    assert (
        manifest["method"] == "ICP" and manifest["seed"] == 0 and manifest["removed"] == icp_part["removed"]
    )
    reloaded = LlamaForCausalLM.from_pretrained(saved / "seed0" / "ICP")
    for name, cols in manifest["removed"].items():
        weight = dict(reloaded.named_modules())[name].weight
        assert torch.all(weight[:, cols] == 0)
    # the combine step alone rebuilds the same report from the parts
    main([*common, "--combine"])
    again = json.loads((out / "factual_qa.json").read_text())
    assert again["summary"]["ICP"] == report["summary"]["ICP"]
    assert not math.isnan(again["summary"]["LoRA"]["id.accuracy"][0])
    # a rerun skips the methods whose parts exist: each method's row does not depend on the others
    before = (parts / "seed1_LoRA.json").read_text()
    main([*common, "--seeds", "1", "--methods", "LoRA"])
    assert (parts / "seed1_LoRA.json").read_text() == before
    (parts / "seed1_LoRA.json").unlink()
    main([*common, "--seeds", "1", "--methods", "LoRA", "--no-zero-shot"])
    redo = json.loads((parts / "seed1_LoRA.json").read_text())
    assert redo["metrics"] == json.loads(before)["metrics"]


def test_answer_length_skips_leading_newlines_and_stops_at_the_next_one() -> None:
    """NQ-open answers: an instruct model often starts with a newline; that is not the end of the answer (every
    NQ answer was empty, contains-answer 0.0 for every method, when the first newline cut it)."""
    from benchmarks.factual_qa import answer_length

    assert answer_length(["\n", " Paris", "\n", "Q"], [False] * 4) == 2
    assert answer_length(["\n", "\n", " 1969", ".", "\n"], [False] * 5) == 4
    assert answer_length([" Paris", "\n", "x"], [False] * 3) == 1
    assert answer_length([" Paris", " France", "</s>"], [False, False, True]) == 2
    assert answer_length(["\n", "</s>"], [False, True]) == 1  # nothing but a newline: an empty answer
    assert answer_length([" a", " b"], [False, False]) == 2


def test_nq_probe_scores_the_answers_of_each_prompt_like_a_naive_loop(model: LlamaForCausalLM) -> None:
    from benchmarks.factual_qa import NQ_PROBE_PROMPTS, generate_answers, nq_probe
    from icp_lightning.metrics.qa import contains_answer, exact_match

    tok = word_tokenizer(list(WORDS))
    questions, answers = ["the sky", "a dog", "fire"], [["blue"], ["runs", "sleeps"], ["hot"]]
    names = [n for n in NQ_PROBE_PROMPTS if "chat" not in n]  # the tiny tokenizer has no chat template
    said = [(i, t) for n in names for i, q in enumerate(questions)
            for t in generate_answers(model, tok, [NQ_PROBE_PROMPTS[n](tok, q)], 4, 1)[0] if t]  # fmt: skip
    assert said  # the random model says something: make it the right answer, so a rate is not 0
    answers[said[0][0]] = [said[0][1]]
    rows = nq_probe(model, tok, questions, answers, budgets=(2, 4), prompts=names, batch_size=2)
    assert [(r["prompt"], r["tokens"]) for r in rows] == [(n, b) for n in names for b in (2, 4)]
    for r in rows:
        prompts = [NQ_PROBE_PROMPTS[r["prompt"]](tok, q) for q in questions]
        texts = [generate_answers(model, tok, [p], r["tokens"], 1)[0][0] for p in prompts]  # one at a time
        assert r["contains"] == pytest.approx(sum(contains_answer(t, a) for t, a in zip(texts, answers)) / 3)
        assert r["exact_match"] == pytest.approx(sum(exact_match(t, a) for t, a in zip(texts, answers)) / 3)
        assert r["empty"] == sum(not t for t in texts) and r["examples"] == texts[:3]
    assert max(r["contains"] for r in rows) >= 1 / 3 and max(r["exact_match"] for r in rows) >= 1 / 3


def test_the_report_command_names_the_sizes_and_folders_that_differ_from_the_defaults() -> None:
    from benchmarks.factual_qa import _command, parse

    assert _command(parse([])) == "python -m benchmarks.factual_qa"
    assert _command(parse(["--quick"])) == "python -m benchmarks.factual_qa --quick"
    got = _command(
        parse(["--train", "512", "--train-pool", "768", "--parts", "x/parts", "--out", "x", "--seeds", "1"])
    )
    assert got == "python -m benchmarks.factual_qa --train 512 --train-pool 768 --parts x/parts --out x"


def test_load_parts_reads_the_temperature_scaled_twins_from_their_base_parts(tmp_path: Path) -> None:
    from benchmarks.factual_qa import WITH_TS, load_parts

    for i, method in enumerate(["LoRA", "ICP", "LoRA + KL, no prune", "random prune"]):
        part = {
            "method": method,
            "seed": 3,
            "metrics": {"id": {"ece": 0.1 + i}},
            "metrics_ts": {"id": {"ece": 0.01 + i}},
        }
        (tmp_path / f"seed3_{i}.json").write_text(json.dumps(part))
    _, rows = load_parts(tmp_path)
    assert set(rows) == {"LoRA", "ICP", "LoRA + KL, no prune", "random prune"} | {
        f"{m} + TS" for m in WITH_TS
    }
    assert rows["LoRA + KL, no prune + TS"][3]["metrics"]["id"]["ece"] == pytest.approx(2.01)
    assert rows["LoRA + KL, no prune"][3]["metrics"]["id"]["ece"] == pytest.approx(2.1)
