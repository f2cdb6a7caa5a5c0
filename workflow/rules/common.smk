# Shared helpers: config validation, result paths, and the settings passed to stages.
import json
import os
import re
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError

# Jobs run the equipet-* commands of the environment that runs Snakemake, activated or not
# (e.g. `.venv/bin/snakemake reconstruction`): its bin directory goes first on the PATH that
# shell commands of local jobs inherit, and that SLURM jobs inherit through sbatch
# (--export=ALL). sys.executable is not resolved: a venv's bin holds links to the base
# interpreter, and the venv's directory is the one with the commands.
_ENV_BIN = os.path.dirname(os.path.abspath(sys.executable))
if os.environ.get("PATH", "").split(os.pathsep)[0] != _ENV_BIN:
    os.environ.update(PATH=os.pathsep.join([_ENV_BIN, *filter(None, [os.environ.get("PATH")])]))

try:
    from equipet.study import ablation as ablation_study
    from equipet.config import validate
    from equipet.errors import ConfigError
except ImportError as exc:  # pragma: no cover - message for a broken install
    raise WorkflowError(
        f"cannot import the equipet package ({exc}); run scripts/setup.sh or "
        "'pip install -e .' in the environment that runs snakemake"
    )

_sources = [str(p) for p in (workflow.configfiles or ["config/config.yaml"])]
try:
    validate(config, source=" + ".join(_sources))
except ConfigError as exc:
    raise WorkflowError(f"invalid configuration:\n{exc}")

RESULTS = config["results_dir"]
LOGS = f"{RESULTS}/logs"
BENCH = f"{RESULTS}/benchmarks"
MODELS = ["cnn", "scnn"]
SEEDS = config["seeds"]
# threads of every training job (snakemake sets OMP_NUM_THREADS to it, which torch follows)
TRAINING_THREADS = config["training_threads"]
SIM = f"{RESULTS}/sim"
SIM_CTRS = config["acquisition"]["ctrs_ps"]
SIM_JOBS = list(range(config["acquisition"]["n_jobs"]))
SIM_BACKEND = config["acquisition"]["backend"]
RECON = f"{RESULTS}/recon"
RECON_CTRS = SIM_CTRS
MLEM_ITERATIONS = list(range(1, config["mlem"]["iterations"] + 1))
ASSISTED = f"{RESULTS}/assisted"
ASSISTED_CTRS = SIM_CTRS
ASSISTED_MLEM_ITERATIONS = MLEM_ITERATIONS
ASSISTED_METHODS = config["assisted"]["methods"]


wildcard_constraints:
    model="cnn|scnn",
    method="paper|poisson|poisson_full|l2",
    seed=r"\d+",
    experiment="denoise|radon_recon",
    ctr=r"\d+",
    job=r"\d+",
    it=r"\d+",


def settings(*sections, only=None):
    """JSON of the config sections a stage reads (with device and seeds), for --settings.

    Only the sections a rule uses enter its params, so changing one section
    reruns only the rules that read it. ``only`` maps a section to the keys of
    it the stage reads (the rest is left out), e.g. the central slice reads the
    slab and event settings of ``assisted`` but none of its training settings.
    """
    keys = ("device", "seeds", "results_dir") + sections
    chosen = {k: config[k] for k in keys}
    for section, subkeys in (only or {}).items():
        chosen[section] = {k: config[section][k] for k in subkeys}
    return json.dumps(chosen, sort_keys=True)


def slice_settings():
    """--settings of equipet-central-slice: the assisted keys it reads and no training setting,
    so that changing one (epochs, learning rate, gradient estimator, a method other than l2)
    does not remake the slice, its system matrix and with them every run of the CTR. Of
    ``assisted.methods`` only whether l2 is there matters to it (its Monte Carlo LORs)."""
    chosen = json.loads(settings("scanner", "phantom", "mlem", "assisted", only={"assisted": (
        "slice_index", "slice_voxels", "early_iterations", "event_seed", "max_events", "out_of_slice",
        "l2_mc_lors", "metrics", "methods")}))
    chosen["assisted"]["methods"] = [m for m in chosen["assisted"]["methods"] if m == "l2"]
    return json.dumps(chosen, sort_keys=True)

# equipet-claims as the claims rules call it (paper_claims adds the MLEM timings).
# The claims jobs write the verdicts of both pre-registrations, config/preregistration.md
# (rules 1, output.table) and config/preregistration_2.md (rules 2, output.rules2).
CLAIMS_SHELL = (
    "equipet-claims --settings {params.settings:q} --metrics {input.metrics} "
    "--runs {params.runs} --out {output.table} --log {log} {params.extra} && "
    "equipet-claims --settings {params.settings:q} --metrics {input.metrics} "
    "--runs {params.runs} --out {output.rules2} --log {log} --rules 2 {params.extra}"
)

# Every rule runs in the same software environment (used with --sdm conda).
CONDA_ENV = "../../envs/equipet.yaml"


# ---- final targets of each stage ----------------------------------------------

def brain_targets():
    return expand(
        f"{RESULTS}/{{experiment}}/{{model}}/seed{{seed}}/metrics.csv",
        experiment=["denoise", "radon_recon"],
        model=MODELS,
        seed=SEEDS,
    )


