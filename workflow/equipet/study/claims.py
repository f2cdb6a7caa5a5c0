"""The paper's quantitative claims, measured on our runs, each with a computed verdict.

The rules are pre-registered in ``config/preregistration.md``; this module applies them.
``equipet-claims`` writes ``paper_claims.csv`` (or ``paper_claims_brain.csv``): one row per
claim (per CTR and assisted method for the assisted claims, per scope for the brain claims)
with the paper's value, our value (mean and sd of the per-seed statistic, ``n`` seeds or seed
pairs, ``seeds_met`` of them meeting the rule), the rule and the verdict, one of

* ``reproduced``: at least :data:`MIN_SEEDS` seeds (pairs) and the rule holds in more than
  half of them (2 of 3), and for the SCNN-better claims marked *H* the SCNN is no worse on
  held-out slices (mean held-out PSNR difference >= ``-HELDOUT_TOLERANCE_DB``);
* ``not reproduced``: the same evidence, and the majority or the held-out condition fails;
* ``not comparable``: our numbers cannot test the claim, for a stated reason:

  - **scale**: the run is shorter than the claim's epochs (a quick run);
  - **seeds**: fewer than :data:`MIN_SEEDS` seeds (pairs);
  - **loss normalisation**: an absolute loss value (0.015, 0.14, 0.02) depends on how the
    image and the measurement are normalised, which the paper does not give; only ratios of
    losses of the same experiment are scale-free, and those are tested instead;
  - **device**: a wall time measured on a CPU says nothing about the paper's GPU (NVIDIA
    TITAN RTX); on a GPU, times are one-sided: a time is reproduced when at most
    ``TIME_TOLERANCE`` times the paper's, a ratio of SCNN to CNN time when at most 2 times the
    paper's ratio (faster than the paper is never a failure);
  - **method**: the assisted time and convergence claims hold for the paper's method
    (``method = paper``, an image-domain loss) only.

Brain claims are paired by seed (same noisy image, same held-out inputs). ``scope`` says which
runs a brain row judges: ``paper configuration`` (the ``brain_experiments`` runs),
``confirmation`` (the screen's best paper-consistent SCNN and CNN on fresh seeds: the verdict
of record of the ablation) or ``grid`` (some paper-consistent SCNN configuration of the grid
against the selected CNN; the row shows the configuration that does best).

Loss at an epoch means the trailing running mean over ``assisted.plateau.window`` epochs, so
that one noisy epoch does not decide a verdict. The rules per claim (statistic per seed or
seed pair, and the condition it must meet) are in the ``rule`` column and in
``config/preregistration.md`` section 4. Smallest resolved size is ``NONE_RESOLVED_MM`` (10 mm)
when even the largest rods are not. Resolved: valley-to-peak ratio at most
``assisted.metrics.resolved_vpr_max`` on the last snapshot (:mod:`equipet.assisted.rod_metrics`).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from equipet.runs import plateau_epoch, run_labels, running_mean
from equipet.study.ablation import loss_instability, loss_rise, read_labels
from equipet.errors import InputDataError
from equipet.files import atomic_path

log = logging.getLogger("equipet.study.claims")

REPRODUCED, NOT_REPRODUCED, NOT_COMPARABLE = "reproduced", "not reproduced", "not comparable"
TIME_TOLERANCE = 3.0
#: fewest seeds (or seed pairs) a verdict rests on
MIN_SEEDS = 3
#: "no worse on held-out slices": mean held-out PSNR difference SCNN - CNN at least minus this, dB
HELDOUT_TOLERANCE_DB = 0.5
#: the assisted method that does what the paper does (image-domain loss)
PAPER_METHOD = "paper"
PAPER_EPOCHS = {"denoise": 2000, "radon_recon": 5000, "assisted": 60000}
PAPER_DEVICE = "NVIDIA TITAN RTX GPU"
#: "smallest resolved rod" when not even the largest rods are resolved (larger than every rod)
NONE_RESOLVED_MM = 10.0
COLUMNS = ["claim_id", "section", "claim", "scope", "scnn_configuration", "cnn_configuration", "method", "ctr_ps",
           "paper_value", "unit", "measured_mean", "measured_sd", "n", "seeds_met", "rule", "verdict", "reason",
           "rules"]
#: rules 2 (config/preregistration_2.md): the paper's GPU, the only one on which an absolute time is judged
PAPER_GPU_NAME = "TITAN RTX"
#: rules 2 margins (config/preregistration_2.md section 2)
MARGIN_RATIO = 0.05
MARGIN_PSNR_DB = 0.1
MARGIN_SSIM = 0.005
MARGIN_INSTABILITY = 0.05


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
    configuration: str | None = None      # ablation configuration (None: the plain runs)
    stage: str | None = None              # ablation stage: grid or confirm
    paper_consistent: bool = True
    method: str = PAPER_METHOD            # assisted method
    batched_runs: int = 1                 # runs that shared its training steps (timing.json)
    concurrent_jobs: int | None = None    # training processes side by side on its device (timing.json; None: unknown)

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
    labels = dict(run_labels(run_dir))
    if (run_dir / "configuration.json").exists():   # an ablation run: its own labels
        labels.update(read_labels(run_dir))
    return Run(labels["experiment"], labels["model"], int(labels["seed"]), labels.get("ctr_ps"),
               loss["loss"].to_numpy(float), loss["wall_time_s"].to_numpy(float), str(timing.get("device", "?")),
               configuration=labels.get("configuration"), stage=labels.get("stage"),
               paper_consistent=bool(labels.get("paper_consistent", True)),
               method=str(labels.get("method") or timing.get("method") or PAPER_METHOD),
               batched_runs=int(timing.get("batched_runs", 1)),
               concurrent_jobs=None if timing.get("concurrent_jobs") is None else int(timing["concurrent_jobs"]))


def _stats(values: Sequence[float]) -> tuple[float, float, int]:
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=float)
    if v.size == 0:
        return float("nan"), float("nan"), 0
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0, int(v.size)


class ClaimTable:
    """Accumulates claim rows; every verdict goes through :meth:`add`.

    ``rules``: 1 applies ``config/preregistration.md`` (a majority of seeds), 2 applies
    ``config/preregistration_2.md`` (every seed, with the claim's margin; times only when measured
    alone on the device, absolute times only on the paper's GPU). ``context`` (scope,
    configurations, method) is copied into every row added while it is set. ``alone_s_per_epoch``
    maps ``(method, ctr_ps, model)`` to seconds per epoch measured alone on the device (the
    single-run path of ``bench_assisted.py --runs``), for the rules-2 time ratios.
    """

    def __init__(self, rules: int = 1, alone_s_per_epoch: Mapping[tuple, float] | None = None) -> None:
        if rules not in (1, 2):
            raise ValueError(f"rules must be 1 or 2, got {rules}")
        self.rules = rules
        self.alone_s_per_epoch = dict(alone_s_per_epoch or {})
        self.rows: list[dict[str, Any]] = []
        self.context: dict[str, Any] = {}

    def add(self, claim_id: str, section: str, claim: str, paper: float, unit: str, values: Sequence[float],
            rule: str, holds: Callable[[float], bool] | None, not_comparable: str | None = None,
            ctr_ps: float | None = None, heldout_db: Sequence[float] | None = None,
            holds2: Callable[[float], bool] | None = None, rule2: str | None = None,
            not_comparable2: str | None = None, min_seeds: int = MIN_SEEDS) -> dict[str, Any]:
        """Judge one claim by the rules of this table.

        ``values``: the statistic per seed (pair); ``holds``: the rule for one value;
        ``heldout_db``: for the claims marked H, the held-out PSNR difference SCNN - CNN per
        seed pair (the SCNN must be no worse: mean >= -HELDOUT_TOLERANCE_DB). Rules 2 use
        ``holds2`` (the rule with its margin; ``holds`` when None) in every seed, ``rule2`` as the
        rule's text, and add ``not_comparable2`` to the reasons; ``min_seeds`` is 1 for a claim
        judged on one number (a time ratio measured once per device).
        """
        if self.rules == 2:
            not_comparable = _join(not_comparable, not_comparable2)
            holds = holds2 or holds
            rule = rule2 or rule
        mean, sd, n = _stats(values)
        finite = [float(v) for v in values if v is not None and np.isfinite(v)]
        met = sum(bool(holds(v)) for v in finite) if holds is not None else 0
        if not_comparable:
            verdict, reason = NOT_COMPARABLE, not_comparable
        elif n == 0:
            verdict, reason = NOT_COMPARABLE, "no finite measurement (runs missing or the event never happened)"
        elif holds is None:
            verdict, reason = NOT_COMPARABLE, "no rule"
        elif n < min_seeds:
            verdict, reason = NOT_COMPARABLE, f"seeds: {n} measured, the rules need at least {min_seeds}"
        else:
            # rules 1: more than half of the seeds; rules 2: every seed (a missing value fails)
            passed = met > n / 2 if self.rules == 1 else met == n == len(values)
            reason = f"rule met in {met} of {n} seeds; mean {mean:.4g} vs paper {paper:g}"
            held_ok = True
            if heldout_db is not None:
                h_mean, _, h_n = _stats(heldout_db)
                if h_n == 0:
                    verdict, reason = NOT_COMPARABLE, "no held-out evaluation for the held-out condition"
                    return self._row(claim_id, section, claim, ctr_ps, paper, unit, mean, sd, n, met, rule,
                                     verdict, reason)
                held_ok = h_mean >= -HELDOUT_TOLERANCE_DB
                reason += f"; held-out PSNR SCNN - CNN {h_mean:+.2f} dB"
            verdict = REPRODUCED if passed and held_ok else NOT_REPRODUCED
        return self._row(claim_id, section, claim, ctr_ps, paper, unit, mean, sd, n, met, rule, verdict, reason)

    def _row(self, claim_id: str, section: str, claim: str, ctr_ps: float | None, paper: float, unit: str,
             mean: float, sd: float, n: int, met: int, rule: str, verdict: str, reason: str) -> dict[str, Any]:
        row = {"claim_id": claim_id, "section": section, "claim": claim, "ctr_ps": ctr_ps, "paper_value": paper,
               "unit": unit, "measured_mean": mean, "measured_sd": sd, "n": n, "seeds_met": met, "rule": rule,
               "verdict": verdict, "reason": reason, "rules": self.rules, **self.context}
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


def hardware_reason(runs: Sequence[Run]) -> str | None:
    """Rules 2: an absolute time is judged only on the paper's GPU."""
    devices = sorted({r.device for r in runs})
    if devices and all(PAPER_GPU_NAME in d for d in devices):
        return None
    return (f"hardware: absolute times are judged only on the paper's {PAPER_DEVICE} (measured on "
            f"{', '.join(devices) or 'nothing'})")


