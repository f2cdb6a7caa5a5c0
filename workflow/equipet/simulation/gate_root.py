"""GATE's ROOT ``Coincidences`` tree: writing, validated chunked reading, merging split jobs.

The embedded simulator writes what GATE 9.3+ writes (``/gate/output/root/setRootCoincidencesFlag 1``),
so every downstream stage reads real GATE output and ours the same way. Branch names, ROOT
types and units follow GATE: time in s (double), energy in MeV, positions in mm, IDs as int.
The string branches ``comptVolName1/2`` and ``RayleighVolName1/2`` are not written (uproot
cannot write fixed-size char arrays); readers must not rely on them.

Classification (GATE convention):

* random: ``eventID1 != eventID2``;
* scattered true: same event and ``comptonPhantom1 + comptonPhantom2 + RayleighPhantom1 + RayleighPhantom2 > 0``;
* true (unscattered): the rest.

TOF: ``time2 - time1`` (s) times ``c/2`` is the offset of the annihilation point from the
middle of the LOR, towards detector 1 (``globalPos*1``) when positive. The embedded
simulator orders each coincidence so that single 1 opened the window, hence
``time1 <= time2`` before any reordering by the reader.

Singles: the embedded simulator also writes the singles of each detection element in a
``singlesPerElement`` tree (what a scanner reports as singles rates); :func:`merge_root`
sums them over jobs, and :func:`read_singles_counts` reads them (or counts GATE's own
``Singles`` tree). The randoms estimate of :mod:`equipet.reconstruction.corrections` uses them.

Split jobs: each job numbers its decays from 0 (as each GATE job does); :func:`merge_root`
offsets ``eventID1/2`` by the decays of the preceding jobs (read from the ``equipet_meta``
string the embedded simulator writes, else ``max(eventID) + 1``) so that IDs stay unique.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from equipet.errors import InputDataError

log = logging.getLogger("equipet.simulation.gate_root")

TREE = "Coincidences"
META = "equipet_meta"
#: singles per detection element (branch ``counts``, one entry per element in
#: :meth:`equipet.simulation.scanner.Scanner.flat_index` order), written by the embedded simulator;
#: GATE's own per-single ``Singles`` tree (``setRootSinglesFlag 1``) carries the same information.
SINGLES_TREE = "singlesPerElement"
GATE_SINGLES_TREE = "Singles"
C_MM_PER_S = 2.99792458e11

_HALF = [
    ("eventID", np.int32), ("sourceID", np.int32),
    ("sourcePosX", np.float32), ("sourcePosY", np.float32), ("sourcePosZ", np.float32),
    ("time", np.float64), ("energy", np.float32),
    ("globalPosX", np.float32), ("globalPosY", np.float32), ("globalPosZ", np.float32),
    ("gantryID", np.int32), ("rsectorID", np.int32), ("moduleID", np.int32),
    ("submoduleID", np.int32), ("crystalID", np.int32), ("layerID", np.int32),
    ("comptonPhantom", np.int32), ("comptonCrystal", np.int32),
    ("RayleighPhantom", np.int32), ("RayleighCrystal", np.int32),
]
#: GATE Coincidences branches written by :class:`CoincidenceWriter`, with their numpy types.
BRANCHES: dict[str, Any] = dict(
    [("runID", np.int32), ("axialPos", np.float32), ("rotationAngle", np.float32)]
    + [(f"{n}1", t) for n, t in _HALF] + [(f"{n}2", t) for n, t in _HALF]
    + [("sinogramTheta", np.float32), ("sinogramS", np.float32)]
)
#: what list-mode reconstruction needs; the reader checks these by default.
REQUIRED = ("eventID1", "eventID2", "time1", "time2", "energy1", "energy2",
            "globalPosX1", "globalPosY1", "globalPosZ1", "globalPosX2", "globalPosY2", "globalPosZ2")


def sinogram_coordinates(x1, y1, x2, y2) -> tuple[np.ndarray, np.ndarray]:
    """GATE's ``sinogramTheta`` (rad, [0, pi)) and ``sinogramS`` (mm, signed LOR distance from the axis)."""
    x1, y1, x2, y2 = (np.asarray(a, dtype=np.float64) for a in (x1, y1, x2, y2))
    theta = np.arctan2(x1 - x2, y1 - y2)
    norm = np.hypot(x1 - x2, y1 - y2)
    s = np.where(norm > 0, (x1 * y2 - x2 * y1) / np.where(norm > 0, norm, 1.0), 0.0)
    neg = theta < 0
    theta = np.where(neg, theta + np.pi, theta)
    s = np.where(neg, -s, s)
    return theta, s


