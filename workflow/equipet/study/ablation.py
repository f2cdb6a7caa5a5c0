"""The pre-registered SCNN-vs-CNN ablation of the brain benchmarks (``config/preregistration.md``).

A *configuration* (``ablation.configurations`` in the config) is the paper configuration with
a few values changed (``changes``, merged into the sections :data:`CHANGEABLE`). The study has
two stages:

1. the **grid**: every configuration, on each of its experiments, for every seed of
   ``ablation.seeds``; its denoising runs with ``ablation.screen_seed`` are the **screen**;
2. the **confirmation**: the best paper-consistent SCNN and the best paper-consistent CNN of
   the screen (highest training-slice PSNR at the last snapshot, ties to fewer parameters,
   :func:`select`) on the fresh seeds ``ablation.confirm_seeds``, for denoising and Radon.

Run directories::

    <results>/ablation/grid/<experiment>/<configuration>/seed<N>/
    <results>/ablation/confirm/<experiment>/<model>/seed<N>/

Each holds the files of :func:`equipet.brain.experiments.run_experiment` (``metrics.csv`` carries
the configuration columns of :func:`configuration_columns`) and ``configuration.json`` (the
same labels, for the tables and the claims).

``equipet-ablation train | select | summarise`` are the stage's commands; the Snakemake rules
(``workflow/rules/ablation.smk``) and ``workflow/benchmarks/run_ablation.py`` (the same runs
without Snakemake, in parallel on one GPU) both call them.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from equipet.config import deep_merge, validate
from equipet.errors import ConfigError, InputDataError
from equipet.files import atomic_path

log = logging.getLogger("equipet.study.ablation")

EXPERIMENTS = ("denoise", "radon_recon")
#: config sections a configuration may change
CHANGEABLE = ("models", "training", "denoise", "radon_recon", "evaluation")
STAGES = ("grid", "confirm")
#: the selection metric of the screen (pre-registered): training-slice PSNR at the last snapshot
SELECTION_METRIC = "psnr_train_last_epoch"


@dataclass(frozen=True)
class Configuration:
    """One configuration of the grid (see the config schema ``ablation.configurations``)."""

    name: str
    model: str
    paper_consistent: bool
    experiments: tuple[str, ...] = EXPERIMENTS
    changes: Mapping[str, Any] = field(default_factory=dict)


def configurations(cfg: Mapping[str, Any]) -> list[Configuration]:
    """The configurations of ``cfg["ablation"]``, checked (unique names, changeable sections)."""
    sec = cfg.get("ablation") or {}
    out: list[Configuration] = []
    for i, c in enumerate(sec.get("configurations", [])):
        where = f"ablation.configurations[{i}] ({c.get('name')})"
        bad = sorted(set(c.get("changes", {})) - set(CHANGEABLE))
        if bad:
            raise ConfigError(f"changes to sections {bad} are not allowed", where=where,
                              fix=f"change only {', '.join(CHANGEABLE)}")
        out.append(Configuration(c["name"], c["model"], bool(c["paper_consistent"]),
                                 tuple(c.get("experiments", EXPERIMENTS)), copy.deepcopy(c.get("changes", {}))))
    names = [c.name for c in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"configuration names {dupes} are used more than once", where="ablation.configurations",
                          fix="give every configuration its own name")
    if out and sec["screen_seed"] not in sec["seeds"]:
        raise ConfigError(f"screen_seed {sec['screen_seed']} is not one of the grid seeds {sec['seeds']}",
                          where="ablation.screen_seed", fix="pick one of ablation.seeds")
    return out


def configuration(cfg: Mapping[str, Any], name: str) -> Configuration:
    """The configuration called ``name`` (a :class:`ConfigError` listing the names otherwise)."""
    confs = {c.name: c for c in configurations(cfg)}
    if name not in confs:
        raise ConfigError(f"no ablation configuration named {name!r}", where="ablation.configurations",
                          fix=f"use one of {sorted(confs)}")
    return confs[name]


def configuration_config(cfg: Mapping[str, Any], conf: Configuration) -> dict[str, Any]:
    """The full config of ``conf``: ``cfg`` with its changes merged in, validated again.

    Merging is idempotent, so passing a config that already carries the changes is harmless.
    """
    merged = deep_merge(copy.deepcopy(dict(cfg)), {k: copy.deepcopy(v) for k, v in conf.changes.items()})
    return validate(merged, source=f"ablation configuration {conf.name}")


def configuration_columns(cfg: Mapping[str, Any], conf: Configuration, stage: str) -> dict[str, Any]:
    """The columns that describe a run of ``conf`` in every table (``cfg``: its merged config)."""
    from equipet.networks.nets import build_model, count_parameters, model_width

    m = cfg["models"]
    return {
        "stage": stage,
        "configuration": conf.name,
        "paper_consistent": conf.paper_consistent,
        "group": f"{m['scnn']['group']}{m['scnn']['order']}" if conf.model == "scnn" else "",
        "width": model_width(conf.model, m),
        "kernel_size": m[conf.model]["kernel_size"],
        "max_frequency": m["scnn"]["max_frequency"] if conf.model == "scnn" else None,
        "batch_norm": True if conf.model == "scnn" else m["cnn"]["batch_norm"],
        "learning_rate": cfg["training"]["learning_rate"],
        "radon_counts": cfg["radon_recon"]["counts"],
        "radon_input": cfg["radon_recon"]["input"],
        "n_parameters": count_parameters(build_model(conf.model, m)),
    }


# --------------------------------------------------------------------------- paths and run lists


def grid_label(experiment: str, name: str, seed: int) -> str:
    """A grid run's label, which is also its folder under ``<results>/ablation`` and the archive."""
    return f"grid/{experiment}/{name}/seed{seed}"


