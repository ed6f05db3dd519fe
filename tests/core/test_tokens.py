"""Token discovery against a planted trigger and a naive count; input-token masks against replaced ids."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import transformers

from icp_lightning.core.counterfactuals import TokenEditCounterfactual
from icp_lightning.core.tokens import discover_tokens, mask_input_tokens
from tests.core.test_counterfactuals import (
    SPECIAL,
    TRIGGER,
    ffn_sites,
    planted_scores,
    trigger_batch,
    trigger_bert,
)


class _FixedEdits:
    """A stand-in inverse that edits given positions (to check the counting against a hand count)."""

    def __init__(self, positions: list[list[list[int]]]) -> None:
        self.positions = iter(positions)

    def build(self, model: Any, batch: Any, scores: Any, sites: Any) -> Any:
        class _Out:
            info = {"edited_positions": next(self.positions)}

        return _Out()


def test_discovery_finds_the_planted_trigger() -> None:
    model = trigger_bert()
    batch = trigger_batch()
    cf = TokenEditCounterfactual(max_edits=1, replace_id=4, candidates=2, tau_c=0.5, atol=1e-3,
                                 special_token_ids=SPECIAL)  # fmt: skip
    found = discover_tokens(model, [batch, batch], planted_scores(), ffn_sites(model), cf,
                            special_token_ids=SPECIAL)  # fmt: skip
    assert [d.token_id for d in found if d.discovered] == [TRIGGER]
    top = found[0]
    assert (top.token_id, top.edited, top.present, top.total) == (TRIGGER, 4, 4, 6)
    assert top.rate == 1.0


def test_discovery_counts_like_a_naive_loop() -> None:
    ids = torch.tensor([[2, 5, 6, 5, 3], [2, 6, 7, 3, 0], [2, 8, 6, 3, 0], [2, 9, 9, 3, 0]])
    batch = {"input_ids": ids, "attention_mask": (ids != 0).long()}
    edits = [[[1], [1], [], [1, 2]]]  # token 5; token 6; nothing; token 9 (twice in one sentence counts once)
    found = discover_tokens(None, [batch], {}, None, _FixedEdits(edits), min_share=0.25, min_rate=0.5,  # type: ignore[arg-type]
                            special_token_ids=[0, 2, 3])  # fmt: skip
    table = {d.token_id: (d.edited, d.present, d.discovered) for d in found}
    # naive: token 6 is in 3 sentences, edited in 1 -> rate 1/3 < 0.5: not discovered
    assert table == {5: (1, 1, True), 6: (1, 3, False), 9: (1, 1, True)}
    assert [d.token_id for d in found] == [5, 6, 9]
    with pytest.raises(ValueError, match="min_share and min_rate"):
        discover_tokens(None, [], {}, None, None, min_rate=2.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no examples"):
        discover_tokens(None, [], {}, None, None)  # type: ignore[arg-type]


def _bert() -> transformers.BertForSequenceClassification:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=8, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip
    return transformers.BertForSequenceClassification(cfg).eval()


def test_masked_tokens_read_as_the_mask_token_through_training_and_remove() -> None:
    model = _bert()
    ids = torch.tensor([[2, 7, 5, 9, 3], [2, 5, 6, 8, 3]])
    replaced = torch.where((ids == 7) | (ids == 9), torch.full_like(ids, 4), ids)
    before = model(input_ids=ids).logits.detach()
    handle = mask_input_tokens(model, [7, 9], mask_id=4)
    torch.testing.assert_close(model(input_ids=ids).logits, model(input_ids=replaced).logits)
    # training cannot bring the tokens back: their embedding rows are never read
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    model.train()
    for _ in range(3):
        loss = model(input_ids=ids, labels=torch.tensor([1, 0])).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    assert model.get_input_embeddings().weight.grad[7].abs().sum() == 0  # type: ignore[union-attr]
    torch.testing.assert_close(model(input_ids=ids).logits, model(input_ids=replaced).logits)
    handle.remove()
    fresh = _bert()
    torch.testing.assert_close(fresh(input_ids=ids).logits, before)
    with pytest.raises(ValueError, match=r"must be in \[0, 30\)"):
        mask_input_tokens(model, [31], mask_id=4)
    with pytest.raises(ValueError, match="get_input_embeddings"):
        mask_input_tokens(torch.nn.Linear(2, 2), [1], mask_id=0)


def test_deleted_tokens_equal_inputs_written_without_them() -> None:
    model = _bert()
    ids = torch.tensor([[2, 7, 5, 9, 3, 0], [2, 5, 6, 8, 3, 0], [2, 7, 7, 7, 3, 0]])
    attention = (ids != 0).long()
    types = torch.zeros_like(ids)
    handle = mask_input_tokens(model, [7, 9], mode="delete")
    got = model(input_ids=ids, attention_mask=attention, token_type_ids=types).logits
    handle.remove()
    for row in range(3):  # naive: each sentence rewritten without the tokens, alone (no padding)
        kept = [t for t in ids[row].tolist() if t not in (7, 9, 0)]
        want = model(input_ids=torch.tensor([kept])).logits
        torch.testing.assert_close(got[row : row + 1], want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="mode must be"):
        mask_input_tokens(model, [7], mode="cut")
    with pytest.raises(ValueError, match="needs mask_id"):
        mask_input_tokens(model, [7])
