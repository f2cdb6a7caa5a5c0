"""Figures and tables of the assisted reconstruction (paper Fig. 4 and 5 equivalents).

``equipet-recon-figures`` subcommands:

``assisted``
    one figure per CTR: images (truth, early-MLEM input, best MLEM + Gaussian baseline, CNN
    and SCNN at their last snapshot, first seed), the rod-sector line profiles of every rod
    size through the same images (the outermost row of each sector, as scored by the
    valley-to-peak ratio of :mod:`equipet.assisted.rod_metrics`), and the loss curves of every seed with
    a zoom on the first 1000 epochs (Fig. 4b-c, 5b).
``crc``
    CTR x model: CRC and valley-to-peak ratio per rod size, mean and sd over seeds, networks
    against the MLEM-only baselines.
``summary``
    one table per CTR: every metric at the last snapshot (networks) or the chosen iteration
    (baselines), mean and sd over seeds, plus the loss-curve summaries.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from equipet import cli  # noqa: E402
from equipet.errors import InputDataError  # noqa: E402
from equipet.runs import collect_losses, read_tables
from equipet.files import atomic_path  # noqa: E402

log = logging.getLogger("equipet.assisted.figures")

LABELS = {"cnn": "CNN-assisted", "scnn": "SCNN-assisted", "mlem_early": "MLEM (early)",
          "mlem_best": "MLEM (best it.)", "mlem_best_gauss": "MLEM best + Gauss", "mlem": "MLEM"}
ORDER = ["mlem_early", "mlem_best", "mlem_best_gauss", "cnn", "scnn"]
COLORS = {"truth": "k", "mlem_early": "0.6", "mlem_best": "tab:green", "mlem_best_gauss": "tab:olive",
          "cnn": "tab:blue", "scnn": "tab:red"}


def _save(fig: plt.Figure, out: Path) -> None:
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format=out.suffix.lstrip("."))
    plt.close(fig)


def of_method(metrics: pd.DataFrame, method: str | None) -> pd.DataFrame:
    """The rows of one assisted method, plus the MLEM baselines (which have no method)."""
    if method is None or "method" not in metrics:
        return metrics
    return metrics[(metrics["method"] == method) | metrics["method"].isna()]


def final_rows(metrics: pd.DataFrame) -> pd.DataFrame:
    """Assisted rows at each run's last snapshot, and the baseline rows (``split=baseline``)."""
    a = metrics[metrics["experiment"] == "assisted"]
    train = a[a["split"] == "train"]
    keys = ["ctr_ps", "method", "model", "seed"] if "method" in a else ["ctr_ps", "model", "seed"]
    last = train.groupby(keys, dropna=False)["epoch"].transform("max")
    return pd.concat([train[train["epoch"] == last], a[a["split"].isin(["baseline", "training"])]],
                     ignore_index=True)


