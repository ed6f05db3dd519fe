"""Plots and tables of spuriousness scores: the layer x feature heatmap and the top-k table.

Used by :class:`~icp_lightning.callbacks.attribution.CausalAttributionCallback` (TensorBoard image and text) and
by ``icp attribute`` (``heatmap.png``); public so that users can draw their own scores the same way.
"""

from __future__ import annotations

from typing import Any

import torch

from icp_lightning.core.scores import Scores

__all__ = ["add_scores_to_tensorboard", "score_heatmap", "top_table"]


def top_table(scores: Scores, k: int) -> str:
    """The ``k`` highest-scoring features as a Markdown table (rank, site, feature, score).

    Example:
        >>> import torch
        >>> from icp_lightning.core.scores import Scores
        >>> print(top_table(Scores({"a": torch.tensor([0.5, 2.0])}, {"a": torch.ones(2)}), 1))
        | rank | site | feature | score |
        |---:|---|---:|---:|
        | 1 | a | 1 | 2 |
    """
    rows = ["| rank | site | feature | score |", "|---:|---|---:|---:|"]
    for i, (site, feature, value) in enumerate(scores.top_k(k), start=1):
        rows.append(f"| {i} | {site} | {feature} | {value:.6g} |")
    return "\n".join(rows)


def score_heatmap(scores: Scores, title: str) -> Any:
    """A sites x features heatmap of scores (rows padded with NaN to the widest site), as a matplotlib Figure.

    Diverging colours centred on 0 (signed scores: red helps in distribution and hurts out of it). ``None``
    when there is nothing to draw. Used by the attribution callback's TensorBoard image and ``icp attribute``.
    """
    try:
        from matplotlib.figure import Figure
    except Exception:  # pragma: no cover - matplotlib is a dependency
        return None
    names = list(scores)
    if not names:
        return None
    width = max(scores[n].numel() for n in names)
    grid = torch.full((len(names), width), float("nan"))
    for i, n in enumerate(names):
        grid[i, : scores[n].numel()] = scores[n]
    finite = grid[torch.isfinite(grid)]
    bound = float(finite.abs().max()) if finite.numel() else 1.0
    bound = bound if bound > 0 else 1.0
    fig = Figure(figsize=(min(16.0, 2.0 + width / 16), 1.0 + 0.35 * len(names)))
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(
        grid.numpy(), aspect="auto", cmap="coolwarm", vmin=-bound, vmax=bound, interpolation="nearest"
    )
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names, fontsize=6)
    ax.set_xlabel("feature")
    ax.set_title(title)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    return fig


def add_scores_to_tensorboard(experiment: Any, scores: Scores, step: int, k: int, epoch: int) -> None:
    """Log a round of scores to a TensorBoard ``SummaryWriter``: a histogram of each site's finite scores
    (``icp/scores/<site>``), the top-``k`` table (``icp/top_features``) and the heatmap (``icp/score_heatmap``)."""
    for name in scores:
        values = scores[name]
        values = values[torch.isfinite(values)]
        if values.numel():
            experiment.add_histogram(f"icp/scores/{name}", values, global_step=step)
    experiment.add_text("icp/top_features", top_table(scores, k), global_step=step)
    figure = score_heatmap(scores, f"spuriousness scores, epoch {epoch}")
    if figure is not None:
        experiment.add_figure("icp/score_heatmap", figure, global_step=step, close=False)
