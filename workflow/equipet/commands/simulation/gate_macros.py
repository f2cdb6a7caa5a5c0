"""Command-line entry points of :mod:`equipet.simulation.gate_macros` (argparse; the work is done there)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from equipet.simulation.gate_macros import write_macros


def main(argv: Sequence[str] | None = None) -> None:
    """``equipet-gate-macros``: write the GATE 9.3+ macro set of one CTR."""
    from equipet.cli import add_common_arguments, run, settings_from_args, setup_logging

    def _main(argv: Sequence[str] | None) -> None:
        p = argparse.ArgumentParser(prog="equipet-gate-macros", description=main.__doc__)
        add_common_arguments(p)
        p.add_argument("--ctr-ps", type=float, required=True, help="coincidence time resolution, ps FWHM")
        p.add_argument("--out-dir", type=Path, required=True, help="directory receiving main.mac and the rest")
        args = p.parse_args(argv)
        setup_logging(args.log)
        write_macros(settings_from_args(args), args.ctr_ps, args.out_dir)

    run(_main, argv)
