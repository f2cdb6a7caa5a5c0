"""The Snakemake workflow itself: lint, dry run of the paper config, a full quick run, the report.

The workflow runs in a copy of the checkout so that the tests never touch results/ or
resources/ of the developer's tree.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import copy_checkout

SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def _snakemake(workdir: Path, *args: str, timeout: int = 1500) -> subprocess.CompletedProcess:
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONUNBUFFERED="1")
    return subprocess.run([*SNAKEMAKE, *args], cwd=workdir, capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    dst = copy_checkout(tmp_path_factory.mktemp("equipet"))
    (dst / "results").mkdir()
    return dst


def test_lint_is_clean(workdir):
    proc = _snakemake(workdir, "--lint", "--cores", "1")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "Lints for" not in out, out


def test_paper_config_dry_run(workdir):
    proc = _snakemake(workdir, "-n", "--cores", "2", "--quiet", "rules")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "train_brain" in proc.stdout


def _planned_rules(workdir: Path, target: str) -> set[str]:
    proc = _snakemake(workdir, target, "-n", "--cores", "2", "--quiet", "rules")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return {line.split()[0] for line in proc.stdout.splitlines()
            if line.strip() and line.split()[-1].isdigit() and line.split()[0] not in ("job", "total")}


def test_stage_targets_plan_only_their_upstream(workdir):
    """Each stage target runs its stage and what it needs, nothing downstream: the brain
    benchmarks never wait for a simulation or an assisted run (days on a CPU)."""
    brain = _planned_rules(workdir, "brain_experiments")
    assert {"train_brain", "generalisation_figure", "brain_claims"} <= brain
    assert not brain & {"simulate_job", "mlem", "assisted_train", "tables"}, brain
    recon = _planned_rules(workdir, "reconstruction")
    assert {"simulate_job", "sensitivity", "mlem", "recon_metrics"} <= recon
    assert not recon & {"train_brain", "assisted_train", "central_slice"}, recon
    assert "assisted_train" in _planned_rules(workdir, "assisted")


def test_bad_config_stops_with_key_and_fix(workdir):
    proc = _snakemake(workdir, "-n", "--cores", "1", "--config", "seeds=[]")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "seeds" in out and "fix:" in out


@pytest.mark.workflow
def test_quick_run_end_to_end(quick_run):
    """The quick config's whole run (the session's shared ``quick_run``, which fails the test
    if snakemake does), its tables, claims, figures, report, and what a changed setting reruns."""
    workdir, results = quick_run["workdir"], quick_run["results"]
    metrics = pd.read_csv(results / "tables" / "metrics.csv")
    for experiment in ("denoise", "radon_recon"):
        for model in ("cnn", "scnn"):
            rows = metrics[(metrics.experiment == experiment) & (metrics.model == model)]
            assert set(rows.seed) == {0, 1}, (experiment, model)
            assert {"psnr", "ssim", "nrmse"} <= set(rows.metric)
            assert {"train", "heldout", "rotated"} <= set(rows.split)
    # list-mode TOF MLEM of the quick simulated hot-rod acquisitions: the 6.5 mm rods reach a
    # contrast recovery above 0.5 within the configured iterations, at every CTR
    mlem = metrics[(metrics.experiment == "mlem") & (metrics.metric == "crc_6.5mm")]
    last = mlem[mlem.epoch == mlem.epoch.max()]
    assert sorted(last.ctr_ps) == [50.0, 100.0, 200.0]
    assert (last.value > 0.5).all(), last
    assert (last.value < 1.2).all(), last  # and not above what the truth allows (plus noise)
    brain_claims = pd.read_csv(results / "tables" / "paper_claims_brain.csv")
    assert brain_claims.claim_id.str.startswith(("denoise", "radon")).all()
    claims = pd.read_csv(results / "tables" / "paper_claims.csv")
    # the claims tables are the claims rules of equipet.study.claims applied to this run's own
    # inputs (the rules' run directories, metric files and MLEM timings), and each row's
    # verdict is the one the documented rule gives for its recorded n, seeds_met and reason
    brain_dirs = sorted(p.parent for e in ("denoise", "radon_recon") for p in (results / e).glob("*/seed*/loss.csv"))
    assisted_dirs = sorted(p.parent for p in (results / "assisted").glob("ctr*/*/*/seed*/loss.csv"))
    assert len(brain_dirs) == 8 and assisted_dirs, (brain_dirs, assisted_dirs)
    _assert_claims_from_inputs(brain_claims, workdir, [d / "metrics.csv" for d in brain_dirs], brain_dirs)
    baselines = sorted((results / "assisted").glob("ctr*/baselines.csv"))
    _assert_claims_from_inputs(claims, workdir, [d / "metrics.csv" for d in assisted_dirs] + baselines,
                               brain_dirs + assisted_dirs, sorted((results / "recon").glob("ctr*/timing.json")))
    brain_claims2 = pd.read_csv(results / "tables" / "paper_claims_brain_rules2.csv")
    claims2 = pd.read_csv(results / "tables" / "paper_claims_rules2.csv")
    _assert_claims_from_inputs(brain_claims2, workdir, [d / "metrics.csv" for d in brain_dirs], brain_dirs, rules=2)
    _assert_claims_from_inputs(claims2, workdir, [d / "metrics.csv" for d in assisted_dirs] + baselines,
                               brain_dirs + assisted_dirs, sorted((results / "recon").glob("ctr*/timing.json")), rules=2)
    assert (claims2.rules == 2).all() and (claims.rules == 1).all()
    assert set(claims2.claim_id) == set(claims.claim_id)       # the same claims, judged by both documents
    for table in (brain_claims, claims, brain_claims2, claims2):
        _assert_verdicts_follow_the_rules(table)
    # the quick run has 2 seeds: no claim on the networks rests on enough seeds to be decided
    # (only the MLEM iteration time has 3 values, its iterations)
    networks = claims[claims.claim_id != "assisted_mlem_iteration_time"]
    assert (networks.n <= 2).all() and (networks.verdict == "not comparable").all(), networks
    import torch

    if not torch.cuda.is_available():
        timed = claims[claims.claim_id.str.contains("time")]
        assert len(timed) and (timed.verdict == "not comparable").all(), timed
    for fig in ("denoise", "radon_recon", "group_action", "generalisation", "fig1_phantom",
                "assisted_crc_paper", "assisted_crc_poisson", "assisted_ctr100_paper", "assisted_ctr100_poisson"):
        assert (results / "figures" / f"{fig}.png").stat().st_size > 10_000, fig
    # every rule logged
    assert any((results / "logs").rglob("*.log"))

    report = results / "report.html"
    proc = _snakemake(workdir, "--cores", "1", "--configfile", "config/quick.yaml", "--report", str(report))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert report.stat().st_size > 50_000

    # nothing left to do: the run is complete and restartable
    proc = _snakemake(workdir, "-n", "--cores", "2", "--configfile", "config/quick.yaml")
    assert proc.returncode == 0
    assert "Nothing to be done" in proc.stdout + proc.stderr

    # a training setting changed reruns the assisted runs (params), not the central slice, its
    # system matrix or anything upstream; a slab setting does remake the slice
    (workdir / "train_change.yaml").write_text("assisted:\n  learning_rate: 0.0005\n")
    (workdir / "slab_change.yaml").write_text("assisted:\n  event_seed: 12\n")
    planned = {}
    for name in ("train_change.yaml", "slab_change.yaml"):
        proc = _snakemake(workdir, "-n", "--cores", "2", "--quiet", "rules", "--configfile", "config/quick.yaml", name)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        planned[name] = {line.split()[0] for line in proc.stdout.splitlines()
                         if line.strip() and line.split()[-1].isdigit() and line.split()[0] not in ("job", "total")}
    assert "assisted_train" in planned["train_change.yaml"]
    assert not planned["train_change.yaml"] & {"central_slice", "mlem", "simulate_job"}, planned
    assert {"central_slice", "assisted_train"} <= planned["slab_change.yaml"]


def _assert_claims_from_inputs(table: pd.DataFrame, workdir: Path, metric_files, run_dirs, mlem_timings=(),
                               rules: int = 1) -> None:
    """``table`` (as read from its CSV) is what :func:`equipet.study.claims.paper_claims` makes of
    these inputs under the quick config's plateau settings."""
    from equipet.study.claims import load_run, paper_claims
    from equipet.config import load_config

    config = load_config([workdir / "config" / "config.yaml", workdir / "config" / "quick.yaml"])
    metrics = pd.concat([pd.read_csv(f) for f in metric_files], ignore_index=True)
    expected = paper_claims(metrics, [load_run(d) for d in run_dirs], config["assisted"]["plateau"], mlem_timings,
                            rules=rules)
    expected = pd.read_csv(io.StringIO(expected.to_csv(index=False)))     # as written to the CSV
    pd.testing.assert_frame_equal(table, expected, check_exact=False, rtol=1e-9)


