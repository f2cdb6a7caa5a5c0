"""List-mode events from GATE ``Coincidences`` trees: selection, LOR endpoints and TOF.

A chunk is a dict of numpy arrays keyed by GATE branch names (``time1``, ``energy1``,
``globalPosX1``, ``rsectorID1``, ..., suffix 1/2 for the two singles), as yielded by
:func:`equipet.simulation.gate_root.iter_coincidences` (our simulator's files and real GATE 9 files
alike). Per chunk:

1. **selection** (:func:`select_mask`): both singles inside the energy window; with
   ``events="trues"`` also ``eventID1 == eventID2`` (not random) and no Compton or Rayleigh
   interaction in the phantom on either side (not scattered); ``events="all"`` keeps every
   prompt in the window (no scatter or randoms correction follows: a biased but honest
   "what the scanner saw" mode, unless :mod:`equipet.reconstruction.corrections` supplies the randoms and
   scatter terms of the model).
2. **endpoints** (:func:`lor_endpoints_mm`): ``lor_endpoints="crystal"`` puts each end at
   the centre of the detecting crystal *in its DOI layer* (``rsectorID, moduleID,
   crystalID, layerID`` through :meth:`equipet.simulation.scanner.Scanner.crystal_centres_mm`, the one
   source of the geometry) as a real scanner would; ``"global"`` uses the exact
   interaction positions ``globalPosX/Y/Z`` (simulation truth; no crystal discretisation).
3. **TOF** (:func:`tof_offset_mm`): with times in seconds,

   .. math::  \\tau = \\frac{c}{2}\\,(t_2 - t_1), \\qquad c = 2.99792458\\times 10^{11}\\ \\mathrm{mm/s},

   is the signed distance of the annihilation point from the LOR midpoint, **positive
   towards endpoint 1**: a photon that arrives earlier travelled less, so ``t_2 > t_1``
   puts the source nearer detector 1. For a source at ``s``, ``tau = (|p2 - s| - |p1 - s|)/2``
   (tested with synthetic events of known source position, and checkable on simulated files
   with :func:`tof_sign_residual_mm`, which uses the ``sourcePos`` branches).

Files larger than memory: the ROOT tree is read in chunks of ``step_size`` entries and only
the 7 float32 numbers per kept event (two endpoints, one TOF) are accumulated.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from equipet.errors import ConfigError, InputDataError
from equipet.simulation.scanner import Scanner

log = logging.getLogger("equipet.reconstruction.listmode")

#: speed of light, mm per second
C_MM_PER_S = 2.99792458e11

EVENT_MODES = ("trues", "all")
ENDPOINT_MODES = ("crystal", "global")

_BASE_BRANCHES = ["time1", "time2", "energy1", "energy2"]
_TRUE_BRANCHES = ["eventID1", "eventID2", "comptonPhantom1", "comptonPhantom2",
                  "RayleighPhantom1", "RayleighPhantom2"]
_CRYSTAL_BRANCHES = [f"{n}{k}" for k in (1, 2) for n in ("rsectorID", "moduleID", "crystalID", "layerID")]
_GLOBAL_BRANCHES = [f"globalPos{a}{k}" for k in (1, 2) for a in "XYZ"]


def branches_needed(events: str, lor_endpoints: str, elements: bool = False) -> list[str]:
    """The tree branches read for a given selection and endpoint mode.

    ``elements`` also reads the detection-element IDs (for per-crystal-pair corrections).
    """
    _check_modes(events, lor_endpoints)
    out = list(_BASE_BRANCHES)
    if events == "trues":
        out += _TRUE_BRANCHES
    out += _CRYSTAL_BRANCHES if lor_endpoints == "crystal" else _GLOBAL_BRANCHES
    if elements and lor_endpoints != "crystal":
        out += _CRYSTAL_BRANCHES
    return out


def _check_modes(events: str, lor_endpoints: str) -> None:
    if events not in EVENT_MODES:
        raise ConfigError(f"unknown event selection {events!r}", where="mlem.events",
                          fix=f"use one of {', '.join(EVENT_MODES)}")
    if lor_endpoints not in ENDPOINT_MODES:
        raise ConfigError(f"unknown LOR endpoint mode {lor_endpoints!r}", where="mlem.lor_endpoints",
                          fix=f"use one of {', '.join(ENDPOINT_MODES)}")


def select_mask(chunk: Mapping[str, np.ndarray], events: str,
                energy_window_kev: tuple[float, float]) -> np.ndarray:
    """Boolean mask of the coincidences kept (see the module doc, step 1)."""
    lo, hi = (float(e) / 1000.0 for e in energy_window_kev)   # MeV, as in the tree
    e1 = np.asarray(chunk["energy1"])
    e2 = np.asarray(chunk["energy2"])
    keep = (e1 >= lo) & (e1 <= hi) & (e2 >= lo) & (e2 <= hi)
    if events == "trues":
        keep &= np.asarray(chunk["eventID1"]) == np.asarray(chunk["eventID2"])
        for name in ("comptonPhantom1", "comptonPhantom2", "RayleighPhantom1", "RayleighPhantom2"):
            keep &= np.asarray(chunk[name]) == 0
    elif events != "all":
        _check_modes(events, "crystal")
    return keep


def lor_endpoints_mm(chunk: Mapping[str, np.ndarray], scanner: Scanner,
                     lor_endpoints: str = "crystal") -> tuple[np.ndarray, np.ndarray]:
    """LOR endpoints ``(p1, p2)``, each ``(N, 3)`` float64 mm (module doc, step 2)."""
    if lor_endpoints == "crystal":
        ends = []
        for k in (1, 2):
            ids = [np.asarray(chunk[f"{n}{k}"]) for n in ("rsectorID", "moduleID", "crystalID", "layerID")]
            ends.append(scanner.crystal_centres_mm(*ids))
        return ends[0], ends[1]
    if lor_endpoints == "global":
        return tuple(np.stack([np.asarray(chunk[f"globalPos{a}{k}"], dtype=np.float64) for a in "XYZ"], axis=1)
                     for k in (1, 2))  # type: ignore[return-value]
    _check_modes("all", lor_endpoints)
    raise AssertionError  # pragma: no cover


def tof_offset_mm(chunk: Mapping[str, np.ndarray]) -> np.ndarray:
    """TOF offset ``tau = c (t2 - t1) / 2`` in mm, positive towards endpoint 1 (module doc, step 3)."""
    dt = np.asarray(chunk["time2"], dtype=np.float64) - np.asarray(chunk["time1"], dtype=np.float64)
    return 0.5 * C_MM_PER_S * dt


def tof_sign_residual_mm(chunk: Mapping[str, np.ndarray], p1: np.ndarray, p2: np.ndarray) -> np.ndarray:
    """TOF offset minus its value expected from the true source position ``sourcePos*1``.

    For trues the residual spreads by the TOF resolution (sigma = FWHM/2.355); a sign error
    would instead give ``-2 x`` the expected offset (a spread of twice the object size).
    When the files label single 1 as the *earlier* one (GATE's sorter and our simulator do,
    ``time1 <= time2``), the residual is ``sign(tau) x noise``: its median is slightly
    positive for sources near the LOR centre (0.3 / 0.9 / 3.5 mm at 50 / 100 / 200 ps on the
    quick hot-rod run). That is a labelling effect only: the TOF point
    ``midpoint + tau (p1 - p2)/|p1 - p2|`` does not depend on which end is called 1.
    Needs the ``sourcePosX1/Y1/Z1`` branches.
    """
    s = np.stack([np.asarray(chunk[f"sourcePos{a}1"], dtype=np.float64) for a in "XYZ"], axis=1)
    expected = 0.5 * (np.linalg.norm(p2 - s, axis=1) - np.linalg.norm(p1 - s, axis=1))
    return tof_offset_mm(chunk) - expected


@dataclass
class ListmodeEvents:
    """Selected list-mode events: endpoints ``p1_mm``, ``p2_mm`` (N, 3) and ``tof_mm`` (N,), float32.

    ``n_read`` counts the coincidences read from the file, before selection. ``element1``,
    ``element2`` (N,) int64, when read, are the detection elements of the two singles
    (:meth:`equipet.simulation.scanner.Scanner.flat_index`), which per-crystal-pair corrections need.
    """

    p1_mm: np.ndarray
    p2_mm: np.ndarray
    tof_mm: np.ndarray
    n_read: int = 0
    element1: np.ndarray | None = None
    element2: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.tof_mm.shape[0])

    @classmethod
    def concatenate(cls, parts: Iterable["ListmodeEvents"]) -> "ListmodeEvents":
        parts = list(parts)
        if not parts:
            z = np.zeros((0, 3), np.float32)
            return cls(z, z.copy(), np.zeros(0, np.float32), 0)
        with_el = all(p.element1 is not None for p in parts)
        return cls(np.concatenate([p.p1_mm for p in parts]), np.concatenate([p.p2_mm for p in parts]),
                   np.concatenate([p.tof_mm for p in parts]), sum(p.n_read for p in parts),
                   np.concatenate([p.element1 for p in parts]) if with_el else None,
                   np.concatenate([p.element2 for p in parts]) if with_el else None)

    def subset(self, index: Any) -> "ListmodeEvents":
        return ListmodeEvents(self.p1_mm[index], self.p2_mm[index], self.tof_mm[index], self.n_read,
                              None if self.element1 is None else self.element1[index],
                              None if self.element2 is None else self.element2[index])

    def to_torch(self, device: Any = "cpu"):
        """``(p1, p2, tof)`` float32 tensors on ``device``."""
        import torch

        return tuple(torch.as_tensor(a, dtype=torch.float32, device=device)
                     for a in (self.p1_mm, self.p2_mm, self.tof_mm))


def convert_chunk(chunk: Mapping[str, np.ndarray], scanner: Scanner, events: str = "trues",
                  lor_endpoints: str = "crystal",
                  energy_window_kev: tuple[float, float] | None = None,
                  elements: bool = False) -> ListmodeEvents:
    """Select, and convert one chunk of coincidences to :class:`ListmodeEvents`.

    ``energy_window_kev`` defaults to the scanner's window; ``elements`` keeps the
    detection-element indices of both singles.
    """
    _check_modes(events, lor_endpoints)
    window = scanner.energy_window_kev if energy_window_kev is None else energy_window_kev
    keep = select_mask(chunk, events, window)
    sub = {k: np.asarray(v)[keep] for k, v in chunk.items()}
    p1, p2 = lor_endpoints_mm(sub, scanner, lor_endpoints)
    n_read = int(np.asarray(chunk["time1"]).shape[0])
    el = [None, None]
    if elements:
        el = [scanner.flat_index(*(sub[f"{n}{k}"] for n in ("rsectorID", "moduleID", "crystalID", "layerID")))
              for k in (1, 2)]
    return ListmodeEvents(p1.astype(np.float32), p2.astype(np.float32),
                          tof_offset_mm(sub).astype(np.float32), n_read, el[0], el[1])


def iter_coincidence_chunks(path: str | Path, branches: list[str], step_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Chunks of the ``Coincidences`` tree as dicts of numpy arrays.

    Uses :func:`equipet.simulation.gate_root.iter_coincidences` (the project's ROOT reader) when it is
    installed, else reads with uproot directly.
    """
    path = Path(path)
    if not path.exists():
        raise InputDataError("coincidence file not found", where=str(path),
                             fix="run the acquisition rule first (snakemake ... sim/ctr{ctr}/coincidences.root)")
    try:
        from equipet.simulation.gate_root import iter_coincidences  # type: ignore[attr-defined]
    except ImportError:
        iter_coincidences = None
    if iter_coincidences is not None:
        yield from iter_coincidences(path, branches=branches, step_size=step_size)
        return
    import uproot

    try:
        f = uproot.open(path)
        tree = f["Coincidences"]
    except Exception as exc:  # uproot raises many kinds
        raise InputDataError(f"cannot read the Coincidences tree: {exc}", where=str(path),
                             fix="check the file is a GATE ROOT output with setRootCoincidencesFlag 1") from exc
    missing = [b for b in branches if b not in tree.keys()]
    if missing:
        raise InputDataError(f"branches missing from the Coincidences tree: {missing}", where=str(path),
                             fix="use lor_endpoints=global or events=all, or re-run the simulation")
    for arrays in tree.iterate(branches, step_size=step_size, library="np"):
        yield arrays


