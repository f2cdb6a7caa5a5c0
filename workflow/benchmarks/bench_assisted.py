"""Benchmark: one assisted training epoch per method and network, at the paper's slice size.

Run:  python workflow/benchmarks/bench_assisted.py [--events 1500000] [--epochs 3] [--device auto]
                                                   [--out assisted.csv] [--slice results/assisted/ctr100/slice.npz]

For each method it times real training epochs (network forward, loss, backward, Adam step;
one warm-up epoch first, then the mean of ``--epochs``) with the SCNN and with the CNN of the
configuration's ``models`` section, on the slice grid of ``mlem.fov_mm`` at
``mlem.voxel_size_mm`` (140 x 140 for the paper):

* ``paper``: the image-domain method (MSE to an MLEM-like target; no projector);
* ``poisson``: the stochastic list-mode Poisson objective on the stored slice matrix
  (:class:`equipet.assisted.methods.SubsetPoissonLoss`, ``assisted.subset_events`` per epoch, with the
  configured ``assisted.variance_reduction``);
  the matrix is built once (its build time and size are printed, not counted per epoch);
* ``poisson_full``: the full-batch list-mode Poisson objective with the projector computed
  on the fly (the method the workflow used before the stored matrix), with the configured
  ``assisted.cache_mb``.

Events: those of a real ``slice.npz`` (``--slice``, the first ``--events`` of them), or
synthetic ones: ideal true coincidences (:func:`equipet.reconstruction.listmode.simulate_true_events`) from
the hot-rod phantom at ``--ctr`` on the configured scanner, kept when their LOR crosses the
central slab, as :mod:`equipet.assisted.central_slice` keeps them. Writes a CSV with the columns
``method, model, events, device, threads, ms_per_epoch`` and prints each method's speed-up
over ``poisson_full`` and its ratio to ``paper``.

``--runs R [R ...]``: instead, the cost of training R runs together in one process
(:mod:`equipet.networks.stacked`, ``assisted.group_runs: ctr``) beside the single-run path, in
the same process: for each method and network, ms per run-epoch of one run trained alone
(``path=single``) and of R runs as one stacked network (``path=stacked``; each run its own
loss call with its own random stream, one backward, one Adam step, as the engine does), and with
``--compile`` also of the stacked network under ``torch.compile`` (``path=stacked_compiled``).
Columns ``method, model, runs, device, threads, ms_per_run_epoch, path``; it prints each
stacked row's speed-up over the single path.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import pandas as pd
import torch

from equipet.assisted.methods import (ListmodePoissonLoss, NonNegativeOutput, SliceForwardModel, SubsetPoissonLoss,
                              subset_count)
from equipet.assisted.central_slice import lors_crossing, slice_geometry
from equipet.config import load_config
from equipet.device import select_device
from equipet.reconstruction.listmode import convert_chunk, simulate_true_events
from equipet.reconstruction.geometry import image_geometry
from equipet.networks.nets import build_model
from equipet.simulation.phantom import hot_rod_phantom
from equipet.reconstruction.projector import ListmodeTOFProjector, tof_fwhm_mm
from equipet.simulation.scanner import Scanner
from equipet.networks.training import MSELoss


def synthetic_slice_events(cfg: dict, n: int, ctr_ps: float, seed: int = 0):
    """``n`` ideal true events crossing the central slab (with their single-slice geometry)."""
    scanner = Scanner.from_config(cfg["scanner"])
    geom = image_geometry(cfg["mlem"])
    k0 = geom.shape[2] // 2
    g2 = slice_geometry(geom, k0, k0 + 1)
    ph = hot_rod_phantom(cfg["phantom"])
    rng = np.random.default_rng(seed)
    fwhm = tof_fwhm_mm(ctr_ps)
    parts, total = [], 0
    while total < n:
        pos = ph.sample_decay_positions(max(4 * n, 100_000), rng)
        ev = convert_chunk(simulate_true_events(scanner, pos, ctr_ps, rng), scanner, "trues", "crystal")
        ev = ev.subset(lors_crossing(ev.p1_mm, ev.p2_mm, g2))
        A = ListmodeTOFProjector(g2, *(torch.as_tensor(a) for a in (ev.p1_mm, ev.p2_mm, ev.tof_mm)), fwhm)
        with torch.no_grad():
            ev = ev.subset(A.apply(torch.ones(g2.shape)).numpy() > 0)
        parts.append(ev)
        total += len(ev)
    cat = lambda k: np.concatenate([getattr(e, k) for e in parts])[:n].astype(np.float32)  # noqa: E731
    return g2, cat("p1_mm"), cat("p2_mm"), cat("tof_mm"), fwhm


def slice_events_from_npz(path: str, n: int):
    from equipet.assisted.central_slice import geometry_from_npz

    d = np.load(path)
    n = min(n, len(d["tof"]))
    return geometry_from_npz(d), d["p1"][:n], d["p2"][:n], d["tof"][:n], float(d["tof_fwhm_mm"])


def time_epochs(model: torch.nn.Module, x: torch.Tensor, loss, epochs: int, device: torch.device) -> float:
    """Mean seconds of a training epoch (after one warm-up epoch)."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def epoch():
        opt.zero_grad(set_to_none=True)
        value = loss(model(x))
        value.backward()
        opt.step()
        return float(value.detach())

    return _time(epoch, epochs, device)


