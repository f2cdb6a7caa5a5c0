"""A tracked folder that keeps long studies across machines that do not keep their disks.

A fresh clone, a borrowed GPU or a replaced machine keeps only what git holds. The runners of the
ablation (``workflow/benchmarks/run_ablation.py``) and of the assisted grid
(``workflow/benchmarks/run_assisted.py``) copy every run that finishes (its small files and the
settings its numbers depend on) into such a folder, and on request an unfinished run's latest
checkpoint with the snapshots made before it; at the next start they copy back what the results
folder lacks, so that finished runs count as finished and unfinished ones resume where they stopped.
A run is archived at ``ARCHIVE/<its folder relative to the study's results folder>``. An archived
run that was trained with other settings than the current ones is refused, with the first field
that differs, rather than mixed into the tables.
"""

from __future__ import annotations

import argparse
import fnmatch
import gzip
import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

from equipet.files import atomic_path

CHECKPOINT = "checkpoint.pt"
SNAPSHOTS = "snapshots"
SETTINGS = "settings.json"


def first_difference(a: object, b: object, where: str = "") -> str | None:
    """The dotted key of the first difference between two JSON-like values (None when equal)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            if key not in a or key not in b:
                return f"{where}{key}"
            found = first_difference(a[key], b[key], f"{where}{key}.")
            if found:
                return found
        return None
    return None if a == b else where.rstrip(".") or "(the whole settings)"


def _copy(src: Path, dst: Path, compress: bool = False, decompress: bool = False) -> None:
    """Copy ``src`` to ``dst`` (gzip-compressing or decompressing on the way) through a temporary
    file, so that an interrupted copy leaves no half file."""
    with atomic_path(dst) as tmp:
        if compress:   # no name or time in the gzip header: the same file always gives the same bytes
            with open(src, "rb") as fin, open(tmp, "wb") as raw, \
                    gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as fout:
                shutil.copyfileobj(fin, fout)
            shutil.copystat(src, tmp)
        elif decompress:
            with gzip.open(src, "rb") as fin, open(tmp, "wb") as fout:
                shutil.copyfileobj(fin, fout)
            shutil.copystat(src, tmp)
        else:
            shutil.copy2(src, tmp)


class Archive:
    """Finished runs' small files (and unfinished runs' checkpoints) kept in ``root``.

    ``base`` is the study's results folder (``<results>/ablation``, ``<results>/assisted``): a run
    folder ``base/X`` is archived at ``root/X``. ``files`` are what a finished run keeps, and what
    marks it finished in the archive; those in ``gzipped`` are stored gzip-compressed (``NAME.gz``),
    for long loss curves.
    """

    def __init__(self, root: Path, base: Path, files: Sequence[str], gzipped: Sequence[str] = ()) -> None:
        unknown = set(gzipped) - set(files)
        if unknown:
            raise ValueError(f"gzipped names files a run does not keep: {sorted(unknown)}")
        self.root, self.base, self.files, self.gzipped = Path(root), Path(base), tuple(files), set(gzipped)

    def archived(self, run_dir: Path) -> Path:
        return self.root / Path(run_dir).relative_to(self.base)

    def _stored(self, name: str) -> str:
        return f"{name}.gz" if name in self.gzipped else name

    def check(self, label: str, run_dir: Path, settings: dict) -> None:
        """Refuse (SystemExit naming the run, the field and the fix) an archived run that was
        trained with other settings than ``settings``."""
        saved = self.archived(run_dir) / SETTINGS
        if not saved.exists():
            return
        try:
            old = json.loads(saved.read_text())
        except json.JSONDecodeError as exc:
            raise SystemExit(f"error: {saved} is not valid JSON ({exc}); restore it with git or remove "
                             f"{saved.parent} so that {label} is trained again") from None
        differs = first_difference(old, settings)
        if differs:
            raise SystemExit(f"error: the archived run {label} ({saved.parent}) was trained with other settings "
                             f"than this configuration's: {differs} differs. Point --archive at an archive of this "
                             f"configuration, or remove {saved.parent} to train {label} again")

    def holds_finished(self, run_dir: Path) -> bool:
        return all((self.archived(run_dir) / self._stored(n)).exists() for n in self.files)

    def restore(self, run_dir: Path, finished: bool) -> str | None:
        """Copy an archived run into ``run_dir`` (``finished``: whether it already holds a finished
        run, which is left alone): ``"finished"`` (its files), ``"checkpoint"`` (an unfinished run's
        checkpoint, where ``run_dir`` has none) or None (nothing copied)."""
        src = self.archived(run_dir)
        if finished or not src.is_dir():
            return None
        if self.holds_finished(run_dir):
            run_dir.mkdir(parents=True, exist_ok=True)
            for name in self.files:
                _copy(src / self._stored(name), run_dir / name, decompress=name in self.gzipped)
            return "finished"
        if (src / CHECKPOINT).exists() and not (run_dir / CHECKPOINT).exists():
            (run_dir / SNAPSHOTS).mkdir(parents=True, exist_ok=True)
            for snap in sorted((src / SNAPSHOTS).glob("*.npy")):
                if not (run_dir / SNAPSHOTS / snap.name).exists():
                    _copy(snap, run_dir / SNAPSHOTS / snap.name)
            _copy(src / CHECKPOINT, run_dir / CHECKPOINT)
            return "checkpoint"
        return None

    def save(self, run_dir: Path, settings: dict, finished: bool) -> bool:
        """Copy a finished run's files (or an unfinished one's checkpoint and the snapshots made
        before it) into the archive, with ``settings`` as ``settings.json``."""
        dst = self.archived(run_dir)
        names = list(self.files) if finished else [CHECKPOINT]
        if not all((run_dir / n).exists() for n in names):
            return False
        dst.mkdir(parents=True, exist_ok=True)
        if not finished:   # a resumed run reads back the snapshots it made before its checkpoint
            names += [f"{SNAPSHOTS}/{p.name}" for p in sorted((run_dir / SNAPSHOTS).glob("*.npy"))]
            (dst / SNAPSHOTS).mkdir(exist_ok=True)
        for name in names:
            _copy(run_dir / name, dst / self._stored(name), compress=name in self.gzipped)
        (dst / SETTINGS).write_text(json.dumps(settings, sort_keys=True, indent=1) + "\n")
        if finished:   # what only an unfinished run needs
            (dst / CHECKPOINT).unlink(missing_ok=True)
            shutil.rmtree(dst / SNAPSHOTS, ignore_errors=True)
        return True

    def keep(self, run_dir: Path, settings: dict, finished: bool) -> bool:
        """``--archive-only``'s step: :meth:`save` what the archive lacks. A finished run it
        already holds is left as it is (its settings were checked at the start), so that saving
        again changes no tracked file; an unfinished run's newer checkpoint replaces the old one."""
        if finished and self.holds_finished(run_dir):
            return False
        return self.save(run_dir, settings, finished)


