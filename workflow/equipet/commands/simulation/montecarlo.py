"""Command-line entry points of :mod:`equipet.simulation.montecarlo` (argparse; the work is done there)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from equipet.simulation.montecarlo import log, simulator_from_settings


def main(argv: Sequence[str] | None = None) -> None:
    """``equipet-simulate``: one time-slice job of the embedded Monte Carlo -> GATE ROOT file."""
    from equipet.cli import add_common_arguments, run, settings_from_args, setup_logging
    from equipet.errors import ConfigError

    def _main(argv: Sequence[str] | None) -> None:
        p = argparse.ArgumentParser(prog="equipet-simulate", description=main.__doc__)
        add_common_arguments(p)
        p.add_argument("--ctr-ps", type=float, required=True, help="coincidence time resolution, ps FWHM")
        p.add_argument("--job", type=int, default=0, help="job index in 0..acquisition.n_jobs-1")
        p.add_argument("--out", type=Path, required=True, help="output ROOT file (GATE Coincidences tree)")
        args = p.parse_args(argv)
        setup_logging(args.log)
        cfg = settings_from_args(args)
        sim = simulator_from_settings(cfg)
        if not 0 <= args.job < sim.acq.n_jobs:
            raise ConfigError(f"--job {args.job} is outside 0..{sim.acq.n_jobs - 1}",
                              where="acquisition.n_jobs", fix="pass a job index below acquisition.n_jobs")
        log.info("phantom activity %.4g Bq, scanner radius %.1f mm, %d jobs", sim.activity_bq,
                 sim.scanner.radius_mm, sim.acq.n_jobs)
        sim.run_job(args.job, args.ctr_ps, args.out)

    run(_main, argv)
