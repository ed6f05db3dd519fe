"""A word-level tokenizer over a small fixed vocabulary, for tests of causal-LM code on tiny random models."""

from __future__ import annotations

from typing import Any

from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

#: Shared words; id = position. ``<pad>`` 0, ``<s>`` 1 (BOS), ``<unk>`` 2.
WORDS = (
    "<pad> <s> <unk> the a is was he she doctor nurse tall short sky blue green red yes no "
    "question answer : ? . water wet fire hot cold dog cat runs sleeps"
).split()
BOS = 1


def word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """Whitespace-split words to ids (``words`` in id order, starting with ``WORDS``'s three specials); ``<s>``
    is prepended to every text."""
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", unk_token="<unk>", pad_token="<pad>"
    )


def tiny_llama(words: list[str]) -> Any:
    """A seeded 2-layer random Llama over ``words`` (GQA: 4 query, 2 key/value heads), in evaluation mode."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(words), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=24, pad_token_id=0, bos_token_id=BOS, eos_token_id=2,
        initializer_range=0.3,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()
