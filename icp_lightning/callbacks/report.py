"""A before/after table of the logged evaluation metrics, printed at the end of fit.

Example:
    >>> report = ReliabilityReport(keys=("acc", "ece"))
    >>> report._rows = [("epoch 0 (before ICP)", {"val/id/acc": 0.95, "val/ood/acc": 0.04, "val/id/ece": 0.02}),
    ...                 ("epoch 1", {"val/id/acc": 0.90, "val/ood/acc": 0.61, "val/id/ece": 0.05})]
    >>> print(report.table())  # doctest: +NORMALIZE_WHITESPACE
    | epoch | id acc | id ece | ood acc |
    |---|---|---|---|
    | epoch 0 (before ICP) | 95.0 | 0.020 | 4.0 |
    | epoch 1 | 90.0 | 0.050 | 61.0 |
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override


class ReliabilityReport(Callback):
    """Collect ``val/<set>/<key>`` metrics after every validation and print them as a table when fit ends.

    The first row is the model before any attribution round ran ("before ICP"), the last the final model, so
    the table reads as before/after. The table is also written to ``reliability_report.md`` / ``.json`` in the
    trainer's log directory.

    Args:
        keys: which metric keys to show per evaluation set (``acc``, ``ece``, ``nll``, ``worst_group_acc``,
            ``reliance_changed`` / ``reliance_prob_change`` logged by :class:`TokenRepairCallback`, ...).
        prefix: the logging prefix of the evaluation metrics.
        filename: base name of the files written (``None``: write nothing).
    """

    def __init__(
        self,
        keys: Sequence[str] = ("acc", "ece", "worst_group_acc", "reliance_changed"),
        prefix: str = "val",
        filename: str | None = "reliability_report",
    ) -> None:
        if isinstance(keys, str) or not keys:
            raise ValueError(
                f"keys must be a non-empty list of metric names such as ['acc', 'ece'], got {keys!r}"
            )
        self.keys = tuple(keys)
        self.prefix = prefix
        self.filename = filename
        self._rows: list[tuple[str, dict[str, float]]] = []

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Not on_validation_epoch_end: callbacks run that hook before the LightningModule logs its metrics.
        if trainer.sanity_checking:
            return
        metrics = {
            k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(self.prefix + "/")
        }
        if not metrics:
            return
        label = f"epoch {trainer.current_epoch}"
        if not self._rows:
            label += " (before ICP)" if getattr(pl_module, "icp_scores", None) is None else ""
        self._rows.append((label, metrics))

    def table(self) -> str:
        """The collected rows as a markdown table (accuracies in %, calibration errors to 3 decimals)."""
        columns: list[tuple[str, str]] = []
        for _, metrics in self._rows:
            for key in metrics:
                parts = key.split("/")
                if len(parts) >= 3 and parts[-1] in self.keys:
                    col = ("/".join(parts[1:-1]), parts[-1])
                    if col not in columns:
                        columns.append(col)
        columns.sort(key=lambda c: (c[0], self.keys.index(c[1])))
        head = "| epoch | " + " | ".join(f"{s} {k.replace('_', ' ')}" for s, k in columns) + " |"
        lines = [head, "|" + "---|" * (len(columns) + 1)]
        for label, metrics in self._rows:
            cells = []
            for s, k in columns:
                v = metrics.get(f"{self.prefix}/{s}/{k}")
                if v is None:
                    cells.append("")
                elif "acc" in k:
                    cells.append(f"{100 * v:.1f}")
                else:
                    cells.append(f"{v:.3f}")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    @override
    @rank_zero_only
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._rows:
            return
        text = self.table()
        print("\nReliability before / after ICP (accuracies in %):\n" + text + "\n", flush=True)
        if self.filename and trainer.log_dir:
            out = Path(trainer.log_dir)
            out.mkdir(parents=True, exist_ok=True)
            (out / f"{self.filename}.md").write_text(text + "\n")
            (out / f"{self.filename}.json").write_text(json.dumps(self._rows, indent=2))

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"rows": [[label, metrics] for label, metrics in self._rows]}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._rows = [(str(label), {k: float(v) for k, v in m.items()}) for label, m in state_dict["rows"]]