class CoincidenceWriter:
    """Write a GATE ``Coincidences`` tree in chunks; missing branches are filled with 0.

    Written atomically: the file appears under its name only when closed without error.

    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "c.root"
    >>> with CoincidenceWriter(p, meta={"n_decays": 3}) as w:
    ...     w.write({"eventID1": [0, 2], "eventID2": [0, 1], "time1": [0.1, 0.2]})
    >>> read_coincidences(p, ["eventID1", "time1"])["eventID1"].tolist()
    [0, 2]
    """

    def __init__(self, path: str | os.PathLike, meta: Mapping[str, Any] | None = None):
        self.path = Path(path)
        self.meta = dict(meta or {})
        self._tmp: Path | None = None
        self._file = None
        self._tree = None
        self.n_written = 0
        #: singles per detection element, written as :data:`SINGLES_TREE` on a clean close
        self.singles_counts: np.ndarray | None = None

    def __enter__(self) -> "CoincidenceWriter":
        import tempfile

        import uproot

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp.root", dir=self.path.parent)
        os.close(fd)
        self._tmp = Path(tmp)
        self._file = uproot.recreate(self._tmp)
        self._tree = self._file.mktree(TREE, {k: np.dtype(t) for k, t in BRANCHES.items()})
        return self

    def write(self, chunk: Mapping[str, Any]) -> None:
        """Append coincidences given as a mapping of branch name -> 1-D array (equal lengths)."""
        lengths = {len(np.asarray(v)) for v in chunk.values()}
        if len(lengths) > 1:
            raise ValueError(f"branches of unequal length: {lengths}")
        n = lengths.pop() if lengths else 0
        unknown = set(chunk) - set(BRANCHES)
        if unknown:
            raise ValueError(f"not GATE Coincidences branches: {sorted(unknown)}")
        if n == 0:
            return
        data = {k: (np.asarray(chunk[k], dtype=t) if k in chunk else np.zeros(n, dtype=t))
                for k, t in BRANCHES.items()}
        if "sinogramTheta" not in chunk and "globalPosX1" in chunk:
            th, s = sinogram_coordinates(data["globalPosX1"], data["globalPosY1"],
                                         data["globalPosX2"], data["globalPosY2"])
            data["sinogramTheta"] = th.astype(np.float32)
            data["sinogramS"] = s.astype(np.float32)
        self._tree.extend(data)
        self.n_written += n

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.meta.setdefault("n_coincidences", self.n_written)
                self._file[META] = json.dumps(self.meta, sort_keys=True)
                if self.singles_counts is not None:
                    self._file[SINGLES_TREE] = {"counts": np.asarray(self.singles_counts, dtype=np.int64)}
            self._file.close()
            if exc_type is None:
                os.replace(self._tmp, self.path)
        finally:
            if self._tmp is not None and self._tmp.exists():
                self._tmp.unlink()


# ---- reading ------------------------------------------------------------------------------
def _open_tree(path: str | os.PathLike, branches: Sequence[str] | None, tree: str = TREE):
    import uproot

    path = Path(path)
    if not path.exists():
        raise InputDataError("file not found", where=str(path),
                             fix="run the simulation (results/sim/ctr{ctr}/coincidences.root) or correct the path")
    try:
        f = uproot.open(path)
    except Exception as exc:  # uproot raises many types for broken files
        raise InputDataError(f"not a readable ROOT file ({type(exc).__name__}: {exc})", where=str(path),
                             fix="the file is truncated or corrupt: delete it and rerun the stage that wrote it") from exc
    try:
        keys = {k.split(";")[0] for k in f.keys(recursive=False)}
    except Exception as exc:
        raise InputDataError(f"cannot list the ROOT file's contents ({exc})", where=str(path),
                             fix="the file is truncated or corrupt: delete it and rerun the stage that wrote it") from exc
    if tree not in keys:
        raise InputDataError(f"no '{tree}' tree (found: {sorted(keys) or 'nothing'})", where=str(path),
                             fix="enable GATE's coincidence output: /gate/output/root/setRootCoincidencesFlag 1")
    try:
        t = f[tree]
        have = set(t.keys())
    except Exception as exc:
        raise InputDataError(f"cannot read the '{tree}' tree ({type(exc).__name__}: {exc})", where=str(path),
                             fix="the file is truncated or corrupt: delete it and rerun the stage that wrote it") from exc
    wanted = list(branches) if branches is not None else [b for b in BRANCHES if b in have]
    required = set(REQUIRED) if branches is None else set()
    missing = [b for b in dict.fromkeys(list(wanted) + sorted(required)) if b not in have]
    if missing:
        raise InputDataError(f"branch(es) {missing} missing from tree '{tree}'", where=f"{path}: {tree}.{missing[0]}",
                             fix="write GATE's standard Coincidences tree (GATE 9.3+ ROOT output), "
                                 "or ask only for branches the file has")
    return f, t, wanted


