"""icp_lightning: Intervention-Based Causal Pruning for Hugging Face models, the Lightning way."""

from icp_lightning.core.effects import Effects, causal_effects
from icp_lightning.core.scores import Scores, spuriousness
from icp_lightning.core.interventions import Intervention, intervene
from icp_lightning.core.sites import Site, Sites, find_sites

__all__ = [
    "Effects",
    "Intervention",
    "Scores",
    "Site",
    "Sites",
    "causal_effects",
    "find_sites",
    "intervene",
    "spuriousness",
]
__version__ = "0.1.0"
