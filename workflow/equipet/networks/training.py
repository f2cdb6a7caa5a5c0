"""One training engine for every experiment: fit a network to one image with Adam.

The paper trains each network on a single input image (section III): for ``epochs``
steps, Adam minimises a loss of the network output ``f_w(x)``,

    w_{k+1} = Adam(w_k, grad_w L(f_w(x))),

where ``L`` is one of the loss callables below; each binds its data (a target
image, or a forward operator and a measurement) at construction, so that every
loss has the same signature ``loss(output) -> scalar`` and :func:`train` need not
know which experiment it is running.

Outputs written into ``out_dir`` (all atomically, see :func:`equipet.files.atomic_path`):

``loss.csv``
    ``epoch, loss, wall_time_s``: the loss of epoch ``k`` is evaluated (train
    mode) on the weights *before* the k-th Adam step; ``wall_time_s`` is the
    cumulative training time up to the end of that step.
``snapshots/epoch_{k:06d}.npy``
    the network output ``(H, W)`` float32 in eval mode after ``k`` steps.
``timing.json``
    ``epochs, epochs_requested, stopped_early, total_s, s_per_epoch, device, torch,
    n_parameters, resumed_from_epoch, batched_runs, concurrent_jobs, load_average_end, cpu_count``
    (``resumed_from_epoch`` is 0 for a run that started from scratch; ``batched_runs`` the number
    of runs that shared each step in one process, 1 here and R for runs trained together by
    :mod:`equipet.networks.stacked`; ``concurrent_jobs`` the training processes its launcher ran
    side by side, from ``EQUIPET_CONCURRENT_JOBS``, null when none said; ``load_average_end`` the
    machine's 1, 5 and 15 minute load averages when it finished, a check on that).
``model.pt``
    the final ``state_dict`` (CPU tensors; taken in eval mode so that it loads
    into a freshly built model).
``checkpoint.pt``
    every ``checkpoint_every`` epochs and at the end: weights, Adam state,
    epoch, loss history, wall time and the torch/numpy/python RNG states, and the
    state of a loss that has one (``loss.checkpoint_state()``, restored by
    ``loss.load_checkpoint_state``; e.g. the SAGA table of the stochastic
    likelihood). A run finding a checkpoint of the same run continues from it; a
    loss's ``fingerprint()`` belongs to what must match.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from equipet.device import select_device
from equipet.errors import ConfigError, EquipetError, InputDataError, TrainingDivergedError
from equipet.files import atomic_path

log = logging.getLogger(__name__)

__all__ = [
    "MSELoss",
    "ForwardModelMSELoss",
    "PoissonNLLLoss",
    "TrainSettings",
    "TrainResult",
    "seed_everything",
    "train",
    "seconds_per_epoch",
    "CHECKPOINT_NAME",
]

CHECKPOINT_NAME = "checkpoint.pt"
_CHECKPOINT_FORMAT = 1


# --------------------------------------------------------------------------- losses


def _as_image_batch(t: torch.Tensor | np.ndarray) -> torch.Tensor:
    """A float32 tensor of shape (B, 1, ...); a 2-D array becomes (1, 1, H, W)."""
    t = torch.as_tensor(t, dtype=torch.float32)
    if t.ndim == 2:
        t = t[None, None]
    return t


class MSELoss(torch.nn.Module):
    """Supervised image loss ``L(y) = mean((y - target)^2)``.

    >>> loss = MSELoss(torch.ones(2, 2))
    >>> float(loss(torch.zeros(1, 1, 2, 2)))
    1.0
    """

    def __init__(self, target: torch.Tensor | np.ndarray):
        super().__init__()
        self.register_buffer("target", _as_image_batch(target))

    def forward(self, output: torch.Tensor) -> torch.Tensor:
        if output.shape != self.target.shape:
            raise ValueError(f"MSELoss: output shape {tuple(output.shape)} != target shape {tuple(self.target.shape)}")
        return torch.mean((output - self.target) ** 2)


class _ForwardModelLoss(torch.nn.Module):
    """A loss comparing ``operator(output)`` with a fixed measurement of the same shape."""

    def __init__(self, operator: Callable[[torch.Tensor], torch.Tensor], measurement: torch.Tensor | np.ndarray):
        super().__init__()
        self.operator = operator
        self.register_buffer("measurement", _as_image_batch(measurement))

    def predicted(self, output: torch.Tensor) -> torch.Tensor:
        """``operator(output)``, checked against the measurement's shape."""
        predicted = self.operator(output)
        if predicted.shape != self.measurement.shape:
            raise ValueError(
                f"{type(self).__name__}: operator output shape {tuple(predicted.shape)} "
                f"!= measurement shape {tuple(self.measurement.shape)}"
            )
        return predicted


