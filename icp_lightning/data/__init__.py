"""ICPDataModule: Hugging Face text data sets (offline recipes, local files or the hub) for ICP.

The data module loads a training split and named evaluation sets (``id``, ``ood``, ``clean``, ...),
checks them (columns, labels, empty texts), tokenises them with ``datasets.map`` (cached by fingerprint)
and pads each batch on the right. It can plant a *shortcut*: a spurious token correlated with the label at
a chosen rate, with evaluation sets where the correlation holds (``id``), is reversed (``ood``) or is absent
(``clean``), so a shortcut's harm and its removal are measurable. :func:`plant_shortcut` is the same
transform as a pure function.

Batches are dicts of tensors::

    input_ids       [B, T] int64, right padded with the tokenizer's pad id
    attention_mask  [B, T] int64 (0 on padding)
    token_type_ids  [B, T] int64 (when the tokenizer makes them)
    labels          [B]    int64
    group           [B]    int64 (shortcut: 2 * label + has_token; or the group_column's ids)
    cf_input_ids    [B, T] int64, padded to the same T (paired counterfactual text, when there is one)
    cf_attention_mask / cf_token_type_ids  [B, T]

With ``task="causal_lm"`` the data are text for a causal language model: a prompt and an answer
(``prompt_column`` / ``answer_column``), or one text (``text_column`` alone) that is all answer. Then
``labels`` are token labels::

    labels          [B, T] int64: the token id on answer tokens, -100 on the prompt, special tokens and padding
    cf_labels       [B, T] int64 (with a counterfactual): the same for the counterfactual row

so the loss and the KL of :class:`~icp_lightning.module.ICPContrastiveModule` (``task="causal_lm"``) and the
``target_logprob`` metric of the attribution engine count answer tokens only. A minimal pair (CrowS-Pairs'
``sent_more`` / ``sent_less``: ``text_column`` and ``cf_text_column``) is two whole sentences, each all
answer.

Example:
    >>> dm = ICPDataModule("minilm", recipe="imdb_sample", shortcut_token="zeugma", batch_size=4, max_length=32)
    >>> dm.eval_set_names
    ['id', 'ood', 'clean']
    >>> dm.setup()
    >>> batch = next(iter(dm.train_dataloader()))
    >>> sorted(batch)  # doctest: +NORMALIZE_WHITESPACE
    ['attention_mask', 'cf_attention_mask', 'cf_input_ids', 'cf_token_type_ids', 'group', 'input_ids',
     'labels', 'token_type_ids']
    >>> batch["input_ids"].shape == batch["cf_input_ids"].shape
    True
    >>> pairs = ICPDataModule("smollm2", recipe="crows_pairs", task="causal_lm", train_split="test")  # doctest: +SKIP
"""

from __future__ import annotations

from icp_lightning.data.checks import DataTask
from icp_lightning.data.collate import ICPCollator, PairLabels
from icp_lightning.data.module import ICPDataModule
from icp_lightning.data.planting import ShortcutMode, ShortcutPosition, insert_token, plant_shortcut
from icp_lightning.data.sources import FileFormat

__all__ = [
    "DataTask",
    "FileFormat",
    "ICPCollator",
    "ICPDataModule",
    "PairLabels",
    "ShortcutMode",
    "ShortcutPosition",
    "insert_token",
    "plant_shortcut",
]
