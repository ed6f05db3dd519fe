"""Last-layer refit against scikit-learn's logistic regression on the same frozen features."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from icp_lightning.core.reweight import find_head, head_features, refit_head
from tests.conftest import tiny_batch, tiny_model

sklearn_lm = pytest.importorskip("sklearn.linear_model")


@pytest.mark.parametrize("l2", [0.5, 4.0])
def test_refit_head_equals_sklearn(l2):
    model = tiny_model("bert")
    batches = [tiny_batch("bert", n=16, seed=s) for s in range(3)]
    name, head = find_head(model)
    assert name == "classifier"
    x, y = head_features(model, batches, head)
    info = refit_head(model, batches, l2=l2, max_iter=2000)
    assert info["n_examples"] == 48
    # two-class softmax with an L2 penalty on both rows == binary logistic regression with C = 2 / l2
    ref = sklearn_lm.LogisticRegression(C=2.0 / l2, class_weight="balanced", tol=1e-10, max_iter=10000)
    ref.fit(x.numpy(), y.numpy())
    with torch.no_grad():
        ours = torch.softmax(head(x), -1)[:, 1].numpy()
    np.testing.assert_allclose(ours, ref.predict_proba(x.numpy())[:, 1], atol=1e-3)

    # and ours is at least as good an optimum of the shared objective (scikit-learn stops a little earlier)
    def objective(weight, bias):
        n = len(y)
        w = (n / (2 * torch.bincount(y, minlength=2).double()))[y]
        ce = torch.nn.functional.cross_entropy(x.double() @ weight.t() + bias, y, reduction="none")
        return float((ce * w).sum() / n + l2 / (2 * n) * (weight**2).sum())

    beta, c = torch.tensor(ref.coef_[0]).double(), float(ref.intercept_[0])
    sk = objective(torch.stack([-beta / 2, beta / 2]), torch.tensor([-c / 2, c / 2]).double())
    assert objective(head.weight.double(), head.bias.double()) <= sk + 1e-9
    # and the model itself now predicts with the refitted head
    with torch.no_grad():
        logits = model(input_ids=batches[0]["input_ids"], attention_mask=batches[0]["attention_mask"]).logits
    np.testing.assert_allclose(torch.softmax(logits, -1)[:, 1].numpy(), ours[:16], atol=1e-5)


def test_refit_errors():
    model = tiny_model("bert")
    with pytest.raises(ValueError, match="no batches"):
        refit_head(model, [])
    with pytest.raises(ValueError, match="l2"):
        refit_head(model, [tiny_batch("bert")], l2=-1)
    bad = tiny_batch("bert")
    bad["labels"] = torch.full_like(bad["labels"], 5)
    with pytest.raises(ValueError, match="labels must lie"):
        refit_head(model, [bad])
