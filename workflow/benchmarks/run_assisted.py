"""Run the assisted grid one run at a time, without Snakemake, kept across fresh machines.

The pre-registered grid (``assisted.methods`` x SCNN and CNN x ``seeds`` at every CTR of
``acquisition.ctrs_ps``, ``assisted.epochs`` each) takes about 23 h on a 2-core CPU: longer than
any one session on a machine that may be replaced. This script runs the commands of the rule
``assisted_train`` (``equipet-assisted --out-dir``, through this interpreter, one run at a time
with every core, ``assisted.group_runs: run``'s layout) and, with ``--archive DIR``, keeps in
``DIR`` (a tracked folder: git is the store) everything a fresh clone needs to go on:

- each CTR's ``slice.json`` with the digest of the slice's arrays that the runs read, its
  ``baselines.csv`` and the MLEM's ``timing.json``. A fresh machine makes the slice again with
  Snakemake (simulation, MLEM, central slice: about 11 min for the three CTRs on 2 cores, the same
  bytes on the same kind of machine); archived runs are refused on a slice whose digest differs
  (the message says which and how to go on). With ``--pack-slices`` the slice itself is kept as
  well, packed (``DIR/ctr<CTR>/slice.packed.npz``, ``pack_slice.py``; about 20 MB per CTR at
  paper scale), for machines that cannot make the same bytes: a machine without the slice then
  unpacks it and builds its stored matrix (``system.pt``) again;
- each finished run's ``metrics.csv``, ``loss.csv`` (gzip-compressed), ``timing.json``,
  ``eval.npz`` and ``summary.json`` with the settings its numbers depend on (``settings.json``),
  at ``DIR/ctr<CTR>/<method>/<model>/seed<N>/``; restored at the next start, so it counts as
  finished;
- with ``--archive-only`` (run nothing; stop the runner first) each unfinished run's latest
  ``checkpoint.pt`` and the snapshots before it, so that the next machine resumes it.

    # on each fresh machine: simulation, MLEM, central slice (about 11 min for the three CTRs on 2 cores)
    snakemake --configfile config/config.yaml --cores 2 results/assisted/ctr{50,100,200}/slice.npz
    PYTHONPATH=workflow python workflow/benchmarks/run_assisted.py --configfile config/config.yaml \\
        --device cpu --archive workflow/benchmarks/measured/cpu2_assisted_runs
    # at the end of a session, after stopping it: the unfinished run's checkpoint too
    PYTHONPATH=workflow python workflow/benchmarks/run_assisted.py ... --archive-only

``--match PATTERN ...`` starts only the runs whose label (``ctr<CTR>/<method>/<model>/seed<N>``)
matches one of the shell patterns; ``--dry-run`` lists the runs that would start. Finished runs
(all five files present) are skipped. Each run's ``timing.json`` records ``concurrent_jobs`` 1:
one run has the device. Afterwards ``assisted_tables.py --archive DIR`` (this folder) aggregates
the archived runs with ``equipet-recon-figures summary`` and ``equipet-claims``, as the rules
``assisted_summary`` and ``paper_claims`` do, and estimates the time the rest of the grid needs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "workflow"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pack_slice  # noqa: E402
from equipet.config import load_config  # noqa: E402
from equipet.files import atomic_path  # noqa: E402
from equipet.study.archive import Archive, RunKeeper, add_runner_arguments  # noqa: E402

RUN_FILES = ("metrics.csv", "loss.csv", "timing.json", "eval.npz", "summary.json")
MODELS = ("scnn", "cnn")
SLICE_FILES = ("baselines.csv",)   # what a CTR folder keeps in the archive besides the packed slice


def run_label(ctr: int, method: str, model: str, seed: int) -> str:
    """A run's label, which is also its folder under ``<results>/assisted`` and in the archive."""
    return f"ctr{ctr}/{method}/{model}/seed{seed}"


def grid(cfg: dict) -> list[tuple[int, str, str, int]]:
    """The runs of the grid, in the order they start: CTR, method, model, seed."""
    return [(int(ctr), method, model, int(seed)) for ctr in cfg["acquisition"]["ctrs_ps"]
            for method in cfg["assisted"]["methods"] for model in MODELS for seed in cfg["seeds"]]