class ForwardModelMSELoss(_ForwardModelLoss):
    """Physics (data-consistency) loss ``L(y) = mean((A(y) - m)^2)``.

    ``operator`` ``A`` is any differentiable callable mapping the network output
    ``(B, 1, H, W)`` to the measurement space (e.g. a Radon transform giving a
    sinogram ``(B, 1, n_det, n_angles)``); ``measurement`` ``m`` has that shape
    (a 2-D array is taken as ``(1, 1, ...)``). An ``nn.Module`` operator moves
    with the loss to the training device.

    >>> loss = ForwardModelMSELoss(lambda y: 2 * y, torch.full((3, 3), 2.0))
    >>> float(loss(torch.ones(1, 1, 3, 3)))
    0.0
    """

    def forward(self, output: torch.Tensor) -> torch.Tensor:
        return torch.mean((self.predicted(output) - self.measurement) ** 2)


class PoissonNLLLoss(_ForwardModelLoss):
    """Poisson negative log-likelihood ``L(y) = sum(A(y) - m log A(y))`` (constants dropped).

    ``A(y)`` is the expected counts and ``m`` the measured counts. Below
    ``floor_counts`` the term is continued by its tangent at ``floor_counts``
    (so the loss stays finite and keeps pushing non-positive predictions up)
    instead of taking ``log`` of a non-positive number.

    >>> loss = PoissonNLLLoss(lambda y: y, torch.ones(1, 1))
    >>> round(float(loss(torch.ones(1, 1, 1, 1))), 6)    # 1 - 1*log(1)
    1.0
    """

    def __init__(
        self,
        operator: Callable[[torch.Tensor], torch.Tensor],
        measurement: torch.Tensor | np.ndarray,
        floor_counts: float = 1e-6,
    ):
        if not floor_counts > 0:
            raise ValueError(f"floor_counts must be > 0, got {floor_counts}")
        super().__init__(operator, measurement)
        self.floor_counts = float(floor_counts)

    def forward(self, output: torch.Tensor) -> torch.Tensor:
        expected = self.predicted(output)
        m = self.measurement
        f = self.floor_counts
        # select the branch (not add the tangent everywhere): above the floor the tangent's
        # gradient terms (1 - m/f) - (1 - m/f) would cancel catastrophically in float32
        above = expected > f
        safe = torch.where(above, expected, torch.full_like(expected, f))
        at_floor = f - m * math.log(f) + (1.0 - m / f) * (expected - f)
        return torch.sum(torch.where(above, safe - m * torch.log(safe), at_floor))


# --------------------------------------------------------------------------- settings & results


@dataclass
class TrainSettings:
    """Settings of one training run (defaults live in the config schema, not here).

    epochs: number of Adam steps (one per epoch, on the single input image).
    learning_rate: Adam step size.
    snapshots: epochs after which the eval-mode output is saved.
    checkpoint_every: write ``checkpoint.pt`` every this many epochs (and at the end).
    seed: seeds torch, numpy and python's ``random``.
    device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (see :func:`equipet.device.select_device`).
    deterministic: use deterministic algorithms (bit-reproducible on the CPU).
    lr_milestones: epochs after which the step size is multiplied by ``lr_gamma`` (a step
        decay; empty = constant).
    """

    epochs: int
    learning_rate: float
    snapshots: list[int]
    checkpoint_every: int
    seed: int
    device: str
    deterministic: bool
    lr_milestones: list[int] = field(default_factory=list)
    lr_gamma: float = 0.1


