"""Argument checks of :class:`~icp_lightning.module.ICPContrastiveModule`, run in its ``__init__`` before the
model loads (so a bad argument fails in a second, not after a download or a fit)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from icp_lightning.models import TASKS

__all__ = ["check_module_args", "check_more_module_args"]


def check_module_args(
    task: str,
    num_labels: int,
    kl_weight: float,
    kl_schedule: Any,
    kl_warmup_steps: int,
    kl_direction: str,
    temperature: float,
) -> None:
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if task == "sequence_classification" and (not isinstance(num_labels, int) or num_labels < 2):
        raise ValueError(f"num_labels must be an int >= 2 for sequence_classification, got {num_labels!r}")
    if not isinstance(kl_weight, (int, float)) or kl_weight < 0 or math.isnan(kl_weight):
        raise ValueError(f"kl_weight must be a number >= 0, got {kl_weight!r}")
    if not callable(kl_schedule) and kl_schedule not in ("constant", "linear_warmup"):
        raise ValueError(
            f"kl_schedule must be 'constant', 'linear_warmup' or a callable, got {kl_schedule!r}"
        )
    if kl_warmup_steps < 0:
        raise ValueError(f"kl_warmup_steps must be >= 0, got {kl_warmup_steps}")
    if kl_direction not in ("forward", "reverse", "symmetric"):
        raise ValueError(f"kl_direction must be 'forward', 'reverse' or 'symmetric', got {kl_direction!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")


def check_more_module_args(
    tau_c: float | None,
    top_k_c: int | None,
    lr_scheduler_interval: str,
    eval_sets: Sequence[str],
    num_groups: int | None,
) -> None:
    if top_k_c is not None and top_k_c < 0:
        raise ValueError(f"top_k_c must be >= 0 or None, got {top_k_c}")
    if lr_scheduler_interval not in ("step", "epoch"):
        raise ValueError(f"lr_scheduler_interval must be 'step' or 'epoch', got {lr_scheduler_interval!r}")
    if isinstance(eval_sets, str) or not eval_sets:
        raise ValueError(
            f"eval_sets must be a non-empty list of names (one per dataloader), got {eval_sets!r}"
        )
    bad = [n for n in eval_sets if not isinstance(n, str) or not n or "." in n]
    if bad or len(set(eval_sets)) != len(eval_sets):
        raise ValueError(f"eval_sets must be unique non-empty names without '.', got {list(eval_sets)}")
    if num_groups is not None and num_groups < 1:
        raise ValueError(f"num_groups must be >= 1 or None, got {num_groups}")
