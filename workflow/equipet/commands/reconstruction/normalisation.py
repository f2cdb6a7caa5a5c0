"""Command-line entry points of :mod:`equipet.reconstruction.normalisation` (argparse; the work is done there)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from equipet.files import atomic_path
from equipet.reconstruction.normalisation import blank_radius_mm, blank_scan_normalisation, normalisation_key


def main(argv: Sequence[str] | None = None) -> None:
    """``equipet-normalisation``: crystal-pair efficiency components from a simulated blank scan (JSON)."""
    from equipet.cli import run

    def _main(argv: Sequence[str] | None) -> None:
        from equipet.reconstruction.stage import stage_setup
        from equipet.reconstruction.geometry import key_hash

        p = argparse.ArgumentParser(prog="equipet-normalisation", description=main.__doc__)
        p.add_argument("--out", type=Path, required=True, help="normalisation JSON")
        args, cfg, scanner, mlem, _, _ = stage_setup(p, argv)
        ns = mlem["normalisation"]
        radius = blank_radius_mm(mlem)
        norm, info = blank_scan_normalisation(scanner, radius, ns["blank_decays"], ns["angle_bins"],
                                              ns["chord_pairs"], ns["seed"], cfg.get("acquisition"), progress=True)
        key = normalisation_key(cfg["scanner"], mlem, radius)
        with atomic_path(args.out) as tmp:
            tmp.write_text(json.dumps({"key": key, "key_hash": key_hash(key), **norm.to_json(), **info},
                                      indent=2, default=str))

    run(_main, argv)