def _assert_verdicts_follow_the_rules(table: pd.DataFrame) -> None:
    """Each row's verdict is the one the rule of equipet.study.claims gives for its ``n`` seeds
    (pairs), ``seeds_met`` of them meeting the claim's rule, and its reason: a majority under the
    first pre-registration (``rules`` 1), every seed under the second (``rules`` 2)."""
    from equipet.study.claims import HELDOUT_TOLERANCE_DB, MIN_SEEDS

    assert table.verdict.isin(["reproduced", "not reproduced", "not comparable"]).all(), table.verdict
    for _, row in table.iterrows():
        assert 0 <= row.seeds_met <= row.n, row
        if row.n < MIN_SEEDS:                       # too few seeds (or no measurement): never decided
            assert row.verdict == "not comparable", row
        if row.verdict == "not comparable":
            assert isinstance(row.reason, str) and row.reason, row
            continue
        assert f"rule met in {row.seeds_met} of {row.n} seeds; mean {row.measured_mean:.4g} vs paper" in row.reason, row
        majority = row.seeds_met > row.n / 2 if row.rules == 1 else row.seeds_met == row.n
        heldout = re.search(r"held-out PSNR SCNN - CNN ([+-][0-9.]+) dB", row.reason)   # quoted to 0.01 dB
        if heldout and abs(float(heldout.group(1)) + HELDOUT_TOLERANCE_DB) <= 0.005:
            assert majority or row.verdict == "not reproduced", row                  # too close to tell
            continue
        heldout_ok = heldout is None or float(heldout.group(1)) >= -HELDOUT_TOLERANCE_DB
        assert row.verdict == ("reproduced" if majority and heldout_ok else "not reproduced"), row