@dataclass
class TrainResult:
    """What :func:`train` returns (the same numbers are in the files it writes)."""

    losses: np.ndarray  # (epochs,) loss of each epoch
    snapshots: dict[int, np.ndarray]  # epoch -> (H, W) eval-mode output
    total_s: float  # training wall time, summed over resumed sessions
    device: str
    model: torch.nn.Module
    wall_time_s: np.ndarray  # (epochs,) cumulative training time at the end of each epoch
    resumed_from_epoch: int  # 0 when the run started from scratch


# --------------------------------------------------------------------------- helpers


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed python's ``random``, numpy and torch (all devices) with ``seed``.

    Call it before building the model so that weight initialisation is
    reproducible; :func:`train` calls it again at the start of training. With
    ``deterministic``, cuDNN autotuning is switched off (the CPU/GPU choice of
    ``torch.use_deterministic_algorithms`` is made in :func:`train`).
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def _rng_state() -> dict[str, Any]:
    """RNG states as plain python/tensor objects (loadable with ``weights_only=True``)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fingerprint(model: torch.nn.Module, net_input: torch.Tensor, loss: Callable, settings: TrainSettings) -> dict[str, Any]:
    """What identifies a run: resuming is only allowed when all of it matches.

    ``epochs``, ``snapshots``, ``checkpoint_every`` and ``device`` are left out:
    extending a run, saving other snapshots or resuming elsewhere is allowed.
    """
    data = net_input.detach().to("cpu", torch.float32).contiguous().numpy()
    schedule = ({"lr_milestones": sorted(int(m) for m in settings.lr_milestones), "lr_gamma": float(settings.lr_gamma)}
                if settings.lr_milestones else {})
    loss_settings = loss.fingerprint() if callable(getattr(loss, "fingerprint", None)) else None
    return {
        **schedule,
        **({"loss_settings": loss_settings} if loss_settings is not None else {}),
        "model_class": type(model).__name__,
        "parameter_shapes": {name: list(p.shape) for name, p in model.named_parameters()},
        "loss_class": type(loss).__name__,
        "input_shape": list(data.shape),
        "input_sha256": hashlib.sha256(data.tobytes()).hexdigest(),
        "learning_rate": float(settings.learning_rate),
        "seed": int(settings.seed),
        "deterministic": bool(settings.deterministic),
    }


def _state_dict_cpu(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """CPU copy of the eval-mode ``state_dict`` (escnn adds its expanded filters in eval
    mode; a freshly built model has them too, so this loads into one strictly)."""
    was_training = model.training
    model.eval()
    try:
        return {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}
    finally:
        model.train(was_training)


def _check_finite_data(net_input: torch.Tensor, loss: Callable, out_dir: Path) -> None:
    tensors = {"network input": net_input}
    if isinstance(loss, torch.nn.Module):
        tensors.update({f"loss {name}": buf for name, buf in loss.named_buffers()})
    for what, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).sum())
            raise InputDataError(
                f"the {what} has {bad} non-finite (NaN or inf) values",
                where=str(out_dir),
                fix="check the image/sinogram file this stage read (re-run the stage that made it)",
            )


def _write_loss_csv(path: Path, losses: list[float], wall_time_s: list[float]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["epoch", "loss", "wall_time_s"])
        for epoch, (value, seconds) in enumerate(zip(losses, wall_time_s), start=1):
            writer.writerow([epoch, repr(float(value)), f"{seconds:.6f}"])


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        np.save(tmp, array)


def _save_torch(path: Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _snapshot_path(out_dir: Path, epoch: int) -> Path:
    return out_dir / "snapshots" / f"epoch_{epoch:06d}.npy"


@torch.no_grad()
@torch.no_grad()
def predict(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The network's output as trained: batch normalisation with the input's own statistics.

    Every experiment fits a network to a single image, so each training step normalises
    with that image's statistics; the running averages that eval mode would use lag behind
    the weights (for the SCNN at epoch 50 of a denoising run they give 3x the MSE of the
    function the loss optimised). ``predict`` evaluates the optimised function: batch-norm
    layers in training mode with ``momentum = 0``, so their running statistics are left
    untouched. Both networks stay equivariant: the statistics of a rotated image are those
    of the image.
    """
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    was_training = model.training
    momenta = [m.momentum for m in norms]
    model.train()
    try:
        for m in norms:
            m.momentum = 0.0
        return model(x)
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.train(was_training)


