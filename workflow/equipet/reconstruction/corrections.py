"""Randoms and scatter: the additive terms that let list-mode MLEM reconstruct all prompts.

**Model.** A prompt ``e`` on the pair of detection elements ``(i, j)`` (crystal and DOI
layer, :meth:`equipet.simulation.scanner.Scanner.flat_index`) with TOF offset ``tau_e`` (mm) has the
expected count density (counts per element pair per mm of TOF offset)

.. math::

    \\bar y_e = \\eta_e (A x)_e + r_e + s_e,

with ``A`` the TOF projector, ``eta_e = n_e exp(-int mu)`` the crystal-pair efficiency of the
event's elements (:mod:`equipet.reconstruction.normalisation`, 1 when it is off) times the attenuation of its
LOR (:func:`equipet.reconstruction.mlem.event_eta`, the factors the sensitivity image is weighted with),
``r_e`` the randoms density and ``s_e`` the scatter density. :func:`equipet.reconstruction.mlem.listmode_mlem`
then updates ``x_j <- x_j / s_j sum_e a_ej / ((A x)_e + b_e)`` with the additive term
``b_e = (r_e + s_e) / eta_e``. Both densities are per mm of TOF offset: with ``mlem.tof: false``
the corrections are refused (a non-TOF event's ``(A x)_e`` is per line). No calibration is needed: MLEM puts ``x`` in counts per unit
of sensitivity (``sum_j s_j x_j + sum_L int (r + s) = N`` at every iteration), the scale in
which ``r`` and ``s`` are expressed here (expected counts of the acquisition).

**Randoms from singles and prompts.** The sorter opens a window of width ``tau_w`` (the
scanner's ``coincidence_window_ns``) on each single not already in one. The textbook
``R_ij = 2 tau_w S_i S_j`` counts every pair of singles from two decays, but a single whose
annihilation partner is also detected turns the window into a multiple: in the quick
acquisition 42% of the singles have their partner detected, and ``2 tau_w S_i S_j``
overestimates the labelled randoms by 26% even in a small test scanner (18% paired). With
``C_i`` the singles of element ``i`` over the acquisition of ``T`` seconds, ``Q_i`` those
with a detected partner (estimated by the element's prompts) and ``L_i = C_i - Q_i`` the
isolated ones, the windows holding singles of exactly two decays give, to first order in
``tau_w sum S``,

.. math::

    R_{ij} = \\frac{2\\tau_w}{T}\\Big[L_i L_j + w_3 (L_i Q_j + Q_i L_j) + w_4\\, Q_i Q_j\\Big]

for the pairs the sorter keeps (rsectors at least ``min_sector_difference`` apart):
two isolated singles always form the random; a window with a pair and an isolated single
(three singles) keeps the random ``(i, j)`` with probability ``w_3`` and one with two pairs
(four singles, four random pairs among six) with ``w_4``. ``takeWinnerOfGoods`` keeps the
good pair of highest summed energy; with exchangeable energies (every single is a
photopeak-window event) and all pairs good, ``w_3 = 1/3`` and ``w_4 = 1/6``; ``killAll``
gives ``w_3 = w_4 = 0``. This is the singles-prompts idea of Oliver and Rafecas (2016)
adapted to this sorter. ``Q`` is the element's prompts less its own expected randoms
(:meth:`SinglesModel.from_counts`). Neglected: windows with singles of three decays
(relative order ``tau_w sum S``).
The arrival-time difference of a random is uniform over the window, so its signed TOF
offset is uniform over ``[-c tau_w / 2, c tau_w / 2]``: ``r_e = R_ij / (c tau_w)``. Singles
come from the ``singlesPerElement`` tree of the acquisition (:func:`equipet.simulation.gate_root.read_singles_counts`).

**Scatter by Monte Carlo.** The embedded simulator (:mod:`equipet.simulation.montecarlo`) runs on the
current activity estimate (decays drawn from the image, uniform inside each voxel) in the
same scanner and phantom attenuation, without randoms. Its coincidences (LORs between the
same crystal centres as the data) are histogrammed in LOR coordinates ``(theta, s, dz)``
(GATE's sinogram angle and signed distance; ``dz = z_A - z_B`` and the TOF offset towards
``A``, with ``A`` the endpoint that puts ``theta`` in ``[0, pi)``) and TOF offset. The
scatter density of a bin is

.. math::

    s_{bin} = k \\, \\frac{S^{MC}_{bin}}{P_{bin}\\, \\Delta\\tau_{bin}},
    \\qquad k = \\frac{N - R}{T^{MC} + S^{MC}},

with ``P_bin`` the number of element pairs of that LOR bin whose crystal-centre LOR crosses
the image box (counted by sampling pairs uniformly, as for the sensitivity image), ``N``
the prompts and ``R`` the estimated randoms on those pairs, and ``T^MC + S^MC`` the
simulated trues and scatter there: the simulation is scaled to the measured trues plus
scatter, so the scatter fraction is the simulated one. Each event takes the density of its
bin. The TOF bins are fine (``scatter.tof_bin_mm``) inside the object plus three TOF sigmas
and one wide bin on each side beyond. Approximations: the density is averaged over the
pairs of a bin (no per-crystal efficiency, as for the trues); the activity outside the
image is not simulated.

The simulation labels (``eventID``, ``comptonPhantom``) are never used here; the tests use
them to check the estimates.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from equipet.errors import ConfigError
from equipet.simulation.gate_root import C_MM_PER_S, sinogram_coordinates
from equipet.simulation.scanner import Scanner

log = logging.getLogger("equipet.reconstruction.corrections")

CORRECTIONS = ("randoms", "scatter")


def check_corrections(corrections: list[str] | tuple[str, ...], events: str) -> tuple[str, ...]:
    """Validate ``mlem.corrections`` against ``mlem.events``."""
    out = tuple(corrections or ())
    bad = [c for c in out if c not in CORRECTIONS]
    if bad:
        raise ConfigError(f"unknown correction(s) {bad}", where="mlem.corrections",
                          fix=f"use a subset of {list(CORRECTIONS)}")
    if out and events != "all":
        raise ConfigError("corrections are for all prompts; trues carry no randoms or scatter",
                          where="mlem.corrections", fix="set mlem.events: all, or mlem.corrections: []")
    return out


def sector_difference(scanner: Scanner, r1: np.ndarray, r2: np.ndarray) -> np.ndarray:
    """Distance between rsectors around the ring, in rsectors."""
    n = scanner.modules_per_ring
    d = np.abs(np.asarray(r1) - np.asarray(r2))
    return np.minimum(d, n - d)


# ---------------------------------------------------------------------------------------
# randoms
#: weights of the windows with three and four singles in which a random pair wins, per
#: multiples policy (module docstring)
MULTIPLES_WEIGHTS = {"takeWinnerOfGoods": (1.0 / 3.0, 1.0 / 6.0), "killAll": (0.0, 0.0)}


@dataclass
class SinglesModel:
    """Singles per detection element split into isolated ones and those with a detected partner.

    ``singles`` ``C_i`` (counts over the acquisition), ``paired`` ``Q_i`` (singles whose
    annihilation partner was also detected, estimated by the prompts of each element),
    ``duration_s`` ``T``, the coincidence window ``window_ns`` and the multiples policy.
    """

    singles: np.ndarray
    paired: np.ndarray
    duration_s: float
    window_ns: float
    multiples_policy: str = "takeWinnerOfGoods"

    @classmethod
    def from_counts(cls, scanner: Scanner, singles: np.ndarray, prompts_per_element: np.ndarray,
                    duration_s: float, window_ns: float, multiples_policy: str = "takeWinnerOfGoods",
                    min_sector_difference: int = 0, iterations: int = 3) -> "SinglesModel":
        """From the singles and the prompts of each element. The prompts include randoms, whose
        singles are isolated ones: ``Q_i = P_i - R_i`` with ``R_i = sum_j R_ij`` the element's
        expected randoms, solved by ``iterations`` fixed-point steps from ``Q = P``."""
        c = np.asarray(singles, dtype=np.float64)
        p = np.minimum(np.asarray(prompts_per_element, dtype=np.float64), c)
        if multiples_policy not in MULTIPLES_WEIGHTS:
            raise ConfigError(f"no randoms model for multiples policy {multiples_policy!r}",
                              where="acquisition.multiples_policy", fix=f"use one of {list(MULTIPLES_WEIGHTS)}")
        model = cls(c, p, float(duration_s), float(window_ns), multiples_policy)
        n = scanner.modules_per_ring
        a, b = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
        good = (sector_difference(scanner, a, b) >= max(min_sector_difference, 1)).astype(np.float64)
        rs = np.arange(scanner.n_crystals) // (scanner.n_crystals // n)
        for _ in range(iterations):
            lam = model.singles - model.paired
            lam_partner = (good @ lam.reshape(n, -1).sum(1))[rs]       # sum of L_j over the good partners
            q_partner = (good @ model.paired.reshape(n, -1).sum(1))[rs]
            r_i = model._terms(lam, model.paired, lam_partner, q_partner)
            model.paired = np.clip(p - r_i, 0.0, None)
        return model

    def _terms(self, a_iso, a_pair, b_iso, b_pair):
        w3, w4 = MULTIPLES_WEIGHTS[self.multiples_policy]
        return (2.0 * self.window_ns * 1e-9 / self.duration_s
                * (a_iso * b_iso + w3 * (a_iso * b_pair + a_pair * b_iso) + w4 * a_pair * b_pair))

    def expected(self, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        """Expected random coincidences ``R_ij`` (counts) of element pairs ``(i, j)``."""
        lam = self.singles - self.paired
        return self._terms(lam[i], self.paired[i], lam[j], self.paired[j])

    def density(self, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        """Randoms per element pair per mm of TOF offset, ``r = R_ij / (c tau_w)``."""
        return self.expected(i, j) / (C_MM_PER_S * self.window_ns * 1e-9)

    def by_sector_pair(self, scanner: Scanner, min_sector_difference: int) -> np.ndarray:
        """Expected randoms per unordered rsector pair ``(a, b)``, ``a < b`` (upper triangle),
        0 for pairs the sorter rejects (closer than ``min_sector_difference``)."""
        n = scanner.modules_per_ring
        lam = (self.singles - self.paired).reshape(n, -1).sum(1)
        q = self.paired.reshape(n, -1).sum(1)
        out = self._terms(lam[:, None], q[:, None], lam[None, :], q[None, :])
        a, b = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
        return np.where((b > a) & (sector_difference(scanner, a, b) >= min_sector_difference), out, 0.0)


def prompts_per_element(scanner: Scanner, element1: np.ndarray, element2: np.ndarray) -> np.ndarray:
    """Prompts in which each detection element took part (counts, flat-index order)."""
    return (np.bincount(element1, minlength=scanner.n_crystals)
            + np.bincount(element2, minlength=scanner.n_crystals)).astype(np.float64)


# ---------------------------------------------------------------------------------------
# LOR coordinates and pair measure
def lor_coordinates(p1: np.ndarray, p2: np.ndarray, tof_mm: np.ndarray | None = None):
    """``(theta, s, dz, tof_A)`` of LORs ``p1 -> p2`` (module docstring): endpoint A is p1
    unless GATE's sinogram convention swaps the ends to put theta in ``[0, pi)``."""
    p1 = np.asarray(p1, dtype=np.float64)
    p2 = np.asarray(p2, dtype=np.float64)
    theta, s = sinogram_coordinates(p1[:, 0], p1[:, 1], p2[:, 0], p2[:, 1])
    swap = np.arctan2(p1[:, 0] - p2[:, 0], p1[:, 1] - p2[:, 1]) < 0
    dz = np.where(swap, p2[:, 2] - p1[:, 2], p1[:, 2] - p2[:, 2])
    tof = None if tof_mm is None else np.where(swap, -np.asarray(tof_mm, np.float64), tof_mm)
    return theta, s, dz, tof


