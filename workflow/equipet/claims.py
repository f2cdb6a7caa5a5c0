"""The paper's quantitative claims, measured on our runs, each with a computed verdict.

``equipet-claims`` writes ``paper_claims.csv``: one row per claim (per CTR for the assisted
claims) with the paper's value, our value (mean and sd over seeds, ``n`` seeds), the rule
and the verdict, one of

* ``reproduced`` / ``not reproduced``: the rule of the claim holds / fails on our numbers;
* ``not comparable``: our numbers cannot test the claim, for a stated reason:

  - **scale**: the run is shorter than the claim's epochs (a quick run);
  - **loss normalisation**: an absolute loss value (0.015, 0.14, 0.02) depends on how the
    image and the measurement are normalised (intensity range, sinogram size, Radon
    implementation, mean vs sum), which the paper does not give; only ratios of losses of
    the same experiment are scale-free, and those are tested instead;
  - **device**: a wall time, or a ratio of wall times, measured on a CPU says nothing about
    the paper's GPU (NVIDIA TITAN RTX); on a GPU, absolute times are compared within a
    factor ``TIME_TOLERANCE`` (another GPU model), ratios of times within a factor 2.

Loss at an epoch means the trailing running mean over ``assisted.plateau.window`` epochs
(the same smoothing as the plateau detection of :func:`equipet.assisted.plateau_epoch`), so
that one noisy epoch does not decide a verdict.

Rules (``paper`` is the paper's value, ``m`` our mean over seeds):

==============================  ==================================================  ==========================
claim                           measured                                            reproduced when
==============================  ==================================================  ==========================
denoise_scnn1000_vs_cnn2000     SCNN loss(1000) / CNN loss(2000)                    m <= 1
denoise/radon/assisted times    total wall time (s), per model                      GPU and m within x3 of paper
*_time_ratio_scnn_cnn           SCNN / CNN total time                               GPU and 1/2 <= m/paper <= 2
radon_min_loss_{scnn,cnn}       minimum loss                                        not comparable (normalisation)
radon_min_loss_ratio            CNN min loss / SCNN min loss (paper 0.14/0.015)     m >= paper / 2
radon_scnn500_vs_cnn_min        SCNN loss(500) / CNN min loss (paper 0.02/0.14)     m <= 1
radon_speedup_epochs            5000 / epoch SCNN first reaches CNN's min loss      m >= paper / 2
radon_speedup_time              CNN time(5000) / SCNN time to reach CNN's min       GPU and m >= paper / 2
assisted_scnn_smallest_resolved smallest rod size with all sizes >= it resolved     m <= 3.5
assisted_cnn_smallest_resolved  same, CNN                                           4.5 < m <= 5.5
assisted_scnn_plateau_epoch     plateau epoch of the SCNN loss                      m <= 1000
assisted_scnn_plateau_time      SCNN wall time at its plateau (s)                   GPU and m within x3 of 15 s
assisted_mlem_iteration_time    one MLEM iteration (s), from the mlem timing.json   GPU and m within x3 of 2112 s
==============================  ==================================================  ==========================

Smallest resolved size is ``NONE_RESOLVED_MM`` (10 mm) when even the largest rods are not.
Resolved: valley-to-peak ratio at most ``assisted.metrics.resolved_vpr_max`` on the last
snapshot (:mod:`equipet.rod_metrics`).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from equipet import cli
from equipet.assisted import plateau_epoch, running_mean
from equipet.figures import run_labels
from equipet.errors import InputDataError
from equipet.files import atomic_path

log = logging.getLogger("equipet.claims")

REPRODUCED, NOT_REPRODUCED, NOT_COMPARABLE = "reproduced", "not reproduced", "not comparable"
TIME_TOLERANCE = 3.0
PAPER_EPOCHS = {"denoise": 2000, "radon_recon": 5000, "assisted": 60000}
PAPER_DEVICE = "NVIDIA TITAN RTX GPU"
#: "smallest resolved rod" when not even the largest rods are resolved (larger than every rod)
NONE_RESOLVED_MM = 10.0
COLUMNS = ["claim_id", "section", "claim", "ctr_ps", "paper_value", "unit", "measured_mean", "measured_sd",
           "n", "rule", "verdict", "reason"]


@dataclass
class Run:
    """One training run: its loss curve, wall times and timing.json."""

    experiment: str
    model: str
    seed: int
    ctr_ps: float | None
    losses: np.ndarray
    wall_time_s: np.ndarray
    device: str

    @property
    def epochs(self) -> int:
        return int(len(self.losses))


def load_run(run_dir: Path) -> Run:
    """Read ``loss.csv`` and ``timing.json`` of ``results/<experiment>/<model>/seed<s>`` or
    ``results/assisted/ctr<ctr>/<model>/seed<s>``."""
    run_dir = Path(run_dir)
    try:
        loss = pd.read_csv(run_dir / "loss.csv")
        timing = json.loads((run_dir / "timing.json").read_text())
    except (OSError, ValueError) as exc:
        raise InputDataError(f"cannot read the run's loss.csv/timing.json ({exc})", where=str(run_dir),
                             fix="rerun the training rule of this run") from exc
    labels = run_labels(run_dir)
    return Run(labels["experiment"], labels["model"], labels["seed"], labels.get("ctr_ps"),
               loss["loss"].to_numpy(float), loss["wall_time_s"].to_numpy(float), str(timing.get("device", "?")))


def _stats(values: Sequence[float]) -> tuple[float, float, int]:
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=float)
    if v.size == 0:
        return float("nan"), float("nan"), 0
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0, int(v.size)


class ClaimTable:
    """Accumulates claim rows; every verdict goes through :meth:`add`."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def add(self, claim_id: str, section: str, claim: str, paper: float, unit: str, values: Sequence[float],
            rule: str, holds: Callable[[float], bool] | None, not_comparable: str | None = None,
            ctr_ps: float | None = None) -> dict[str, Any]:
        mean, sd, n = _stats(values)
        if not_comparable:
            verdict, reason = NOT_COMPARABLE, not_comparable
        elif n == 0:
            verdict, reason = NOT_COMPARABLE, "no finite measurement (runs missing or the event never happened)"
        elif holds is None:
            verdict, reason = NOT_COMPARABLE, "no rule"
        else:
            ok = bool(holds(mean))
            verdict, reason = (REPRODUCED if ok else NOT_REPRODUCED), f"measured {mean:.4g} vs paper {paper:g}"
        row = {"claim_id": claim_id, "section": section, "claim": claim, "ctr_ps": ctr_ps, "paper_value": paper,
               "unit": unit, "measured_mean": mean, "measured_sd": sd, "n": n, "rule": rule,
               "verdict": verdict, "reason": reason}
        self.rows.append(row)
        return row

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=COLUMNS)


