"""LM likelihood metrics on a tiny random Llama, against a naive per-example loop written here."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from icp_lightning.metrics.lm import (
    continuation_logprobs,
    multiple_choice_accuracy,
    perplexity,
    score_token_ids,
    sentence_logprobs,
    sequence_logprob,
    stereotype_score,
    yes_no_accuracy,
)
from tests.wordlevel import BOS, word_tokenizer
from tests.wordlevel import WORDS as BASE_WORDS

torch.set_num_threads(1)
WORDS = BASE_WORDS
VOCAB = {w: i for i, w in enumerate(WORDS)}


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=37, pad_token_id=0, bos_token_id=BOS, eos_token_id=2,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # sharpen the random model so that candidates get clearly different scores
        model.lm_head.weight.mul_(20.0)
    return model.eval()


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return word_tokenizer(WORDS)


def _ids(text: str, bos: bool = True) -> list[int]:
    """Independent of the tokenizer: the word ids by hand."""
    return [BOS] * bos + [VOCAB[w] for w in text.split()]


def _naive_logprob(model: LlamaForCausalLM, ids: list[int], start: int) -> float:
    """One unpadded sequence at a time: sum over t >= max(start, 1) of log p(ids[t] | ids[:t])."""
    with torch.no_grad():
        logp = model(torch.tensor([ids])).logits[0].double().log_softmax(-1)
    return sum(float(logp[t - 1, ids[t]]) for t in range(max(start, 1), len(ids)))


def test_tokenizer_fixture_matches_hand_ids(tokenizer: PreTrainedTokenizerFast) -> None:
    assert tokenizer("the sky is blue")["input_ids"] == _ids("the sky is blue")
    assert tokenizer(" yes", add_special_tokens=False)["input_ids"] == [VOCAB["yes"]]


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_score_token_ids_matches_naive_loop(model: LlamaForCausalLM, batch_size: int) -> None:
    g = torch.Generator().manual_seed(1)
    lengths = [5, 2, 9, 1, 7, 3, 8]
    sequences = [torch.randint(0, 99, (n,), generator=g).tolist() for n in lengths]
    prefixes = [2, 0, 4, 0, 7, 1, 3]
    logprob, n_tokens = score_token_ids(model, sequences, prefixes, batch_size=batch_size)
    expected = [_naive_logprob(model, s, p) for s, p in zip(sequences, prefixes)]
    assert n_tokens.tolist() == [len(s) - max(p, 1) for s, p in zip(sequences, prefixes)]
    torch.testing.assert_close(logprob, torch.tensor(expected, dtype=torch.float64), atol=1e-4, rtol=1e-5)
    assert logprob[3].item() == 0.0  # a single token has nothing to score


def test_sequence_logprob_with_labels_and_padding(model: LlamaForCausalLM) -> None:
    a, b = [1, 10, 11, 12, 13], [1, 20, 21]
    input_ids = torch.tensor([a, b + [0, 0]])
    attention_mask = torch.tensor([[1] * 5, [1, 1, 1, 0, 0]])
    labels = torch.tensor([[-100, -100, 11, 12, 13], [-100, 20, 21, -100, -100]])
    with torch.no_grad():
        result = sequence_logprob(model, input_ids, attention_mask, labels)
        default = sequence_logprob(model, input_ids, attention_mask)  # all real tokens after the first
    expected = torch.tensor([_naive_logprob(model, a, 2), _naive_logprob(model, b, 1)], dtype=torch.float32)
    torch.testing.assert_close(result, expected, atol=1e-4, rtol=1e-5)
    expected_default = torch.tensor([_naive_logprob(model, a, 1), _naive_logprob(model, b, 1)])
    torch.testing.assert_close(default, expected_default.float(), atol=1e-4, rtol=1e-5)
    with pytest.raises(ValueError, match="labels"):
        sequence_logprob(model, input_ids, labels=labels[:, :3])


def test_continuation_logprobs_matches_naive_loop(model, tokenizer) -> None:
    prompts = ["the sky is", "water is", "he is a"]
    continuations = [" blue", " wet .", " doctor"]
    result = continuation_logprobs(model, tokenizer, prompts, continuations, batch_size=2)
    expected = [
        _naive_logprob(model, _ids(p) + _ids(c, bos=False), len(_ids(p)))
        for p, c in zip(prompts, continuations)
    ]
    torch.testing.assert_close(result, torch.tensor(expected, dtype=torch.float64), atol=1e-4, rtol=1e-5)


def _naive_best(model, prompt: str, options: list[str]) -> int:
    scores = [_naive_logprob(model, _ids(prompt) + _ids(o, bos=False), len(_ids(prompt))) for o in options]
    assert len(set(round(s, 3) for s in scores)) == len(scores), "ambiguous test case: tied scores"
    return max(range(len(options)), key=scores.__getitem__)


def test_multiple_choice_accuracy_matches_naive_argmax(model, tokenizer) -> None:
    prompts = ["question : the sky is", "question : fire is", "question : the dog", "question : a cat"]
    choices = [
        [" blue", " green", " red"],
        [" hot", " cold"],
        [" runs", " sleeps", " is tall", " was"],
        [" runs", " sleeps"],
    ]
    best = [_naive_best(model, p, c) for p, c in zip(prompts, choices)]
    answers = [best[0], best[1], (best[2] + 1) % 4, best[3]]  # the model is "wrong" on question 2 only
    assert multiple_choice_accuracy(
        model, tokenizer, prompts, choices, answers, batch_size=3
    ) == pytest.approx(0.75)
    wrong = [(b + 1) % len(c) for b, c in zip(best, choices)]
    assert multiple_choice_accuracy(model, tokenizer, prompts, choices, wrong) == 0.0
    with pytest.raises(ValueError, match="answer index"):
        multiple_choice_accuracy(model, tokenizer, prompts[:1], choices[:1], [5])
    with pytest.raises(ValueError, match="one of each"):
        multiple_choice_accuracy(model, tokenizer, prompts, choices, answers[:2])


def test_yes_no_accuracy_matches_naive_comparison(model, tokenizer) -> None:
    prompts = [
        "water is wet ? answer :",
        "fire is cold ? answer :",
        "the sky is blue ? answer :",
        "he is tall ?",
    ]
    model_says_yes = [_naive_best(model, p, [" no", " yes"]) == 1 for p in prompts]
    answers = list(model_says_yes)
    answers[0] = not answers[0]  # one disagreement out of four
    assert yes_no_accuracy(model, tokenizer, prompts, answers) == pytest.approx(0.75)
    flipped = [not a for a in model_says_yes]
    assert yes_no_accuracy(model, tokenizer, prompts, flipped) == 0.0
    assert yes_no_accuracy(model, tokenizer, prompts, model_says_yes) == 1.0


def test_stereotype_score_matches_naive_comparison(model, tokenizer) -> None:
    pairs = [
        ("he is a doctor .", "she is a doctor ."),
        ("she is a nurse .", "he is a nurse ."),
        ("the dog runs .", "the cat runs ."),
        ("he is tall .", "she is tall ."),
    ]
    # order each pair by the naive score: the first three pairs put the likelier sentence first, the last one
    # second, so the right answer is 3 / 4 (ties, which count 1/2, are checked by the doctest's uniform model)
    ordered = []
    for a, b in pairs:
        la, lb = _naive_logprob(model, _ids(a), 1), _naive_logprob(model, _ids(b), 1)
        assert abs(la - lb) > 1e-3
        ordered.append((a, b) if la > lb else (b, a))
    more = [m for m, _ in ordered[:3]] + [ordered[3][1]]
    less = [s for _, s in ordered[:3]] + [ordered[3][0]]
    assert stereotype_score(model, tokenizer, more, less, batch_size=3) == pytest.approx(0.75)
    assert stereotype_score(model, tokenizer, less, more) == pytest.approx(0.25)
    assert math.isnan(stereotype_score(model, tokenizer, [], []))
    with pytest.raises(ValueError, match="pairs"):
        stereotype_score(model, tokenizer, more, less[:2])


def test_perplexity_and_sentence_logprobs_match_naive_loop(model, tokenizer) -> None:
    texts = ["the sky is blue .", "a cat", "he was a nurse ? yes"]
    total, count = 0.0, 0
    for t in texts:
        total += _naive_logprob(model, _ids(t), 1)
        count += len(_ids(t)) - 1
    logprob, n_tokens = sentence_logprobs(model, tokenizer, texts)
    assert n_tokens.tolist() == [len(_ids(t)) - 1 for t in texts]
    assert logprob.sum().item() == pytest.approx(total, abs=1e-3)
    assert perplexity(model, tokenizer, texts, batch_size=2) == pytest.approx(
        math.exp(-total / count), rel=1e-4
    )


def test_model_mode_is_restored(model, tokenizer) -> None:
    model.train()
    try:
        perplexity(model, tokenizer, ["the sky"])
        assert model.training
    finally:
        model.eval()