def contention_reason(runs: Sequence[Run]) -> str | None:
    """Rules 2: times of runs that shared their steps (batched) or their device (ablation jobs side by
    side). An ablation run counts as alone only when its ``timing.json`` says it was the one training
    process on its device (``concurrent_jobs == 1``, set by ``run_ablation.py --jobs 1``); one that does
    not say counts as shared, since the ablation's jobs usually run side by side."""
    shared = [r for r in runs if r.batched_runs > 1 or (r.stage is not None and r.concurrent_jobs != 1)]
    if not shared:
        return None
    return (f"contention: {len(shared)} of {len(runs)} runs shared their training steps or the device "
            "(batched_runs > 1, or ablation jobs side by side or not known to be alone)")


def _at_most(factor: float, paper: float) -> Callable[[float], bool]:
    """One-sided time rule: at most ``factor`` times the paper's (faster is never a failure)."""
    return lambda m: m <= paper * factor


def _join(*reasons: str | None) -> str | None:
    r = list(dict.fromkeys(x for x in reasons if x))     # drop repeats, keep the order
    return "; ".join(r) if r else None


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


def run_metric(metrics: pd.DataFrame, run: Run, split: str, metric: str) -> float:
    """Mean of ``metric`` over the rows of ``run`` with ``split`` (``train``: last epoch only).

    Rows are matched on experiment, model and seed, and on ``configuration`` and ``stage``
    when the table has them (ablation runs).
    """
    if metrics is None or len(metrics) == 0 or "split" not in metrics:
        return float("nan")
    sel = metrics[(metrics["experiment"] == run.experiment) & (metrics["model"] == run.model)
                  & (metrics["seed"] == run.seed) & (metrics["split"] == split) & (metrics["metric"] == metric)]
    for column, value in (("configuration", run.configuration), ("stage", run.stage)):
        if value is not None and column in sel:
            sel = sel[sel[column] == value]
    if split == "train" and len(sel):
        sel = sel[sel["epoch"] == sel["epoch"].max()]
    return float(sel["value"].mean()) if len(sel) else float("nan")