# --------------------------------------------------------------------------- helpers


def smoothed_at(run: Run, epoch: int, window: int) -> float:
    """Running-mean loss at ``epoch`` (1-based), NaN beyond the run."""
    if epoch > run.epochs or epoch < 1:
        return float("nan")
    return float(running_mean(run.losses[:epoch], window)[-1])


def first_epoch_below(run: Run, level: float, window: int) -> float:
    """First epoch whose running-mean loss is <= ``level`` (NaN if never)."""
    m = running_mean(run.losses, window)
    hit = np.flatnonzero(m <= level)
    return float(hit[0] + 1) if hit.size else float("nan")


def scale_reason(runs: Sequence[Run], needed: int) -> str | None:
    if not runs:
        return "no runs"
    short = min(r.epochs for r in runs)
    return None if short >= needed else f"scale: runs of {short} epochs, the claim needs {needed}"


def device_reason(runs: Sequence[Run]) -> str | None:
    devices = sorted({r.device for r in runs})
    if not devices:
        return "no runs"
    if all(d.startswith("cuda") for d in devices):
        return None
    return f"device: measured on {', '.join(devices)}; the paper's times are from an {PAPER_DEVICE}"


def _within(factor: float, paper: float) -> Callable[[float], bool]:
    return lambda m: paper / factor <= m <= paper * factor


def _join(*reasons: str | None) -> str | None:
    r = list(dict.fromkeys(x for x in reasons if x))     # drop repeats, keep the order
    return "; ".join(r) if r else None


