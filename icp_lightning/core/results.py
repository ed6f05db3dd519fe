"""Per-site, per-feature results kept as sums and counts, so partial results add up exactly.

:class:`SiteValues` is the common base of :class:`~icp_lightning.core.effects.Effects` and
:class:`~icp_lightning.core.scores.Scores`: values per site are ``sums / counts``; two results over disjoint
data add (``a + b``) to the result over the union, which is how ranks of a DDP job combine theirs.

Example:
    >>> a = SiteValues({"s": torch.tensor([1.0, 4.0])}, {"s": torch.tensor([1.0, 2.0])})
    >>> b = SiteValues({"s": torch.tensor([3.0, 0.0])}, {"s": torch.tensor([1.0, 2.0])})
    >>> (a + b)["s"]
    tensor([2., 1.])
    >>> (a + b).top_k(1)
    [('s', 0, 2.0)]
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch

T = TypeVar("T", bound="SiteValues")


class SiteValues(Mapping[str, torch.Tensor]):
    """``site name -> [n_features]`` values stored as float64 sums and counts, plus JSON-able ``meta``."""

    def __init__(
        self,
        sums: Mapping[str, torch.Tensor],
        counts: Mapping[str, torch.Tensor],
        meta: Mapping[str, Any] | None = None,
    ) -> None:
        if set(sums) != set(counts):
            raise ValueError(f"sums and counts name different sites: {sorted(sums)} vs {sorted(counts)}")
        self.sums = {k: v.detach().to("cpu", torch.float64) for k, v in sums.items()}
        self.counts = {k: torch.as_tensor(counts[k]).detach().to("cpu", torch.float64) for k in sums}
        for k in self.sums:
            self.counts[k] = self.counts[k].expand_as(self.sums[k]).clone()
        self.meta: dict[str, Any] = dict(meta or {})

    # Mapping interface: values are means (NaN where nothing was counted).
    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.sums:
            raise KeyError(f"no site {name!r}; sites are {list(self.sums)}")
        counts = self.counts[name]
        out = self.sums[name] / counts.clamp_min(1e-300)
        out[counts == 0] = float("nan")
        return out.float()

    def __iter__(self) -> Iterator[str]:
        return iter(self.sums)

    def __len__(self) -> int:
        return len(self.sums)

    def _like(self: T, sums: Mapping[str, torch.Tensor], counts: Mapping[str, torch.Tensor]) -> T:
        out = self.__class__.__new__(self.__class__)
        SiteValues.__init__(out, sums, counts, self.meta)
        for key, value in self.__dict__.items():
            if key not in ("sums", "counts", "meta"):
                out.__dict__[key] = value
        return out

    def __add__(self: T, other: SiteValues) -> T:
        names = list(dict.fromkeys([*self.sums, *other.sums]))
        sums, counts = {}, {}
        for n in names:
            if n in self.sums and n in other.sums:
                sums[n] = self.sums[n] + other.sums[n]
                counts[n] = self.counts[n] + other.counts[n]
            else:
                src = self if n in self.sums else other
                sums[n], counts[n] = src.sums[n].clone(), src.counts[n].clone()
        return self._like(sums, counts)

    def flat(self) -> torch.Tensor:
        """All values concatenated in site order."""
        return torch.cat([self[n] for n in self]) if len(self) else torch.zeros(0)

    def top_k(self, k: int, by: str = "value") -> list[tuple[str, int, float]]:
        """The ``k`` largest features as ``(site, feature, value)``; ``by="abs"`` ranks by magnitude.

        NaN (never computed) features come last.
        """
        if by not in ("value", "abs"):
            raise ValueError(f"by must be 'value' or 'abs', got {by!r}")
        index = [(n, i) for n in self for i in range(self.sums[n].numel())]
        values = self.flat().double()
        key = values.abs() if by == "abs" else values
        key = torch.nan_to_num(key, nan=float("-inf"))
        order = torch.argsort(key, descending=True, stable=True)[: max(0, k)]
        return [(index[j][0], index[j][1], float(values[j])) for j in order.tolist()]

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors, strings and numbers: safe for ``torch.load(weights_only=True)``."""
        return {
            "class": self.__class__.__name__,
            "sums": dict(self.sums),
            "counts": dict(self.counts),
            "meta": json.loads(json.dumps(self.meta, default=str)),
        }

    @classmethod
    def from_state_dict(cls: type[T], state: Mapping[str, Any]) -> T:
        """Rebuild from :meth:`state_dict`."""
        out = cls.__new__(cls)
        SiteValues.__init__(out, state["sums"], state["counts"], state.get("meta"))
        return out

    def save(self, path: str | Path) -> None:
        """Save with ``torch.save``; reload with :meth:`load` (``weights_only=True``)."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        torch.save(self.state_dict(), path)

    @classmethod
    def load(cls: type[T], path: str | Path) -> T:
        """Load what :meth:`save` wrote."""
        return cls.from_state_dict(torch.load(path, map_location="cpu", weights_only=True))

    def summary(self, k: int = 20) -> dict[str, Any]:
        """A JSON-friendly summary: meta, per-site statistics and the top ``k`` features."""
        per_site = {}
        for n in self:
            v = self[n]
            finite = v[~torch.isnan(v)]
            per_site[n] = {
                "n_features": int(v.numel()),
                "n_computed": int(finite.numel()),
                "mean": float(finite.mean()) if finite.numel() else math.nan,
                "max": float(finite.max()) if finite.numel() else math.nan,
                "min": float(finite.min()) if finite.numel() else math.nan,
            }
        return {
            "meta": self.meta,
            "sites": per_site,
            "top": [{"site": s, "feature": i, "value": val} for s, i, val in self.top_k(k)],
        }

    def to_json(self, path: str | Path | None = None, k: int = 20) -> str:
        """The :meth:`summary` as JSON text, also written to ``path`` if given."""
        text = json.dumps(self.summary(k), indent=2, default=str)
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text)
        return text

    def __repr__(self) -> str:
        sizes = ", ".join(f"{n}: {self.sums[n].numel()}" for n in list(self)[:4])
        more = f", ... ({len(self) - 4} more)" if len(self) > 4 else ""
        return f"{self.__class__.__name__}({sizes}{more}; meta={self.meta})"