class RunKeeper:
    """What both runners do with each planned run before any training, and what they count.

    With ``archive_only`` a run is kept in the archive (:meth:`Archive.keep`: finished, or its
    latest checkpoint) and nothing trains. Otherwise a run is first restored from the archive
    (finished, or a checkpoint to resume from); a finished run is skipped, and archived if the
    archive lacks it (one finished before ``--archive`` was given); the others train when their
    label matches one of ``match`` (all, when None). ``dry_run`` writes nothing: a run the archive
    holds finished counts as finished without being copied.
    """

    def __init__(self, archive: Archive | None, finished: Callable[[Path], bool], *, archive_only: bool = False,
                 dry_run: bool = False, match: Sequence[str] | None = None) -> None:
        if archive_only and archive is None:
            raise ValueError("archive_only needs an archive")
        self.archive, self.finished = archive, finished
        self.archive_only, self.dry_run, self.match = archive_only, dry_run, match
        self.counts = dict.fromkeys(("restored", "checkpoints restored", "archived", "checkpoints archived"), 0)

    def to_train(self, label: str, run_dir: Path, settings: dict) -> bool:
        """Whether the run ``label`` (folder ``run_dir``, trained with ``settings``) trains now;
        prints what was done with it."""
        a = self.archive
        if a is not None and self.archive_only:
            done = self.finished(run_dir)
            if a.keep(run_dir, settings, finished=done):
                self.counts["archived" if done else "checkpoints archived"] += 1
                print(f"archived {label}: {'finished' if done else 'its checkpoint'}", flush=True)
            return False
        if a is not None and self.dry_run:
            if not self.finished(run_dir) and a.holds_finished(run_dir):
                print(f"skip {label}: finished in {a.root} (restored when run without --dry-run)", flush=True)
                return False
        elif a is not None:
            restored = a.restore(run_dir, self.finished(run_dir))
            if restored:
                self.counts["restored" if restored == "finished" else "checkpoints restored"] += 1
                print(f"restored {label}: "
                      + ("finished" if restored == "finished" else "its checkpoint, to resume from"), flush=True)
        if self.finished(run_dir):
            if a is not None and not self.dry_run and a.keep(run_dir, settings, finished=True):
                self.counts["archived"] += 1
            print(f"skip {label}: finished", flush=True)
            return False
        return self.match is None or any(fnmatch.fnmatchcase(label, pat) for pat in self.match)

    def summary(self) -> str | None:
        """The archive's counts, one line (None without an archive)."""
        if self.archive is None:
            return None
        return f"archive {self.archive.root}: " + ", ".join(f"{v} {k}" for k, v in self.counts.items())


def add_runner_arguments(p: argparse.ArgumentParser, labels: str) -> None:
    """The options both runners share: which runs start (``--match``, ``--dry-run``) and the
    archive (``--archive``, ``--archive-only``); ``labels`` spells the runner's run labels."""
    p.add_argument("--match", nargs="+", default=None, metavar="PATTERN",
                   help=f"start only the runs whose label ({labels}) matches one of these shell patterns")
    p.add_argument("--dry-run", action="store_true", help="list the runs that would start, start none")
    p.add_argument("--archive", type=Path, default=None, metavar="DIR",
                   help="restore finished runs (and unfinished runs' checkpoints) from DIR at the start and copy "
                        "each run that finishes into it (a tracked folder keeps the study across fresh machines)")
    p.add_argument("--archive-only", action="store_true",
                   help="start nothing: copy the finished runs and the unfinished runs' checkpoints into --archive")
