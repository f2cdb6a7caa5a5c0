"""Reconstruction metrics of the hot-rod phantom: CRC per rod size and background COV.

Regions of interest come from the phantom's ground truth (rod table of
:class:`equipet.simulation.phantom.HotRodPhantom`), evaluated at the voxel centres of the
reconstructed grid:

* rod ROI of diameter ``d``: voxels whose centre lies within ``f d / 2`` of the axis of a rod
  of that diameter (``f`` = ``roi_diameter_fraction``) and at least ``z_margin`` inside the
  rods' axial ends;
* background ROI: warm voxels (same axial range) at least ``margin`` away from every rod
  edge, the cold region and the warm disk's edge.

With ``R = 1 / background_ratio`` the true rod-to-background ratio,

.. math::

    \\mathrm{CRC}_d = \\frac{\\bar x_{rod,d} / \\bar x_{bkg} - 1}{R - 1}, \\qquad
    \\mathrm{COV}_{bkg} = \\frac{\\sigma(x_{bkg})}{\\bar x_{bkg}},

where ``\\bar x_{rod,d}`` is the mean over the union of all rods of diameter ``d``. Both
are independent of the image scale.

**Partial volume versus convergence.** Even a perfect reconstruction at a finite resolution
does not reach ``CRC = 1``: the rods' activity spills into the background and vice versa
(partial volume). With ``t_w = t * G_w`` the voxelised truth ``t``
(:meth:`equipet.simulation.phantom.HotRodPhantom.voxelise`, each voxel the volume average) blurred by a
3-D Gaussian ``G_w`` of FWHM ``w`` (mm; ``sigma = w / (2 sqrt(2 ln 2))``),

.. math::

    \\mathrm{CRC}^{ref}_{d,w} = \\frac{\\bar t_{w,rod,d} / \\bar t_{w,bkg} - 1}{R - 1}, \\qquad
    \\mathrm{CRC}^{frac}_{d,w} = \\frac{\\bar x_{rod,d} / \\bar x_{bkg} - 1}
                                       {\\bar t_{w,rod,d} / \\bar t_{w,bkg} - 1}
                             = \\frac{\\mathrm{CRC}_d}{\\mathrm{CRC}^{ref}_{d,w}},

in the same ROIs: ``CRC^ref`` is what the truth seen at resolution ``w`` recovers (partial
volume at that resolution; a reference, not a bound: an image sharper than ``w``, or with
overshoot at the edges, exceeds it), ``CRC^frac`` the image's CRC as a fraction of it. The tidy rows
(:func:`metrics_rows`) carry them as ``crc_blurred_truth_<d>mm`` and ``crc_fraction_<d>mm`` with the
FWHM in the ``reference_fwhm_mm`` column, one set per ``mlem.metrics.reference_fwhm_mm``.

>>> import numpy as np
>>> img = np.ones((4, 4, 1)); rod = np.zeros_like(img, bool); rod[0, 0] = True; img[rod] = 10
>>> bkg = ~rod
>>> m = contrast_metrics(img, {6.5: rod}, bkg, true_ratio=10.0)
>>> m["crc"][6.5], m["background_cov"]
(1.0, 0.0)
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from equipet.reconstruction.projector import ImageGeometry

log = logging.getLogger("equipet.reconstruction.recon_metrics")


def roi_masks(geometry: ImageGeometry, rods: np.ndarray, rod_length_mm: float, cold_diameter_mm: float,
              active_diameter_mm: float, roi_diameter_fraction: float = 1.0,
              background_margin_mm: float = 2.0, z_margin_mm: float = 1.0) -> tuple[dict[float, np.ndarray], np.ndarray]:
    """Rod masks per diameter and the background mask on ``geometry`` (see the module doc).

    ``rods`` is the phantom's rod table ``(n, >=3)``: centre x, centre y, diameter (mm).
    """
    c = geometry.voxel_centres_mm()
    x, y, z = c[..., 0], c[..., 1], c[..., 2]
    zok = np.abs(z) <= max(rod_length_mm / 2.0 - z_margin_mm, 0.0)
    if not zok.any():   # rods thinner than the margin: keep the central plane
        zok = np.abs(z) == np.abs(z).min()
    r = np.hypot(x, y)
    rod_masks: dict[float, np.ndarray] = {}
    near_rod = np.zeros(x.shape, bool)
    for cx, cy, d in rods[:, :3]:
        dist = np.hypot(x - cx, y - cy)
        inside = (dist <= roi_diameter_fraction * d / 2.0) & zok
        key = float(d)
        rod_masks[key] = rod_masks.get(key, np.zeros(x.shape, bool)) | inside
        near_rod |= dist < d / 2.0 + background_margin_mm
    bkg = (zok & ~near_rod & (r >= cold_diameter_mm / 2.0 + background_margin_mm)
           & (r <= active_diameter_mm / 2.0 - background_margin_mm))
    return rod_masks, bkg


def contrast_metrics(image: np.ndarray, rod_masks: Mapping[float, np.ndarray], background: np.ndarray,
                     true_ratio: float) -> dict[str, Any]:
    """CRC per rod diameter, background mean and COV (module doc)."""
    bkg = image[background]
    mean_b = float(bkg.mean()) if bkg.size else float("nan")
    cov = float(bkg.std() / mean_b) if bkg.size and mean_b != 0 else float("nan")
    crc = {}
    for d, m in rod_masks.items():
        if m.any() and mean_b != 0:
            crc[d] = float((image[m].mean() / mean_b - 1.0) / (true_ratio - 1.0))
        else:
            crc[d] = float("nan")
    return {"crc": crc, "background_mean": mean_b, "background_cov": cov}


def fwhm_to_sigma_voxels(fwhm_mm: float | Sequence[float], voxel_size_mm: Sequence[float]) -> tuple[float, ...]:
    """Gaussian standard deviation in voxels per axis, ``FWHM / (2 sqrt(2 ln 2)) / voxel``.

    ``fwhm_mm`` is one number (isotropic) or ``(x, y, z)``; all must be >= 0.
    """
    f = np.broadcast_to(np.asarray(fwhm_mm, dtype=np.float64), (3,))
    if (f < 0).any() or not np.isfinite(f).all():
        raise ValueError(f"FWHM must be finite and >= 0, got {fwhm_mm}")
    return tuple(float(v) for v in f / (2.0 * np.sqrt(2.0 * np.log(2.0))) / np.asarray(voxel_size_mm, float))


def blur_gaussian(image: np.ndarray, fwhm_mm: float | Sequence[float], voxel_size_mm: Sequence[float]) -> np.ndarray:
    """``image`` convolved with a 3-D Gaussian of FWHM ``fwhm_mm`` (mm, scalar or per axis).

    Zero activity outside the grid (``mode="constant"``): the grid must hold the whole
    object plus a few sigmas, as the MLEM grid does for the phantom's active disk.
    """
    from scipy.ndimage import gaussian_filter

    sigma = fwhm_to_sigma_voxels(fwhm_mm, voxel_size_mm)
    return gaussian_filter(np.asarray(image, dtype=np.float64), sigma, mode="constant", cval=0.0, truncate=4.0)


def phantom_truth(phantom_cfg: Mapping[str, Any], geometry: ImageGeometry) -> np.ndarray:
    """The phantom's activity (Bq/mL, voxel volume averages) on the centred grid ``geometry``."""
    from equipet.simulation.phantom import hot_rod_phantom

    v = geometry.voxel_size_mm
    if len(set(v)) != 1:
        raise ValueError(f"the truth is voxelised on cubic voxels only, got {v}")
    return hot_rod_phantom(phantom_cfg).voxelise(v[0], shape=geometry.shape).activity_bq_per_ml.astype(np.float64)