def test_rules_run_the_commands_of_the_snakemake_environment(tmp_path):
    """Snakemake started by path from a venv that is not activated (its bin not on PATH)
    still runs the venv's equipet-* commands: common.smk puts sys.executable's directory
    first on the jobs' PATH. Without it the shell says `equipet-phantom: command not found`."""
    workdir = copy_checkout(tmp_path)
    (workdir / "results").mkdir()
    env_bin = str(Path(sys.executable).parent)
    bare = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep)
                           if p and Path(p).resolve() != Path(env_bin).resolve()) or "/usr/bin:/bin"
    assert not any(Path(p, "equipet-phantom").exists() for p in bare.split(os.pathsep))
    env = dict(os.environ, PATH=bare, MPLBACKEND="Agg",
               PYTHONPATH=os.pathsep.join([str(workdir / "workflow"), *filter(None, [os.environ.get("PYTHONPATH")])]))
    env.pop("VIRTUAL_ENV", None)
    proc = subprocess.run([sys.executable, "-m", "snakemake", "results/phantom/rods.csv", "--cores", "1",
                           "--configfile", "config/quick.yaml"], cwd=workdir, capture_output=True, text=True,
                          timeout=600, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "command not found" not in out
    assert (workdir / "results" / "phantom" / "rods.csv").stat().st_size > 0