def confirm_label(experiment: str, model: str, seed: int) -> str:
    """A confirmation run's label, which is also its folder under ``<results>/ablation`` and the archive."""
    return f"confirm/{experiment}/{model}/seed{seed}"


def label_experiment(label: str) -> str:
    """The experiment of a run label (``grid_label`` or ``confirm_label``)."""
    return label.split("/")[1]


def grid_dir(results: str | Path, experiment: str, name: str, seed: int) -> Path:
    return Path(results) / "ablation" / grid_label(experiment, name, seed)


def confirm_dir(results: str | Path, experiment: str, model: str, seed: int) -> Path:
    return Path(results) / "ablation" / confirm_label(experiment, model, seed)


def selection_path(results: str | Path) -> Path:
    return Path(results) / "ablation" / "selection.json"


def grid_runs(cfg: Mapping[str, Any]) -> list[tuple[str, str, int]]:
    """``(experiment, configuration, seed)`` of every grid run."""
    seeds = cfg["ablation"]["seeds"]
    return [(e, c.name, s) for c in configurations(cfg) for e in c.experiments for s in seeds]


def screen_runs(cfg: Mapping[str, Any]) -> list[tuple[str, str, int]]:
    """The screen: every configuration that runs denoising, with the screen seed."""
    seed = cfg["ablation"]["screen_seed"]
    return [("denoise", c.name, seed) for c in configurations(cfg) if "denoise" in c.experiments]


def confirm_runs(cfg: Mapping[str, Any]) -> list[tuple[str, str, int]]:
    """``(experiment, model, seed)`` of the confirmation."""
    return [(e, m, s) for e in EXPERIMENTS for m in ("scnn", "cnn") for s in cfg["ablation"]["confirm_seeds"]]


# --------------------------------------------------------------------------- training


def train_run(cfg: Mapping[str, Any], brain: Path, conf: Configuration, experiment: str, seed: int,
              out_dir: Path, stage: str) -> pd.DataFrame:
    """Train one run of ``conf`` and write its files and ``configuration.json`` into ``out_dir``."""
    from equipet.brain.experiments import run_experiment

    if experiment not in conf.experiments:
        raise ConfigError(f"configuration {conf.name} does not run {experiment}",
                          where=f"ablation.configurations ({conf.name}).experiments",
                          fix=f"add {experiment} to its experiments, or run one of {list(conf.experiments)}")
    merged = configuration_config(cfg, conf)
    columns = configuration_columns(merged, conf, stage)
    rows = run_experiment(experiment, merged, brain, conf.model, seed, out_dir, extra_columns=columns)
    labels = {"experiment": experiment, "model": conf.model, "seed": int(seed), **columns}
    with atomic_path(out_dir / "configuration.json") as tmp:
        tmp.write_text(json.dumps(labels, indent=2) + "\n")
    return rows


