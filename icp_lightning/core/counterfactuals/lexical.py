"""Given counterfactuals: x' carried by the batch (paired inputs) or made by a word-pair lexicon (he <-> she).

Neither needs spuriousness scores.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

from icp_lightning.core.counterfactuals.base import CounterfactualOutput
from icp_lightning.core.interventions import counterfactual_batch
from icp_lightning.core.sites import Sites


class PairedCounterfactual:
    """x' is carried by the batch under ``cf_`` keys (``cf_input_ids``, ``cf_attention_mask``, ...).

    Works without scores. Entries without a ``cf_`` twin (labels, token types) are copied from x.

    Example:
        >>> batch = {"input_ids": torch.tensor([[1, 2]]), "cf_input_ids": torch.tensor([[1, 3]])}
        >>> PairedCounterfactual().build(None, batch).batch["input_ids"]
        tensor([[1, 3]])
    """

    def build(
        self,
        model: nn.Module | None,
        batch: Mapping[str, Any],
        scores: Mapping[str, torch.Tensor] | None = None,
        sites: Sites | None = None,
    ) -> CounterfactualOutput:
        """The batch's own counterfactual inputs."""
        return CounterfactualOutput(batch=counterfactual_batch(batch), info={})


#: Gendered word pairs, each swapped both ways. A word already mapped keeps its first partner, so ``her``
#: becomes ``his`` (not ``him``) and ``him`` becomes ``her``.
DEFAULT_GENDER_LEXICON: list[tuple[str, str]] = [
    ("he", "she"),
    ("his", "her"),
    ("him", "her"),
    ("himself", "herself"),
    ("man", "woman"),
    ("men", "women"),
    ("boy", "girl"),
    ("boys", "girls"),
    ("male", "female"),
    ("males", "females"),
    ("father", "mother"),
    ("fathers", "mothers"),
    ("dad", "mom"),
    ("son", "daughter"),
    ("sons", "daughters"),
    ("brother", "sister"),
    ("brothers", "sisters"),
    ("husband", "wife"),
    ("husbands", "wives"),
    ("boyfriend", "girlfriend"),
    ("uncle", "aunt"),
    ("nephew", "niece"),
    ("grandfather", "grandmother"),
    ("king", "queen"),
    ("kings", "queens"),
    ("gentleman", "lady"),
    ("gentlemen", "ladies"),
    ("mr", "mrs"),
    ("sir", "madam"),
]


def swap_map(lexicon: Mapping[str, str] | Sequence[tuple[str, str]]) -> dict[str, str]:
    """A lower-case ``word -> word`` map applying each pair both ways (first mapping of a word wins).

    Example:
        >>> swap_map([("he", "she"), ("his", "her"), ("him", "her")])
        {'he': 'she', 'she': 'he', 'his': 'her', 'her': 'his', 'him': 'her'}
    """
    pairs = list(lexicon.items()) if isinstance(lexicon, Mapping) else list(lexicon)
    out: dict[str, str] = {}
    for pair in pairs:
        if len(pair) != 2 or not all(isinstance(w, str) and w.strip() for w in pair):
            raise ValueError(f"each lexicon entry must be a pair of non-empty words, got {pair!r}")
        a, b = pair[0].strip().lower(), pair[1].strip().lower()
        out.setdefault(a, b)
        out.setdefault(b, a)
    return out


def swap_words(text: str, mapping: Mapping[str, str]) -> str:
    """Swap whole words of ``text`` by ``mapping`` (case-insensitive, keeping UPPER / Title case).

    Example:
        >>> swap_words("He said his dog likes HIM.", swap_map([("he", "she"), ("his", "her"), ("him", "her")]))
        'She said her dog likes HER.'
    """
    if not mapping:
        return text
    words = sorted(mapping, key=len, reverse=True)
    pattern = re.compile(r"\b(" + "|".join(re.escape(w) for w in words) + r")\b", re.IGNORECASE)

    def repl(match: re.Match[str]) -> str:
        word = match.group(0)
        new = mapping[word.lower()]
        if word.isupper() and len(word) > 1:
            return new.upper()
        if word[0].isupper():
            return new[:1].upper() + new[1:]
        return new

    return pattern.sub(repl, text)