def assisted_figure(slice_npz: Path, run_dirs: Sequence[Path], phantom_cfg: dict, out: Path,
                    method: str = "") -> None:
    """Fig. 4/5 equivalent for one CTR and method (module doc)."""
    from equipet.assisted.central_slice import geometry_from_npz
    from equipet.simulation.phantom import hot_rod_phantom
    from equipet.assisted.rod_metrics import outer_row, row_profile

    data = np.load(slice_npz)
    geom = geometry_from_npz(data)
    rods = hot_rod_phantom(phantom_cfg).rods
    by_model: dict[str, list[Path]] = {}
    for d in sorted(run_dirs, key=lambda p: (p.parent.name, int(p.name.removeprefix("seed")))):
        by_model.setdefault(d.parent.name, []).append(Path(d))
    images = {"truth": data["truth"], "mlem_early": data["early"], "mlem_best_gauss": data["baseline_mlem_best_gauss"]}
    epochs = {}
    for m in ("cnn", "scnn"):
        if m in by_model:
            ev = np.load(by_model[m][0] / "eval.npz")
            images[m] = ev["snapshots"][-1]
            epochs[m] = int(ev["snapshot_epochs"][-1])
    titles = {"truth": "truth", "mlem_early": f"MLEM it. {int(data['early_iteration'])} (input)",
              "mlem_best_gauss": f"MLEM it. {int(data['baseline_mlem_best_gauss_iteration'])} + "
                                 f"{float(data['baseline_mlem_best_gauss_fwhm_mm']):g} mm Gauss",
              **{m: f"{LABELS[m]}, epoch {e}" for m, e in epochs.items()}}
    sectors = sorted(np.unique(rods[:, 3]).astype(int))
    n_img = len(images)
    ncol = max(n_img, len(sectors), 4)
    fig = plt.figure(figsize=(2.6 * ncol, 8.4), layout="constrained")
    grid = fig.add_gridspec(3, ncol, height_ratios=[1.1, 0.8, 0.9])
    lo = [o - v / 2 for o, v in zip(geom.origin_mm, geom.voxel_size_mm)]
    ext = [lo[0], lo[0] + geom.extent_mm[0], lo[1], lo[1] + geom.extent_mm[1]]
    c = geom.voxel_centres_mm()[..., 0, :]
    disk = np.hypot(c[..., 0], c[..., 1]) <= hot_rod_phantom(phantom_cfg).active_diameter_mm / 2.0
    for i, (name, img) in enumerate(images.items()):
        ax = fig.add_subplot(grid[0, i])
        vmax = float(np.percentile(img[disk], 99.5)) or 1.0
        ax.imshow(img.T, origin="lower", extent=ext, cmap="gray", vmin=0, vmax=vmax)
        ax.set_title(titles[name], fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
        if name == "truth":
            for k in sectors:
                row = outer_row(rods, k)
                ax.plot(row[[0, -1], 0], row[[0, -1], 1], "-", color="tab:orange", lw=0.8)
    for j, k in enumerate(sectors):
        row = outer_row(rods, k)
        ax = fig.add_subplot(grid[1, j])
        for name, img in images.items():
            t, p, centres = row_profile(img, geom, row)
            ax.plot(t, p / max(float(np.percentile(img[disk], 99)), 1e-12), color=COLORS.get(name, "k"), lw=1.0,
                    label=titles[name] if j == 0 else None)
        ax.set_title(f"{row[0, 2]:g} mm rods", fontsize=8)
        ax.set_xlabel("along the row (mm)", fontsize=7)
        if j == 0:
            ax.set_ylabel("image / its 99th percentile in the disk", fontsize=7)
        ax.tick_params(labelsize=7)
    fig.legend(loc="outside right center", fontsize=7)
    dirs = [d for ds in by_model.values() for d in ds]
    if dirs:
        loss = collect_losses(dirs)
        half = max(ncol // 2, 1)
        for k, (sl, title) in enumerate(((slice(None), "loss, all epochs"), (slice(0, 1000), "first 1000 epochs"))):
            ax = fig.add_subplot(grid[2, k * half:(k + 1) * half])
            for (m, s), g in loss.groupby(["model", "seed"]):
                g = g.iloc[sl]
                ax.plot(g["epoch"], g["loss"], color=COLORS.get(m, "k"), lw=0.8, alpha=0.8,
                        label=f"{LABELS.get(m, m)} seed {s}")
            shown = np.concatenate([g["loss"].to_numpy()[sl] for _, g in loss.groupby(["model", "seed"])])
            lo, hi = float(np.min(shown)), float(np.percentile(shown, 98))
            ax.set_ylim(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo) + 1e-12)
            ax.set_title(title, fontsize=8)
            ax.set_xlabel("epoch", fontsize=7)
            ax.tick_params(labelsize=7)
            if k == 0:
                ax.legend(fontsize=6)
    fig.suptitle(f"Assisted reconstruction, CTR {float(data['ctr_ps']):g} ps"
                 + (f", method {method}" if method else ""), fontsize=10)
    _save(fig, out)


def crc_figure(metrics: pd.DataFrame, out: Path) -> None:
    """CTR x model: CRC and VPR per rod size, mean +- sd over seeds (module doc)."""
    f = final_rows(metrics)
    f = f[f["metric"].isin(["crc", "vpr"]) & f["model"].isin(ORDER)]
    if f.empty:
        raise InputDataError("no assisted CRC rows", where="metrics", fix="run the assisted rules first")
    ctrs = sorted(f["ctr_ps"].unique())
    fig, axes = plt.subplots(2, len(ctrs), figsize=(4.2 * len(ctrs), 6.5), squeeze=False, layout="constrained",
                             sharey="row")
    for j, ctr in enumerate(ctrs):
        for i, metric in enumerate(("crc", "vpr")):
            ax = axes[i, j]
            sub = f[(f["ctr_ps"] == ctr) & (f["metric"] == metric)]
            for k, m in enumerate([m for m in ORDER if m in set(sub["model"])]):
                g = sub[sub["model"] == m].groupby("rod_mm")["value"].agg(["mean", "std"]).reset_index()
                x = g["rod_mm"] + (k - 2) * 0.08
                ax.errorbar(x, g["mean"], yerr=g["std"].fillna(0), marker="o", ms=3, lw=1, capsize=2,
                            color=COLORS[m], label=LABELS[m])
            ax.set_xlabel("rod diameter (mm)")
            ax.set_ylabel("CRC" if metric == "crc" else "valley-to-peak ratio")
            ax.set_title(f"CTR {ctr:g} ps", fontsize=9)
            if metric == "vpr":
                ax.set_ylim(bottom=0)
    axes[0, -1].legend(fontsize=7)
    _save(fig, out)


def summary_table(metrics: pd.DataFrame, ctr_ps: float) -> pd.DataFrame:
    """Per model (networks and baselines): every metric's mean and sd over seeds at one CTR."""
    f = final_rows(metrics)
    f = f[f["ctr_ps"] == ctr_ps].copy()
    f["name"] = np.where(f["rod_mm"].notna(), f["metric"] + "_" + f["rod_mm"].map(lambda d: f"{d:g}mm"),
                         f["metric"])
    g = f.groupby(["model", "name"])["value"].agg(["mean", "std", "count"]).reset_index()
    wide = g.pivot(index="model", columns="name", values=["mean", "std"])
    wide.columns = [f"{name}_{stat}" for stat, name in wide.columns]
    wide = wide[sorted(wide.columns)]
    wide.insert(0, "n_seeds", g.groupby("model")["count"].max())
    wide.insert(0, "ctr_ps", ctr_ps)
    order = [m for m in ORDER if m in wide.index] + [m for m in wide.index if m not in ORDER]
    return wide.loc[order].reset_index()
