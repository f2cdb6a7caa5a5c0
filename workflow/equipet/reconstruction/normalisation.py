"""Crystal-pair detection efficiency (normalisation) from a simulated blank scan.

**Model.** The system matrix of :mod:`equipet.reconstruction.mlem` has one line per pair of detection
elements (crystal, DOI layer) joining their centres. The simulated detector does not see
every such line equally: photons penetrate (the front layer detects about 65% of the photons,
the back one 35%), oblique photons cross more crystal and are assigned to the element of their
largest deposit, and the line model's own geometric weighting differs from the true solid angle
by obliquity factors. The efficiency of the line ``L = (i, j)`` is taken as a product of
per-end components (component-based normalisation),

.. math::

    n_L = h_{k(i, L)} \\, h_{k(j, L)}, \\qquad
    k(i, L) = (\\ell_i, \\lfloor \\theta_{iL} / \\Delta\\theta \\rfloor),

with ``l_i`` the DOI layer of element ``i`` and ``theta_iL`` the incidence angle of the line at
that end: the angle between the line and the inward normal of the element's module
(``cos theta = -u . n_k``, ``n_k = (cos phi_k, sin phi_k, 0)``), in ``angle_bins`` bins of
``Delta theta = 90 deg / angle_bins``.

**Blank scan.** The embedded simulator (:mod:`equipet.simulation.montecarlo`, same physics as the
acquisitions) is run on a uniform cylinder of activity in air (radius ``radius_mm``, the image's
bounding circle; length = the scanner's axial length; no randoms). Its expected counts on line
``L`` in the line model are ``c n_L chi_L`` with ``chi_L`` the chord of the line through the
cylinder (the projection of the uniform source) and ``c`` a global constant. Summed over class
pairs, with ``M_km`` the detected coincidences and ``E_km = sum_{L in (k, m)} chi_L`` (a Monte
Carlo sum over element pairs, :func:`class_pair_chords`), the Poisson likelihood of ``h`` is
maximised by the fixed point

.. math::

    h_k = \\frac{\\sum_m M_{km}}{c \\sum_m h_m E_{km}},

iterated from ``h = 1`` (:func:`fit_components`). ``h`` is scaled so that the ``E``-weighted
mean of ``n_L`` over all lines is 1 (the image stays in the same arbitrary units).

The sensitivity image then sums ``eta_L n_L a_Lj`` (:func:`equipet.reconstruction.mlem.sensitivity_image`
with ``efficiency=``); in the event loop a per-event factor cancels (module doc of
:mod:`equipet.reconstruction.mlem`), so normalisation enters only through the sensitivity, like attenuation.

The blank scan is simulated with perfect timing (CTR 0): the TOF offsets of its coincidences
then differ from those expected from their source points (LOR between crystal centres) only by
the depth of interaction and inter-crystal scatter. Their standard deviation,
``doi_tof_sigma_mm``, widens the TOF kernel (:func:`equipet.reconstruction.mlem.tof_kernel_fwhm_mm`).

Not modelled: dependences beyond layer and incidence angle (e.g. the transaxial position of a
crystal in its module, the axial end crystals); the tests check the model's predictions per
ring difference and per layer pair on an independent blank scan.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from equipet.files import atomic_path
from equipet.simulation.scanner import Scanner

log = logging.getLogger("equipet.reconstruction.normalisation")


def end_class(scanner: Scanner, element: np.ndarray, p_end: np.ndarray, p_other: np.ndarray,
              angle_bins: int) -> np.ndarray:
    """Component class ``layer * angle_bins + theta bin`` of the end ``element`` (at ``p_end``) of
    the line ``p_end -> p_other`` (see the module docstring)."""
    rsector, module, crystal, layer = scanner.split_index(element)
    ring = module * scanner.pixels_axial + crystal // scanner.pixels_transaxial
    n_rings = scanner.rings * scanner.pixels_axial
    folded = np.minimum(ring, n_rings - 1 - ring)          # axial mirror symmetry
    phi = 2.0 * np.pi * rsector / scanner.modules_per_ring
    u = p_other - p_end
    u = u / np.linalg.norm(u, axis=1, keepdims=True)
    cos_t = np.clip(-(u[:, 0] * np.cos(phi) + u[:, 1] * np.sin(phi)), -1.0, 1.0)
    theta = np.arccos(np.abs(cos_t))
    b = np.minimum((theta / (0.5 * np.pi) * angle_bins).astype(np.int64), angle_bins - 1)
    return (layer * ((n_rings + 1) // 2) + folded) * angle_bins + b


def n_classes(scanner: Scanner, angle_bins: int) -> int:
    """Number of end classes (layers x folded axial rings x angle bins)."""
    return scanner.doi_layers * ((scanner.rings * scanner.pixels_axial + 1) // 2) * angle_bins


def cylinder_chord_mm(p1: np.ndarray, p2: np.ndarray, radius_mm: float, half_length_mm: float) -> np.ndarray:
    """Length (mm) of the segment ``p1 -> p2`` inside the cylinder ``x^2 + y^2 <= R^2, |z| <= H``."""
    d = p2 - p1
    a = d[:, 0] ** 2 + d[:, 1] ** 2
    b = p1[:, 0] * d[:, 0] + p1[:, 1] * d[:, 1]
    c = p1[:, 0] ** 2 + p1[:, 1] ** 2 - radius_mm ** 2
    disc = b * b - a * c
    a_safe = np.where(a > 0, a, 1.0)
    sq = np.sqrt(np.maximum(disc, 0.0))
    t0, t1 = (-b - sq) / a_safe, (-b + sq) / a_safe
    ok = (disc > 0) & (a > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        za, zb = (-half_length_mm - p1[:, 2]) / d[:, 2], (half_length_mm - p1[:, 2]) / d[:, 2]
    zlo = np.where(d[:, 2] == 0, np.where(np.abs(p1[:, 2]) <= half_length_mm, -np.inf, np.inf), np.minimum(za, zb))
    zhi = np.where(d[:, 2] == 0, np.where(np.abs(p1[:, 2]) <= half_length_mm, np.inf, -np.inf), np.maximum(za, zb))
    lo = np.maximum.reduce([t0, zlo, np.zeros_like(t0)])
    hi = np.minimum.reduce([t1, zhi, np.ones_like(t1)])
    return np.where(ok & (hi > lo), (hi - lo) * np.linalg.norm(d, axis=1), 0.0)


@dataclass(frozen=True)
class BlankScan:
    """The blank scan's source and statistics (see the module docstring)."""

    radius_mm: float
    decays: int
    seed: int = 0

    def simulate(self, scanner: Scanner, acq_cfg: Mapping[str, Any] | None = None,
                 progress: bool = False, with_doi_residual: bool = False):
        """Run the embedded simulator on the uniform cylinder in air; element indices ``(i, j)``
        of the detected coincidences (energy window of the scanner). The scan has perfect timing
        (CTR 0), so with ``with_doi_residual`` it also returns each coincidence's TOF offset minus
        the one expected from its source point with the LOR between the crystal centres: the
        depth-of-interaction part of the TOF error (:func:`doi_tof_sigma_mm`)."""
        from equipet.simulation.montecarlo import AcquisitionSettings, Simulator
        from equipet.simulation.phantom import hot_rod_phantom

        acq = AcquisitionSettings.from_config(acq_cfg, duration_s=1.0, n_jobs=1, seed=self.seed, randoms=False)
        R, H = self.radius_mm, scanner.axial_length_mm / 2.0

        def source(n: int, rng: np.random.Generator):
            r = R * np.sqrt(rng.random(n))
            a = 2.0 * np.pi * rng.random(n)
            return np.stack([r * np.cos(a), r * np.sin(a), rng.uniform(-H, H, n)], 1), np.zeros(n, np.int32)

        sim = Simulator(scanner, hot_rod_phantom({"material": "Air"}), acq, source=source,
                        source_activity_bq=float(self.decays))
        data = sim.run_job(0, 0.0, None, progress=progress)["data"]
        ids = [[data[f"{n}{k}"] for n in ("rsectorID", "moduleID", "crystalID", "layerID")] for k in (1, 2)]
        i, j = scanner.flat_index(*ids[0]), scanner.flat_index(*ids[1])
        if not with_doi_residual:
            return i, j
        from equipet.reconstruction.listmode import lor_endpoints_mm, tof_sign_residual_mm

        p1, p2 = lor_endpoints_mm(data, scanner, "crystal")
        return i, j, tof_sign_residual_mm(data, p1, p2)


