"""The helpers every benchmark shares."""

from __future__ import annotations

from benchmarks.common import differing_args, method_slug


def test_differing_args_compares_both_runs_keys_outside_the_ignored_ones() -> None:
    stored = {"lr": 1e-4, "seeds": [0], "train": 512, "gone": 1}
    current = {"lr": 1e-4, "seeds": [1, 2], "train": 256, "new": True}
    assert differing_args(stored, current, ("seeds",)) == ["gone", "new", "train"]
    assert differing_args(stored, dict(stored, seeds=[3]), ["seeds"]) == []


def test_method_slug_keeps_letters_and_digits() -> None:
    assert method_slug("ICP repair: discovered words deleted + CE/KL epoch") == (
        "icp_repair__discovered_words_deleted___ce_kl_epoch"
    )
    assert method_slug("(ERM)") == "erm"