def brain_stage_targets():
    """Final outputs of the brain benchmarks (paper III-A/B): runs, Fig. 2, 3, 6, generalisation,
    and their claims (the same rules as paper_claims.csv, without waiting for the assisted runs)."""
    return brain_targets() + [
        f"{RESULTS}/figures/{name}.png"
        for name in ("denoise", "radon_recon", "group_action", "generalisation")
    ] + [f"{RESULTS}/tables/paper_claims_brain.csv", f"{RESULTS}/tables/paper_claims_brain_rules2.csv"]


def simulation_targets():
    """Final outputs of the simulation stage, for rule all."""
    return (
        expand(f"{SIM}/ctr{{ctr}}/coincidences.root", ctr=SIM_CTRS)
        + expand(f"{SIM}/ctr{{ctr}}/gate", ctr=SIM_CTRS)
        + [
            f"{RESULTS}/tables/counts.csv",
            f"{RESULTS}/figures/fig1_phantom.png",
            f"{RESULTS}/phantom/activity.nii.gz",
            f"{RESULTS}/phantom/mu.nii.gz",
        ]
    )


def reconstruction_targets():
    """Final outputs of the reconstruction stage, for rule all."""
    return (
        [f"{RECON}/sensitivity.nii.gz"]
        + expand(f"{RECON}/ctr{{ctr}}/mlem_it{{n}}.nii.gz", ctr=RECON_CTRS, n=MLEM_ITERATIONS)
        + expand(f"{RECON}/ctr{{ctr}}/metrics.csv", ctr=RECON_CTRS)
        + [f"{RESULTS}/tables/crc_blurred_truth.csv"]
    )


def assisted_run_dirs(ctr=None, method=None):
    """Run directories results/assisted/ctr{ctr}/{method}/{model}/seed{seed} (all CTRs and
    methods when None)."""
    ctrs = ASSISTED_CTRS if ctr is None else [ctr]
    methods = ASSISTED_METHODS if method is None else [method]
    return expand(
        f"{ASSISTED}/ctr{{ctr}}/{{method}}/{{model}}/seed{{seed}}",
        ctr=ctrs,
        method=methods,
        model=MODELS,
        seed=SEEDS,
    )


def assisted_metric_files():
    """Per-run assisted metrics and the per-CTR baselines (tidy; for the tables rule too)."""
    return [f"{d}/metrics.csv" for d in assisted_run_dirs()] + expand(
        f"{ASSISTED}/ctr{{ctr}}/baselines.csv", ctr=ASSISTED_CTRS
    )


def brain_run_dirs():
    return [str(Path(p).parent) for p in brain_targets()]


def assisted_targets():
    """Final outputs of the assisted-reconstruction stage, for rule all."""
    return (
        expand(
            f"{RESULTS}/figures/assisted_ctr{{ctr}}_{{method}}.png",
            ctr=ASSISTED_CTRS,
            method=ASSISTED_METHODS,
        )
        + expand(
            f"{RESULTS}/tables/assisted_summary_ctr{{ctr}}_{{method}}.csv",
            ctr=ASSISTED_CTRS,
            method=ASSISTED_METHODS,
        )
        + expand(f"{RESULTS}/figures/assisted_crc_{{method}}.png", method=ASSISTED_METHODS)
        + [
            f"{RESULTS}/tables/paper_claims.csv",
            f"{RESULTS}/tables/paper_claims_rules2.csv",
        ]
    )


def all_targets():
    return [
        f"{RESULTS}/tables/metrics.csv",
        f"{RESULTS}/tables/timing.csv",
        *brain_stage_targets(),
        *simulation_targets(),
        *reconstruction_targets(),
        *assisted_targets(),
    ]


# ---- the pre-registered ablation (workflow/rules/ablation.smk) ---------------------------

ABLATION = f"{RESULTS}/ablation"
ABLATION_CONFS = {c.name: c for c in ablation_study.configurations(config)}


def ablation_grid_dirs():
    return [str(ablation_study.grid_dir(RESULTS, e, c, s)) for e, c, s in ablation_study.grid_runs(config)]


def ablation_screen_dirs():
    return [str(ablation_study.grid_dir(RESULTS, e, c, s)) for e, c, s in ablation_study.screen_runs(config)]


def ablation_confirm_dirs():
    return [str(ablation_study.confirm_dir(RESULTS, e, m, s)) for e, m, s in ablation_study.confirm_runs(config)]


def ablation_run_dirs():
    return ablation_grid_dirs() + ablation_confirm_dirs()


def ablation_settings(name, experiment):
    """Settings of one grid run: the configuration's merged config, and only its own entry."""
    conf = ABLATION_CONFS[name]
    merged = ablation_study.configuration_config(config, conf)
    keys = ("device", "seeds", "results_dir", experiment, "models", "training", "evaluation")
    own = {**config["ablation"], "configurations": [c for c in config["ablation"]["configurations"]
                                                    if c["name"] == name]}
    return json.dumps({**{k: merged[k] for k in keys}, "ablation": own}, sort_keys=True)


def ablation_targets():
    """Final outputs of the ablation, for rule ablation."""
    return (
        [f"{d}/metrics.csv" for d in ablation_run_dirs()]
        + [
            f"{ABLATION}/selection.json",
            f"{RESULTS}/tables/ablation.csv",
            f"{RESULTS}/tables/ablation_metrics.csv",
            f"{RESULTS}/figures/ablation_loss.png",
            f"{RESULTS}/figures/ablation_quality.png",
            f"{RESULTS}/tables/paper_claims_brain.csv",
            f"{RESULTS}/tables/paper_claims_brain_rules2.csv",
        ]
    )
