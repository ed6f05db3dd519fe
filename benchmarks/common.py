"""What every benchmark script does on start: a ``--threads`` flag, torch's thread count, quiet transformers."""

from __future__ import annotations

import argparse

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
