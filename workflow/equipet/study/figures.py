"""Tables and figures: the paper's Fig. 2, 3 and 6 equivalents and the tidy metrics table.

Every figure shows all seeds: images are from the first seed, curves and points
show the spread over seeds (seaborn's 95% interval of the mean, or the range).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from equipet import cli  # noqa: E402
from equipet.errors import InputDataError  # noqa: E402
from equipet.files import atomic_path  # noqa: E402
from equipet.runs import collect_losses, read_tables, run_labels  # noqa: E402

log = logging.getLogger(__name__)

MODEL_LABELS = {"cnn": "CNN", "scnn": "SCNN"}
INPUT_LABELS = {"denoise": "noisy input", "radon_recon": "network input (FBP)"}


def _save(fig: plt.Figure, out: Path) -> None:
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=130, bbox_inches="tight", format=out.suffix.lstrip("."))
    plt.close(fig)


def brain_experiment_figure(experiment: str, run_dirs: Sequence[Path], out: Path) -> None:
    """Fig. 2 (denoising) or Fig. 3 (reconstruction): truth, input, both models at both
    snapshot epochs (first seed), and the loss curves of every seed with a zoom on the start."""
    by_model: dict[str, list[Path]] = {}
    for d in sorted(run_dirs):
        by_model.setdefault(d.parent.name, []).append(d)
    first = {m: np.load(ds[0] / "eval.npz") for m, ds in by_model.items()}
    models = [m for m in MODEL_LABELS if m in first]
    ref = first[models[0]]
    epochs = list(ref["snapshot_epochs"])
    n_img = 2 + len(models) * len(epochs)
    fig = plt.figure(figsize=(2.3 * max(n_img, 4), 6.2), layout="constrained")
    grid = fig.add_gridspec(2, max(n_img, 4), height_ratios=[1.0, 0.9])
    clean = ref["clean"]
    vmax = float(np.percentile(clean, 99.8))
    panels = [("truth", clean), (INPUT_LABELS[experiment], ref["net_input"])]
    for e_idx, epoch in enumerate(epochs):
        for m in models:
            panels.append((f"{MODEL_LABELS[m]}, epoch {epoch}", first[m]["snapshots"][e_idx]))
    for i, (title, img) in enumerate(panels):
        ax = fig.add_subplot(grid[0, i])
        ax.imshow(img, cmap="gray", vmin=0, vmax=vmax)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    losses = collect_losses(run_dirs)
    losses["model"] = losses["model"].map(MODEL_LABELS)
    half = max(n_img, 4) // 2
    ax = fig.add_subplot(grid[1, :half])
    sns.lineplot(losses, x="epoch", y="loss", hue="model", errorbar=("pi", 100), ax=ax)
    ax.set_yscale("log")
    ax.set_title("loss per epoch (band: range over seeds)", fontsize=9)
    ax = fig.add_subplot(grid[1, half:])
    zoom = losses[losses["epoch"] <= max(losses["epoch"].max() // 10, 10)]
    sns.lineplot(zoom, x="epoch", y="loss", hue="model", errorbar=("pi", 100), ax=ax)
    ax.set_yscale("log")
    ax.set_title("zoom on the first 10% of epochs", fontsize=9)
    _save(fig, out)


def group_action_figure(brain_npz: Path, out: Path, group: str, order: int, counts: float) -> None:
    """Fig. 6: the noisy brain image transformed by every element of the network's group."""
    import torch

    from equipet.brain.image import BrainSlices
    from equipet.brain.experiments import poisson_noisy
    from equipet.networks.nets import group_action_copies

    clean = BrainSlices.load(brain_npz).train.astype(np.float32)
    noisy = poisson_noisy(clean, counts, np.random.default_rng(0))
    copies, labels = group_action_copies(torch.from_numpy(noisy), group=group, order=order)
    n = copies.shape[0]
    cols = min(n, 8)
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(1.9 * cols, 2.0 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, label in zip(axes.flat, copies.numpy(), labels):
        ax.imshow(img, cmap="gray")
        ax.set_title(label, fontsize=8)
    fig.suptitle(f"action of {group}{order} on the noisy input", fontsize=10)
    _save(fig, out)


def generalisation_figure(metrics: pd.DataFrame, out: Path) -> None:
    """PSNR and SSIM on the training slice, held-out slices and rotated inputs, per model (all seeds)."""
    df = metrics[metrics["experiment"].isin(["denoise", "radon_recon"])
                 & metrics["metric"].isin(["psnr", "ssim"])].copy()
    last = df.groupby("experiment")["epoch"].transform("max")
    df = df[(df["split"].isin(["heldout", "rotated"])) | ((df["split"] == "train") & (df["epoch"] == last))]
    df["model"] = df["model"].map(MODEL_LABELS)
    grid = sns.catplot(df, x="split", y="value", hue="model", col="experiment", row="metric",
                       kind="point", errorbar=("pi", 100), dodge=0.3, sharey=False,
                       order=["train", "heldout", "rotated"], height=2.8, aspect=1.2)
    grid.set_titles("{row_name} | {col_name}")
    grid.figure.suptitle("trained networks on their slice, held-out slices and rotated inputs "
                         "(range over seeds and slices/angles)", fontsize=9, y=1.02)
    _save(grid.figure, out)


def gather_tables(metric_files: Sequence[Path], timing_files: Sequence[Path],
                  metrics_out: Path, timing_out: Path) -> pd.DataFrame:
    """Concatenate per-run metrics into the tidy ``metrics.csv``; timings into ``timing.csv``."""
    metrics = read_tables(metric_files)
    with atomic_path(metrics_out) as tmp:
        metrics.to_csv(tmp, index=False)
    rows = []
    for f in timing_files:
        f = Path(f)
        try:
            t = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise InputDataError(f"cannot read timing ({exc})", where=str(f),
                                 fix="rerun the training rule that writes it") from exc
        rows.append({**run_labels(f.parent), **t})
    with atomic_path(timing_out) as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False)
    return metrics