def _pairs(scnn: Sequence[Run], cnn: Sequence[Run]) -> list[tuple[Run, Run]]:
    """SCNN and CNN runs with the same seed (same noise realisation and held-out inputs)."""
    by_seed = {r.seed: r for r in cnn}
    return [(s, by_seed[s.seed]) for s in sorted(scnn, key=lambda r: r.seed) if s.seed in by_seed]


def _heldout_db(metrics: pd.DataFrame, pairs: Sequence[tuple[Run, Run]]) -> list[float]:
    return [run_metric(metrics, s, "heldout", "psnr") - run_metric(metrics, c, "heldout", "psnr") for s, c in pairs]


def brain_pair_claims(table: ClaimTable, scnn_runs: Sequence[Run], cnn_runs: Sequence[Run],
                      metrics: pd.DataFrame, window: int) -> None:
    """The brain claims (III-A/B and the pre-registered new ones) for one SCNN-vs-CNN pairing."""
    for experiment in ("denoise", "radon_recon"):
        scnn = [r for r in scnn_runs if r.experiment == experiment]
        cnn = [r for r in cnn_runs if r.experiment == experiment]
        if not scnn and not cnn:
            continue
        pairs = _pairs(scnn, cnn)
        held = _heldout_db(metrics, pairs)
        scale = scale_reason(scnn + cnn, PAPER_EPOCHS[experiment])
        if experiment == "denoise":
            table.add("denoise_scnn1000_vs_cnn2000", "III-A/IV",
                      "denoising: SCNN reaches CNN's 2000-epoch loss by 1000 epochs", 1.0, "ratio",
                      [smoothed_at(s, 1000, window) / smoothed_at(c, 2000, window) for s, c in pairs],
                      "per seed pair: SCNN loss(1000) / CNN loss(2000) <= 1 (H)", lambda m: m <= 1.0, scale,
                      heldout_db=held, holds2=lambda m: m <= 1.0 - MARGIN_RATIO,
                      rule2="every seed pair: SCNN loss(1000) / CNN loss(2000) <= 0.95 (H)")
            _time_claims(table, "denoise", "III-A", scnn, cnn, {"cnn": 104.0, "scnn": 106.0}, PAPER_EPOCHS["denoise"])
        else:
            _radon_loss_claims(table, scnn, cnn, pairs, held, scale, window)
        _new_brain_claims(table, experiment, pairs, metrics, held, scale, window)


