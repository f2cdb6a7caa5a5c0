"""``workflow/benchmarks/run_assisted.py``: the assisted grid run by run, kept across fresh machines
through its archive (packed slices, finished runs, unfinished runs' checkpoints)."""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from test_assisted import write_tiny_slice

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "workflow" / "benchmarks"))

import pack_slice  # noqa: E402


def tiny_grid(path: Path, results: Path, **assisted) -> Path:
    """A config over config/quick.yaml: CTR 100 ps only, seed 0, 4 epochs of a 3-layer CNN on the tiny slice."""
    from equipet.config import schema_defaults

    over = {"results_dir": str(results), "device": "cpu", "seeds": [0], "acquisition": {"ctrs_ps": [100]},
            "phantom": schema_defaults("phantom"),
            "training": {"checkpoint_every": 2},
            "models": {"cnn": {"layers": 3, "channels": 4}},
            "assisted": {"epochs": 4, "snapshots": [2, 4], "cache_mb": 10, "subset_events": 100,
                         "methods": ["paper", "poisson"], "plateau": {"window": 2}, **assisted}}
    path.write_text(yaml.safe_dump(over))
    return path


def write_baselines(path: Path, ctr_ps: float) -> None:
    """A baselines.csv as the central-slice stage writes it: MLEM at the networks' input iteration
    resolves the rods of 4.5 mm and more, at its best iteration those of 2.2 mm and more."""
    rows = [{"experiment": "assisted", "model": model, "seed": 0, "epoch": it, "ctr_ps": ctr_ps, "split": "baseline",
             "filter_fwhm_mm": 0.0, "metric": metric, "value": value, "rod_mm": rod}
            for model, it, smallest in (("mlem_early", 2, 4.5), ("mlem_best", 10, 2.2))
            for rod in (6.5, 5.5, 4.5, 3.5, 2.2, 1.6)
            for metric, value in (("crc", 0.1 * rod), ("resolved", float(rod >= smallest)))]
    pd.DataFrame(rows).to_csv(path, index=False)