def doi_tof_sigma_mm(residual_mm: np.ndarray) -> float:
    """Standard deviation (mm) of the TOF offset's depth-of-interaction error, from the residuals
    of a perfect-timing scan (:meth:`BlankScan.simulate`), within 5 robust sigmas of the median."""
    r = np.asarray(residual_mm, dtype=np.float64)
    med = np.median(r)
    robust = 1.4826 * np.median(np.abs(r - med))
    return float(r[np.abs(r - med) < 5 * robust].std())


def class_pair_counts(scanner: Scanner, i: np.ndarray, j: np.ndarray, angle_bins: int) -> np.ndarray:
    """Symmetric ``M_km``: the detected coincidences per (end class, end class), both orders counted."""
    c = scanner.all_crystal_centres_mm()
    k1 = end_class(scanner, i, c[i], c[j], angle_bins)
    k2 = end_class(scanner, j, c[j], c[i], angle_bins)
    K = n_classes(scanner, angle_bins)
    m = np.bincount(k1 * K + k2, minlength=K * K).reshape(K, K).astype(np.float64)
    return m + m.T


def class_pair_chords(scanner: Scanner, radius_mm: float, angle_bins: int, n_pairs: int,
                      seed: int = 0) -> np.ndarray:
    """Symmetric ``E_km = sum over lines of class pair (k, m) of the chord through the blank
    cylinder`` (both orders), estimated from ``n_pairs`` ordered element pairs drawn uniformly
    among those whose rsectors can see the cylinder (:func:`equipet.reconstruction.mlem.sample_pairs`)."""
    from equipet.reconstruction.geometry import sample_pairs, candidate_rsector_offsets

    offsets = candidate_rsector_offsets(scanner, radius_mm)
    per_rsector = scanner.rings * scanner.crystals_per_module * scanner.doi_layers
    space = float(scanner.n_crystals) * len(offsets) * per_rsector
    rng = np.random.default_rng(seed)
    c = scanner.all_crystal_centres_mm()
    K = n_classes(scanner, angle_bins)
    e = np.zeros(K * K)
    H = scanner.axial_length_mm / 2.0
    left = int(n_pairs)
    while left > 0:
        n = min(left, 1 << 20)
        left -= n
        i, j = sample_pairs(scanner, offsets, n, rng)
        chord = cylinder_chord_mm(c[i], c[j], radius_mm, H)
        hit = chord > 0
        i, j, chord = i[hit], j[hit], chord[hit]
        k1 = end_class(scanner, i, c[i], c[j], angle_bins)
        k2 = end_class(scanner, j, c[j], c[i], angle_bins)
        e += np.bincount(k1 * K + k2, weights=chord, minlength=K * K)
    e = e.reshape(K, K) * (space / n_pairs)     # ordered pairs: each unordered line twice
    return 0.5 * (e + e.T)


