"""Benchmark of the embedded Monte Carlo: decays simulated per second on one CPU core.

    python workflow/benchmarks/bench_montecarlo.py [--decays 3e6] [--ctr-ps 100] [--json out.json]

Simulates the paper's hot-rod phantom in water with the paper's scanner (schema defaults)
and compares the rate with GATE 9.3's ~1e4 decays/s/core (GATE facts: t5_pet ran at ~9,600
primaries/s/core). The simulator is numpy-only, so it runs on one core per job; run several
split jobs in parallel for more cores. There is no GPU path: "GPU" is reported as not used.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

from equipet.simulation.montecarlo import AcquisitionSettings, Simulator  # noqa: E402
from equipet.config import schema_defaults
from equipet.simulation.phantom import hot_rod_phantom  # noqa: E402
from equipet.simulation.scanner import Scanner  # noqa: E402

GATE_DECAYS_PER_S_PER_CORE = 1e4


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--decays", type=float, default=3e6, help="decays to simulate (about)")
    p.add_argument("--ctr-ps", type=float, default=100.0)
    p.add_argument("--json", help="also write the result as JSON")
    args = p.parse_args()
    ph = hot_rod_phantom()
    duration = args.decays / ph.total_activity_bq()
    sim = Simulator(Scanner.from_config(schema_defaults("scanner")), ph,
                    AcquisitionSettings.from_config(duration_s=duration, n_jobs=1))
    warm = Simulator(sim.scanner, ph, AcquisitionSettings.from_config(duration_s=1.0, n_jobs=1))
    warm.run_job(0, args.ctr_ps, progress=False)  # warm-up (imports, caches)
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    meta = sim.run_job(0, args.ctr_ps, progress=False)
    wall = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    n = meta["n_decays"]
    prompts = len(meta["data"]["eventID1"])
    res = {
        "decays": n, "prompts": prompts, "wall_s": wall, "cpu_s": cpu,
        "decays_per_s_wall": n / wall, "decays_per_cpu_s": n / cpu,
        "ratio_vs_gate_per_core": (n / cpu) / GATE_DECAYS_PER_S_PER_CORE,
        "gpu": "not used (numpy backend)", "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
    }
    print(f"embedded Monte Carlo: {n:.3g} decays, {prompts:.3g} prompts in {wall:.2f} s wall, {cpu:.2f} s CPU")
    print(f"  {res['decays_per_cpu_s']:.3g} decays/s per CPU core  "
          f"({res['ratio_vs_gate_per_core']:.0f}x GATE's ~1e4 decays/s/core)")
    print("  GPU: not used (numpy backend)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
