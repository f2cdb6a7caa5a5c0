"""The assisted grid's measured tables from an archive of its runs (``run_assisted.py --archive``).

    python workflow/benchmarks/assisted_tables.py --archive workflow/benchmarks/measured/cpu2_assisted_runs \\
        --out-prefix workflow/benchmarks/measured/cpu2_

writes, over the archive's finished runs (every run folder with all the files ``run_assisted.py``
keeps of a finished run):

* ``<prefix>assisted_summary_ctr<CTR>_<method>.csv`` for each CTR and method with a finished run:
  ``equipet-recon-figures summary`` over those runs' ``metrics.csv`` and the CTR's archived
  ``baselines.csv``, as the rule ``assisted_summary`` makes it (mean and sd over the seeds that
  exist, ``n_seeds``);
* ``<prefix>paper_claims_assisted_grid.csv`` and ``<prefix>paper_claims_assisted_grid_rules2.csv``:
  ``equipet-claims`` under rules 1 and 2 over the same runs, the CTRs' baselines and MLEM timings,
  as the rule ``paper_claims`` runs it; a claim with fewer seeds than the rules need is *not
  comparable*, as they say;
* ``<prefix>assisted_grid_runs.csv``: one row per run from its ``timing.json`` (parameters,
  epochs, training time summed over resumes, seconds per epoch, the epoch it last resumed from, the
  training processes side by side, the 1-minute load average at its end, device, torch) and its
  metrics at its last snapshot (CRC of each rod, NRMSE, background COV);
* ``<prefix>assisted_grid_left.csv``: every run of the grid (``run_assisted.grid``) not finished
  in the archive, the epochs it has left (from its archived checkpoint, if any) and the time it
  should take at the median seconds per epoch of the archive's finished runs of the same method and
  network that had the device to themselves (none, and no estimate, before one has finished); the
  total is printed.

``--markdown`` prints the per-run table as Markdown as well. The grid and the settings
(``assisted.plateau`` for the claims) come from ``--configfile``, as for the runner, which also
refuses an archived run trained with other settings (or on another slice) than these, naming the
field.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from ablation_tables import checkpoint_epochs, run_equipet, timing_fields   # this folder
from run_assisted import REPO, RUN_FILES, grid, run_label, what_it_computes   # this folder: the archive's runner

from equipet.assisted.figures import final_rows
from equipet.config import load_config
from equipet.study.archive import Archive

GZIPPED = ("loss.csv",)
#: the metrics of the per-run table (rod metrics get one column per rod)
RUN_METRICS = ("crc", "nrmse", "background_cov")


def finished_runs(archive: Archive, cfg: dict) -> list[Path]:
    """The archive's finished runs, as folders of a results folder ``archive.base`` (not made), in
    the grid's order (CTR, method, network, seed; runs of no grid of ``cfg`` last)."""
    order = {run_label(*run): i for i, run in enumerate(grid(cfg))}
    labels = {p.parent.relative_to(archive.root).as_posix() for p in archive.root.rglob("timing.json")}
    runs = [archive.base / label for label in sorted(labels, key=lambda label: (order.get(label, len(order)), label))]
    return [r for r in runs if archive.holds_finished(r)]


def final_metrics(metrics: pd.DataFrame) -> dict[str, float]:
    """One run's :data:`RUN_METRICS` at its last snapshot, ``crc_<rod>mm`` for each rod."""
    f = final_rows(metrics)
    f = f[(f["split"] == "train") & f["metric"].isin(RUN_METRICS)]
    return {(f"{m}_{rod:g}mm" if np.isfinite(rod) else m): float(v)
            for m, rod, v in zip(f["metric"], f["rod_mm"].astype(float), f["value"])}


def run_rows(archive: Archive, runs: list[Path]) -> pd.DataFrame:
    rows = []
    for d in runs:
        ctr, method, model, seed = d.relative_to(archive.base).parts
        rows.append({"run": d.relative_to(archive.base).as_posix(), "ctr_ps": int(ctr.removeprefix("ctr")),
                     "method": method, "model": model, "seed": int(seed.removeprefix("seed")), **timing_fields(d),
                     **final_metrics(pd.read_csv(d / "metrics.csv"))})
    return pd.DataFrame(rows)


def time_left(cfg: dict, per_run: pd.DataFrame, resumed_at: dict[str, int]) -> pd.DataFrame:
    """The grid's runs not in ``per_run``, each with the time it should take (module doc).

    Columns: ``run, epochs_left, s_per_epoch, estimate_s, basis``."""
    epochs = int(cfg["assisted"]["epochs"])
    alone = per_run[per_run["concurrent_jobs"].fillna(1).astype(int) == 1] if len(per_run) else per_run
    rate = alone.groupby(["method", "model"])["s_per_epoch"].agg(["median", "size"]) if len(alone) else None
    done = set(per_run["run"]) if len(per_run) else set()
    rows = []
    for ctr, method, model, seed in grid(cfg):
        label = run_label(ctr, method, model, seed)
        if label in done:
            continue
        left = epochs - resumed_at.get(label, 0)
        if rate is not None and (method, model) in rate.index:
            s, n = float(rate.loc[(method, model), "median"]), int(rate.loc[(method, model), "size"])
            basis = f"median of {n} finished {method} {model.upper()} run{'s' * (n != 1)}"
        else:
            s, basis = float("nan"), f"no {method} {model.upper()} run has finished"
        rows.append({"run": label, "epochs_left": left, "s_per_epoch": s, "estimate_s": left * s, "basis": basis})
    return pd.DataFrame(rows, columns=["run", "epochs_left", "s_per_epoch", "estimate_s", "basis"])