def _radon_loss_claims(table: ClaimTable, scnn: Sequence[Run], cnn: Sequence[Run], pairs: Sequence[tuple[Run, Run]],
                       held: Sequence[float], scale: str | None, window: int) -> None:
    norm = "loss normalisation: absolute loss values depend on the image/sinogram normalisation the paper does not give"
    minimum = lambda r: float(running_mean(r.losses, window).min())  # noqa: E731
    for model, paper, runs in (("scnn", 0.015, scnn), ("cnn", 0.14, cnn)):
        table.add(f"radon_min_loss_{model}", "III-B", f"reconstruction: minimum loss of {model.upper()} {paper}",
                  paper, "loss", [minimum(r) for r in runs], "absolute value: not testable", None, norm)
    table.add("radon_min_loss_ratio", "III-B", "reconstruction: minimum loss SCNN 0.015 against CNN 0.14",
              0.14 / 0.015, "ratio", [minimum(c) / minimum(s) for s, c in pairs],
              "per seed pair: CNN min loss / SCNN min loss >= paper / 2 (H)", lambda m: m >= 0.14 / 0.015 / 2,
              scale, heldout_db=held, holds2=lambda m: m >= 0.14 / 0.015 / 2 * (1 + MARGIN_RATIO),
              rule2="every seed pair: CNN min loss / SCNN min loss >= 1.05 x paper / 2 (H)")
    table.add("radon_scnn500_vs_cnn_min", "IV", "reconstruction: SCNN at 0.02 by 500 epochs (CNN 0.14 after 5000)",
              0.02 / 0.14, "ratio", [smoothed_at(s, 500, window) / minimum(c) for s, c in pairs],
              "per seed pair: SCNN loss(500) / CNN min loss <= 1 (H)", lambda m: m <= 1.0, scale, heldout_db=held,
              holds2=lambda m: m <= 1.0 - MARGIN_RATIO, rule2="every seed pair: SCNN loss(500) / CNN min loss <= 0.95 (H)")
    reach = [first_epoch_below(s, minimum(c), window) for s, c in pairs]
    table.add("radon_speedup_epochs", "IV", "speed: ~10x fewer epochs (SCNN reaches CNN's best loss)", 10.0, "ratio",
              [PAPER_EPOCHS["radon_recon"] / e if np.isfinite(e) else 0.0 for e in reach],
              "per seed pair: 5000 / epoch SCNN reaches CNN's min loss >= paper / 2 (H)", lambda m: m >= 5.0, scale,
              heldout_db=held, holds2=lambda m: m >= 5.0 * (1 + MARGIN_RATIO),
              rule2="every seed pair: 5000 / epoch SCNN reaches CNN's min loss >= 1.05 x paper / 2 (H)")
    times = [c.wall_time_s[-1] / s.wall_time_s[int(e) - 1] if np.isfinite(e) else 0.0
             for (s, c), e in zip(pairs, reach)]
    table.add("radon_speedup_time", "IV", "speed: ~9x less time", 766.0 / 87.0, "ratio", times,
              "per seed pair: CNN time(5000) / SCNN time to CNN's min loss >= paper / 2 (GPU)",
              lambda m: m >= 766.0 / 87.0 / 2, _join(scale, device_reason(list(scnn) + list(cnn))),
              not_comparable2=contention_reason(list(scnn) + list(cnn)))
    _time_claims(table, "radon_recon", "III-B", scnn, cnn, {"cnn": 766.0, "scnn": 784.0}, PAPER_EPOCHS["radon_recon"])
    table.add("radon_time_scnn_500", "III-B", "reconstruction: SCNN takes 87 s for 500 epochs", 87.0, "s",
              [r.wall_time_s[499] if r.epochs >= 500 else float("nan") for r in scnn],
              f"GPU and at most x{TIME_TOLERANCE:g} the paper's", _at_most(TIME_TOLERANCE, 87.0),
              _join(scale_reason(scnn, 500), device_reason(scnn)), not_comparable2=hardware_reason(scnn))