def _eval_output(model: torch.nn.Module, net_input: torch.Tensor) -> np.ndarray:
    return predict(model, net_input)[0, 0].to("cpu", torch.float32).numpy().copy()


def _load_checkpoint(path: Path, fingerprint: dict[str, Any], settings: TrainSettings) -> dict[str, Any]:
    fix = f"delete {path} to start this run over"
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, not a torch file, foreign pickle ...
        raise InputDataError(f"cannot read the checkpoint ({type(exc).__name__}: {exc})", where=str(path), fix=fix) from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != _CHECKPOINT_FORMAT:
        raise InputDataError("not an equipet training checkpoint (format mismatch)", where=str(path), fix=fix)
    stored = ckpt["fingerprint"]
    if stored != fingerprint:
        differing = sorted(k for k in set(stored) | set(fingerprint) if stored.get(k) != fingerprint.get(k))
        raise EquipetError(
            "the checkpoint belongs to a different run (differs in: " + ", ".join(differing) + ")",
            where=str(path),
            fix=fix + ", or restore the settings/model/input it was made with",
        )
    if ckpt["epoch"] > settings.epochs:
        raise EquipetError(
            f"the checkpoint is at epoch {ckpt['epoch']}, beyond the requested epochs={settings.epochs}",
            where=str(path),
            fix=f"set epochs >= {ckpt['epoch']}, or {fix}",
        )
    return ckpt


# --------------------------------------------------------------------------- the engine


