"""What every benchmark script shares: on start a ``--threads`` flag, torch's thread count, quiet transformers;
the check that a rerun matches a part's arguments; the folder name of a saved method."""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Mapping
from typing import Any

import torch


def parse_args(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Add ``--threads``, parse, set torch's threads when given and silence transformers' warnings."""
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    return args


def differing_args(stored: Mapping[str, Any], current: Mapping[str, Any], ignore: Iterable[str]) -> list[str]:
    """The arguments (of either run) whose values differ, outside ``ignore`` (those that say which jobs a process
    ran, not how): a rerun may only add rows to a part when this is empty. Sorted."""
    skip = set(ignore)
    return sorted(k for k in set(stored) | set(current) if k not in skip and stored.get(k) != current.get(k))


def method_slug(name: str) -> str:
    """A method's name as a folder name for ``--save-models``: lower case, every other character ``_``."""
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")