def _new_brain_claims(table: ClaimTable, experiment: str, pairs: Sequence[tuple[Run, Run]], metrics: pd.DataFrame,
                      held: Sequence[float], scale: str | None, window: int) -> None:
    """The claims the paper makes in words (config/preregistration.md section 4)."""
    label = {"denoise": "denoising", "radon_recon": "reconstruction"}[experiment]
    section = {"denoise": "III-A/IV", "radon_recon": "III-B/IV"}[experiment]
    m = lambda r, split, metric: run_metric(metrics, r, split, metric)  # noqa: E731
    for metric in ("psnr", "ssim"):
        unit = "dB" if metric == "psnr" else "1"
        margin = MARGIN_PSNR_DB if metric == "psnr" else MARGIN_SSIM
        table.add(f"{experiment}_{metric}_scnn_ge_cnn", section,
                  f"{label}: SCNN image quality ({metric.upper()}) at least the CNN's", 0.0, unit,
                  [m(s, "train", metric) - m(c, "train", metric) for s, c in pairs],
                  f"per seed pair: {metric.upper()} SCNN - CNN on the training slice >= 0 (H)",
                  lambda v: v >= 0.0, scale, heldout_db=held, holds2=lambda v, m2=margin: v >= m2,
                  rule2=f"every seed pair: {metric.upper()} SCNN - CNN on the training slice >= {margin:g} (H)")
    dip = any(r.configuration and "dip" in r.configuration for p in pairs for r in p)
    for split, what in (("heldout", "held-out slices"), ("rotated", "rotated inputs")):
        reason = _join(scale, "deep-image-prior input: a fixed noise image carries nothing of a held-out slice"
                       if dip and split == "heldout" else None)
        table.add(f"{experiment}_{split}_psnr_scnn_gt_cnn", "I/IV", f"{label}: SCNN generalises better to {what}",
                  0.0, "dB", [m(s, split, "psnr") - m(c, split, "psnr") for s, c in pairs],
                  f"per seed pair: PSNR on {what} SCNN - CNN > 0", lambda v: v > 0.0, reason,
                  holds2=lambda v: v >= MARGIN_PSNR_DB, rule2=f"every seed pair: PSNR on {what} SCNN - CNN >= 0.1 dB")
        table.add(f"{experiment}_{split}_gap_scnn_lt_cnn", "I/IV",
                  f"{label}: SCNN loses less quality than the CNN on {what}", 0.0, "dB",
                  [(m(c, "train", "psnr") - m(c, split, "psnr")) - (m(s, "train", "psnr") - m(s, split, "psnr"))
                   for s, c in pairs],
                  f"per seed pair: gap_CNN - gap_SCNN > 0, gap = PSNR train - PSNR on {what}", lambda v: v > 0.0,
                  reason, holds2=lambda v: v >= MARGIN_PSNR_DB,
                  rule2=f"every seed pair: gap_CNN - gap_SCNN >= 0.1 dB, gap = PSNR train - PSNR on {what}")
    if table.rules == 1:
        stability = [loss_instability(c.losses) - loss_instability(s.losses) for s, c in pairs]
    else:
        stability = [loss_rise(c.losses, window) - loss_rise(s.losses, window) for s, c in pairs]
    table.add(f"{experiment}_loss_stability", "III-C/IV", f"{label}: SCNN loss decreases more stably than the CNN's",
              0.0, "1", stability,
              "per seed pair: instability U_CNN - U_SCNN > 0 (U: rise of log-loss before its minimum / its fall)",
              lambda v: v > 0.0, scale, holds2=lambda v: v >= MARGIN_INSTABILITY,
              rule2="every seed pair: U2_CNN - U2_SCNN >= 0.05 (U2: rise of the smoothed log10-loss before its "
                    "minimum, decades)")


