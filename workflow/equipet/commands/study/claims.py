"""Command-line entry points of :mod:`equipet.study.claims` (argparse; the work is done there)."""

from __future__ import annotations

import argparse
import pandas as pd
from collections.abc import Sequence
from pathlib import Path

from equipet import cli
from equipet.files import atomic_path
from equipet.study.claims import alone_times, load_run, log, paper_claims


def main(argv: Sequence[str] | None = None) -> None:
    """``equipet-claims``: the paper's quantitative claims with our measured values and computed verdicts."""
    cli.run(_main, argv)


def _main(argv: Sequence[str] | None) -> None:
    p = argparse.ArgumentParser(prog="equipet-claims", description=main.__doc__)
    cli.add_common_arguments(p)
    p.add_argument("--metrics", type=Path, nargs="+", required=True,
                   help="tidy metric tables (results/tables/metrics.csv, or the per-run assisted files)")
    p.add_argument("--runs", type=Path, nargs="+", required=True, help="run directories (loss.csv, timing.json)")
    p.add_argument("--mlem-timing", type=Path, nargs="*", default=[], help="results/recon/ctr*/timing.json")
    p.add_argument("--out", type=Path, required=True, help="paper_claims.csv")
    p.add_argument("--rules", type=int, choices=[1, 2], default=1,
                   help="1: config/preregistration.md (default); 2: config/preregistration_2.md")
    p.add_argument("--bench", nargs=2, action="append", default=[], metavar=("CTR_PS", "CSV"),
                   help="rules 2: a bench_assisted.py --runs table measured on this CTR's slice (its single-path "
                        "rows are the per-epoch times measured alone on the device); repeat for other CTRs")
    args = p.parse_args(argv)
    cli.setup_logging(args.log)
    cfg = cli.settings_from_args(args)
    metrics = pd.concat([pd.read_csv(f) for f in args.metrics], ignore_index=True)
    table = paper_claims(metrics, [load_run(d) for d in args.runs], cfg["assisted"]["plateau"], args.mlem_timing,
                         rules=args.rules, alone_s_per_epoch=alone_times(args.bench))
    with atomic_path(args.out) as tmp:
        table.to_csv(tmp, index=False)
    log.info("claims:\n%s", table[["claim_id", "ctr_ps", "measured_mean", "verdict"]].to_string(index=False))