class TokenSwapCounterfactual:
    """x' swaps the words of a lexicon (by default gendered pairs: he <-> she, his <-> her, man <-> woman, ...).

    Two ways, chosen by ``mode``:

    - ``"text"``: swap words in the batch's raw strings (``batch[text_key]``, a list of str) and re-tokenise to
      the batch's length (pad / truncate to ``input_ids.shape[1]``); for single-text classification batches.
    - ``"ids"``: map token ids both ways, for every lexicon word that is a single token of the tokenizer (as is,
      capitalised, and with a leading space for BPE vocabularies). Positions and masks are unchanged, so this
      also suits causal-LM batches. Words that are not single tokens are listed in ``info["skipped"]``.
    - ``"auto"`` (default): ``"text"`` when the batch carries ``text_key`` strings, else ``"ids"``.

    Args:
        lexicon: ``{word: word}`` or ``[(word, word), ...]``, applied both ways (see :func:`swap_map`);
            default :data:`DEFAULT_GENDER_LEXICON`.
        tokenizer: the Hugging Face tokenizer of the model (needed in both modes).
        mode: ``"auto"``, ``"text"`` or ``"ids"``.
        text_key: the batch key holding raw strings.

    Works without scores.
    """

    def __init__(
        self,
        lexicon: Mapping[str, str] | Sequence[tuple[str, str]] | None = None,
        tokenizer: Any = None,
        mode: Literal["auto", "text", "ids"] = "auto",
        text_key: str = "text",
    ) -> None:
        if mode not in ("auto", "text", "ids"):
            raise ValueError(f"mode must be 'auto', 'text' or 'ids', got {mode!r}")
        if tokenizer is None:
            raise ValueError(
                "TokenSwapCounterfactual needs the model's tokenizer (tokenizer=AutoTokenizer.from_pretrained(...)) "
                "to re-tokenise swapped text or to find the lexicon's token ids"
            )
        self.mapping = swap_map(DEFAULT_GENDER_LEXICON if lexicon is None else lexicon)
        self.tokenizer = tokenizer
        self.mode = mode
        self.text_key = text_key
        self._id_pairs: dict[int, int] | None = None
        self.skipped: list[str] = []

    def id_map(self) -> dict[int, int]:
        """``token id -> token id`` for every lexicon word that is a single token (cached)."""
        if self._id_pairs is not None:
            return self._id_pairs
        out: dict[int, int] = {}
        skipped = []
        for a, b in self.mapping.items():
            found = False
            for form_a, form_b in ((a, b), (a.capitalize(), b.capitalize()), (" " + a, " " + b)):
                ia = self.tokenizer(form_a, add_special_tokens=False)["input_ids"]
                ib = self.tokenizer(form_b, add_special_tokens=False)["input_ids"]
                if len(ia) == 1 and len(ib) == 1 and ia[0] != ib[0]:
                    if ia[0] == getattr(self.tokenizer, "unk_token_id", None):
                        continue
                    if ib[0] == getattr(self.tokenizer, "unk_token_id", None):
                        continue
                    out.setdefault(int(ia[0]), int(ib[0]))
                    found = True
            if not found:
                skipped.append(a)
        self._id_pairs, self.skipped = out, skipped
        return out

    def build(
        self,
        model: nn.Module | None,
        batch: Mapping[str, Any],
        scores: Mapping[str, torch.Tensor] | None = None,
        sites: Sites | None = None,
    ) -> CounterfactualOutput:
        """The batch with the lexicon's words swapped."""
        ids = batch.get("input_ids")
        if not isinstance(ids, torch.Tensor):
            raise ValueError(f"token swaps need the batch's 'input_ids'; the batch has keys {sorted(batch)}")
        texts = batch.get(self.text_key)
        has_text = isinstance(texts, (list, tuple)) and all(isinstance(s, str) for s in texts)
        mode = self.mode if self.mode != "auto" else ("text" if has_text else "ids")
        if mode == "text":
            if not has_text:
                raise ValueError(
                    f"mode='text' needs the raw strings in batch[{self.text_key!r}] (a list of str); the batch has "
                    f"keys {sorted(batch)}. Keep the text column in the collate function, or use mode='ids'"
                )
            return self._from_text(batch, list(texts), ids)  # type: ignore[arg-type]
        mapping = self.id_map()
        size = max([len(self.tokenizer), int(ids.max()) + 1, *(max(k, v) + 1 for k, v in mapping.items())])
        lut = torch.arange(size, device=ids.device)
        if mapping:
            src = torch.tensor(list(mapping), device=ids.device)
            lut[src] = torch.tensor(list(mapping.values()), device=ids.device)
        new_ids = lut[ids]
        info = {"mode": "ids", "n_swapped": int((new_ids != ids).sum()), "skipped": list(self.skipped)}
        return CounterfactualOutput(batch={**batch, "input_ids": new_ids}, info=info)

    def _from_text(
        self, batch: Mapping[str, Any], texts: list[str], ids: torch.Tensor
    ) -> CounterfactualOutput:
        swapped = [swap_words(s, self.mapping) for s in texts]
        enc = self.tokenizer(
            swapped, padding="max_length", truncation=True, max_length=int(ids.shape[1]), return_tensors="pt"
        )
        out = dict(batch)
        out[self.text_key] = swapped
        for key in ("input_ids", "attention_mask", "token_type_ids"):
            if key in enc and (key == "input_ids" or key in batch):
                ref = batch[key]
                out[key] = enc[key].to(device=ref.device, dtype=ref.dtype)
        info = {"mode": "text", "n_swapped": sum(a != b for a, b in zip(texts, swapped))}
        return CounterfactualOutput(batch=out, info=info)