def _time_claims(table: ClaimTable, experiment: str, section: str, scnn: Sequence[Run], cnn: Sequence[Run],
                 paper: Mapping[str, float], epochs: int, ctr_ps: float | None = None,
                 not_comparable: str | None = None, method: str = PAPER_METHOD) -> None:
    label = {"denoise": "denoising", "radon_recon": "reconstruction", "assisted": "assisted reconstruction"}[experiment]
    for model, runs in (("cnn", cnn), ("scnn", scnn)):
        table.add(f"{experiment}_time_{model}", section,
                  f"{label}: {model.upper()} takes {paper[model]:g} s for {epochs} epochs", paper[model], "s",
                  [r.wall_time_s[-1] for r in runs], f"GPU and at most x{TIME_TOLERANCE:g} the paper's",
                  _at_most(TIME_TOLERANCE, paper[model]),
                  _join(not_comparable, scale_reason(runs, epochs), device_reason(runs)), ctr_ps,
                  not_comparable2=hardware_reason(runs))
    pairs = _pairs(scnn, cnn)
    values = [s.wall_time_s[-1] / c.wall_time_s[-1] for s, c in pairs]
    reason2 = contention_reason(list(scnn) + list(cnn))
    if table.rules == 2 and experiment == "assisted":
        # rules 2: the ratio of the per-epoch times measured alone on the device (one number)
        alone = [table.alone_s_per_epoch.get((method, ctr_ps, m)) for m in ("scnn", "cnn")]
        values = [alone[0] / alone[1]] if all(alone) else []
        reason2 = None if all(alone) else ("contention: no per-epoch time of this method measured alone on the "
                                           "device for this CTR (bench_assisted.py --runs, single path)")
    table.add(f"{experiment}_time_ratio_scnn_cnn", section,
              f"{label}: SCNN and CNN take similar time ({paper['scnn']:g} s vs {paper['cnn']:g} s)",
              paper["scnn"] / paper["cnn"], "ratio", values,
              "GPU and per seed pair SCNN / CNN time at most x2 the paper's ratio",
              _at_most(2.0, paper["scnn"] / paper["cnn"]),
              _join(not_comparable, scale_reason(list(scnn) + list(cnn), epochs),
                    device_reason(list(scnn) + list(cnn))), ctr_ps,
              rule2="GPU; SCNN / CNN time per epoch measured alone on the device at most x2 the paper's ratio",
              not_comparable2=reason2, min_seeds=1 if table.rules == 2 and experiment == "assisted" else MIN_SEEDS)


def brain_claims(table: ClaimTable, runs: Sequence[Run], window: int, metrics: pd.DataFrame | None = None) -> None:
    """The brain claims for each scope present in ``runs`` (module doc)."""
    metrics = pd.DataFrame() if metrics is None else metrics
    brain = [r for r in runs if r.experiment in ("denoise", "radon_recon")]
    plain = [r for r in brain if r.stage is None]
    paper_grid = [r for r in brain if r.stage == "grid" and r.configuration in ("scnn_paper", "cnn_paper")]
    if not plain and {r.configuration for r in paper_grid} == {"scnn_paper", "cnn_paper"}:
        plain = paper_grid   # the paper configuration's runs of the ablation grid (preregistration_2.md section 4)
    confirm = [r for r in brain if r.stage == "confirm"]
    grid = [r for r in brain if r.stage == "grid"]
    by = lambda rs, model: [r for r in rs if r.model == model]  # noqa: E731
    if plain:
        table.context = {"scope": "paper configuration", "scnn_configuration": "scnn", "cnn_configuration": "cnn"}
        brain_pair_claims(table, by(plain, "scnn"), by(plain, "cnn"), metrics, window)
    if confirm:
        names = {m: sorted({r.configuration for r in by(confirm, m)}) for m in ("scnn", "cnn")}
        table.context = {"scope": "confirmation", "scnn_configuration": ",".join(names["scnn"]),
                         "cnn_configuration": ",".join(names["cnn"])}
        brain_pair_claims(table, by(confirm, "scnn"), by(confirm, "cnn"), metrics, window)
    if grid:
        _grid_claims(table, grid, confirm, metrics, window)
    table.context = {}


def _grid_claims(table: ClaimTable, grid: Sequence[Run], confirm: Sequence[Run], metrics: pd.DataFrame,
                 window: int) -> None:
    """Scope ``grid``: a claim is reproduced when some paper-consistent SCNN configuration meets
    it against the selected CNN (the confirmation's, else ``cnn_paper``); the row shown is a
    reproducing configuration, else the one meeting the rule in the most seeds."""
    chosen = sorted({r.configuration for r in confirm if r.model == "cnn"})
    cnn_name = chosen[0] if chosen else "cnn_paper"
    cnn = [r for r in grid if r.configuration == cnn_name]
    per_conf: dict[str, list[dict[str, Any]]] = {}
    for name in sorted({r.configuration for r in grid if r.model == "scnn" and r.paper_consistent}):
        sub = ClaimTable(table.rules, table.alone_s_per_epoch)   # judged by the table's rules
        sub.context = {"scope": "grid", "scnn_configuration": name, "cnn_configuration": cnn_name}
        brain_pair_claims(sub, [r for r in grid if r.configuration == name], cnn, metrics, window)
        per_conf[name] = sub.rows
    if not per_conf:
        return
    order = [row["claim_id"] for row in next(iter(per_conf.values()))]
    rank = {REPRODUCED: 2, NOT_REPRODUCED: 1, NOT_COMPARABLE: 0}
    for claim_id in order:
        rows = [row for rows in per_conf.values() for row in rows if row["claim_id"] == claim_id]
        best = max(rows, key=lambda r: (rank[r["verdict"]], r["seeds_met"],
                                        r["measured_mean"] if np.isfinite(r["measured_mean"]) else -np.inf))
        table.rows.append(best)


