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
confirmation, then the rest of the grid. ``--match PATTERN ...`` starts only the runs whose label
(``grid/<experiment>/<configuration>/seed<N>``, ``confirm/<experiment>/<model>/seed<N>``)
matches one of the shell patterns, in the same order: ``--match 'grid/*/cnn_paper/*'`` runs the
paper CNN's grid runs first, say, where they decide claims sooner than a long SCNN run would. Finished runs (``metrics.csv`` present) are skipped,
so the script can be rerun after an interruption. It prints the wall time of every run and a
summary (runs, total and busiest time) at the end; a failed run is reported with its log and
makes the exit status 1.

``--archive DIR`` keeps the study across machines that do not keep their disks (a fresh clone, a
borrowed GPU): each run that finishes has its small files (``metrics.csv``, ``loss.csv``,
``timing.json``, ``configuration.json``, and the settings its numbers depend on as
``settings.json``) copied to ``DIR/<grid|confirm>/<experiment>/<name>/seed<N>/``, and at the
start every archived run missing from the results is copied back, so it counts as finished
(with ``--dry-run`` nothing is copied; such a run is listed as finished). An
archived run trained with other settings than the current configuration's is refused (the
message names the run and the first field that differs) rather than mixed into the tables. A
tracked folder (``workflow/benchmarks/measured/cpu2_ablation_runs``) makes git the store.
``--archive-only`` runs nothing: it copies the finished runs and, for each unfinished run, its
latest ``checkpoint.pt`` and the snapshots made before it into the archive (stop the runner
first), so that the next machine resumes that run where it stopped. ``eval.npz`` (the images,
about 0.5 MB a run) is not archived: the tables and the claims (``equipet-ablation summarise``,
``equipet-claims``) do not read it, but ``snakemake ablation`` would train a restored run again
for it, so aggregate restored runs with those two commands.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "workflow"))

from equipet.study import ablation  # noqa: E402
from equipet.study.archive import Archive, RunKeeper, add_runner_arguments  # noqa: E402
from equipet.config import load_config  # noqa: E402


def _settings_file(cfg: dict, directory: Path, name: str) -> str:
    path = directory / f"{name}.json"
    path.write_text(json.dumps(cfg, sort_keys=True))
    return f"@{path}"


ARCHIVED_FILES = ("metrics.csv", "loss.csv", "timing.json", "configuration.json")


def _what_it_computes(cfg: dict, experiment: str, name: str | None = None) -> dict:
    """The settings one run's numbers depend on (where and on what device it ran are left out):
    the brain image, the experiment, the networks, training and evaluation, and the ablation
    section (a grid run's own configuration only; a confirmation run depends on them all
    through the selection). JSON-normalised, as it reads back from ``settings.json``."""
    chosen = {k: cfg[k] for k in ("brain", experiment, "models", "training", "evaluation")}
    chosen["ablation"] = dict(cfg["ablation"])
    if name is not None:
        chosen["ablation"]["configurations"] = [c for c in cfg["ablation"]["configurations"] if c["name"] == name]
    return json.loads(json.dumps(chosen))


def _command(module: str, *args: str) -> list[str]:
    """``equipet-<module> args`` through this interpreter (works without the console scripts)."""
    return [sys.executable, "-c", f"from equipet.commands.{module} import main; main()", *args]


def _run(label: str, cmd: list[str], log: Path, env: dict,
         after: Callable[[], None] | None = None) -> tuple[str, float, int, Path]:
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "a") as fh:
        rc = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    seconds = time.perf_counter() - t0
    print(f"{'done' if rc == 0 else 'FAILED'} {label}: {seconds:.1f} s wall" + ("" if rc == 0 else f" (log {log})"),
          flush=True)
    if rc == 0 and after is not None:
        after()
    return label, seconds, rc, log


Job = tuple[str, list[str], Path, Callable[[], None] | None]   # label, command, log, what to do after


