"""SCNN- and CNN-assisted reconstruction of the central slice (paper III-C, Fig. 4-5).

One run = one (CTR, model, seed): the network ``f_w`` takes the early-MLEM central slice
``x_0`` (divided by a fixed scale ``c``, its 99.5th percentile, so that every CTR feeds the
networks values of order one) and its output ``x = c f_w(x_0 / c)`` is fitted, with the
shared engine :func:`equipet.training.train`, by one of three losses (``assisted.loss``):

``poisson`` (default), :class:`ListmodePoissonLoss`, the list-mode Poisson negative
log-likelihood of the slice's events (Parra and Barrett 1998),

.. math::  L(x) = \\frac{1}{N}\\Big[f\\,s^T x - \\sum_{e=1}^{N} \\log\\big((A x)_e + b_e\\big)\\Big],

with ``A`` the single-slice TOF projector (:class:`equipet.projector.ListmodeTOFProjector`
on the slice geometry of :mod:`equipet.central_slice`), ``s`` the slice sensitivity, ``b``
the out-of-slice contribution, ``f`` the kept fraction of the events and ``N`` their number.
Its minimiser is the slice's ML estimate (the fixed point of list-mode MLEM); the binned
:class:`equipet.training.PoissonNLLLoss` does not apply, because in list mode the expected
total ``s^T x`` replaces the sum of the expected counts over measured bins.

``l2``, :class:`ListmodeLeastSquaresLoss`: the integrated squared error between the model's
event density ``y(L, tau) = eta_L [(A x)(L, tau) + b]`` over LOR x TOF space (``eta_L`` the
LOR's attenuation factor) and the measured events,

.. math::  L(x) = \\frac{1}{N}\\Big[\\sum_{L}\\int y^2\\,d\\tau - 2\\sum_e y_e\\Big]
              = \\frac{1}{N}\\big[\\lVert y - y_{true}\\rVert^2 - \\lVert y_{true}\\rVert^2\\big] + \\text{noise},

(unbiased, since ``E[sum_e y_e] = int y y_true``); the quadratic term is estimated from the
Monte Carlo LOR/TOF samples of ``slice.npz`` (fixed, so the loss stays deterministic).

``image``: :class:`equipet.training.MSELoss` against the MLEM slice at
``assisted.image_target_iterations`` (in units of ``c``).

Written into the run directory: the files of :func:`equipet.training.train` (``loss.csv``,
``snapshots/``, ``timing.json``, ...), ``metrics.csv`` (tidy rows: ``experiment=assisted,
model, seed, epoch, metric, value, ctr_ps, rod_mm, split``; ``split`` is ``input`` for the
early MLEM slice, ``train`` for each snapshot, ``training`` for the loss-curve summaries
``plateau_epoch``, ``plateau_time_s``, ``min_loss``, ``final_loss``, ``total_time_s``,
``s_per_epoch``) and ``eval.npz`` (truth, input, scaled snapshots).
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from equipet import cli
from equipet.errors import ConfigError
from equipet.files import atomic_path
from equipet.projector import ImageGeometry, ListmodeTOFProjector
from equipet.training import MSELoss, TrainSettings, seed_everything, train

log = logging.getLogger("equipet.assisted")

SUMMARY_METRICS = ("plateau_epoch", "plateau_time_s", "min_loss", "final_loss", "total_time_s", "s_per_epoch")


# --------------------------------------------------------------------------- loss-curve analysis


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


# --------------------------------------------------------------------------- losses


def _floored_log_sum(expected: torch.Tensor, floor: float) -> torch.Tensor:
    """``sum log(expected)``, continued below ``floor`` by its tangent (finite, keeps pushing up)."""
    floored = expected.clamp_min(floor)
    return torch.sum(torch.log(floored) + (expected - floored) / floor)


class SliceForwardModel(torch.nn.Module):
    """``x = c * output[0, 0]`` on the slice geometry -> expected event densities ``eta (A x + b)`` (N,).

    ``projector`` is a :class:`ListmodeTOFProjector` on a single-slice geometry ``(nx, ny, 1)``;
    ``background`` ``b`` the fixed out-of-slice term; ``attenuation`` ``eta`` the optional
    per-LOR attenuation factor (left out for the Poisson likelihood, where it cancels).
    Differentiable (the backward is ``A^T``).
    """

    def __init__(self, projector: ListmodeTOFProjector, background: torch.Tensor, scale: float,
                 attenuation: torch.Tensor | None = None):
        super().__init__()
        if projector.geometry.shape[2] != 1:
            raise ValueError(f"the slice projector needs a single-slice geometry, got {projector.geometry.shape}")
        self.projector = projector
        self.scale = float(scale)
        self.register_buffer("background", torch.as_tensor(background, dtype=torch.float32))
        self.register_buffer("attenuation", None if attenuation is None
                             else torch.as_tensor(attenuation, dtype=torch.float32))

    def image(self, output: torch.Tensor) -> torch.Tensor:
        return (output[0, 0] * self.scale)[..., None]

    def forward(self, output: torch.Tensor) -> torch.Tensor:
        y = self.projector(self.image(output)) + self.background
        return y if self.attenuation is None else self.attenuation * y


class ListmodePoissonLoss(torch.nn.Module):
    """``L(x) = [f s^T x - sum_e log((A x)_e + b_e)] / N`` (module doc), ``loss(output) -> scalar``.

    Below ``floor`` (density units; :func:`build_loss` takes 1e-3 of the mean expected density
    of the early-MLEM input) the log is continued by its tangent, as in
    :class:`equipet.training.PoissonNLLLoss`.
    """

    def __init__(self, forward_model: SliceForwardModel, sensitivity: torch.Tensor, event_fraction: float = 1.0,
                 floor: float = 1e-8):
        super().__init__()
        self.forward_model = forward_model
        self.register_buffer("sensitivity", torch.as_tensor(sensitivity, dtype=torch.float32) * float(event_fraction))
        self.floor = float(floor)

    def forward(self, output: torch.Tensor) -> torch.Tensor:
        n = self.forward_model.background.shape[0]
        expected = self.forward_model(output)
        x = self.forward_model.image(output)[..., 0]
        return (torch.sum(self.sensitivity * x) - _floored_log_sum(expected, self.floor)) / n


class ListmodeLeastSquaresLoss(torch.nn.Module):
    """``L(x) = [w sum_mc y_mc^2 - 2 sum_e y_e] / N`` (module doc), ``loss(output) -> scalar``.

    ``mc_model`` maps the output to ``y`` at the Monte Carlo (LOR, TOF) samples, each standing
    for the measure ``mc_weight``.
    """

    def __init__(self, forward_model: SliceForwardModel, mc_model: SliceForwardModel, mc_weight: float):
        super().__init__()
        self.forward_model = forward_model
        self.mc_model = mc_model
        self.mc_weight = float(mc_weight)

    def forward(self, output: torch.Tensor) -> torch.Tensor:
        n = self.forward_model.background.shape[0]
        y_mc = self.mc_model(output)
        y_ev = self.forward_model(output)
        return (self.mc_weight * torch.sum(y_mc ** 2) - 2.0 * torch.sum(y_ev)) / n


# --------------------------------------------------------------------------- one run


def input_scale(early: np.ndarray) -> float:
    """The fixed scale ``c`` (99.5th percentile of the early slice; 1 if that is not positive)."""
    c = float(np.percentile(early, 99.5))
    return c if c > 0 else 1.0


def slice_projector(data: Mapping[str, np.ndarray], p1: str, p2: str, tof: str, device: torch.device,
                    cache_mb: float, chunk_size: int = 8192) -> ListmodeTOFProjector:
    """Single-slice TOF projector for the stored events ``p1, p2, tof`` of ``slice.npz``."""
    from equipet.central_slice import geometry_from_npz

    fwhm = float(data["tof_fwhm_mm"])
    t = lambda k: torch.as_tensor(data[k], dtype=torch.float32, device=device)  # noqa: E731
    return ListmodeTOFProjector(geometry_from_npz(data), t(p1), t(p2), None if np.isnan(fwhm) else t(tof),
                                None if np.isnan(fwhm) else fwhm, float(data["tof_truncation_sigma"]),
                                chunk_size, cache_mb)


def build_loss(cfg: Mapping[str, Any], data: Mapping[str, np.ndarray], scale: float,
               device: torch.device) -> torch.nn.Module:
    """The loss of ``assisted.loss`` for this slice (module doc)."""
    sec = cfg["assisted"]
    if sec["loss"] == "image":
        its = [int(i) for i in data["iterations"]]
        k = sec["image_target_iterations"] or its[-1]
        if k not in its:
            raise ConfigError(f"no MLEM iteration {k} (have {its[0]}..{its[-1]})",
                              where="assisted.image_target_iterations", fix="keep it <= mlem.iterations")
        return MSELoss(data["mlem"][its.index(k)] / scale)
    cache = float(sec["cache_mb"])
    fm = SliceForwardModel(slice_projector(data, "p1", "p2", "tof", device,
                                           cache / 2 if sec["loss"] == "l2" else cache),
                           torch.as_tensor(data["background"], device=device), scale)
    if sec["loss"] == "poisson":
        with torch.no_grad():   # floor of the log: 1e-3 of the mean expected density of the input image
            typical = float(fm(torch.as_tensor(data["early"] / scale, device=device)[None, None]).mean())
        return ListmodePoissonLoss(fm, torch.as_tensor(data["sensitivity"], device=device),
                                   float(data["event_fraction"]), floor=max(1e-3 * typical, 1e-30))
    if "mc_p1" not in data:
        raise ConfigError("slice.npz has no Monte Carlo LORs for loss=l2", where="assisted.loss",
                          fix="rerun the central_slice rule with assisted.loss=l2")
    fm.attenuation = torch.as_tensor(data["eta"], device=device)
    mc = SliceForwardModel(slice_projector(data, "mc_p1", "mc_p2", "mc_tof", device, cache / 2),
                           torch.as_tensor(data["mc_background"], device=device), scale,
                           torch.as_tensor(data["mc_eta"], device=device))
    return ListmodeLeastSquaresLoss(fm, mc, float(data["mc_weight"]))


def run_assisted(cfg: Mapping[str, Any], slice_path: Path, model_name: str, seed: int,
                 out_dir: Path) -> pd.DataFrame:
    """Train ``model_name`` for ``seed`` on the slice; write metrics.csv and eval.npz in ``out_dir``."""
    from equipet.central_slice import geometry_from_npz
    from equipet.device import select_device
    from equipet.nets import build_model
    from equipet.rod_metrics import SliceScorer

    sec = cfg["assisted"]
    data = dict(np.load(slice_path))
    ctr = float(data["ctr_ps"])
    device = select_device(cfg["device"])
    early = data["early"].astype(np.float32)
    scale = input_scale(early)
    settings = TrainSettings(
        epochs=sec["epochs"], learning_rate=sec["learning_rate"] or cfg["training"]["learning_rate"],
        snapshots=sorted(set(sec["snapshots"]) | {sec["epochs"]}),
        checkpoint_every=cfg["training"]["checkpoint_every"], seed=seed, device=cfg["device"],
        deterministic=cfg["training"]["deterministic"])
    loss = build_loss(cfg, data, scale, device)
    seed_everything(seed, settings.deterministic)
    model = build_model(model_name, cfg["models"])
    result = train(model, torch.from_numpy(early / scale)[None, None], loss, settings, out_dir,
                   desc=f"assisted/ctr{ctr:g}/{model_name}/seed{seed}")

    scorer = SliceScorer(cfg["phantom"], geometry_from_npz(data), data["truth"], cfg["mlem"]["metrics"],
                         sec["metrics"])
    base = dict(experiment="assisted", model=model_name, seed=seed, ctr_ps=ctr)
    rows = scorer.tidy(scorer.score(early), **base, epoch=0, split="input")
    snapshots = {e: img * scale for e, img in sorted(result.snapshots.items())}
    for epoch, img in snapshots.items():
        rows += scorer.tidy(scorer.score(img), **base, epoch=epoch, split="train")
    summary = loss_summary(result.losses, result.wall_time_s, sec["plateau"])
    rows += [{**base, "epoch": sec["epochs"], "metric": k, "value": v, "rod_mm": float("nan"), "split": "training"}
             for k, v in summary.items()]
    df = pd.DataFrame(rows)[["experiment", "model", "seed", "epoch", "metric", "value", "ctr_ps", "rod_mm", "split"]]
    epochs = sorted(snapshots)
    with atomic_path(out_dir / "eval.npz") as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(fh, truth=data["truth"], net_input=early, scale=np.asarray(scale),
                            snapshot_epochs=np.asarray(epochs), snapshots=np.stack([snapshots[e] for e in epochs]),
                            ctr_ps=np.asarray(ctr), loss=np.asarray(sec["loss"]))
    with atomic_path(out_dir / "metrics.csv") as tmp:
        df.to_csv(tmp, index=False)
    with atomic_path(out_dir / "summary.json") as tmp:
        tmp.write_text(json.dumps({"ctr_ps": ctr, "model": model_name, "seed": seed, "loss": sec["loss"],
                                   "n_events": int(len(data["tof"])), "scale": scale, **summary}, indent=2) + "\n")
    log.info("assisted/ctr%g/%s/seed%d: plateau at epoch %d, %.3f s/epoch; %d metric rows",
             ctr, model_name, seed, summary["plateau_epoch"], summary["s_per_epoch"], len(df))
    return df


def main(argv: Sequence[str] | None = None) -> None:
    """``equipet-assisted``: SCNN/CNN-assisted reconstruction of the central slice for one CTR, model and seed."""
    cli.run(_main, argv)


def _main(argv: Sequence[str] | None) -> None:
    p = argparse.ArgumentParser(prog="equipet-assisted", description=main.__doc__)
    cli.add_common_arguments(p)
    p.add_argument("--slice", type=Path, required=True, help="slice.npz from equipet-central-slice")
    p.add_argument("--model", choices=["cnn", "scnn"], required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--out-dir", type=Path, required=True)
    args = p.parse_args(argv)
    cli.setup_logging(args.log)
    cfg = cli.settings_from_args(args)
    run_assisted(cfg, args.slice, args.model, args.seed, args.out_dir)


__all__ = ["ListmodePoissonLoss", "ListmodeLeastSquaresLoss", "SliceForwardModel", "plateau_epoch",
           "running_mean", "loss_summary", "build_loss", "run_assisted", "ImageGeometry"]
