"""The run-time estimate (equipet.study.estimate): its jobs are Snakemake's, its times scale with the config."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, copy_checkout
from equipet.commands.study.estimate import main as estimate_main
from equipet.study import estimate as est

DRY_RUN = """\
rule train_brain:
    input: resources/brain/brain.npz
    jobid: 3
    wildcards: experiment=denoise, model=cnn, seed=0
    threads: 2
    resources: tmpdir=/tmp, runtime=720, gpu=1, mem_mb=4000
[Mon Nov 30 22:11:13 2026]
localrule tables:
    jobid: 0
    resources: tmpdir=/tmp, mem_mb=1000
Job stats:
job            count
-----------  -------
train_brain        1
tables             1
total              2
"""


def test_parse_dry_run_reads_jobs_and_checks_the_job_stats():
    jobs, stats = est.parse_dry_run(DRY_RUN)
    assert [(j.rule, j.threads, j.gpu) for j in jobs] == [("train_brain", 2, True), ("tables", 1, False)]
    assert jobs[0].wildcards == {"experiment": "denoise", "model": "cnn", "seed": "0"}
    assert stats == {"train_brain": 1, "tables": 1}
    with pytest.raises(est.EquipetError, match="job-stats"):
        est.parse_dry_run(DRY_RUN.replace("tables             1\ntotal              2",
                                          "tables             2\ntotal              3"))


@pytest.fixture(scope="module")
def quick_estimate(tmp_path_factory):
    """equipet-estimate on the quick configuration in a fresh checkout (no results yet), on the CPU."""
    work = copy_checkout(tmp_path_factory.mktemp("estimate"))
    out = work / "estimate.json"
    estimate_main(["--configfile", "config/quick.yaml", "--device", "cpu", "--cores", "2",
              "--workdir", str(work), "--json", str(out)])
    return work, json.loads(out.read_text())


def test_quick_estimate_counts_the_jobs_of_the_configuration(quick_estimate, quick_config):
    work, result = quick_estimate
    stages = {s["name"]: s for s in result["stages"]}
    cfg = quick_config
    runs_per_method = len(cfg["acquisition"]["ctrs_ps"]) * 2 * len(cfg["seeds"])   # CTRs x models x seeds
    for method in cfg["assisted"]["methods"]:
        assert stages[f"assisted ({method})"]["jobs"] == runs_per_method
        assert stages[f"assisted ({method})"]["timed"] and stages[f"assisted ({method})"]["serial_s"] > 0
    assert stages["brain experiments"]["jobs"] == 2 * 2 * len(cfg["seeds"])             # experiments x models x seeds
    # every job of the dry run (checked there against Snakemake's job-stats table) is in one stage
    assert sum(s["jobs"] for s in result["stages"]) == len(result["jobs"])
    assert {j["rule"] for j in result["jobs"]} >= {"simulate_job", "sensitivity", "mlem", "central_slice"}
    assert stages["normalisation"]["jobs"] == 1 and stages["normalisation"]["serial_s"] > 0


def test_estimate_scales_with_the_configured_epochs(quick_estimate, quick_config):
    """Doubling assisted.epochs doubles the assisted stages, doubling the blank scan's decays and
    chord pairs doubles the normalisation, and nothing else changes; the brain stage follows
    denoise.epochs. (Same measured costs, so the comparison is exact.)"""
    work, result = quick_estimate
    costs = est.Costs.from_dict(result["costs"])
    jobs = [est.Job(**j) for j in result["jobs"]]
    # the work of each stage: its serial time less every job's process start
    work = lambda cfg: {s.name: s.serial_s - s.jobs * costs.job_start_s  # noqa: E731
                        for s in est.estimate(jobs, cfg, costs)}
    base = work(quick_config)
    assert base["assisted (paper)"] > 0
    longer = copy.deepcopy(quick_config)
    longer["assisted"]["epochs"] *= 2
    longer["denoise"]["epochs"] *= 3
    longer["mlem"]["normalisation"]["blank_decays"] *= 2
    longer["mlem"]["normalisation"]["chord_pairs"] *= 2
    doubled = work(longer)
    for name, seconds in base.items():
        if name.startswith("assisted") or name == "normalisation":
            assert doubled[name] == pytest.approx(2 * seconds, rel=1e-9)
        elif name != "brain experiments":
            assert doubled[name] == pytest.approx(seconds, rel=1e-9)
    denoise = sum(est.job_seconds(j, quick_config, costs) - costs.job_start_s for j in jobs
                  if j.rule == "train_brain" and j.wildcards["experiment"] == "denoise")
    assert doubled["brain experiments"] == pytest.approx(base["brain experiments"] + 2 * denoise, rel=1e-9)


def test_report_ends_with_the_quick_command(quick_estimate, quick_config):
    _, result = quick_estimate
    costs = est.Costs.from_dict(result["costs"])
    text = est.report([], costs, quick_config, ["config/quick.yaml"], 2)
    assert text.splitlines()[-1].endswith(est.QUICK_COMMAND)


def test_training_jobs_follow_training_threads_and_fewer_threads_count_longer(quick_estimate, quick_config):
    """The training rules' jobs have the config's ``training_threads`` (the quick config's 1); a
    training job's work, measured with the calibration's threads, counts as long again at half of
    them (ideal scaling), while a job of another rule keeps its measured time."""
    _, result = quick_estimate
    costs = est.Costs.from_dict(result["costs"])
    assert costs.torch_threads == 2
    trains = [j for j in result["jobs"] if j["rule"] in ("train_brain", "assisted_train")]
    assert trains and {j["threads"] for j in trains} == {quick_config["training_threads"]} == {1}
    assert {j["threads"] for j in result["jobs"] if j["rule"] == "mlem"} == {2}

    def work(rule, wildcards, threads):
        return est.job_seconds(est.Job(rule, wildcards, threads, True), quick_config, costs) - costs.job_start_s

    brain = {"experiment": "denoise", "model": "scnn", "seed": "0"}
    assisted = {"ctr": "100", "method": "poisson", "model": "cnn", "seed": "0"}
    for rule, wildcards in (("train_brain", brain), ("assisted_train", assisted)):
        assert work(rule, wildcards, 2) > 0
        assert work(rule, wildcards, 1) == pytest.approx(2 * work(rule, wildcards, 2), rel=1e-12)
    assert work("simulate_job", {"ctr": "100", "job": "0"}, 1) == work("simulate_job", {"ctr": "100", "job": "0"}, 2) > 0


def test_the_default_workdir_is_the_repository():
    """Without --workdir the estimate reads this checkout's Snakefile and config/config.yaml."""
    assert est.REPO == REPO and (est.REPO / "Snakefile").is_file()
    assert est.load_run_config(["config/quick.yaml"])["seeds"] == [0, 1]


def test_bootstrap_prints_the_estimate_of_the_run(quick_estimate):
    """`bootstrap.sh estimate` -- the step `bootstrap.sh run` takes before Snakemake, with the
    Snakemake arguments it is given -- prints the estimate of those configfiles and cores, with
    the quick dry run's jobs, and no warning that it failed."""
    venv = Path(sys.prefix)
    if not (venv / ".equipet-installed").is_file():
        pytest.skip(f"pytest does not run from a virtualenv bootstrap.sh made ({venv})")
    proc = subprocess.run(["bash", str(REPO / "workflow" / "bootstrap.sh"), "estimate", "--configfile",
                           "config/quick.yaml", "--cores", "2", "--rerun-incomplete"],
                          capture_output=True, text=True, timeout=600, env=dict(os.environ, EQUIPET_VENV=str(venv)))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "estimate failed" not in out and "error" not in out.lower(), out
    assert "time estimate for config/config.yaml + config/quick.yaml" in out and "2 CPU cores" in out, out
    jobs = re.search(r"^expected wall time on this machine: about .+ \((\d+) jobs\)\.$", out, re.M)
    assert jobs and int(jobs[1]) == len(quick_estimate[1]["jobs"]), out
