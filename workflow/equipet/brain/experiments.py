"""The brain-image experiments of the paper: denoising (III-A) and Radon reconstruction (III-B).

Both train one network (``cnn`` or ``scnn``) for one seed on a single brain slice,
as the paper does, and then measure what the paper claims rather than assume it:

* the image quality (PSNR, SSIM, NRMSE against the clean slice) at each snapshot epoch;
* generalisation: the trained network applied to *held-out* slices of the same volume;
* equivariance in use: the trained network applied to *rotated* copies of its own input,
  scored against the rotated truth, and the equivariance error
  :math:`\\|f(R_g x) - R_g f(x)\\| / \\|R_g f(x)\\|` inside the field of view.

Everything is written to one directory per (experiment, model, seed): the training
files of :func:`equipet.networks.training.train`, a tidy ``metrics.csv`` and ``eval.npz`` with
the images the figures show.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from equipet.brain.image import BrainSlices, disk_mask
from equipet.files import atomic_path
from equipet.metrics import image_metrics, tidy_rows
from equipet.networks.nets import build_model, rotate_image
from equipet.networks.training import ForwardModelMSELoss, MSELoss, TrainSettings, predict, seed_everything, train

log = logging.getLogger(__name__)


@dataclass
class Problem:
    """One experiment instance: what the network sees, what it is scored against.

    ``make_input`` turns a clean image into the network input the same way for the
    training slice, the held-out slices and the rotated copies, so that every
    evaluation sees data of the kind the network was trained on.
    """

    experiment: str
    clean: np.ndarray                       # (H, W) ground truth of the training slice
    net_input: np.ndarray                   # (H, W) what the network is trained on
    loss: Callable[[torch.Tensor], torch.Tensor]
    make_input: Callable[[np.ndarray, np.random.Generator], np.ndarray]
    extra: dict[str, np.ndarray]            # arrays saved for the figures (noisy image, sinogram, ...)


def poisson_noisy(image: np.ndarray, counts: float, rng: np.random.Generator) -> np.ndarray:
    """Poisson noise with ``counts`` expected counts at intensity 1, rescaled to the image's units."""
    return (rng.poisson(np.clip(image, 0, None) * counts) / counts).astype(np.float32)


def denoise_problem(cfg: dict[str, Any], brain: BrainSlices, seed: int) -> Problem:
    """Paper III-A: Poisson-noisy slice in; clean slice (or the noisy one itself) as target."""
    sec = cfg["denoise"]
    clean = brain.train.astype(np.float32)
    rng = np.random.default_rng(seed)

    def make_input(img: np.ndarray, r: np.random.Generator) -> np.ndarray:
        return poisson_noisy(img, sec["counts"], r)

    noisy = make_input(clean, rng)
    target = clean if sec["target"] == "clean" else noisy
    loss = MSELoss(torch.from_numpy(target)[None, None])
    return Problem("denoise", clean, noisy, loss, make_input, {"noisy": noisy})


def radon_problem(cfg: dict[str, Any], brain: BrainSlices, seed: int) -> Problem:
    """Paper III-B: sinogram of the slice; the loss compares the Radon transform of the output with it."""
    from equipet.brain.radon import RadonTransform, backprojection, fbp, poisson_sinogram

    sec = cfg["radon_recon"]
    clean = brain.train.astype(np.float32)
    size = clean.shape[-1]
    theta = np.linspace(0.0, 180.0, sec["n_angles"], endpoint=False)
    operator = RadonTransform(size, theta)
    rng = np.random.default_rng(seed)

    def sinogram_of(img: np.ndarray, r: np.random.Generator) -> np.ndarray:
        with torch.no_grad():
            sino = operator.apply(torch.from_numpy(img.astype(np.float64))).numpy()
        return sino if sec["counts"] is None else poisson_sinogram(sino, sec["counts"], r)

    sinogram = sinogram_of(clean, rng)
    fixed_noise = rng.standard_normal(clean.shape).astype(np.float32) * 0.1

    def input_from(sino: np.ndarray) -> np.ndarray:
        """The network input for a measured sinogram (``radon_recon.input``)."""
        if sec["input"] == "noise":
            return fixed_noise
        recon = fbp(sino, theta) if sec["input"] == "fbp" else backprojection(sino, theta)
        return recon.astype(np.float32)

    def make_input(img: np.ndarray, r: np.random.Generator) -> np.ndarray:
        return input_from(sinogram_of(img, r))

    net_input = input_from(sinogram)
    loss = ForwardModelMSELoss(operator, torch.from_numpy(sinogram.astype(np.float32))[None, None])
    return Problem("radon_recon", clean, net_input, loss, make_input,
                   {"sinogram": sinogram.astype(np.float32)})


PROBLEMS = {"denoise": denoise_problem, "radon_recon": radon_problem}


