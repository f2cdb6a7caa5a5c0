"""equipet.study.archive: a run copied into the tracked archive comes back unchanged, and saving
it again changes no tracked byte; what the runners do with each planned run (RunKeeper)."""

from __future__ import annotations

import gzip

from equipet.study.archive import CHECKPOINT, SETTINGS, Archive, RunKeeper

LOSS = "epoch,loss\n" + "".join(f"{e},{1.0 / (e + 1):.9f}\n" for e in range(200))


def make_run(base, name="seed0"):
    run = base / "grid" / "cnn" / name
    run.mkdir(parents=True)
    (run / "metrics.csv").write_text("psnr\n31.5\n")
    (run / "loss.csv").write_text(LOSS)
    return run


def archive(root, base):
    return Archive(root, base, ["metrics.csv", "loss.csv"], gzipped=["loss.csv"])


def test_a_finished_run_round_trips_and_its_gzip_bytes_depend_on_the_content_alone(tmp_path):
    base = tmp_path / "results"
    run = make_run(base)
    first, second = archive(tmp_path / "a", base), archive(tmp_path / "b", base)
    assert first.save(run, {"lr": 1e-3}, finished=True)
    assert second.save(run, {"lr": 1e-3}, finished=True)
    stored = first.archived(run) / "loss.csv.gz"
    with gzip.open(stored, "rt") as fh:
        assert fh.read() == LOSS
    # two copies made at other times, through other temporary files, are the same bytes
    assert stored.read_bytes() == (second.archived(run) / "loss.csv.gz").read_bytes()

    fresh = tmp_path / "fresh"
    moved = archive(tmp_path / "a", fresh)
    again = fresh / run.relative_to(base)
    assert moved.restore(again, finished=False) == "finished"
    assert (again / "loss.csv").read_text() == LOSS
    assert (again / "metrics.csv").read_text() == (run / "metrics.csv").read_text()


def test_keep_leaves_an_archived_finished_run_alone_and_replaces_an_older_checkpoint(tmp_path):
    base = tmp_path / "results"
    run = make_run(base)
    kept = archive(tmp_path / "a", base)
    assert kept.keep(run, {"lr": 1e-3}, finished=True)
    before = {p.name: p.read_bytes() for p in kept.archived(run).iterdir()}
    (run / "loss.csv").write_text(LOSS + "200,0.1\n")
    assert not kept.keep(run, {"lr": 1e-3}, finished=True)
    assert {p.name: p.read_bytes() for p in kept.archived(run).iterdir()} == before
    assert set(before) == {"metrics.csv", "loss.csv.gz", SETTINGS}

    stopped = base / "grid" / "cnn" / "seed1"
    (stopped / "snapshots").mkdir(parents=True)
    (stopped / CHECKPOINT).write_bytes(b"epoch 500")
    assert kept.keep(stopped, {"lr": 1e-3}, finished=False)
    (stopped / CHECKPOINT).write_bytes(b"epoch 1000")
    assert kept.keep(stopped, {"lr": 1e-3}, finished=False)
    assert (kept.archived(stopped) / CHECKPOINT).read_bytes() == b"epoch 1000"
    assert not kept.holds_finished(stopped)


def finished(run_dir):
    return (run_dir / "metrics.csv").exists() and (run_dir / "loss.csv").exists()


def files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_the_run_keeper_restores_skips_keeps_and_in_a_dry_run_writes_nothing(tmp_path, capsys):
    base, fresh = tmp_path / "results", tmp_path / "fresh"
    done = make_run(base)
    stopped = base / "grid" / "cnn" / "seed1"
    (stopped / "snapshots").mkdir(parents=True)
    (stopped / "snapshots" / "epoch_000500.npy").write_bytes(b"snap")
    (stopped / CHECKPOINT).write_bytes(b"epoch 500")
    todo = base / "grid" / "cnn" / "seed2"
    settings = {"lr": 1e-3}

    # a finished run made before the archive existed is archived as it is skipped; matching selects the rest
    keeper = RunKeeper(archive(tmp_path / "a", base), finished, match=["grid/cnn/seed2"])
    assert not keeper.to_train("grid/cnn/seed0", done, settings)
    assert keeper.to_train("grid/cnn/seed1", stopped, settings) is False      # not matched
    assert keeper.to_train("grid/cnn/seed2", todo, settings)
    assert keeper.counts == {"restored": 0, "checkpoints restored": 0, "archived": 1, "checkpoints archived": 0}
    # --archive-only: the unfinished run's checkpoint and snapshots; the archived finished run untouched
    only = RunKeeper(archive(tmp_path / "a", base), finished, archive_only=True)
    held = files(tmp_path / "a" / "grid" / "cnn" / "seed0")
    assert not any(only.to_train(f"grid/cnn/{d.name}", d, settings) for d in (done, stopped, todo))
    assert only.counts == {"restored": 0, "checkpoints restored": 0, "archived": 0, "checkpoints archived": 1}
    assert files(tmp_path / "a" / "grid" / "cnn" / "seed0") == held
    assert set(files(tmp_path / "a" / "grid" / "cnn" / "seed1")) == {CHECKPOINT, "snapshots/epoch_000500.npy",
                                                                      SETTINGS}
    capsys.readouterr()

    # a dry run on a machine with nothing: the archived finished run counts as finished, nothing is copied
    dry = RunKeeper(archive(tmp_path / "a", fresh), finished, dry_run=True)
    assert not dry.to_train("grid/cnn/seed0", fresh / "grid" / "cnn" / "seed0", settings)
    assert dry.to_train("grid/cnn/seed1", fresh / "grid" / "cnn" / "seed1", settings)
    assert not fresh.exists() and "skip grid/cnn/seed0: finished in" in capsys.readouterr().out
    # the real start restores both: the finished run is skipped, the stopped one resumes from its checkpoint
    real = RunKeeper(archive(tmp_path / "a", fresh), finished)
    assert not real.to_train("grid/cnn/seed0", fresh / "grid" / "cnn" / "seed0", settings)
    assert real.to_train("grid/cnn/seed1", fresh / "grid" / "cnn" / "seed1", settings)
    assert real.counts == {"restored": 1, "checkpoints restored": 1, "archived": 0, "checkpoints archived": 0}
    assert files(fresh / "grid" / "cnn" / "seed0") == files(done)
    assert files(fresh / "grid" / "cnn" / "seed1") == files(stopped)
    assert real.summary() == f"archive {tmp_path / 'a'}: 1 restored, 1 checkpoints restored, 0 archived, " \
                             "0 checkpoints archived"