def fit_components(counts: np.ndarray, chords: np.ndarray, iterations: int = 200) -> np.ndarray:
    """Maximum-likelihood ``h`` of ``M_km ~ Poisson(c h_k h_m E_km)`` (module docstring), scaled so
    that ``sum h_k h_m E_km = sum E_km``. Classes without chords or counts get ``h = 0``."""
    M, E = np.asarray(counts, float), np.asarray(chords, float)
    row_m = M.sum(1)
    used = (E.sum(1) > 0) & (row_m > 0)
    h = used.astype(float)
    for _ in range(iterations):
        c = M.sum() / (h @ E @ h)
        denom = c * (E @ h)
        h = np.where(used, np.sqrt(h * row_m / np.where(denom > 0, denom, 1.0)), 0.0)
    return h * math.sqrt(E.sum() / (h @ E @ h))


@dataclass(frozen=True)
class Normalisation:
    """Per-end efficiency components ``h`` (``doi_layers x angle_bins``); see the module doc."""

    h: np.ndarray
    angle_bins: int
    doi_tof_sigma_mm: float | None = None

    def pair_efficiency(self, scanner: Scanner, i: np.ndarray, j: np.ndarray,
                        p_i: np.ndarray, p_j: np.ndarray) -> np.ndarray:
        """``n_L = h_k(i) h_k(j)`` of the lines between elements ``i`` at ``p_i`` and ``j`` at ``p_j``."""
        h = np.asarray(self.h, dtype=np.float64).reshape(-1)
        return (h[end_class(scanner, i, p_i, p_j, self.angle_bins)]
                * h[end_class(scanner, j, p_j, p_i, self.angle_bins)])

    def to_json(self) -> dict:
        return {"h": np.asarray(self.h).reshape(-1).tolist(), "angle_bins": self.angle_bins,
                "doi_tof_sigma_mm": self.doi_tof_sigma_mm}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Normalisation":
        return cls(np.asarray(d["h"], dtype=np.float64), int(d["angle_bins"]), d.get("doi_tof_sigma_mm"))