@dataclass
class ScatterBins:
    """Bin edges of the scatter histogram: ``theta`` (rad), ``s`` (mm), ``dz`` (mm), ``tof`` (mm)."""

    theta: np.ndarray
    s: np.ndarray
    dz: np.ndarray
    tof: np.ndarray

    @classmethod
    def make(cls, scanner: Scanner, s_max_mm: float, object_radius_mm: float, tof_fwhm_mm: float | None,
             n_theta: int, n_s: int, n_dz: int, tof_bin_mm: float) -> "ScatterBins":
        dz_max = scanner.axial_length_mm
        if tof_fwhm_mm is None:       # non-TOF: one bin over the whole window
            tof = np.array([-1e6, 1e6])
        else:
            half = object_radius_mm + 3.0 * tof_fwhm_mm / 2.3548
            n = max(2, int(math.ceil(2 * half / tof_bin_mm)))
            tof = np.concatenate([[-1e6], np.linspace(-half, half, n + 1), [1e6]])
        return cls(np.linspace(0, np.pi, n_theta + 1), np.linspace(-s_max_mm, s_max_mm, n_s + 1),
                   np.linspace(-dz_max, dz_max, n_dz + 1), tof)

    @property
    def lor_shape(self) -> tuple[int, int, int]:
        return (len(self.theta) - 1, len(self.s) - 1, len(self.dz) - 1)

    def lor_index(self, theta, s, dz) -> np.ndarray:
        """Flat LOR-bin index, -1 outside."""
        out = np.full(len(theta), -1, dtype=np.int64)
        idx = [np.searchsorted(e, v, side="right") - 1 for e, v in ((self.theta, theta), (self.s, s), (self.dz, dz))]
        ok = np.ones(len(theta), bool)
        for k, n in zip(idx, self.lor_shape):
            ok &= (k >= 0) & (k < n)
        out[ok] = np.ravel_multi_index(tuple(k[ok] for k in idx), self.lor_shape)
        return out

    def tof_index(self, tof) -> np.ndarray:
        return np.clip(np.searchsorted(self.tof, tof, side="right") - 1, 0, len(self.tof) - 2)

    @property
    def tof_width_mm(self) -> np.ndarray:
        return np.diff(self.tof)


