"""Benchmark: TOF list-mode projections per second (forward + back), ours vs references.

Run:  python workflow/benchmarks/bench_projector.py [--events 200000] [--device auto] [--root FILE] [--out table.csv]

Problem: the default reconstruction grid (mlem.fov_mm at 0.8 mm, 140 x 140 x 16 voxels) and
ideal true events from the hot-rod phantom on the paper's scanner (or the events of a GATE
ROOT file given with --root). For each CTR it times

* ``ours``: :class:`equipet.reconstruction.projector.ListmodeTOFProjector` apply + adjoint (on-the-fly
  system matrix), on the CPU and, when present, on the GPU;
* ``ours_fused``: its ``apply_adjoint`` (``A^T h(A x)`` with each chunk's rows computed once,
  MLEM's update);
* ``baseline`` (with ``--baseline FILE``): the same apply + adjoint of another version of the
  projector module, e.g. the previous one, ``git show 3e11ef3:workflow/equipet/projector.py >
  /tmp/projector_3e11ef3.py``, timed in the same run on the same events;
* ``reference_loop``: the straightforward per-event, per-plane Python implementation
  (:func:`equipet.reconstruction.projector.reference_forward_per_event`) on a few hundred events; its
  forward time is doubled for forward + back (the adjoint loop is the same work);
* ``sparse_matrix``: the precomputed system matrix (torch sparse CSR, built from the same
  weights) times a vector and its transpose, build time excluded; memory reported.

It also times one full MLEM iteration for the given number of events (default: the
estimated trues of the paper's 10-minute acquisition, 5x the quick 120 s run).
References: the paper reports ~2112 s per MLEM iteration; parallelproj on a V100 does
forward + back of 4e6 TOF events in 0.25-0.6 s (0.7-1.6e7 events/s).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from equipet.config import load_config
from equipet.device import select_device
from equipet.reconstruction.listmode import convert_chunk, read_listmode, simulate_true_events
from equipet.reconstruction.mlem import chunk_events, listmode_mlem
from equipet.reconstruction.geometry import image_geometry
from equipet.simulation.phantom import hot_rod_phantom
from equipet.reconstruction.projector import ListmodeTOFProjector, reference_forward_per_event, tof_fwhm_mm
from equipet.simulation.scanner import Scanner


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def synthetic_events(scanner: Scanner, n: int, seed: int = 0):
    ph = hot_rod_phantom({})
    rng = np.random.default_rng(seed)
    parts, total = [], 0
    while total < n:
        pos = ph.sample_decay_positions(4 * n, rng)
        chunk = simulate_true_events(scanner, pos, 100.0, rng, axial_cos_max=0.3)
        ev = convert_chunk(chunk, scanner, "trues", "crystal")
        parts.append(ev)
        total += len(ev)
    p1 = np.concatenate([e.p1_mm for e in parts])[:n]
    p2 = np.concatenate([e.p2_mm for e in parts])[:n]
    return p1, p2


def time_ours(geom, p1, p2, tof, fwhm, device, chunk, repeats=3, fused=False, projector_class=ListmodeTOFProjector):
    """Events per second of forward + back projection (best of ``repeats``, after a warm-up)."""
    t = [torch.as_tensor(a, device=device) for a in (p1, p2, tof)]
    A = projector_class(geom, t[0], t[1], t[2], fwhm, chunk_size=chunk)
    x = torch.ones(geom.shape, device=device)

    def once():
        if fused:
            return A.apply_adjoint(x, lambda ax, start: 1.0 / ax.clamp_min(1e-12))
        return A.adjoint(1.0 / A.apply(x).clamp_min(1e-12))

    once()  # warm-up
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        once()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return len(p1) / best


def load_baseline(path: str):
    """The ``ListmodeTOFProjector`` class of another projector module file."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("baseline_projector", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module          # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module.ListmodeTOFProjector


def time_sparse(geom, p1, p2, tof, fwhm, chunk):
    """Events per second of the stored matrix (CSR of A and of A^T; build time excluded) and its MB."""
    A = ListmodeTOFProjector(geom, torch.as_tensor(p1), torch.as_tensor(p2), torch.as_tensor(tof), fwhm,
                             chunk_size=chunk)
    S = A.to_sparse()
    x = torch.ones(geom.shape)
    S.adjoint(S.apply(x))
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        S.adjoint(1.0 / S.apply(x).clamp_min(1e-12))
        best = min(best, time.perf_counter() - t0)
    return len(p1) / best, S.nbytes / 1e6


