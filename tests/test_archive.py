"""equipet.study.archive: a run copied into the tracked archive comes back unchanged, and saving
it again changes no tracked byte."""

from __future__ import annotations

import gzip

from equipet.study.archive import CHECKPOINT, SETTINGS, Archive

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
