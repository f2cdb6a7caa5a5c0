"""Command-line entry points of :mod:`equipet.reconstruction.mlem` (argparse; the work is done there)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from equipet.reconstruction.corrections import check_corrections
from equipet.reconstruction.mlem import reconstruct, write_sensitivity
from equipet.reconstruction.stage import stage_setup
from equipet.reconstruction.system import SystemModel


def sensitivity_main(argv: Sequence[str] | None = None) -> None:
    """``equipet-sensitivity``: the attenuation-corrected sensitivity image (NIfTI + JSON sidecar)."""
    from equipet.cli import run

    def _main(argv: Sequence[str] | None) -> None:
        p = argparse.ArgumentParser(prog="equipet-sensitivity", description=sensitivity_main.__doc__)
        p.add_argument("--out", type=Path, required=True, help="sensitivity image, .nii.gz")
        p.add_argument("--normalisation", type=Path, default=None,
                       help="from equipet-normalisation; required when mlem.normalisation.enabled")
        args, cfg, scanner, mlem, phantom, device = stage_setup(p, argv)
        model = SystemModel.from_config(cfg, device, normalisation_path=args.normalisation,
                                        stage="equipet-sensitivity")
        write_sensitivity(model, cfg["scanner"], args.out)

    run(_main, argv)


def mlem_main(argv: Sequence[str] | None = None) -> None:
    """``equipet-mlem``: list-mode TOF MLEM of one acquisition, one NIfTI per iteration."""
    from equipet.cli import run

    def _main(argv: Sequence[str] | None) -> None:
        p = argparse.ArgumentParser(prog="equipet-mlem", description=mlem_main.__doc__)
        p.add_argument("--coincidences", type=Path, required=True, help="GATE ROOT file (Coincidences tree)")
        p.add_argument("--sensitivity", type=Path, required=True, help="from equipet-sensitivity")
        p.add_argument("--ctr-ps", type=float, required=True, help="coincidence time resolution, ps FWHM")
        p.add_argument("--out-dir", type=Path, required=True, help="receives mlem_it{n}.nii.gz and timing.json")
        p.add_argument("--normalisation", type=Path, default=None,
                       help="from equipet-normalisation; required with mlem.corrections when "
                            "mlem.normalisation.enabled (the additive term is divided by n_e)")
        args, cfg, scanner, mlem, phantom, device = stage_setup(p, argv)
        corrections = check_corrections(mlem.get("corrections") or [], mlem["events"])
        model = SystemModel.from_config(cfg, device, args.ctr_ps, args.sensitivity, args.normalisation,
                                        with_efficiency=bool(corrections), stage="equipet-mlem")
        reconstruct(model, corrections, args.coincidences, args.out_dir)

    run(_main, argv)
