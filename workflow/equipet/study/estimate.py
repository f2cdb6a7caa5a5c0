"""How long a workflow run will take on this machine, before it starts.

``equipet-estimate [--configfile a.yaml b.yaml] [--device auto|cpu|cuda] [--cores N]``
(``workflow/bootstrap.sh run`` calls it before Snakemake) prints, for the chosen configuration:
the jobs Snakemake would run, per stage; each stage's time per job and its serial total; and the
expected wall time on this machine. The costs are measured here, in a short calibration on the
chosen device (about 10 to 30 s), and scaled by the configuration:

* **jobs**: parsed from ``snakemake -n --nolock`` with the same config files (one entry per job,
  with its rule, wildcards and threads, checked against Snakemake's job-stats table). These are
  the jobs still to run: outputs already in ``results/`` are not counted again.
* **brain experiments** (``train_brain``): ``epochs x t_epoch(experiment, model)``, with
  ``t_epoch`` the median time of a training epoch (:func:`equipet.networks.training.seconds_per_epoch`)
  of the network of ``models`` on a ``brain.size`` image, with the denoising MSE loss or the
  Radon loss over ``radon_recon.n_angles`` angles. The evaluation after training is not counted.
* **simulation** (``simulate_job``, builtin backend): ``A T / (J r_MC)`` for activity ``A`` (Bq,
  ``acquisition.activity_scale`` applied), duration ``T``, ``J = acquisition.n_jobs`` jobs and
  ``r_MC`` the decays per second of the embedded Monte Carlo (:class:`equipet.simulation.montecarlo.Simulator`)
  measured on a short acquisition of the same phantom and scanner. The same short acquisition
  gives the events per decay: those ``mlem.events`` selects whose LOR crosses the image box
  (MLEM), and those crossing the assisted slice (the rule of :mod:`equipet.assisted.central_slice`).
  GATE jobs (``backend: gate``) are not estimated.
* **normalisation**: ``blank_decays / r_blank + chord_pairs / r_chord``
  (``mlem.normalisation``): ``r_blank`` the decays per second of the blank scan (the embedded Monte
  Carlo on the uniform cylinder in air, :class:`equipet.reconstruction.normalisation.BlankScan`) and ``r_chord``
  the element pairs per second of :func:`equipet.reconstruction.normalisation.class_pair_chords`, both measured
  on small samples.
* **sensitivity**: ``mlem.sensitivity_lors / r_sens``, ``r_sens`` the LORs per second of
  :func:`equipet.reconstruction.mlem.sensitivity_image` on a small sample (its fixed cost included).
* **MLEM** (per CTR): ``iterations x N x t_ev(CTR)``, ``N = A T x events per decay`` and
  ``t_ev`` the seconds per event of one list-mode MLEM iteration (:func:`equipet.reconstruction.mlem.listmode_mlem`,
  on-the-fly projector, no system-matrix cache: an upper bound when ``mlem.system_cache_mb`` > 0).
  With scatter in ``mlem.corrections``: plus ``rounds x (decays / r_MC + estimate_iterations x N x t_ev)``.
* **central slice** (per CTR): about one MLEM iteration's cost for the events crossing the slice
  (their out-of-slice projection and the stored slice matrix); reading the ROOT file is not counted.
* **assisted training** (per CTR, method, model, seed): ``epochs x (t_net(model) + t_data)``.
  ``t_net`` is a training epoch of the network with the MSE image loss on the slice
  (``mlem.fov_mm / mlem.voxel_size_mm`` pixels): the whole epoch of method ``paper``.
  ``t_data`` is the data term's forward and backward per epoch, measured per event on the slice
  events of the short acquisition (best of 3 calls, as are the MLEM timings) and scaled: ``poisson``, :class:`equipet.assisted.methods.SubsetPoissonLoss`
  on a stored :class:`equipet.reconstruction.projector.SparseSystemMatrix`, for a block of ``N_s / K`` events
  (``K`` from ``assisted.subset_events``, ``N_s`` the slice events kept, ``assisted.max_events``);
  ``poisson_full``, :class:`equipet.assisted.methods.ListmodePoissonLoss` with the on-the-fly projector
  over all ``N_s`` events (the same fraction of its matrix cached as ``assisted.cache_mb`` allows);
  ``l2``, the same per-event cost over ``N_s + assisted.l2_mc_lors`` LORs (approximate).
* the training jobs (``train_brain``, ``assisted_train``) run with ``training_threads`` threads; their
  work is measured with the calibration's torch threads (``min(2, cores)`` on the CPU) and counted
  as ``calibration threads / job threads`` times as long: ideal scaling, an upper bound for a job
  with fewer threads (the quick config's one) and a lower bound for one with more.
* every job also pays its process start (Python, torch and equipet imported), measured once;
  for the other rules (figures, tables, merges, metrics) that is all that is counted.
  The ablation's runs and GATE jobs are counted but not timed.

**Wall time.** Stages run one after another (the brain experiments may in fact overlap the
PET stages, so the real time can be shorter). Within a stage, CPU jobs share the cores:
``max(sum_j t_j c_j / C, max_j t_j)`` with ``c_j`` the job's threads and ``C`` the cores; jobs that
use the GPU (rules with ``resources: gpu``) run one after another on one GPU, ``sum_j t_j``
(several small jobs can share a large GPU, so this is an upper bound there). The calibration
runs on this machine as it is loaded now; on a shared machine times vary.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from equipet.config import REPO_ROOT
from equipet.errors import EquipetError

log = logging.getLogger("equipet.study.estimate")

REPO = REPO_ROOT       # the workflow: Snakefile and config/config.yaml
DEFAULT_CONFIG = "config/config.yaml"
QUICK_COMMAND = "bash workflow/bootstrap.sh run --configfile config/quick.yaml"

#: stage of each timed rule, in the order the stages run
STAGES = {
    "train_brain": "brain experiments",
    "ablation_train": "ablation (not timed)",
    "ablation_confirm": "ablation (not timed)",
    "simulate_job": "simulation",
    "gate_job": "simulation (GATE, not timed)",
    "normalisation": "normalisation",
    "sensitivity": "sensitivity image",
    "mlem": "MLEM",
    "central_slice": "central slice",
    "assisted_train": "assisted",
}
OTHER_STAGE = "other (figures, tables, merges)"

#: events of the calibration's projector timings on each kind of device (per-call overheads
#: are small next to these; the sample's events are repeated to reach them)
CAL_EVENTS = {"cpu": 10_000, "cuda": 1_000_000}
#: LORs of the sensitivity timing on each kind of device (its fixed cost, a pilot of 2e5 pairs, included)
CAL_LORS = {"cpu": 10_000, "cuda": 2_000_000}
CAL_DECAYS = 400_000
#: decays of the blank-scan timing and element pairs of the chord-sum timing (normalisation)
CAL_BLANK_DECAYS = 200_000
CAL_CHORD_PAIRS = 1 << 18
#: training epochs timed per network (after one warm-up epoch; the median is kept)
CAL_EPOCHS = 3


# --------------------------------------------------------------------------- jobs from Snakemake

@dataclass
class Job:
    """One job of the dry run: its rule, wildcards, threads and whether it asks for a GPU."""

    rule: str
    wildcards: dict[str, str] = field(default_factory=dict)
    threads: int = 1
    gpu: bool = False


_RULE = re.compile(r"^(?:local)?rule (\w+):\s*$")
_STAT = re.compile(r"^(\w+)\s+(\d+)\s*$")


def parse_dry_run(text: str) -> tuple[list[Job], dict[str, int]]:
    """The jobs of ``snakemake -n`` output, and its job-stats table (rule -> count).

    Raises :class:`EquipetError` when the two disagree (the output format changed).
    """
    jobs: list[Job] = []
    for line in text.splitlines():
        m = _RULE.match(line)
        if m:
            jobs.append(Job(m.group(1)))
            continue
        if not jobs or not line.startswith("    "):
            continue
        key, _, value = line.strip().partition(": ")
        if key == "wildcards":
            jobs[-1].wildcards = dict(kv.split("=", 1) for kv in value.split(", "))
        elif key == "threads":
            jobs[-1].threads = int(value)
        elif key == "resources":
            jobs[-1].gpu = any(re.fullmatch(r"gpu=[1-9]\d*", kv.strip()) for kv in value.split(","))
    stats: dict[str, int] = {}
    if "Job stats:" in text:
        table = text.split("Job stats:")[-1].splitlines()
        for line in table[3:]:
            m = _STAT.match(line)
            if not m:
                break
            stats[m.group(1)] = int(m.group(2))
    total = stats.pop("total", None)
    counted = Counter(j.rule for j in jobs)
    if total is not None and (total != len(jobs) or dict(counted) != stats):
        raise EquipetError(f"the dry run lists {len(jobs)} jobs but its job-stats table {total}",
                           where="snakemake -n output", fix="report this: the dry-run format has changed")
    return jobs, stats


def dry_run_jobs(configfiles: Sequence[str], cores: int, workdir: Path = REPO,
                 extra_args: Sequence[str] = ()) -> list[Job]:
    """Jobs of ``snakemake -n --nolock`` in ``workdir`` with these config files (:func:`parse_dry_run`)."""
    exe = shutil.which("snakemake")
    cmd = [exe] if exe else [sys.executable, "-m", "snakemake"]
    cmd += ["-n", "--nolock", "--cores", str(cores)]
    if configfiles:
        cmd += ["--configfile", *configfiles]
    cmd += list(extra_args)
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise EquipetError(f"the dry run failed:\n{tail}", where=" ".join(cmd),
                           fix="run that command to see the whole message")
    if "Nothing to be done" in proc.stdout + proc.stderr:
        return []
    return parse_dry_run(proc.stdout + "\n" + proc.stderr)[0]


def runs_of_groups(jobs: Sequence[Job], cfg: Mapping[str, Any]) -> list[Job]:
    """Each ``assisted_train_ctr`` job (``assisted.group_runs: ctr``) as the ``assisted_train``
    jobs of its runs: the estimate times the runs one by one, an upper bound for runs trained
    together (``workflow/benchmarks/bench_assisted.py --runs`` measures the gain).

    >>> cfg = {"assisted": {"methods": ["paper"]}, "seeds": [0, 1]}
    >>> [j.wildcards["seed"] for j in runs_of_groups([Job("assisted_train_ctr", {"ctr": "100"})], cfg)]
    ['0', '1', '0', '1']
    """
    out: list[Job] = []
    for job in jobs:
        if job.rule != "assisted_train_ctr":
            out.append(job)
            continue
        out += [Job("assisted_train", {**job.wildcards, "method": m, "model": model, "seed": str(seed)},
                    job.threads, job.gpu)
                for m in cfg["assisted"]["methods"] for model in ("cnn", "scnn") for seed in cfg["seeds"]]
    return out


def load_run_config(configfiles: Sequence[str], workdir: Path = REPO) -> dict[str, Any]:
    """The validated config Snakemake will see: config/config.yaml, then ``configfiles`` in order."""
    from equipet.config import load_config

    paths = [workdir / DEFAULT_CONFIG]
    paths += [p if p.is_absolute() else workdir / p for p in map(Path, configfiles)
              if (p if p.is_absolute() else workdir / p).resolve() != (workdir / DEFAULT_CONFIG).resolve()]
    return load_config(paths)


# --------------------------------------------------------------------------- calibration

@dataclass
class Costs:
    """Costs measured on this machine (the module doc); seconds, per second, per event."""

    device: str
    torch_threads: int
    brain_s_per_epoch: dict[str, float] = field(default_factory=dict)      # "experiment/model"
    net_s_per_epoch: dict[str, float] = field(default_factory=dict)        # model, on the slice
    poisson_s_per_event: dict[str, float] = field(default_factory=dict)    # CTR -> data term per event
    full_s_per_event: dict[str, float] = field(default_factory=dict)       # CTR -> on-the-fly data term
    mlem_s_per_event: dict[str, float] = field(default_factory=dict)       # CTR -> one MLEM iteration
    mc_decays_per_s: float = float("nan")
    mlem_events_per_decay: float = float("nan")
    slice_events_per_decay: float = float("nan")
    sensitivity_lors_per_s: float = float("nan")
    blank_decays_per_s: float = float("nan")       # normalisation: blank scan
    chord_pairs_per_s: float = float("nan")        # normalisation: Monte Carlo chord sum
    job_start_s: float = 0.0            # a job's process start: Python, torch and equipet imported
    calibration_s: float = 0.0
    calibration_parts_s: dict[str, float] = field(default_factory=dict)    # what the calibration spent where

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Costs":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def _ctr_key(ctr: Any) -> str:
    return f"{float(ctr):g}"


def _best_time(fn, device: torch.device, repeats: int = 3, warmup: int = 0) -> float:
    """Shortest wall time, s, of ``repeats`` calls of ``fn`` after ``warmup`` calls (as the projector
    benchmark times: the machine's cost without the spikes of a shared machine's load or of a
    first call)."""
    best = float("inf")
    for i in range(warmup + repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            best = min(best, time.perf_counter() - t0)
    return best


def _tile(a: np.ndarray, n: int) -> np.ndarray:
    return np.resize(a, (n,) + a.shape[1:]) if len(a) else a


def _brain_costs(cfg: Mapping[str, Any], device: torch.device, costs: Costs, needed: set[tuple[str, str]]) -> None:
    from equipet.networks.nets import build_model
    from equipet.brain.radon import RadonTransform
    from equipet.networks.training import ForwardModelMSELoss, MSELoss, seconds_per_epoch

    size = int(cfg["brain"]["size"])
    rng = np.random.default_rng(0)
    image = torch.from_numpy(rng.random((1, 1, size, size), dtype=np.float32))
    for experiment, model_name in sorted(needed):
        if experiment == "denoise":
            loss = MSELoss(image)
        else:
            op = RadonTransform(size, np.linspace(0.0, 180.0, cfg["radon_recon"]["n_angles"], endpoint=False))
            with torch.no_grad():
                loss = ForwardModelMSELoss(op, op.apply(image))
        torch.manual_seed(0)
        model = build_model(model_name, cfg["models"])
        costs.brain_s_per_epoch[f"{experiment}/{model_name}"] = seconds_per_epoch(model, image, loss, device,
                                                                                 CAL_EPOCHS, 1)


def _sample_acquisition(cfg: Mapping[str, Any], ctr_ps: float, costs: Costs):
    """A short acquisition of the configured phantom and scanner: MC rate and events per decay."""
    from equipet.assisted.central_slice import lors_crossing, slab_range, slice_geometry
    from equipet.simulation.gate_root import BRANCHES
    from equipet.reconstruction.listmode import convert_chunk
    from equipet.reconstruction.geometry import box_with_halo, image_geometry, lor_hits_box
    from equipet.simulation.montecarlo import Simulator, simulator_from_settings

    sim = simulator_from_settings(cfg)
    acq = dataclasses.replace(sim.acq, duration_s=CAL_DECAYS / sim.activity_bq, n_jobs=1)
    short = Simulator(sim.scanner, sim.phantom, acq)
    meta = short.run_job(0, ctr_ps, progress=False)
    n_dec = max(int(meta["n_decays"]), 1)
    costs.mc_decays_per_s = float(meta["decays_per_s"])
    mlem = cfg["mlem"]
    window = tuple(mlem["energy_window_kev"]) if mlem.get("energy_window_kev") else None
    n_coinc = len(meta["data"]["time1"])
    data = {k: meta["data"].get(k, np.zeros(n_coinc, t)) for k, t in BRANCHES.items()}   # as the ROOT file has them
    ev = convert_chunk(data, sim.scanner, mlem["events"], mlem["lor_endpoints"], window)
    geom = image_geometry(mlem)
    lo, hi = box_with_halo(geom)
    in_box = ev.subset(lor_hits_box(ev.p1_mm.astype(np.float64), ev.p2_mm.astype(np.float64), lo, hi))
    costs.mlem_events_per_decay = len(in_box) / n_dec
    sec = cfg["assisted"]
    g2 = slice_geometry(geom, *slab_range(geom.shape[2], sec["slice_index"], sec["slice_voxels"]))
    in_slice = ev.subset(lors_crossing(ev.p1_mm, ev.p2_mm, g2))
    costs.slice_events_per_decay = len(in_slice) / n_dec
    return geom, g2, in_box, in_slice


def _projection_costs(cfg: Mapping[str, Any], device: torch.device, costs: Costs, geom, g2, in_box, in_slice,
                      mlem_ctrs: set[str], slice_ctrs: dict[str, set[str]], n_slice_kept: dict[str, float]) -> None:
    from equipet.assisted.methods import ListmodePoissonLoss, SliceForwardModel, SubsetPoissonLoss, subset_count
    from equipet.reconstruction.mlem import chunk_events, listmode_mlem
    from equipet.reconstruction.projector import ListmodeTOFProjector, tof_fwhm_mm

    mlem, sec = cfg["mlem"], cfg["assisted"]
    n_cal = CAL_EVENTS["cuda" if device.type == "cuda" else "cpu"]
    trunc = mlem["tof_truncation_sigma"]
    as_t = lambda a: torch.as_tensor(a, dtype=torch.float32, device=device)  # noqa: E731
    for ctr in sorted(mlem_ctrs | set(slice_ctrs), key=float):
        fwhm = tof_fwhm_mm(float(ctr)) if mlem["tof"] else None
        if ctr in mlem_ctrs and len(in_box):
            n = n_cal
            p1, p2, tof = (as_t(_tile(a, n)) for a in (in_box.p1_mm, in_box.p2_mm, in_box.tof_mm))
            sens = torch.ones(geom.shape, device=device)
            dt = _best_time(lambda: listmode_mlem(p1, p2, tof if fwhm else None, sens, geom, 1, 1, fwhm, trunc,
                                                    mlem["min_sensitivity_fraction"], chunk_events(mlem, device),
                                                    0.0, progress=False), device)
            costs.mlem_s_per_event[ctr] = dt / n
        methods = slice_ctrs.get(ctr, set())
        if not methods or not len(in_slice):
            continue
        n_kept = max(n_slice_kept[ctr], 1.0)
        scale = 1.0
        out = torch.rand((1, 1) + g2.shape[:2], device=device, requires_grad=True)
        sens = torch.ones(g2.shape[:2], device=device)

        def time_loss(loss: torch.nn.Module) -> float:
            def step() -> None:
                out.grad = None
                loss(out).backward()
            return _best_time(step, device)

        if "poisson" in methods:
            block = n_kept / subset_count(int(round(n_kept)), sec["subset_events"])
            n = int(min(max(block, 1), n_cal))
            p1, p2, tof = (as_t(_tile(a, n)) for a in (in_slice.p1_mm, in_slice.p2_mm, in_slice.tof_mm))
            system = ListmodeTOFProjector(g2, p1, p2, tof if fwhm else None, fwhm, trunc, 8192).to_sparse()
            loss = SubsetPoissonLoss([system], [torch.full((n,), 0.1, device=device)], sens, scale)
            costs.poisson_s_per_event[ctr] = time_loss(loss) / n
        if methods & {"poisson_full", "l2"}:
            n = int(min(n_kept, n_cal))
            p1, p2, tof = (as_t(_tile(a, n)) for a in (in_slice.p1_mm, in_slice.p2_mm, in_slice.tof_mm))
            cache = float(sec["cache_mb"]) * n / n_kept       # the same fraction of the matrix cached
            proj = ListmodeTOFProjector(g2, p1, p2, tof if fwhm else None, fwhm, trunc, 8192, cache)
            loss = ListmodePoissonLoss(SliceForwardModel(proj, torch.full((n,), 0.1, device=device), scale), sens)
            costs.full_s_per_event[ctr] = time_loss(loss) / n


def calibrate(cfg: Mapping[str, Any], device: torch.device, jobs: Sequence[Job]) -> Costs:
    """Measure on ``device`` the costs the ``jobs`` need (module doc); about 10-30 s."""
    from equipet.reconstruction.mlem import sensitivity_image
    from equipet.reconstruction.system import chunk_events, phantom_mu_map
    from equipet.reconstruction.geometry import image_geometry
    from equipet.networks.nets import build_model
    from equipet.simulation.scanner import Scanner
    from equipet.networks.training import MSELoss, seconds_per_epoch

    t_start = time.perf_counter()
    costs = Costs(device=str(device), torch_threads=torch.get_num_threads())
    rules = Counter(j.rule for j in jobs)
    brain = {(j.wildcards["experiment"], j.wildcards["model"]) for j in jobs if j.rule == "train_brain"}
    parts = costs.calibration_parts_s
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch, equipet.cli, equipet.networks.training"], check=True,
                   env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    costs.job_start_s = parts["job start"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if brain:
        _brain_costs(cfg, device, costs, brain)
        parts["brain networks"] = time.perf_counter() - t0
    assisted = [j for j in jobs if j.rule == "assisted_train"]
    t0 = time.perf_counter()
    for model_name in sorted({j.wildcards["model"] for j in assisted}):
        geom = image_geometry(cfg["mlem"])
        rng = np.random.default_rng(0)
        image = torch.from_numpy(rng.random((1, 1) + geom.shape[:2], dtype=np.float32))
        torch.manual_seed(0)
        costs.net_s_per_epoch[model_name] = seconds_per_epoch(build_model(model_name, cfg["models"]), image,
                                                              MSELoss(image), device, CAL_EPOCHS, 1)
    if assisted:
        parts["slice networks"] = time.perf_counter() - t0
    pet = {"simulate_job", "mlem", "central_slice", "assisted_train"}
    if pet & set(rules):
        mlem_ctrs = {_ctr_key(j.wildcards["ctr"]) for j in jobs if j.rule in ("mlem", "central_slice")}
        slice_ctrs: dict[str, set[str]] = {}
        for j in assisted:
            if j.wildcards["method"] != "paper":
                slice_ctrs.setdefault(_ctr_key(j.wildcards["ctr"]), set()).add(j.wildcards["method"])
        ctrs = sorted(mlem_ctrs | set(slice_ctrs), key=float) or [_ctr_key(cfg["acquisition"]["ctrs_ps"][0])]
        t0 = time.perf_counter()
        geom, g2, in_box, in_slice = _sample_acquisition(cfg, float(ctrs[0]), costs)
        parts["Monte Carlo"] = time.perf_counter() - t0
        decays = _decays_per_ctr(cfg)
        kept = {c: _slice_events_kept(cfg, costs, decays) for c in slice_ctrs}
        t0 = time.perf_counter()
        _projection_costs(cfg, device, costs, geom, g2, in_box, in_slice, mlem_ctrs, slice_ctrs, kept)
        parts["projections"] = time.perf_counter() - t0
    if rules.get("normalisation"):
        from equipet.reconstruction.normalisation import BlankScan, blank_radius_mm, class_pair_chords

        t0 = time.perf_counter()
        scanner, ns = Scanner.from_config(cfg["scanner"]), cfg["mlem"]["normalisation"]
        radius = blank_radius_mm(cfg["mlem"])
        t1 = time.perf_counter()
        BlankScan(radius, CAL_BLANK_DECAYS, ns["seed"]).simulate(scanner, cfg.get("acquisition"),
                                                                 with_doi_residual=True)
        costs.blank_decays_per_s = CAL_BLANK_DECAYS / (time.perf_counter() - t1)
        t1 = time.perf_counter()
        class_pair_chords(scanner, radius, ns["angle_bins"], CAL_CHORD_PAIRS, ns["seed"] + 1)
        costs.chord_pairs_per_s = CAL_CHORD_PAIRS / (time.perf_counter() - t1)
        parts["normalisation"] = time.perf_counter() - t0
    if rules.get("sensitivity"):
        t0 = time.perf_counter()
        mlem = cfg["mlem"]
        geom = image_geometry(mlem)
        mu, mu_geom = phantom_mu_map(cfg["phantom"], mlem["voxel_size_mm"]) if mlem["attenuation"] else (None, None)
        n = CAL_LORS["cuda" if device.type == "cuda" else "cpu"]
        _, info = sensitivity_image(Scanner.from_config(cfg["scanner"]), geom, n, mu, mu_geom, 2,
                                    mlem["sensitivity_seed"], device, chunk_events(mlem, device), progress=False,
                                    symmetrise=mlem["sensitivity_symmetrise"])
        costs.sensitivity_lors_per_s = info["lors_projected"] / max(info["seconds"], 1e-9)
        parts["sensitivity"] = time.perf_counter() - t0
    costs.calibration_s = time.perf_counter() - t_start
    return costs


# --------------------------------------------------------------------------- the estimate

def _decays_per_ctr(cfg: Mapping[str, Any]) -> float:
    """Decays of one CTR's acquisition: activity (Bq, scaled) x duration (s)."""
    from equipet.simulation.phantom import hot_rod_phantom

    acq = cfg["acquisition"]
    return hot_rod_phantom(cfg["phantom"], activity_scale=acq["activity_scale"]).total_activity_bq() * acq["duration_s"]


