"""Embedded Monte Carlo of the PET acquisition (the default ``builtin`` backend).

It reads the same scanner (:mod:`equipet.simulation.scanner`), phantom (:mod:`equipet.simulation.phantom`) and
acquisition description as the GATE macros (:mod:`equipet.simulation.gate_macros`) and writes GATE's
ROOT ``Coincidences`` tree (:mod:`equipet.simulation.gate_root`). Everything is vectorised with numpy over
batches of decays. What is modelled, in order:

1. **Decays.** The number of decays in the job's time slice ``[t0, t1)`` is Poisson with mean
   ``A (t1 - t0)`` (``A`` total activity, Bq); decay times are uniform in the slice (a Poisson
   process); positions are drawn exactly from the analytic activity distribution. Positron
   range is neglected (as with GATE's ``backtoback`` source) and decay during the
   acquisition is neglected (no half-life, as ``backtoback`` with a fixed activity).
2. **Annihilation photons.** Two 511 keV photons, isotropic; photon 2 deviates from
   ``-u1`` by the acollinearity angle (GATE ``setAccoValue``), sampled by
   :func:`acollinear_partner` with ``acquisition.acollinearity_model``:
   ``projected`` (default) makes the deviation a 2-D Gaussian in the plane normal to ``u1``,
   each projected component with FWHM ``acollinearity_fwhm_deg`` (the polar angle is then
   Rayleigh-distributed), as measured in water and as current GATE samples it (Toussaint et al.,
   Phys. Med. Biol. 69 (2024) 195010, doi 10.1088/1361-6560/ad70f1; OpenGATE/Gate PR #762);
   ``gate9`` reproduces GATE 9 before that fix, a Gaussian polar angle of that FWHM around a
   uniform azimuth, which gives each projected component only ``1/sqrt 2`` of the spread.
3. **Phantom.** Photons cross the water cylinder with ``mu(E) = mu_511 sigma_KN(E) / sigma_KN(511 keV)``
   (Compton dominates water between 100 keV and 1 MeV; photoelectric and Rayleigh, together
   below 1 % at 511 keV, are neglected). Each interaction is a Compton scatter with angle and
   energy from the Klein-Nishina cross section (Kahn's rejection method); up to
   ``max_phantom_interactions`` are followed, a photon that would interact again is absorbed.
   ``comptonPhantom`` counts the scatters; ``RayleighPhantom`` is always 0.
4. **Detector.** Each rsector (a box of all rings' crystals, ``crystal_thickness_mm`` deep) is
   intersected with the photon's ray (slab method) for the nearest three rsectors, so photons
   penetrate into neighbouring modules. The depth of the first interaction is sampled along
   the concatenated LYSO path with ``mu_tot(E) = mu_pe(E) + mu_C(E)``:
   ``mu_pe = mu_pe,511 (0.511/E)^3`` and ``mu_C = mu_C,511 sigma_KN(E)/sigma_KN(511)``. A
   photoelectric absorption deposits the photon's energy; a Compton interaction deposits the
   electron's energy and the scattered photon is followed again through the three rsectors, up
   to ``max_crystal_interactions`` (inter-crystal scatter). Photons that leave escape.
5. **Singles.** A photon's deposits form one single (readout policy ``TakeEnergyWinner``):
   energy = sum of deposits, position and IDs = those of the largest deposit
   (``Scanner.locate``). Energy blurred with a Gaussian of FWHM ``R sqrt(0.511 E)``
   (``energyResolution`` with ``energyOfReference 511 keV``) then the energy window.
   Time = decay time + path length to the first interaction in the crystals / c (the
   scintillation starts there), blurred with a Gaussian of FWHM ``CTR/sqrt(2)``.
   ``comptonCrystal`` counts the Compton interactions in the crystals before the winner.
6. **Coincidences.** With ``randoms: true`` the singles of the whole batch are sorted in time
   and a non-paralysable window of ``coincidence_window_ns`` is opened by each single not
   already in a window (GATE's sorter); windows with two singles give a coincidence, with more,
   ``takeWinnerOfGoods`` keeps the good pair of highest summed energy (``killAll`` drops them).
   Pairs closer than ``min_sector_difference`` rsectors are rejected. Random coincidences thus
   arise from the singles rate. With ``randoms: false`` only the two photons of one decay pair.
   Single 1 is the one that opened the window (``time1 <= time2``).

The random stream of the physics (steps 1-5 except timing) depends only on ``seed + job``,
so all CTRs see the same decays and differ only by time blurring and sorting. Windows that
straddle two batches are not formed (a loss of order ``rate x window``, negligible).

Crystal attenuation constants (1/mm at 511 keV; photoelectric, Compton) are approximate XCOM
values: LYSO (7.1 g/cm3) 0.032, 0.055 (total 0.087); LSO (7.4) 0.034, 0.057; BGO (7.13)
0.041, 0.055.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from equipet.simulation.gate_root import C_MM_PER_S, CoincidenceWriter
from equipet.simulation.phantom import HotRodPhantom
from equipet.simulation.scanner import Scanner

log = logging.getLogger("equipet.simulation.montecarlo")

ME_C2_MEV = 0.51099895
FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))
#: (photoelectric, Compton) linear attenuation at 511 keV, 1/mm
CRYSTAL_MU_511 = {"LYSO": (0.032, 0.055), "LSO": (0.034, 0.057), "BGO": (0.041, 0.055)}


def kn_total_relative(e_mev: np.ndarray) -> np.ndarray:
    """Klein-Nishina total cross section at ``e_mev`` relative to its value at 511 keV."""
    def sigma(k):
        k = np.asarray(k, dtype=np.float64)
        l = np.log1p(2 * k)
        return ((1 + k) / k**2 * (2 * (1 + k) / (1 + 2 * k) - l / k) + l / (2 * k)
                - (1 + 3 * k) / (1 + 2 * k) ** 2)
    return sigma(np.asarray(e_mev) / ME_C2_MEV) / sigma(1.0)


def sample_klein_nishina(e_mev: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Kahn's method: ``(cos_theta, e_scattered_mev)`` for photons of energy ``e_mev``."""
    k = np.asarray(e_mev, dtype=np.float64) / ME_C2_MEV
    n = k.shape[0]
    cos_t = np.empty(n)
    todo = np.arange(n)
    while todo.size:
        kk = k[todo]
        r1, r2, r3 = rng.random((3, todo.size))
        branch1 = r1 <= (1 + 2 * kk) / (9 + 2 * kk)
        eta = np.where(branch1, 1 + 2 * kk * r2, (1 + 2 * kk) / (1 + 2 * kk * r2))
        c = 1 - (eta - 1) / kk
        acc = np.where(branch1, r3 <= 4 * (1 / eta - 1 / eta**2), r3 <= 0.5 * (c * c + 1 / eta))
        cos_t[todo[acc]] = c[acc]
        todo = todo[~acc]
    cos_t = np.clip(cos_t, -1.0, 1.0)
    e_out = e_mev / (1 + k * (1 - cos_t))
    return cos_t, e_out