def _predict(model: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    """Apply the trained network to each (H, W) image on its own (see :func:`training.predict`)."""
    device = next(model.parameters()).device
    x = torch.from_numpy(np.asarray(images, dtype=np.float32)).to(device)[:, None]
    return np.stack([predict(model, xi[None])[0, 0].cpu().numpy() for xi in x])


def evaluate(model: torch.nn.Module, model_name: str, problem: Problem, brain: BrainSlices,
             cfg: dict[str, Any], seed: int) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
    """Score the trained network on held-out slices and on rotated copies of its input."""
    mask = disk_mask(problem.clean.shape[-1])
    epoch = cfg[problem.experiment]["epochs"]
    name = model_name
    rows: list[dict[str, Any]] = []
    arrays: dict[str, np.ndarray] = {}

    heldout, offsets = brain.heldout, brain.heldout_offsets
    if len(heldout):
        rng = np.random.default_rng(10_000 + seed)
        inputs = np.stack([problem.make_input(h.astype(np.float32), rng) for h in heldout])
        outputs = _predict(model, inputs)
        for off, out, truth, inp in zip(offsets, outputs, heldout, inputs):
            rows += tidy_rows(problem.experiment, name, seed, epoch, image_metrics(out, truth, mask=mask),
                              split="heldout", offset=int(off), angle_deg=0.0)
            rows += tidy_rows(problem.experiment, name, seed, epoch, image_metrics(inp, truth, mask=mask),
                              split="heldout_input", offset=int(off), angle_deg=0.0)
        arrays["heldout_outputs"] = outputs
        arrays["heldout_inputs"] = inputs

    base_in = torch.from_numpy(problem.net_input)
    base_out = torch.from_numpy(_predict(model, problem.net_input[None])[0])
    rot_outputs = []
    for angle in cfg["evaluation"]["rotations_deg"]:
        x_rot = rotate_image(base_in, angle).numpy()
        truth_rot = rotate_image(torch.from_numpy(problem.clean), angle).numpy()
        out_rot = _predict(model, x_rot[None])[0]
        rot_outputs.append(out_rot)
        m = image_metrics(out_rot, truth_rot, mask=mask)
        expected = rotate_image(base_out, angle).numpy()
        m["equivariance_error"] = float(np.linalg.norm((out_rot - expected)[mask])
                                        / max(np.linalg.norm(expected[mask]), 1e-12))
        rows += tidy_rows(problem.experiment, name, seed, epoch, m,
                          split="rotated", offset=0, angle_deg=float(angle))
    arrays["rotated_outputs"] = np.stack(rot_outputs) if rot_outputs else np.zeros((0,) + problem.clean.shape)
    arrays["rotation_angles_deg"] = np.asarray(cfg["evaluation"]["rotations_deg"], dtype=float)
    return rows, arrays


def run_experiment(experiment: str, cfg: dict[str, Any], brain_path: Path, model_name: str,
                   seed: int, out_dir: Path, extra_columns: dict[str, Any] | None = None) -> pd.DataFrame:
    """Train ``model_name`` for ``seed`` on ``experiment``; write metrics.csv and eval.npz in ``out_dir``.

    ``extra_columns`` are appended to every metrics row (the ablation's configuration columns).
    """
    brain = BrainSlices.load(brain_path)
    if "brain" in cfg:   # settings that carry the brain section (the ablation's) must match the file
        brain.check(cfg, brain_path)
    problem = PROBLEMS[experiment](cfg, brain, seed)
    sec = cfg[experiment]
    settings = TrainSettings(
        epochs=sec["epochs"], learning_rate=cfg["training"]["learning_rate"],
        snapshots=sorted(set(sec["snapshots"])), checkpoint_every=cfg["training"]["checkpoint_every"],
        seed=seed, device=cfg["device"], deterministic=cfg["training"]["deterministic"],
    )
    seed_everything(seed, settings.deterministic)
    model = build_model(model_name, cfg["models"])
    net_input = torch.from_numpy(problem.net_input)[None, None]
    result = train(model, net_input, problem.loss, settings, out_dir,
                   desc=f"{experiment}/{model_name}/seed{seed}")

    mask = disk_mask(problem.clean.shape[-1])
    rows: list[dict[str, Any]] = []
    rows += tidy_rows(experiment, model_name, seed, 0, image_metrics(problem.net_input, problem.clean, mask=mask),
                      split="input", offset=0, angle_deg=0.0)
    for epoch, image in sorted(result.snapshots.items()):
        rows += tidy_rows(experiment, model_name, seed, epoch, image_metrics(image, problem.clean, mask=mask),
                          split="train", offset=0, angle_deg=0.0)
    eval_rows, arrays = evaluate(result.model, model_name, problem, brain, cfg, seed)
    rows += eval_rows
    rows_df = pd.DataFrame(rows)
    for key, value in (extra_columns or {}).items():
        rows_df[key] = value

    epochs = sorted(result.snapshots)
    with atomic_path(out_dir / "eval.npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(
                fh, clean=problem.clean, net_input=problem.net_input,
                snapshot_epochs=np.asarray(epochs), snapshots=np.stack([result.snapshots[e] for e in epochs]),
                **problem.extra, **arrays)
    with atomic_path(out_dir / "metrics.csv") as tmp:
        rows_df.to_csv(tmp, index=False)
    log.info("%s/%s/seed%d: wrote %d metric rows to %s", experiment, model_name, seed, len(rows_df), out_dir)
    return rows_df