def tables(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONPATH=str(REPO / "workflow"))
    return subprocess.run([sys.executable, str(REPO / "workflow" / "benchmarks" / "assisted_tables.py"), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=300, env=env)


def runner(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONPATH=str(REPO / "workflow"))
    return subprocess.run([sys.executable, str(REPO / "workflow" / "benchmarks" / "run_assisted.py"), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=600, env=env)


def losses(run_dir: Path) -> np.ndarray:
    return pd.read_csv(run_dir / "loss.csv")["loss"].to_numpy()


@pytest.mark.slow
def test_assisted_runner_carries_the_grid_to_a_fresh_machine(tmp_path):
    """Machine A makes the slice and trains; the archive keeps the slice's digest (and with
    --pack-slices the packed slice, same digest), a finished run and an unfinished run's checkpoint. Machine B, which has nothing, unpacks the
    slice, rebuilds its matrix, takes the finished run as finished and resumes the other: its
    losses equal those of the same run trained straight through. Other settings, or another
    slice, are refused with the field or the file named."""
    quick = str(REPO / "config" / "quick.yaml")
    a, b, archive = tmp_path / "a", tmp_path / "b", tmp_path / "archive"
    ctr_a = a / "assisted" / "ctr100"
    ctr_a.mkdir(parents=True)
    write_tiny_slice(ctr_a)
    write_baselines(ctr_a / "baselines.csv", ctr_ps=100.0)
    (a / "recon" / "ctr100").mkdir(parents=True)
    (a / "recon" / "ctr100" / "timing.json").write_text('{"total_time_s": 1.0}\n')
    cfg_a, cfg_b = tiny_grid(tmp_path / "a.yaml", a), tiny_grid(tmp_path / "b.yaml", b)

    # A: one run to the end, one stopped at its checkpoint of epoch 2 (trained to 2 epochs, its outputs removed)
    done = runner("--configfile", quick, str(cfg_a), "--archive", str(archive), "--match", "ctr100/paper/cnn/*")
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.findall(r"^done (\S+):", done.stdout, re.M) == ["ctr100/paper/cnn/seed0"]
    digest = pack_slice.slice_digest(ctr_a / "slice.npz")
    assert json.loads((archive / "ctr100" / "slice.json").read_text())["sha256"] == digest
    assert not (archive / "ctr100" / "slice.packed.npz").exists()      # only with --pack-slices
    finished = archive / "ctr100" / "paper" / "cnn" / "seed0"
    assert {p.name for p in finished.iterdir()} == {"metrics.csv", "loss.csv.gz", "timing.json", "eval.npz",
                                                    "summary.json", "settings.json"}
    with gzip.open(finished / "loss.csv.gz", "rt") as fh:
        assert fh.read() == (ctr_a / "paper" / "cnn" / "seed0" / "loss.csv").read_text()
    assert json.loads((finished / "settings.json").read_text())["slice_sha256"] == digest
    assert json.loads((ctr_a / "paper" / "cnn" / "seed0" / "timing.json").read_text())["concurrent_jobs"] == 1

    cut = runner("--configfile", quick, str(tiny_grid(tmp_path / "cut.yaml", a, epochs=2, snapshots=[2])),
                 "--match", "ctr100/poisson/cnn/*")
    assert cut.returncode == 0, cut.stdout + cut.stderr
    partial = ctr_a / "poisson" / "cnn" / "seed0"
    for name in ("metrics.csv", "loss.csv", "timing.json", "eval.npz", "summary.json"):
        (partial / name).unlink()
    stored = {p.name: p.read_bytes() for p in finished.iterdir()}
    saved = runner("--configfile", quick, str(cfg_a), "--archive", str(archive), "--archive-only", "--pack-slices")
    assert saved.returncode == 0, saved.stdout + saved.stderr
    # the finished run it already holds is left as it is: saving again changes no tracked file
    assert "archived ctr100/paper/cnn/seed0" not in saved.stdout
    assert {p.name: p.read_bytes() for p in finished.iterdir()} == stored
    assert pack_slice.slice_digest(archive / "ctr100" / "slice.packed.npz") == digest
    assert "archived ctr100/poisson/cnn/seed0: its checkpoint" in saved.stdout
    kept = archive / "ctr100" / "poisson" / "cnn" / "seed0"
    assert (kept / "checkpoint.pt").exists() and (kept / "snapshots" / "epoch_000002.npy").exists()
    assert not (kept / "metrics.csv").exists()

    # a machine with neither the slice nor its packed copy is told how to make it
    bare = tmp_path / "bare"
    shutil.copytree(archive, bare)
    (bare / "ctr100" / "slice.packed.npz").unlink()
    told = runner("--configfile", quick, str(tiny_grid(tmp_path / "d.yaml", tmp_path / "d")), "--archive", str(bare))
    assert told.returncode != 0 and "the archive holds its digest" in told.stderr and "snakemake" in told.stderr, \
        told.stdout + told.stderr

    # B: nothing but the archive
    fresh = runner("--configfile", quick, str(cfg_b), "--archive", str(archive), "--match", "ctr100/*/cnn/*")
    assert fresh.returncode == 0, fresh.stdout + fresh.stderr
    assert "ctr100: slice unpacked" in fresh.stdout
    assert "restored ctr100/paper/cnn/seed0: finished" in fresh.stdout
    assert "skip ctr100/paper/cnn/seed0: finished" in fresh.stdout
    assert "restored ctr100/poisson/cnn/seed0: its checkpoint" in fresh.stdout
    assert re.findall(r"^done (\S+):", fresh.stdout, re.M) == ["ctr100/poisson/cnn/seed0"]
    ctr_b = b / "assisted" / "ctr100"
    assert pack_slice.slice_digest(ctr_b / "slice.npz") == digest and (ctr_b / "system.pt").exists()
    assert (b / "recon" / "ctr100" / "timing.json").exists() and (ctr_b / "baselines.csv").exists()
    np.testing.assert_array_equal(losses(ctr_b / "paper" / "cnn" / "seed0"), losses(ctr_a / "paper" / "cnn" / "seed0"))
    assert "resuming from" in (b / "logs" / "assisted_runner" / "ctr100_poisson_cnn_seed0.log").read_text()
    # the same run straight through on A gives the same losses as the resumed one on B
    for p in partial.rglob("*"):
        if p.is_file():
            p.unlink()
    through = runner("--configfile", quick, str(cfg_a), "--match", "ctr100/poisson/cnn/*")
    assert through.returncode == 0, through.stdout + through.stderr
    assert len(losses(partial)) == 4
    np.testing.assert_array_equal(losses(ctr_b / "poisson" / "cnn" / "seed0"), losses(partial))
    assert (archive / "ctr100" / "poisson" / "cnn" / "seed0" / "loss.csv.gz").exists()
    assert not (archive / "ctr100" / "poisson" / "cnn" / "seed0" / "checkpoint.pt").exists()

    # the measured tables come from the archive alone: what the rules assisted_summary and
    # paper_claims make of the same runs, the runs' own times and final metrics, what is left
    made = tables("--configfile", quick, str(cfg_b), "--archive", str(archive),
                  "--out-prefix", str(tmp_path / "t_"), "--markdown")
    assert made.returncode == 0, made.stdout + made.stderr
    for method in ("paper", "poisson"):
        summary = pd.read_csv(tmp_path / f"t_assisted_summary_ctr100_{method}.csv").set_index("model")
        assert set(summary.index) == {"mlem_early", "mlem_best", "cnn"} and summary.loc["cnn", "n_seeds"] == 1
        own = pd.read_csv(ctr_a / method / "cnn" / "seed0" / "metrics.csv").query(
            "split == 'train' and epoch == 4 and metric == 'crc'")
        assert own["value"].notna().any()
        for rod, value in zip(own["rod_mm"], own["value"]):
            assert summary.loc["cnn", f"crc_{rod:g}mm_mean"] == pytest.approx(value, rel=1e-12, nan_ok=True)
        assert summary.loc["mlem_best", "crc_6.5mm_mean"] == pytest.approx(0.65)
    per_run = pd.read_csv(tmp_path / "t_assisted_grid_runs.csv").set_index("run")
    assert list(per_run.index) == ["ctr100/paper/cnn/seed0", "ctr100/poisson/cnn/seed0"]
    assert per_run.loc["ctr100/poisson/cnn/seed0", "resumed_from_epoch"] == 2
    assert (per_run["epochs"] == 4).all() and (per_run["concurrent_jobs"] == 1).all()
    assert per_run.loc["ctr100/paper/cnn/seed0", "nrmse"] == pytest.approx(own_final(ctr_a, "paper", "nrmse"))
    assert "| 100 ps | `poisson` | CNN | 0 |" in made.stdout
    left = pd.read_csv(tmp_path / "t_assisted_grid_left.csv")
    assert list(left["run"]) == ["ctr100/paper/scnn/seed0", "ctr100/poisson/scnn/seed0"]
    assert left["estimate_s"].isna().all() and "no paper SCNN run has finished" in left["basis"].iloc[0]
    assert "2 runs left" in made.stdout and "2 without one" in made.stdout
    for rules in ("", "_rules2"):
        claims = pd.read_csv(tmp_path / f"t_paper_claims_assisted_grid{rules}.csv")
        cnn = claims[(claims.claim_id == "assisted_cnn_smallest_resolved") & (claims.method == "paper")].iloc[0]
        assert cnn["n"] == 1 and cnn["ctr_ps"] == 100.0 and claims["verdict"].notna().all()
        assert {"assisted_cnn_finer_than_mlem2", "assisted_mlem_iteration_time"} <= set(claims.claim_id)
    # the archived baselines reach the claims: MLEM resolves 4.5 mm at the input iteration, 2.2 mm at its best
    claims = pd.read_csv(tmp_path / "t_paper_claims_assisted_grid.csv").query("method == 'poisson'")
    value = claims.set_index("claim_id")["measured_mean"]
    assert value["assisted_cnn_finer_than_mlem2"] - value["assisted_cnn_vs_mlem_best"] == pytest.approx(4.5 - 2.2)
    assert "scale: runs of 4 epochs, the claim needs 60000" in cnn_reason(tmp_path / "t_paper_claims_assisted_grid.csv")

    # refused: other settings than the archived runs', or another slice than the archived one
    other = runner("--configfile", quick, str(tiny_grid(tmp_path / "lr.yaml", b, learning_rate=0.5)),
                   "--archive", str(archive), "--dry-run")
    assert other.returncode != 0 and "assisted.learning_rate differs" in other.stderr, other.stdout + other.stderr
    mixed = tables("--configfile", quick, str(tmp_path / "lr.yaml"), "--archive", str(archive),
                   "--out-prefix", str(tmp_path / "lr_"))
    assert mixed.returncode != 0 and "assisted.learning_rate differs" in mixed.stderr, mixed.stdout + mixed.stderr
    assert not list(tmp_path.glob("lr_*"))
    c = tmp_path / "c"
    (c / "assisted" / "ctr100").mkdir(parents=True)
    write_tiny_slice(c / "assisted" / "ctr100", n=301)
    moved = runner("--configfile", quick, str(tiny_grid(tmp_path / "c.yaml", c)), "--archive", str(archive), "--dry-run")
    assert moved.returncode != 0 and "is not the slice the archived runs of ctr100 were trained on" in moved.stderr, \
        moved.stdout + moved.stderr


def own_final(ctr_dir: Path, method: str, metric: str) -> float:
    m = pd.read_csv(ctr_dir / method / "cnn" / "seed0" / "metrics.csv")
    return float(m[(m.split == "train") & (m.epoch == m.epoch.max()) & (m.metric == metric)]["value"].iloc[0])


def cnn_reason(claims_csv: Path) -> str:
    claims = pd.read_csv(claims_csv)
    return str(claims[(claims.claim_id == "assisted_cnn_smallest_resolved") & (claims.method == "paper")]
               ["reason"].iloc[0])


def test_assisted_time_left_uses_the_median_rate_of_runs_that_had_the_device_alone():
    """Each unfinished run of the grid is estimated at the median seconds per epoch of the finished
    runs of its method and network that ran alone, over the epochs its checkpoint leaves; a run
    whose method and network never finished has no estimate, and says why."""
    from assisted_tables import time_left

    from equipet.config import load_config

    cfg = load_config([REPO / "config" / "config.yaml"])
    cfg["acquisition"]["ctrs_ps"], cfg["seeds"], cfg["assisted"]["epochs"] = [100], [0, 1, 2, 3], 1000
    cfg["assisted"]["methods"] = ["paper"]
    done = pd.DataFrame({"run": [f"ctr100/paper/scnn/seed{s}" for s in (0, 1, 2)],
                         "method": "paper", "model": "scnn", "s_per_epoch": [0.1, 0.3, 9.0],
                         "concurrent_jobs": [1, None, 3]})     # the third shared its device: not a rate
    left = time_left(cfg, done, {"ctr100/paper/scnn/seed3": 400, "ctr100/paper/cnn/seed1": 250}).set_index("run")
    assert list(left.index) == ["ctr100/paper/scnn/seed3"] + [f"ctr100/paper/cnn/seed{s}" for s in range(4)]
    assert left.loc["ctr100/paper/scnn/seed3", "epochs_left"] == 600
    assert left.loc["ctr100/paper/scnn/seed3", "estimate_s"] == pytest.approx(600 * 0.2)
    assert left.loc["ctr100/paper/scnn/seed3", "basis"] == "median of 2 finished paper SCNN runs"
    assert left.loc["ctr100/paper/cnn/seed1", "epochs_left"] == 750
    assert left.loc[left.index.str.contains("/cnn/"), "estimate_s"].isna().all()


def test_pack_slice_builds_the_stored_matrix_of_a_packed_slice(tmp_path):
    """``pack_slice.py unpack`` then ``system`` (what gpu_grid.sh does on a borrowed machine) gives a
    ``system.pt`` whose ``A x`` and ``A^T y`` are the on-the-fly projector's of the original slice."""
    import torch

    from equipet.assisted.central_slice import slice_projector
    from equipet.reconstruction.projector import SparseSystemMatrix

    made, moved = tmp_path / "made", tmp_path / "moved"
    made.mkdir()
    moved.mkdir()
    write_tiny_slice(made)
    pack_slice.pack(made / "slice.npz", tmp_path / "ctr100.packed.npz")
    pack_slice.unpack(tmp_path / "ctr100.packed.npz", moved / "slice.npz")
    (tmp_path / "device.yaml").write_text("device: cpu\n")
    env = dict(os.environ, PYTHONPATH=str(REPO / "workflow"))
    built = subprocess.run([sys.executable, str(REPO / "workflow" / "benchmarks" / "pack_slice.py"), "system",
                            str(moved / "slice.npz"), "config/quick.yaml", str(tmp_path / "device.yaml")],
                           cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert built.returncode == 0, built.stdout + built.stderr
    assert re.search(r"system\.pt: 300 events, \d+ non-zeros, built on cpu", built.stdout), built.stdout

    system = SparseSystemMatrix.from_state_dict(torch.load(moved / "system.pt", weights_only=True))
    with np.load(made / "slice.npz") as f:
        direct = slice_projector({k: f[k] for k in f.files}, "p1", "p2", "tof", torch.device("cpu"), 0.0, 64)
    rng = np.random.default_rng(3)
    image = torch.as_tensor(rng.uniform(0, 1, system.geometry.shape[:2]), dtype=torch.float32)
    values = torch.as_tensor(rng.uniform(0, 1, system.n_events), dtype=torch.float32)
    assert float(direct.apply(image).abs().max()) > 0   # the LORs cross the image
    torch.testing.assert_close(system.apply(image), direct.apply(image), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(system.adjoint(values), direct.adjoint(values), rtol=1e-5, atol=1e-5)
