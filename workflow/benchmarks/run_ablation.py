"""Run the ablation's training jobs without Snakemake, several at once on one device.

For a borrowed GPU machine where Snakemake is not installed: this script runs the same
commands as the rules of ``workflow/rules/ablation.smk`` (``equipet-brain``,
``equipet-ablation train`` and ``select``, through this interpreter) with the same
output paths, ``--jobs`` processes in parallel. Afterwards ``snakemake ablation`` (same config
files) only aggregates: tables, figures and claims (outputs made outside Snakemake carry no
Snakemake metadata; ``--touch`` or ``--rerun-triggers mtime`` settle any doubt about that).

    python workflow/benchmarks/run_ablation.py --configfile config/config.yaml config/ablation.yaml \\
        --device cuda --jobs 12 --only all

``--only screen``: every configuration's denoising run with the screen seed; ``confirm``: the
selection (screen must be done) and the confirmation runs; ``all``: screen, selection,
confirmation, then the rest of the grid. Finished runs (``metrics.csv`` present) are skipped,
so the script can be rerun after an interruption. It prints the wall time of every run and a
summary (runs, total and busiest time) at the end; a failed run is reported with its log and
makes the exit status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "workflow"))

from equipet.study import ablation  # noqa: E402
from equipet.config import load_config  # noqa: E402


def _settings_file(cfg: dict, directory: Path, name: str) -> str:
    path = directory / f"{name}.json"
    path.write_text(json.dumps(cfg, sort_keys=True))
    return f"@{path}"


def _command(module: str, *args: str) -> list[str]:
    """``equipet-<module> args`` through this interpreter (works without the console scripts)."""
    return [sys.executable, "-c", f"from equipet.commands.{module} import main; main()", *args]


def _run(label: str, cmd: list[str], log: Path, env: dict) -> tuple[str, float, int, Path]:
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "a") as fh:
        rc = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    seconds = time.perf_counter() - t0
    print(f"{'done' if rc == 0 else 'FAILED'} {label}: {seconds:.1f} s wall" + ("" if rc == 0 else f" (log {log})"),
          flush=True)
    return label, seconds, rc, log


def _parallel(jobs: list[tuple[str, list[str], Path]], n: int, env: dict) -> list[tuple[str, float, int, Path]]:
    results = []
    with ThreadPoolExecutor(max_workers=max(1, n)) as pool:
        futures = [pool.submit(_run, label, cmd, log, env) for label, cmd, log in jobs]
        for f in as_completed(futures):
            results.append(f.result())
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configfile", nargs="+", default=["config/config.yaml", "config/ablation.yaml"],
                   help="config files, later ones override earlier ones (as snakemake --configfile)")
    p.add_argument("--device", default=None, help="override the config's device (e.g. cuda, cuda:0, cpu)")
    p.add_argument("--jobs", type=int, default=4, help="training processes at once on the device")
    p.add_argument("--only", choices=["screen", "confirm", "all"], default="all")
    p.add_argument("--dry-run", action="store_true", help="list the runs that would start, start none")
    args = p.parse_args(argv)

    cfg = load_config([REPO / f if not Path(f).is_absolute() else f for f in args.configfile])
    if args.device:
        cfg["device"] = args.device
    if not ablation.configurations(cfg):
        p.error("the configuration has no ablation.configurations; add config/ablation.yaml to --configfile")
    results = Path(cfg["results_dir"])
    results = results if results.is_absolute() else REPO / results
    logs = results / "logs" / "ablation"
    brain = REPO / "resources" / "brain" / "brain.npz"
    threads = max(1, (os.cpu_count() or 1) // max(1, args.jobs))
    # EQUIPET_CONCURRENT_JOBS goes into each run's timing.json: the contention rule of
    # config/preregistration_2.md judges the times of runs that had the device to themselves (--jobs 1)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), MPLBACKEND="Agg",
               EQUIPET_CONCURRENT_JOBS=str(max(1, args.jobs)),
               PYTHONPATH=os.pathsep.join([str(REPO / "workflow"), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    tmp = Path(tempfile.mkdtemp(prefix="equipet-ablation-"))
    all_results: list[tuple[str, float, int, Path]] = []
    t_start = time.perf_counter()

    def todo(dirs_and_cmds: list[tuple[str, Path, list[str]]]) -> list[tuple[str, list[str], Path]]:
        out = []
        for label, run_dir, cmd in dirs_and_cmds:
            if (run_dir / "metrics.csv").exists() and (run_dir / "configuration.json").exists():
                print(f"skip {label}: finished", flush=True)
                continue
            out.append((label, cmd, logs / f"{label.replace('/', '_')}.log"))
        return out

    def go(jobs: list[tuple[str, list[str], Path]]) -> None:
        if args.dry_run:
            for label, cmd, _ in jobs:
                print("would run", label, flush=True)
            return
        all_results.extend(_parallel(jobs, args.jobs, env))

    stale = None
    if brain.exists():
        from equipet.brain.image import BrainSlices
        from equipet.errors import InputDataError
        try:
            stale = BrainSlices.load(brain).mismatch(cfg)
        except InputDataError as exc:   # truncated or incomplete: made again too
            stale = f"unreadable: {exc}"
        if stale:
            print(f"{brain} was made with other settings ({stale}): made again, as snakemake's brain rule would",
                  flush=True)
    if (stale or not brain.exists()) and not args.dry_run:
        go([("brain", _command("brain.image", "--settings", _settings_file(cfg, tmp, "brain"), "--out", str(brain),
                               "--preview", str(brain.with_suffix(".png"))), logs / "brain.log")])

    def grid_job(experiment: str, name: str, seed: int) -> tuple[str, Path, list[str]]:
        conf = ablation.configuration(cfg, name)
        merged = ablation.configuration_config(cfg, conf)
        run_dir = ablation.grid_dir(results, experiment, name, seed)
        settings = _settings_file(merged, tmp, f"{experiment}_{name}")
        return (f"grid/{experiment}/{name}/seed{seed}", run_dir,
                _command("study.ablation", "train", "--settings", settings, "--brain", str(brain),
                         "--experiment", experiment, "--configuration", name, "--seed", str(seed),
                         "--out-dir", str(run_dir)))

    screen = ablation.screen_runs(cfg)
    if args.only in ("screen", "all"):
        go(todo([grid_job(*r) for r in screen]))
    if args.only in ("confirm", "all"):
        selection = ablation.selection_path(results)
        screen_dirs = [str(ablation.grid_dir(results, *r)) for r in screen]
        if not args.dry_run:
            go([("select", _command("study.ablation", "select", "--runs", *screen_dirs, "--out", str(selection)),
                 logs / "selection.log")])
        settings = _settings_file(cfg, tmp, "confirm")
        go(todo([(f"confirm/{e}/{m}/seed{s}", ablation.confirm_dir(results, e, m, s),
                  _command("study.ablation", "train", "--settings", settings, "--brain", str(brain), "--experiment", e,
                           "--selection", str(selection), "--model", m, "--seed", str(s),
                           "--out-dir", str(ablation.confirm_dir(results, e, m, s))))
                 for e, m, s in ablation.confirm_runs(cfg)]))
    if args.only == "all":
        go(todo([grid_job(*r) for r in ablation.grid_runs(cfg) if r not in screen]))

    wall = time.perf_counter() - t_start
    failed = [r for r in all_results if r[2] != 0]
    if all_results:
        busiest = max(all_results, key=lambda r: r[1])
        print(f"{len(all_results)} runs in {wall:.1f} s wall with {args.jobs} at once on {cfg['device']} "
              f"(sum of run times {sum(r[1] for r in all_results):.1f} s; longest {busiest[0]} {busiest[1]:.1f} s); "
              f"{len(failed)} failed", flush=True)
    for label, _, _, log in failed:
        print(f"FAILED {label}: see {log}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
