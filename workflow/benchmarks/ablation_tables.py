"""The ablation's measured tables from an archive of its runs (``run_ablation.py --archive``).

    python workflow/benchmarks/ablation_tables.py --archive workflow/benchmarks/measured/cpu2_ablation_runs \\
        --out-prefix workflow/benchmarks/measured/cpu2_

writes, over the archive's finished runs (every grid and confirmation run whose
``metrics.csv``, ``loss.csv``, ``timing.json`` and ``configuration.json`` are there):

* ``<prefix>ablation.csv``: ``equipet-ablation summarise``, one row per stage, task and
  configuration, mean and sd over the seeds that exist (``n_seeds``);
* ``<prefix>paper_claims_ablation.csv`` and ``<prefix>paper_claims_ablation_rules2.csv``:
  ``equipet-claims`` under rules 1 and 2 over the same runs; a claim whose runs are not all
  there is *not comparable*, as the rules say;
* ``<prefix>ablation_runs.csv``: one row per run from its ``timing.json`` (the configuration it
  trained, its parameters, epochs, training
  time summed over resumes, seconds per epoch, the epoch it last resumed from, the training
  processes side by side, the 1-minute load average at its end, device and torch);
* ``<prefix>ablation_left.csv``: every run of the configuration not finished in the archive, the
  epochs it has left (from its archived checkpoint, if any) and the time it should take at the
  rates the archive's runs measured (``equipet.study.ablation.time_left``, which says how); the
  total is printed.

The settings (``assisted.plateau`` for the claims) come from ``--configfile``, as for the runner.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
from pathlib import Path

import pandas as pd

from run_ablation import ARCHIVED_FILES, REPO, _command  # this folder: the runner that writes the archive

from equipet.config import load_config
from equipet.study import ablation
from equipet.study.archive import CHECKPOINT


def finished_runs(archive: Path) -> list[Path]:
    """The archive's run folders that hold every file the tables read, in a stable order."""
    return sorted(d for d in {p.parent for p in archive.rglob("metrics.csv")}
                  if all((d / f).exists() for f in ARCHIVED_FILES))


def timing_fields(run_dir: Path) -> dict:
    """A run's row of the per-run tables from its ``timing.json``: parameters, epochs, training time
    summed over resumes, seconds per epoch, resume epoch, processes side by side, load, device, torch."""
    t = json.loads((run_dir / "timing.json").read_text())
    return {"n_parameters": t["n_parameters"], "epochs": t["epochs"], "total_s": round(t["total_s"], 1),
            "s_per_epoch": t["s_per_epoch"], "resumed_from_epoch": t.get("resumed_from_epoch"),
            "concurrent_jobs": t.get("concurrent_jobs"), "load_average_1min": (t.get("load_average_end") or [None])[0],
            "device": t["device"], "torch": t["torch"]}


def run_rows(archive: Path, runs: list[Path]) -> pd.DataFrame:
    return pd.DataFrame([{"run": d.relative_to(archive).as_posix(),
                          "configuration": ablation.read_labels(d)["configuration"], **timing_fields(d)}
                         for d in runs])


def checkpoint_epochs(archive: Path) -> dict[str, int]:
    """The epoch of each unfinished run's archived checkpoint (``run_ablation.py --archive-only``)."""
    import torch

    out = {}
    for ckpt in sorted(archive.rglob(CHECKPOINT)):
        if not (ckpt.parent / "metrics.csv").exists():
            out[ckpt.parent.relative_to(archive).as_posix()] = int(
                torch.load(ckpt, map_location="cpu", weights_only=True)["epoch"])
    return out


def run_equipet(module: str, *args: str) -> None:
    """``equipet-<module> args`` through this interpreter; its output is shown only when it fails."""
    env = dict(os.environ, PYTHONPATH=str(REPO / "workflow"), MPLBACKEND="Agg")
    proc = subprocess.run(_command(module, *args), env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"error: equipet {module} {args[0]} failed:\n{proc.stdout}{proc.stderr}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configfile", nargs="+", default=["config/config.yaml", "config/ablation.yaml"])
    p.add_argument("--archive", type=Path, required=True, help="the folder run_ablation.py --archive wrote")
    p.add_argument("--out-prefix", required=True, help="path prefix of the tables, e.g. .../measured/cpu2_")
    args = p.parse_args(argv)
    cfg = load_config([REPO / f if not Path(f).is_absolute() else f for f in args.configfile])
    runs = finished_runs(args.archive)
    if not runs:
        raise SystemExit(f"error: {args.archive} holds no finished run (folders with {', '.join(ARCHIVED_FILES)}); "
                         "run workflow/benchmarks/run_ablation.py with --archive first")
    prefix = args.out_prefix
    settings = json.dumps({k: cfg[k] for k in ("device", "seeds", "results_dir", "assisted")}, sort_keys=True)
    dirs = [str(d) for d in runs]
    with tempfile.TemporaryDirectory() as tmp:
        run_equipet("study.ablation", "summarise", "--settings", settings, "--runs", *dirs,
                    "--table", f"{prefix}ablation.csv", "--metrics", f"{tmp}/ablation_metrics.csv",
                    "--loss-figure", f"{tmp}/loss.png", "--quality-figure", f"{tmp}/quality.png")
        metrics = [str(d / "metrics.csv") for d in runs]
        for rules, name in ((1, "paper_claims_ablation.csv"), (2, "paper_claims_ablation_rules2.csv")):
            run_equipet("study.claims", "--settings", settings, "--metrics", *metrics, "--runs", *dirs,
                        "--out", f"{prefix}{name}", "--rules", str(rules))
    per_run = run_rows(args.archive, runs)
    per_run.to_csv(f"{prefix}ablation_runs.csv", index=False)
    left = ablation.time_left(cfg, per_run, checkpoint_epochs(args.archive))
    left.round({"s_per_epoch": 5, "estimate_s": 0}).to_csv(f"{prefix}ablation_left.csv", index=False)
    print(f"{len(runs)} finished runs of {args.archive}: wrote {prefix}ablation.csv, {prefix}ablation_runs.csv, "
          f"{prefix}ablation_left.csv, {prefix}paper_claims_ablation.csv, {prefix}paper_claims_ablation_rules2.csv",
          flush=True)
    unknown = int(left["estimate_s"].isna().sum())
    print(f"{len(left)} runs left: about {left['estimate_s'].sum() / 3600:.1f} h at the archive's measured rates"
          + (f" ({unknown} without an estimate; the table's basis column says why)" if unknown else ""), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
