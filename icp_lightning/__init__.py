"""icp_lightning: Intervention-Based Causal Pruning for Hugging Face models, the Lightning way.

The pure-torch engine (``find_sites``, ``causal_effects``, ``spuriousness``, masks, counterfactuals) imports
without Lightning; the Lightning layer (callbacks, module, data module, CLI) needs it. Every public name loads
lazily on first use, so ``import icp_lightning`` (and ``icp --help``) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from icp_lightning.callbacks import CausalAttributionCallback, CausalPruningCallback
    from icp_lightning.callbacks.refit import HeadRefitCallback
    from icp_lightning.callbacks.repair import TokenRepairCallback, choose_repair
    from icp_lightning.callbacks.report import ReliabilityReport
    from icp_lightning.core.adapters import load_adapter, save_adapter
    from icp_lightning.core.attribution import AttributionConfig, attribute
    from icp_lightning.core.counterfactuals import (
        CounterfactualOutput,
        InterventionCounterfactual,
        InversionCounterfactual,
        PairedCounterfactual,
        TokenEditCounterfactual,
        TokenSwapCounterfactual,
        build_counterfactual,
        register_counterfactual,
    )
    from icp_lightning.core.effects import Effects, causal_effects
    from icp_lightning.core.interventions import Intervention, intervene
    from icp_lightning.core.losses import ICPLoss, counterfactual_kl
    from icp_lightning.core.masks import (
        apply_masks,
        effective_weight,
        enforce_masks,
        get_masks,
        load_masks_state,
        load_slimmed,
        make_permanent,
        remove_masks,
        restore_masks,
        save_slimmed,
        slim,
        temporary_masks,
    )
    from icp_lightning.core.reweight import refit_head
    from icp_lightning.core.scores import Scores, spuriousness
    from icp_lightning.core.selection import select_masks
    from icp_lightning.core.sites import Site, Sites, check_scores_fit, find_sites, sites_for_scores
    from icp_lightning.core.tokens import (
        confirm_tokens,
        discover_tokens,
        find_shortcut_words,
        mask_input_tokens,
        nominate,
        remove_input_tokens,
        word_continuation_ids,
    )
    from icp_lightning.data import ICPDataModule, plant_shortcut
    from icp_lightning.module import ICPContrastiveModule
    from icp_lightning.plotting import score_heatmap, top_table
    from icp_lightning.recipes import RECIPES, load_recipe

#: public name -> the module that defines it (imported on first access).
_LAZY: dict[str, str] = {
    "CausalAttributionCallback": "icp_lightning.callbacks",
    "CausalPruningCallback": "icp_lightning.callbacks",
    "HeadRefitCallback": "icp_lightning.callbacks.refit",
    "TokenRepairCallback": "icp_lightning.callbacks.repair",
    "choose_repair": "icp_lightning.callbacks.repair",
    "ReliabilityReport": "icp_lightning.callbacks.report",
    "load_adapter": "icp_lightning.core.adapters",
    "save_adapter": "icp_lightning.core.adapters",
    "AttributionConfig": "icp_lightning.core.attribution",
    "attribute": "icp_lightning.core.attribution",
    "CounterfactualOutput": "icp_lightning.core.counterfactuals",
    "InterventionCounterfactual": "icp_lightning.core.counterfactuals",
    "InversionCounterfactual": "icp_lightning.core.counterfactuals",
    "PairedCounterfactual": "icp_lightning.core.counterfactuals",
    "TokenEditCounterfactual": "icp_lightning.core.counterfactuals",
    "TokenSwapCounterfactual": "icp_lightning.core.counterfactuals",
    "build_counterfactual": "icp_lightning.core.counterfactuals",
    "register_counterfactual": "icp_lightning.core.counterfactuals",
    "Effects": "icp_lightning.core.effects",
    "causal_effects": "icp_lightning.core.effects",
    "Intervention": "icp_lightning.core.interventions",
    "intervene": "icp_lightning.core.interventions",
    "ICPLoss": "icp_lightning.core.losses",
    "counterfactual_kl": "icp_lightning.core.losses",
    "apply_masks": "icp_lightning.core.masks",
    "effective_weight": "icp_lightning.core.masks",
    "enforce_masks": "icp_lightning.core.masks",
    "get_masks": "icp_lightning.core.masks",
    "load_masks_state": "icp_lightning.core.masks",
    "load_slimmed": "icp_lightning.core.masks",
    "make_permanent": "icp_lightning.core.masks",
    "remove_masks": "icp_lightning.core.masks",
    "restore_masks": "icp_lightning.core.masks",
    "save_slimmed": "icp_lightning.core.masks",
    "slim": "icp_lightning.core.masks",
    "temporary_masks": "icp_lightning.core.masks",
    "refit_head": "icp_lightning.core.reweight",
    "Scores": "icp_lightning.core.scores",
    "spuriousness": "icp_lightning.core.scores",
    "select_masks": "icp_lightning.core.selection",
    "Site": "icp_lightning.core.sites",
    "Sites": "icp_lightning.core.sites",
    "check_scores_fit": "icp_lightning.core.sites",
    "find_sites": "icp_lightning.core.sites",
    "sites_for_scores": "icp_lightning.core.sites",
    "confirm_tokens": "icp_lightning.core.tokens",
    "discover_tokens": "icp_lightning.core.tokens",
    "find_shortcut_words": "icp_lightning.core.tokens",
    "mask_input_tokens": "icp_lightning.core.tokens",
    "nominate": "icp_lightning.core.tokens",
    "remove_input_tokens": "icp_lightning.core.tokens",
    "word_continuation_ids": "icp_lightning.core.tokens",
    "ICPDataModule": "icp_lightning.data",
    "plant_shortcut": "icp_lightning.data",
    "ICPContrastiveModule": "icp_lightning.module",
    "score_heatmap": "icp_lightning.plotting",
    "top_table": "icp_lightning.plotting",
    "RECIPES": "icp_lightning.recipes",
    "load_recipe": "icp_lightning.recipes",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # cache: later lookups skip __getattr__
        return value
    raise AttributeError(f"module 'icp_lightning' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = [
    "AttributionConfig",
    "CausalAttributionCallback",
    "CausalPruningCallback",
    "CounterfactualOutput",
    "Effects",
    "HeadRefitCallback",
    "ICPContrastiveModule",
    "ICPDataModule",
    "ICPLoss",
    "Intervention",
    "InterventionCounterfactual",
    "InversionCounterfactual",
    "PairedCounterfactual",
    "RECIPES",
    "ReliabilityReport",
    "Scores",
    "Site",
    "Sites",
    "TokenEditCounterfactual",
    "TokenRepairCallback",
    "TokenSwapCounterfactual",
    "apply_masks",
    "attribute",
    "build_counterfactual",
    "causal_effects",
    "check_scores_fit",
    "choose_repair",
    "confirm_tokens",
    "counterfactual_kl",
    "discover_tokens",
    "effective_weight",
    "enforce_masks",
    "find_shortcut_words",
    "find_sites",
    "get_masks",
    "intervene",
    "load_adapter",
    "load_masks_state",
    "load_recipe",
    "load_slimmed",
    "make_permanent",
    "mask_input_tokens",
    "nominate",
    "plant_shortcut",
    "refit_head",
    "register_counterfactual",
    "remove_input_tokens",
    "remove_masks",
    "restore_masks",
    "save_adapter",
    "save_slimmed",
    "score_heatmap",
    "select_masks",
    "sites_for_scores",
    "slim",
    "spuriousness",
    "temporary_masks",
    "top_table",
    "word_continuation_ids",
]
__version__ = "0.1.0"
