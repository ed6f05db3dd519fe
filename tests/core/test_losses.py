"""Counterfactual KL: each direction against an explicit sum p * log(p / q), masks, gradients, schedules."""

from __future__ import annotations

import math

import pytest
import torch
import transformers

from icp_lightning.core.losses import (
    ICPLoss,
    answer_token_mask,
    counterfactual_kl,
    kl_weight_at,
    total_loss,
)


def kl_by_hand(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def divergence_by_hand(logits: torch.Tensor, cf: torch.Tensor, direction: str, temperature: float) -> float:
    """Mean over rows of the divergence, one row at a time with plain Python floats."""
    total = 0.0
    for row, cf_row in zip(logits.tolist(), cf.tolist()):
        ez = [math.exp(v / temperature) for v in row]
        ecf = [math.exp(v / temperature) for v in cf_row]
        p = [v / sum(ez) for v in ez]
        q = [v / sum(ecf) for v in ecf]
        if direction == "forward":
            total += kl_by_hand(p, q)
        elif direction == "reverse":
            total += kl_by_hand(q, p)
        else:
            m = [(a + b) / 2 for a, b in zip(p, q)]
            total += 0.5 * kl_by_hand(p, m) + 0.5 * kl_by_hand(q, m)
    return total / len(logits)


@pytest.mark.parametrize("direction", ["forward", "reverse", "symmetric"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_classification_kl_matches_explicit_sum(direction: str, temperature: float) -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    cf = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    got = counterfactual_kl(logits, cf, direction, temperature)  # type: ignore[arg-type]
    assert float(got) == pytest.approx(divergence_by_hand(logits, cf, direction, temperature), rel=1e-5)


def test_directions_differ_and_js_is_bounded() -> None:
    logits = torch.tensor([[4.0, 0.0, 0.0]])
    cf = torch.tensor([[0.0, 0.0, 4.0]])
    fwd = counterfactual_kl(logits, cf, "forward")
    rev = counterfactual_kl(cf, logits, "reverse")
    assert torch.isclose(fwd, rev)  # KL(p||q) written both ways
    js = counterfactual_kl(logits, cf, "symmetric")
    assert 0 < float(js) <= math.log(2) + 1e-6
    assert torch.isclose(js, counterfactual_kl(cf, logits, "symmetric"))
    assert float(counterfactual_kl(logits, logits)) == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("direction", ["forward", "reverse", "symmetric"])
def test_token_level_averages_over_masked_positions(direction: str) -> None:
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 6, generator=gen, dtype=torch.float64)
    cf = torch.randn(2, 4, 6, generator=gen, dtype=torch.float64)
    labels = torch.tensor([[-100, -100, 3, 4], [-100, 5, 1, -100]])
    mask = answer_token_mask(labels)
    assert mask.tolist() == [[False, True, True, False], [True, True, False, False]]
    rows = [(b, t) for b in range(2) for t in range(4) if mask[b, t]]
    expected = sum(
        divergence_by_hand(logits[b, t][None], cf[b, t][None], direction, 1.0) for b, t in rows
    ) / len(rows)
    got = counterfactual_kl(logits, cf, direction, mask=mask)  # type: ignore[arg-type]
    assert float(got) == pytest.approx(expected, rel=1e-6)


def test_cf_mask_aligns_answers_of_different_offsets() -> None:
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(1, 5, 4, generator=gen)
    cf = torch.randn(1, 5, 4, generator=gen)
    mask = torch.tensor([[False, False, True, True, False]])
    cf_mask = torch.tensor([[False, True, True, False, False]])  # a prompt one token shorter
    got = counterfactual_kl(logits, cf, mask=mask, cf_mask=cf_mask)
    expected = counterfactual_kl(logits[0, 2:4], cf[0, 1:3])
    assert torch.isclose(got, expected)
    with pytest.raises(ValueError, match="compared positions differ"):
        counterfactual_kl(logits, cf, mask=mask, cf_mask=torch.ones(1, 5, dtype=torch.bool))


def test_empty_mask_gives_zero_with_a_graph() -> None:
    logits = torch.randn(1, 3, 4, requires_grad=True)
    out = counterfactual_kl(logits, torch.randn(1, 3, 4), mask=torch.zeros(1, 3, dtype=torch.bool))
    assert float(out.detach()) == 0.0
    out.backward()
    assert logits.grad is not None


@pytest.mark.parametrize("direction", ["forward", "reverse", "symmetric"])
def test_gradients_reach_both_branches_unless_detached(direction: str) -> None:
    logits = torch.tensor([[1.0, -1.0, 0.5]], requires_grad=True)
    cf = torch.tensor([[0.0, 2.0, -0.5]], requires_grad=True)
    counterfactual_kl(logits, cf, direction).backward()  # type: ignore[arg-type]
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    assert cf.grad is not None and cf.grad.abs().sum() > 0

    logits.grad, cf.grad = None, None
    counterfactual_kl(logits, cf, direction, detach_cf=True).backward()  # type: ignore[arg-type]
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    assert cf.grad is None


def test_gradients_reach_inputs_embeds_of_x_and_x_prime_through_a_model() -> None:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8
    )
    model = transformers.BertForSequenceClassification(cfg).eval()
    ids = torch.randint(1, 20, (2, 5))
    emb = model.get_input_embeddings()
    x = emb(ids).detach().requires_grad_(True)
    x_cf = emb(ids.flip(1)).detach().requires_grad_(True)
    kl = counterfactual_kl(model(inputs_embeds=x).logits, model(inputs_embeds=x_cf).logits)
    kl.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert x_cf.grad is not None and x_cf.grad.abs().sum() > 0

    x.grad = None
    x_cf.grad = None
    kl = counterfactual_kl(model(inputs_embeds=x).logits, model(inputs_embeds=x_cf).logits, detach_cf=True)
    kl.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert x_cf.grad is None


def test_total_loss_and_icp_loss() -> None:
    task = torch.tensor(0.7, requires_grad=True)
    assert total_loss(task, torch.tensor(3.0), 0.0) is task
    assert total_loss(task, None, 1.0) is task
    assert float(total_loss(task, torch.tensor(3.0), 0.5).detach()) == pytest.approx(2.2)
    loss = ICPLoss(direction="reverse", temperature=2.0)
    logits, cf = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    total, kl = loss(task, logits, cf, weight=2.0)
    assert kl is not None
    assert float(kl) == pytest.approx(divergence_by_hand(logits, cf, "reverse", 2.0), rel=1e-6)
    assert float(total.detach()) == pytest.approx(0.7 + 2.0 * float(kl))
    assert loss(task, logits, None, weight=2.0) == (task, None)


def test_schedules() -> None:
    assert kl_weight_at(0, 1.5) == 1.5
    assert [kl_weight_at(s, 1.0, "linear_warmup", 2) for s in range(3)] == [0.5, 1.0, 1.0]
    assert kl_weight_at(10, 1.0, "linear_warmup", 0) == 1.0
    assert kl_weight_at(3, 2.0, lambda step: 0.25 * step) == 1.5
    assert kl_weight_at(3, 0.0, lambda step: 1.0) == 0.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"direction": "sideways"}, "direction must be one of"),
        ({"temperature": 0.0}, "temperature must be > 0"),
    ],
)
def test_bad_arguments_say_what_is_allowed(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        counterfactual_kl(torch.zeros(1, 2), torch.zeros(1, 2), **kwargs)
    with pytest.raises(ValueError, match=match):
        ICPLoss(**kwargs)


def test_shape_errors() -> None:
    with pytest.raises(ValueError, match="same rank"):
        counterfactual_kl(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="pass mask=None"):
        counterfactual_kl(torch.zeros(2, 3), torch.zeros(2, 3), mask=torch.ones(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="kl_schedule must be one of"):
        kl_weight_at(0, 1.0, "cosine", 3)  # type: ignore[arg-type]