def pair_measure(scanner: Scanner, geometry: Any, bins: ScatterBins, n_pairs: int, seed: int,
                 randoms: "SinglesModel | None" = None, min_sector_difference: int = 0) -> tuple[np.ndarray, float]:
    """Element pairs per LOR bin whose crystal-centre LOR crosses the image box (estimated
    from ``n_pairs`` uniform draws of box-crossing pairs), and the expected randoms summed over
    all those pairs (0 without a ``randoms`` model)."""
    from equipet.reconstruction.geometry import box_with_halo, sample_pairs, candidate_rsector_offsets, lor_hits_box

    lo, hi = box_with_halo(geometry)
    radius = float(np.linalg.norm(np.maximum(np.abs(lo[:2]), np.abs(hi[:2]))))
    offsets = candidate_rsector_offsets(scanner, radius)
    per_rsector = scanner.n_crystals // scanner.modules_per_ring
    space = float(scanner.n_crystals) * len(offsets) * per_rsector
    centres = scanner.all_crystal_centres_mm()
    rng = np.random.default_rng(seed)
    hist = np.zeros(int(np.prod(bins.lor_shape)), dtype=np.float64)
    randoms_sum = 0.0
    drawn = hit_total = 0
    while hit_total < n_pairs:
        m = 1 << 20
        i, j = sample_pairs(scanner, offsets, m, rng)
        drawn += m
        ok = lor_hits_box(centres[i], centres[j], lo, hi)
        rs_i, rs_j = i // per_rsector, j // per_rsector
        ok &= sector_difference(scanner, rs_i, rs_j) >= max(min_sector_difference, 1)
        i, j = i[ok], j[ok]
        hit_total += i.size
        th, s, dz, _ = lor_coordinates(centres[i], centres[j])
        k = bins.lor_index(th, s, dz)
        hist += np.bincount(k[k >= 0], minlength=hist.size)
        if randoms is not None:
            randoms_sum += float(randoms.expected(i, j).sum())
    scale = space / (2.0 * drawn)
    return hist.reshape(bins.lor_shape) * scale, randoms_sum * scale