def _stacked_epoch_timer(stack: torch.nn.Module, x: torch.Tensor, loss, device: torch.device):
    """One step of :mod:`equipet.networks.stacked` for R runs sharing ``loss``: the stacked forward,
    each run's loss under its own torch random stream, one backward, one Adam step."""
    opt = torch.optim.Adam(stack.parameters(), lr=1e-3)
    runs = x.shape[0]
    streams = [torch.get_rng_state() for _ in range(runs)]

    def epoch():
        opt.zero_grad(set_to_none=True)
        out = stack(x)
        values = []
        for r in range(runs):
            torch.set_rng_state(streams[r])
            values.append(loss(out[r:r + 1]).reshape(()))
            streams[r] = torch.get_rng_state()
        values = torch.stack(values)
        values.detach().to("cpu").tolist()       # the engine reads every run's loss each epoch
        values.sum().backward()
        opt.step()
    return epoch


def _time(epoch, epochs: int, device: torch.device) -> float:
    """Mean seconds of ``epoch()`` over ``epochs`` calls, after one warm-up call."""
    epoch()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(epochs):
        epoch()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / epochs


def time_stacked(cfg: dict, losses: dict, x: torch.Tensor, args, device: torch.device, threads: int) -> pd.DataFrame:
    """ms per run-epoch of the single-run path and of R stacked runs (module doc)."""
    from equipet.networks.stacked import StackedNetwork

    rows = []
    for method, loss in losses.items():
        for name in args.models:
            def build(seed: int) -> torch.nn.Module:
                torch.manual_seed(seed)
                model = build_model(name, cfg["models"])
                return model if method == "paper" else NonNegativeOutput(model)

            single = build(0).to(device).train()
            ms_single = 1e3 * time_epochs(single, x, loss, args.epochs, device)
            rows.append(dict(method=method, model=name, runs=1, device=str(device), threads=threads,
                             ms_per_run_epoch=ms_single, path="single"))
            print(f"{method:>13} {name:>5}  single        : {ms_single:9.2f} ms/run-epoch", flush=True)
            paths = [("stacked", False)] + ([("stacked_compiled", True)] if args.compile else [])
            for runs in args.runs:
                for path, compiled in paths:
                    stack = StackedNetwork([build(seed) for seed in range(runs)]).to(device).train()
                    xs = x.expand(runs, -1, -1, -1).contiguous()
                    if compiled:
                        stack.forward = torch.compile(stack.forward, dynamic=False)
                    try:
                        ms = 1e3 * _time(_stacked_epoch_timer(stack, xs, loss, device), args.epochs, device) / runs
                    except Exception as exc:   # a compiler failure is a measurement too
                        print(f"{method:>13} {name:>5}  {path} R={runs}: failed ({type(exc).__name__}: {exc})")
                        continue
                    rows.append(dict(method=method, model=name, runs=runs, device=str(device), threads=threads,
                                     ms_per_run_epoch=ms, path=path))
                    print(f"{method:>13} {name:>5}  {path:<16} R={runs:<3}: {ms:9.2f} ms/run-epoch "
                          f"(x{ms_single / ms:.2f} the single path)", flush=True)
    return pd.DataFrame(rows)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", nargs="+", default=["config/config.yaml"])
    p.add_argument("--events", type=int, default=1_500_000, help="slice events (default: the paper acquisition's ~1.5e6 at 100 ps)")
    p.add_argument("--epochs", type=int, default=3, help="timed epochs per method and network")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--ctr", type=float, default=100.0, help="CTR (ps) of the synthetic events")
    p.add_argument("--slice", help="time on the events of this slice.npz instead of synthetic ones")
    p.add_argument("--methods", nargs="+", default=["paper", "poisson", "poisson_full"])
    p.add_argument("--models", nargs="+", default=["scnn", "cnn"])
    p.add_argument("--out", help="write the table as CSV")
    p.add_argument("--runs", type=int, nargs="+", help="time R runs trained together (module doc), e.g. 1 3 9 18")
    p.add_argument("--compile", action="store_true", help="with --runs: also the stacked network under torch.compile")
    args = p.parse_args(argv)

    cfg = load_config(args.config)
    device = select_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    t0 = time.perf_counter()
    if args.slice:
        g2, p1, p2, tof, fwhm = slice_events_from_npz(args.slice, args.events)
    else:
        g2, p1, p2, tof, fwhm = synthetic_slice_events(cfg, args.events, args.ctr)
    n = len(tof)
    print(f"{n} slice events ({'from ' + args.slice if args.slice else 'synthetic'}, {time.perf_counter() - t0:.0f} s), "
          f"grid {g2.shape[:2]}; torch {torch.__version__}, {threads} CPU threads, device {device}", flush=True)
    ev = [torch.as_tensor(a, device=device) for a in (p1, p2, tof)]
    rng = np.random.default_rng(1)
    early = rng.uniform(0.0, 1.0, g2.shape[:2]).astype(np.float32)
    x = torch.as_tensor(early, device=device)[None, None]
    sens = torch.as_tensor(rng.uniform(0.5, 1.5, g2.shape[:2]).astype(np.float32), device=device)
    background = torch.full((n,), 1e-3, device=device)
    sec = cfg["assisted"]

    losses = {}
    if "paper" in args.methods:
        losses["paper"] = MSELoss(rng.uniform(0.0, 1.0, g2.shape[:2]).astype(np.float32)).to(device)
    if "poisson" in args.methods:
        tb = time.perf_counter()
        A = ListmodeTOFProjector(g2, *ev, fwhm, chunk_size=1 << 20 if device.type == "cuda" else 8192)
        S = A.to_sparse()
        if device.type == "cuda":
            torch.cuda.synchronize()
        k = subset_count(S.n_events, sec["subset_events"])
        parts = S.subsets(k)
        bounds = np.cumsum([0] + [m.n_events for m in parts])
        losses["poisson"] = SubsetPoissonLoss(parts, [background[a:b] for a, b in zip(bounds[:-1], bounds[1:])],
                                              sens, 1.0, 1.0, floor=1e-6, estimator=sec["variance_reduction"])
        for part in parts:   # each block's transpose is built on its first backward: build them all
            part.AT               # now, so that no timed epoch pays for it
        print(f"stored slice matrix: {S.nnz} non-zeros ({S.nnz / n:.1f} per event), {S.nbytes / 1e6:.0f} MB stored "
              f"(A alone), built in {time.perf_counter() - tb:.1f} s; {k} blocks of ~{n // k} events", flush=True)
    if "poisson_full" in args.methods:
        A = ListmodeTOFProjector(g2, *ev, fwhm, chunk_size=1 << 20 if device.type == "cuda" else 8192,
                                 cache_mb=float(sec["cache_mb"]))
        losses["poisson_full"] = ListmodePoissonLoss(SliceForwardModel(A, background, 1.0), sens, 1.0, floor=1e-6)

    if args.runs:
        df = time_stacked(cfg, losses, x, args, device, threads)
        if args.out:
            df.to_csv(args.out, index=False)
        return

    rows = []
    for method, loss in losses.items():
        for name in args.models:
            torch.manual_seed(0)
            model = build_model(name, cfg["models"])
            if method != "paper":
                model = NonNegativeOutput(model)
            model.to(device).train()
            s = time_epochs(model, x, loss, args.epochs, device)
            rows.append(dict(method=method, model=name, events=n, device=str(device), threads=threads,
                             ms_per_epoch=1e3 * s))
            print(f"{method:>13} {name:>5}: {1e3 * s:10.1f} ms/epoch", flush=True)
    df = pd.DataFrame(rows)
    for name in args.models:
        by = df[df.model == name].set_index("method")["ms_per_epoch"]
        for method, ms in by.items():
            notes = []
            if "poisson_full" in by and method != "poisson_full":
                notes.append(f"x{by['poisson_full'] / ms:.1f} faster than poisson_full")
            if "paper" in by and method != "paper":
                notes.append(f"{ms / by['paper']:.2f} x the paper method's epoch")
            if notes:
                print(f"{name:>5} {method:>13}: " + "; ".join(notes))
    if args.out:
        df.to_csv(args.out, index=False)


if __name__ == "__main__":
    sys.exit(main())
