"""Command-line entry points of :mod:`equipet.brain.image` (argparse; the work is done there)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from equipet.brain.image import brain_slices, log, write_preview


def main(argv: Sequence[str] | None = None) -> None:
    """``equipet-brain``: prepare the benchmark brain slices (npz, optional PNG preview)."""
    from equipet.cli import add_common_arguments, run, settings_from_args, setup_logging

    def _main(argv: Sequence[str] | None) -> None:
        parser = argparse.ArgumentParser(prog="equipet-brain", description=main.__doc__)
        add_common_arguments(parser)
        parser.add_argument("--out", type=Path, required=True, help="output .npz (e.g. resources/brain/brain.npz)")
        parser.add_argument("--preview", type=Path, help="also write a PNG preview of the slices")
        args = parser.parse_args(argv)
        setup_logging(args.log)
        slices = brain_slices(settings_from_args(args))
        slices.save(args.out)
        log.info("wrote %s (%s)", args.out, json.dumps({"train_index": slices.train_index,
                                                        "heldout": slices.heldout_indices}))
        if args.preview is not None:
            write_preview(slices, args.preview)
            log.info("wrote %s", args.preview)

    run(_main, argv)
