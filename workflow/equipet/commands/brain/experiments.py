"""Command-line entry points of :mod:`equipet.brain.experiments` (argparse; the work is done there)."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path

from equipet import cli
from equipet.brain.experiments import run_experiment


def _parser(experiment: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"equipet-{experiment.replace('_', '-')}",
                                description=f"train one network on the {experiment} brain experiment")
    cli.add_common_arguments(p)
    p.add_argument("--brain", type=Path, required=True, help="brain slices .npz from equipet-brain")
    p.add_argument("--model", choices=["cnn", "scnn"], required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--out-dir", type=Path, required=True)
    return p


def _main_for(experiment: str) -> Callable[[Sequence[str] | None], None]:
    def _main(argv: Sequence[str] | None) -> None:
        args = _parser(experiment).parse_args(argv)
        cli.setup_logging(args.log)
        cfg = cli.settings_from_args(args)
        run_experiment(experiment, cfg, args.brain, args.model, args.seed, args.out_dir)
    return _main


def denoise_main(argv: Sequence[str] | None = None) -> None:
    """``equipet-denoise``: paper III-A for one model and seed."""
    cli.run(_main_for("denoise"), argv)


def radon_recon_main(argv: Sequence[str] | None = None) -> None:
    """``equipet-radon-recon``: paper III-B for one model and seed."""
    cli.run(_main_for("radon_recon"), argv)