def time_reference(geom, p1, p2, tof, fwhm, n=200):
    x = np.ones(geom.shape)
    t0 = time.perf_counter()
    reference_forward_per_event(x, geom, p1[:n].astype(np.float64), p2[:n].astype(np.float64),
                                tof[:n].astype(np.float64), fwhm)
    return n / (2 * (time.perf_counter() - t0))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", nargs="+", default=["config/quick.yaml"])
    p.add_argument("--events", type=int, default=100_000, help="events for the projector timing")
    p.add_argument("--mlem-events", type=int, default=1_850_000,
                   help="events of the MLEM iteration timing (default ~ trues of the 10-minute acquisition)")
    p.add_argument("--root", help="time on the events of this GATE ROOT file instead of synthetic ones")
    p.add_argument("--device", default="auto")
    p.add_argument("--ctrs", type=float, nargs="+", default=[50.0, 100.0, 200.0])
    p.add_argument("--no-sparse", action="store_true", help="skip the sparse-matrix reference (memory)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--baseline", help="a projector module file to time in the same run (e.g. the previous version)")
    p.add_argument("--out", help="also write the table as CSV")
    args = p.parse_args(argv)
    baseline = load_baseline(args.baseline) if args.baseline else None

    cfg = load_config(args.config)
    cfg["mlem"]["fov_mm"] = [112.0, 112.0, 12.8]          # the default grid, whatever the config
    scanner = Scanner.from_config(cfg["scanner"])
    geom = image_geometry(cfg["mlem"])
    device = select_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.root:
        ev = read_listmode(args.root, scanner)
        p1_all, p2_all = ev.p1_mm, ev.p2_mm
    else:
        p1_all, p2_all = synthetic_events(scanner, max(args.events, 1000))
    rng = np.random.default_rng(1)
    print(f"grid {geom.shape} at {geom.voxel_size_mm[0]} mm; torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads; device {device}", flush=True)
    rows = []
    devices = [torch.device("cpu")] + ([device] if device.type == "cuda" else [])
    n = min(args.events, len(p1_all))
    p1, p2 = p1_all[:n], p2_all[:n]
    for ctr in args.ctrs:
        fwhm = tof_fwhm_mm(ctr)
        tof = rng.normal(0, fwhm / 2.355, n).astype(np.float32)
        ref = time_reference(geom, p1, p2, tof, fwhm)
        rows.append(("reference_loop", "cpu", ctr, ref, ""))
        if not args.no_sparse:
            ns = min(n, 20_000)
            sp, mem = time_sparse(geom, p1[:ns], p2[:ns], tof[:ns], fwhm, 8192)
            rows.append(("sparse_matrix", "cpu", ctr, sp, f"{mem / ns * 1e3:.1f} kB/event"))
        n_rows = len(rows)
        for dev in devices:
            nd = n if dev.type == "cpu" else len(p1_all)
            pp1, pp2 = (p1_all[:nd], p2_all[:nd])
            tt = rng.normal(0, fwhm / 2.355, nd).astype(np.float32)
            chunk = chunk_events(cfg["mlem"], dev)
            base = (time_ours(geom, pp1, pp2, tt, fwhm, dev, chunk, projector_class=baseline)
                    if baseline is not None else None)
            ours = time_ours(geom, pp1, pp2, tt, fwhm, dev, chunk)
            fused = time_ours(geom, pp1, pp2, tt, fwhm, dev, chunk, fused=True)
            if base is not None:
                rows.append(("baseline", str(dev), ctr, base, f"x{base / ref:.0f} vs reference_loop"))
            vs = f"; x{ours / base:.2f} vs baseline" if base else ""
            rows.append(("ours", str(dev), ctr, ours, f"x{ours / ref:.0f} vs reference_loop{vs}"))
            vs = f"; x{fused / base:.2f} vs baseline" if base else ""
            rows.append(("ours_fused", str(dev), ctr, fused, f"x{fused / ref:.0f} vs reference_loop{vs}"))
        for r in rows[n_rows - (2 if not args.no_sparse else 1):]:
            print(f"{r[0]:>15} {r[1]:>6} CTR {r[2]:5.0f} ps: {r[3]:12.4g} TOF events/s fwd+back  {r[4]}", flush=True)

    # one MLEM iteration at the default acquisition size (events recycled if fewer are at hand)
    nm = args.mlem_events
    reps = int(np.ceil(nm / len(p1_all)))
    P1 = np.tile(p1_all, (reps, 1))[:nm]
    P2 = np.tile(p2_all, (reps, 1))[:nm]
    for dev in devices:
        fwhm = tof_fwhm_mm(100.0)
        tof = torch.as_tensor(rng.normal(0, fwhm / 2.355, nm).astype(np.float32), device=dev)
        sens = torch.ones(geom.shape, device=dev)
        t0 = time.perf_counter()
        listmode_mlem(torch.as_tensor(P1, device=dev), torch.as_tensor(P2, device=dev), tof, sens, geom, 1, 1,
                      fwhm, chunk_size=chunk_events(cfg["mlem"], dev), progress=False)
        _sync(dev)
        dt = time.perf_counter() - t0
        rows.append(("mlem_iteration", str(dev), 100.0, nm / dt, f"{dt:.2f} s for {nm} events (paper: 2112 s)"))
        print(f"MLEM iteration on {dev}: {dt:.2f} s for {nm} TOF events (CTR 100 ps); paper ~2112 s", flush=True)
    if args.out:
        import pandas as pd

        pd.DataFrame(rows, columns=["implementation", "device", "ctr_ps", "events_per_s", "note"]).to_csv(
            args.out, index=False)


if __name__ == "__main__":
    sys.exit(main())
