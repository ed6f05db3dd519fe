"""Two CPU processes (gloo): the Metric classes reduce exactly to the single-process value on all the data."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from fairlearn.metrics import MetricFrame
from fairlearn.metrics import demographic_parity_difference as fl_demographic_parity_difference
from fairlearn.metrics import equal_opportunity_difference as fl_equal_opportunity_difference
from sklearn.metrics import accuracy_score
from torchmetrics.functional.classification import multiclass_calibration_error

from icp_lightning.metrics import (
    CounterfactualFlipRate,
    DemographicParityDifference,
    EqualOpportunityDifference,
    ExpectedCalibrationError,
    GroupAccuracy,
    ReliabilityMetrics,
    WorstGroupAccuracy,
    counterfactual_flip_rate,
    demographic_parity_difference,
    equal_opportunity_difference,
    expected_calibration_error,
    group_accuracies,
    worst_group_accuracy,
)

WORLD_SIZE = 2
NUM_GROUPS = 3
N = 203
SPLIT = 71  # rank 0 gets 71 examples, rank 1 the other 132


def _all_data():
    g = torch.Generator().manual_seed(1234)
    groups = torch.randint(0, NUM_GROUPS, (N,), generator=g)
    groups[:SPLIT][groups[:SPLIT] == 2] = 0  # group 2 never appears on rank 0
    target = torch.randint(0, 2, (N,), generator=g)
    preds = (torch.rand(N, generator=g) < torch.tensor([0.2, 0.5, 0.8])[groups]).long()
    cf_preds = torch.where(torch.rand(N, generator=g) < 0.25, 1 - preds, preds)
    logits = torch.randn(N, 2, generator=g) * 2
    cf_logits = logits + torch.randn(N, 2, generator=g)
    return preds, target, groups, cf_preds, logits, cf_logits


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE)
    try:
        preds, target, groups, cf_preds, logits, cf_logits = _all_data()
        shard = slice(0, SPLIT) if rank == 0 else slice(SPLIT, N)
        preds, target, groups = preds[shard], target[shard], groups[shard]
        cf_preds, logits, cf_logits = cf_preds[shard], logits[shard], cf_logits[shard]
        probs = logits.softmax(-1)
        metrics = {
            "dp": DemographicParityDifference(NUM_GROUPS),
            "eo": EqualOpportunityDifference(NUM_GROUPS),
            "ga": GroupAccuracy(NUM_GROUPS),
            "wga": WorstGroupAccuracy(NUM_GROUPS),
            "flip": CounterfactualFlipRate(),
            "ece": ExpectedCalibrationError(n_bins=8),
        }
        reliability = ReliabilityMetrics(num_classes=2, num_groups=NUM_GROUPS, counterfactual=True, n_bins=8)
        half = len(preds) // 2
        for s in (slice(0, half), slice(half, None)):  # two updates per rank
            metrics["dp"].update(preds[s], groups[s])
            metrics["eo"].update(preds[s], target[s], groups[s])
            metrics["ga"].update(preds[s], target[s], groups[s])
            metrics["wga"].update(preds[s], target[s], groups[s])
            metrics["flip"].update(preds[s], cf_preds[s])
            metrics["ece"].update(probs[s], target[s])
            reliability.update(logits[s], target[s], groups=groups[s], cf_logits=cf_logits[s])
        results = {name: metric.compute() for name, metric in metrics.items()}
        results.update({f"rel/{k}": v for k, v in reliability.compute().items()})
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_gloo_reduction_equals_single_process(tmp_path: Path) -> None:
    # fork: the children inherit the imported modules instead of importing torch/torchmetrics again (seconds)
    mp.start_processes(
        _worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=True, start_method="fork"
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD_SIZE)]

    preds, target, groups, cf_preds, logits, cf_logits = _all_data()
    probs = logits.softmax(-1)
    expected = {
        "dp": demographic_parity_difference(preds, groups),
        "eo": equal_opportunity_difference(preds, target, groups),
        "ga": group_accuracies(preds, target, groups, NUM_GROUPS),
        "wga": worst_group_accuracy(preds, target, groups),
        "flip": counterfactual_flip_rate(preds, cf_preds),
        "ece": expected_calibration_error(probs, target, n_bins=8),
    }
    for results in ranks:
        for name, value in expected.items():
            torch.testing.assert_close(results[name], value, msg=f"{name} differs from single-process")

    # outside references on all the data
    y, p, grp = target.numpy(), preds.numpy(), groups.numpy()
    fl_dp = fl_demographic_parity_difference(y, p, sensitive_features=grp)
    fl_eo = fl_equal_opportunity_difference(y, p, sensitive_features=grp)
    by_group = MetricFrame(metrics=accuracy_score, y_true=y, y_pred=p, sensitive_features=grp).by_group
    tm_ece = multiclass_calibration_error(probs, target, num_classes=2, n_bins=8).item()
    logit_pred = logits.argmax(-1)
    for results in ranks:
        assert results["dp"].item() == pytest.approx(fl_dp, abs=1e-6)
        assert results["eo"].item() == pytest.approx(fl_eo, abs=1e-6)
        assert results["wga"].item() == pytest.approx(by_group.min(), abs=1e-6)
        for g in range(NUM_GROUPS):
            assert results["ga"][g].item() == pytest.approx(by_group[g], abs=1e-6)
        assert results["ece"].item() == pytest.approx(
            multiclass_calibration_error(probs, target, num_classes=2, n_bins=8).item(), abs=1e-5
        )
        # ReliabilityMetrics reduces too
        assert results["rel/acc"].item() == pytest.approx(accuracy_score(y, logit_pred.numpy()), abs=1e-6)
        assert results["rel/ece"].item() == pytest.approx(tm_ece, abs=1e-5)
        nll = torch.nn.functional.cross_entropy(logits.double(), target).item()
        assert results["rel/nll"].item() == pytest.approx(nll, abs=1e-5)
        assert results["rel/dp_diff"].item() == pytest.approx(
            fl_demographic_parity_difference(y, logit_pred.numpy(), sensitive_features=grp), abs=1e-6
        )
        flips = (logit_pred != cf_logits.argmax(-1)).double().mean().item()
        assert results["rel/flip_rate"].item() == pytest.approx(flips, abs=1e-6)
