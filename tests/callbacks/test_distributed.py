"""Both ICP callbacks in real two-process CPU runs (gloo): DDP, FSDP2 (``ModelParallelStrategy`` +
``fully_shard``) and FSDP1 (Lightning's ``FSDPStrategy``, made to run on CPU: see ``_cpu_fsdp1_strategy`` in the
worker).

Each run (``tests/callbacks/_dist_worker.py``, started in a subprocess because Lightning relaunches the script
for rank 1) fits a tiny BERT for 3 epochs with attribution + pruning after every epoch; the attribution data
(3 batches per data set) is split unevenly, 2 batches on rank 0 and 1 on rank 1. Checked here, per round:
both ranks hold bit-identical effects, scores and masks; the effects equal a single-process
``causal_effects`` over all batches of the very model state the round scored (masks folded), the scores equal
``spuriousness`` of those, and the masks equal ``select_masks`` of those scores; at the end, the masks on the
model equal the callback's and the pruned columns of the effective weights are zero on every rank. The FSDP1 run
also folds the masks at the end (``make_permanent=True``): then no mask is left and the pruned columns of every
rank's written-back weights are zero.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from icp_lightning.callbacks import select_masks
from icp_lightning.core.effects import causal_effects
from icp_lightning.core.masks import apply_masks, load_masks_state, make_permanent
from icp_lightning.core.scores import spuriousness
from icp_lightning.core.sites import find_sites
from tests.callbacks._dist_worker import INTERVENTIONS, N_VAL, ROUNDS, VAL_BATCH
from tests.callbacks._helpers import (
    TinyClassifier,
    one_thread,  # noqa: F401  (autouse fixture)
    tiny_bert,
)

ROOT = Path(__file__).resolve().parents[2]


def _run_worker(kind: str, out: Path, method: str = "exact") -> list[dict]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for key in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "PL_GLOBAL_SEED"):
        env.pop(key, None)
    # A new session, so that on a hang both ranks (Lightning starts rank 1 itself) are killed, not only rank 0.
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.callbacks._dist_worker", kind, str(out), method],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"{kind} worker hung (a collective that only some ranks joined?):\n{stderr[-5000:]}")
    assert proc.returncode == 0, stdout[-3000:] + stderr[-5000:]
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert all(r["world_size"] == 2 for r in ranks)
    return ranks


def _reference_round(out: Path, round_index: int, method: str = "exact", masks=None):
    """One process, all batches: effects and scores of the state round ``round_index`` was computed on, with the
    masks of the rounds before (``masks``). The checkpointed weights carry the pruning; under FSDP1 pruned
    columns may have drifted since the last epoch end (the guard keeps them out of every forward), and the
    attribution re-zeroes them, so the reference folds the masks in again."""
    model = tiny_bert().eval()
    state = torch.load(out / f"round{round_index}_state.pt", weights_only=True)
    load_masks_state(model, state)
    if masks:
        apply_masks(model, find_sites(model), masks)
    make_permanent(model)  # what the forward computed
    sites = find_sites(model)
    val = TinyClassifier(n_val=N_VAL, val_batch=VAL_BATCH).val_dataloader()
    effects = {}
    for ds, dl in val.items():
        batches = list(dl)
        assert len(batches) == 3
        for iv in INTERVENTIONS:
            effects[(iv, "label_logprob", ds)] = causal_effects(
                model, batches, sites, iv, method=method, progress=False
            )
    scores = spuriousness(effects, dataset_weights={"id": 1.0, "ood": -1.0}, reduction="signed")
    return effects, scores


def _check(kind: str, out: Path, ranks: list[dict], method: str = "exact", folded: bool = False) -> None:
    r0, r1 = ranks
    assert len(r0["rounds"]) == len(r1["rounds"]) == ROUNDS
    previous = None
    for index, (a, b) in enumerate(zip(r0["rounds"], r1["rounds"]), start=1):
        # identical on both ranks, bit for bit
        for part in ("sums", "counts"):
            for name in a["scores"][part]:
                assert torch.equal(a["scores"][part][name], b["scores"][part][name]), (kind, index, name)
        for key in a["effects"]:
            for name in a["effects"][key]["sums"]:
                assert torch.equal(a["effects"][key]["sums"][name], b["effects"][key]["sums"][name])
                assert torch.equal(a["effects"][key]["counts"][name], b["effects"][key]["counts"][name])
        for name in a["masks"]:
            assert torch.equal(a["masks"][name], b["masks"][name]), (kind, index, name)

        # equal to one process over the same examples
        effects, scores = _reference_round(out, index, method, previous)
        for (iv, metric, ds), eff in effects.items():
            got = a["effects"][f"{iv}|{metric}|{ds}"]
            for name in eff.sums:
                assert torch.equal(got["counts"][name], eff.counts[name])  # all examples, from both ranks
                assert int(got["counts"][name][0]) == N_VAL
                # float32 forwards: bit-equal under DDP here; FSDP2's gathered parameters take other kernels
                torch.testing.assert_close(got["sums"][name], eff.sums[name], rtol=1e-5, atol=1e-5)
        for name in scores.sums:
            torch.testing.assert_close(a["scores"]["sums"][name], scores.sums[name], rtol=1e-5, atol=1e-6)
        current = previous or {n: torch.ones(v.numel()) for n, v in scores.sums.items()}
        expected = select_masks(scores, current, amount=0.1)
        for name in expected:
            assert torch.equal(a["masks"][name], expected[name]), (kind, index, name)
        previous = a["masks"]

    assert previous is not None
    pruned = sum(int((m == 0).sum()) for m in previous.values())
    assert pruned == 14 + 12 + 11  # round(0.1 * remaining) per round over 138 features
    for rank in ranks:
        assert rank["site_names"] == list(previous)  # names as without any wrapper
        assert set(rank["model_masks"]) == (set() if folded else set(previous))
        for name, mask in previous.items():
            if not folded:
                assert torch.equal(rank["model_masks"][name], mask)
            assert rank["pruned_max"][name] == 0.0


@pytest.mark.slow
def test_ddp_two_processes_match_each_other_and_one_process(tmp_path):
    ranks = _run_worker("ddp", tmp_path)
    assert ranks[0]["strategy"] == "DDPStrategy"
    _check("ddp", tmp_path, ranks)


@pytest.mark.slow
def test_fsdp2_fully_shard_two_processes_match_each_other_and_one_process(tmp_path):
    ranks = _run_worker("fsdp2", tmp_path)
    assert ranks[0]["strategy"] == "ModelParallelStrategy"
    _check("fsdp2", tmp_path, ranks)


@pytest.mark.slow
def test_fsdp2_gradient_method_backward_inside_the_gathered_parameters(tmp_path):
    """The gradient method runs a backward per batch: FSDP2 must neither reshard nor reduce-scatter there,
    or the rank with more batches waits forever for the other's all-gather."""
    ranks = _run_worker("fsdp2", tmp_path, "gradient")
    _check("fsdp2-gradient", tmp_path, ranks, "gradient")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kind", "method"), [("fsdp1", "exact"), ("fsdp1", "gradient"), ("fsdp1-configure_model", "exact")]
)
def test_fsdp1_strategy_two_processes_match_each_other_and_one_process(tmp_path, kind, method):
    """Lightning's FSDPStrategy (FSDP1, ``use_orig_params=True``) on CPU, in its two layouts: ``fsdp1``, the
    strategy's auto-wrap policy (the LightningModule in a root wrapper, each BertLayer in its own unit);
    ``fsdp1-configure_model``, the module wraps each layer and then the HF model itself (``pl_module.model`` is a
    wrapper). The ranks do different numbers of forwards (and backwards, for the gradient method) inside
    ``summon_full_params``: a wrapper forward there would all-gather and hang."""
    ranks = _run_worker(kind, tmp_path, method)
    assert ranks[0]["strategy"] == "CPUFSDPStrategy"
    # 2 encoder layers + the root (the LightningModule's or the HF model's)
    assert ranks[0]["fsdp1_wrappers"] == 3
    _check(f"{kind}-{method}", tmp_path, ranks, method, folded=True)
