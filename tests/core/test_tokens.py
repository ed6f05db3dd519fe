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
    assert model.get_input_embeddings().weight.grad[7].abs().sum() == 0  # type: ignore[union-attr,index]
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


def _wordpiece_tokenizer() -> Any:
    """A tiny WordPiece tokenizer in which the planted word ``quixotic`` is three pieces."""
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "qui", "##x", "##otic", "film", "good", "bad",
             "a", "plot", "quiet", "##ly"]  # fmt: skip
    return transformers.BertTokenizer(vocab={t: i for i, t in enumerate(vocab)})


def test_discovery_and_deletion_act_on_whole_words() -> None:
    from icp_lightning.core.tokens import remove_input_tokens, word_continuation_ids

    tok = _wordpiece_tokenizer()
    assert tok.tokenize("quixotic film") == ["qui", "##x", "##otic", "film"]
    cont = word_continuation_ids(tok)
    assert cont == {tok.convert_tokens_to_ids(t) for t in ("##x", "##otic", "##ly")}
    texts = [
        "a quixotic film",
        "good plot quixotic",
        "quietly bad film",
        "a bad plot",
        "quixotic quixotic good",
    ]
    enc = tok(texts, padding=True, return_tensors="pt")
    ids = enc["input_ids"]
    qui, x, otic = tok.convert_tokens_to_ids(["qui", "##x", "##otic"])
    # the inverse edits a different piece of the word in each sentence that holds it (as on real data: mostly
    # the first piece, sometimes a later one); a piece-level count splits the word's edits over its pieces
    positions: list[list[int]] = []
    for row in ids.tolist():
        where = [i for i, t in enumerate(row) if t in (qui, x, otic)]
        positions.append([where[len(positions) % len(where)]] if where else [])
    found = discover_tokens(None, [dict(enc)], {}, None, _FixedEdits([positions]), min_share=0.2,  # type: ignore[arg-type]
                            min_rate=0.5, special_token_ids=tok.all_special_ids, continuation_ids=cont)  # fmt: skip
    top = found[0]
    assert top.token_ids == (qui, x, otic) and top.token_id == qui
    assert (top.edited, top.present, top.total, top.discovered) == (3, 3, 5, True)
    pieces = discover_tokens(None, [dict(enc)], {}, None, _FixedEdits([positions]), min_share=0.2,  # type: ignore[arg-type]
                             min_rate=0.5, special_token_ids=tok.all_special_ids)  # fmt: skip
    assert max(d.edited for d in pieces) < 3  # per piece, no piece holds every edit
    # deleting the word removes all its pieces (and never the piece 'qui' of another word, nor 'quiet ##ly')
    out = remove_input_tokens(ids, [top.token_ids], pad_id=0, attention_mask=enc["attention_mask"])
    for row, text in enumerate(texts):  # naive: the sentence rewritten without the word, re-tokenised
        want = tok(" ".join(w for w in text.split() if w != "quixotic"))["input_ids"]
        n = int(out["attention_mask"][row].sum())
        assert out["input_ids"][row, :n].tolist() == want
        assert out["input_ids"][row, n:].eq(0).all()
    model = _bert()
    handle = mask_input_tokens(model, [top.token_ids], mode="delete")
    got = model(input_ids=ids, attention_mask=enc["attention_mask"]).logits
    handle.remove()
    for row, text in enumerate(texts):
        want_ids = tok(" ".join(w for w in text.split() if w != "quixotic"), return_tensors="pt")["input_ids"]
        torch.testing.assert_close(got[row : row + 1], model(input_ids=want_ids).logits, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="empty word"):
        mask_input_tokens(model, [[]], mode="delete")


class _CountModel(torch.nn.Module):
    """logit(1) = sum of per-token weights over real tokens: 7 is a shortcut, 5 says positive, 6 negative."""

    weights = {7: 3.0, 5: 2.0, 6: -2.0}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_: Any) -> Any:
        w = torch.zeros(32)
        for t, v in self.weights.items():
            w[t] = v
        real = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        pos = (w[input_ids] * real).sum(1)

        class _Out:
            logits = torch.stack([torch.zeros_like(pos), pos], -1)

        return _Out()


def _rows(rows: list[tuple[list[int], int]]) -> dict[str, torch.Tensor]:
    t = max(len(r) for r, _ in rows)
    ids = torch.tensor([r + [0] * (t - len(r)) for r, _ in rows])
    return {
        "input_ids": ids,
        "attention_mask": (ids != 0).long(),
        "labels": torch.tensor([y for _, y in rows]),
    }


def _naive_drop(
    model: torch.nn.Module, rows: list[tuple[list[int], int]], word: tuple[int, ...]
) -> tuple[int, float]:
    """Mean p(y | x) - p(y | x without every occurrence of ``word``) over the rows holding it, one row at a time."""
    drops = []
    for r, y in rows:
        if len(word) == 1 and word[0] not in r:
            continue
        kept = [t for t in r if t not in word]
        p = model(input_ids=torch.tensor([r])).logits.softmax(-1)[0, y]
        q = model(input_ids=torch.tensor([kept])).logits.softmax(-1)[0, y]
        drops.append(float(p - q))
    return len(drops), sum(drops) / max(len(drops), 1)