def reference_ratios(truth: np.ndarray, rod_masks: Mapping[float, np.ndarray], background: np.ndarray,
                     fwhm_mm: float | Sequence[float], voxel_size_mm: Sequence[float]) -> dict[float, float]:
    """``tbar_{w,rod,d} / tbar_{w,bkg}`` of the truth blurred with FWHM ``fwhm_mm`` (module doc)."""
    t = blur_gaussian(truth, fwhm_mm, voxel_size_mm)
    b = float(t[background].mean())
    return {d: float(t[m].mean() / b) if m.any() else float("nan") for d, m in rod_masks.items()}


def blurred_crc(image: np.ndarray, rod_masks: Mapping[float, np.ndarray], background: np.ndarray,
                ref_ratio: Mapping[float, float], true_ratio: float) -> dict[str, dict[float, float]]:
    """``crc_blurred_truth`` and ``crc_fraction`` per rod diameter against the blurred truth's ratios (module doc)."""
    crc = contrast_metrics(image, rod_masks, background, true_ratio)["crc"]
    reference = {d: (ref_ratio[d] - 1.0) / (true_ratio - 1.0) for d in rod_masks}
    fraction = {d: (crc[d] / reference[d] if reference[d] != 0 else float("nan")) for d in rod_masks}
    return {"crc_blurred_truth": reference, "crc_fraction": fraction}


def phantom_rois(phantom_cfg: Mapping[str, Any], geometry: ImageGeometry,
                 metrics_cfg: Mapping[str, Any]) -> tuple[dict[float, np.ndarray], np.ndarray, float]:
    """ROIs and the true rod/background ratio from the ``phantom`` config section."""
    from equipet.simulation.phantom import hot_rod_phantom

    ph = hot_rod_phantom(phantom_cfg)
    rods, bkg = roi_masks(geometry, ph.rods, ph.rod_length_mm, ph.cold_diameter_mm, ph.active_diameter_mm,
                          metrics_cfg["roi_diameter_fraction"], metrics_cfg["background_margin_mm"],
                          metrics_cfg["z_margin_mm"])
    ratio = 1.0 / ph.background_ratio if ph.background_ratio > 0 else float("inf")
    return rods, bkg, ratio


def metrics_rows(image: np.ndarray, rods: Mapping[float, np.ndarray], bkg: np.ndarray, ratio: float,
                 iteration: int, ctr_ps: float, seed: int = 0,
                 references: Mapping[float, Mapping[float, float]] | None = None) -> list[dict[str, Any]]:
    """Tidy rows ``experiment, model, seed, epoch, metric, value, ctr_ps`` for one image.

    ``references`` maps a reference FWHM (mm) to :func:`reference_ratios` of the truth blurred
    with it; each adds ``crc_blurred_truth_<d>mm`` and ``crc_fraction_<d>mm`` rows with that FWHM in
    ``reference_fwhm_mm`` (module doc).
    """
    m = contrast_metrics(image, rods, bkg, ratio)
    base = {"experiment": "mlem", "model": "mlem", "seed": seed, "epoch": iteration, "ctr_ps": ctr_ps}
    rows = [{**base, "metric": f"crc_{d:g}mm", "value": v} for d, v in sorted(m["crc"].items(), reverse=True)]
    rows.append({**base, "metric": "background_cov", "value": m["background_cov"]})
    rows.append({**base, "metric": "background_mean", "value": m["background_mean"]})
    for fwhm, ref in (references or {}).items():
        b = blurred_crc(image, rods, bkg, ref, ratio)
        for name in ("crc_blurred_truth", "crc_fraction"):
            rows += [{**base, "metric": f"{name}_{d:g}mm", "value": v, "reference_fwhm_mm": float(fwhm)}
                     for d, v in sorted(b[name].items(), reverse=True)]
    return rows