def read_listmode(path: str | Path, scanner: Scanner, events: str = "trues",
                  lor_endpoints: str = "crystal", energy_window_kev: tuple[float, float] | None = None,
                  step_size: int = 1_000_000, progress: bool = False, elements: bool = False) -> ListmodeEvents:
    """Read a GATE ROOT coincidence file in chunks and return the selected events."""
    branches = branches_needed(events, lor_endpoints, elements)
    parts = []
    chunks = iter_coincidence_chunks(path, branches, step_size)
    if progress:
        from tqdm import tqdm

        chunks = tqdm(chunks, desc=f"read {Path(path).name}", unit="chunk")
    for chunk in chunks:
        parts.append(convert_chunk(chunk, scanner, events, lor_endpoints, energy_window_kev, elements))
    ev = ListmodeEvents.concatenate(parts)
    log.info("%s: kept %d of %d coincidences (events=%s, endpoints=%s)",
             path, len(ev), ev.n_read, events, lor_endpoints)
    return ev


def simulate_true_events(scanner: Scanner, positions_mm: np.ndarray, ctr_ps: float,
                         rng: np.random.Generator, axial_cos_max: float = 1.0) -> dict[str, np.ndarray]:
    """Ideal true coincidences from known annihilation points, as a GATE branch dict (tests, benchmark).

    Each point emits two back-to-back photons in an isotropic direction (``|u_z| <=
    axial_cos_max``); each photon is absorbed at a uniformly random depth in the crystal of
    the module it reaches (no attenuation, scatter, acollinearity or energy blur); photons
    in gaps or beyond the axial ends are lost. Single times are ``t0 + |q - s| / c`` blurred
    by a Gaussian of FWHM ``CTR / sqrt(2)`` each. ``sourcePos*`` hold the true points.
    """
    s = np.asarray(positions_mm, dtype=np.float64)
    n = len(s)
    uz = rng.uniform(-axial_cos_max, axial_cos_max, n)
    phi = rng.uniform(0, 2 * np.pi, n)
    rxy = np.sqrt(1 - uz ** 2)
    u = np.stack([rxy * np.cos(phi), rxy * np.sin(phi), uz], axis=1)
    step = 2 * np.pi / scanner.modules_per_ring
    hits, ids = [], []
    for sign in (1.0, -1.0):
        d = sign * u
        depth = rng.uniform(0, scanner.crystal_thickness_mm, n)
        r = scanner.radius_mm + depth
        # first guess: the module whose azimuth is nearest the crossing of the cylinder of radius r
        b = (s[:, :2] * d[:, :2]).sum(1)
        a = (d[:, :2] ** 2).sum(1)
        c = (s[:, :2] ** 2).sum(1) - r ** 2
        t_cyl = (-b + np.sqrt(np.maximum(b * b - a * c, 0))) / np.maximum(a, 1e-12)
        q = s + t_cyl[:, None] * d
        k = np.mod(np.rint(np.arctan2(q[:, 1], q[:, 0]) / step), scanner.modules_per_ring)
        nk = np.stack([np.cos(k * step), np.sin(k * step)], axis=1)
        t = (r - (s[:, :2] * nk).sum(1)) / np.maximum((d[:, :2] * nk).sum(1), 1e-12)
        q = s + t[:, None] * d
        hits.append(q)
        ids.append(scanner.locate(q))
    ok = np.ones(n, bool)
    for idt in ids:
        ok &= idt[0] >= 0
    sigma_s = ctr_ps * 1e-12 / np.sqrt(2) / (2 * np.sqrt(2 * np.log(2)))
    t0 = np.sort(rng.uniform(0, 1.0, n))
    out: dict[str, np.ndarray] = {}
    for k, (q, idt) in enumerate(zip(hits, ids), start=1):
        out[f"time{k}"] = (t0 + np.linalg.norm(q - s, axis=1) / C_MM_PER_S + rng.normal(0, sigma_s, n))[ok]
        out[f"energy{k}"] = np.full(ok.sum(), 0.511)
        for a, name in enumerate("XYZ"):
            out[f"globalPos{name}{k}"] = q[ok, a]
            out[f"sourcePos{name}{k}"] = s[ok, a]
        for name, arr in zip(("rsectorID", "moduleID", "crystalID", "layerID"), idt):
            out[f"{name}{k}"] = arr[ok]
        out[f"eventID{k}"] = np.arange(n)[ok]
        out[f"comptonPhantom{k}"] = np.zeros(ok.sum(), np.int32)
        out[f"RayleighPhantom{k}"] = np.zeros(ok.sum(), np.int32)
    return out
