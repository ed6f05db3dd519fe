"""The registry of counterfactual strategies by name, and :func:`build_counterfactual`."""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Mapping
from typing import Any

from icp_lightning.core.counterfactuals.base import CounterfactualStrategy, InterventionCounterfactual
from icp_lightning.core.counterfactuals.lexical import PairedCounterfactual, TokenSwapCounterfactual
from icp_lightning.core.counterfactuals.search import InversionCounterfactual, TokenEditCounterfactual

COUNTERFACTUALS: dict[str, type] = {
    "intervention": InterventionCounterfactual,
    "inversion": InversionCounterfactual,
    "token_edit": TokenEditCounterfactual,
    "paired": PairedCounterfactual,
    "token_swap": TokenSwapCounterfactual,
}


def register_counterfactual(name: str, cls: type) -> type:
    """Make ``build_counterfactual(name)`` build ``cls`` (a class with a ``build`` method)."""
    if not callable(getattr(cls, "build", None)):
        raise TypeError(f"{cls!r} has no build(model, batch, scores, sites) method")
    COUNTERFACTUALS[name] = cls
    return cls


def build_counterfactual(
    name_or_obj: str | CounterfactualStrategy,
    defaults: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> CounterfactualStrategy:
    """A counterfactual strategy by registry name (or the object itself, if it has a ``build`` method).

    Args:
        name_or_obj: ``"intervention"``, ``"inversion"``, ``"token_edit"``, ``"paired"``, ``"token_swap"`` (or a
            name added with :func:`register_counterfactual`), or a strategy object.
        defaults: arguments passed only to classes whose constructor takes them (e.g. ``tau_c``, ``top_k``).
        kwargs: arguments for the constructor, passed as they are.

    Example:
        >>> build_counterfactual("inversion", defaults={"top_k": 3}, steps=2).top_k
        3
        >>> type(build_counterfactual("paired", defaults={"top_k": 3})).__name__
        'PairedCounterfactual'
    """
    if not isinstance(name_or_obj, str):
        if not callable(getattr(name_or_obj, "build", None)):
            raise TypeError(
                f"counterfactual must be one of {sorted(COUNTERFACTUALS)} or an object with a "
                f"build(model, batch, scores, sites) method, got {type(name_or_obj).__name__}"
            )
        if kwargs:
            warnings.warn(
                f"counterfactual arguments {sorted(kwargs)} ignored: a built strategy was given", stacklevel=2
            )
        return name_or_obj
    if name_or_obj not in COUNTERFACTUALS:
        raise ValueError(
            f"unknown counterfactual {name_or_obj!r}; built-ins are {sorted(COUNTERFACTUALS)}, or pass an object "
            "with a build(model, batch, scores, sites) method"
        )
    cls = COUNTERFACTUALS[name_or_obj]
    params = inspect.signature(cls).parameters
    merged = {k: v for k, v in (defaults or {}).items() if k in params and k not in kwargs}
    merged.update(kwargs)
    try:
        return cls(**merged)  # type: ignore[no-any-return]
    except TypeError as err:
        raise TypeError(
            f"bad arguments for counterfactual {name_or_obj!r}: {err}. It takes {list(params)}"
        ) from None
