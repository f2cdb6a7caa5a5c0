"""Command-line entry points of :mod:`equipet.assisted.figures` (argparse; the work is done there)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from equipet import cli
from equipet.files import atomic_path
from equipet.assisted.figures import (
    assisted_figure,
    crc_figure,
    log,
    of_method,
    read_tables,
    summary_table,
)


def main(argv: Sequence[str] | None = None) -> None:
    """``equipet-recon-figures``: figures and tables of the assisted reconstruction."""
    cli.run(_main, argv)


def _main(argv: Sequence[str] | None) -> None:
    p = argparse.ArgumentParser(prog="equipet-recon-figures", description=main.__doc__)
    sub = p.add_subparsers(dest="what", required=True)
    a = sub.add_parser("assisted", help="Fig. 4/5 equivalent for one CTR")
    cli.add_common_arguments(a)
    a.add_argument("--slice", type=Path, required=True)
    a.add_argument("--runs", type=Path, nargs="+", required=True)
    a.add_argument("--out", type=Path, required=True)
    c = sub.add_parser("crc", help="CTR x model CRC / VPR per rod size")
    c.add_argument("--log", type=Path)
    c.add_argument("--metrics", type=Path, nargs="+", required=True)
    c.add_argument("--method", help="assisted method whose runs are shown (all when omitted)")
    c.add_argument("--out", type=Path, required=True)
    s = sub.add_parser("summary", help="summary table of one CTR")
    s.add_argument("--log", type=Path)
    s.add_argument("--metrics", type=Path, nargs="+", required=True)
    s.add_argument("--ctr-ps", type=float, required=True)
    s.add_argument("--method", help="assisted method whose runs are summarised (all when omitted)")
    s.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    cli.setup_logging(args.log)
    if args.what == "assisted":
        cfg = cli.settings_from_args(args)
        method = {Path(d).parent.parent.name for d in args.runs}
        assisted_figure(args.slice, args.runs, cfg["phantom"], args.out, method.pop() if len(method) == 1 else "")
    elif args.what == "crc":
        crc_figure(of_method(read_tables(args.metrics), args.method), args.out)
    else:
        table = summary_table(of_method(read_tables(args.metrics), args.method), args.ctr_ps)
        with atomic_path(args.out) as tmp:
            table.to_csv(tmp, index=False)
    log.info("wrote %s", args.out)