def read_labels(run_dir: Path) -> dict[str, Any]:
    """``configuration.json`` of an ablation run directory."""
    path = Path(run_dir) / "configuration.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputDataError(f"cannot read the run's configuration ({exc})", where=str(path),
                             fix="rerun this ablation run") from exc


# --------------------------------------------------------------------------- selection (screen)


def _last_train_metric(run_dir: Path, metric: str = "psnr") -> float:
    df = pd.read_csv(Path(run_dir) / "metrics.csv")
    train = df[(df["split"] == "train") & (df["metric"] == metric)]
    if train.empty:
        raise InputDataError("no training-slice metrics", where=str(Path(run_dir) / "metrics.csv"),
                             fix="rerun this ablation run")
    return float(train[train["epoch"] == train["epoch"].max()]["value"].iloc[0])


def select(run_dirs: Sequence[Path]) -> dict[str, Any]:
    """The best paper-consistent SCNN and CNN of the screen (pre-registered rule).

    Best: highest training-slice PSNR at the last snapshot epoch; ties to fewer parameters,
    then to the name. Returns ``{"metric", "scnn": {...}, "cnn": {...}, "candidates": [...]}``.
    """
    candidates = []
    for d in run_dirs:
        labels = read_labels(d)
        candidates.append({"configuration": labels["configuration"], "model": labels["model"],
                           "paper_consistent": bool(labels["paper_consistent"]), "seed": labels["seed"],
                           "n_parameters": int(labels["n_parameters"]), "psnr": _last_train_metric(d),
                           "run_dir": str(d)})
    out: dict[str, Any] = {"metric": SELECTION_METRIC, "candidates": candidates}
    for model in ("scnn", "cnn"):
        pool = [c for c in candidates if c["model"] == model and c["paper_consistent"] and np.isfinite(c["psnr"])]
        if not pool:
            raise InputDataError(f"the screen has no finished paper-consistent {model.upper()} run",
                                 where=", ".join(str(d) for d in run_dirs) or "(no screen runs)",
                                 fix="run the screen first (snakemake ablation, or run_ablation.py --only screen)")
        best = sorted(pool, key=lambda c: (-c["psnr"], c["n_parameters"], c["configuration"]))[0]
        out[model] = best
    return out


# --------------------------------------------------------------------------- tables and figures


