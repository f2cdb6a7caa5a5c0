"""Command-line entry points of :mod:`equipet.simulation.gate_backend` (argparse; the work is done there)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from equipet.simulation.gate_backend import run_gate_job


def main(argv: Sequence[str] | None = None) -> None:
    """``equipet-gate-run``: run one split job of the GATE macros (gate backend)."""
    from equipet.cli import add_common_arguments, run, settings_from_args, setup_logging

    def _main(argv: Sequence[str] | None) -> None:
        p = argparse.ArgumentParser(prog="equipet-gate-run", description=main.__doc__)
        add_common_arguments(p)
        p.add_argument("--macro-dir", type=Path, required=True, help="directory written by equipet-gate-macros")
        p.add_argument("--job", type=int, default=0)
        p.add_argument("--out", type=Path, required=True, help="where to put the job's ROOT file")
        p.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
        args = p.parse_args(argv)
        setup_logging(args.log)
        cfg = settings_from_args(args)
        gate = cfg.get("acquisition", {}).get("gate", {})
        cmd = run_gate_job(gate, args.macro_dir, args.job, args.out, log_file=args.log, dry_run=args.dry_run)
        if args.dry_run:
            print(" ".join(cmd))

    run(_main, argv)