def rotate_directions(d: np.ndarray, cos_t: np.ndarray, phi: np.ndarray) -> np.ndarray:
    """Directions at polar angle ``acos(cos_t)`` and azimuth ``phi`` around unit vectors ``d``."""
    ux, uy, uz = d[:, 0], d[:, 1], d[:, 2]
    sin_t = np.sqrt(np.clip(1 - cos_t**2, 0, None))
    cp, sp = np.cos(phi), np.sin(phi)
    den = np.sqrt(np.clip(1 - uz**2, 0, None))
    ok = den > 1e-8
    dsafe = np.where(ok, den, 1.0)
    nx = np.where(ok, sin_t * (ux * uz * cp - uy * sp) / dsafe + ux * cos_t, sin_t * cp)
    ny = np.where(ok, sin_t * (uy * uz * cp + ux * sp) / dsafe + uy * cos_t, sin_t * sp)
    nz = np.where(ok, -sin_t * cp * den + uz * cos_t, np.sign(uz + (uz == 0)) * cos_t)
    out = np.stack([nx, ny, nz], axis=1)
    return out / np.linalg.norm(out, axis=1, keepdims=True)


ACOLLINEARITY_MODELS = ("projected", "gate9")


def acollinear_partner(u1: np.ndarray, fwhm_deg: float, model: str, rng: np.random.Generator) -> np.ndarray:
    """Direction of the second annihilation photon, given the first one's ``u1`` (n, 3).

    The deviation of ``u2`` from ``-u1`` is a small rotation by the polar angle ``theta``
    around a uniform azimuth ``phi``. With ``sigma = fwhm_deg / (2 sqrt(2 ln 2))`` (radians):

    * ``projected``: the deviation vector ``(theta cos phi, theta sin phi)`` is a 2-D Gaussian
      with standard deviation ``sigma`` per component, so each projected component (the one a
      LOR's transaxial or axial blur sees) has FWHM ``fwhm_deg``, and ``theta`` follows a
      Rayleigh law, ``theta = sigma sqrt(-2 ln U)``. This is the physical model (Toussaint et al.,
      Phys. Med. Biol. 69 (2024) 195010) and that of GATE after OpenGATE/Gate PR #762.
    * ``gate9``: ``theta ~ N(0, sigma)``, GATE 9's sampling before that fix; each projected
      component then has standard deviation ``sigma / sqrt 2``, about 0.71 of the intended one.
    """
    n = len(u1)
    if fwhm_deg <= 0:
        return -u1
    sig = math.radians(fwhm_deg) * FWHM_TO_SIGMA
    if model == "projected":
        theta = sig * np.sqrt(-2.0 * np.log1p(-rng.random(n)))
    elif model == "gate9":
        theta = rng.normal(0.0, sig, n)
    else:
        raise ValueError(f"acollinearity model {model!r} is not one of {ACOLLINEARITY_MODELS}")
    return rotate_directions(-u1, np.cos(theta), 2 * np.pi * rng.random(n))