def collect(run_dirs: Sequence[Path], window: int) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(tidy metrics with configuration columns, loss curves, one row of numbers per run)."""
    from equipet.runs import running_mean

    metrics, losses, runs = [], [], []
    for d in run_dirs:
        d = Path(d)
        labels = read_labels(d)
        m = pd.read_csv(d / "metrics.csv")
        metrics.append(m)
        loss = pd.read_csv(d / "loss.csv")
        timing = json.loads((d / "timing.json").read_text())
        for k in ("stage", "experiment", "configuration", "model", "seed"):
            loss[k] = labels[k]
        losses.append(loss)
        values = loss["loss"].to_numpy(float)

        def mean_of(split: str, metric: str, frame: pd.DataFrame = m) -> float:
            sel = frame[(frame["split"] == split) & (frame["metric"] == metric)]
            if split == "train":
                sel = sel[sel["epoch"] == sel["epoch"].max()]
            return float(sel["value"].mean()) if len(sel) else float("nan")

        runs.append({**labels, "epochs": len(values),
                     "psnr_train": mean_of("train", "psnr"), "ssim_train": mean_of("train", "ssim"),
                     "psnr_heldout": mean_of("heldout", "psnr"), "ssim_heldout": mean_of("heldout", "ssim"),
                     "psnr_rotated": mean_of("rotated", "psnr"), "ssim_rotated": mean_of("rotated", "ssim"),
                     "equivariance_error": mean_of("rotated", "equivariance_error"),
                     "final_loss": float(running_mean(values, window)[-1]),
                     "min_loss": float(running_mean(values, window).min()),
                     "loss_instability": loss_instability(values),
                     "s_per_epoch": float(timing["s_per_epoch"]), "device": timing.get("device", "?")})
    return (pd.concat(metrics, ignore_index=True), pd.concat(losses, ignore_index=True), pd.DataFrame(runs))


SUMMARY_VALUES = ["psnr_train", "ssim_train", "psnr_heldout", "ssim_heldout", "psnr_rotated", "ssim_rotated",
                  "equivariance_error", "final_loss", "min_loss", "loss_instability", "s_per_epoch"]
CONFIG_COLUMNS = ["stage", "experiment", "configuration", "model", "paper_consistent", "group", "width",
                  "kernel_size", "max_frequency", "batch_norm", "learning_rate", "radon_counts", "radon_input",
                  "n_parameters"]


def summary_table(runs: pd.DataFrame) -> pd.DataFrame:
    """``ablation.csv``: one row per (stage, experiment, configuration), mean and sd over seeds."""
    keys = [c for c in CONFIG_COLUMNS if c in runs]
    filled = runs.copy()
    for k in keys:  # groupby drops NaN keys (e.g. max_frequency of a CNN)
        filled[k] = filled[k].astype(object).where(filled[k].notna(), "")
    g = filled.groupby(keys, sort=False)
    out = g.agg(n_seeds=("seed", "nunique"), epochs=("epochs", "min"),
                **{f"{v}_mean": (v, "mean") for v in SUMMARY_VALUES},
                **{f"{v}_sd": (v, "std") for v in SUMMARY_VALUES}).reset_index()
    return out


def _save(fig: Any, out: Path) -> None:
    import matplotlib.pyplot as plt

    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format=out.suffix.lstrip("."))
    plt.close(fig)


def loss_envelope_figure(losses: pd.DataFrame, out: Path, max_points: int = 400) -> None:
    """One panel per (experiment, configuration): median loss over seeds and its min-max envelope,
    with the paper configuration of the same network in grey for reference (grid runs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = losses[losses["stage"] == "grid"]
    panels = [(e, c) for e in EXPERIMENTS for c in grid[grid["experiment"] == e]["configuration"].unique()]
    if not panels:
        raise InputDataError("no grid runs to plot", where=str(out), fix="run the ablation grid first")
    ncols = 6
    nrows = int(np.ceil(len(panels) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.6 * ncols, 2.1 * nrows), squeeze=False, layout="constrained")
    for ax in axes.flat[len(panels):]:
        ax.axis("off")

    def envelope(sel: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        wide = sel.pivot_table(index="epoch", columns="seed", values="loss")
        step = max(1, len(wide) // max_points)
        wide = wide.iloc[::step]
        v = wide.to_numpy(float)
        return wide.index.to_numpy(), np.nanmin(v, 1), np.nanmedian(v, 1), np.nanmax(v, 1)

    for ax, (exp, name) in zip(axes.flat, panels):
        sel = grid[(grid["experiment"] == exp) & (grid["configuration"] == name)]
        model = sel["model"].iloc[0]
        ref = grid[(grid["experiment"] == exp) & (grid["configuration"] == f"{model}_paper")]
        if len(ref) and name != f"{model}_paper":
            x, lo, mid, hi = envelope(ref)
            ax.fill_between(x, lo, hi, color="0.8", lw=0)
            ax.plot(x, mid, color="0.5", lw=0.8)
        x, lo, mid, hi = envelope(sel)
        colour = "C1" if model == "scnn" else "C0"
        ax.fill_between(x, lo, hi, color=colour, alpha=0.35, lw=0)
        ax.plot(x, mid, color=colour, lw=1.0)
        ax.set_yscale("log")
        ax.set_title(f"{exp}: {name}", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle("training loss per configuration: median and range over seeds "
                 "(grey: the paper configuration of the same network)", fontsize=9)
    _save(fig, out)


def quality_figure(runs: pd.DataFrame, out: Path) -> None:
    """PSNR and SSIM on the training slice, held-out slices and rotated inputs, per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import seaborn as sns

    grid = runs[runs["stage"] == "grid"]
    long = grid.melt(id_vars=["experiment", "configuration", "model", "seed"],
                     value_vars=[f"{m}_{s}" for m in ("psnr", "ssim") for s in ("train", "heldout", "rotated")],
                     var_name="quantity", value_name="value")
    long[["metric", "split"]] = long["quantity"].str.split("_", n=1, expand=True)
    g = sns.catplot(long, x="configuration", y="value", hue="split", row="metric", col="experiment",
                    kind="point", errorbar=("pi", 100), dodge=0.4, linestyle="none", sharey="row",
                    sharex=False, height=3.0, aspect=2.2, hue_order=["train", "heldout", "rotated"])
    for ax in g.axes.flat:
        ax.tick_params(axis="x", labelrotation=70, labelsize=7)
    g.set_titles("{row_name} | {col_name}")
    g.figure.suptitle("trained networks on their slice, held-out slices and rotated inputs, per configuration "
                      "(range over seeds)", fontsize=9, y=1.01)
    _save(g.figure, out)


# --------------------------------------------------------------------------- loss-curve measures


def loss_instability(losses: Sequence[float] | np.ndarray) -> float:
    """Instability ``U`` of a loss curve (``config/preregistration.md``, section 4).

    With ``l_k = log10 L_k`` and ``k*`` the epoch of the minimum loss,

        U = sum_{k < k*} max(0, l_{k+1} - l_k) / (l_1 - l_{k*}),

    the total rise of the log-loss on the way to its minimum relative to its net fall:
    0 for a monotone decrease, larger for every spike. Scale-free; the epochs after the
    minimum do not count. NaN when the loss never falls below its first value (or is not
    positive).

    >>> loss_instability([4.0, 2.0, 1.0])
    0.0
    >>> round(loss_instability([4.0, 8.0, 4.0, 1.0]), 6)    # one doubling on a 4x fall
    0.5
    """
    l = np.asarray(losses, dtype=float)
    if l.size < 2 or not np.all(np.isfinite(l)) or np.any(l <= 0):
        return float("nan")
    l = np.log10(l)
    k_min = int(np.argmin(l))
    fall = l[0] - l[k_min]
    if not fall > 0:
        return float("nan")
    rises = np.clip(np.diff(l[: k_min + 1]), 0.0, None).sum()
    return float(rises / fall)


def loss_rise(losses: Sequence[float] | np.ndarray, window: int) -> float:
    """Instability ``U2`` of a loss curve (``config/preregistration_2.md``, section 3).

    With ``m_k = log10`` of the trailing running mean of the loss over ``window`` epochs and
    ``k*`` the epoch of its minimum, ``U2 = sum_{k < k*} max(0, m_{k+1} - m_k)``: the total rise,
    in decades, on the way to the minimum. Not normalised (where the loss starts does not
    matter); scale-free (a log). NaN for a curve that is not positive and finite.

    >>> loss_rise([4.0, 2.0, 1.0], 1)
    0.0
    >>> round(loss_rise([1.0, 10.0, 1.0, 0.1], 1), 6)    # one rise by a decade
    1.0
    """
    from equipet.runs import running_mean

    l = np.asarray(losses, dtype=float)
    if l.size < 2 or not np.all(np.isfinite(l)) or np.any(l <= 0):
        return float("nan")
    m = np.log10(running_mean(l, window))
    k_min = int(np.argmin(m))
    return float(np.clip(np.diff(m[: k_min + 1]), 0.0, None).sum())


# --------------------------------------------------------------------------- time left


def time_left(cfg: Mapping[str, Any], finished: pd.DataFrame, resumed_at: Mapping[str, int] | None = None,
              selection: Mapping[str, str] | None = None) -> pd.DataFrame:
    """The ablation's runs not in ``finished``, each with the time it should take at the measured rates.

    ``finished`` has one row per finished run: ``run`` (``grid/<experiment>/<configuration>/seed<N>``
    or ``confirm/<experiment>/<model>/seed<N>``), ``configuration`` (the one it trained, from its
    ``configuration.json``), ``n_parameters``, ``s_per_epoch`` and ``concurrent_jobs``. Only runs
    that had the device to themselves (``concurrent_jobs`` 1) give rates. ``resumed_at`` maps an
    unfinished run to the epoch of its checkpoint; ``selection`` a model to the configuration its
    confirmation trains, for confirmation runs none of whose seeds has finished.

    The seconds per epoch of a run, in this order (``basis`` says which):

    1. the median over finished runs of the same network (the model and the ``models`` section of
       the configuration's config: a learning rate or a Radon input that changes leaves the
       network, and so the cost, as it is) and experiment;
    2. the network's rate on another experiment plus that experiment's difference in rate for the
       measured network of the same model (SCNN or CNN) closest in parameter count (the Radon
       projector adds about the same time to an epoch whatever the network);
    3. none (NaN) when neither exists.

    Columns: ``run, experiment, configuration, epochs_left, s_per_epoch, estimate_s, basis``.
    """
    confs = {c.name: c for c in configurations(cfg)}
    merged = {name: configuration_config(cfg, conf) for name, conf in confs.items()}
    network = {name: confs[name].model + json.dumps(m["models"], sort_keys=True) for name, m in merged.items()}
    alone = finished[finished["concurrent_jobs"].fillna(1).astype(int) == 1].copy()
    alone["experiment"] = alone["run"].map(label_experiment)
    alone = alone[alone["configuration"].isin(list(confs))]
    alone["network"] = alone["configuration"].map(network)
    alone["model"] = [confs[c].model for c in alone["configuration"]]
    rate = alone.groupby(["network", "experiment"])["s_per_epoch"].median()
    count = alone.groupby(["network", "experiment"]).size()
    params = alone.groupby("network")["n_parameters"].median()
    model_of = alone.groupby("network")["model"].first()
    order = {name: i for i, name in enumerate(confs)}
    name_of = alone.groupby("network")["configuration"].agg(lambda names: min(names, key=order.__getitem__))

    def per_epoch(conf: Configuration, experiment: str) -> tuple[float, str]:
        key = network[conf.name]
        if (key, experiment) in rate.index:
            n = int(count[(key, experiment)])
            return float(rate[(key, experiment)]), f"median of {n} run{'s' * (n != 1)} of this network"
        for other in EXPERIMENTS:
            if other == experiment or (key, other) not in rate.index:
                continue
            both = [k for k in model_of.index if model_of[k] == conf.model
                    and (k, experiment) in rate.index and (k, other) in rate.index]
            if not both:
                continue
            near = min(both, key=lambda k: (abs(np.log(params[k] / params[key])), name_of[k]))
            extra = float(rate[(near, experiment)] - rate[(near, other)])
            return (float(rate[(key, other)]) + extra,
                    f"its {other} rate {rate[(key, other)]:.4g} s plus {extra:.4g} s, the {experiment} "
                    f"difference of {name_of[near]}'s network")
        return float("nan"), "no run of this network has finished"

    done = set(finished["run"])
    confirm_conf = {m: str(selection[m]) for m in (selection or {})}
    confirmed = {confirm_label(e, m, s): m for e, m, s in confirm_runs(cfg)}
    for run, name in zip(finished["run"], finished["configuration"]):
        if run in confirmed:
            confirm_conf.setdefault(confirmed[run], name)
    todo = [(grid_label(e, c, s), e, c) for e, c, s in grid_runs(cfg)]
    todo += [(confirm_label(e, m, s), e, confirm_conf.get(m, "")) for e, m, s in confirm_runs(cfg)]
    rows = []
    for label, experiment, name in todo:
        if label in done:
            continue
        if name in confs:
            epochs = int(merged[name][experiment]["epochs"])
            s, basis = per_epoch(confs[name], experiment)
        else:
            epochs, s, basis = int(cfg[experiment]["epochs"]), float("nan"), "its configuration is not selected yet"
        left = epochs - int((resumed_at or {}).get(label, 0))
        rows.append({"run": label, "experiment": experiment, "configuration": name, "epochs_left": left,
                     "s_per_epoch": s, "estimate_s": s * left, "basis": basis})
    return pd.DataFrame(rows, columns=["run", "experiment", "configuration", "epochs_left", "s_per_epoch",
                                       "estimate_s", "basis"])
