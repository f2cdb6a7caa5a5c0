"""The workflow on a real (one-node, loopback) SLURM cluster, with the SLURM profile.

A session fixture installs (apt-get, when missing and root) and starts Debian's munge,
slurmctld and slurmd through workflow/slurm/local_cluster.sh, in a private directory with
its own slurm.conf (SLURM_CONF), and stops them at the end. The tests skip -- saying why --
only when SLURM cannot be installed or run here (not root and no passwordless sudo, or no
apt-get); any other failure to start the cluster fails them.

1. The quick config runs with ``--profile workflow/profiles/slurm`` (executor slurm), cut to one
   seed and one CTR, in a checkout that already holds the local run's outputs of the rules made
   once per scanner and image grid, not per CTR or seed (SEEDED_FROM_LOCAL_RUN: brain image,
   normalisation, sensitivity, and the CTR's PSF, which feeds only a table): the local run tests
   those, and the cut run spends its time on the per-CTR chain (simulation, merge, MLEM, central
   slice, assisted training) and the brain trainings, which still include 1- and 2-CPU jobs, GPU
   and non-GPU jobs. Every job Snakemake did not run locally went through sbatch (an sbatch
   wrapper first on PATH records each call) and ran as a SLURM job (``squeue --states=all``,
   rule in the job comment) that COMPLETED; no local rule was submitted; the jobs per rule are
   those of the dry run. The reference is the session's local run of the whole quick config (the
   ``quick_run`` fixture the workflow test checks, run once for both): the SLURM run writes a
   subset of its files, and every CSV equals the local run's within RTOL (the CPU training is
   deterministic per seed, and each run's outputs depend on its own seed and CTR alone); the
   tables that gather all runs are compared row by row after the local run's rows of the seeds
   and CTRs the cut config leaves out are dropped, except those that average over the seeds
   (SEED_AGGREGATES), which the cut run computes from other inputs. In that run one training job
   exits non-zero once (its first attempt, injected into the copy's rule): the profile's
   ``retries: 1`` resubmits it, and its numbers are the local run's like every other job's.
2. Fault: a training job is killed mid-run with ``scancel``. With ``--retries 0`` the run
   fails and leaves none of its outputs; the documented command then reruns it, the job is
   killed again, resubmitted by the profile's ``retries: 1``, and completes with the
   local run's numbers.

The test cluster declares one GPU GRES per CPU (device files, ``AutoDetect=off``; no GPU
behind them), so rules with ``gpu: 1`` are submitted with ``sbatch --gpus=1`` unchanged
(checked), run as many at once as the node has CPUs, and train on the CPU (``device: auto``).
Runs cap ``mem_mb`` at the node's memory. With
``EQUIPET_REQUIRE_SLURM=1`` (set by ``.ci/run``) a SLURM that cannot be installed fails the
tests instead of skipping them.
It has no accounting database either, so job status comes from ``squeue``
(``--slurm-status-command squeue``; the cluster keeps finished jobs for an hour). Snakemake runs
through tests/snakemake_fixed_polling.py, which checks job states every 2 s without the SLURM
plugin's back-off (+10 s per check in which no job finished): on this cluster the back-off only
adds idle time between dependent jobs.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import copy_checkout, pinned_env

pytestmark = [pytest.mark.slurm, pytest.mark.workflow, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "workflow" / "slurm" / "local_cluster.sh"
# snakemake, with the SLURM executor checking job states every --seconds-between-status-checks
# (no back-off; see the module it runs).
SNAKEMAKE = [sys.executable, str(Path(__file__).with_name("snakemake_fixed_polling.py"))]
# The quick config cut to one seed and one CTR: the per-CTR and per-seed rules still run
# (simulation, MLEM, central slice, both assisted methods, brain training, aggregation), in
# about a third of the jobs, so that a one-node, 2-CPU cluster stays within the time limits.
CUT_SEEDS, CUT_CTRS = [0], [100]
SLURM_TEST_CONFIG = f"seeds: {CUT_SEEDS}\nacquisition:\n  ctrs_ps: {CUT_CTRS}\n"
# Outputs of the local quick run copied (with their times) into the cut run's checkout, so that
# their rules are not planned: the brain image, the blank-scan normalisation and the sensitivity
# image (made once per scanner and image grid; together about 45 s of the 2 CPUs) and the cut
# CTR's PSF (it feeds only the blurred-truth table). Their rules run in the local run.
SEEDED_FROM_LOCAL_RUN = {
    "brain": ["resources/brain/brain.npz", "resources/brain/brain.png"],
    "normalisation": ["results/recon/normalisation.json"],
    "sensitivity": ["results/recon/sensitivity.nii.gz", "results/recon/sensitivity.json"],
    "psf": [f"results/recon/ctr{CUT_CTRS[0]}/psf.json"],
}
# Rules that must still run as SLURM jobs in the cut run: 1- and 2-CPU jobs, GPU (`gpu: 1`) and
# CPU-only ones, and the chain from the simulation to the assisted training.
MUST_RUN_ON_SLURM = {"phantom_truth", "gate_macros", "simulate_job", "merge_sim", "mlem",
                     "recon_metrics", "central_slice", "crc_blurred_truth", "assisted_train",
                     "train_brain"}
# Tables of results/tables/ that average over the seeds (seed means and SDs, claims decided
# over seeds): the cut run's differ from the full quick run's by design. Every input they
# are made of is compared, and the workflow test checks them against their rules.
SEED_AGGREGATES = re.compile(r"^tables/(assisted_summary_|paper_claims)")
QUICK = ["--configfile", "config/quick.yaml", "slurm_test.yaml"]
# The metrics of a SLURM run and a local run must agree to this (relative and absolute)
# tolerance. Same code, same seeds, same CPU and thread count: in practice they are equal.
RTOL = 1e-6
ATOL = 1e-9
# The training run the fault test kills.
FAULT_RUN = "radon_recon/scnn/seed0"


def _free_port_pair() -> int:
    for port in range(16817, 17817, 2):
        try:
            for p in (port, port + 1):
                with socket.socket() as s:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    s.bind(("127.0.0.1", p))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port pair for slurmctld/slurmd")


@pytest.fixture(scope="session")
def slurm(tmp_path_factory) -> dict:
    """Start the local cluster; yield the environment for snakemake and the SLURM clients."""
    state = tmp_path_factory.mktemp("slurm")
    env = dict(os.environ, EQUIPET_SLURM_DIR=str(state), EQUIPET_SLURM_PORT=str(_free_port_pair()))
    proc = subprocess.run(["bash", str(CLUSTER), "start"], env=env, capture_output=True, text=True,
                          timeout=900)
    if proc.returncode == 3:
        if os.environ.get("EQUIPET_REQUIRE_SLURM") == "1":
            pytest.fail(f"EQUIPET_REQUIRE_SLURM=1 but SLURM cannot be installed here: {proc.stderr.strip()}")
        pytest.skip(f"SLURM cannot be installed here: {proc.stderr.strip()}")
    assert proc.returncode == 0, f"local SLURM cluster did not start:\n{proc.stdout}{proc.stderr}"

    # an sbatch wrapper first on PATH records every submission, then hands it to sbatch
    real_sbatch = shutil.which("sbatch")
    wrapper_dir = state / "bin"
    wrapper_dir.mkdir()
    sbatch_log = state / "sbatch-calls.log"
    (wrapper_dir / "sbatch").write_text(
        "#!/bin/sh\n"
        f"printf '%s\\n' \"$*\" >> '{sbatch_log}'\n"
        f"exec '{real_sbatch}' \"$@\"\n"
    )
    (wrapper_dir / "sbatch").chmod(0o755)
    env.update(
        SLURM_CONF=str(state / "slurm.conf"),
        # the venv first, so that jobs find python, snakemake and the equipet commands
        PATH=os.pathsep.join([str(wrapper_dir), str(Path(sys.executable).parent), env["PATH"]]),
        MPLBACKEND="Agg",
        PYTHONUNBUFFERED="1",
    )
    partition = subprocess.run(["sinfo", "-h", "-o", "%P"], env=env, capture_output=True,
                               text=True, check=True).stdout.split()[0].rstrip("*")
    yield {"env": env, "state": state, "sbatch_log": sbatch_log, "partition": partition}
    subprocess.run(["bash", str(CLUSTER), "stop"], env=env, capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory) -> Path:
    """One copy of the checkout; every run below starts from a copy of it.

    (Runs never touch the developer's results/ or resources/, and all of them see the same
    workflow even while the checkout is being edited.)
    """
    return copy_checkout(tmp_path_factory.mktemp("checkout"))


def _copy_checkout(snapshot: Path, dst: Path) -> Path:
    shutil.copytree(snapshot, dst, dirs_exist_ok=True)
    (dst / "results").mkdir()
    (dst / "slurm_test.yaml").write_text(SLURM_TEST_CONFIG)
    return dst


def _slurm_args(slurm: dict, *extra: str) -> list[str]:
    """The documented command, plus what this CPU-only, accounting-free test cluster needs.

    (Targets go before these: --set-resources takes every word after it.)
    """
    return [
        "--profile", "workflow/profiles/slurm", *QUICK,
        "--default-resources", f"slurm_partition={slurm['partition']}",
        "--slurm-status-command", "squeue",
        "--slurm-init-seconds-before-status-checks", "2",
        "--seconds-between-status-checks", "2",
        "--slurm-keep-successful-logs",
        *extra,
    ]


def _run(workdir: Path, args: list[str], env: dict, log: Path, timeout: int = 1800):
    env = pinned_env(env, workdir)
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.run([*SNAKEMAKE, *args], cwd=workdir, env=env, stdout=out,
                              stderr=subprocess.STDOUT, text=True, timeout=timeout)
    return proc.returncode, time.perf_counter() - start, log.read_text()


def _run_id(log_text: str) -> str:
    found = re.findall(r"SLURM run ID: (\S+)", log_text)
    assert len(found) == 1, "no SLURM run ID in the snakemake log"
    return found[0]


def _slurm_jobs(env: dict, run_id: str) -> pd.DataFrame:
    """Every SLURM job of a snakemake run (job name = run ID): id, state, rule, wildcards."""
    out = subprocess.run(["squeue", "--states=all", "--noheader", "--name", run_id,
                          "--format=%i|%T|%k"], env=env, capture_output=True, text=True,
                         check=True).stdout
    rows = []
    for line in out.splitlines():
        jobid, state, comment = line.split("|", 2)
        rule, _, wildcards = comment.removeprefix("rule_").partition("_wildcards_")
        rows.append({"jobid": int(jobid), "state": state, "rule": rule, "wildcards": wildcards})
    return pd.DataFrame(rows, columns=["jobid", "state", "rule", "wildcards"])


def _sbatch_calls(slurm: dict, run_id: str) -> list[str]:
    """Rules of the sbatch calls of a run, from the wrapper's log."""
    rules = []
    for line in slurm["sbatch_log"].read_text().splitlines():
        if f"--job-name {run_id} " in line:
            comment = re.search(r"--comment '?rule_(\S+?)'?\s", line).group(1)
            rules.append(comment.partition("_wildcards_")[0])
    return rules


