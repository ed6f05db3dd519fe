"""The ``icp`` command: LightningCLI for fit/validate/test/predict, plus ``attribute`` and ``prune``.

``icp fit --config configs/quickstart.yaml`` trains :class:`~icp_lightning.module.ICPContrastiveModule` on an
:class:`~icp_lightning.data.ICPDataModule` with the attribution and pruning callbacks configured under the
``attribution:`` and ``pruning:`` keys (both optional), and prints a before/after reliability table.

``icp attribute`` scores a model (a checkpoint of any ``icp fit``, a local Hugging Face folder, an offline alias
such as ``minilm``, or a hub name) on named data sets and writes a report (scores ``.pt``, JSON summary, heatmap
PNG); ``icp prune`` applies a score file to a model with a threshold or an amount and saves the pruned
(optionally slimmed) model. Both take ``--help``. Imports wait for the subcommand, so ``icp --help`` is quick.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from icp_lightning.core.choices import (  # plain typing: no heavy import
    AttributionPartner,
    Granularity,
    InterventionKind,
    Method,
    Reduction,
    Scope,
)

if TYPE_CHECKING:  # the heavy imports wait for a subcommand: `icp --help` answers at once
    import torch

    from icp_lightning.data import ICPDataModule

#: ``icp`` subcommands and one line each, for the top-level help.
SUBCOMMANDS: dict[str, str] = {
    "fit": "train ICPContrastiveModule on an ICPDataModule with the attribution / pruning callbacks",
    "validate": "evaluate a model on the evaluation sets",
    "test": "test a model on the evaluation sets",
    "predict": "predict with a model",
    "attribute": "score a model's features on named data sets: scores.pt, scores.json, heatmap.png",
    "prune": "apply a score file to a model and save the pruned (optionally slimmed) model",
}

HELP = (
    "usage: icp [-h] {" + ",".join(SUBCOMMANDS) + "} ...\n\n"
    "Intervention-Based Causal Pruning (ICP) for Hugging Face models, with PyTorch Lightning.\n\n"
    "subcommands (`icp <subcommand> --help` lists its options):\n"
    + "".join(f"  {name:<10} {text}\n" for name, text in SUBCOMMANDS.items())
    + "\nexample: icp fit --config configs/quickstart.yaml\n"
)


@functools.cache
def _cli_class() -> Any:
    from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

    from icp_lightning.callbacks import CausalAttributionCallback, CausalPruningCallback
    from icp_lightning.callbacks.refit import HeadRefitCallback
    from icp_lightning.callbacks.report import ReliabilityReport

    class ICPLightningCLI(LightningCLI):
        """LightningCLI with the ICP callbacks as optional top-level config groups.

        The data module's evaluation set names are linked to the module's ``eval_sets``, so metrics are logged
        as ``val/<set>/<metric>`` with the names the data module gives.
        """

        def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
            parser.add_lightning_class_args(CausalAttributionCallback, "attribution", required=False)
            parser.add_lightning_class_args(CausalPruningCallback, "pruning", required=False)
            parser.add_lightning_class_args(HeadRefitCallback, "refit", required=False)
            parser.add_lightning_class_args(ReliabilityReport, "report", required=False)
            parser.link_arguments("data.eval_set_names", "model.eval_sets", apply_on="instantiate")

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            given = kwargs.get("args")
            self._argv = [str(a) for a in given] if isinstance(given, (list, tuple)) else sys.argv[1:]
            super().__init__(*args, **kwargs)

        def before_instantiate_classes(self) -> None:
            # A callback group that no config file and no flag names was not asked for: do not add it (a
            # config without `pruning:` must not build a CausalPruningCallback with neither threshold nor
            # amount). A group given with its default values (`refit: {dataset: heldout}`) is built.
            parser = self._parser(self.subcommand)
            asked = _groups_asked_for(self._argv)
            for key in parser.callback_keys:
                group = (parser.groups or {}).get(key)
                if group is not None and key not in asked:
                    group.instantiate_class = _skip_group  # type: ignore[attr-defined]

        def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Any]) -> Any:
            return super()._instantiate_trainer(config, [cb for cb in callbacks if cb is not None])

    return ICPLightningCLI


def _groups_asked_for(argv: Sequence[str]) -> set[str]:
    """Top-level keys that the ``--config`` files of ``argv`` hold or that a flag names (``--refit.l2``,
    ``--refit=...``): the callback groups the user asked for."""
    import yaml

    asked: set[str] = set()
    for i, word in enumerate(argv):
        if word.startswith("--"):
            asked.add(word[2:].split("=", 1)[0].split(".", 1)[0])
        path = argv[i + 1] if word == "--config" and i + 1 < len(argv) else None
        if word.startswith("--config="):
            path = word.split("=", 1)[1]
        if path is not None and Path(path).is_file():
            loaded = yaml.safe_load(Path(path).read_text())
            asked.update(loaded if isinstance(loaded, dict) else {})
    return asked


def _skip_group(group: Any, cfg: Any) -> None:
    """jsonargparse group instantiator for a callback group the config did not ask for: no callback."""
    cfg[group.dest] = None


def __getattr__(name: str) -> Any:
    """``ICPLightningCLI`` is built on first use (it needs Lightning); ``from icp_lightning.cli import
    ICPLightningCLI`` still works."""
    if name == "ICPLightningCLI":
        return _cli_class()
    raise AttributeError(f"module 'icp_lightning.cli' has no attribute {name!r}")


def _checkpoint(path: str) -> dict[str, Any]:
    import torch

    if not Path(path).is_file():
        raise FileNotFoundError(f"no checkpoint at {path!r}")
    return torch.load(path, map_location="cpu", weights_only=False)  # type: ignore[no-any-return]


def _load_model(model: str, num_labels: int) -> torch.nn.Module:
    """The Hugging Face model of ``model``: a ``.ckpt`` of any ``icp fit`` (pruned or not: pruning lives in the
    weights), a local Hugging Face folder, an offline alias (``minilm``: no network) or a hub name."""
    import transformers

    if model.endswith(".ckpt"):
        from icp_lightning.module import ICPContrastiveModule

        # The module is built from its pretrained folder, whose new head transformers reports as MISSING, and the
        # checkpoint's weights then replace every tensor: that report is about a model nobody gets to see.
        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()
        try:
            module = ICPContrastiveModule.load_from_checkpoint(model, map_location="cpu")
        finally:
            transformers.logging.set_verbosity(verbosity)
        module.eval()
        return module.hf_model  # type: ignore[no-any-return]

    from icp_lightning.assets import resolve_pretrained

    path = resolve_pretrained(model)  # offline aliases such as "minilm" become local folders
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
    hf.eval()
    return hf  # type: ignore[no-any-return]


def attribute(
    model: str,
    data: ICPDataModule,
    out: str = "icp_report",
    datasets: Sequence[str] | None = None,
    dataset_weights: dict[str, float] | None = None,
    interventions: Sequence[InterventionKind] = ("mask",),
    alpha: float = 0.5,
    partner: AttributionPartner = "auto",
    metrics: Sequence[str] = ("label_logprob",),
    intervention_weights: dict[str, float] | None = None,
    metric_weights: dict[str, float] | None = None,
    method: Method = "gradient",
    granularity: Granularity = "neuron",
    target_modules: str | list[str] | None = None,
    exclude_modules: str | list[str] | None = None,
    reduction: Reduction = "signed",
    max_batches: int | None = 8,
    num_labels: int = 2,
    top_k: int = 20,
) -> None:
    """Score a model's features on named data sets and write a report.

    Args:
        model: a ``.ckpt`` of any ``icp fit`` (its data settings become the ``--data.*`` defaults), a local
            Hugging Face folder, an offline alias (``minilm``) or a hub name of a sequence classifier.
        data: the data module (its evaluation sets are the data sets); ``--data.*`` overrides.
        out: report folder: ``scores.pt``, ``scores.json``, ``heatmap.png``, ``effects_<set>_<intervention>.pt``.
        datasets: which evaluation sets to use (default: the keys of ``dataset_weights``, else all).
        dataset_weights: e.g. ``{id: 1, ood: -1}`` (with ``reduction="signed"``): one weight per data set.
        interventions: interventions to combine (``mask``, ``scale``, ``swap``, ``mean``).
        alpha: the factor of ``scale``: do(h = alpha h).
        partner: where ``swap`` takes h' from: ``auto`` (paired counterfactuals when the batches have them, else
            an in-batch permutation), ``permutation`` or ``paired``.
        metrics: the metrics m (``label_logprob``, ``accuracy``, ...); several are combined.
        intervention_weights: one weight per intervention (default 1).
        metric_weights: one weight per metric (default 1).
        method: ``exact``, ``gradient`` or ``screened``.
        granularity: ``neuron`` or ``head`` (saved in the scores: ``icp prune`` reads it from there).
        target_modules: sites (default: the architecture's FFN and attention output projections).
        exclude_modules: modules never used as sites.
        reduction: ``signed`` or ``abs``.
        max_batches: batches per data set.
        num_labels: for a Hugging Face model given by name or folder.
        top_k: features listed in the JSON summary.
    """
    from icp_lightning.core.attribution import AttributionConfig
    from icp_lightning.core.attribution import attribute as run_attribution
    from icp_lightning.plotting import score_heatmap

    names = list(datasets) if datasets else (list(dataset_weights) if dataset_weights else None)
    available = data.eval_set_names
    chosen = names if names is not None else list(available)
    unknown = [n for n in chosen if n not in available]
    if unknown:
        raise ValueError(
            f"evaluation sets {unknown} do not exist in the data module; it has {available} "
            "(set --datasets / --dataset_weights to some of these, or change --data.*)"
        )
    # Every setting checked before any computing: the one configuration the callback and benchmarks use.
    config = AttributionConfig(
        target_modules=target_modules,
        exclude_modules=exclude_modules,
        granularity=granularity,
        interventions=interventions,
        alpha=alpha,
        metrics=metrics,
        intervention_weights=intervention_weights,
        metric_weights=metric_weights,
        dataset_weights=dataset_weights,
        reduction=reduction,
        method=method,
        max_batches=max_batches,
        partner=partner,
    )
    config.check_datasets(chosen)
    hf = _load_model(model, num_labels)
    data.setup("fit")
    scores, effects = run_attribution(hf, data.attribution_dataloaders(chosen), config)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    for (iv, metric_label, name), eff in effects.items():
        suffix = f"_{metric_label}" if len(config.metrics) > 1 else ""
        eff.save(out_dir / f"effects_{name}_{iv}{suffix}.pt")
    scores.save(out_dir / "scores.pt")
    scores.to_json(out_dir / "scores.json", k=top_k)
    fig = score_heatmap(scores, f"spuriousness ({reduction})")
    fig.savefig(out_dir / "heatmap.png", dpi=120, bbox_inches="tight")
    print(json.dumps(scores.summary(top_k)["top"][:top_k], indent=1))
    print(f"wrote {out_dir}/scores.pt, scores.json, heatmap.png")


def prune(
    model: str,
    scores: str,
    out: str = "icp_pruned",
    threshold: float | None = None,
    amount: int | float | None = None,
    scope: Scope = "global",
    min_keep: int = 1,
    slim_model: bool = False,
    num_labels: int = 2,
) -> None:
    """Apply a score file to a model and save the pruned (optionally slimmed) model.

    The sites and their granularity come from the score file's metadata; scores of another model are refused.
    Selection is :func:`icp_lightning.core.selection.select_masks`, the same as the pruning callback's.

    Args:
        model: a ``.ckpt`` of any ``icp fit`` (pruned or not), a local Hugging Face folder, an offline alias
            (``minilm``) or a hub name of a sequence classifier.
        scores: a ``scores.pt`` written by ``icp attribute`` or the attribution callback.
        out: output folder (``save_pretrained`` format; with ``slim_model`` also ``icp_slim.json``).
        threshold: prune features whose score exceeds this tau.
        amount: how many of the remaining features to prune: an int (a count) or a fraction in (0, 1) of the
            top-scored features (``1.0`` is an error). Features already pruned in the model (all their columns
            exactly zero) are not candidates.
        scope: ``global`` (rank all sites together) or ``per_site`` (``amount`` in each site).
        min_keep: every site keeps at least this many features.
        slim_model: physically remove the pruned neurons/heads (see ``icp_lightning.slim``).
        num_labels: for a Hugging Face model given by name or folder.
    """
    import torch

    from icp_lightning.core.masks import apply_masks, make_permanent, restore_masks, save_slimmed, slim
    from icp_lightning.core.scores import Scores
    from icp_lightning.core.selection import check_amount, select_masks
    from icp_lightning.core.sites import sites_for_scores

    if (threshold is None) == (amount is None):
        raise ValueError(
            "give exactly one of --threshold (tau) or --amount (a count, or a fraction in (0, 1))"
        )
    if amount is not None:
        check_amount(amount, "--amount")
    sc = Scores.load(scores)
    hf = _load_model(model, num_labels)
    sites = sites_for_scores(hf, sc)
    installed = restore_masks(hf, sites)  # features pruned by icp fit: all their columns are exactly zero
    current = {n: installed.get(n, torch.ones(site.n_features)) for n, site in sites.items()}
    masks = select_masks(
        sc, current, threshold=threshold, amount=amount, scope=scope, min_keep=min_keep, sites=sites
    )
    apply_masks(hf, sites, masks)
    total = sum(s.n_features for s in sites.values())
    before = sum(int((m == 0).sum()) for m in current.values())
    pruned = sum(int((m == 0).sum()) for m in masks.values()) - before
    print(
        f"pruned {pruned} of {total} {sites.granularity} features ({100 * pruned / max(total, 1):.1f}%)"
        + (f"; {before} were pruned already" if before else "")
    )
    if slim_model:
        slim(hf)
        save_slimmed(hf, out)
    else:
        make_permanent(hf)
        hf.save_pretrained(out)  # type: ignore[operator]
    print(f"wrote {out}")


def _flag_value(argv: Sequence[str], flag: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg[len(flag) + 1 :]
    return None


def _data_defaults(model: str | None) -> dict[str, Any]:
    """The data module settings saved in an ``icp fit`` checkpoint (``--data.*`` flags override them)."""
    if model is None or not model.endswith(".ckpt") or not Path(model).is_file():
        return {}
    saved = _checkpoint(model).get("datamodule_hyper_parameters") or {}
    return {key: value for key, value in dict(saved).items() if not key.startswith("_")}


def _run_tool(name: str, argv: Sequence[str]) -> None:
    """``icp attribute`` / ``icp prune``: a jsonargparse parser of the function (and of ICPDataModule)."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    function: Callable[..., None] = attribute if name == "attribute" else prune
    parser = ArgumentParser(prog=f"icp {name}", description=(function.__doc__ or "").split("\n")[0])
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML file of these options")
    parser.add_function_arguments(function, skip={"data"}, as_group=False)
    if name == "attribute":
        from icp_lightning.data import ICPDataModule

        parser.add_class_arguments(ICPDataModule, "data")
        defaults = _data_defaults(_flag_value(argv, "--model"))
        known = {a.dest.split(".", 1)[1] for a in parser._actions if a.dest.startswith("data.")}
        parser.set_defaults({f"data.{k}": v for k, v in defaults.items() if k in known})
    cfg = parser.parse_args(list(argv))
    cfg.pop("config", None)
    init = parser.instantiate_classes(cfg)
    kwargs = init.as_dict() if hasattr(init, "as_dict") else dict(init)
    kwargs.pop("__path__", None)
    if name == "attribute":
        kwargs["data"] = init["data"]
    function(**kwargs)


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of the ``icp`` console script."""
    argv = list(sys.argv[1:] if args is None else args)
    if not argv or argv[0] in ("-h", "--help"):
        print(HELP, end="")
        return
    if argv[0] in ("attribute", "prune"):
        _run_tool(argv[0], argv[1:])
        return
    from icp_lightning.data import ICPDataModule
    from icp_lightning.module import ICPContrastiveModule

    _cli_class()(
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