def blank_scan_normalisation(scanner: Scanner, radius_mm: float, decays: int, angle_bins: int,
                             chord_pairs: int, seed: int = 0, acq_cfg: Mapping[str, Any] | None = None,
                             progress: bool = False) -> tuple[Normalisation, dict]:
    """Simulate the blank scan and fit :class:`Normalisation`; also return diagnostics."""
    t0 = time.perf_counter()
    i, j, resid = BlankScan(radius_mm, decays, seed).simulate(scanner, acq_cfg, progress, with_doi_residual=True)
    M = class_pair_counts(scanner, i, j, angle_bins)
    E = class_pair_chords(scanner, radius_mm, angle_bins, chord_pairs, seed + 1)
    h = fit_components(M, E)
    layers = scanner.split_index(np.concatenate([i, j]))[3]
    info = {"blank_coincidences": int(i.size), "layer_fractions": np.bincount(layers, minlength=scanner.doi_layers)
            .astype(float).__truediv__(max(layers.size, 1)).tolist(), "seconds": time.perf_counter() - t0}
    log.info("normalisation: %d blank coincidences, h = %s (%.1f s)", i.size, np.round(h, 3).tolist(),
             info["seconds"])
    sigma = doi_tof_sigma_mm(resid)
    info["doi_tof_sigma_mm"] = sigma
    return Normalisation(h, angle_bins, sigma), info


def normalisation_key(scanner: Mapping[str, Any], mlem: Mapping[str, Any], radius_mm: float) -> dict:
    """Everything the normalisation depends on (its cache key)."""
    return {"scanner": dict(scanner), "normalisation": dict(mlem["normalisation"]), "radius_mm": radius_mm}


def blank_radius_mm(mlem: Mapping[str, Any]) -> float:
    """Radius of the blank cylinder: the bounding circle of the image box with its one-voxel halo."""
    from equipet.reconstruction.geometry import box_with_halo, image_geometry

    lo, hi = box_with_halo(image_geometry(mlem))
    return float(np.linalg.norm(np.maximum(np.abs(lo[:2]), np.abs(hi[:2]))))


def load_normalisation(path: str | Path, key: Mapping[str, Any]) -> Normalisation:
    """Read a normalisation JSON, refusing one computed for other settings."""
    from equipet.errors import InputDataError
    from equipet.reconstruction.geometry import key_hash

    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputDataError(f"cannot read the normalisation ({exc})", where=str(path),
                             fix="rerun equipet-normalisation") from exc
    if data.get("key_hash") != key_hash(key):
        raise InputDataError("normalisation computed for other settings (scanner or mlem.normalisation)",
                             where=str(path), fix="delete it and rerun equipet-normalisation")
    return Normalisation.from_json(data)