def loss_instability(losses: Sequence[float] | np.ndarray) -> float:
    """Instability ``U`` of a loss curve (``config/preregistration.md``, section 4).

    With ``l_k = log10 L_k`` and ``k*`` the epoch of the minimum loss,

        U = sum_{k < k*} max(0, l_{k+1} - l_k) / (l_1 - l_{k*}),

    the total rise of the log-loss on the way to its minimum relative to its net fall:
    0 for a monotone decrease, larger for every spike. Scale-free; the epochs after the
    minimum do not count. NaN when the loss never falls below its first value (or is not
    positive).

    >>> loss_instability([4.0, 2.0, 1.0])
    0.0
    >>> round(loss_instability([4.0, 8.0, 4.0, 1.0]), 6)    # one doubling on a 4x fall
    0.5
    """
    l = np.asarray(losses, dtype=float)
    if l.size < 2 or not np.all(np.isfinite(l)) or np.any(l <= 0):
        return float("nan")
    l = np.log10(l)
    k_min = int(np.argmin(l))
    fall = l[0] - l[k_min]
    if not fall > 0:
        return float("nan")
    rises = np.clip(np.diff(l[: k_min + 1]), 0.0, None).sum()
    return float(rises / fall)


def smallest_resolved(resolved: Mapping[float, float]) -> float:
    """Smallest rod size ``d`` such that every size ``>= d`` is resolved (inf when the largest is not).

    >>> smallest_resolved({6.5: 1, 5.5: 1, 4.5: 0, 3.5: 1})
    5.5
    """
    out = math.inf
    for d in sorted(resolved, reverse=True):
        if resolved[d] >= 0.5:
            out = d
        else:
            break
    return out


# --------------------------------------------------------------------------- the claims


def brain_claims(table: ClaimTable, runs: Sequence[Run], window: int) -> None:
    by = lambda e, m: [r for r in runs if r.experiment == e and r.model == m]  # noqa: E731
    # ---- denoising (III-A, IV)
    scnn, cnn = by("denoise", "scnn"), by("denoise", "cnn")
    cnn2000 = _stats([smoothed_at(r, 2000, window) for r in cnn])[0]
    table.add("denoise_scnn1000_vs_cnn2000", "III-A/IV", "denoising: SCNN reaches CNN's 2000-epoch loss by 1000 epochs",
              1.0, "ratio", [smoothed_at(r, 1000, window) / cnn2000 for r in scnn],
              "SCNN loss(1000) / mean CNN loss(2000) <= 1", lambda m: m <= 1.0,
              scale_reason(scnn + cnn, PAPER_EPOCHS["denoise"]))
    _time_claims(table, "denoise", "III-A", scnn, cnn, {"cnn": 104.0, "scnn": 106.0}, PAPER_EPOCHS["denoise"])
    # ---- reconstruction (III-B, IV)
    scnn, cnn = by("radon_recon", "scnn"), by("radon_recon", "cnn")
    scale = scale_reason(scnn + cnn, PAPER_EPOCHS["radon_recon"])
    norm = "loss normalisation: absolute loss values depend on the image/sinogram normalisation the paper does not give"
    for model, paper in (("scnn", 0.015), ("cnn", 0.14)):
        table.add(f"radon_min_loss_{model}", "III-B", f"reconstruction: minimum loss of {model.upper()} {paper}",
                  paper, "loss", [float(running_mean(r.losses, window).min()) for r in by("radon_recon", model)],
                  "absolute value: not testable", None, norm)
    cnn_min = _stats([float(running_mean(r.losses, window).min()) for r in cnn])[0]
    table.add("radon_min_loss_ratio", "III-B", "reconstruction: minimum loss SCNN 0.015 against CNN 0.14",
              0.14 / 0.015, "ratio", [cnn_min / float(running_mean(r.losses, window).min()) for r in scnn],
              "CNN min loss / SCNN min loss >= paper / 2", lambda m: m >= 0.14 / 0.015 / 2, scale)
    table.add("radon_scnn500_vs_cnn_min", "IV", "reconstruction: SCNN at 0.02 by 500 epochs (CNN 0.14 after 5000)",
              0.02 / 0.14, "ratio", [smoothed_at(r, 500, window) / cnn_min for r in scnn],
              "SCNN loss(500) / CNN min loss <= 1", lambda m: m <= 1.0, scale)
    reach = [first_epoch_below(r, cnn_min, window) for r in scnn]
    table.add("radon_speedup_epochs", "IV", "speed: ~10x fewer epochs (SCNN reaches CNN's best loss)", 10.0, "ratio",
              [PAPER_EPOCHS["radon_recon"] / e if np.isfinite(e) else 0.0 for e in reach],
              "5000 / epoch SCNN reaches CNN's min loss >= paper / 2", lambda m: m >= 5.0, scale)
    cnn_time = _stats([r.wall_time_s[-1] for r in cnn])[0]
    times = [r.wall_time_s[int(e) - 1] if np.isfinite(e) else math.inf for r, e in zip(scnn, reach)]
    table.add("radon_speedup_time", "IV", "speed: ~9x less time", 766.0 / 87.0, "ratio",
              [cnn_time / t for t in times], "CNN time(5000) / SCNN time to CNN's min loss >= paper / 2",
              lambda m: m >= 766.0 / 87.0 / 2, _join(scale, device_reason(scnn + cnn)))
    _time_claims(table, "radon_recon", "III-B", scnn, cnn, {"cnn": 766.0, "scnn": 784.0}, PAPER_EPOCHS["radon_recon"])
    table.add("radon_time_scnn_500", "III-B", "reconstruction: SCNN takes 87 s for 500 epochs", 87.0, "s",
              [r.wall_time_s[499] if r.epochs >= 500 else float("nan") for r in scnn],
              f"GPU and within x{TIME_TOLERANCE:g} of the paper", _within(TIME_TOLERANCE, 87.0),
              _join(scale_reason(scnn, 500), device_reason(scnn)))