def isotropic(n: int, rng: np.random.Generator) -> np.ndarray:
    cz = 2 * rng.random(n) - 1
    phi = 2 * np.pi * rng.random(n)
    s = np.sqrt(1 - cz * cz)
    return np.stack([s * np.cos(phi), s * np.sin(phi), cz], axis=1)


@dataclass
class AcquisitionSettings:
    """The parts of the ``acquisition`` config section the simulator uses (see its schema)."""

    duration_s: float
    activity_scale: float
    n_jobs: int
    seed: int
    acollinearity_fwhm_deg: float
    acollinearity_model: str
    randoms: bool
    min_sector_difference: int
    multiples_policy: str
    max_phantom_interactions: int
    max_crystal_interactions: int
    batch_size: int

    @classmethod
    def from_config(cls, acq: Mapping[str, Any] | None = None, **overrides: Any) -> "AcquisitionSettings":
        """From the ``acquisition`` section; missing keys take the schema defaults."""
        from equipet.config import schema_defaults

        values = schema_defaults("acquisition")
        values.update(acq or {})
        values.update(overrides)
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in values.items() if k in names})


class Simulator:
    """Vectorised PET acquisition of a phantom (see the module docstring for the physics).

    ``source`` optionally replaces the phantom's activity by a callable
    ``source(n, rng) -> (positions (n, 3) mm, sourceID (n,))`` with total activity
    ``source_activity_bq`` (point sources in tests).
    """

    def __init__(self, scanner: Scanner, phantom: HotRodPhantom, acq: AcquisitionSettings,
                 source=None, source_activity_bq: float | None = None):
        self.scanner = scanner
        self.phantom = phantom
        self.acq = acq
        self.source = source
        if source is not None and source_activity_bq is None:
            raise ValueError("source_activity_bq is required with a custom source")
        self.activity_bq = (source_activity_bq if source is not None else phantom.total_activity_bq())
        if scanner.material not in CRYSTAL_MU_511:
            raise ValueError(f"no attenuation data for crystal material {scanner.material}")
        self.mu_pe511, self.mu_c511 = CRYSTAL_MU_511[scanner.material]
        self._cos = np.cos(scanner.rsector_angles_rad)
        self._sin = np.sin(scanner.rsector_angles_rad)
        lo, hi = (e / 1000.0 for e in scanner.energy_window_kev)
        self.e_lo, self.e_hi = lo, hi
        sig_lo = scanner.energy_resolution_fwhm * math.sqrt(ME_C2_MEV * lo) * FWHM_TO_SIGMA
        self.e_min_track = max(lo - 6 * sig_lo, 0.01)  # below this a photon cannot reach the window

    # ---- sources -----------------------------------------------------------------------
    def _sample_sources(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        if self.source is not None:
            pos, sid = self.source(n, rng)
            return np.asarray(pos, dtype=np.float64), np.asarray(sid, dtype=np.int32)
        pos, region = self.phantom.sample_decay_positions(n, rng, return_region=True)
        return pos, region.astype(np.int32)

    # ---- transport ---------------------------------------------------------------------
    def _phantom_transport(self, pos, d, e, path, ncompt, alive, rng):
        """Move photons to the phantom surface, Compton-scattering on the way (in place)."""
        R = self.phantom.diameter_mm / 2.0
        H = self.phantom.length_mm / 2.0
        mu511 = self.phantom.mu_per_mm
        idx = np.flatnonzero(alive)
        full = idx.size == alive.size  # first pass over every photon: slices, no gathers
        for it in range(self.acq.max_phantom_interactions + 1):
            if idx.size == 0:
                break
            p, u = (pos, d) if full else (pos[idx], d[idx])
            dist = _exit_distance_cylinder(p, u, R, H)
            if mu511 > 0:
                # all photons are at 511 keV on the first pass
                mu = mu511 if full else mu511 * kn_total_relative(e[idx])
                s = rng.exponential(1.0, idx.size) / mu
                hit = s < dist
                step = np.minimum(s, dist)
            else:
                hit = np.zeros(idx.size, dtype=bool)
                step = dist
            if full:
                pos += step[:, None] * d
                path += step
            else:
                pos[idx] = p + step[:, None] * u
                path[idx] += step
            full = False
            hidx = idx[hit]
            if it == self.acq.max_phantom_interactions:
                alive[hidx] = False  # higher orders: absorbed
                break
            if hidx.size:
                cos_t, e_new = sample_klein_nishina(e[hidx], rng)
                phi = 2 * np.pi * rng.random(hidx.size)
                d[hidx] = rotate_directions(d[hidx], cos_t, phi)
                e[hidx] = e_new
                ncompt[hidx] += 1
            idx = hidx

    def _rsector_segments(self, p, u, k):
        """Entry/exit distances ``(t_in, t_out)``, shape (n, m), of rays ``p + t u`` (t >= 0) in the
        rsector boxes ``k`` (n, m); ``t_out == t_in`` where the ray misses the box."""
        sc = self.scanner
        c, s = self._cos[k], self._sin[k]
        p0, p1, u0, u1 = p[:, 0:1], p[:, 1:2], u[:, 0:1], u[:, 1:2]
        with np.errstate(divide="ignore", invalid="ignore"):
            # axial slab: the same for every rsector
            inv = 1.0 / u[:, 2]
            ta = (-sc.axial_length_mm / 2 - p[:, 2]) * inv
            tb = (sc.axial_length_mm / 2 - p[:, 2]) * inv
            t_in = np.fmax(np.fmin(ta, tb), 0.0)[:, None]
            t_out = np.fmin(np.fmax(ta, tb), np.inf)[:, None]
            q, v = p0 * c + p1 * s, u0 * c + u1 * s
            inv = 1.0 / v
            ta = (sc.radius_mm - q) * inv
            tb = (sc.radius_mm + sc.crystal_thickness_mm - q) * inv
            t_in = np.fmax(t_in, np.fmin(ta, tb))
            t_out = np.fmin(t_out, np.fmax(ta, tb))
            q, v = p1 * c - p0 * s, u1 * c - u0 * s
            inv = 1.0 / v
            ta = (-sc.module_width_mm / 2 - q) * inv
            tb = (sc.module_width_mm / 2 - q) * inv
            t_in = np.fmax(t_in, np.fmin(ta, tb))
            t_out = np.fmin(t_out, np.fmax(ta, tb))
        return t_in, np.where(t_out > t_in, t_out, t_in)

    def _candidate_rsectors(self, p, u):
        """Index of the rsector the ray meets at the inner radius, and its two neighbours, (n, 3)."""
        R = self.scanner.radius_mm
        a = u[:, 0] ** 2 + u[:, 1] ** 2
        b = p[:, 0] * u[:, 0] + p[:, 1] * u[:, 1]
        c = p[:, 0] ** 2 + p[:, 1] ** 2 - R * R
        a_safe = np.where(a > 0, a, 1.0)
        t = (-b + np.sqrt(np.clip(b * b - a * c, 0, None))) / a_safe
        t = np.where(c > 0, 0.0, t)  # already beyond the inner radius (inside a crystal)
        x = p[:, 0] + t * u[:, 0]
        y = p[:, 1] + t * u[:, 1]
        n = self.scanner.modules_per_ring
        k0 = np.mod(np.rint(np.arctan2(y, x) / (2 * np.pi / n)), n).astype(np.int64)
        return np.mod(k0[:, None] + np.array([-1, 0, 1])[None, :], n)

    def _detect(self, pos, d, e, path, rng):
        """Track photons through the crystals.

        Returns per photon: total deposit (MeV, 0 if none), position of the largest deposit,
        path length from the annihilation to the first interaction (mm), and the number of
        Compton interactions in the crystals before the largest deposit.
        """
        n = pos.shape[0]
        edep_tot = np.zeros(n)
        best_e = np.zeros(n)
        best_pos = np.full((n, 3), np.nan)
        first_path = np.zeros(n)
        n_compt_cr = np.zeros(n, dtype=np.int32)
        best_ncompt = np.zeros(n, dtype=np.int32)
        cands = self._candidate_rsectors(pos, d)
        idx = np.arange(n)
        p, u, en, L = pos.copy(), d.copy(), e.copy(), path.copy()
        for it in range(self.acq.max_crystal_interactions):
            if idx.size == 0:
                break
            cand = cands[idx]
            t_in, t_out = self._rsector_segments(p, u, cand)
            length = t_out - t_in
            order = np.argsort(t_in, axis=1)
            t_in = np.take_along_axis(t_in, order, 1)
            length = np.take_along_axis(length, order, 1)
            cum = np.cumsum(length, axis=1)
            mu_pe = self.mu_pe511 * (ME_C2_MEV / en) ** 3
            mu_c = self.mu_c511 * kn_total_relative(en)
            tau = rng.exponential(1.0, idx.size) / (mu_pe + mu_c)
            inter = tau < cum[:, -1]
            j = np.argmax(cum > tau[:, None], axis=1)
            before = np.where(j > 0, np.take_along_axis(cum, np.maximum(j - 1, 0)[:, None], 1)[:, 0], 0.0)
            t_hit = np.take_along_axis(t_in, j[:, None], 1)[:, 0] + (tau - before)
            keep = inter
            idx, p, u, en, L = idx[keep], p[keep], u[keep], en[keep], L[keep]
            t_hit, mu_pe, mu_c = t_hit[keep], mu_pe[keep], mu_c[keep]
            p = p + t_hit[:, None] * u
            L = L + t_hit
            if it == 0:
                first_path[idx] = L
            photo = rng.random(idx.size) < mu_pe / (mu_pe + mu_c)
            dep = en.copy()
            comp = ~photo
            if comp.any():
                cos_t, e_new = sample_klein_nishina(en[comp], rng)
                dep[comp] = en[comp] - e_new
                phi = 2 * np.pi * rng.random(int(comp.sum()))
                u[comp] = rotate_directions(u[comp], cos_t, phi)
                en[comp] = e_new
            edep_tot[idx] += dep
            better = dep > best_e[idx]
            bi = idx[better]
            best_e[bi] = dep[better]
            best_pos[bi] = p[better]
            best_ncompt[bi] = n_compt_cr[bi]
            n_compt_cr[idx[comp]] += 1
            idx, p, u, en, L = idx[comp], p[comp], u[comp], en[comp], L[comp]
        return edep_tot, best_pos, first_path, best_ncompt

    # ---- one batch -----------------------------------------------------------------------
    def simulate_batch(self, times_s: np.ndarray, first_event_id: int, rng: np.random.Generator,
                       time_rng: np.random.Generator, ctr_ps: float,
                       singles_counts: np.ndarray | None = None) -> tuple[dict[str, np.ndarray], int]:
        """Simulate the decays at ``times_s``; return (coincidences as GATE branches, n_singles).

        ``singles_counts`` (``scanner.n_crystals``, int64), when given, is incremented by the
        singles (in the energy window) of each detection element, in
        :meth:`~equipet.simulation.scanner.Scanner.flat_index` order: the singles rates a scanner
        reports, from which randoms are estimated (:mod:`equipet.reconstruction.corrections`).
        """
        n = times_s.size
        src, sid = self._sample_sources(n, rng)
        u1 = isotropic(n, rng)
        u2 = acollinear_partner(u1, self.acq.acollinearity_fwhm_deg, self.acq.acollinearity_model, rng)
        # photons: index i (photon 1 of decay i) and n + i (photon 2)
        pos = np.concatenate([src, src])
        d = np.concatenate([u1, u2])
        e = np.full(2 * n, ME_C2_MEV)
        path = np.zeros(2 * n)
        ncompt = np.zeros(2 * n, dtype=np.int32)
        alive = np.ones(2 * n, dtype=bool)
        self._phantom_transport(pos, d, e, path, ncompt, alive, rng)
        # keep photons that can reach the detector with enough energy
        sc = self.scanner
        alive &= e >= self.e_min_track
        rho = np.sqrt(np.maximum(d[:, 0] ** 2 + d[:, 1] ** 2, 1e-30))
        # a photon whose z stays beyond the crystal band from (before) entry to (after) exit misses
        r_out = (sc.radius_mm + sc.crystal_thickness_mm) / math.cos(math.pi / sc.modules_per_ring)
        z_near = pos[:, 2] + d[:, 2] * np.minimum((sc.radius_mm - 60.0) / rho, 1e9)
        z_far = pos[:, 2] + d[:, 2] * np.minimum((r_out + 60.0) / rho, 1e9)
        half = sc.axial_length_mm / 2
        alive &= ~(((z_near > half) & (z_far > half)) | ((z_near < -half) & (z_far < -half)))
        rho2 = rho * rho
        alive &= rho2 > 1e-12
        ph = np.flatnonzero(alive)
        edep, gpos, gpath, ncr = self._detect(pos[ph], d[ph], e[ph], path[ph], rng)
        # singles: energy blur and window
        det = edep > 0
        ph, edep, gpos, gpath, ncr = ph[det], edep[det], gpos[det], gpath[det], ncr[det]
        sig_e = sc.energy_resolution_fwhm * np.sqrt(ME_C2_MEV * edep) * FWHM_TO_SIGMA
        e_meas = edep + sig_e * rng.standard_normal(edep.size)
        ok = (e_meas >= self.e_lo) & (e_meas <= self.e_hi)
        ids = sc.locate(gpos)
        ok &= ids[0] >= 0
        ph, e_meas, gpos, gpath, ncr = ph[ok], e_meas[ok], gpos[ok], gpath[ok], ncr[ok]
        rsec, mod, cry, lay = (a[ok] for a in ids)
        if singles_counts is not None:
            singles_counts += np.bincount(sc.flat_index(rsec, mod, cry, lay), minlength=sc.n_crystals)
        decay = ph % n
        sig_t = ctr_ps * 1e-12 / math.sqrt(2.0) * FWHM_TO_SIGMA
        t = times_s[decay] + gpath / C_MM_PER_S + sig_t * time_rng.standard_normal(ph.size)
        singles = dict(t=t, decay=decay, e=e_meas, pos=gpos, rsec=rsec, mod=mod, cry=cry, lay=lay,
                       ncomp=ncompt[ph], ncr=ncr)
        pairs = self._sort_coincidences(singles)
        i1, i2 = pairs
        out: dict[str, np.ndarray] = {"runID": np.zeros(i1.size, np.int32)}
        for suf, ii in (("1", i1), ("2", i2)):
            dec = singles["decay"][ii]
            out["eventID" + suf] = dec + first_event_id
            out["sourceID" + suf] = sid[dec]
            out["sourcePosX" + suf] = src[dec, 0]
            out["sourcePosY" + suf] = src[dec, 1]
            out["sourcePosZ" + suf] = src[dec, 2]
            out["time" + suf] = singles["t"][ii]
            out["energy" + suf] = singles["e"][ii]
            out["globalPosX" + suf] = singles["pos"][ii, 0]
            out["globalPosY" + suf] = singles["pos"][ii, 1]
            out["globalPosZ" + suf] = singles["pos"][ii, 2]
            out["rsectorID" + suf] = singles["rsec"][ii]
            out["moduleID" + suf] = singles["mod"][ii]
            out["crystalID" + suf] = singles["cry"][ii]
            out["layerID" + suf] = singles["lay"][ii]
            out["comptonPhantom" + suf] = singles["ncomp"][ii]
            out["comptonCrystal" + suf] = singles["ncr"][ii]
        return out, int(ph.size)

    def _good_pair(self, r1, r2):
        n = self.scanner.modules_per_ring
        diff = np.abs(r1 - r2)
        diff = np.minimum(diff, n - diff)
        return diff >= self.acq.min_sector_difference

    def _sort_coincidences(self, s: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Indices (single 1, single 2) of the coincidences among the singles."""
        t = s["t"]
        win = self.scanner.coincidence_window_ns * 1e-9
        if not self.acq.randoms:
            order = np.lexsort((t, s["decay"]))
            dec = s["decay"][order]
            same = np.flatnonzero(dec[1:] == dec[:-1])
            i1, i2 = order[same], order[same + 1]
            ok = (t[i2] - t[i1] <= win) & self._good_pair(s["rsec"][i1], s["rsec"][i2])
            return i1[ok], i2[ok]
        order = np.argsort(t, kind="stable")
        ts = t[order]
        m = ts.size
        if m < 2:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        gap = np.diff(ts)
        # chains: maximal runs of singles each within `win` of the previous one
        starts = np.flatnonzero(np.concatenate([[True], gap > win]))
        ends = np.concatenate([starts[1:], [m]])
        size = ends - starts
        first = []
        second = []
        two = size == 2
        a = starts[two]
        first.append(order[a])
        second.append(order[a + 1])
        for st, en in zip(starts[size > 2], ends[size > 2]):  # rare: resolve windows sequentially
            k = st
            while k < en - 1:
                inwin = np.flatnonzero(ts[k:en] - ts[k] <= win) + k
                if inwin.size == 2:
                    first.append(order[inwin[:1]])
                    second.append(order[inwin[1:]])
                elif inwin.size > 2 and self.acq.multiples_policy == "takeWinnerOfGoods":
                    oi = order[inwin]
                    ia, ib = np.triu_indices(oi.size, 1)
                    good = self._good_pair(s["rsec"][oi[ia]], s["rsec"][oi[ib]])
                    if good.any():
                        esum = np.where(good, s["e"][oi[ia]] + s["e"][oi[ib]], -1.0)
                        w = int(np.argmax(esum))
                        first.append(oi[[ia[w]]])
                        second.append(oi[[ib[w]]])
                k = inwin[-1] + 1
        i1 = np.concatenate(first).astype(np.int64)
        i2 = np.concatenate(second).astype(np.int64)
        # single 1 opened the window (earlier time)
        swap = t[i2] < t[i1]
        i1, i2 = np.where(swap, i2, i1), np.where(swap, i1, i2)
        ok = self._good_pair(s["rsec"][i1], s["rsec"][i2])
        i1, i2 = i1[ok], i2[ok]
        o = np.argsort(t[i1], kind="stable")
        return i1[o], i2[o]

    # ---- one job ------------------------------------------------------------------------
    def job_time_slice(self, job: int) -> tuple[float, float]:
        T = self.acq.duration_s
        return job * T / self.acq.n_jobs, (job + 1) * T / self.acq.n_jobs

    def run_job(self, job: int, ctr_ps: float, out: str | Path | None = None,
                progress: bool = True) -> dict[str, Any]:
        """Simulate one time-slice job; write ``out`` (GATE ROOT) when given.

        Returns the metadata, plus the coincidences under ``"data"`` and the singles per
        detection element under ``"singles_counts"`` when ``out`` is None (the file holds
        them in its ``singlesPerElement`` tree, :data:`equipet.simulation.gate_root.SINGLES_TREE`).
        """
        from tqdm import tqdm

        if not 0 <= job < self.acq.n_jobs:
            raise ValueError(f"job {job} outside 0..{self.acq.n_jobs - 1}")
        t0, t1 = self.job_time_slice(job)
        seed = self.acq.seed + job
        rng = np.random.default_rng(seed)
        time_rng = np.random.default_rng([seed, int(round(ctr_ps * 1000)), 7])
        n_dec = int(rng.poisson(self.activity_bq * (t1 - t0)))
        times = np.sort(t0 + (t1 - t0) * rng.random(n_dec))
        meta = {"backend": "builtin", "job": job, "n_jobs": self.acq.n_jobs, "seed": seed, "ctr_ps": ctr_ps,
                "t_start_s": t0, "t_stop_s": t1, "duration_s": self.acq.duration_s, "n_decays": n_dec,
                "activity_bq": self.activity_bq}
        start = time.perf_counter()
        n_singles = 0
        chunks = []
        bs = self.acq.batch_size
        writer = CoincidenceWriter(out, meta) if out is not None else None
        singles = np.zeros(self.scanner.n_crystals, dtype=np.int64)
        try:
            if writer is not None:
                writer.__enter__()
            with tqdm(total=n_dec, desc=f"ctr{ctr_ps:g} job{job}", unit="decay", unit_scale=True,
                      disable=None if progress else True) as bar:
                for b0 in range(0, n_dec, bs):
                    b1 = min(n_dec, b0 + bs)
                    coinc, ns = self.simulate_batch(times[b0:b1], b0, rng, time_rng, ctr_ps, singles)
                    n_singles += ns
                    if writer is not None:
                        writer.write(coinc)
                    else:
                        chunks.append(coinc)
                    bar.update(b1 - b0)
            elapsed = time.perf_counter() - start
            meta.update(n_singles=n_singles, cpu_seconds=elapsed,
                        decays_per_s=n_dec / elapsed if elapsed > 0 else float("nan"))
            if writer is not None:
                writer.meta.update(meta)
                writer.singles_counts = singles
                writer.__exit__(None, None, None)
                writer = None
        except BaseException as exc:
            if writer is not None:
                writer.__exit__(type(exc), exc, exc.__traceback__)
            raise
        log.info("job %d ctr %g ps: %d decays in [%.3g, %.3g) s, %d singles, %.3g s (%.3g decays/s)",
                 job, ctr_ps, n_dec, t0, t1, n_singles, elapsed, meta["decays_per_s"])
        if out is None:
            keys = chunks[0].keys() if chunks else []
            meta["data"] = {k: np.concatenate([c[k] for c in chunks]) for k in keys}
            meta["singles_counts"] = singles
        return meta


def _exit_distance_cylinder(p: np.ndarray, u: np.ndarray, R: float, H: float) -> np.ndarray:
    """Distance along ``u`` from ``p`` (inside, or on the surface) to the surface of the z-cylinder."""
    a = u[:, 0] ** 2 + u[:, 1] ** 2
    b = p[:, 0] * u[:, 0] + p[:, 1] * u[:, 1]
    c = p[:, 0] ** 2 + p[:, 1] ** 2 - R * R
    with np.errstate(divide="ignore", invalid="ignore"):
        t_side = np.where(a > 0, (-b + np.sqrt(np.clip(b * b - a * c, 0, None))) / np.where(a > 0, a, 1), np.inf)
        t_z = np.where(u[:, 2] > 0, (H - p[:, 2]) / u[:, 2],
                       np.where(u[:, 2] < 0, (-H - p[:, 2]) / u[:, 2], np.inf))
    return np.clip(np.minimum(t_side, t_z), 0, None)


def simulator_from_settings(cfg: Mapping[str, Any]) -> Simulator:
    """Build the simulator from validated config sections ``scanner``, ``phantom``, ``acquisition``."""
    from equipet.simulation.phantom import hot_rod_phantom

    acq = AcquisitionSettings.from_config(cfg.get("acquisition", {}))
    scanner = Scanner.from_config(cfg["scanner"])
    phantom = hot_rod_phantom(cfg.get("phantom", {}), activity_scale=acq.activity_scale)
    return Simulator(scanner, phantom, acq)