# ---------------------------------------------------------------------------------------
# Monte Carlo scatter
def image_source(image: np.ndarray, geometry: Any):
    """A :class:`equipet.simulation.montecarlo.Simulator` source drawing decays from a voxel image
    (probability proportional to the clipped-positive voxel value, uniform inside the voxel)."""
    w = np.clip(np.asarray(image, dtype=np.float64), 0, None).ravel()
    if not w.sum() > 0:
        raise ValueError("the activity image has no positive voxel")
    cdf = np.cumsum(w)
    cdf /= cdf[-1]
    org = np.asarray(geometry.origin_mm)
    vox = np.asarray(geometry.voxel_size_mm)
    shape = geometry.shape

    def source(n: int, rng: np.random.Generator):
        k = np.minimum(np.searchsorted(cdf, rng.random(n), side="right"), w.size - 1)
        ijk = np.stack(np.unravel_index(k, shape), axis=1)
        pos = org + (ijk + rng.random((n, 3)) - 0.5) * vox
        return pos, np.zeros(n, dtype=np.int32)
    return source


@dataclass
class ScatterEstimate:
    """Scatter density per (LOR bin, TOF bin), counts per element pair per mm, and diagnostics."""

    bins: ScatterBins
    density: np.ndarray            # (n_theta, n_s, n_dz, n_tof)
    info: dict

    def per_event(self, p1: np.ndarray, p2: np.ndarray, tof_mm: np.ndarray) -> np.ndarray:
        th, s, dz, t = lor_coordinates(p1, p2, tof_mm)
        k = self.bins.lor_index(th, s, dz)
        out = np.zeros(len(k))
        ok = k >= 0
        flat = self.density.reshape(-1, self.density.shape[-1])
        out[ok] = flat[k[ok], self.bins.tof_index(t[ok])]
        return out


