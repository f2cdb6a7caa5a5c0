"""Command-line entry points of :mod:`equipet.reconstruction.psf` (argparse; the work is done there)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from equipet.reconstruction.psf import blurred_truth_rows, log, measure_psf


def psf_main(argv: Sequence[str] | None = None) -> None:
    """``equipet-psf``: the reconstructed point-source response at the centre and the rods' radius (JSON)."""
    from equipet.cli import run

    def _main(argv: Sequence[str] | None) -> None:
        from equipet.files import atomic_path
        from equipet.reconstruction.stage import stage_setup
        from equipet.reconstruction.system import SystemModel, tof_kernel_fwhm_mm

        p = argparse.ArgumentParser(prog="equipet-psf", description=psf_main.__doc__)
        p.add_argument("--sensitivity", type=Path, required=True, help="from equipet-sensitivity")
        p.add_argument("--ctr-ps", type=float, required=True, help="coincidence time resolution, ps FWHM")
        p.add_argument("--out", type=Path, required=True, help="psf.json")
        args, cfg, scanner, mlem, phantom, device = stage_setup(p, argv)
        model = SystemModel.from_config(cfg, device, args.ctr_ps, args.sensitivity, with_efficiency=False)
        fwhm = tof_kernel_fwhm_mm(args.ctr_ps, scanner, mlem, model.doi_sigma_mm)
        psf = measure_psf(scanner, phantom, model.acquisition, mlem, model.sensitivity, model.geometry, args.ctr_ps,
                          fwhm, device)
        with atomic_path(args.out) as tmp:
            tmp.write_text(json.dumps(psf, indent=2))

    run(_main, argv)


def blurred_truth_main(argv: Sequence[str] | None = None) -> None:
    """``equipet-crc-blurred-truth``: CRC of the PSF-blurred truth per rod size, PSF position and CTR, next to MLEM's CRC (CSV)."""
    from equipet.cli import add_common_arguments, run, settings_from_args, setup_logging

    def _main(argv: Sequence[str] | None) -> None:
        import pandas as pd

        from equipet.errors import InputDataError
        from equipet.files import atomic_path
        from equipet.reconstruction.geometry import image_geometry
        from equipet.reconstruction.recon_metrics import phantom_rois, phantom_truth

        p = argparse.ArgumentParser(prog="equipet-crc-blurred-truth", description=blurred_truth_main.__doc__)
        add_common_arguments(p)
        p.add_argument("--psf", type=Path, nargs="+", required=True, help="psf.json per CTR (equipet-psf)")
        p.add_argument("--metrics", type=Path, nargs="+", required=True,
                       help="recon metrics.csv per CTR (equipet-recon-metrics), matched by ctr_ps")
        p.add_argument("--out", type=Path, required=True, help="crc_blurred_truth.csv")
        args = p.parse_args(argv)
        setup_logging(args.log)
        cfg = settings_from_args(args)
        geom = image_geometry(cfg["mlem"])
        rods, bkg, ratio = phantom_rois(cfg.get("phantom", {}), geom, cfg["mlem"]["metrics"])
        truth = phantom_truth(cfg.get("phantom", {}), geom)
        mlem_crc: dict[float, dict[float, float]] = {}
        for path in args.metrics:
            try:
                m = pd.read_csv(path)
                last = m[(m["epoch"] == m["epoch"].max()) & m["metric"].str.fullmatch(r"crc_[0-9.]+mm")]
                ctr = float(m["ctr_ps"].iloc[0])
            except (OSError, KeyError, IndexError, pd.errors.ParserError) as exc:
                raise InputDataError(f"cannot read the MLEM metrics ({exc})", where=str(path),
                                     fix="rerun the recon_metrics rule") from exc
            mlem_crc[ctr] = {float(s[4:-2]): float(v) for s, v in zip(last["metric"], last["value"])}
        rows = []
        for path in args.psf:
            try:
                psf = json.loads(Path(path).read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise InputDataError(f"cannot read the PSF ({exc})", where=str(path), fix="rerun the psf rule") from exc
            rows += blurred_truth_rows(psf, truth, rods, bkg, ratio, geom, mlem_crc.get(float(psf["ctr_ps"])))
        df = pd.DataFrame(rows).sort_values(["ctr_ps", "psf_position", "rod_mm"])
        with atomic_path(args.out) as tmp:
            df.to_csv(tmp, index=False)
        log.info("CRC of the PSF-blurred truth:\n%s", df[["ctr_ps", "psf_position", "blur_fwhm_xy_mm", "rod_mm", "crc_blurred_truth",
                                         "crc_mlem", "crc_fraction"]].to_string(index=False))

    run(_main, argv)
