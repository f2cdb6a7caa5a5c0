"""Carry a central slice (``slice.npz`` of equipet-central-slice) to another machine in fewer bytes.

    python workflow/benchmarks/pack_slice.py pack   results/assisted/ctr100/slice.npz ctr100.packed.npz
    python workflow/benchmarks/pack_slice.py unpack ctr100.packed.npz results/assisted/ctr100/slice.npz
    python workflow/benchmarks/pack_slice.py system results/assisted/ctr100/slice.npz config/config.yaml [more.yaml ...]

Lossless for every array the assisted runs read: the event end points ``p1``, ``p2`` (a few
hundred thousand distinct crystal/depth positions) are stored as indices into their table of
distinct points, and the arrays no run reads (``background_out_of_slab`` and
``background_additive``, whose sum is ``background``; the MLEM baseline images, which are in
``baselines.csv``) are left out. ``unpack`` checks the points it rebuilds against the stored
checksum. Used by ``gpu_grid.sh`` to fit the three CTRs' slices into one transfer, and by
``run_assisted.py`` to keep them in its archive (``slice_digest`` ties a run to its slice).

``system`` builds an unpacked slice's stored matrix (``system.pt`` beside it, on the device the
merged config files name) as ``equipet-central-slice --system-out`` does; both callers use it.
"""

from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path

import numpy as np

DROPPED = ("background_out_of_slab", "background_additive")


def _digest(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _end_points(d: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """A packed slice's event end points ``p1``, ``p2``, rebuilt from its point table (removes ``i1``, ``i2``)."""
    return d["points"][d.pop("i1")], d["points"][d.pop("i2")]


def kept(d: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The arrays of a slice that the assisted runs read (what ``pack`` keeps, with ``p1``, ``p2``)."""
    return {k: v for k, v in d.items() if k not in DROPPED and not (k.startswith("baseline_") and v.ndim == 2)}


def slice_digest(path: str | Path) -> str:
    """SHA-256 of the arrays of a slice (``slice.npz``, packed or not) that the assisted runs read:
    a slice and its packed copy unpacked again give the same digest."""
    with np.load(path) as f:
        d = kept({k: f[k] for k in f.files})
    if "points" in d:   # a packed slice: the end points as stored in slice.npz
        d["p1"], d["p2"] = _end_points(d)
        d = {k: v for k, v in d.items() if k not in ("points", "points_sha256")}
    h = hashlib.sha256()
    for k in sorted(d):
        a = np.ascontiguousarray(d[k])
        h.update(f"{k}:{a.dtype.str}:{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def pack(src: str | Path, dst: str | Path) -> None:
    d = dict(np.load(src))
    n = len(d["p1"])
    points, index = np.unique(np.concatenate([d["p1"], d["p2"]]), axis=0, return_inverse=True)
    index = index.reshape(-1).astype(np.uint32)
    out = {k: v for k, v in kept(d).items() if k not in ("p1", "p2")}
    out.update(points=points, i1=index[:n], i2=index[n:], points_sha256=np.asarray(_digest(d["p1"], d["p2"])))
    np.savez_compressed(dst, **out)


def unpack(src: str | Path, dst: str | Path) -> None:
    d = dict(np.load(src))
    p1, p2 = _end_points(d)
    if _digest(p1, p2) != str(d.pop("points_sha256")):
        raise SystemExit(f"{src}: the rebuilt event end points do not match their checksum")
    d.pop("points")
    np.savez(dst, p1=p1, p2=p2, **d)


def write_system(slice_path: str | Path, cfg: dict) -> str:
    """Build the stored matrix of the slice ``slice_path`` (``system.pt`` beside it) on ``cfg["device"]``,
    as ``equipet-central-slice --system-out`` writes it; returns a line saying what was built."""
    from equipet.assisted.central_slice import write_slice_system_matrix

    slice_path = Path(slice_path)
    t0 = time.perf_counter()
    with np.load(slice_path) as f:
        system = write_slice_system_matrix({k: f[k] for k in f.files}, cfg, slice_path.with_name("system.pt"))
    return (f"{slice_path.with_name('system.pt')}: {system.n_events} events, {system.nnz} non-zeros, "
            f"built on {cfg['device']} and saved in {time.perf_counter() - t0:.1f} s")


def main(argv: list[str]) -> None:
    if argv[:1] == ["system"] and len(argv) >= 3:
        from equipet.config import load_config

        print(write_system(argv[1], load_config(argv[2:])), flush=True)
    elif len(argv) == 3 and argv[0] in ("pack", "unpack"):
        (pack if argv[0] == "pack" else unpack)(argv[1], argv[2])
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
