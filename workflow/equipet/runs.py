"""The outputs of a training run as tables: its tidy CSVs, its loss curve and the labels its
directory encodes (``<results>/<experiment>/[ctr<CTR>/[<method>/]]<model>/seed<N>``), and the
analysis of a loss curve (running mean, plateau epoch). numpy and pandas only: the commands
that read finished runs (claims, tables, figures) import no network library."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
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


def running_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over ``window`` values (fewer at the start).

    >>> running_mean(np.array([3.0, 1.0, 2.0, 0.0]), 2).tolist()
    [3.0, 2.0, 1.5, 1.0]
    """
    v = np.asarray(values, dtype=np.float64)
    c = np.concatenate([[0.0], np.cumsum(v)])
    k = np.arange(1, len(v) + 1)
    lo = np.maximum(k - window, 0)
    return (c[k] - c[lo]) / (k - lo)


def plateau_epoch(losses: np.ndarray, window: int, tolerance: float) -> int:
    """First epoch (1-based) at which the loss reaches its plateau (``assisted.plateau``).

    With ``m_k`` the trailing running mean over ``window`` epochs, ``m_min = min_k m_k`` and
    ``m_ref = max_{k >= 2 window} m_k`` (the largest mean over a window that starts after the
    first window, so that the transient of a randomly initialised network does not set the
    scale; all ``k`` when the curve is shorter): the first ``k`` with
    ``m_k - m_min <= tolerance (m_ref - m_min)``. Independent of the loss's scale and offset;
    a curve that never decreases gives 1.

    >>> plateau_epoch(np.r_[np.linspace(1.0, 0.0, 101), np.zeros(100)], window=1, tolerance=0.05)
    97
    """
    losses = np.asarray(losses, dtype=np.float64)
    if losses.size == 0:
        return 0
    m = running_mean(losses, window)
    m_min = float(m.min())
    start = 2 * window - 1 if len(m) >= 2 * window else 0
    drop = float(m[start:].max()) - m_min
    if not drop > 0:
        return 1
    return int(np.argmax(m - m_min <= tolerance * drop)) + 1


def loss_summary(losses: np.ndarray, wall_time_s: np.ndarray, plateau_cfg: Mapping[str, Any]) -> dict[str, float]:
    """Plateau epoch and time, minimum and final loss, total time and time per epoch of one curve."""
    k = plateau_epoch(losses, plateau_cfg["window"], plateau_cfg["tolerance"])
    total = float(wall_time_s[-1]) if len(wall_time_s) else 0.0
    return {"plateau_epoch": float(k), "plateau_time_s": float(wall_time_s[k - 1]) if k else float("nan"),
            "min_loss": float(np.min(losses)), "final_loss": float(losses[-1]), "total_time_s": total,
            "s_per_epoch": total / max(len(losses), 1)}
