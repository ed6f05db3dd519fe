"""Lightning callbacks for Intervention-Based Causal Pruning: attribution (scores) and pruning (masks).

Both work in a plain ``lightning.Trainer`` around any LightningModule that holds a Hugging Face model.

Example:
    >>> from icp_lightning.callbacks import CausalAttributionCallback, CausalPruningCallback
    >>> callbacks = [CausalAttributionCallback(every_n_epochs=2), CausalPruningCallback(amount=0.1)]
    >>> [type(cb).__name__ for cb in callbacks]
    ['CausalAttributionCallback', 'CausalPruningCallback']
"""

from icp_lightning.callbacks.attribution import AttributionListener, CausalAttributionCallback
from icp_lightning.callbacks.pruning import CausalPruningCallback, default_factor, select_masks
from icp_lightning.callbacks.repair import TokenRepairCallback, choose_repair

__all__ = [
    "AttributionListener",
    "CausalAttributionCallback",
    "CausalPruningCallback",
    "TokenRepairCallback",
    "choose_repair",
    "default_factor",
    "select_masks",
]
