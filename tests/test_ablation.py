"""The pre-registered ablation: its configurations, the screen's selection and the planned grid."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import REPO, copy_checkout

from equipet.study import ablation
from equipet.config import load_config
from equipet.errors import ConfigError, InputDataError


@pytest.fixture(scope="module")
def ablation_config() -> dict:
    return load_config([REPO / "config" / "config.yaml", REPO / "config" / "ablation.yaml"])


def test_ablation_configurations_cover_the_preregistered_grid(ablation_config):
    confs = {c.name: c for c in ablation.configurations(ablation_config)}
    for experiment in ablation.EXPERIMENTS:
        assert sum(experiment in c.experiments for c in confs.values()) >= 10
    assert ablation_config["denoise"]["epochs"] == 2000 and ablation_config["radon_recon"]["epochs"] == 5000
    assert len(ablation_config["ablation"]["seeds"]) == 3
    # every configuration's merged config is valid and changes what its name says
    merged = {n: ablation.configuration_config(ablation_config, c) for n, c in confs.items()}
    assert merged["scnn_d4"]["models"]["scnn"]["group"] == "D"
    assert merged["scnn_fmax"]["models"]["scnn"]["max_frequency"] == 4
    assert merged["cnn_lr3e-3"]["training"]["learning_rate"] == pytest.approx(3e-3)
    assert merged["cnn_noisy_dip"]["radon_recon"]["input"] == "noise"
    assert merged["scnn_paper"] == ablation.configuration_config(ablation_config, confs["scnn_paper"])
    # the paper-consistent ones are those of config/preregistration.md
    text = (REPO / "config" / "preregistration.md").read_text()
    for name, conf in confs.items():
        row = next(line for line in text.splitlines() if f"`{name}`" in line)
        assert row.strip().rstrip("|").split("|")[-1].strip().startswith("yes" if conf.paper_consistent else "no"), name


def test_ablation_rejects_changes_outside_the_networks_and_brain_tasks(ablation_config):
    cfg = json.loads(json.dumps(ablation_config))
    cfg["ablation"]["configurations"][0]["changes"] = {"scanner": {"rings": 3}}
    with pytest.raises(ConfigError, match="scanner"):
        ablation.configurations(cfg)
    cfg["ablation"]["configurations"][0]["changes"] = {"models": {"scnn": {"fields": 0}}}
    with pytest.raises(ConfigError, match="fields"):
        ablation.configuration_config(cfg, ablation.configurations(cfg)[0])


def _screen_run(root: Path, name: str, model: str, psnr: float, consistent: bool, n_params: int) -> Path:
    d = root / name
    d.mkdir(parents=True)
    pd.DataFrame([
        {"experiment": "denoise", "model": model, "seed": 0, "epoch": 10, "metric": "psnr", "value": psnr - 5,
         "split": "train"},
        {"experiment": "denoise", "model": model, "seed": 0, "epoch": 20, "metric": "psnr", "value": psnr,
         "split": "train"},
        {"experiment": "denoise", "model": model, "seed": 0, "epoch": 20, "metric": "psnr", "value": 99.0,
         "split": "heldout"},   # never looked at by the selection
    ]).to_csv(d / "metrics.csv", index=False)
    (d / "configuration.json").write_text(json.dumps(
        {"configuration": name, "model": model, "paper_consistent": consistent, "seed": 0, "n_parameters": n_params}))
    return d


def test_selection_picks_the_best_paper_consistent_run_of_each_network(tmp_path):
    runs = [_screen_run(tmp_path, "scnn_a", "scnn", 30.0, True, 100),
            _screen_run(tmp_path, "scnn_b", "scnn", 31.0, True, 100),
            _screen_run(tmp_path, "scnn_x", "scnn", 40.0, False, 100),   # best, but not paper-consistent
            _screen_run(tmp_path, "cnn_a", "cnn", 29.0, True, 500),
            _screen_run(tmp_path, "cnn_b", "cnn", 29.0, True, 200)]      # tie: fewer parameters wins
    chosen = ablation.select(runs)
    assert chosen["scnn"]["configuration"] == "scnn_b"
    assert chosen["cnn"]["configuration"] == "cnn_b"
    # the selection follows the data: make scnn_a the better one
    runs[0] = _screen_run(tmp_path / "again", "scnn_a", "scnn", 32.0, True, 100)
    assert ablation.select(runs)["scnn"]["configuration"] == "scnn_a"
    with pytest.raises(InputDataError, match="no finished paper-consistent CNN"):
        ablation.select(runs[:3])


def test_time_left_uses_each_networks_measured_rate_and_the_nearest_projector_overhead():
    """The runs left and their time, from made-up rates with a known answer: the same network's
    median (a learning rate or a noisy Radon input does not change it), the Radon overhead of
    the same model's nearest network, nothing borrowed across models or from runs side by side."""
    cfg = load_config([REPO / "config" / "config.yaml"])
    cfg["ablation"] = {"seeds": [0, 1], "screen_seed": 0, "confirm_seeds": [7], "configurations": [
        {"name": "s_small", "model": "scnn", "paper_consistent": True},
        {"name": "s_lr", "model": "scnn", "paper_consistent": True, "changes": {"training": {"learning_rate": 0.01}}},
        {"name": "s_wide", "model": "scnn", "paper_consistent": True, "changes": {"models": {"scnn": {"fields": 24}}}},
        {"name": "s_wider", "model": "scnn", "paper_consistent": True, "changes": {"models": {"scnn": {"fields": 32}}}},
        {"name": "s_c4", "model": "scnn", "paper_consistent": False, "changes": {"models": {"scnn": {"order": 4}}}},
        {"name": "s_noisy", "model": "scnn", "paper_consistent": False, "experiments": ["radon_recon"],
         "changes": {"radon_recon": {"counts": 1000}}},
        {"name": "c_paper", "model": "cnn", "paper_consistent": True}]}
    den, rad = cfg["denoise"]["epochs"], cfg["radon_recon"]["epochs"]
    finished = pd.DataFrame([
        ("grid/denoise/s_small/seed0", "s_small", 1000, 0.050, 1),
        ("grid/denoise/s_lr/seed0", "s_lr", 1000, 0.060, 1),          # same network: pooled, median 0.058
        ("grid/radon_recon/s_small/seed0", "s_small", 1000, 0.080, 1),  # overhead 0.080 - 0.058 = 0.022
        ("grid/denoise/s_wide/seed0", "s_wide", 8000, 0.300, 1),
        ("grid/radon_recon/s_wide/seed0", "s_wide", 8000, 0.340, 1),    # overhead 0.040
        ("grid/denoise/s_c4/seed0", "s_c4", 600, 0.020, 1),             # nearer s_small (600 vs 1000 parameters)
        ("grid/denoise/c_paper/seed0", "c_paper", 5000, 0.100, 1),
        ("grid/denoise/s_wide/seed1", "s_wide", 8000, 9.000, 2),        # trained beside another: no rate
        ("grid/denoise/s_wider/seed0", "s_wider", 9000, 0.500, 1),      # nearer s_wide (9000 vs 8000)
        ("confirm/denoise/scnn/seed7", "s_lr", 1000, 0.058, 1),
    ], columns=["run", "configuration", "n_parameters", "s_per_epoch", "concurrent_jobs"])
    left = ablation.time_left(cfg, finished, resumed_at={"grid/denoise/s_small/seed1": 300}).set_index("run")
    assert set(left.index) == ({f"grid/{e}/{c}/seed{s}" for e, c, s in ablation.grid_runs(cfg)} | {
        f"confirm/{e}/{m}/seed7" for e in ablation.EXPERIMENTS for m in ("scnn", "cnn")}) - set(finished["run"])
    expected = {
        "grid/denoise/s_small/seed1": 0.058 * (den - 300),   # from its checkpoint's epoch on
        "grid/denoise/s_lr/seed1": 0.058 * den,
        "grid/radon_recon/s_lr/seed1": 0.080 * rad,
        "grid/radon_recon/s_noisy/seed0": 0.080 * rad,
        "grid/radon_recon/s_wide/seed1": 0.340 * rad,
        "grid/radon_recon/s_c4/seed0": (0.020 + 0.022) * rad,
        "grid/radon_recon/s_wider/seed0": (0.500 + 0.040) * rad,
        "confirm/radon_recon/scnn/seed7": 0.080 * rad,       # the configuration of its finished seed
        "grid/denoise/c_paper/seed1": 0.100 * den,
    }
    for run, seconds in expected.items():
        assert left.loc[run, "estimate_s"] == pytest.approx(seconds, rel=1e-12), run
    assert "s_small" in left.loc["grid/radon_recon/s_c4/seed0", "basis"]
    assert "s_wide's" in left.loc["grid/radon_recon/s_wider/seed1", "basis"]
    for run in ("grid/radon_recon/c_paper/seed0", "confirm/denoise/cnn/seed7"):   # no CNN Radon run, no selection
        assert pd.isna(left.loc[run, "estimate_s"]), run
    chosen = ablation.time_left(cfg, finished, selection={"cnn": "c_paper"}).set_index("run")
    assert chosen.loc["confirm/denoise/cnn/seed7", "estimate_s"] == pytest.approx(0.100 * den)