def simulate_scatter(scanner: Scanner, phantom: Any, acq: Any, image: np.ndarray, geometry: Any,
                     n_decays: int, seed: int, ctr_ps: float, lor_endpoints: str = "crystal"):
    """Monte Carlo of ``n_decays`` decays drawn from ``image``; returns the coincidences (GATE
    branches) crossing the image box with LOR endpoints and a ``scatter`` mask."""
    from dataclasses import replace

    from equipet.simulation.gate_root import classify
    from equipet.reconstruction.listmode import lor_endpoints_mm, tof_offset_mm
    from equipet.reconstruction.geometry import box_with_halo, lor_hits_box
    from equipet.simulation.montecarlo import Simulator

    settings = replace(acq, randoms=False, n_jobs=1, seed=int(seed))
    duration = 1.0
    sim = Simulator(scanner, phantom, replace(settings, duration_s=duration), source=image_source(image, geometry),
                    source_activity_bq=float(n_decays) / duration)
    data = sim.run_job(0, ctr_ps, progress=False)["data"]
    lo, hi = box_with_halo(geometry)
    e_lo, e_hi = (e / 1000.0 for e in scanner.energy_window_kev)
    p1, p2 = lor_endpoints_mm(data, scanner, lor_endpoints)
    keep = lor_hits_box(p1, p2, lo, hi)
    labels = classify(data)
    return p1[keep], p2[keep], tof_offset_mm(data)[keep], labels["scatter"][keep], int(data["time1"].size)


def estimate_scatter(scanner: Scanner, phantom: Any, acq: Any, image: np.ndarray, geometry: Any,
                     n_prompts: float, randoms_total: float, measure: np.ndarray, bins: ScatterBins,
                     n_decays: int, seed: int, ctr_ps: float, lor_endpoints: str = "crystal",
                     smooth_sigma_bins: float = 0.0) -> ScatterEstimate:
    """Monte Carlo scatter estimate scaled to the prompts (module docstring).

    ``n_prompts`` and ``randoms_total`` count the prompts and the expected randoms on the
    element pairs whose LOR crosses the image box, ``measure`` their number per LOR bin
    (:func:`pair_measure`). ``smooth_sigma_bins`` optionally smooths the simulated scatter
    histogram (Gaussian, in bins, TOF axis excluded) to reduce its Monte Carlo noise.
    """
    p1, p2, tof, scat, n_sim = simulate_scatter(scanner, phantom, acq, image, geometry, n_decays, seed,
                                                ctr_ps, lor_endpoints)
    th, s, dz, t = lor_coordinates(p1, p2, tof)
    k = bins.lor_index(th, s, dz)
    n_tof = len(bins.tof) - 1
    sel = scat & (k >= 0)
    hist = np.bincount(k[sel] * n_tof + bins.tof_index(t[sel]), minlength=int(np.prod(bins.lor_shape)) * n_tof)
    hist = hist.reshape(*bins.lor_shape, n_tof).astype(np.float64)
    if smooth_sigma_bins > 0:
        from scipy.ndimage import gaussian_filter

        hist = gaussian_filter(hist, (smooth_sigma_bins, smooth_sigma_bins, smooth_sigma_bins, 0),
                               mode=("wrap", "nearest", "nearest", "nearest"))
    n_mc = float(len(p1))
    k_scale = (n_prompts - randoms_total) / max(n_mc, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        dens = k_scale * hist / (measure[..., None] * bins.tof_width_mm)
    dens = np.where(measure[..., None] > 0, dens, 0.0)
    info = {"mc_decays": n_decays, "mc_coincidences_in_box": int(n_mc), "mc_scatter_in_box": int(scat.sum()),
            "mc_scatter_fraction": float(scat.sum() / max(n_mc, 1.0)), "scale": k_scale,
            "scatter_expected": float(k_scale * scat.sum())}
    log.info("MC scatter: %d decays, %d coincidences in the box, scatter fraction %.3f, expected scatter %.4g",
             n_decays, int(n_mc), info["mc_scatter_fraction"], info["scatter_expected"])
    return ScatterEstimate(bins, dens, info)


def scatter_settings(mlem: Mapping[str, Any]) -> dict:
    """The ``mlem.scatter`` subsection with its schema defaults filled in."""
    from equipet.config import schema_defaults

    out = dict(schema_defaults("mlem").get("scatter", {}))
    out.update(mlem.get("scatter") or {})
    return out