def coincidence_entries(path: str | os.PathLike) -> int:
    """Number of coincidences in a file (validates the file first)."""
    f, t, _ = _open_tree(path, None)
    with f:
        return int(t.num_entries)


def iter_coincidences(path: str | os.PathLike, branches: Sequence[str] | None = None,
                      step_size: int = 1_000_000) -> Iterator[dict[str, np.ndarray]]:
    """Yield chunks of at most ``step_size`` coincidences as ``{branch: numpy array}``.

    ``branches=None`` reads every standard branch the file has (and requires the
    :data:`REQUIRED` ones). Units: time s, energy MeV, positions mm. A missing file, tree or
    branch, or a truncated file, raises :class:`~equipet.errors.InputDataError` naming the
    file, the branch and the fix.
    """
    f, t, wanted = _open_tree(path, branches)
    with f:
        n = int(t.num_entries)
        start = 0
        while start < n:
            stop = min(n, start + int(step_size))
            try:
                arrays = t.arrays(wanted, entry_start=start, entry_stop=stop, library="np")
            except Exception as exc:
                raise InputDataError(
                    f"cannot read entries {start}-{stop} of '{TREE}' ({type(exc).__name__}: {exc})",
                    where=str(path),
                    fix="the file is truncated or corrupt: delete it and rerun the stage that wrote it") from exc
            yield {k: np.asarray(arrays[k]) for k in wanted}
            start = stop


