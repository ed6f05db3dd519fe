"""The ``icp`` command: LightningCLI for fit/validate/test/predict, plus ``attribute`` and ``prune``.

``icp fit --config configs/quickstart.yaml`` trains :class:`~icp_lightning.module.ICPContrastiveModule` on an
:class:`~icp_lightning.data.ICPDataModule` with the attribution and pruning callbacks configured under the
``attribution:`` and ``pruning:`` keys (both optional), and prints a before/after reliability table.

``icp attribute`` scores a model (a Lightning checkpoint, or a hub/local Hugging Face model) on named data sets
and writes a report (scores ``.pt``, JSON summary, heatmap PNG); ``icp prune`` applies a score file to a model
with a threshold or an amount and saves the pruned (optionally slimmed) model. Both take ``--help``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from jsonargparse import CLI
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from icp_lightning.callbacks import CausalAttributionCallback, CausalPruningCallback
from icp_lightning.callbacks.refit import HeadRefitCallback
from icp_lightning.callbacks.report import ReliabilityReport
from icp_lightning.data import ICPDataModule
from icp_lightning.module import ICPContrastiveModule


class ICPLightningCLI(LightningCLI):
    """LightningCLI with the two ICP callbacks as optional top-level config groups.

    The data module's evaluation set names are linked to the module's ``eval_sets``, so metrics are logged as
    ``val/<set>/<metric>`` with the names the data module gives.
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(CausalAttributionCallback, "attribution", required=False)
        parser.add_lightning_class_args(CausalPruningCallback, "pruning", required=False)
        parser.add_lightning_class_args(HeadRefitCallback, "refit", required=False)
        parser.add_lightning_class_args(ReliabilityReport, "report", required=False)
        parser.link_arguments("data.eval_set_names", "model.eval_sets", apply_on="instantiate")


def _load_model(model: str, num_labels: int) -> tuple[torch.nn.Module, Any]:
    """A Lightning checkpoint of ICPContrastiveModule, or a hub/local Hugging Face model."""
    if model.endswith(".ckpt"):
        module = ICPContrastiveModule.load_from_checkpoint(model, map_location="cpu")
        return module.hf_model, module
    import transformers

    hf = transformers.AutoModelForSequenceClassification.from_pretrained(model, num_labels=num_labels)
    return hf, None


def attribute(
    model: str,
    data: ICPDataModule,
    out: str = "icp_report",
    datasets: Sequence[str] | None = None,
    dataset_weights: dict[str, float] | None = None,
    interventions: Sequence[Literal["mask", "scale", "swap", "mean"]] = ("mask",),
    metric: str = "label_logprob",
    method: Literal["exact", "gradient", "screened"] = "gradient",
    granularity: Literal["neuron", "head"] = "neuron",
    target_modules: str | list[str] | None = None,
    reduction: Literal["signed", "abs"] = "signed",
    max_batches: int | None = 8,
    num_labels: int = 2,
    top_k: int = 20,
) -> None:
    """Score a model's features on named data sets and write a report.

    Args:
        model: a ``.ckpt`` of ICPContrastiveModule, or a hub name / local folder of a Hugging Face classifier.
        data: the data module (its evaluation sets are the data sets).
        out: report folder: ``scores.pt``, ``scores.json``, ``heatmap.png``, ``effects_<set>.pt``.
        datasets: which evaluation sets to use (default: all).
        dataset_weights: e.g. ``{"id": 1, "ood": -1}`` (with ``reduction="signed"``).
        interventions: interventions to combine.
        metric: the metric m (``label_logprob``, ``accuracy``, ...).
        method: ``exact``, ``gradient`` or ``screened``.
        granularity: ``neuron`` or ``head``.
        target_modules: sites (default: the architecture's FFN and attention output projections).
        reduction: ``signed`` or ``abs``.
        max_batches: batches per data set.
        num_labels: for a Hugging Face model given by name.
        top_k: features listed in the JSON summary.
    """
    from icp_lightning.callbacks.attribution import _heatmap
    from icp_lightning.core.effects import causal_effects
    from icp_lightning.core.scores import spuriousness
    from icp_lightning.core.sites import find_sites

    hf, _ = _load_model(model, num_labels)
    data.setup("fit")
    loaders = data.attribution_dataloaders(list(datasets) if datasets else None)
    sites = find_sites(hf, target_modules=target_modules, granularity=granularity)
    effects: dict[tuple[str, str, str], Any] = {}
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, loader in loaders.items():
        for iv in interventions:
            eff = causal_effects(hf, loader, sites, iv, metric, method, max_batches=max_batches)
            eff.save(out_dir / f"effects_{name}_{iv}.pt")
            effects[(iv, metric, name)] = eff
    scores = spuriousness(effects, dataset_weights=dataset_weights, reduction=reduction)
    scores.save(out_dir / "scores.pt")
    scores.to_json(out_dir / "scores.json", k=top_k)
    fig = _heatmap(scores, f"spuriousness ({reduction})")
    fig.savefig(out_dir / "heatmap.png", dpi=120, bbox_inches="tight")
    print(json.dumps(scores.summary(top_k)["top"][:top_k], indent=1))
    print(f"wrote {out_dir}/scores.pt, scores.json, heatmap.png")


