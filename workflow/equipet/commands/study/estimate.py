"""Command-line entry points of :mod:`equipet.study.estimate` (argparse; the work is done there)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import torch
from collections.abc import Sequence
from pathlib import Path

from equipet import cli
from equipet.study.estimate import (
    DEFAULT_CONFIG,
    REPO,
    available_cores,
    calibrate,
    dry_run_jobs,
    estimate,
    load_run_config,
    report,
    runs_of_groups,
)


def main(argv: Sequence[str] | None = None) -> None:
    """``equipet-estimate``: the jobs and expected wall time of a workflow run on this machine."""
    cli.run(_main, argv)


def _main(argv: Sequence[str] | None) -> None:
    p = argparse.ArgumentParser(prog="equipet-estimate", description=main.__doc__)
    p.add_argument("--configfile", "--configfiles", nargs="+", default=[], metavar="YAML",
                   help=f"config files as given to Snakemake (after {DEFAULT_CONFIG}, which is always read)")
    p.add_argument("--device", default=None, help="auto, cpu or cuda[:N] (default: the config's device)")
    p.add_argument("--cores", type=int, default=0, help="CPU cores Snakemake will use (default: all available)")
    p.add_argument("--workdir", type=Path, default=REPO, help="the workflow's directory (holds the Snakefile)")
    p.add_argument("--json", type=Path, help="also write the measured costs and the stages as JSON")
    p.add_argument("--log", type=Path, help="also append the log to this file")
    args = p.parse_args(argv)
    cli.setup_logging(args.log)
    logging.getLogger().setLevel(logging.WARNING)   # the calibration's stages would log every step
    from equipet.device import select_device

    cores = args.cores or available_cores()
    cfg = load_run_config(args.configfile, args.workdir)
    device = select_device(args.device or cfg["device"])
    if device.type == "cpu":
        # the timed rules other than training run with at most 2 threads (their `threads:`), and so
        # does the calibration; training jobs (`training_threads`) are scaled from it (module doc)
        torch.set_num_threads(max(1, min(2, cores)))
    jobs = runs_of_groups(dry_run_jobs(args.configfile, cores, args.workdir), cfg)
    costs = calibrate(cfg, device, jobs)
    stages = estimate(jobs, cfg, costs)
    print(report(stages, costs, cfg, args.configfile, cores), flush=True)
    if args.json:
        from equipet.files import atomic_path

        with atomic_path(args.json) as tmp:
            tmp.write_text(json.dumps({
                "configfiles": [DEFAULT_CONFIG, *args.configfile], "cores": cores, "costs": costs.to_dict(),
                "stages": [{"name": s.name, "jobs": s.jobs, "serial_s": s.serial_s, "wall_s": s.wall_s(cores),
                            "timed": s.timed, "gpu": s.gpu} for s in stages],
                "wall_s": sum(s.wall_s(cores) for s in stages),
                "jobs": [dataclasses.asdict(j) for j in jobs]}, indent=2) + "\n")
