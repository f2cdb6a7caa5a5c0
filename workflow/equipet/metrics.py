"""Image quality of an estimate against the ground-truth image.

All three scores come from ``skimage.metrics``; :func:`image_metrics` only fixes the
conventions so that every experiment reports comparable numbers:

* ``data_range`` is ``R = max(truth) - min(truth)`` of the *whole* truth image, with
  or without a mask, so that masked and unmasked PSNR share one scale;
* ``psnr = 10 log10(R^2 / MSE)`` (``peak_signal_noise_ratio``); a perfect estimate
  has ``MSE = 0`` and PSNR ``+inf``, kept as ``inf`` (a CSV stores it as ``inf``);
* ``nrmse = ||truth - estimate||_2 / ||truth||_2`` (``normalized_root_mse`` with its
  default ``"euclidean"`` normalisation);
* ``ssim``: ``structural_similarity`` with its default 7 x 7 uniform window and
  ``data_range = R``; the mean of the SSIM map.

With a boolean ``mask``, PSNR and NRMSE use only the pixels inside it, and SSIM is the
full-image SSIM map (``full=True``) averaged over the mask.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from skimage.metrics import normalized_root_mse, peak_signal_noise_ratio, structural_similarity

METRIC_NAMES = ("psnr", "ssim", "nrmse")
ROW_COLUMNS = ("experiment", "model", "seed", "epoch", "metric", "value")


def image_metrics(estimate: np.ndarray, truth: np.ndarray, mask: np.ndarray | None = None) -> dict[str, float]:
    """PSNR (dB), SSIM and NRMSE of ``estimate`` against ``truth`` (2-D arrays of one shape).

    See the module docstring for the definitions. Raises ``ValueError`` for mismatched
    shapes, a constant truth image (no data range) or an empty mask.
    """
    estimate = np.asarray(estimate, dtype=np.float64)
    truth = np.asarray(truth, dtype=np.float64)
    if estimate.shape != truth.shape:
        raise ValueError(f"estimate shape {estimate.shape} differs from truth shape {truth.shape}")
    data_range = float(truth.max() - truth.min())
    if not data_range > 0:
        raise ValueError("the truth image is constant: PSNR and SSIM need a positive data range")
    ssim, ssim_map = structural_similarity(truth, estimate, data_range=data_range, full=True)
    if mask is None:
        t, e = truth, estimate
    else:
        mask = np.asarray(mask)
        if mask.shape != truth.shape or mask.dtype != bool:
            raise ValueError(f"mask must be a boolean array of shape {truth.shape}, got {mask.dtype} {mask.shape}")
        if not mask.any():
            raise ValueError("the mask selects no pixels")
        t, e = truth[mask], estimate[mask]
        ssim = ssim_map[mask].mean()
    with np.errstate(divide="ignore"):  # MSE == 0 -> psnr = inf, on purpose
        psnr = peak_signal_noise_ratio(t, e, data_range=data_range)
    nrmse = normalized_root_mse(t, e)
    return {"psnr": float(psnr), "ssim": float(ssim), "nrmse": float(nrmse)}


def tidy_rows(experiment: str, model: str, seed: int, epoch: int, metrics: Mapping[str, float],
              **extra: Any) -> list[dict[str, Any]]:
    """One long-format row per metric for ``results/tables/metrics.csv``.

    Columns: ``experiment, model, seed, epoch, metric, value`` followed by the ``extra``
    columns (e.g. ``split="heldout"``, ``slice=87``) in the order given.
    """
    clash = set(extra) & set(ROW_COLUMNS)
    if clash:
        raise ValueError(f"extra columns {sorted(clash)} would overwrite the standard columns")
    return [
        {"experiment": experiment, "model": model, "seed": int(seed), "epoch": int(epoch),
         "metric": name, "value": float(value), **extra}
        for name, value in metrics.items()
    ]