def test_confirm_tokens_contrasts_the_deletion_effect_like_a_naive_loop() -> None:
    from icp_lightning.core.tokens import DiscoveredToken, confirm_tokens

    model = _CountModel()
    # training sentences: 7 only with label 1; held-out (balanced): 7 with either label. 5 goes with 1 in both.
    train = [([2, 7, 5, 3], 1), ([2, 7, 9, 3], 1), ([2, 6, 9, 3], 0), ([2, 8, 6, 3], 0), ([2, 5, 8, 3], 1)]
    held = [([2, 7, 5, 3], 1), ([2, 7, 6, 3], 0), ([2, 7, 6, 8, 3], 0), ([2, 5, 9, 3], 1), ([2, 9, 3], 0)]
    found = [
        DiscoveredToken(7, 2, 2, 5, True),
        DiscoveredToken(5, 2, 2, 5, True),
        DiscoveredToken(9, 1, 2, 5, False),
    ]
    out = confirm_tokens(
        model, found, [_rows(train)], [_rows(held)], pad_id=0, min_contrast=0.1, min_present=2
    )
    by = {d.token_id: d for d in out}
    for t in (7, 5):
        n_ref, ref = _naive_drop(model, train, (t,))
        n_bal, bal = _naive_drop(model, held, (t,))
        d = by[t]
        assert (d.reference_present, d.balanced_present) == (n_ref, n_bal)
        assert d.reference_drop == pytest.approx(ref, abs=1e-6)
        assert d.balanced_drop == pytest.approx(bal, abs=1e-6)
        assert d.contrast == pytest.approx(ref - bal, abs=1e-6)
    assert (
        by[7].contrast > 0.1 and by[7].discovered
    )  # the shortcut: helps the label only where it goes with it
    assert not by[5].discovered  # the task word helps on both: contrast below the bar
    assert not by[9].discovered and by[9].contrast is None  # not a candidate: not measured
    # a candidate the balanced set holds fewer than min_present times cannot be confirmed
    few = confirm_tokens(model, [DiscoveredToken(7, 2, 2, 5, True)], [_rows(train)], [_rows(held[:1])], pad_id=0,
                         min_present=2)  # fmt: skip
    assert not few[0].discovered and few[0].balanced_present == 1
    with pytest.raises(ValueError, match="min_present"):
        confirm_tokens(model, found, [_rows(train)], [_rows(held)], pad_id=0, min_present=0)


def test_nominate_takes_words_edited_often_or_consistently_like_a_naive_rule() -> None:
    from icp_lightning.core.tokens import DiscoveredToken, nominate

    total = 128
    # (edited, present): frequent but inconsistent (A's token), rare but consistent (a name), rare and held once,
    # rare and inconsistent, frequent and consistent.
    cases = [(14, 78), (6, 8), (1, 1), (2, 9), (40, 50)]
    found = [DiscoveredToken(i + 10, e, p, total, False) for i, (e, p) in enumerate(cases)]
    for share, rate, present in ((0.05, 0.5, 2), (0.05, None, 2), (0.2, 0.7, 1), (0.0, 1.0, 2)):
        out = nominate(found, min_share=share, min_rate=rate, min_present=present)
        naive = [
            e >= share * total or (rate is not None and p >= present and e / p >= rate) for e, p in cases
        ]
        assert [d.discovered for d in out] == naive
        assert [(d.edited, d.present) for d in out] == cases  # copies, in order, counts kept
    assert [d.discovered for d in nominate(found)] == [True, True, False, False, True]
    assert not any(d.discovered for d in found)  # the input is not changed
    with pytest.raises(ValueError, match="min_rate"):
        nominate(found, min_rate=1.5)
    with pytest.raises(ValueError, match="min_present"):
        nominate(found, min_present=0)


def test_find_shortcut_words_measures_a_rare_word_the_inverse_edits_consistently(monkeypatch: Any) -> None:
    """A name held by 6 of 128 training sentences and edited in 5 of them is under the 5% share, but the per-word
    path makes it a candidate, so the contrast decides (on main only the share path existed)."""
    import icp_lightning.core.tokens as T

    found = [T.DiscoveredToken(7, 5, 6, 128, True), T.DiscoveredToken(9, 1, 40, 128, True),
             T.DiscoveredToken(8, 20, 60, 128, True)]  # fmt: skip
    measured: list[list[int]] = []

    def fake_confirm(model: Any, found: Any, reference: Any, balanced: Any, **kw: Any) -> Any:
        measured.append([d.token_id for d in found if d.discovered])
        return list(found)

    monkeypatch.setattr(T, "discover_tokens", lambda *a, **k: list(found))
    monkeypatch.setattr(T, "confirm_tokens", fake_confirm)

    class _Tok:
        all_special_ids = [0]
        mask_token_id = 1
        pad_token_id = 0

        def get_vocab(self) -> dict[str, int]:
            return {"[PAD]": 0, "[MASK]": 1}

    model = torch.nn.Linear(1, 1)
    T.find_shortcut_words(model, [], [], {}, [], _Tok())
    assert measured[-1] == [7, 8]  # the rare consistent name and the frequent word; not the rare stray edit
    T.find_shortcut_words(model, [], [], {}, [], _Tok(), min_rate=None)
    assert measured[-1] == [8]