def _slice_events_kept(cfg: Mapping[str, Any], costs: Costs, decays: float) -> float:
    n = decays * costs.slice_events_per_decay
    cap = cfg["assisted"]["max_events"]
    return min(n, cap) if cap is not None else n


# rules whose jobs run with the config's training_threads (the rules' `threads:`)
TRAINING_RULES = ("train_brain", "assisted_train")


def job_seconds(job: Job, cfg: Mapping[str, Any], costs: Costs) -> float | None:
    """Estimated seconds of one job on the calibrated device (module doc); None when not timed."""
    if job.rule in ("ablation_train", "ablation_confirm", "gate_job"):
        return None
    work = _work_seconds(job, cfg, costs)
    if job.rule in TRAINING_RULES and not costs.device.startswith("cuda"):
        work *= costs.torch_threads / job.threads      # measured with the calibration's threads
    return costs.job_start_s + work


def _work_seconds(job: Job, cfg: Mapping[str, Any], costs: Costs) -> float:
    """The measured work of one job, without its process start (0 for the rules not timed)."""
    from equipet.assisted.methods import subset_count

    w = job.wildcards
    decays = _decays_per_ctr(cfg)
    mlem = cfg["mlem"]
    if job.rule == "train_brain":
        return cfg[w["experiment"]]["epochs"] * costs.brain_s_per_epoch[f"{w['experiment']}/{w['model']}"]
    if job.rule == "simulate_job":
        return decays / cfg["acquisition"]["n_jobs"] / costs.mc_decays_per_s
    if job.rule == "normalisation":
        ns = mlem["normalisation"]
        return ns["blank_decays"] / costs.blank_decays_per_s + ns["chord_pairs"] / costs.chord_pairs_per_s
    if job.rule == "sensitivity":
        return mlem["sensitivity_lors"] / costs.sensitivity_lors_per_s
    if job.rule == "mlem":
        iteration = decays * costs.mlem_events_per_decay * costs.mlem_s_per_event[_ctr_key(w["ctr"])]
        total = mlem["iterations"] * iteration
        if "scatter" in (mlem.get("corrections") or []):
            sc = mlem["scatter"]
            total += sc["rounds"] * (sc["decays"] / costs.mc_decays_per_s + sc["estimate_iterations"] * iteration)
        return total
    if job.rule == "central_slice":
        return decays * costs.slice_events_per_decay * costs.mlem_s_per_event[_ctr_key(w["ctr"])]
    if job.rule == "assisted_train":
        sec = cfg["assisted"]
        ctr, method = _ctr_key(w["ctr"]), w["method"]
        n = _slice_events_kept(cfg, costs, decays)
        data = 0.0
        if method == "poisson":
            data = n / subset_count(int(round(n)), sec["subset_events"]) * costs.poisson_s_per_event[ctr]
        elif method == "poisson_full":
            data = n * costs.full_s_per_event[ctr]
        elif method == "l2":
            data = (n + sec["l2_mc_lors"]) * costs.full_s_per_event[ctr]
        return sec["epochs"] * (costs.net_s_per_epoch[w["model"]] + data)
    return 0.0


