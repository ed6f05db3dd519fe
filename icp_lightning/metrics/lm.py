"""Log-likelihood metrics for causal language models: QA accuracy, stereotype score, perplexity.

An id-level core (:func:`sequence_logprob`, :func:`score_token_ids`) does the maths on token ids; thin wrappers
take strings and a Hugging Face tokenizer. The model is any causal LM whose forward takes ``input_ids`` and
``attention_mask`` and returns ``.logits`` (``[B, T, V]``), e.g. ``LlamaForCausalLM``. Batches are right-padded,
so no real token ever attends to padding. Pure torch (+ a tokenizer): no lightning.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "continuation_logprobs",
    "multiple_choice_accuracy",
    "perplexity",
    "score_token_ids",
    "sentence_logprobs",
    "sequence_logprob",
    "stereotype_score",
    "yes_no_accuracy",
]

IGNORE_INDEX = -100


def sequence_logprob(
    model: torch.nn.Module,
    input_ids: Tensor,
    attention_mask: Optional[Tensor] = None,
    labels: Optional[Tensor] = None,
) -> Tensor:
    """Sum of ``log p(labels[t] | input_ids[:t])`` over the label tokens that are not -100, per sequence.

    The causal shift is applied here: the logits at position ``t - 1`` score ``labels[t]``, as in Hugging Face's
    causal-LM loss, so ``labels[:, 0]`` is never scored. Gradients flow if enabled by the caller.

    Args:
        model: Causal LM returning ``.logits`` of shape ``[B, T, V]``.
        input_ids: ``[B, T]`` token ids.
        attention_mask: ``[B, T]`` 1 for real tokens, 0 for padding.
        labels: ``[B, T]`` ids to score, -100 where not scored. Default: ``input_ids`` with padding set to -100.

    Returns:
        ``[B]`` float32 total log-probabilities (0 for a sequence with nothing to score).

    Raises:
        ValueError: If ``input_ids`` is not 2-D or ``labels`` / ``attention_mask`` do not match its shape.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> _ = torch.manual_seed(0)
        >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=11, hidden_size=8, num_hidden_layers=1,
        ...                                      num_attention_heads=2, intermediate_size=8))
        >>> ids = torch.tensor([[1, 5, 7]])
        >>> labels = torch.tensor([[-100, -100, 7]])  # score only the last token
        >>> lp = sequence_logprob(model, ids, labels=labels)
        >>> bool(torch.allclose(lp, model(ids).logits[0, 1].log_softmax(-1)[7]))
        True
    """
    if input_ids.ndim != 2:
        raise ValueError(f"Expected `input_ids` of shape [B, T], but got {tuple(input_ids.shape)}.")
    for name, other in (("attention_mask", attention_mask), ("labels", labels)):
        if other is not None and other.shape != input_ids.shape:
            raise ValueError(
                f"Expected `{name}` of the same shape as `input_ids` {tuple(input_ids.shape)}, "
                f"but got {tuple(other.shape)}."
            )
    if labels is None:
        labels = (
            input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
        )
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    targets = labels[:, 1:].to(logits.device)
    nll = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    )
    return -nll.view(targets.shape).sum(dim=-1)


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Switch ``model`` to eval mode (no dropout) and no-grad, restoring its mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def score_token_ids(
    model: torch.nn.Module,
    sequences: Sequence[Sequence[int]],
    prefix_lengths: Optional[Sequence[int]] = None,
    batch_size: int = 16,
) -> tuple[Tensor, Tensor]:
    """Total log-probability of each token-id sequence after its prefix, batched with right padding.

    Token ``t`` of a sequence is scored when ``t >= max(prefix_length, 1)`` (the first token has no context).
    The model runs in eval mode without gradients; its mode is restored afterwards.

    Args:
        model: Causal LM returning ``.logits``.
        sequences: Token ids, one list per sequence (lengths may differ).
        prefix_lengths: Per sequence, how many leading tokens are context only (not scored). Default: 0.
        batch_size: Sequences per forward pass.

    Returns:
        ``(logprob, n_tokens)``: ``[N]`` float64 sums of log-probabilities and ``[N]`` int64 numbers of scored
        tokens, on the CPU.

    Raises:
        ValueError: If a prefix length is out of range, lengths disagree, or ``batch_size < 1``.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> _ = torch.manual_seed(0)
        >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=11, hidden_size=8, num_hidden_layers=1,
        ...                                      num_attention_heads=2, intermediate_size=8))
        >>> logprob, n_tokens = score_token_ids(model, [[1, 5, 7], [1, 4]], prefix_lengths=[2, 1])
        >>> n_tokens.tolist()
        [1, 1]
    """
    if batch_size < 1:
        raise ValueError(f"Expected `batch_size` >= 1, but got {batch_size}.")
    prefixes = [0] * len(sequences) if prefix_lengths is None else list(prefix_lengths)
    if len(prefixes) != len(sequences):
        raise ValueError(
            f"Got {len(sequences)} sequences but {len(prefixes)} prefix lengths: give one per sequence."
        )
    for i, (seq, prefix) in enumerate(zip(sequences, prefixes)):
        if not 0 <= prefix <= len(seq):
            raise ValueError(f"Sequence {i} has {len(seq)} tokens, but its prefix length is {prefix}.")
    device = next(model.parameters()).device
    logprobs, counts = [], []
    with _eval_mode(model):
        for start in range(0, len(sequences), batch_size):
            chunk = [list(s) for s in sequences[start : start + batch_size]]
            chunk_prefixes = prefixes[start : start + batch_size]
            width = max(max(len(s) for s in chunk), 1)
            input_ids = torch.zeros(len(chunk), width, dtype=torch.long)
            attention_mask = torch.zeros(len(chunk), width, dtype=torch.long)
            labels = torch.full((len(chunk), width), IGNORE_INDEX, dtype=torch.long)
            for row, (seq, prefix) in enumerate(zip(chunk, chunk_prefixes)):
                input_ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
                attention_mask[row, : len(seq)] = 1
                labels[row, prefix : len(seq)] = input_ids[row, prefix : len(seq)]
            labels[:, 0] = IGNORE_INDEX
            logprob = sequence_logprob(
                model, input_ids.to(device), attention_mask.to(device), labels.to(device)
            )
            logprobs.append(logprob.double().cpu())
            counts.append((labels[:, 1:] != IGNORE_INDEX).sum(dim=-1))
    if not logprobs:
        return torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.long)
    return torch.cat(logprobs), torch.cat(counts)


def _ids(tokenizer: PreTrainedTokenizerBase, text: str, add_special_tokens: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def continuation_logprobs(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    continuations: Sequence[str],
    batch_size: int = 16,
) -> Tensor:
    """``log p(continuation | prompt)`` for each pair, summed over the continuation's tokens.

    The prompt is tokenized with the tokenizer's special tokens (e.g. BOS), the continuation without; write the
    continuation with its leading space (``" yes"``).

    Args:
        model: Causal LM returning ``.logits``.
        tokenizer: Hugging Face tokenizer (or anything whose ``__call__`` returns ``{"input_ids": [...]}``).
        prompts: Context strings.
        continuations: One continuation per prompt.
        batch_size: Sequences per forward pass.

    Returns:
        ``[N]`` float64 log-probabilities on the CPU.

    Raises:
        ValueError: If the lists differ in length or a continuation has no tokens.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1,
        ...                                      num_attention_heads=2, intermediate_size=8))
        >>> _ = model.lm_head.weight.data.zero_()  # uniform next token: log p = -log(10) for every token
        >>> def tokenizer(text, add_special_tokens=True):  # toy: BOS = 0, then one id per word (its length)
        ...     return {"input_ids": [0] * add_special_tokens + [len(w) for w in text.split()]}
        >>> continuation_logprobs(model, tokenizer, ["the sky is"], [" very blue"])  # 2 tokens
        tensor([-4.6052], dtype=torch.float64)
    """
    if len(prompts) != len(continuations):
        raise ValueError(
            f"Got {len(prompts)} prompts but {len(continuations)} continuations: give one per prompt."
        )
    sequences, prefixes = [], []
    for prompt, continuation in zip(prompts, continuations):
        prompt_ids = _ids(tokenizer, prompt, add_special_tokens=True)
        continuation_ids = _ids(tokenizer, continuation, add_special_tokens=False)
        if not continuation_ids:
            raise ValueError(f"The continuation {continuation!r} has no tokens: nothing to score.")
        sequences.append(prompt_ids + continuation_ids)
        prefixes.append(len(prompt_ids))
    return score_token_ids(model, sequences, prefixes, batch_size)[0]


def multiple_choice_accuracy(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    choices: Sequence[Sequence[str]],
    answers: Sequence[int],
    batch_size: int = 16,
) -> float:
    """Share of questions whose most likely choice (highest total log-probability after the prompt) is correct.

    TruthfulQA-MC1 style. Ties go to the first of the tied choices.

    Args:
        model: Causal LM returning ``.logits``.
        tokenizer: Hugging Face tokenizer.
        prompts: One prompt per question.
        choices: Candidate continuations per question (any number, at least one).
        answers: Index of the correct choice per question.
        batch_size: Sequences per forward pass.

    Returns:
        Accuracy in ``[0, 1]`` (``nan`` when there are no questions).

    Raises:
        ValueError: If lengths disagree, a question has no choices, or an answer index is out of range.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1,
        ...                                      num_attention_heads=2, intermediate_size=8))
        >>> _ = model.lm_head.weight.data.zero_()  # uniform next token: log p = -log(10) for every token
        >>> def tokenizer(text, add_special_tokens=True):  # toy: BOS = 0, then one id per word (its length)
        ...     return {"input_ids": [0] * add_special_tokens + [len(w) for w in text.split()]}
        >>> multiple_choice_accuracy(model, tokenizer, ["Q: 2+2? A:"], [[" four", " five or six"]], [0])
        1.0
    """
    if not len(prompts) == len(choices) == len(answers):
        raise ValueError(
            f"Got {len(prompts)} prompts, {len(choices)} choice lists and {len(answers)} answers: give one of each "
            "per question."
        )
    flat_prompts, flat_choices = [], []
    for i, (prompt, options, answer) in enumerate(zip(prompts, choices, answers)):
        if not options:
            raise ValueError(f"Question {i} has no choices.")
        if not 0 <= answer < len(options):
            raise ValueError(f"Question {i} has {len(options)} choices, but its answer index is {answer}.")
        flat_prompts += [prompt] * len(options)
        flat_choices += list(options)
    if not prompts:
        return math.nan
    scores = continuation_logprobs(model, tokenizer, flat_prompts, flat_choices, batch_size)
    correct, offset = 0, 0
    for options, answer in zip(choices, answers):
        correct += int(int(scores[offset : offset + len(options)].argmax()) == answer)
        offset += len(options)
    return correct / len(prompts)


def yes_no_accuracy(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    answers: Sequence[bool],
    yes: str = " yes",
    no: str = " no",
    batch_size: int = 16,
) -> float:
    """BoolQ-style accuracy: predict "yes" when ``log p(yes | prompt) > log p(no | prompt)``.

    Args:
        model: Causal LM returning ``.logits``.
        tokenizer: Hugging Face tokenizer.
        prompts: Prompts ending where the answer goes, e.g. ``"... Question: is it? Answer:"``.
        answers: The true answer per prompt.
        yes: Continuation meaning yes.
        no: Continuation meaning no.
        batch_size: Sequences per forward pass.

    Returns:
        Accuracy in ``[0, 1]`` (``nan`` when there are no prompts).

    Raises:
        ValueError: If ``prompts`` and ``answers`` differ in length.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1,
        ...                                      num_attention_heads=2, intermediate_size=8))
        >>> _ = model.lm_head.weight.data.zero_()  # uniform next token: log p = -log(10) for every token
        >>> def tokenizer(text, add_special_tokens=True):  # toy: BOS = 0, then one id per word (its length)
        ...     return {"input_ids": [0] * add_special_tokens + [len(w) for w in text.split()]}
        >>> yes_no_accuracy(model, tokenizer, ["Is fire wet? Answer:"], [False])  # a tie picks " no"
        1.0
    """
    if len(prompts) != len(answers):
        raise ValueError(f"Got {len(prompts)} prompts but {len(answers)} answers: give one per prompt.")
    return multiple_choice_accuracy(
        model, tokenizer, prompts, [[no, yes]] * len(prompts), [int(bool(a)) for a in answers], batch_size
    )


def sentence_logprobs(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    batch_size: int = 16,
) -> tuple[Tensor, Tensor]:
    """Total log-probability of each text and its number of scored tokens.

    Texts are tokenized with special tokens; every token but the first is scored, so with a BOS-adding tokenizer
    (Llama) all words count, while without one (GPT-2) the first token is context only.

    Args:
        model: Causal LM returning ``.logits``.
        tokenizer: Hugging Face tokenizer.
        texts: Strings to score.
        batch_size: Sequences per forward pass.

    Returns:
        ``(logprob, n_tokens)``, ``[N]`` float64 and ``[N]`` int64 on the CPU.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1,
        ...                                      num_attention_heads=2, intermediate_size=8))
        >>> _ = model.lm_head.weight.data.zero_()  # uniform next token: log p = -log(10) for every token
        >>> def tokenizer(text, add_special_tokens=True):  # toy: BOS = 0, then one id per word (its length)
        ...     return {"input_ids": [0] * add_special_tokens + [len(w) for w in text.split()]}
        >>> logprob, n_tokens = sentence_logprobs(model, tokenizer, ["a b c", "d e"])
        >>> n_tokens.tolist()
        [3, 2]
    """
    return score_token_ids(
        model, [_ids(tokenizer, t, add_special_tokens=True) for t in texts], None, batch_size
    )


def stereotype_score(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    sent_more: Sequence[str],
    sent_less: Sequence[str],
    batch_size: int = 16,
) -> float:
    """CrowS-Pairs-style score: share of minimal pairs where the more stereotypical sentence is more likely.

    Compares total log-likelihoods (:func:`sentence_logprobs`); an exact tie counts one half. 0.5 means no
    preference; above 0.5 the model prefers the stereotype.

    Args:
        model: Causal LM returning ``.logits``.
        tokenizer: Hugging Face tokenizer.
        sent_more: The more stereotypical sentence of each pair.
        sent_less: The less stereotypical sentence of each pair.
        batch_size: Sequences per forward pass.

    Returns:
        Score in ``[0, 1]`` (``nan`` when there are no pairs).

    Raises:
        ValueError: If the two lists differ in length.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1,
        ...                                      num_attention_heads=2, intermediate_size=8))
        >>> _ = model.lm_head.weight.data.zero_()  # uniform next token: log p = -log(10) for every token
        >>> def tokenizer(text, add_special_tokens=True):  # toy: BOS = 0, then one id per word (its length)
        ...     return {"input_ids": [0] * add_special_tokens + [len(w) for w in text.split()]}
        >>> stereotype_score(model, tokenizer, ["He is tall", "He is a doctor"], ["She is tall", "She is"])
        0.25
    """
    if len(sent_more) != len(sent_less):
        raise ValueError(f"Got {len(sent_more)} `sent_more` but {len(sent_less)} `sent_less`: give pairs.")
    if not sent_more:
        return math.nan
    logprob = sentence_logprobs(model, tokenizer, list(sent_more) + list(sent_less), batch_size)[0]
    more, less = logprob[: len(sent_more)], logprob[len(sent_more) :]
    wins = (more > less).double() + 0.5 * (more == less).double()
    return float(wins.mean())


def perplexity(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    batch_size: int = 16,
) -> float:
    """Corpus perplexity ``exp(-sum log p / number of scored tokens)`` over all texts (token-weighted).

    Args:
        model: Causal LM returning ``.logits``.
        tokenizer: Hugging Face tokenizer.
        texts: Strings to score (see :func:`sentence_logprobs` for which tokens count).
        batch_size: Sequences per forward pass.

    Returns:
        Perplexity (``nan`` when no token is scored).

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1,
        ...                                      num_attention_heads=2, intermediate_size=8))
        >>> _ = model.lm_head.weight.data.zero_()  # uniform next token: log p = -log(10) for every token
        >>> def tokenizer(text, add_special_tokens=True):  # toy: BOS = 0, then one id per word (its length)
        ...     return {"input_ids": [0] * add_special_tokens + [len(w) for w in text.split()]}
        >>> round(perplexity(model, tokenizer, ["a b c", "d e"]), 6)  # uniform over 10 tokens
        10.0
    """
    logprob, n_tokens = sentence_logprobs(model, tokenizer, texts, batch_size)
    total = int(n_tokens.sum())
    if total == 0:
        return math.nan
    return math.exp(-float(logprob.sum()) / total)