def _metrics_method(frame: pd.DataFrame) -> pd.Series:
    """The ``method`` column of tidy metrics (``paper`` where absent or empty)."""
    if "method" not in frame:
        return pd.Series(PAPER_METHOD, index=frame.index)
    return frame["method"].fillna(PAPER_METHOD).astype(str)


def _smallest_by_seed(sel: pd.DataFrame) -> list[float]:
    values = []
    for _, g in sel.groupby("seed"):
        last = g[g["epoch"] == g["epoch"].max()]
        values.append(smallest_resolved(dict(zip(last["rod_mm"], last["value"]))))
    return [v if np.isfinite(v) else NONE_RESOLVED_MM for v in values]


def mlem_smallest_resolved(metrics: pd.DataFrame, ctr: float) -> tuple[float, float]:
    """(MLEM at the networks' input iteration, MLEM at its best iteration): smallest resolved rod, mm.

    The first is the ``mlem_early`` baseline; the second the smallest over every MLEM iteration
    (``split = mlem_iteration``), falling back to the ``mlem_best`` baseline.
    """
    if len(metrics) == 0 or "rod_mm" not in metrics:
        return float("nan"), float("nan")
    res = metrics[(metrics["experiment"] == "assisted") & (metrics["metric"] == "resolved")
                  & (metrics["ctr_ps"] == ctr)]

    def smallest(sel: pd.DataFrame) -> float:
        if sel.empty:
            return float("nan")
        v = smallest_resolved(dict(zip(sel["rod_mm"], sel["value"])))
        return v if np.isfinite(v) else NONE_RESOLVED_MM

    early = smallest(res[(res["model"] == "mlem_early") & (res["split"] == "baseline")])
    its = res[(res["model"] == "mlem") & (res["split"] == "mlem_iteration")]
    if len(its):
        best = min(smallest(g) for _, g in its.groupby("epoch"))
    else:
        best = smallest(res[(res["model"] == "mlem_best") & (res["split"] == "baseline")])
    return early, best