@dataclass
class Stage:
    """Jobs of one stage and their estimated times."""

    name: str
    seconds: list[float | None] = field(default_factory=list)
    threads: list[int] = field(default_factory=list)
    gpu: bool = False

    @property
    def jobs(self) -> int:
        return len(self.seconds)

    @property
    def timed(self) -> bool:
        return all(s is not None for s in self.seconds)

    @property
    def serial_s(self) -> float:
        return float(sum(s for s in self.seconds if s is not None))

    def wall_s(self, cores: int) -> float:
        """Wall time of the stage alone (module doc): one GPU in turn, or CPU jobs sharing the cores."""
        times = [s for s in self.seconds if s is not None]
        if not times:
            return 0.0
        if self.gpu:
            return float(sum(times))
        work = sum(s * min(c, cores) for s, c in zip(self.seconds, self.threads) if s is not None)
        return float(max(work / cores, max(times)))


def stage_name(job: Job) -> str:
    name = STAGES.get(job.rule, OTHER_STAGE)
    return f"{name} ({job.wildcards['method']})" if job.rule == "assisted_train" else name


def estimate(jobs: Sequence[Job], cfg: Mapping[str, Any], costs: Costs) -> list[Stage]:
    """The stages of ``jobs`` with each job's estimated seconds, in the order the stages run."""
    on_gpu = costs.device.startswith("cuda")
    stages: dict[str, Stage] = {}
    order = list(dict.fromkeys(STAGES.values()))
    for job in jobs:
        name = stage_name(job)
        st = stages.setdefault(name, Stage(name))
        st.seconds.append(job_seconds(job, cfg, costs))
        st.threads.append(job.threads)
        st.gpu = st.gpu or (on_gpu and job.gpu)

    def rank(name: str) -> tuple[int, str]:
        base = name.split(" (")[0] if name.startswith("assisted") else name
        return (order.index(base) if base in order else len(order), name)

    return [stages[k] for k in sorted(stages, key=rank)]


