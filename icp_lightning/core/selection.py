"""Selection: the one function that turns spuriousness scores into masks.

Every caller that chooses features by score goes through :func:`select_masks`: the pruning callback (each
round), the counterfactual strategies' feature choice (:func:`~icp_lightning.core.counterfactuals.select_features`),
``icp prune`` and the benchmarks. So a threshold, an amount, a scope, ``min_keep`` and NaN scores mean the same
thing everywhere:

* ``threshold`` (tau): the candidates scoring strictly above it.
* ``amount``: an ``int`` is a count of features (``0`` prunes nothing); a ``float`` in (0, 1) is a fraction of
  the candidates, rounded to the nearest count. Any other float (``1.0``, ``0.0``, ``1.5``, ``-0.1``) raises a
  ``ValueError``: ``1.0`` could mean "all" or "one", so pass ``1`` for one feature (there is no "prune all"
  amount: prune all with ``threshold=-inf`` and ``min_keep=0``). With both ``threshold`` and ``amount``: the
  top ``amount`` among those above the threshold.
* ``scope="global"`` ranks all sites' features together; ``"per_site"`` applies ``amount`` in each site.
* Candidates are the features whose current mask is above 0 (masks are cumulative: a pruned feature is never
  chosen again, and a fraction applies to the remaining features).
* A candidate with a NaN (or infinite) score raises a ``ValueError`` naming its site and features: pruning
  never ranks a NaN. (Already pruned features are not candidates; their scores are not looked at.)
* ``mode="hard"`` sets the chosen features to 0; ``"soft"`` multiplies their mask by ``factor_fn(z)`` of their
  standardized score.
* ``min_keep``: every site keeps at least this many features above 0.

Scores whose sizes do not fit the masks (or the model's sites) raise "scores were computed for a different
model: ..." (:func:`~icp_lightning.core.sites.check_scores_fit`).

Example:
    >>> import torch
    >>> scores = {"a": torch.tensor([0.9, 0.1, 0.5]), "b": torch.tensor([0.8, 0.7])}
    >>> masks = select_masks(scores, amount=2)
    >>> masks["a"].tolist(), masks["b"].tolist()
    ([0.0, 1.0, 1.0], [0.0, 1.0])
    >>> select_masks(scores, amount=1.0)
    Traceback (most recent call last):
    ...
    ValueError: amount=1.0: pass an int for a count or a fraction in (0, 1) (a float is a fraction of the remaining features; 1.0 is neither)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

from icp_lightning.core.choices import MODES, SCOPES, Mode, Scope
from icp_lightning.core.sites import Sites, check_scores_fit

__all__ = [
    "MODES",
    "SCOPES",
    "Mode",
    "Scope",
    "SelectFn",
    "check_amount",
    "check_selection_args",
    "count_of",
    "default_factor",
    "select_masks",
]


class SelectFn(Protocol):
    """What the pruning callback's ``select_fn`` is: :func:`select_masks`'s signature (or a subset of it)."""

    def __call__(
        self,
        scores: Mapping[str, Tensor],
        masks: Mapping[str, Tensor] | None = None,
        *,
        threshold: float | None = None,
        amount: int | float | None = None,
        scope: Scope = "global",
        min_keep: int = 1,
        mode: Mode = "hard",
        factor_fn: Callable[[Tensor], Tensor] | None = None,
    ) -> dict[str, Tensor]: ...


def default_factor(z: Tensor) -> Tensor:
    """The default soft-pruning factor ``1 - sigmoid(z)`` of a standardized score ``z``: in (0, 1), 0.5 at the mean.

    Example:
        >>> default_factor(torch.tensor([-2.0, 0.0, 2.0]))
        tensor([0.8808, 0.5000, 0.1192])
    """
    return torch.sigmoid(-z)


def check_amount(amount: Any, where: str = "amount") -> int | float:
    """``amount`` checked: an int >= 0 (a count) or a float in (0, 1) (a fraction); anything else raises.

    Example:
        >>> check_amount(3), check_amount(0.05)
        (3, 0.05)
        >>> check_amount(1.0)
        Traceback (most recent call last):
        ...
        ValueError: amount=1.0: pass an int for a count or a fraction in (0, 1) (a float is a fraction of the remaining features; 1.0 is neither)
    """
    if isinstance(amount, bool) or not isinstance(amount, (int, float)):
        raise ValueError(
            f"{where}={amount!r}: pass an int for a count or a fraction in (0, 1) (or, in the pruning callback, "
            "a callable of the round returning one of those)"
        )
    if isinstance(amount, int):
        if amount < 0:
            raise ValueError(f"{where}={amount}: a count must be >= 0 (0 prunes nothing)")
        return amount
    if not math.isfinite(amount) or not 0.0 < amount < 1.0:
        raise ValueError(
            f"{where}={amount!r}: pass an int for a count or a fraction in (0, 1) (a float is a fraction of the "
            f"remaining features; {amount!r} is neither)"
        )
    return float(amount)


def count_of(amount: int | float, available: int) -> int:
    """How many of ``available`` candidates ``amount`` selects: the count (at most ``available``), or the
    fraction of them rounded to the nearest count.

    Example:
        >>> count_of(5, 3), count_of(0.25, 10), count_of(0.5, 5)
        (3, 2, 2)
    """
    amount = check_amount(amount)
    if isinstance(amount, int):
        return min(amount, available)
    return min(available, int(round(amount * available)))


def _standardize(values: Tensor) -> Tensor:
    if values.numel() < 2:
        return torch.zeros_like(values)
    std = values.std(unbiased=False)
    if not torch.isfinite(std) or std == 0:
        return torch.zeros_like(values)
    return (values - values.mean()) / std


def _check_finite(scores: Mapping[str, Tensor], candidates: Mapping[str, Tensor]) -> None:
    bad = {n: (candidates[n] & ~torch.isfinite(scores[n])).nonzero().reshape(-1) for n in candidates}
    bad = {n: idx for n, idx in bad.items() if idx.numel()}
    if bad:
        parts = [
            f"site {n!r} features {idx[:10].tolist()}{' ...' if idx.numel() > 10 else ''} ({idx.numel()})"
            for n, idx in bad.items()
        ]
        raise ValueError(
            "scores are NaN or infinite for features that could be pruned: "
            + "; ".join(parts)
            + ". Pruning never ranks a NaN: recompute the scores (an empty data set, NaN model outputs or a "
            "metric returning NaN give NaN effects)"
        )


def _chosen(
    scores: Mapping[str, Tensor],
    candidates: Mapping[str, Tensor],
    names: Sequence[str],
    threshold: float | None,
    amount: int | float | None,
    scope: Scope,
) -> dict[str, Tensor]:
    """Which candidates the threshold and / or amount select (boolean per site)."""
    chosen = {n: candidates[n].clone() for n in names}
    if threshold is not None:
        for n in names:
            chosen[n] &= scores[n] > threshold
    if amount is None:
        return chosen
    if scope == "global":
        site_of = torch.cat(
            [torch.full((int(chosen[n].sum()),), i, dtype=torch.long) for i, n in enumerate(names)]
        )
        feat_of = torch.cat([chosen[n].nonzero().reshape(-1) for n in names])
        values = torch.cat([scores[n][chosen[n]] for n in names])
        k = count_of(amount, int(values.numel()))
        top = torch.argsort(values, descending=True, stable=True)[:k]
        out = {n: torch.zeros_like(chosen[n]) for n in names}
        for j in top.tolist():
            out[names[int(site_of[j])]][int(feat_of[j])] = True
        return out
    out = {}
    for n in names:
        idx = chosen[n].nonzero().reshape(-1)
        k = count_of(amount, int(idx.numel()))
        out[n] = torch.zeros_like(chosen[n])
        out[n][idx[torch.argsort(scores[n][idx], descending=True, stable=True)[:k]]] = True
    return out


def _soft(
    scores: Mapping[str, Tensor],
    candidates: Mapping[str, Tensor],
    chosen: Mapping[str, Tensor],
    current: Mapping[str, Tensor],
    names: Sequence[str],
    scope: Scope,
    factor_fn: Callable[[Tensor], Tensor] | None,
) -> dict[str, Tensor]:
    """Chosen features' masks multiplied by ``factor_fn(z)``, z standardized over the candidates."""
    fn = factor_fn if factor_fn is not None else default_factor
    z: dict[str, Tensor] = {}
    if scope == "global":
        flat = _standardize(torch.cat([scores[n][candidates[n]] for n in names]))
        for n, part in zip(names, torch.split(flat, [int(candidates[n].sum()) for n in names])):
            z[n] = torch.zeros_like(scores[n])
            z[n][candidates[n]] = part
    else:
        for n in names:
            z[n] = torch.zeros_like(scores[n])
            z[n][candidates[n]] = _standardize(scores[n][candidates[n]])
    new = {n: current[n].clone() for n in names}
    for n in names:
        count = int(chosen[n].sum())
        if not count:
            continue
        factors = torch.as_tensor(fn(z[n][chosen[n]].float())).detach().to("cpu", torch.float32)
        if factors.shape != (count,):
            raise ValueError(
                f"factor_fn must return one factor per input value (shape {[count]}), got shape "
                f"{list(factors.shape)}"
            )
        if not bool(torch.isfinite(factors).all()) or factors.min() < 0 or factors.max() > 1:
            raise ValueError(
                f"factor_fn must return factors in [0, 1], got min {factors.min().item()}, "
                f"max {factors.max().item()}"
            )
        new[n][chosen[n]] = current[n][chosen[n]] * factors
    return new


