"""icp_lightning: Intervention-Based Causal Pruning for Hugging Face models, the Lightning way."""

from icp_lightning.core.effects import Effects, causal_effects
from icp_lightning.core.interventions import Intervention, intervene
from icp_lightning.core.masks import (
    apply_masks,
    effective_weight,
    get_masks,
    load_masks_state,
    load_slimmed,
    make_permanent,
    remove_masks,
    save_slimmed,
    slim,
)
from icp_lightning.core.scores import Scores, spuriousness
from icp_lightning.core.sites import Site, Sites, find_sites

__all__ = [
    "Effects",
    "Intervention",
    "Scores",
    "Site",
    "Sites",
    "apply_masks",
    "causal_effects",
    "effective_weight",
    "get_masks",
    "load_masks_state",
    "load_slimmed",
    "make_permanent",
    "remove_masks",
    "save_slimmed",
    "slim",
    "find_sites",
    "intervene",
    "spuriousness",
]
__version__ = "0.1.0"
