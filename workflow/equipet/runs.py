"""The outputs of a training run as tables: its tidy CSVs, its loss curve and the labels its
directory encodes (``<results>/<experiment>/[ctr<CTR>/[<method>/]]<model>/seed<N>``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from equipet.errors import InputDataError


def read_table(path: Path) -> pd.DataFrame:
    """Read a CSV written by a stage; a missing or broken file names itself and the fix."""
    try:
        return pd.read_csv(path)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise InputDataError(f"cannot read table ({exc})", where=str(path),
                             fix="rerun the rule that writes it (snakemake --forcerun <rule>)") from exc


def read_tables(paths: Sequence[Path]) -> pd.DataFrame:
    """Concatenate several tidy tables (see :func:`read_table`)."""
    return pd.concat([read_table(Path(p)) for p in paths], ignore_index=True)


def collect_losses(run_dirs: Sequence[Path]) -> pd.DataFrame:
    """Loss curves of several runs as one tidy frame (model, seed, epoch, loss, wall_time_s)."""
    frames = []
    for d in run_dirs:
        df = read_table(Path(d) / "loss.csv")
        for key, value in run_labels(Path(d)).items():
            df[key] = value
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


def run_labels(run_dir: Path) -> dict[str, object]:
    """Experiment, model, seed (and CTR, assisted method) of a run directory.

    Runs live in ``<results>/<experiment>/[ctr<CTR>/[<method>/]]<model>/seed<N>``.

    >>> run_labels(Path("results/assisted/ctr100/paper/scnn/seed2"))
    {'experiment': 'assisted', 'model': 'scnn', 'seed': 2, 'method': 'paper', 'ctr_ps': 100.0}
    >>> run_labels(Path("results/assisted/ctr100/scnn/seed2"))
    {'experiment': 'assisted', 'model': 'scnn', 'seed': 2, 'ctr_ps': 100.0}
    >>> run_labels(Path("results/denoise/cnn/seed0"))
    {'experiment': 'denoise', 'model': 'cnn', 'seed': 0}
    """
    run_dir = Path(run_dir)
    labels: dict[str, object] = {"model": run_dir.parent.name,
                                 "seed": int(run_dir.name.removeprefix("seed"))}
    above = run_dir.parent.parent
    if not above.name.startswith("ctr") and above.parent.name.startswith("ctr"):
        labels["method"] = above.name
        above = above.parent
    if above.name.startswith("ctr"):
        labels["ctr_ps"] = float(above.name.removeprefix("ctr"))
        above = above.parent
    return {"experiment": above.name, **labels}