def read_coincidences(path: str | os.PathLike, branches: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """All coincidences at once (see :func:`iter_coincidences`)."""
    parts = list(iter_coincidences(path, branches, step_size=10_000_000))
    if not parts:
        f, t, wanted = _open_tree(path, branches)
        f.close()
        return {k: np.zeros(0, dtype=BRANCHES.get(k, np.float64)) for k in wanted}
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The ``equipet_meta`` JSON of a file written by the embedded simulator ({} for GATE files)."""
    import uproot

    try:
        with uproot.open(path) as f:
            if META not in {k.split(";")[0] for k in f.keys(recursive=False)}:
                return {}
            return json.loads(str(f[META]))
    except (OSError, ValueError) as exc:
        raise InputDataError(f"cannot read '{META}' ({exc})", where=str(path)) from exc


def read_singles_counts(path: str | os.PathLike, scanner: Any) -> np.ndarray | None:
    """Singles per detection element (``scanner.n_crystals``, int64, flat-index order), or None.

    From the embedded simulator's :data:`SINGLES_TREE`, else by counting GATE's ``Singles``
    tree by ``rsectorID, moduleID, crystalID, layerID``; None when the file has neither.
    """
    import uproot

    try:
        with uproot.open(path) as f:
            keys = {k.split(";")[0] for k in f.keys(recursive=False)}
            if SINGLES_TREE in keys:
                counts = np.asarray(f[SINGLES_TREE]["counts"].array(library="np"), dtype=np.int64)
                if counts.size != scanner.n_crystals:
                    raise InputDataError(f"{SINGLES_TREE} has {counts.size} elements, the scanner "
                                         f"{scanner.n_crystals}", where=f"{path}: {SINGLES_TREE}.counts",
                                         fix="reconstruct with the scanner section the acquisition was simulated with")
                return counts
            if GATE_SINGLES_TREE in keys:
                counts = np.zeros(scanner.n_crystals, dtype=np.int64)
                names = ["rsectorID", "moduleID", "crystalID", "layerID"]
                for arr in f[GATE_SINGLES_TREE].iterate(names, step_size=2_000_000, library="np"):
                    counts += np.bincount(scanner.flat_index(*(arr[n] for n in names)),
                                          minlength=scanner.n_crystals)
                return counts
    except (OSError, ValueError, KeyError) as exc:
        raise InputDataError(f"cannot read the singles counts ({exc})", where=str(path),
                             fix="the file is truncated or corrupt: delete it and rerun the stage that wrote it") from exc
    return None


def lor_endpoints_mm(chunk: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Detector 1 and detector 2 positions (``globalPos*1``, ``globalPos*2``), each (n, 3) float64, mm."""
    p1 = np.stack([chunk["globalPosX1"], chunk["globalPosY1"], chunk["globalPosZ1"]], axis=1).astype(np.float64)
    p2 = np.stack([chunk["globalPosX2"], chunk["globalPosY2"], chunk["globalPosZ2"]], axis=1).astype(np.float64)
    return p1, p2


def tof_offset_mm(chunk: Mapping[str, np.ndarray]) -> np.ndarray:
    """Most likely annihilation point's offset from the LOR centre towards detector 1, mm.

    ``c (time2 - time1) / 2``; the point is ``(p1 + p2)/2 + offset * (p1 - p2)/|p1 - p2|``.
    """
    return C_MM_PER_S * 0.5 * (np.asarray(chunk["time2"], np.float64) - np.asarray(chunk["time1"], np.float64))


def classify(chunk: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Boolean masks ``true``, ``scatter``, ``random`` (GATE convention, see module docstring)."""
    random = chunk["eventID1"] != chunk["eventID2"]
    scat = np.zeros(len(random), dtype=bool)
    for b in ("comptonPhantom1", "comptonPhantom2", "RayleighPhantom1", "RayleighPhantom2"):
        if b in chunk:
            scat |= chunk[b] > 0
    scat &= ~random
    return {"true": ~random & ~scat, "scatter": scat, "random": random}


def count_coincidences(path: str | os.PathLike) -> dict[str, Any]:
    """Prompts, unscattered trues, scatters and randoms in a file, with fractions."""
    br = ["eventID1", "eventID2", "comptonPhantom1", "comptonPhantom2", "RayleighPhantom1", "RayleighPhantom2"]
    tot = {"prompts": 0, "trues": 0, "scatter": 0, "randoms": 0}
    for ch in iter_coincidences(path, br):
        m = classify(ch)
        tot["prompts"] += len(ch["eventID1"])
        tot["trues"] += int(m["true"].sum())
        tot["scatter"] += int(m["scatter"].sum())
        tot["randoms"] += int(m["random"].sum())
    p = max(tot["prompts"], 1)
    tot["scatter_fraction"] = tot["scatter"] / max(tot["trues"] + tot["scatter"], 1)
    tot["random_fraction"] = tot["randoms"] / p
    meta = read_meta(path)
    if "n_decays" in meta:
        tot["n_decays"] = int(meta["n_decays"])
    return tot


# ---- merging ------------------------------------------------------------------------------
def merge_root(parts: Sequence[str | os.PathLike], out: str | os.PathLike, step_size: int = 2_000_000) -> dict[str, Any]:
    """Concatenate split jobs' Coincidences trees into ``out`` with unique event IDs.

    Returns the merged metadata (``n_decays`` summed over jobs, ``jobs`` listing each part's).
    """
    from tqdm import tqdm

    import uproot

    offset = 0
    metas = []
    singles: np.ndarray | None = None
    all_singles = True
    for p in parts:  # validate all inputs before writing anything
        _open_tree(p, None)[0].close()
        with uproot.open(p) as f:
            if SINGLES_TREE in {k.split(";")[0] for k in f.keys(recursive=False)}:
                c = np.asarray(f[SINGLES_TREE]["counts"].array(library="np"), dtype=np.int64)
                singles = c if singles is None else singles + c
            else:
                all_singles = False
    with CoincidenceWriter(out) as w:
        if all_singles and singles is not None:
            w.singles_counts = singles
        for p in tqdm(parts, desc="merge", unit="job", disable=None):
            meta = read_meta(p)
            max_id = -1
            for ch in iter_coincidences(p, None, step_size):
                if len(ch["eventID1"]):
                    max_id = max(max_id, int(ch["eventID1"].max()), int(ch["eventID2"].max()))
                ch["eventID1"] = ch["eventID1"].astype(np.int64) + offset
                ch["eventID2"] = ch["eventID2"].astype(np.int64) + offset
                if offset + max_id >= np.iinfo(np.int32).max:
                    raise InputDataError("merged eventIDs overflow GATE's 32-bit eventID", where=str(p),
                                         fix="split the acquisition into fewer, shorter merges")
                w.write(ch)
            n_dec = int(meta.get("n_decays", max_id + 1))
            metas.append({"file": str(p), **meta})
            offset += n_dec
        merged = {"n_decays": offset, "n_jobs": len(parts), "jobs": metas}
        for key in ("ctr_ps", "backend", "duration_s"):
            if metas and key in metas[0]:
                merged[key] = metas[0][key]
        w.meta.update(merged)
    log.info("merged %d files, %d coincidences, %d decays -> %s", len(parts), w.n_written, offset, out)
    return merged