def _plan(workdir: Path, env: dict, *targets: str) -> dict[str, dict]:
    """Per rule: the jobs a run would execute and their resources (from a dry run)."""
    proc = subprocess.run([*SNAKEMAKE, *targets, "-n", "--cores", "2", *QUICK], cwd=workdir,
                          env=pinned_env(env, workdir), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    plan: dict[str, dict] = {}
    for block in re.split(r"^(?=rule \w+:$)", proc.stdout + proc.stderr, flags=re.M)[1:]:
        rule = re.match(r"rule (\w+):", block)[1]
        entry = plan.setdefault(rule, {"jobs": 0, "gpu": 0, "mem_mb": 0})
        entry["jobs"] += 1
        res = re.search(r"^\s+resources: (.*)$", block, re.M)
        res = dict(kv.split("=", 1) for kv in res[1].split(", ")) if res else {}
        for key in ("gpu", "mem_mb"):
            if res.get(key, "").isdigit():
                entry[key] = max(entry[key], int(res[key]))
    return plan


def _test_cluster_overrides(plan: dict[str, dict], slurm: dict) -> list[str]:
    """--set-resources for what this small test node cannot give: memory above its RealMemory.

    GPU requests stay as the rules make them (`sbatch --gpus=1`): the node declares a GPU GRES.
    """
    node_mem = int(subprocess.run(["sinfo", "-h", "-o", "%m"], env=slurm["env"], check=True,
                                  capture_output=True, text=True).stdout.split()[0].rstrip("+"))
    sets = [f"{r}:mem_mb={node_mem}" for r, e in sorted(plan.items()) if e["mem_mb"] > node_mem]
    return ["--set-resources", *sets] if sets else []


def _sbatch_lines(slurm: dict, run_id: str, rule: str) -> list[str]:
    return [line for line in slurm["sbatch_log"].read_text().splitlines()
            if f"--job-name {run_id} " in line and re.search(rf"rule_{rule}(_wildcards|\W)", line)]


def _ran(log_text: str) -> tuple[dict[str, int], dict[str, int]]:
    """Jobs per rule that snakemake finished, and those it ran itself as local jobs.

    Snakemake prints a 'localrule X:' header for each job it runs locally; jobs it hands to
    the executor get none (the plugin logs the sbatch submission instead).
    """
    finished: dict[str, int] = {}
    local: dict[str, int] = {}
    for m in re.finditer(r"^Finished jobid: \d+ \(Rule: (\w+)\)", log_text, re.M):
        finished[m[1]] = finished.get(m[1], 0) + 1
    for m in re.finditer(r"^localrule (\w+):$", log_text, re.M):
        local[m[1]] = local.get(m[1], 0) + 1
    return finished, local


def _tables(results: Path) -> list[str]:
    """The CSV outputs to compare between runs: all but logs, benchmarks and timings."""
    return sorted(
        str(p.relative_to(results)) for p in results.rglob("*.csv")
        if not {"logs", "benchmarks"} & set(p.relative_to(results).parts) and "timing" not in p.name
    )


# Wall-clock quantities differ between any two runs: columns (wall_time_s, s_per_epoch_mean)
# and tidy rows (metric total_time_s, timing claims) whose name matches are not compared.
WALL_CLOCK = re.compile(r"time|per_epoch", re.IGNORECASE)


def _without_timings(df: pd.DataFrame) -> pd.DataFrame:
    df = df[[c for c in df.columns if not WALL_CLOCK.search(c)]]
    text = df.select_dtypes(exclude="number").astype(str)
    timed = text.apply(lambda col: col.str.contains(WALL_CLOCK)).any(axis=1)
    return df[~timed].reset_index(drop=True)


def _assert_same_frames(a: pd.DataFrame, b: pd.DataFrame, name: str) -> None:
    """Same rows; numbers within RTOL/ATOL, everything else equal; wall-clock columns skipped."""
    a, b = _without_timings(a), _without_timings(b)
    assert list(a.columns) == list(b.columns) and len(a) == len(b), (name, a.shape, b.shape)
    keys = [c for c in a.columns if not pd.api.types.is_float_dtype(a[c])]
    if keys:
        a = a.sort_values(keys, kind="stable").reset_index(drop=True)
        b = b.sort_values(keys, kind="stable").reset_index(drop=True)
    for col in a.columns:
        if pd.api.types.is_float_dtype(a[col]):
            close = np.isclose(a[col], b[col], rtol=RTOL, atol=ATOL, equal_nan=True)
            assert close.all(), f"{name}: {col} differs beyond rtol={RTOL}:\n{a[~close]}\n{b[~close]}"
        else:
            assert (a[col].astype(str) == b[col].astype(str)).all(), f"{name}: {col} differs"


def _assert_same_tables(got: Path, want: Path, names: list[str]) -> None:
    """Each named CSV under ``got`` equals the one under ``want`` (see _assert_same_frames)."""
    assert names, f"nothing to compare under {got}"
    for name in names:
        _assert_same_frames(pd.read_csv(got / name), pd.read_csv(want / name), name)


def _left_out_values(quick_config: dict) -> dict[str, set]:
    """The seeds and CTRs of the full quick run that the cut config leaves out, by table column."""
    return {"seed": set(quick_config["seeds"]) - set(CUT_SEEDS),
            "ctr_ps": set(quick_config["acquisition"]["ctrs_ps"]) - set(CUT_CTRS)}


def _without_left_out_runs(df: pd.DataFrame, quick_config: dict) -> pd.DataFrame:
    """The rows of a gathered table of the full quick run that the cut config also makes: those
    of the seeds and CTRs it leaves out are dropped (rows without a seed or CTR, or with the
    acquisition's seed, stay)."""
    keep = np.ones(len(df), dtype=bool)
    for col, values in _left_out_values(quick_config).items():
        if col in df.columns:
            keep &= ~df[col].isin(values)
    return df[keep].reset_index(drop=True)


def _outputs(results: Path) -> set[str]:
    """The files a run wrote, less logs and benchmarks (and the report, which `--report` makes
    afterwards, not the run)."""
    return {str(p.relative_to(results)) for p in results.rglob("*") if p.is_file()
            and not {"logs", "benchmarks"} & set(p.relative_to(results).parts) and p.name != "report.html"}


def _left_out(path: str, quick_config: dict) -> bool:
    """Whether an output path of the full quick run belongs to a seed or CTR the cut config leaves
    out (``.../seed1/...``, ``ctr50/``, ``..._ctr200_...``)."""
    left_out = _left_out_values(quick_config)
    words = [f"seed{s}" for s in left_out["seed"]] + [f"ctr{c:g}" for c in left_out["ctr_ps"]]
    return any(re.search(rf"(?:^|[/_]){w}(?=[/_.]|$)", path) for w in words)


def _assert_same_as_full_quick_run(results: Path, full: Path, quick_config: dict) -> list[str]:
    """The cut config's CSVs under ``results`` equal the full quick run's: per-run files as they
    are, gathered tables less the left-out seeds' and CTRs' rows, seed aggregates skipped.
    Returns the names compared."""
    names = _tables(results)
    assert names, f"nothing to compare under {results}"
    assert set(names) <= set(_tables(full)), set(names) - set(_tables(full))
    compared = []
    for name in names:
        if SEED_AGGREGATES.match(name):
            continue
        want = pd.read_csv(full / name)
        if name.startswith("tables/"):
            want = _without_left_out_runs(want, quick_config)
        _assert_same_frames(pd.read_csv(results / name), want, name)
        compared.append(name)
    assert any(n.startswith("tables/") for n in compared) and any(n.startswith("assisted/") for n in compared)
    return compared


def _fail_first_training_once(workdir: Path) -> Path:
    """Make the copy's first train_brain job exit with status 3 before it writes anything.

    A shell prefix in the copy's rule creates a marker directory and exits 3 when it could: mkdir
    is atomic, so of training jobs that start at the same moment exactly one fails, once, and its
    retry (the marker now there) trains. Returns the marker.
    """
    marker = workdir / "failed-once"
    rules = workdir / "workflow" / "rules" / "brain.smk"
    text = rules.read_text()
    head = '        "{params.command} --settings {params.settings:q} --brain {input.brain} "'
    assert head in text
    rules.write_text(text.replace(head, f'        "mkdir {marker} 2>/dev/null && exit 3; "\n' + head))
    return marker


def _seed_from_local_run(workdir: Path, quick_run: dict, rules=tuple(SEEDED_FROM_LOCAL_RUN)) -> None:
    """Copy the outputs of ``rules`` (SEEDED_FROM_LOCAL_RUN) from the local run into ``workdir``,
    modification times kept (so that Snakemake sees them up to date and plans none of those rules)."""
    for rule in rules:
        for rel in SEEDED_FROM_LOCAL_RUN[rule]:
            (workdir / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(quick_run["workdir"] / rel, workdir / rel)


def test_quick_config_on_slurm(slurm, snapshot, quick_run, quick_config, tmp_path_factory):
    workdir = _copy_checkout(snapshot, tmp_path_factory.mktemp("on_slurm"))
    env = slurm["env"]
    _seed_from_local_run(workdir, quick_run)
    plan = _plan(workdir, env)
    assert not set(plan) & set(SEEDED_FROM_LOCAL_RUN), plan
    assert MUST_RUN_ON_SLURM <= set(plan), MUST_RUN_ON_SLURM - set(plan)
    marker = _fail_first_training_once(workdir)
    args = _slurm_args(slurm, *_test_cluster_overrides(plan, slurm))

    rc, wall, log = _run(workdir, args, env, workdir / "snakemake.log")
    assert rc == 0, log[-8000:]
    print(f"\nquick config, SLURM run (one 2-CPU node): {wall:.0f} s "
          f"(local run: {quick_run['wall']:.0f} s)")
    run_id = _run_id(log)

    # snakemake ran exactly the planned jobs; which of them are local is its decision
    # (rules with `localrule: True`, and `all`); all others are the non-local jobs
    finished, local = _ran(log)
    assert finished == {rule: e["jobs"] for rule, e in plan.items()}, (finished, plan)
    remote = {rule: n - local.get(rule, 0) for rule, n in finished.items() if n > local.get(rule, 0)}
    assert remote.get("train_brain") == plan["train_brain"]["jobs"], "training runs as SLURM jobs"
    assert MUST_RUN_ON_SLURM <= set(remote), MUST_RUN_ON_SLURM - set(remote)
    assert "tables" in local, "aggregation rules are local rules"

    # every non-local job went through sbatch, the training that failed once twice ...
    attempts = {**remote, "train_brain": remote["train_brain"] + 1}
    submitted = _sbatch_calls(slurm, run_id)
    assert sorted(submitted) == sorted(r for r, n in attempts.items() for _ in range(n)), submitted
    # ... and ran as a SLURM job that completed, but for the injected failure, which the profile's
    # `retries: 1` resubmitted; no local rule was submitted
    jobs = _slurm_jobs(env, run_id)
    assert jobs.rule.value_counts().to_dict() == attempts, jobs
    failed = jobs[jobs.state != "COMPLETED"]
    assert list(failed.rule) == ["train_brain"] and list(failed.state) == ["FAILED"], jobs
    assert marker.exists() and "Trying to restart job" in log
    retried = jobs[(jobs.wildcards == failed.wildcards.iloc[0]) & (jobs.state == "COMPLETED")]
    assert len(retried) == 1 and retried.jobid.iloc[0] > failed.jobid.iloc[0], jobs
    assert not set(jobs.rule) & set(local), jobs
    # GPU rules went through `sbatch --gpus=1` unchanged, and ran on the node's GPU GRES
    gpu_rules = [r for r, e in plan.items() if e["gpu"]]
    assert "train_brain" in gpu_rules
    for rule in gpu_rules:
        lines = _sbatch_lines(slurm, run_id, rule)
        assert lines and all(re.search(r"--gpus[= ]1\b", line) for line in lines), lines
    print(f"SLURM jobs: {len(jobs)} ({dict(jobs.rule.value_counts())}); "
          f"local jobs: {sum(local.values())} ({local})")

    # the outputs: the local quick run's files less those of the left-out seeds and CTRs, and
    # the same numbers
    results = workdir / "results"
    compared = _assert_same_as_full_quick_run(results, quick_run["results"], quick_config)
    print(f"equal to the local run (rtol={RTOL}): {', '.join(compared)}")
    assert _outputs(results) == {p for p in _outputs(quick_run["results"]) if not _left_out(p, quick_config)}

    proc = subprocess.run([*SNAKEMAKE, "-n", *args], cwd=workdir, env=pinned_env(env, workdir),
                          capture_output=True, text=True, timeout=300)
    assert "Nothing to be done" in proc.stdout + proc.stderr, proc.stdout + proc.stderr


def _start_and_scancel(workdir: Path, slurm: dict, args: list[str], log: Path):
    """Start a run of FAULT_RUN; scancel its training job while it trains.

    A quick-config training can take as little as a second or two, so the rule's log is
    polled every 0.1 s and the job is cancelled as soon as it reports that training began;
    the callers check that SLURM recorded the job as CANCELLED (not COMPLETED).
    """
    env = slurm["env"]
    target = f"results/{FAULT_RUN}/metrics.csv"
    train_log = workdir / "results" / "logs" / f"{FAULT_RUN.replace('/seed', '_seed')}.log"
    out = open(log, "w")
    start = time.perf_counter()
    proc = subprocess.Popen([*SNAKEMAKE, target, *args], cwd=workdir, env=pinned_env(env, workdir), stdout=out,
                            stderr=subprocess.STDOUT, text=True)
    seen = train_log.stat().st_size if train_log.exists() else 0  # a log of an earlier run
    killed = None
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None:
            text = train_log.read_text() if train_log.exists() else ""
            if len(text) < seen:  # the log was started afresh
                seen = 0
            if "training" in text[seen:] and "SLURM run ID" in log.read_text():
                jobs = _slurm_jobs(env, _run_id(log.read_text()))
                running = jobs[(jobs.rule == "train_brain") & (jobs.state == "RUNNING")]
                assert len(running) == 1, jobs
                killed = int(running.jobid.iloc[0])
                subprocess.run(["scancel", str(killed)], env=env, check=True)
                assert not (workdir / target).exists(), "the job finished before it was cancelled"
                break
            time.sleep(0.1)
        assert killed is not None, "the training job never ran:\n" + log.read_text()[-4000:]
        rc = proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
        out.close()
    return rc, time.perf_counter() - start, log.read_text(), killed


def _job_processes(workdir: Path) -> list[str]:
    """Command lines of snakemake job steps still running for this checkout."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            cmd = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if f"{workdir}/Snakefile" in cmd and "slurm-jobstep" in cmd:
            found.append(cmd)
    return found


def _assert_job_gone(workdir: Path) -> None:
    """scancel ends the whole job: no job step of it outlives the job."""
    for _ in range(30):
        if not _job_processes(workdir):
            return
        time.sleep(1)
    raise AssertionError(f"a cancelled job left processes behind: {_job_processes(workdir)}")


def _fault_workdir(snapshot: Path, quick_run: dict, dst: Path) -> Path:
    """A checkout for the fault test, with the brain image of the local run already there.

    (Only the training job is then planned and killed; that saves a brain job per run.)
    """
    workdir = _copy_checkout(snapshot, dst)
    _seed_from_local_run(workdir, quick_run, ["brain"])
    return workdir


def _fault_args(workdir: Path, slurm: dict) -> list[str]:
    target = f"results/{FAULT_RUN}/metrics.csv"
    plan = _plan(workdir, slurm["env"], target)
    assert plan.keys() == {"train_brain"} and plan["train_brain"]["jobs"] == 1, plan
    return _slurm_args(slurm, *_test_cluster_overrides(plan, slurm))


def test_scancel_mid_run_rerun_and_retry(slurm, snapshot, quick_run, tmp_path_factory):
    """A training job killed with scancel mid-run: rerun, and retry, both complete the outputs.

    1. With `--retries 0` the cancelled job fails the run, and nothing of it is left.
    2. The documented command (the profile: `retries: 1`, `rerun-incomplete`) reruns it; its
       job is cancelled again mid-run, resubmitted by the retry, and completes.
    """
    workdir = _fault_workdir(snapshot, quick_run, tmp_path_factory.mktemp("scancel"))
    out = workdir / "results" / FAULT_RUN

    args = _fault_args(workdir, slurm)
    rc, wall1, log, killed = _start_and_scancel(workdir, slurm, [*args, "--retries", "0"],
                                                workdir / "snakemake-1.log")
    assert rc != 0, "the run must fail when its job is cancelled and retries are off"
    first = _slurm_jobs(slurm["env"], _run_id(log)).set_index("jobid").state
    assert first.loc[killed] == "CANCELLED" and len(first) == 1, first
    assert not (out / "metrics.csv").exists()
    assert not (out / "eval.npz").exists(), "an output of the cancelled job was left behind"
    _assert_job_gone(workdir)

    rc, wall2, log, killed = _start_and_scancel(workdir, slurm, args,
                                                workdir / "snakemake-2.log")
    assert rc == 0, log[-8000:]
    print(f"\nscancel, run fails ({FAULT_RUN}): {wall1:.0f} s; "
          f"rerun, scancel again, retry completes: {wall2:.0f} s")
    jobs = _slurm_jobs(slurm["env"], _run_id(log))
    train = jobs[jobs.rule == "train_brain"].set_index("jobid").state
    assert len(jobs) == len(train) == 2, jobs
    assert train.loc[killed] == "CANCELLED" and (train.drop(killed) == "COMPLETED").all(), jobs
    assert "Trying to restart job" in log
    _assert_job_gone(workdir)
    for name in ("metrics.csv", "loss.csv", "timing.json", "eval.npz"):
        assert (out / name).stat().st_size > 0, name
    _assert_same_tables(workdir / "results", quick_run["results"],
                        [f"{FAULT_RUN}/metrics.csv", f"{FAULT_RUN}/loss.csv"])