def train(
    model: torch.nn.Module,
    net_input: torch.Tensor,
    loss: Callable[[torch.Tensor], torch.Tensor],
    settings: TrainSettings,
    out_dir: str | os.PathLike,
    desc: str = "",
    on_epoch_end: Callable[[int, float], None] | None = None,
    stop_rule: Callable[[list[float]], bool] | None = None,
) -> TrainResult:
    """Train ``model`` on the single ``net_input`` (1, 1, H, W) to minimise ``loss(model(net_input))``.

    ``stop_rule(losses)``, when given, is asked after every epoch with the loss history; when it
    answers True training ends there (an early stop): a snapshot of that epoch is saved, the
    checkpoint records the stop (a rerun does not train on), and ``timing.json`` counts the
    epochs actually run.

    One Adam step per epoch. Writes the files listed in the module docstring
    into ``out_dir``; resumes from ``out_dir/checkpoint.pt`` when it holds an
    earlier state of the same run (same model, input, loss class, learning rate,
    seed, determinism), otherwise raises :class:`EquipetError` naming the file.
    On the CPU with ``deterministic`` a resumed run reproduces the
    uninterrupted one bit for bit.

    ``on_epoch_end(epoch, loss_value)`` is called after each epoch's outputs are
    written (progress reporting; tests use it to simulate an interruption).

    Raises :class:`TrainingDivergedError` on a NaN/inf loss or weights, leaving
    the last good checkpoint in place, and :class:`InputDataError` when the input
    or the loss's data contain NaN/inf.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if net_input.ndim != 4 or net_input.shape[:2] != (1, 1):
        raise ValueError(f"net_input must have shape (1, 1, H, W), got {tuple(net_input.shape)}")
    bad_snapshots = [s for s in settings.snapshots if not 1 <= s <= settings.epochs]
    if bad_snapshots:
        raise EquipetError(
            f"snapshot epochs {bad_snapshots} are outside 1..epochs={settings.epochs}",
            where="training settings: snapshots",
            fix="keep every snapshot between 1 and epochs",
        )
    device = select_device(settings.device)
    concurrent_jobs()   # a malformed EQUIPET_CONCURRENT_JOBS is refused before training, not after
    seed_everything(settings.seed, settings.deterministic)
    previous_det = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    if settings.deterministic:
        # Strict on the CPU; on CUDA a few kernels (e.g. grid_sample backward) have no
        # deterministic version, so warn instead of failing there.
        torch.use_deterministic_algorithms(True, warn_only=device.type != "cpu")
    try:
        return _train(model, net_input, loss, settings, out_dir, desc, on_epoch_end, device, stop_rule)
    finally:
        torch.use_deterministic_algorithms(previous_det[0], warn_only=previous_det[1])


def _train(
    model: torch.nn.Module,
    net_input: torch.Tensor,
    loss: Callable[[torch.Tensor], torch.Tensor],
    settings: TrainSettings,
    out_dir: Path,
    desc: str,
    on_epoch_end: Callable[[int, float], None] | None,
    device: torch.device,
    stop_rule: Callable[[list[float]], bool] | None = None,
) -> TrainResult:
    fingerprint = _fingerprint(model, net_input, loss, settings)
    model.to(device)
    model.train()
    net_input = net_input.detach().to(device=device, dtype=torch.float32)
    if isinstance(loss, torch.nn.Module):
        loss.to(device)
    _check_finite_data(net_input, loss, out_dir)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.learning_rate)
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)

    losses: list[float] = []
    wall_time_s: list[float] = []
    start_epoch = 0
    stopped_at = 0          # epoch of an early stop (stop_rule), 0 when none
    ckpt_path = out_dir / CHECKPOINT_NAME
    if ckpt_path.exists():
        ckpt = _load_checkpoint(ckpt_path, fingerprint, settings)
        model.eval()  # the checkpoint holds an eval-mode state_dict (see _state_dict_cpu)
        model.load_state_dict(ckpt["model"])
        model.train()
        optimizer.load_state_dict(ckpt["optimizer"])
        if "loss_state" in ckpt:
            loss.load_checkpoint_state(ckpt["loss_state"])
        losses = [float(v) for v in ckpt["losses"]]
        wall_time_s = [float(v) for v in ckpt["wall_time_s"]]
        start_epoch = int(ckpt["epoch"])
        stopped_at = start_epoch if ckpt.get("stopped_early") else 0
        _set_rng_state(ckpt["rng"])
        log.info("%s: resuming from %s at epoch %d", desc or out_dir, ckpt_path, start_epoch)

    snapshot_set = set(settings.snapshots)
    snapshots = _earlier_snapshots(out_dir, settings, start_epoch, desc)

    log.info(
        "%s: training %s (%d parameters) on %s for %d epochs, lr=%g, seed=%d",
        desc or out_dir, type(model).__name__, n_parameters, device, settings.epochs,
        settings.learning_rate, settings.seed,
    )

    last_checkpoint = [start_epoch]  # epoch of the checkpoint on disk (0: none)

    def write_checkpoint(epoch: int) -> None:
        _write_checkpoint(out_dir, _checkpoint(fingerprint, epoch, _state_dict_cpu(model), optimizer.state_dict(),
                                               losses, wall_time_s, _rng_state(), settings, bool(stopped_at), loss))
        last_checkpoint[0] = epoch

    def diverged(epoch: int, what: str) -> TrainingDivergedError:
        kept = (f"the checkpoint of epoch {last_checkpoint[0]} is kept: {ckpt_path}"
                if last_checkpoint[0] else "no checkpoint was written yet")
        return TrainingDivergedError(
            f"{what} at epoch {epoch} ({kept})",
            where=str(out_dir),
            fix="lower training.learning_rate, and check the input image/sinogram for NaN or extreme values; "
            f"delete {ckpt_path} to start over",
        )

    elapsed_s = wall_time_s[-1] if wall_time_s else 0.0
    bar = tqdm(
        range(start_epoch + 1, (stopped_at or settings.epochs) + 1),
        desc=desc or out_dir.name, initial=start_epoch, total=settings.epochs, mininterval=1.0, leave=False,
    )
    for epoch in bar:
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        value = loss(model(net_input))
        value_f = float(value.detach())
        if not math.isfinite(value_f):
            bar.close()
            raise diverged(epoch, f"the loss became {value_f}")
        value.backward()
        if settings.lr_milestones:   # step decay, a function of the epoch alone (resumes exactly)
            lr = settings.learning_rate * settings.lr_gamma ** sum(epoch > m for m in settings.lr_milestones)
            for group in optimizer.param_groups:
                group["lr"] = lr
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed_s += time.perf_counter() - t0
        losses.append(value_f)
        wall_time_s.append(elapsed_s)

        if epoch in snapshot_set:
            snapshots[epoch] = _eval_output(model, net_input)
            _save_npy(_snapshot_path(out_dir, epoch), snapshots[epoch])
        if epoch % settings.checkpoint_every == 0 or epoch == settings.epochs:
            if not all(torch.isfinite(p).all() for p in model.parameters()):
                bar.close()
                raise diverged(epoch, "the weights became non-finite")
            write_checkpoint(epoch)
        bar.set_postfix(loss=f"{value_f:.4g}", refresh=False)
        if on_epoch_end is not None:
            on_epoch_end(epoch, value_f)
        if stop_rule is not None and epoch < settings.epochs and stop_rule(losses):
            stopped_at = epoch
            if epoch not in snapshots:
                snapshots[epoch] = _eval_output(model, net_input)
                _save_npy(_snapshot_path(out_dir, epoch), snapshots[epoch])
            write_checkpoint(epoch)
            log.info("%s: early stop at epoch %d (loss plateau)", desc or out_dir, epoch)
            break
    bar.close()

    if start_epoch == (stopped_at or settings.epochs):  # nothing left to do; refresh the outputs
        write_checkpoint(start_epoch)
    return _finish(out_dir, desc, model, losses, wall_time_s, snapshots, settings, bool(stopped_at), device,
                   n_parameters, start_epoch, batched_runs=1)


def _earlier_snapshots(out_dir: Path, settings: TrainSettings, start_epoch: int, desc: str) -> dict[int, np.ndarray]:
    """The snapshots a resumed run made before its checkpoint (read back from ``snapshots/``)."""
    snapshots: dict[int, np.ndarray] = {}
    for epoch in sorted(set(settings.snapshots)):
        if epoch <= start_epoch:
            path = _snapshot_path(out_dir, epoch)
            if path.exists():
                snapshots[epoch] = np.load(path)
            else:
                log.warning("%s: snapshot %s from before the checkpoint is missing; it cannot be remade", desc, path)
    return snapshots


def _checkpoint(fingerprint: dict[str, Any], epoch: int, model_state: dict[str, torch.Tensor],
                optimizer_state: dict[str, Any], losses: list[float], wall_time_s: list[float], rng: dict[str, Any],
                settings: TrainSettings, stopped_early: bool, loss: Any, batched_runs: int = 1) -> dict[str, Any]:
    """The content of ``checkpoint.pt`` (one layout for a run trained alone or stacked with others)."""
    return {
        "batched_runs": int(batched_runs),
        "stopped_early": bool(stopped_early),
        "format": _CHECKPOINT_FORMAT,
        "fingerprint": fingerprint,
        "epoch": epoch,
        "model": model_state,
        "optimizer": optimizer_state,
        "losses": list(losses),
        "wall_time_s": list(wall_time_s),
        "rng": rng,
        "settings": asdict(settings),
        **({"loss_state": loss.checkpoint_state()} if hasattr(loss, "checkpoint_state") else {}),
    }


CONCURRENT_JOBS_ENV = "EQUIPET_CONCURRENT_JOBS"


def concurrent_jobs() -> int | None:
    """How many training processes the launcher ran side by side on this device, from the
    environment variable ``EQUIPET_CONCURRENT_JOBS`` (``run_ablation.py`` sets its ``--jobs``);
    None when no launcher said. Recorded in ``timing.json`` for the contention rule of
    ``config/preregistration_2.md``."""
    value = os.environ.get(CONCURRENT_JOBS_ENV)
    if value is None or value == "":
        return None
    try:
        jobs = int(value)
    except ValueError:
        jobs = 0
    if jobs < 1:
        raise ConfigError(f"{CONCURRENT_JOBS_ENV}={value!r} is not a positive number of jobs",
                          where=f"environment variable {CONCURRENT_JOBS_ENV}",
                          fix="set it to the number of training processes run side by side (1: alone), or unset it")
    return jobs


def _write_checkpoint(out_dir: Path, checkpoint: dict[str, Any]) -> None:
    _save_torch(out_dir / CHECKPOINT_NAME, checkpoint)
    _write_loss_csv(out_dir / "loss.csv", checkpoint["losses"], checkpoint["wall_time_s"])


def _finish(out_dir: Path, desc: str, model: torch.nn.Module, losses: list[float], wall_time_s: list[float],
            snapshots: dict[int, np.ndarray], settings: TrainSettings, stopped_early: bool, device: torch.device,
            n_parameters: int, start_epoch: int, batched_runs: int) -> TrainResult:
    """Write ``model.pt`` and ``timing.json`` of a finished run; its :class:`TrainResult`.

    ``batched_runs`` is the number of runs that shared each training step in one process
    (:mod:`equipet.networks.stacked`; 1 for a run trained alone): ``total_s`` is the wall time
    of those shared steps, so a run's time is comparable with another's only at equal
    ``batched_runs`` on the same device.
    """
    _save_torch(out_dir / "model.pt", _state_dict_cpu(model))
    total_s = wall_time_s[-1] if wall_time_s else 0.0
    epochs_run = len(losses)
    timing = {
        "epochs": epochs_run,
        "epochs_requested": settings.epochs,
        "stopped_early": bool(stopped_early),
        "total_s": total_s,
        "s_per_epoch": total_s / max(epochs_run, 1),
        "device": str(device),
        "torch": torch.__version__,
        "n_parameters": n_parameters,
        "resumed_from_epoch": start_epoch,
        "batched_runs": int(batched_runs),
        "concurrent_jobs": concurrent_jobs(),
        "load_average_end": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "cpu_count": os.cpu_count(),
    }
    with atomic_path(out_dir / "timing.json") as tmp:
        tmp.write_text(json.dumps(timing, indent=2) + "\n")
    log.info(
        "%s: done, %d epochs in %.1f s (%.4f s/epoch) on %s; final loss %.6g",
        desc or out_dir, epochs_run, total_s, timing["s_per_epoch"], device, losses[-1] if losses else float("nan"),
    )
    return TrainResult(
        losses=np.asarray(losses, dtype=np.float64),
        snapshots=dict(sorted(snapshots.items())),
        total_s=total_s,
        device=str(device),
        model=model,
        wall_time_s=np.asarray(wall_time_s, dtype=np.float64),
        resumed_from_epoch=start_epoch,
    )


def seconds_per_epoch(model: torch.nn.Module, net_input: torch.Tensor, loss: Callable[[torch.Tensor], torch.Tensor],
                      device: torch.device | str, epochs: int = 5, warmup: int = 2,
                      learning_rate: float = 1e-3) -> float:
    """Median wall time, s, of one training epoch of :func:`train` on ``device``, after ``warmup`` epochs.

    An epoch is what :func:`train` does per step: ``zero_grad``, ``loss(model(net_input))``,
    ``backward`` and one Adam step, with a CUDA synchronisation so that the time is the device's
    (no checkpoint, snapshot or file I/O). Trains ``model`` in place (``warmup + epochs`` steps)
    and moves it and ``loss`` to ``device``. Used by the time estimate (:mod:`equipet.study.estimate`)
    and by ``workflow/benchmarks/bench_training.py``.
    """
    device = torch.device(device)
    model.to(device).train()
    if isinstance(loss, torch.nn.Module):
        loss.to(device)
    net_input = net_input.detach().to(device=device, dtype=torch.float32)
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    times = []
    for i in range(warmup + epochs):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss(model(net_input)).backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return float(np.median(times))