def _parallel(jobs: list[Job], n: int, env: dict) -> list[tuple[str, float, int, Path]]:
    results = []
    with ThreadPoolExecutor(max_workers=max(1, n)) as pool:
        futures = [pool.submit(_run, label, cmd, log, env, after) for label, cmd, log, after in jobs]
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
    add_runner_arguments(p, "grid/<experiment>/<configuration>/seed<N>, confirm/<experiment>/<model>/seed<N>")
    args = p.parse_args(argv)
    if args.archive_only and args.archive is None:
        p.error("--archive-only needs --archive DIR")

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
    archive = Archive(args.archive if args.archive.is_absolute() else Path.cwd() / args.archive,
                      results / "ablation", ARCHIVED_FILES) if args.archive else None
    starts_nothing = args.dry_run or args.archive_only
    all_results: list[tuple[str, float, int, Path]] = []
    t_start = time.perf_counter()

    def finished(run_dir: Path) -> bool:
        return (run_dir / "metrics.csv").exists() and (run_dir / "configuration.json").exists()

    keeper = RunKeeper(archive, finished, archive_only=args.archive_only, dry_run=args.dry_run, match=args.match)

    def todo(runs: list[tuple[str, Path, list[str], dict]]) -> list[Job]:
        out: list[Job] = []
        for label, run_dir, cmd, settings in runs:
            if not keeper.to_train(label, run_dir, settings):
                continue
            after = (lambda d=run_dir, st=settings: archive.save(d, st, finished=True)) if archive else None
            out.append((label, cmd, logs / f"{label.replace('/', '_')}.log", after))
        return out

    def go(jobs: list[Job]) -> None:
        if starts_nothing:
            for label, *_ in jobs:
                print("would run", label, flush=True)
            return
        all_results.extend(_parallel(jobs, args.jobs, env))

    def grid_job(experiment: str, name: str, seed: int) -> tuple[str, Path, list[str], dict]:
        conf = ablation.configuration(cfg, name)
        merged = ablation.configuration_config(cfg, conf)
        run_dir = ablation.grid_dir(results, experiment, name, seed)
        settings = _settings_file(merged, tmp, f"{experiment}_{name}")
        return (ablation.grid_label(experiment, name, seed), run_dir,
                _command("study.ablation", "train", "--settings", settings, "--brain", str(brain),
                         "--experiment", experiment, "--configuration", name, "--seed", str(seed),
                         "--out-dir", str(run_dir)), _what_it_computes(merged, experiment, name))

    screen = ablation.screen_runs(cfg)
    selection = ablation.selection_path(results)
    confirm_settings = _settings_file(cfg, tmp, "confirm")
    stages = {
        "screen": [grid_job(*r) for r in screen],
        "confirm": [(ablation.confirm_label(e, m, s), ablation.confirm_dir(results, e, m, s),
                     _command("study.ablation", "train", "--settings", confirm_settings, "--brain", str(brain),
                              "--experiment", e, "--selection", str(selection), "--model", m, "--seed", str(s),
                              "--out-dir", str(ablation.confirm_dir(results, e, m, s))), _what_it_computes(cfg, e))
                    for e, m, s in ablation.confirm_runs(cfg)],
        "rest": [grid_job(*r) for r in ablation.grid_runs(cfg) if r not in screen],
    }
    if archive is not None:   # every archived run is checked before anything starts
        for label, run_dir, _, settings in (run for runs in stages.values() for run in runs):
            archive.check(label, run_dir, settings)

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
    if (stale or not brain.exists()) and not starts_nothing:
        go([("brain", _command("brain.image", "--settings", _settings_file(cfg, tmp, "brain"), "--out", str(brain),
                               "--preview", str(brain.with_suffix(".png"))), logs / "brain.log", None)])

    if args.only in ("screen", "all"):
        go(todo(stages["screen"]))
    if args.only in ("confirm", "all"):
        screen_dirs = [str(ablation.grid_dir(results, *r)) for r in screen]
        if not starts_nothing:
            go([("select", _command("study.ablation", "select", "--runs", *screen_dirs, "--out", str(selection)),
                 logs / "selection.log", None)])
        go(todo(stages["confirm"]))
    if args.only == "all":
        go(todo(stages["rest"]))

    if (summary := keeper.summary()) is not None:
        print(summary, flush=True)
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