def prune(
    model: str,
    scores: str,
    out: str = "icp_pruned",
    threshold: float | None = None,
    amount: float | None = None,
    granularity: Literal["neuron", "head"] = "neuron",
    slim_model: bool = False,
    num_labels: int = 2,
) -> None:
    """Apply a score file to a model and save the pruned (optionally slimmed) model.

    Args:
        model: a ``.ckpt`` of ICPContrastiveModule, or a hub name / local folder of a Hugging Face classifier.
        scores: a ``scores.pt`` written by ``icp attribute`` or the attribution callback.
        out: output folder (``save_pretrained`` format; with ``slim_model`` also ``icp_slim.json``).
        threshold: prune features whose score exceeds this.
        amount: prune this fraction (< 1) or count (>= 1) of the top-scored features.
        granularity: the granularity the scores were computed at.
        slim_model: physically remove the pruned neurons/heads (see ``icp_lightning.slim``).
        num_labels: for a Hugging Face model given by name.
    """
    from icp_lightning.core.masks import apply_masks, make_permanent, save_slimmed, slim
    from icp_lightning.core.scores import Scores
    from icp_lightning.core.sites import find_sites

    if (threshold is None) == (amount is None):
        raise ValueError("give exactly one of --threshold or --amount")
    hf, _ = _load_model(model, num_labels)
    sc = Scores.load(scores)
    sites = find_sites(hf, target_modules=list(sc), granularity=granularity)
    flat = sc.flat()
    if threshold is not None:
        cut = float(threshold)
        chosen = flat > cut
    else:
        assert amount is not None
        k = int(round(amount * flat.numel())) if amount < 1 else int(amount)
        chosen = torch.zeros_like(flat, dtype=torch.bool)
        chosen[torch.argsort(torch.nan_to_num(flat, nan=float("-inf")), descending=True)[:k]] = True
    values, start = {}, 0
    for name in sc:
        n = sites[name].n_features
        values[name] = (~chosen[start : start + n]).float()
        start += n
    apply_masks(hf, sites, values)
    pruned = int(chosen.sum())
    print(f"pruned {pruned} of {flat.numel()} features ({100 * pruned / max(flat.numel(), 1):.1f}%)")
    if slim_model:
        slim(hf)
        save_slimmed(hf, out)
    else:
        make_permanent(hf)
        hf.save_pretrained(out)  # type: ignore[operator]
    print(f"wrote {out}")


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of the ``icp`` console script."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] in ("attribute", "prune"):
        CLI({"attribute": attribute, "prune": prune}, args=argv)
        return
    ICPLightningCLI(
        ICPContrastiveModule,
        ICPDataModule,
        args=argv,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"parser_mode": "omegaconf"} if _has_omegaconf() else None,
    )


def _has_omegaconf() -> bool:
    try:
        import omegaconf  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    main()
