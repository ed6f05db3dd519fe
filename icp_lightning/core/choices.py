"""The choice types of the package, in one place: every signature (core, callbacks, the module, the CLI) and
every check names its choices by these, so a choice is spelled once. Plain ``typing`` only (no torch), so
the CLI can import it without delaying ``icp --help``; each tuple lists its type's values in order.

Example:
    >>> INTERVENTIONS, METHODS
    (('mask', 'scale', 'swap', 'mean'), ('exact', 'gradient', 'screened'))
"""

from __future__ import annotations

from typing import Literal, get_args

__all__ = [
    "ATTRIBUTION_PARTNERS",
    "AttributionPartner",
    "CounterfactualKind",
    "CounterfactualName",
    "EditKind",
    "GRANULARITIES",
    "Granularity",
    "INTERVENTIONS",
    "InterventionKind",
    "KLDirection",
    "KLSchedule",
    "KL_DIRECTIONS",
    "KL_SCHEDULES",
    "METHODS",
    "MODES",
    "Method",
    "Mode",
    "PARTNERS",
    "Partner",
    "Projection",
    "REDUCTIONS",
    "Reduction",
    "SCOPES",
    "Scope",
    "SiteKind",
]

#: Features: FFN neurons (a ``Linear``'s input columns) or attention heads (groups of ``head_dim`` columns).
Granularity = Literal["neuron", "head"]
#: do(h = 0), do(h = alpha * h), do(h = h'), do(h = mean h).
InterventionKind = Literal["mask", "scale", "swap", "mean"]
#: How effects are computed: exact forwards, first-order gradients, or gradient-screened exact.
Method = Literal["exact", "gradient", "screened"]
#: Where a swap's h' comes from: a permutation of the batch or the batch's paired inputs.
Partner = Literal["permutation", "paired"]
#: :data:`Partner`, or ``"auto"``: paired when batches carry counterfactual inputs.
AttributionPartner = Literal["auto", "permutation", "paired"]
#: How effects over data sets are combined: the signed contrast or the literal mean of absolute effects.
Reduction = Literal["signed", "abs"]
#: Selection over all sites together or within each site.
Scope = Literal["global", "per_site"]
#: Pruning to zero or reweighting by a factor.
Mode = Literal["hard", "soft"]
KLDirection = Literal["forward", "reverse", "symmetric"]
KLSchedule = Literal["constant", "linear_warmup"]
CounterfactualName = Literal["intervention", "inversion", "token_edit", "paired", "token_swap"]
CounterfactualKind = Literal["swap", "mask"]
EditKind = Literal["mask", "delete", "hotflip"]
Projection = Literal["cosine", "l2"]
SiteKind = Literal["ffn", "attn", "other"]

GRANULARITIES: tuple[str, ...] = get_args(Granularity)
INTERVENTIONS: tuple[str, ...] = get_args(InterventionKind)
METHODS: tuple[str, ...] = get_args(Method)
PARTNERS: tuple[str, ...] = get_args(Partner)
ATTRIBUTION_PARTNERS: tuple[str, ...] = get_args(AttributionPartner)
REDUCTIONS: tuple[str, ...] = get_args(Reduction)
SCOPES: tuple[str, ...] = get_args(Scope)
MODES: tuple[str, ...] = get_args(Mode)
KL_DIRECTIONS: tuple[str, ...] = get_args(KLDirection)
KL_SCHEDULES: tuple[str, ...] = get_args(KLSchedule)
