"""Command-line entry points of :mod:`equipet.assisted.methods` (argparse; the work is done there)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from equipet import cli
from equipet.assisted.methods import METHODS, run_assisted, run_assisted_group


def main(argv: Sequence[str] | None = None) -> None:
    """``equipet-assisted``: SCNN/CNN-assisted reconstruction of the central slice of one CTR: one run, or
    several trained together in one process (``--out-root``)."""
    cli.run(_main, argv)


def _main(argv: Sequence[str] | None) -> None:
    p = argparse.ArgumentParser(prog="equipet-assisted", description=main.__doc__)
    cli.add_common_arguments(p)
    p.add_argument("--slice", type=Path, required=True, help="slice.npz from equipet-central-slice")
    p.add_argument("--system", type=Path, help="system.pt from equipet-central-slice (method poisson)")
    p.add_argument("--method", choices=METHODS, nargs="+", required=True)
    p.add_argument("--model", choices=["cnn", "scnn"], nargs="+", required=True)
    p.add_argument("--seed", type=int, nargs="+", required=True)
    out = p.add_mutually_exclusive_group(required=True)
    out.add_argument("--out-dir", type=Path, help="the run's directory (one method, model and seed)")
    out.add_argument("--out-root", type=Path,
                     help="the CTR's assisted directory: every combination of --method, --model and --seed is "
                          "trained together in this process, each into OUT_ROOT/METHOD/MODEL/seedSEED")
    args = p.parse_args(argv)
    cli.setup_logging(args.log)
    if "poisson" in args.method and args.system is None:
        p.error("--method poisson needs --system (the stored slice matrix)")
    cfg = cli.settings_from_args(args)
    runs = [(m, model, seed) for m in args.method for model in args.model for seed in args.seed]
    if args.out_dir is not None:
        if len(runs) > 1:
            p.error(f"--out-dir takes one run, got {len(runs)}; use --out-root to train several together")
        run_assisted(cfg, args.slice, *runs[0], args.out_dir, args.system)
    else:
        run_assisted_group(cfg, args.slice, runs, args.out_root, args.system)