def assisted_claims(table: ClaimTable, runs: Sequence[Run], metrics: pd.DataFrame, window: int,
                    tolerance: float, mlem_iteration_s: Mapping[Any, Any]) -> None:
    assisted = [r for r in runs if r.experiment == "assisted"]
    ctrs = sorted({r.ctr_ps for r in assisted} | set(metrics.get("ctr_ps", pd.Series(dtype=float)).dropna().unique()))
    m = metrics[(metrics["experiment"] == "assisted") & (metrics["metric"] == "resolved")
                & (metrics.get("split") == "train")] if len(metrics) else metrics
    if len(m):
        m = m.assign(method=_metrics_method(m))
    methods = sorted({r.method for r in assisted} | (set(m["method"]) if len(m) else set())) or [PAPER_METHOD]
    for ctr in ctrs:
        mlem_early, mlem_best = mlem_smallest_resolved(metrics, ctr)
        for method in methods:
            table.context = {"method": method}
            by = lambda model: [r for r in assisted if r.model == model and r.ctr_ps == ctr  # noqa: E731
                                and r.method == method]
            scnn, cnn = by("scnn"), by("cnn")
            scale = scale_reason(scnn + cnn, PAPER_EPOCHS["assisted"])
            other = None if method == PAPER_METHOD else (
                f"method: {method} is not the paper's (image-domain loss); its time and convergence "
                "do not test the paper's")
            for model, paper, rule, holds in (
                    ("scnn", 3.5, "all rods >= 3.5 mm resolved", lambda v: v <= 3.5),
                    ("cnn", 5.5, "5.5 and 6.5 mm resolved, 4.5 mm not", lambda v: 4.5 < v <= 5.5)):
                sel = m[(m["model"] == model) & (m["ctr_ps"] == ctr) & (m["method"] == method)] if len(m) else m
                values = _smallest_by_seed(sel) if len(sel) else []
                who = "resolves the 3.5 to 6.5 mm rods" if model == "scnn" else "resolves only the 5.5 and 6.5 mm rods"
                table.add(f"assisted_{model}_smallest_resolved", "III-C/IV", f"assisted: {model.upper()} {who}",
                          paper, "mm", values, rule, holds, scale, ctr)
                table.add(f"assisted_{model}_finer_than_mlem2", "III-C/IV",
                          f"assisted: {model.upper()} resolves smaller rods than MLEM at its input iteration",
                          0.0, "mm", [mlem_early - v for v in values],
                          "per seed: smallest resolved rod MLEM(early) - network > 0 mm", lambda v: v > 0.0,
                          _join(scale, None if np.isfinite(mlem_early) else "no MLEM baseline metrics"), ctr)
                table.add(f"assisted_{model}_vs_mlem_best", "III-C/IV",
                          f"assisted: {model.upper()} resolves rods at least as small as MLEM at its best iteration",
                          0.0, "mm", [mlem_best - v for v in values],
                          "per seed: smallest resolved rod MLEM(best iteration) - network >= 0 mm",
                          lambda v: v >= 0.0,
                          _join(scale, None if np.isfinite(mlem_best) else "no MLEM per-iteration metrics"), ctr)
            table.add("assisted_scnn_plateau_epoch", "IV", "assisted: SCNN converges in 1000 epochs", 1000.0, "epoch",
                      [plateau_epoch(r.losses, window, tolerance) for r in scnn], "per seed: plateau epoch <= 1000",
                      lambda v: v <= 1000.0, _join(other, scale), ctr)
            table.add("assisted_scnn_plateau_time", "IV", "assisted: SCNN converges in 15 s", 15.0, "s",
                      [r.wall_time_s[plateau_epoch(r.losses, window, tolerance) - 1] for r in scnn],
                      f"GPU and at most x{TIME_TOLERANCE:g} the paper's", _at_most(TIME_TOLERANCE, 15.0),
                      _join(other, scale, device_reason(scnn)), ctr, not_comparable2=hardware_reason(scnn))
            _time_claims(table, "assisted", "IV", scnn, cnn, {"cnn": 821.0, "scnn": 870.0}, PAPER_EPOCHS["assisted"],
                         ctr, not_comparable=other, method=method)
        table.context = {}
        its = mlem_iteration_s.get(ctr, [])
        table.add("assisted_mlem_iteration_time", "IV", "list-mode MLEM takes ~2112 s per iteration", 2112.0, "s",
                  its, f"GPU and at most x{TIME_TOLERANCE:g} the paper's", _at_most(TIME_TOLERANCE, 2112.0),
                  None if its and mlem_iteration_s.get(("device", ctr), "").startswith("cuda")
                  else f"device: MLEM ran on {mlem_iteration_s.get(('device', ctr), 'unknown')}; "
                       f"the paper's time is from an {PAPER_DEVICE} (and the quick config reconstructs fewer events)",
                  ctr, not_comparable2=f"hardware: absolute times are judged only on the paper's {PAPER_DEVICE}")


def paper_claims(metrics: pd.DataFrame, runs: Sequence[Run], plateau_cfg: Mapping[str, Any],
                 mlem_timings: Sequence[Path] = (), rules: int = 1,
                 alone_s_per_epoch: Mapping[tuple, float] | None = None) -> pd.DataFrame:
    """The claims table (module doc) from the tidy metrics, the runs and the MLEM timing files,
    by the first (``rules=1``) or second (``rules=2``) pre-registration."""
    table = ClaimTable(rules, alone_s_per_epoch)
    window, tol = int(plateau_cfg["window"]), float(plateau_cfg["tolerance"])
    brain_claims(table, runs, window, metrics)
    mlem: dict[Any, Any] = {}
    for f in mlem_timings:
        t = json.loads(Path(f).read_text())
        ctr = float(t.get("ctr_ps", Path(f).parent.name.removeprefix("ctr")))
        mlem[ctr] = list(t.get("iterations_s", []))
        mlem[("device", ctr)] = str(t.get("device", "?"))
    assisted_claims(table, runs, metrics, window, tol, mlem)
    return table.frame()


def alone_times(benches: Sequence[tuple[str, str]]) -> dict[tuple, float]:
    """``(method, ctr_ps, model) -> s per epoch`` from the single-path rows of ``bench_assisted.py --runs``
    tables, each given with the CTR of the slice it was measured on."""
    out: dict[tuple, float] = {}
    for ctr, path in benches:
        try:
            df = pd.read_csv(path)
            single = df[df["path"] == "single"]
        except (OSError, ValueError, KeyError) as exc:
            raise InputDataError(f"cannot read a bench_assisted.py --runs table ({exc})", where=str(path),
                                 fix="pass the CSV that bench_assisted.py --runs --out wrote") from exc
        for row in single.itertuples():
            out[(str(row.method), float(ctr), str(row.model))] = float(row.ms_per_run_epoch) / 1e3
    return out
