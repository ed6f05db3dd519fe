"""Last-layer reweighting: refit the classification head on a small held-out set (DFR-style).

After ICP has pruned the features that carry a shortcut, the head's input still mixes what is left; refitting
only the head (an L2-regularised logistic regression on frozen features) on a small group-balanced held-out
split is the step that "deep feature reweighting" (Kirichenko et al., 2023) takes on an unpruned model. Guided
by the causal scores (prune first, then refit), it removes more of the shortcut than either step alone (see
``benchmarks/results/reliability.md``).

Written by hand (a few lines of L-BFGS) rather than with scikit-learn so that ``core`` stays pure torch and the
fit runs on the model's device; ``tests/core/test_reweight.py`` checks it against scikit-learn.

Example:
    >>> import torch, transformers
    >>> cfg = transformers.BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1,
    ...                               num_attention_heads=2, intermediate_size=8)
    >>> model = transformers.BertForSequenceClassification(cfg).eval()
    >>> find_head(model)[0]
    'classifier'
    >>> batch = {"input_ids": torch.randint(1, 30, (16, 5)), "labels": torch.arange(16) % 2}
    >>> info = refit_head(model, [batch], l2=1.0)
    >>> sorted(info)
    ['head', 'loss', 'n_examples', 'train_acc']
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from icp_lightning.core.interventions import model_inputs

#: Head module names by architecture: the final linear layer that maps features to class logits.
HEAD_NAMES = ("classifier.out_proj", "classifier", "score", "out_proj")


def find_head(model: nn.Module) -> tuple[str, nn.Linear]:
    """The classification head: a known head name, else the last ``nn.Linear`` with ``num_labels`` outputs.

    Raises:
        ValueError: no such layer; the message lists the linear layers.
    """
    modules = dict(model.named_modules())
    num_labels = getattr(getattr(model, "config", None), "num_labels", None)
    for suffix in HEAD_NAMES:
        for name, module in modules.items():
            if (name == suffix or name.endswith("." + suffix)) and isinstance(module, nn.Linear):
                if num_labels is None or module.out_features == num_labels:
                    return name, module
    linears = [(n, m) for n, m in modules.items() if isinstance(m, nn.Linear)]
    for name, module in reversed(linears):
        if num_labels is not None and module.out_features == num_labels:
            return name, module
    raise ValueError(
        f"cannot find the classification head (a Linear with num_labels={num_labels} outputs); linear layers: "
        f"{[n for n, _ in linears][-10:]}"
    )


@torch.no_grad()
def head_features(
    model: nn.Module, batches: Iterable[Mapping[str, Any]], head: nn.Module
) -> tuple[torch.Tensor, torch.Tensor]:
    """The head's input features and the labels over ``batches`` (model in eval mode)."""
    xs: list[torch.Tensor] = []
    ys: list[torch.Tensor] = []
    store: dict[str, torch.Tensor] = {}
    handle = head.register_forward_pre_hook(lambda m, a: store.__setitem__("x", a[0].detach()))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for batch in batches:
            batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
            model(**model_inputs(model, batch))
            x = store["x"]
            if (
                x.dim() == 3
            ):  # heads that read a sequence (GPT-2/LLaMA score layers): take what the model pools
                raise ValueError("refit_head supports heads that read one vector per example (BERT-style)")
            xs.append(x.float())
            ys.append(batch["labels"].long())
    finally:
        handle.remove()
        model.train(was_training)
    if not xs:
        raise ValueError("refit_head got no batches")
    return torch.cat(xs), torch.cat(ys)


def refit_head(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    l2: float = 1.0,
    max_iter: int = 200,
    balance: bool = True,
    head: str | None = None,
) -> dict[str, Any]:
    """Refit the classification head on ``batches``: multinomial logistic regression with an L2 penalty.

    Minimises ``mean_i w_i * CE(W x_i + b, y_i) + l2 / (2 n) * ||W||^2`` by L-BFGS (the scikit-learn objective
    with ``C = 1 / l2``, up to the 1/n scaling), with class-balanced weights ``w`` when ``balance``.

    Args:
        model: the classifier; its head is overwritten in place.
        batches: dicts with model inputs and ``labels`` (e.g. a small group-balanced held-out split).
        l2: the L2 strength (``1 / C`` of scikit-learn).
        max_iter: L-BFGS iterations.
        balance: weight classes equally.
        head: the head module's name (default: :func:`find_head`).

    Returns:
        ``{"head", "n_examples", "loss", "train_acc"}``.
    """
    if l2 < 0:
        raise ValueError(f"l2 must be >= 0, got {l2}")
    name, module = (head, dict(model.named_modules())[head]) if head else find_head(model)
    if not isinstance(module, nn.Linear):
        raise ValueError(f"the head {name!r} must be an nn.Linear, got {type(module).__name__}")
    x, y = head_features(model, batches, module)
    n, d = x.shape
    c = module.out_features
    if int(y.max()) >= c or int(y.min()) < 0:
        raise ValueError(f"labels must lie in [0, {c}), got range [{int(y.min())}, {int(y.max())}]")
    counts = torch.bincount(y, minlength=c).float()
    w_ex = (n / (c * counts.clamp_min(1)))[y] if balance else torch.ones(n, device=x.device)
    weight = torch.zeros(c, d, dtype=torch.float64, device=x.device, requires_grad=True)
    bias = torch.zeros(c, dtype=torch.float64, device=x.device, requires_grad=True)
    xd, wd = x.double(), w_ex.double()
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, tolerance_grad=1e-9,
                            tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")  # fmt: skip

    def closure() -> torch.Tensor:
        opt.zero_grad()
        logits = xd @ weight.t() + bias
        loss = (F.cross_entropy(logits, y, reduction="none") * wd).sum() / n + l2 / (2 * n) * (
            weight**2
        ).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        logits = xd @ weight.t() + bias
        loss = (F.cross_entropy(logits, y, reduction="none") * wd).sum() / n + l2 / (2 * n) * (
            weight**2
        ).sum()
        module.weight.copy_(weight.to(module.weight.dtype))
        if module.bias is not None:
            module.bias.copy_(bias.to(module.bias.dtype))
        acc = float((logits.argmax(-1) == y).double().mean())
    return {"head": name, "n_examples": n, "loss": float(loss), "train_acc": acc}