def markdown(per_run: pd.DataFrame) -> str:
    """The per-run table as in docs/results.md: CRC of four rods, NRMSE, background COV, time."""
    rods = [c for c in ("crc_6.5mm", "crc_3.5mm", "crc_2.2mm", "crc_1.6mm") if c in per_run]
    lines = ["| CTR | method | network | seed | " + " | ".join(f"CRC {c[4:-2]} mm" for c in rods)
             + " | NRMSE | background COV | s (per epoch) |",
             "|---" * (7 + len(rods)) + "|"]
    for r in per_run.to_dict("records"):
        lines.append(f"| {r['ctr_ps']} ps | `{r['method']}` | {r['model'].upper()} | {r['seed']} | "
                     + " | ".join(f"{r[c]:.3f}" for c in rods) + f" | {r['nrmse']:.3f} | {r['background_cov']:.3f} | "
                     f"{r['total_s']:.0f} ({1000 * r['s_per_epoch']:.1f} ms) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configfile", nargs="+", default=["config/config.yaml"])
    p.add_argument("--archive", type=Path, required=True, help="the folder run_assisted.py --archive wrote")
    p.add_argument("--out-prefix", required=True, help="path prefix of the tables, e.g. .../measured/cpu2_")
    p.add_argument("--markdown", action="store_true", help="print the per-run table as Markdown too")
    args = p.parse_args(argv)
    cfg = load_config([REPO / f if not Path(f).is_absolute() else f for f in args.configfile])
    prefix = args.out_prefix
    with tempfile.TemporaryDirectory() as tmp:
        # the runs restored as a results folder lays them out: their labels come from their paths
        archive = Archive(args.archive, Path(tmp) / "assisted", RUN_FILES, gzipped=GZIPPED)
        runs = finished_runs(archive, cfg)
        if not runs:
            raise SystemExit(f"error: {args.archive} holds no finished run (folders with {', '.join(RUN_FILES)}, "
                             f"{', '.join(GZIPPED)} gzipped); run workflow/benchmarks/run_assisted.py with --archive "
                             "first")
        for d in runs:   # runs trained with other settings than --configfile's are refused, as by the runner
            label = d.relative_to(archive.base).as_posix()
            stored = Path(args.archive) / label.split("/")[0] / "slice.json"
            digest = json.loads(stored.read_text())["sha256"] if stored.exists() else None
            archive.check(label, d, what_it_computes(cfg, digest))
            archive.restore(d, finished=False)
        settings = json.dumps({k: cfg[k] for k in ("device", "seeds", "results_dir", "assisted")}, sort_keys=True)
        per_run = run_rows(archive, runs)
        baselines, timings, written = [], [], []
        for (ctr, method), group in per_run.groupby(["ctr_ps", "method"]):
            stored = Path(args.archive) / f"ctr{ctr}"
            base = [str(stored / "baselines.csv")] if (stored / "baselines.csv").exists() else []
            out = f"{prefix}assisted_summary_ctr{ctr}_{method}.csv"
            run_equipet("assisted.figures", "summary", "--metrics", *[str(archive.base / r / "metrics.csv")
                                                                     for r in group["run"]], *base,
                        "--ctr-ps", str(ctr), "--method", method, "--out", out)
            written.append(out)
            baselines += [b for b in base if b not in baselines]
            if (stored / "mlem_timing.json").exists() and str(stored / "mlem_timing.json") not in timings:
                timings.append(str(stored / "mlem_timing.json"))
        metrics = [str(d / "metrics.csv") for d in runs] + baselines
        for rules, name in ((1, "paper_claims_assisted_grid.csv"), (2, "paper_claims_assisted_grid_rules2.csv")):
            run_equipet("study.claims", "--settings", settings, "--metrics", *metrics, "--runs", *map(str, runs),
                        "--mlem-timing", *timings, "--out", f"{prefix}{name}", "--rules", str(rules))
            written.append(f"{prefix}{name}")
    per_run.to_csv(f"{prefix}assisted_grid_runs.csv", index=False)
    left = time_left(cfg, per_run, checkpoint_epochs(Path(args.archive)))
    left.round({"s_per_epoch": 5, "estimate_s": 0}).to_csv(f"{prefix}assisted_grid_left.csv", index=False)
    written += [f"{prefix}assisted_grid_runs.csv", f"{prefix}assisted_grid_left.csv"]
    if args.markdown:
        print(markdown(per_run), flush=True)
    print(f"{len(runs)} finished runs of {args.archive}: wrote {', '.join(written)}", flush=True)
    unknown = int(left["estimate_s"].isna().sum())
    print(f"{len(left)} runs left: about {left['estimate_s'].sum() / 3600:.1f} h for the {len(left) - unknown} "
          "with an estimate at the archive's measured rates"
          + (f"; {unknown} without one (no finished run of their method and network)" if unknown else ""), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