def test_snakemake_ablation_dry_run_plans_every_configuration_and_seed(tmp_path):
    """Acceptance: >= 10 configurations x 3 seeds for each of denoising and Radon, then the
    selection, the confirmation (2 networks x 3 fresh seeds x 2 tasks) and the summary."""
    work = copy_checkout(tmp_path)
    env = dict(os.environ, MPLBACKEND="Agg")
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-n", "ablation", "--cores", "2",
                           "--configfile", "config/config.yaml", "config/ablation.yaml"],
                          cwd=work, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    outputs = set(re.findall(r"output: results/ablation/grid/(\w+)/([\w.-]+)/seed(\d+)/metrics\.csv", proc.stdout))
    for experiment in ("denoise", "radon_recon"):
        confs = {c for e, c, _ in outputs if e == experiment}
        assert len(confs) >= 10, confs
        for conf in confs:
            assert {s for e, c, s in outputs if e == experiment and c == conf} == {"0", "1", "2"}
    confirm = set(re.findall(r"output: results/ablation/confirm/(\w+)/(\w+)/seed(\d+)/metrics\.csv", proc.stdout))
    assert len(confirm) == 12
    for rule in ("ablation_select", "ablation_summary", "brain_claims"):
        assert re.search(rf"^{rule}\s+1$", proc.stdout, re.M), rule