def format_duration(seconds: float | None) -> str:
    """``12 s``, ``3.4 min``, ``5.6 h``, ``2.1 d``."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    if seconds < 90:
        return f"{seconds:.2g} s" if seconds < 10 else f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def report(stages: Sequence[Stage], costs: Costs, cfg: Mapping[str, Any], configfiles: Sequence[str],
           cores: int) -> str:
    """The printed estimate (module doc)."""
    on_gpu = costs.device.startswith("cuda")
    sources = list(dict.fromkeys([DEFAULT_CONFIG, *configfiles]))   # the default config is read once
    lines = [f"equipet: time estimate for {' + '.join(sources)} on this machine "
             f"({costs.device}, {cores} CPU cores, {costs.torch_threads} torch threads; "
             f"calibrated in {costs.calibration_s:.0f} s: "
             + ", ".join(f"{k} {v:.1f} s" for k, v in costs.calibration_parts_s.items()) + ")"]
    measured = []
    for k, v in sorted(costs.brain_s_per_epoch.items()):
        measured.append(f"{k} {v * 1e3:.3g} ms/epoch")
    for k, v in sorted(costs.net_s_per_epoch.items()):
        measured.append(f"assisted {k} network {v * 1e3:.3g} ms/epoch")
    for name, d, unit in (("poisson data term", costs.poisson_s_per_event, "us/event"),
                          ("on-the-fly data term", costs.full_s_per_event, "us/event"),
                          ("MLEM iteration", costs.mlem_s_per_event, "us/event")):
        for ctr, v in sorted(d.items(), key=lambda kv: float(kv[0])):
            measured.append(f"{name} at {ctr} ps {v * 1e6:.3g} {unit}")
    if math.isfinite(costs.mc_decays_per_s):
        measured.append(f"Monte Carlo {costs.mc_decays_per_s:.3g} decays/s per core, "
                        f"{costs.mlem_events_per_decay:.3g} MLEM events and {costs.slice_events_per_decay:.3g} "
                        f"slice events per decay")
    if math.isfinite(costs.blank_decays_per_s):
        measured.append(f"normalisation blank scan {costs.blank_decays_per_s:.3g} decays/s and "
                        f"{costs.chord_pairs_per_s:.3g} chord pairs/s")
    if math.isfinite(costs.sensitivity_lors_per_s):
        measured.append(f"sensitivity {costs.sensitivity_lors_per_s:.3g} LORs/s")
    if measured:
        lines.append("  measured: " + "; ".join(measured))
    head = f"  {'stage':<44} {'jobs':>5}  {'per job':>17}  {'serial total':>12}  {'wall':>9}  runs on"
    lines += ["", head, "  " + "-" * (len(head) + 6)]
    total_serial, total_wall = 0.0, 0.0
    for st in stages:
        times = [s for s in st.seconds if s is not None]
        if times:
            lo, hi = min(times), max(times)
            per = format_duration(lo) if hi <= 1.05 * lo else f"{format_duration(lo)} - {format_duration(hi)}"
        else:
            per = "not timed"
        wall = st.wall_s(cores)
        total_serial += st.serial_s
        total_wall += wall
        n_threads = max(st.threads)
        where = ("GPU, one job at a time" if st.gpu
                 else f"CPU, {n_threads} thread{'s' if n_threads > 1 else ''} per job")
        lines.append(f"  {st.name:<44} {st.jobs:>5}  {per:>17}  {format_duration(st.serial_s) if times else '-':>12}  "
                     f"{format_duration(wall) if times else '-':>9}  {where if times else ''}")
    n_jobs = sum(st.jobs for st in stages)
    lines += ["  " + "-" * (len(head) + 6),
              f"  {'total':<44} {n_jobs:>5}  {'':>17}  {format_duration(total_serial):>12}  "
              f"{format_duration(total_wall):>9}",
              "",
              f"expected wall time on this machine: about {format_duration(total_wall)} ({n_jobs} jobs).",
              "assumptions: stages run one after another (the brain experiments can overlap the PET stages);"
              f" CPU jobs share {cores} cores by their threads;"
              + (" GPU jobs run one at a time on one GPU (an upper bound for small images);" if on_gpu else "")
              + " MLEM without its system-matrix cache (an upper bound); costs measured just now on this machine,"
              " which may be shared and loaded."]
    if not n_jobs:
        lines = [lines[0], "nothing to do: every output is up to date."]
    lines.append(f"to run the quick configuration instead (minutes on a CPU): {QUICK_COMMAND}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- machine

def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


__all__ = ["Job", "Costs", "Stage", "parse_dry_run", "dry_run_jobs", "load_run_config", "calibrate", "estimate",
           "job_seconds", "report"]
