"""icp_lightning: Intervention-Based Causal Pruning for Hugging Face models, the Lightning way.

The pure-torch engine (``find_sites``, ``causal_effects``, ``spuriousness``, masks, counterfactuals) imports
without Lightning; the Lightning layer (callbacks, module, data module, CLI) loads lazily on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

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
from icp_lightning.core.sites import Site, Sites, find_sites
from icp_lightning.core.tokens import (
    discover_tokens,
    mask_input_tokens,
    remove_input_tokens,
    word_continuation_ids,
)

_LAZY = {
    "CausalAttributionCallback": "icp_lightning.callbacks",
    "CausalPruningCallback": "icp_lightning.callbacks",
    "ReliabilityReport": "icp_lightning.callbacks.report",
    "HeadRefitCallback": "icp_lightning.callbacks.refit",
    "TokenRepairCallback": "icp_lightning.callbacks.repair",
    "choose_repair": "icp_lightning.callbacks.repair",
    "ICPContrastiveModule": "icp_lightning.module",
    "ICPDataModule": "icp_lightning.data",
    "plant_shortcut": "icp_lightning.data",
    "RECIPES": "icp_lightning.recipes",
    "load_recipe": "icp_lightning.recipes",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'icp_lightning' has no attribute {name!r}")


__all__ = [
    "RECIPES",
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
    "ReliabilityReport",
    "Scores",
    "Site",
    "Sites",
    "TokenEditCounterfactual",
    "TokenRepairCallback",
    "TokenSwapCounterfactual",
    "apply_masks",
    "build_counterfactual",
    "choose_repair",
    "causal_effects",
    "counterfactual_kl",
    "effective_weight",
    "find_sites",
    "get_masks",
    "intervene",
    "load_masks_state",
    "load_recipe",
    "load_slimmed",
    "make_permanent",
    "plant_shortcut",
    "refit_head",
    "discover_tokens",
    "mask_input_tokens",
    "register_counterfactual",
    "remove_input_tokens",
    "remove_masks",
    "restore_masks",
    "temporary_masks",
    "enforce_masks",
    "save_slimmed",
    "slim",
    "spuriousness",
    "word_continuation_ids",
]
__version__ = "0.1.0"