TINY = """
results_dir: results
device: cpu
brain: {size: 32, heldout_slices: [-8, 8]}
denoise: {epochs: 4, snapshots: [2, 4]}
radon_recon: {epochs: 4, snapshots: [2, 4], n_angles: 16}
training: {checkpoint_every: 2}
evaluation: {rotations_deg: [45, 90]}
assisted: {plateau: {window: 2}}
ablation:
  seeds: [0]
  screen_seed: 0
  confirm_seeds: [5]
  configurations:
    - {name: scnn_paper, model: scnn, paper_consistent: true}
    - {name: scnn_c4, model: scnn, paper_consistent: false, changes: {models: {scnn: {order: 4}}}}
    - {name: cnn_paper, model: cnn, paper_consistent: true}
"""


def test_runner_match_starts_only_the_runs_named(tmp_path):
    """--match: the runs whose labels match one of the patterns, in the runner's order; the rest
    of the plan (--dry-run lists it) is left for later."""
    work = copy_checkout(tmp_path)
    (work / "config" / "tiny.yaml").write_text(TINY)
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONPATH=str(work / "workflow"))

    def planned(*extra: str) -> list[str]:
        proc = subprocess.run([sys.executable, "workflow/benchmarks/run_ablation.py", "--configfile",
                               "config/config.yaml", "config/tiny.yaml", "--only", "all", "--dry-run", *extra],
                              cwd=work, capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return re.findall(r"^would run (\S+)$", proc.stdout, re.M)

    everything = planned()
    assert len(everything) == 6 + 4 and everything[0] == "grid/denoise/scnn_paper/seed0"
    chosen = planned("--match", "grid/*/cnn_paper/*", "confirm/radon_recon/*/seed5")
    assert chosen == [label for label in everything if "/cnn_paper/" in label
                      or label.startswith("confirm/radon_recon/")]
    assert len(chosen) == 4
    assert planned("--match", "grid/*/no_such_configuration/*") == []


@pytest.mark.slow
def test_gpu_runner_writes_the_rules_outputs_so_snakemake_only_aggregates(tmp_path):
    """run_ablation.py at 4 epochs on the CPU: every grid and confirmation run, the selection,
    the wall time per run; afterwards `snakemake -n ablation` plans no training job."""
    work = copy_checkout(tmp_path)
    (work / "config" / "tiny.yaml").write_text(TINY)
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONPATH=str(work / "workflow"))
    configs = ["config/config.yaml", "config/tiny.yaml"]
    proc = subprocess.run([sys.executable, "workflow/benchmarks/run_ablation.py", "--configfile", *configs,
                           "--device", "cpu", "--jobs", "2", "--only", "all", "--archive", "archive"],
                          cwd=work, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    times = re.findall(r"^done (\S+): ([\d.]+) s wall$", proc.stdout, re.M)
    labels = {label for label, _ in times}
    assert {"grid/denoise/scnn_paper/seed0", "grid/radon_recon/scnn_c4/seed0", "confirm/radon_recon/cnn/seed5",
            "select"} <= labels
    assert len([l for l in labels if l.startswith(("grid/", "confirm/"))]) == 6 + 4
    selection = json.loads((work / "results" / "ablation" / "selection.json").read_text())
    assert selection["scnn"]["configuration"] == "scnn_paper"      # the only paper-consistent SCNN
    labels = json.loads((work / "results/ablation/confirm/denoise/scnn/seed5/configuration.json").read_text())
    assert labels["configuration"] == "scnn_paper" and labels["stage"] == "confirm"
    metrics = pd.read_csv(work / "results/ablation/grid/denoise/scnn_c4/seed0/metrics.csv")
    assert set(metrics["configuration"]) == {"scnn_c4"} and set(metrics["group"]) == {"C4"}
    # each run's timing.json says how many ran side by side (--jobs 2), for the contention rule
    timing = json.loads((work / "results/ablation/grid/denoise/scnn_c4/seed0/timing.json").read_text())
    assert timing["concurrent_jobs"] == 2
    # --archive: each finished run's small files and the settings its numbers depend on
    archive = work / "archive"
    archived = sorted(p.parent.relative_to(archive).as_posix() for p in archive.rglob("metrics.csv"))
    assert len(archived) == 10 and "grid/radon_recon/scnn_c4/seed0" in archived, archived
    for run in archived:
        assert {p.name for p in (archive / run).iterdir()} == {
            "metrics.csv", "loss.csv", "timing.json", "configuration.json", "settings.json"}, run
    c4_settings = json.loads((archive / "grid/denoise/scnn_c4/seed0/settings.json").read_text())
    assert c4_settings["models"]["scnn"]["order"] == 4 and "device" not in c4_settings
    assert [c["name"] for c in c4_settings["ablation"]["configurations"]] == ["scnn_c4"]
    # rerunning skips finished runs
    again = subprocess.run([sys.executable, "workflow/benchmarks/run_ablation.py", "--configfile", *configs,
                            "--only", "screen"], cwd=work, capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 0 and "skip grid/denoise/scnn_paper/seed0: finished" in again.stdout
    plan = subprocess.run([sys.executable, "-m", "snakemake", "-n", "ablation", "--cores", "2", "--configfile",
                           *configs], cwd=work, capture_output=True, text=True, timeout=300, env=env)
    assert plan.returncode == 0, plan.stdout + plan.stderr
    assert "ablation_summary" in plan.stdout
    assert not re.search(r"^(ablation_train|ablation_confirm|ablation_select|brain)\s+\d+$", plan.stdout, re.M)
    # a brain file made with other settings (say the quick configuration's) is made again, not trained on
    from equipet.brain.image import BrainSlices, brain_slices
    brain_file = work / "resources" / "brain" / "brain.npz"
    brain_slices({"brain": {"size": 16, "heldout_slices": [-8, 8]}}).save(brain_file)
    stale = subprocess.run([sys.executable, "workflow/benchmarks/run_ablation.py", "--configfile", *configs,
                            "--only", "screen"], cwd=work, capture_output=True, text=True, timeout=300, env=env)
    assert stale.returncode == 0, stale.stdout + stale.stderr
    assert "made with other settings (its image is 16 x 16, brain.size is 32)" in stale.stdout
    assert BrainSlices.load(brain_file).train.shape == (32, 32)
    brain_file.write_bytes(brain_file.read_bytes()[:100])   # a truncated file is made again too
    cut = subprocess.run([sys.executable, "workflow/benchmarks/run_ablation.py", "--configfile", *configs,
                          "--only", "screen"], cwd=work, capture_output=True, text=True, timeout=300, env=env)
    assert cut.returncode == 0 and "made with other settings (unreadable:" in cut.stdout, cut.stdout + cut.stderr
    assert BrainSlices.load(brain_file).train.shape == (32, 32)

    # a machine that keeps nothing but the archive: a run stopped after its last checkpoint
    # (no metrics.csv yet) is archived as its checkpoint and snapshots, and resumed from them
    results = work / "results" / "ablation"
    first = {p.relative_to(results): pd.read_csv(p) for p in results.rglob("metrics.csv")}
    stopped = Path("grid/denoise/scnn_c4/seed0")
    (results / stopped / "metrics.csv").unlink()
    saved = subprocess.run([sys.executable, "workflow/benchmarks/run_ablation.py", "--configfile", *configs,
                            "--only", "all", "--archive", "kept", "--archive-only"],
                           cwd=work, capture_output=True, text=True, timeout=300, env=env)
    assert saved.returncode == 0, saved.stdout + saved.stderr
    assert "9 archived, 1 checkpoints archived" in saved.stdout, saved.stdout
    assert {p.relative_to(work / "kept" / stopped).as_posix() for p in (work / "kept" / stopped).rglob("*.*")} == {
        "checkpoint.pt", "settings.json", "snapshots/epoch_000002.npy", "snapshots/epoch_000004.npy"}
    shutil.rmtree(work / "results")
    fresh = subprocess.run([sys.executable, "workflow/benchmarks/run_ablation.py", "--configfile", *configs,
                            "--device", "cpu", "--jobs", "1", "--only", "all", "--archive", "kept"],
                           cwd=work, capture_output=True, text=True, timeout=300, env=env)
    assert fresh.returncode == 0, fresh.stdout + fresh.stderr
    assert "9 restored, 1 checkpoints restored" in fresh.stdout, fresh.stdout
    assert set(re.findall(r"^done (\S+):", fresh.stdout, re.M)) == {stopped.as_posix(), "select"}
    assert json.loads((results / stopped / "timing.json").read_text())["resumed_from_epoch"] == 4
    for rel, frame in first.items():
        pd.testing.assert_frame_equal(pd.read_csv(results / rel), frame, check_exact=False, rtol=1e-6)
    assert not (work / "kept" / stopped / "checkpoint.pt").exists()   # finished now: only its small files
    # the measured tables come from the archive alone: the same summary as from the results folder
    tables = subprocess.run([sys.executable, "workflow/benchmarks/ablation_tables.py", "--configfile", *configs,
                             "--archive", "kept", "--out-prefix", "tables_"],
                            cwd=work, capture_output=True, text=True, timeout=300, env=env)
    assert tables.returncode == 0, tables.stdout + tables.stderr
    summary = pd.read_csv(work / "tables_ablation.csv")
    assert len(summary) == 6 + 4 and set(summary["n_seeds"]) == {1}
    c4_row = summary[(summary.configuration == "scnn_c4") & (summary.experiment == "denoise")].iloc[0]
    c4_train = first[stopped / "metrics.csv"].query("split == 'train' and epoch == 4 and metric == 'psnr'")
    assert c4_row["psnr_train_mean"] == pytest.approx(c4_train["value"].mean(), rel=1e-9)
    assert pd.read_csv(work / "tables_ablation_left.csv").empty and "0 runs left" in tables.stdout
    per_run = pd.read_csv(work / "tables_ablation_runs.csv").set_index("run")
    assert per_run.loc[stopped.as_posix(), "resumed_from_epoch"] == 4 and len(per_run) == 10
    for rules in ("", "_rules2"):
        claims = pd.read_csv(work / f"tables_paper_claims_ablation{rules}.csv")
        assert {"confirmation", "grid"} <= set(claims["scope"]) and claims["verdict"].notna().all()
    # an archived run made with other settings is refused before anything starts, naming the field
    edited = json.loads((work / "kept" / stopped / "settings.json").read_text())
    edited["denoise"]["epochs"] = 3
    (work / "kept" / stopped / "settings.json").write_text(json.dumps(edited))
    refused = subprocess.run([sys.executable, "workflow/benchmarks/run_ablation.py", "--configfile", *configs,
                              "--only", "all", "--archive", "kept"],
                             cwd=work, capture_output=True, text=True, timeout=300, env=env)
    assert refused.returncode != 0
    assert f"archived run {stopped.as_posix()}" in refused.stderr and "denoise.epochs differs" in refused.stderr


def test_training_refuses_a_brain_file_made_with_other_settings(tmp_path):
    """Settings that carry a brain section (the ablation's) are checked against the brain file
    before any training: a stale file names itself and the field."""
    from equipet.brain.experiments import run_experiment
    from equipet.brain.image import brain_slices

    cfg = load_config([REPO / "config" / "config.yaml", REPO / "config" / "quick.yaml"])
    cfg["device"] = "cpu"
    path = tmp_path / "brain.npz"
    brain_slices({"brain": {"size": 16, "heldout_slices": [-8, 8]}}).save(path)
    with pytest.raises(ConfigError, match="its image is 16 x 16, brain.size is 64") as err:
        run_experiment("denoise", cfg, path, "cnn", 0, tmp_path / "run")
    assert str(path) in str(err.value)
    assert not (tmp_path / "run" / "loss.csv").exists()
