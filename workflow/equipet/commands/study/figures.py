"""Command-line entry points of :mod:`equipet.study.figures` (argparse; the work is done there)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from equipet import cli
from equipet.study.figures import (
    INPUT_LABELS,
    brain_experiment_figure,
    gather_tables,
    generalisation_figure,
    group_action_figure,
    log,
    read_tables,
)


def main(argv: Sequence[str] | None = None) -> None:
    """``equipet-figures``: tables and figures from finished runs."""
    cli.run(_main, argv)


def _main(argv: Sequence[str] | None) -> None:
    p = argparse.ArgumentParser(prog="equipet-figures", description=main.__doc__)
    p.add_argument("--log", type=Path)
    sub = p.add_subparsers(dest="what", required=True)
    t = sub.add_parser("tables", help="tidy metrics.csv and timing.csv")
    t.add_argument("--metrics", type=Path, nargs="+", required=True)
    t.add_argument("--timing", type=Path, nargs="*", default=[])
    t.add_argument("--metrics-out", type=Path, required=True)
    t.add_argument("--timing-out", type=Path, required=True)
    b = sub.add_parser("brain", help="Fig. 2 / Fig. 3 equivalent")
    b.add_argument("--experiment", choices=list(INPUT_LABELS), required=True)
    b.add_argument("--runs", type=Path, nargs="+", required=True, help="run directories")
    b.add_argument("--out", type=Path, required=True)
    g = sub.add_parser("group-action", help="Fig. 6 equivalent")
    g.add_argument("--brain", type=Path, required=True)
    g.add_argument("--group", choices=["C", "D"], required=True)
    g.add_argument("--order", type=int, required=True)
    g.add_argument("--counts", type=float, required=True)
    g.add_argument("--out", type=Path, required=True)
    h = sub.add_parser("generalisation", help="held-out and rotated evaluation")
    h.add_argument("--metrics", type=Path, nargs="+", required=True,
                   help="tidy metric tables: the brain runs' metrics.csv files, or results/tables/metrics.csv")
    h.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    cli.setup_logging(args.log)
    if args.what == "tables":
        gather_tables(args.metrics, args.timing, args.metrics_out, args.timing_out)
    elif args.what == "brain":
        brain_experiment_figure(args.experiment, args.runs, args.out)
    elif args.what == "group-action":
        group_action_figure(args.brain, args.out, args.group, args.order, args.counts)
    else:
        generalisation_figure(read_tables(args.metrics), args.out)
    log.info("wrote %s", getattr(args, "out", None) or args.metrics_out)