def _time_claims(table: ClaimTable, experiment: str, section: str, scnn: Sequence[Run], cnn: Sequence[Run],
                 paper: Mapping[str, float], epochs: int, ctr_ps: float | None = None) -> None:
    label = {"denoise": "denoising", "radon_recon": "reconstruction", "assisted": "assisted reconstruction"}[experiment]
    for model, runs in (("cnn", cnn), ("scnn", scnn)):
        table.add(f"{experiment}_time_{model}", section,
                  f"{label}: {model.upper()} takes {paper[model]:g} s for {epochs} epochs", paper[model], "s",
                  [r.wall_time_s[-1] for r in runs], f"GPU and within x{TIME_TOLERANCE:g} of the paper",
                  _within(TIME_TOLERANCE, paper[model]), _join(scale_reason(runs, epochs), device_reason(runs)),
                  ctr_ps)
    cnn_t = _stats([r.wall_time_s[-1] for r in cnn])[0]
    table.add(f"{experiment}_time_ratio_scnn_cnn", section,
              f"{label}: SCNN and CNN take similar time ({paper['scnn']:g} s vs {paper['cnn']:g} s)",
              paper["scnn"] / paper["cnn"], "ratio", [r.wall_time_s[-1] / cnn_t for r in scnn],
              "GPU and within x2 of the paper's ratio", _within(2.0, paper["scnn"] / paper["cnn"]),
              _join(scale_reason(scnn + cnn, epochs), device_reason(scnn + cnn)), ctr_ps)


