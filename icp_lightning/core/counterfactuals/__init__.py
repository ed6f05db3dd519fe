"""Counterfactuals x' of a batch x for the KL term of ICP fine-tuning.

Each strategy is a small object with one method,

    build(model, batch, scores, sites) -> CounterfactualOutput | None

that returns either the ``logits`` of the counterfactual forward (representation-level strategies) or a new
input ``batch`` x' that the caller pushes through the model like any input, plus an ``info`` dict (reconstruction
errors, edited positions, ...). ``None`` means "no counterfactual for this batch" (no spuriousness scores yet,
or no feature selected); the caller then skips the KL term. Any object with such a ``build`` method can be
used in place of the built-in ones.

Built-in strategies, by registry name (see :func:`build_counterfactual`; the registry is in :mod:`.registry`):

- ``"intervention"`` (:mod:`.base`, beside the shared contract): :class:`InterventionCounterfactual`, the model itself under do(h = v) on the spurious
  features (score > ``tau_c`` or the top-k), v from an in-batch partner (swap) or 0 (mask).
- ``"inversion"`` (:mod:`.search`): :class:`InversionCounterfactual`, x' = M^{-1}(M(x | do(h = v))) by optimising the input
  embeddings so that the *unintervened* model reproduces the intervened activations, optionally projected
  onto real tokens.
- ``"token_edit"`` (:mod:`.search`): :class:`TokenEditCounterfactual`, a discrete inverse: greedy HotFlip-style token edits.
- ``"paired"`` (:mod:`.lexical`): :class:`PairedCounterfactual`, x' carried by the batch (``cf_input_ids``, ...).
- ``"token_swap"`` (:mod:`.lexical`): :class:`TokenSwapCounterfactual`, a word-pair lexicon (he <-> she, ...) applied to the
  text or to the token ids.

Example:
    >>> import torch, transformers
    >>> from icp_lightning.core.sites import find_sites
    >>> _ = torch.manual_seed(0)
    >>> cfg = transformers.BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1,
    ...                               num_attention_heads=2, intermediate_size=8)
    >>> model = transformers.BertForSequenceClassification(cfg).eval()
    >>> sites = find_sites(model, target_modules=r".*layer\\.0\\.output\\.dense")
    >>> scores = {"bert.encoder.layer.0.output.dense": torch.tensor([0.0, 0.9, 0.0, 0.0, 0.7, 0.0, 0.0, 0.0])}
    >>> cf = build_counterfactual("intervention", kind="mask", tau_c=0.5)
    >>> out = cf.build(model, {"input_ids": torch.randint(5, 30, (2, 6))}, scores, sites)
    >>> out.logits.shape, out.info["n_features"]
    (torch.Size([2, 2]), 2)
"""

from __future__ import annotations

from icp_lightning.core.counterfactuals.base import (
    CounterfactualKind,
    CounterfactualName,
    CounterfactualOutput,
    CounterfactualStrategy,
    EditKind,
    InterventionCounterfactual,
    Partner,
    Projection,
    eval_mode,
    select_features,
)
from icp_lightning.core.counterfactuals.lexical import (
    DEFAULT_GENDER_LEXICON,
    PairedCounterfactual,
    TokenSwapCounterfactual,
    swap_map,
    swap_words,
)
from icp_lightning.core.counterfactuals.registry import (
    COUNTERFACTUALS,
    build_counterfactual,
    register_counterfactual,
)
from icp_lightning.core.counterfactuals.search import InversionCounterfactual, TokenEditCounterfactual

__all__ = [
    "COUNTERFACTUALS",
    "DEFAULT_GENDER_LEXICON",
    "CounterfactualKind",
    "CounterfactualName",
    "CounterfactualOutput",
    "CounterfactualStrategy",
    "EditKind",
    "InterventionCounterfactual",
    "InversionCounterfactual",
    "PairedCounterfactual",
    "Partner",
    "Projection",
    "TokenEditCounterfactual",
    "TokenSwapCounterfactual",
    "build_counterfactual",
    "eval_mode",
    "register_counterfactual",
    "select_features",
    "swap_map",
    "swap_words",
]
