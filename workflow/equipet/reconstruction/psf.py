"""The system's measured point-source response and the CRC of the truth blurred with it.

**Point sources.** A point source (``mlem.psf.decays`` decays, no positron range) is simulated
with the embedded Monte Carlo (:class:`equipet.simulation.montecarlo.Simulator`, its ``source`` hook) in
the configured scanner *and phantom* (same attenuation and scatter in the water cylinder), at
the CTR of the acquisition, with ``randoms: false``; two positions: the image centre and the
rods' mean radius ``r_rods = mean_k |c_k|`` over the rod centres ``c_k``, placed on the +x axis
(so x is radial and y tangential there). Its unscattered trues (``mlem.events: trues``
selection; the system response, scatter being a separate additive term) are reconstructed
exactly as the acquisition is: the same sensitivity image, TOF kernel
(:func:`equipet.reconstruction.mlem.tof_kernel_fwhm_mm`, with the blank scan's DOI spread), iterations,
subsets, support and LOR endpoints.

**Fit.** Around the peak (a cube of half-width ``mlem.psf.window_mm``) the image is summed
onto each axis (the projections of a 3-D Gaussian are Gaussians of the same width) and each
1-D profile is fitted (least squares, :func:`scipy.optimize.curve_fit`) with a Gaussian
*averaged over each voxel* plus a constant,

.. math:: p_i = \\frac{A}{v} \\int_{x_i - v/2}^{x_i + v/2} e^{-(u - \\mu)^2 / 2 \\sigma^2}\\, du + b,

so the fitted ``FWHM = 2 sqrt(2 ln 2) sigma`` is the continuous response, without the voxel's
box, which the volume-averaged truth (:func:`equipet.reconstruction.recon_metrics.phantom_truth`) already
carries. A profile that does not determine the four parameters (fewer than 5 planes, or a
singular fit, e.g. a response all in one plane, narrower than the voxel can show) gives a NaN
FWHM on that axis, with a warning in the log; a NaN axial width adds no axial blur to the
blurred truth. At the centre, FWHM (x, y, z) as fitted; at the rods' radius, rods lie at every
azimuth, so the in-plane blur is isotropic with the quadrature mean of the radial and tangential
widths, ``FWHM_xy = sqrt((FWHM_r^2 + FWHM_t^2) / 2)`` (same in-plane variance), and z as fitted.

**Blurred truth.** Per CTR and position, the truth blurred with that Gaussian gives
``crc_blurred_truth`` per rod size (:mod:`equipet.reconstruction.recon_metrics`): the CRC of the rods if
the reconstruction were the truth seen through this point response (partial volume at the
resolution an isolated point reaches). Next to it ``crc_mlem``, the CRC of the acquisition's
last MLEM iteration, and ``crc_fraction = crc_mlem / crc_blurred_truth``.

It is a reference, **not a bound**: the response is that of an isolated point in a cold
background after the acquisition's iterations, fitted with a Gaussian core (tails and MLEM's
edge overshoot are not in it); MLEM converges more slowly on warm, extended rods than on a
point, and a reconstruction with more iterations, or with overshoot at the rod edges, can
exceed it. ``crc_fraction`` below 1 says the rods lag the point's convergence (or noise);
above 1, sharper than the point reference.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from equipet.reconstruction.projector import ImageGeometry

log = logging.getLogger("equipet.reconstruction.psf")

FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))


def rods_mean_radius_mm(phantom_cfg: Mapping[str, Any]) -> float:
    """Mean distance of the rod centres from the axis, mm."""
    from equipet.simulation.phantom import hot_rod_phantom

    rods = hot_rod_phantom(phantom_cfg).rods
    return float(np.hypot(rods[:, 0], rods[:, 1]).mean())


def simulate_point_source(scanner: Any, phantom_cfg: Mapping[str, Any], acq_cfg: Mapping[str, Any],
                          position_mm: Sequence[float], decays: int, ctr_ps: float, seed: int,
                          lor_endpoints: str = "crystal", energy_window_kev: Sequence[float] | None = None):
    """Unscattered true coincidences of a point source at ``position_mm`` (module doc), as list-mode events."""
    from equipet.reconstruction.listmode import convert_chunk
    from equipet.simulation.montecarlo import AcquisitionSettings, Simulator
    from equipet.simulation.phantom import hot_rod_phantom

    pos = np.asarray(position_mm, dtype=np.float64).reshape(1, 3)

    def source(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        return np.broadcast_to(pos, (n, 3)).copy(), np.zeros(n, dtype=np.int32)

    acq = AcquisitionSettings.from_config(acq_cfg, duration_s=1.0, n_jobs=1, seed=int(seed), randoms=False)
    sim = Simulator(scanner, hot_rod_phantom(phantom_cfg), acq, source=source, source_activity_bq=float(decays))
    data = sim.run_job(0, ctr_ps, progress=False)["data"]
    n = len(data.get("time1", ()))
    data.setdefault("RayleighPhantom1", np.zeros(n, np.int32))
    data.setdefault("RayleighPhantom2", np.zeros(n, np.int32))
    window = tuple(energy_window_kev) if energy_window_kev else None
    return convert_chunk(data, scanner, "trues", lor_endpoints, window)


def _box_profile(x: np.ndarray, amplitude: float, mu: float, sigma: float, background: float,
                 voxel_mm: float) -> np.ndarray:
    from scipy.special import erf

    s = max(abs(sigma), 1e-6) * math.sqrt(2.0)
    return amplitude * 0.5 * (erf((x + voxel_mm / 2 - mu) / s) - erf((x - voxel_mm / 2 - mu) / s)) + background


def fit_fwhm_mm(image: np.ndarray, geometry: ImageGeometry, window_mm: float) -> dict[str, Any]:
    """Peak position and fitted FWHM (x, y, z) of a reconstructed point source (module doc), mm."""
    from scipy.optimize import OptimizeWarning, curve_fit

    peak = np.unravel_index(int(np.argmax(image)), image.shape)
    c = geometry.voxel_centres_mm()[peak]
    out: dict[str, Any] = {"peak_mm": [float(v) for v in c]}
    sl = []
    for a in range(3):
        h = int(math.ceil(window_mm / geometry.voxel_size_mm[a]))
        sl.append(slice(max(peak[a] - h, 0), min(peak[a] + h + 1, image.shape[a])))
    cube = np.asarray(image[tuple(sl)], dtype=np.float64)
    fwhm = []
    for a, name in enumerate("xyz"):
        v = geometry.voxel_size_mm[a]
        prof = cube.sum(axis=tuple(b for b in range(3) if b != a))
        x = geometry.origin_mm[a] + v * np.arange(sl[a].start, sl[a].stop)
        p0 = [float(prof.max()), float(c[a]), v, 0.0]
        if len(prof) < 5:   # too few planes (a thin grid): the width is not measurable
            fwhm.append(float("nan"))
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", OptimizeWarning)   # judged below from the covariance itself
            popt, pcov = curve_fit(lambda xx, A, m, s, b: _box_profile(xx, A, m, s, b, v), x, prof, p0=p0,
                                   maxfev=20000)
        if not np.all(np.isfinite(np.diag(pcov))):
            # a singular fit: the profile does not determine the width (e.g. all in one plane,
            # narrower than a voxel can show)
            log.warning("PSF fit along %s (%d planes of %g mm): the profile does not determine the width "
                        "(singular fit); FWHM %s recorded as NaN", name, len(prof), v, name)
            fwhm.append(float("nan"))
            continue
        fwhm.append(FWHM_PER_SIGMA * abs(float(popt[2])))
        out[f"centroid_{name}_mm"] = float(popt[1])
    out["fwhm_mm"] = fwhm
    return out


def reconstruct_point(events: Any, sensitivity: torch.Tensor, geometry: ImageGeometry, mlem: Mapping[str, Any],
                      tof_fwhm_mm: float, device: torch.device) -> np.ndarray:
    """The point source's image after ``mlem.iterations``, with the acquisition's MLEM settings."""
    from equipet.reconstruction.geometry import box_with_halo, lor_hits_box
    from equipet.reconstruction.mlem import chunk_events, listmode_mlem

    lo, hi = box_with_halo(geometry)
    ev = events.subset(lor_hits_box(events.p1_mm.astype(np.float64), events.p2_mm.astype(np.float64), lo, hi))
    p1, p2, tof = ev.to_torch(device)
    x = listmode_mlem(p1, p2, tof if mlem["tof"] else None, sensitivity, geometry, mlem["iterations"],
                      mlem["subsets"], tof_fwhm_mm, mlem["tof_truncation_sigma"], mlem["min_sensitivity_fraction"],
                      chunk_events(mlem, device), mlem["system_cache_mb"], progress=False)
    return x.cpu().numpy()


def measure_psf(scanner: Any, phantom_cfg: Mapping[str, Any], acq_cfg: Mapping[str, Any], mlem: Mapping[str, Any],
                sensitivity: torch.Tensor, geometry: ImageGeometry, ctr_ps: float, tof_fwhm_mm: float,
                device: torch.device, positions: Mapping[str, Sequence[float]] | None = None) -> dict[str, Any]:
    """Fitted PSF at each position (default: centre and rods' mean radius on +x), as a JSON-able dict."""
    psf_cfg = mlem["psf"]
    if positions is None:
        positions = {"centre": (0.0, 0.0, 0.0), "rods_radius": (rods_mean_radius_mm(phantom_cfg), 0.0, 0.0)}
    out: dict[str, Any] = {"ctr_ps": ctr_ps, "tof_kernel_fwhm_mm": tof_fwhm_mm, "iterations": mlem["iterations"],
                           "positions": {}}
    lo = np.asarray(geometry.origin_mm) - np.asarray(geometry.voxel_size_mm) / 2
    hi = lo + np.asarray(geometry.extent_mm)
    for name, pos in positions.items():
        margin = np.array([psf_cfg["window_mm"]] * 2 + [0.0])   # the fit window is clipped axially
        if np.any(np.asarray(pos) - margin < lo) or np.any(np.asarray(pos) + margin > hi):
            from equipet.errors import ConfigError

            raise ConfigError(f"the {name} point source at {list(pos)} mm (+- mlem.psf.window_mm in-plane) lies outside "
                              f"the image [{lo.tolist()}, {hi.tolist()}] mm", where="mlem.fov_mm",
                              fix="widen mlem.fov_mm to cover the rods, or lower mlem.psf.window_mm")
    for k, (name, pos) in enumerate(positions.items()):
        ev = simulate_point_source(scanner, phantom_cfg, acq_cfg, pos, psf_cfg["decays"], ctr_ps,
                                   psf_cfg["seed"] + k, mlem["lor_endpoints"], mlem.get("energy_window_kev"))
        img = reconstruct_point(ev, sensitivity, geometry, mlem, tof_fwhm_mm, device)
        fit = fit_fwhm_mm(img, geometry, psf_cfg["window_mm"])
        fit.update(position_mm=[float(v) for v in pos], events=len(ev))
        out["positions"][name] = fit
        log.info("PSF %s at %s mm, CTR %g ps: %d events, FWHM x/y/z %s mm", name, list(pos), ctr_ps, len(ev),
                 np.round(fit["fwhm_mm"], 3).tolist())
    return out


def blur_fwhm_mm(name: str, fwhm_xyz: Sequence[float]) -> tuple[float, float, float]:
    """The Gaussian that blurs the truth, from a fitted PSF (module doc: isotropic in-plane off centre)."""
    fx, fy, fz = (float(v) for v in fwhm_xyz)
    fz = 0.0 if not math.isfinite(fz) else fz
    if name == "centre":
        return fx, fy, fz
    fxy = math.sqrt((fx * fx + fy * fy) / 2.0)
    return fxy, fxy, fz


def blurred_truth_rows(psf: Mapping[str, Any], truth: np.ndarray, rods: Mapping[float, np.ndarray], bkg: np.ndarray,
                 ratio: float, geometry: ImageGeometry,
                 mlem_crc: Mapping[float, float] | None = None) -> list[dict[str, Any]]:
    """Tidy rows per PSF position and rod size: ``crc_blurred_truth``, ``crc_mlem``, ``crc_fraction`` (module doc)."""
    from equipet.reconstruction.recon_metrics import reference_ratios

    rows = []
    for name, fit in psf["positions"].items():
        w = blur_fwhm_mm(name, fit["fwhm_mm"])
        ref = reference_ratios(truth, rods, bkg, w, geometry.voxel_size_mm)
        for d in sorted(rods, reverse=True):
            ceil = (ref[d] - 1.0) / (ratio - 1.0)
            m = float("nan") if mlem_crc is None else float(mlem_crc.get(d, float("nan")))
            rows.append({"ctr_ps": float(psf["ctr_ps"]), "psf_position": name,
                         "psf_fwhm_x_mm": fit["fwhm_mm"][0], "psf_fwhm_y_mm": fit["fwhm_mm"][1],
                         "psf_fwhm_z_mm": fit["fwhm_mm"][2], "blur_fwhm_xy_mm": w[0], "blur_fwhm_z_mm": w[2],
                         "rod_mm": float(d), "crc_blurred_truth": ceil, "crc_mlem": m,
                         "crc_fraction": m / ceil if ceil != 0 else float("nan"), "iteration": psf["iterations"]})
    return rows


# ---------------------------------------------------------------------------------------
