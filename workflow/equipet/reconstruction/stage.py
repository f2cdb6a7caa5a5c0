"""What every reconstruction command does first: parse its arguments, read the settings, build the
scanner and the ``mlem`` and ``phantom`` sections, set the threads and pick the device."""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from equipet.errors import ConfigError
from equipet.simulation.scanner import Scanner


def add_threads_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (Snakemake passes {threads}); 0 keeps torch's default")


def apply_threads(n: int) -> None:
    if n > 0:
        torch.set_num_threads(n)


def stage_settings(cfg: Mapping[str, Any]) -> tuple[Scanner, dict, dict]:
    try:
        return Scanner.from_config(cfg["scanner"]), dict(cfg["mlem"]), dict(cfg.get("phantom", {}))
    except KeyError as exc:
        raise ConfigError(f"section {exc} missing from the settings", where="--settings",
                          fix="pass the scanner, phantom and mlem sections") from exc


def stage_setup(parser: argparse.ArgumentParser, argv: Sequence[str] | None):
    """Common start of the reconstruction CLIs: shared arguments, logging, threads, settings, device."""
    from equipet.cli import add_common_arguments, settings_from_args, setup_logging
    from equipet.device import select_device

    add_common_arguments(parser)
    add_threads_argument(parser)
    args = parser.parse_args(argv)
    setup_logging(args.log)
    apply_threads(args.threads)
    cfg = settings_from_args(args)
    scanner, mlem, phantom = stage_settings(cfg)
    return args, cfg, scanner, mlem, phantom, select_device(cfg.get("device", "auto"))