def check_selection_args(
    threshold: Any,
    amount: Any,
    scope: Any,
    min_keep: Any,
    mode: Any,
    factor_fn: Any = None,
    *,
    finite_threshold: bool = False,
    callable_amount: bool = False,
) -> tuple[float | None, Any]:
    """The checks of every selection argument, shared by :func:`select_masks` and the pruning callback (which
    runs them at construction, before any training). Returns ``(threshold, amount)`` normalized: the threshold
    as a float, the amount through :func:`check_amount` (left as is when it is a callable and
    ``callable_amount``). ``finite_threshold`` also refuses an infinite tau.

    Example:
        >>> check_selection_args(0.5, None, "global", 1, "hard")
        (0.5, None)
        >>> check_selection_args(None, 3, "per_site", 0, "sideways")
        Traceback (most recent call last):
        ...
        ValueError: mode must be one of ('hard', 'soft'), got 'sideways'
    """
    if threshold is not None:
        bad = isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or math.isnan(threshold)
        if bad or (finite_threshold and not math.isfinite(threshold)):
            kind = "a finite number" if finite_threshold else "a number"
            raise ValueError(f"threshold must be {kind} (tau), got {threshold!r}")
        threshold = float(threshold)
    if amount is not None and not (callable_amount and callable(amount)):
        amount = check_amount(amount)
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if isinstance(min_keep, bool) or not isinstance(min_keep, int) or min_keep < 0:
        raise ValueError(f"min_keep must be an int >= 0 (features every site keeps), got {min_keep!r}")
    if factor_fn is not None and not callable(factor_fn):
        raise ValueError(f"factor_fn must be a callable z -> factors in [0, 1], got {factor_fn!r}")
    if factor_fn is not None and mode != "soft":
        raise ValueError("factor_fn only applies to mode='soft'; pass mode='soft' or drop factor_fn")
    return threshold, amount


