"""The parser of ``raytl compare`` and the parsing of its sweep options.

Two studies share the command: the search study (each scheme's own TPE + ASHA search at the same
trial budget, :mod:`raytl.compare`) and, with ``--paired K``, the paired fidelity study (the same
K configurations scored by every scheme, :mod:`raytl.paired`). This module imports nothing but
argparse, like :mod:`raytl.cli_models`, so ``raytl --help`` stays instant.
"""

from __future__ import annotations

import argparse
from typing import Any


def add_compare(sub: Any) -> argparse.ArgumentParser:
    """Add ``compare`` to ``sub`` (the main parser's subparsers); the caller adds the Ray and
    ``--set`` options every command shares."""
    p: argparse.ArgumentParser = sub.add_parser(
        "compare",
        help="compare the evaluation schemes' cost and fidelity against untouched test data",
    )
    p.add_argument("space", help="space file (search_spaces/compare_schemes.yaml)")
    p.add_argument(
        "--schemes",
        default="holdout,cv,segments",
        help="comma-separated schemes to compare (default: holdout,cv,segments)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="run everything with this many seeds (search.seed, +1, ...) for the spread; with "
        "--paired the splits (data.seed) and the drawn configurations change too",
    )
    p.add_argument(
        "--refit-sample",
        type=int,
        help="refit only this many (seeded random) distinct configurations per repeat "
        "for the test figures (default: all; not with --paired)",
    )
    p.add_argument(
        "--paired",
        type=int,
        metavar="K",
        help="the paired study: draw K configurations once per repeat and score every one "
        "under every scheme for the same epochs, no early stopping",
    )
    p.add_argument(
        "--pool-sizes",
        metavar="N,N",
        help="with --paired: run the study on stratified pools of each size (data.pool_size), "
        "tested on the same test split (default: the whole pool)",
    )
    p.add_argument(
        "--segments",
        metavar="S,S",
        help="with --paired: run the segments scheme with each number of segments "
        "(default: scheme.segments)",
    )
    p.add_argument("--output", help="output folder (default: runs/NAME-compare)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty output folder")
    return p


def int_list(text: str | None, option: str, least: int) -> list[int]:
    """``"1000,4000"`` as integers, each >= ``least``; a one-line error naming the option."""
    if text is None:
        return []
    values = []
    for part in (p.strip() for p in text.split(",")):
        if not part.isdigit() or int(part) < least:
            raise ValueError(f"{option}: {part!r} in {text!r}: expected integers >= {least}")
        values.append(int(part))
    if not values or len(set(values)) != len(values):
        raise ValueError(f"{option}: {text!r}: expected distinct integers >= {least}")
    return values


def paired_options(args: argparse.Namespace) -> dict[str, Any] | None:
    """The paired study's keyword arguments (None: the search study); sweep options without
    ``--paired``, or ``--refit-sample`` with it, are errors."""
    pools = int_list(args.pool_sizes, "--pool-sizes", 10)
    segments = int_list(args.segments, "--segments", 1)
    if args.paired is None:
        if pools or segments:
            raise ValueError(
                "--pool-sizes and --segments belong to the paired study: add --paired K"
            )
        return None
    if args.refit_sample is not None:
        raise ValueError("--refit-sample: the paired study refits all K configurations")
    return {"k": args.paired, "pool_sizes": pools or [None], "segments": segments}
