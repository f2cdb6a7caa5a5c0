"""Command-line entry points of :mod:`equipet.assisted.central_slice` (argparse; the work is done there)."""

from __future__ import annotations

import argparse
import numpy as np
from collections.abc import Sequence
from pathlib import Path

from equipet import cli
from equipet.files import atomic_path
from equipet.assisted.central_slice import baseline_rows, extract_slice, log, write_slice_system_matrix


def main(argv: Sequence[str] | None = None) -> None:
    """``equipet-central-slice``: the central slice, its events and the MLEM baselines of one CTR."""
    cli.run(_main, argv)


def _main(argv: Sequence[str] | None) -> None:
    import pandas as pd

    p = argparse.ArgumentParser(prog="equipet-central-slice", description=main.__doc__)
    cli.add_common_arguments(p)
    p.add_argument("--mlem-dir", type=Path, required=True, help="directory with mlem_it{n}.nii.gz")
    p.add_argument("--sensitivity", type=Path, required=True, help="sensitivity.nii.gz of equipet-sensitivity")
    p.add_argument("--coincidences", type=Path, required=True, help="GATE ROOT file of this CTR")
    p.add_argument("--ctr-ps", type=float, required=True)
    p.add_argument("--out", type=Path, required=True, help="slice.npz")
    p.add_argument("--baselines-out", type=Path, required=True, help="tidy CSV of the MLEM baselines")
    p.add_argument("--additive", type=Path,
                   help="additive.npz of equipet-mlem (per-event randoms + scatter; needed with mlem.corrections)")
    p.add_argument("--system-out", type=Path, help="system.pt: the slice's stored system matrix (torch.save)")
    args = p.parse_args(argv)
    cli.setup_logging(args.log)
    cfg = cli.settings_from_args(args)
    data = extract_slice(cfg, args.mlem_dir, args.sensitivity, args.coincidences, args.ctr_ps, args.additive)
    rows, images = baseline_rows(cfg, data)
    data.update({f"baseline_{k}": v[2].astype(np.float32) for k, v in images.items()})
    data.update({f"baseline_{k}_iteration": np.asarray(v[0]) for k, v in images.items()})
    data.update({f"baseline_{k}_fwhm_mm": np.asarray(v[1]) for k, v in images.items()})
    with atomic_path(args.out) as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(fh, **data)
    with atomic_path(args.baselines_out) as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False)
    if args.system_out is not None:
        system = write_slice_system_matrix(data, cfg, args.system_out)
        log.info("wrote %s: %d events, %d non-zeros (%.0f MB, A alone)", args.system_out,
                 system.n_events, system.nnz, system.nbytes / 1e6)
    log.info("wrote %s (%d events) and %s", args.out, len(data["tof"]), args.baselines_out)
