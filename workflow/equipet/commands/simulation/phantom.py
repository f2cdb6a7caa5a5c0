"""Command-line entry points of :mod:`equipet.simulation.phantom` (argparse; the work is done there)."""

from __future__ import annotations

import argparse
import numpy as np
from collections.abc import Sequence
from pathlib import Path

from equipet.simulation.phantom import hot_rod_phantom, log, save_maps_nifti


def main(argv: Sequence[str] | None = None) -> None:
    """``equipet-phantom``: ground-truth maps (NIfTI), rod table and Fig. 1 of the phantom."""
    from equipet.cli import add_common_arguments, run, settings_from_args, setup_logging

    def _main(argv: Sequence[str] | None) -> None:
        p = argparse.ArgumentParser(prog="equipet-phantom", description=main.__doc__)
        add_common_arguments(p)
        p.add_argument("--activity", type=Path, required=True, help="activity map (Bq/mL), .nii.gz")
        p.add_argument("--mu", type=Path, required=True, help="attenuation map (1/mm), .nii.gz")
        p.add_argument("--rods", type=Path, help="rod table CSV")
        p.add_argument("--fig", type=Path, help="Fig. 1 image (png/pdf)")
        args = p.parse_args(argv)
        setup_logging(args.log)
        cfg = settings_from_args(args)
        ph = hot_rod_phantom(cfg.get("phantom", {}))
        maps = ph.voxelise(ph.truth_voxel_size_mm)
        save_maps_nifti(maps, args.activity, args.mu)
        log.info("phantom: %d rods, total activity %.4g Bq, maps %s at %.3g mm",
                 len(ph.rods), ph.total_activity_bq(), maps.shape, maps.voxel_size_mm)
        if args.rods:
            from equipet.files import atomic_path

            with atomic_path(args.rods) as tmp:
                np.savetxt(tmp, ph.rods, delimiter=",", header="x_mm,y_mm,diameter_mm,sector",
                           comments="", fmt=["%.4f", "%.4f", "%.3f", "%d"])
        if args.fig:
            ph.plot_fig1(args.fig)

    run(_main, argv)
