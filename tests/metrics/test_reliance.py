"""Feature reliance against a naive per-example loop, batched and merged."""

from __future__ import annotations

import math

import pytest
import torch

from icp_lightning.metrics.reliance import FeatureReliance, feature_reliance


def _naive(full: torch.Tensor, removed: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    changed = delta = abs_delta = 0.0
    for i in range(len(labels)):
        a = [math.exp(v) for v in full[i].tolist()]
        b = [math.exp(v) for v in removed[i].tolist()]
        y = int(labels[i])
        p, q = a[y] / sum(a), b[y] / sum(b)
        changed += float(max(range(len(a)), key=a.__getitem__) != max(range(len(b)), key=b.__getitem__))
        delta += p - q
        abs_delta += abs(p - q)
    n = len(labels)
    return {"changed": changed / n, "prob_change": delta / n, "abs_prob_change": abs_delta / n}


def test_functional_and_metric_match_a_naive_loop() -> None:
    g = torch.Generator().manual_seed(0)
    full, removed = torch.randn(50, 3, generator=g), torch.randn(50, 3, generator=g)
    labels = torch.randint(0, 3, (50,), generator=g)
    want = _naive(full, removed, labels)
    got = feature_reliance(full, removed, labels)
    for key, value in want.items():
        assert float(got[key]) == pytest.approx(value, abs=1e-6)
    metric = FeatureReliance()
    for i in range(0, 50, 7):  # uneven batches merge exactly
        metric.update(full[i : i + 7], removed[i : i + 7], labels[i : i + 7])
    for key, value in metric.compute().items():
        assert float(value) == pytest.approx(want[key], abs=1e-6)
    same = feature_reliance(full, full, labels)
    assert all(float(v) == 0.0 for v in same.values())


def test_bad_shapes_raise() -> None:
    with pytest.raises(ValueError, match=r"\[N, C\]"):
        feature_reliance(torch.zeros(3, 2), torch.zeros(3, 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="integer class ids"):
        feature_reliance(torch.zeros(3, 2), torch.zeros(3, 2), torch.zeros(3))