def what_it_computes(cfg: dict, digest: str) -> dict:
    """The settings a run's numbers depend on (the sections the rule passes, without where and how
    often it checkpoints) and its slice's digest; JSON-normalised, as it reads back."""
    chosen = {k: cfg[k] for k in ("assisted", "models", "training", "phantom", "mlem")}
    chosen["training"] = {k: v for k, v in chosen["training"].items() if k != "checkpoint_every"}
    chosen["slice_sha256"] = digest
    return json.loads(json.dumps(chosen))


class SliceStore:
    """A CTR's slice in the archive: its digest, its baselines, the MLEM's timing and, on request,
    the slice itself, packed."""

    def __init__(self, root: Path, results: Path, ctr: int) -> None:
        self.dir = root / f"ctr{ctr}"
        self.ctr_dir = results / "assisted" / f"ctr{ctr}"
        self.mlem_timing = results / "recon" / f"ctr{ctr}" / "timing.json"
        self.packed, self.meta = self.dir / "slice.packed.npz", self.dir / "slice.json"

    def digest(self) -> str | None:
        return json.loads(self.meta.read_text())["sha256"] if self.meta.exists() else None

    def save(self, digest: str, packed: bool) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        if packed:
            with atomic_path(self.packed) as tmp:
                pack_slice.pack(self.ctr_dir / "slice.npz", tmp)
        for name in SLICE_FILES:
            if (self.ctr_dir / name).exists():
                shutil.copy2(self.ctr_dir / name, self.dir / name)
        if self.mlem_timing.exists():
            shutil.copy2(self.mlem_timing, self.dir / "mlem_timing.json")
        self.meta.write_text(json.dumps({"sha256": digest}, indent=1) + "\n")

    def restore(self) -> None:
        self.ctr_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.ctr_dir / "slice.npz") as tmp:
            pack_slice.unpack(self.packed, tmp)
        for name in SLICE_FILES:
            if (self.dir / name).exists():
                shutil.copy2(self.dir / name, self.ctr_dir / name)
        if (self.dir / "mlem_timing.json").exists() and not self.mlem_timing.exists():
            self.mlem_timing.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(self.dir / "mlem_timing.json", self.mlem_timing)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configfile", nargs="+", default=["config/config.yaml"],
                   help="config files, later ones override earlier ones (as snakemake --configfile)")
    p.add_argument("--device", default=None, help="override the config's device (e.g. cuda, cpu)")
    add_runner_arguments(p, "ctr<CTR>/<method>/<model>/seed<N>")
    p.add_argument("--pack-slices", action="store_true",
                   help="keep each CTR's slice itself in --archive too, packed (about 20 MB per CTR at paper scale), "
                        "for machines that cannot make the same slice again")
    args = p.parse_args(argv)
    for flag, given in (("--archive-only", args.archive_only), ("--pack-slices", args.pack_slices)):
        if given and args.archive is None:
            p.error(f"{flag} needs --archive DIR")

    cfg = load_config([REPO / f if not Path(f).is_absolute() else f for f in args.configfile])
    if args.device:
        cfg["device"] = args.device
    results = Path(cfg["results_dir"])
    results = results if results.is_absolute() else REPO / results
    logs = results / "logs" / "assisted_runner"
    root = (args.archive if args.archive.is_absolute() else Path.cwd() / args.archive) if args.archive else None
    archive = Archive(root, results / "assisted", RUN_FILES, gzipped=("loss.csv",)) if root else None
    starts_nothing = args.dry_run or args.archive_only

    # each CTR's slice: restored from the archive, or archived, and its digest checked
    digests: dict[int, str] = {}
    for ctr in sorted({r[0] for r in grid(cfg)}):
        store = SliceStore(root, results, ctr) if root else None
        slice_path = results / "assisted" / f"ctr{ctr}" / "slice.npz"
        if not slice_path.exists() and store is not None and store.packed.exists() and not args.dry_run:
            print(f"ctr{ctr}: slice unpacked from {store.packed}, its stored matrix built", flush=True)
            store.restore()
            print(pack_slice.write_system(slice_path, cfg), flush=True)
        if not slice_path.exists():
            if args.dry_run and store is not None and store.packed.exists():
                print(f"ctr{ctr}: would unpack the slice of {store.packed}", flush=True)
                digests[ctr] = str(store.digest())
                continue
            if starts_nothing:
                print(f"ctr{ctr}: no slice yet ({slice_path})", flush=True)
                continue
            held = f" (the archive holds its digest, {store.meta}, which the slice made must match)" \
                if store is not None and store.meta.exists() else ""
            raise SystemExit(f"error: {slice_path} does not exist{held}: make it first with "
                             f"snakemake --configfile {' '.join(args.configfile)} --cores all {slice_path}")
        if not (slice_path.parent / "system.pt").exists() and not starts_nothing:
            print(pack_slice.write_system(slice_path, cfg), flush=True)
        digests[ctr] = pack_slice.slice_digest(slice_path)
        if store is not None:
            archived = store.digest()
            if archived is not None and archived != digests[ctr]:
                again = (f"Remove {slice_path.parent} to have the archived slice unpacked"
                         if store.packed.exists() else
                         "Make it on the kind of machine that made the archived one, or keep the slice with "
                         "--pack-slices there")
                raise SystemExit(f"error: {slice_path} is not the slice the archived runs of ctr{ctr} were trained "
                                 f"on ({store.meta}: sha256 {archived[:12]}..., this one {digests[ctr][:12]}...). "
                                 f"{again}; or point --archive at another folder to start a new grid on this slice")
            pack = args.pack_slices and not store.packed.exists()
            if (archived is None or pack) and not args.dry_run:
                store.save(digests[ctr], packed=pack)
                print(f"ctr{ctr}: slice {'packed and ' * pack}recorded in {store.dir}", flush=True)

    runs = []
    for ctr, method, model, seed in grid(cfg):
        if ctr not in digests:
            continue
        label = run_label(ctr, method, model, seed)
        run_dir = results / "assisted" / label
        settings = what_it_computes(cfg, digests[ctr])
        if archive is not None:
            archive.check(label, run_dir, settings)
        runs.append((label, run_dir, settings, (ctr, method, model, seed)))

    def finished(run_dir: Path) -> bool:
        return all((run_dir / n).exists() for n in RUN_FILES)

    keeper = RunKeeper(archive, finished, archive_only=args.archive_only, dry_run=args.dry_run, match=args.match)
    todo = [run for run in runs if keeper.to_train(*run[:3])]

    threads = str(os.cpu_count() or 1)
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, MPLBACKEND="Agg",
               EQUIPET_CONCURRENT_JOBS="1",
               PYTHONPATH=os.pathsep.join([str(REPO / "workflow"), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    failed = []
    t_start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="equipet-assisted-"))   # made after every refusal, so none leaves it behind
    settings_file = tmp / "settings.json"
    settings_file.write_text(json.dumps(cfg, sort_keys=True))
    for label, run_dir, settings, (ctr, method, model, seed) in todo:
        if starts_nothing:
            print("would run", label, flush=True)
            continue
        ctr_dir = results / "assisted" / f"ctr{ctr}"
        log = logs / f"{label.replace('/', '_')}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-c", "from equipet.commands.assisted.methods import main; main()",
               "--settings", f"@{settings_file}", "--slice", str(ctr_dir / "slice.npz"),
               "--system", str(ctr_dir / "system.pt"), "--method", method, "--model", model,
               "--seed", str(seed), "--out-dir", str(run_dir), "--log", str(log)]
        t0 = time.perf_counter()
        with open(log.with_suffix(".out"), "a") as fh:
            rc = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        print(f"{'done' if rc == 0 else 'FAILED'} {label}: {time.perf_counter() - t0:.1f} s wall"
              + ("" if rc == 0 else f" (log {log})"), flush=True)
        if rc != 0:
            failed.append(label)
        elif archive is not None:
            archive.save(run_dir, settings, finished=True)
    if (summary := keeper.summary()) is not None:
        print(summary, flush=True)
    if todo and not starts_nothing:
        print(f"{len(todo)} runs in {time.perf_counter() - t_start:.1f} s on {cfg['device']}; {len(failed)} failed",
              flush=True)
    shutil.rmtree(tmp, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