def select_masks(
    scores: Mapping[str, Tensor],
    masks: Mapping[str, Tensor] | None = None,
    *,
    threshold: float | None = None,
    amount: int | float | None = None,
    scope: Scope = "global",
    min_keep: int = 1,
    mode: Mode = "hard",
    factor_fn: Callable[[Tensor], Tensor] | None = None,
    sites: Sites | None = None,
) -> dict[str, Tensor]:
    """The next masks: the current ``masks`` with the most spurious remaining features pruned (or reweighted).

    Candidates are the features whose current mask is above 0. Among them ``threshold`` selects those scoring
    strictly above it (``scope`` makes no difference); ``amount`` selects the highest-scoring ``amount``
    features (an int: a count; a float in (0, 1): that fraction of the candidates, rounded), over all sites
    together (``scope="global"``) or in each site (``"per_site"``); with both, the top ``amount`` of those above
    the threshold. Ties go to the earlier site and feature. ``mode="hard"`` sets the selected features to 0;
    ``mode="soft"`` multiplies their mask by ``factor_fn(z)``, ``z`` being their score standardized over the
    candidates (of all sites, or of their site with ``"per_site"``), default :func:`default_factor`. Then every
    site keeps at least ``min_keep`` features above 0: the lowest-scoring of its newly zeroed features get their
    mask back (they are not replaced by other features).

    Args:
        scores: site -> ``[n_features]`` scores, higher = more spurious (e.g. a ``Scores``).
        masks: site -> ``[n_features]`` current masks in [0, 1] (the sites to consider). ``None``: all ones
            over the sites of ``sites`` (when given) or of ``scores``.
        threshold: tau; at least one of ``threshold`` / ``amount``.
        amount: an int (a count) or a float in (0, 1) (a fraction); see :func:`check_amount`.
        scope: ``"global"`` or ``"per_site"``.
        min_keep: features every site keeps (0: a site may be emptied).
        mode: ``"hard"`` or ``"soft"``.
        factor_fn: the soft factor of standardized scores (``mode="soft"``), values in [0, 1].
        sites: the model's sites; when given, the scores' sizes are checked against them
            (:func:`~icp_lightning.core.sites.check_scores_fit`).

    Returns:
        site -> new ``[n_features]`` float32 CPU masks.

    Raises:
        ValueError: neither threshold nor amount, a bad amount / scope / mode / min_keep, a site without scores,
            scores that do not fit ("scores were computed for a different model: ..."), NaN scores among the
            candidates, or factors outside [0, 1].

    Example:
        >>> scores = {"a": torch.tensor([0.9, 0.1, 0.5]), "b": torch.tensor([0.8, 0.7])}
        >>> masks = {"a": torch.ones(3), "b": torch.ones(2)}
        >>> new = select_masks(scores, masks, amount=2)
        >>> new["a"].tolist(), new["b"].tolist()
        ([0.0, 1.0, 1.0], [0.0, 1.0])
        >>> new = select_masks(scores, new, amount=2)  # cumulative: b keeps min_keep=1 feature
        >>> new["a"].tolist(), new["b"].tolist()
        ([0.0, 1.0, 0.0], [0.0, 1.0])
        >>> select_masks(scores, masks, threshold=0.6, mode="soft")["b"]
        tensor([0.3302, 0.4125])
    """
    if threshold is None and amount is None:
        raise ValueError(
            "select_masks needs threshold= (tau), amount= (a count or a fraction in (0, 1)), or both"
        )
    threshold, amount = check_selection_args(threshold, amount, scope, min_keep, mode, factor_fn)
    if sites is not None:
        check_scores_fit(scores, sites)
    if masks is None:
        names_from = list(sites) if sites is not None else list(scores)
        masks = {
            n: torch.ones(sites[n].n_features if sites is not None else torch.as_tensor(scores[n]).numel())
            for n in names_from
        }
    names = list(masks)
    missing = [n for n in names if n not in scores]
    if missing:
        raise ValueError(f"no scores for sites {missing}; scores cover {list(scores)}")
    cur = {n: torch.as_tensor(masks[n]).detach().to("cpu", torch.float32).reshape(-1) for n in names}
    sc = {n: torch.as_tensor(scores[n]).detach().to("cpu", torch.float64).reshape(-1) for n in names}
    check_scores_fit(sc, {n: cur[n].numel() for n in names})
    candidates = {n: cur[n] > 0 for n in names}
    _check_finite(sc, candidates)
    chosen = _chosen(sc, candidates, names, threshold, amount, scope)

    if mode == "hard":
        new = {n: cur[n].clone() for n in names}
        for n in names:
            new[n][chosen[n]] = 0.0
    else:
        new = _soft(sc, candidates, chosen, cur, names, scope, factor_fn)

    for n in names:  # never leave fewer than min_keep features of a site alive
        alive = int((new[n] > 0).sum())
        if alive >= min_keep:
            continue
        lost = (chosen[n] & (new[n] == 0)).nonzero().reshape(-1)
        order = lost[torch.argsort(sc[n][lost], stable=True)]
        for i in order[: min_keep - alive].tolist():
            new[n][i] = cur[n][i]
    return new
