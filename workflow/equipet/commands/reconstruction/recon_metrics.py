"""Command-line entry points of :mod:`equipet.reconstruction.recon_metrics` (argparse; the work is done there)."""

from __future__ import annotations

import argparse
import numpy as np
import re
from collections.abc import Sequence
from pathlib import Path

from equipet.reconstruction.recon_metrics import (
    log,
    metrics_rows,
    phantom_rois,
    phantom_truth,
    reference_ratios,
)


def main(argv: Sequence[str] | None = None) -> None:
    """``equipet-recon-metrics``: CRC per rod size and background COV of MLEM images, as a tidy CSV."""
    from equipet.cli import add_common_arguments, run, settings_from_args, setup_logging

    def _main(argv: Sequence[str] | None) -> None:
        import nibabel as nib
        import pandas as pd

        from equipet.errors import InputDataError
        from equipet.files import atomic_path
        from equipet.reconstruction.geometry import image_geometry

        p = argparse.ArgumentParser(prog="equipet-recon-metrics", description=main.__doc__)
        add_common_arguments(p)
        p.add_argument("--images", type=Path, nargs="+", required=True, help="mlem_it{n}.nii.gz files")
        p.add_argument("--ctr-ps", type=float, required=True)
        p.add_argument("--out", type=Path, required=True, help="tidy CSV")
        args = p.parse_args(argv)
        setup_logging(args.log)
        cfg = settings_from_args(args)
        geom = image_geometry(cfg["mlem"])
        rods, bkg, ratio = phantom_rois(cfg.get("phantom", {}), geom, cfg["mlem"]["metrics"])
        fwhms = [float(w) for w in cfg["mlem"]["metrics"].get("reference_fwhm_mm") or []]
        truth = phantom_truth(cfg.get("phantom", {}), geom) if fwhms else None
        references = {w: reference_ratios(truth, rods, bkg, w, geom.voxel_size_mm) for w in fwhms}
        rows = []
        for path in args.images:
            match = re.search(r"_it(\d+)\.nii", path.name)
            it = int(match.group(1)) if match else 0
            try:
                img = np.asarray(nib.load(str(path)).dataobj, dtype=np.float64)
            except Exception as exc:  # nibabel raises many kinds for broken files
                raise InputDataError(f"cannot read the image ({type(exc).__name__}: {exc})", where=str(path),
                                     fix="delete it and rerun the mlem rule that wrote it") from exc
            if img.shape != tuple(geom.shape):
                raise InputDataError(
                    f"image shape {img.shape} is not the mlem grid {tuple(geom.shape)} (mlem.fov_mm / mlem.voxel_size_mm)",
                    where=str(path),
                    fix="pass images reconstructed with the same mlem settings, or rerun the mlem rule")
            rows += metrics_rows(img, rods, bkg, ratio, it, args.ctr_ps, seed=cfg.get("acquisition", {}).get("seed", 0),
                                 references=references)
        df = pd.DataFrame(rows).sort_values(["epoch", "metric"] + (["reference_fwhm_mm"] if fwhms else []))
        with atomic_path(args.out) as tmp:
            df.to_csv(tmp, index=False)
        last = df[df.epoch == df.epoch.max()]
        cols = ["metric", "value"] + (["reference_fwhm_mm"] if fwhms else [])
        log.info("metrics at iteration %d:\n%s", int(df.epoch.max()), last[cols].to_string(index=False))

    run(_main, argv)