def assisted_claims(table: ClaimTable, runs: Sequence[Run], metrics: pd.DataFrame, window: int,
                    tolerance: float, mlem_iteration_s: Mapping[float, list[float]]) -> None:
    assisted = [r for r in runs if r.experiment == "assisted"]
    ctrs = sorted({r.ctr_ps for r in assisted} | set(metrics.get("ctr_ps", pd.Series(dtype=float)).dropna().unique()))
    m = metrics[(metrics["experiment"] == "assisted") & (metrics["metric"] == "resolved")
                & (metrics.get("split") == "train")] if len(metrics) else metrics
    for ctr in ctrs:
        by = lambda model: [r for r in assisted if r.model == model and r.ctr_ps == ctr]  # noqa: E731
        scnn, cnn = by("scnn"), by("cnn")
        scale = scale_reason(scnn + cnn, PAPER_EPOCHS["assisted"])
        for model, paper, rule, holds in (
                ("scnn", 3.5, "all rods >= 3.5 mm resolved", lambda v: v <= 3.5),
                ("cnn", 5.5, "5.5 and 6.5 mm resolved, 4.5 mm not", lambda v: 4.5 < v <= 5.5)):
            values = []
            sel = m[(m["model"] == model) & (m["ctr_ps"] == ctr)] if len(m) else m
            for _, g in sel.groupby("seed"):
                last = g[g["epoch"] == g["epoch"].max()]
                values.append(smallest_resolved(dict(zip(last["rod_mm"], last["value"]))))
            values = [v if np.isfinite(v) else NONE_RESOLVED_MM for v in values]
            who = "resolves the 3.5 to 6.5 mm rods" if model == "scnn" else "resolves only the 5.5 and 6.5 mm rods"
            table.add(f"assisted_{model}_smallest_resolved", "III-C/IV", f"assisted: {model.upper()} {who}", paper,
                      "mm", values, rule, holds, scale, ctr)
        table.add("assisted_scnn_plateau_epoch", "IV", "assisted: SCNN converges in 1000 epochs", 1000.0, "epoch",
                  [plateau_epoch(r.losses, window, tolerance) for r in scnn], "plateau epoch <= 1000",
                  lambda v: v <= 1000.0, scale, ctr)
        table.add("assisted_scnn_plateau_time", "IV", "assisted: SCNN converges in 15 s", 15.0, "s",
                  [r.wall_time_s[plateau_epoch(r.losses, window, tolerance) - 1] for r in scnn],
                  f"GPU and within x{TIME_TOLERANCE:g} of the paper", _within(TIME_TOLERANCE, 15.0),
                  _join(scale, device_reason(scnn)), ctr)
        _time_claims(table, "assisted", "IV", scnn, cnn, {"cnn": 821.0, "scnn": 870.0}, PAPER_EPOCHS["assisted"], ctr)
        its = mlem_iteration_s.get(ctr, [])
        table.add("assisted_mlem_iteration_time", "IV", "list-mode MLEM takes ~2112 s per iteration", 2112.0, "s",
                  its, f"GPU and within x{TIME_TOLERANCE:g} of the paper", _within(TIME_TOLERANCE, 2112.0),
                  None if its and mlem_iteration_s.get(("device", ctr), "").startswith("cuda")
                  else f"device: MLEM ran on {mlem_iteration_s.get(('device', ctr), 'unknown')}; "
                       f"the paper's time is from an {PAPER_DEVICE} (and the quick config reconstructs fewer events)",
                  ctr)


def paper_claims(metrics: pd.DataFrame, runs: Sequence[Run], plateau_cfg: Mapping[str, Any],
                 mlem_timings: Sequence[Path] = ()) -> pd.DataFrame:
    """The claims table (module doc) from the tidy metrics, the runs and the MLEM timing files."""
    table = ClaimTable()
    window, tol = int(plateau_cfg["window"]), float(plateau_cfg["tolerance"])
    brain_claims(table, runs, window)
    mlem: dict[Any, Any] = {}
    for f in mlem_timings:
        t = json.loads(Path(f).read_text())
        ctr = float(t.get("ctr_ps", Path(f).parent.name.removeprefix("ctr")))
        mlem[ctr] = list(t.get("iterations_s", []))
        mlem[("device", ctr)] = str(t.get("device", "?"))
    assisted_claims(table, runs, metrics, window, tol, mlem)
    return table.frame()


def main(argv: Sequence[str] | None = None) -> None:
    """``equipet-claims``: the paper's quantitative claims with our measured values and computed verdicts."""
    cli.run(_main, argv)


def _main(argv: Sequence[str] | None) -> None:
    p = argparse.ArgumentParser(prog="equipet-claims", description=main.__doc__)
    cli.add_common_arguments(p)
    p.add_argument("--metrics", type=Path, nargs="+", required=True,
                   help="tidy metric tables (results/tables/metrics.csv, or the per-run assisted files)")
    p.add_argument("--runs", type=Path, nargs="+", required=True, help="run directories (loss.csv, timing.json)")
    p.add_argument("--mlem-timing", type=Path, nargs="*", default=[], help="results/recon/ctr*/timing.json")
    p.add_argument("--out", type=Path, required=True, help="paper_claims.csv")
    args = p.parse_args(argv)
    cli.setup_logging(args.log)
    cfg = cli.settings_from_args(args)
    metrics = pd.concat([pd.read_csv(f) for f in args.metrics], ignore_index=True)
    table = paper_claims(metrics, [load_run(d) for d in args.runs], cfg["assisted"]["plateau"], args.mlem_timing)
    with atomic_path(args.out) as tmp:
        table.to_csv(tmp, index=False)
    log.info("claims:\n%s", table[["claim_id", "ctr_ps", "measured_mean", "verdict"]].to_string(index=False))
