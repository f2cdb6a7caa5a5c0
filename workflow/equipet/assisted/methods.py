"""SCNN- and CNN-assisted reconstruction of the central slice (paper III-C, Fig. 4-5).

One run = one (CTR, method, model, seed): the network ``f_w`` takes the early-MLEM central
slice ``x_0`` (divided by a fixed scale ``c``, its 99.5th percentile, so that every CTR feeds
the networks values of order one) and its output ``x = c f_w(x_0 / c)`` is fitted, with the
shared engine :func:`equipet.networks.training.train`, by the objective of the run's method
(``assisted.methods``; each method has its own runs, figures, metric rows and claims rows):

``paper``: :class:`equipet.networks.training.MSELoss` against the MLEM slice at
``assisted.image_target_iterations`` (in units of ``c``; the last MLEM iteration by default).
An image-domain objective, as the paper's timings imply: its assisted epoch (14.5 ms) is 3.6x
cheaper than its denoising epoch and 10x cheaper than its Radon epoch, so its loss holds no
projector. Its epoch costs the network's forward and backward pass only.

``poisson``: the list-mode Poisson negative log-likelihood of the slice's events (Parra and
Barrett 1998), optimised stochastically (:class:`SubsetPoissonLoss`),

.. math::  L(x) = \\frac{1}{N}\\Big[f\\,s^T x - \\sum_{e=1}^{N} \\log\\big((A x)_e + b_e\\big)\\Big],
           \\qquad
           L_k(x) = \\frac{1}{N}\\Big[f\\,s^T x - K \\sum_{e \\in S_k} \\log\\big((A x)_e + b_e\\big)\\Big],

with ``A`` the single-slice TOF projector (the stored matrix
:class:`equipet.reconstruction.projector.SparseSystemMatrix` of ``system.pt``, built once per CTR by
:mod:`equipet.assisted.central_slice`), ``s`` the slice sensitivity, ``b`` the out-of-slice
contribution, ``f`` the kept fraction of the events and ``N`` their number. The events are in
random order and cut into ``K`` blocks ``S_k`` of about ``assisted.subset_events``; each epoch
draws ``k`` uniformly, so ``E_k L_k = L`` and ``E_k grad L_k = grad L`` (unbiased: the
sensitivity term is not scaled, the sum over the block is scaled by ``K``). Its minimiser is
the slice's ML estimate (the fixed point of list-mode MLEM). That plain ``grad L_k`` is the
default (``assisted.variance_reduction: none``); with ``saga`` the gradient is SAGA's (Defazio
et al. 2014) in image space: with ``g_k(x) = A_k^T (1 / (A_k x + b_k))`` the log term's image
gradient on block ``k`` and ``G_j`` the stored last value of each ``g_j``, the epoch's image
gradient is ``[f s - K (g_k(x) - G_k) - sum_j G_j] / N`` (then ``G_k <- g_k(x)``),
backpropagated through the network. It is unbiased for any table, and its variance goes to zero
as the image settles; early in a run, while the image moves far from where the table was
filled, it can be larger than the plain gradient's (docs/results.md: it closes part of the plain
method's lag behind the full-batch likelihood on the quick slice, and one paper-scale CNN run
collapsed with it). Cost per epoch: one block, as before; the table is ``K`` slice images, kept
only with ``saga``.

``poisson_full``: the same ``L`` over all events every epoch, the system matrix computed on the
fly (:class:`ListmodePoissonLoss`); the reference the stochastic method is checked against.

``l2``, :class:`ListmodeLeastSquaresLoss`: the integrated squared error between the model's
event density ``y(L, tau) = eta_L [(A x)(L, tau) + b]`` over LOR x TOF space (``eta_L`` the
LOR's attenuation factor) and the measured events,

.. math::  L(x) = \\frac{1}{N}\\Big[\\sum_{L}\\int y^2\\,d\\tau - 2\\sum_e y_e\\Big],

(unbiased, since ``E[sum_e y_e] = int y y_true``); the quadratic term is estimated from the
Monte Carlo LOR/TOF samples of ``slice.npz``.

Non-negative images: for the likelihood methods (``poisson``, ``poisson_full``) the network's
last layer is followed by a softplus, ``x = c softplus_beta(f_w(x_0 / c))`` with
``beta = SOFTPLUS_BETA`` (:class:`NonNegativeOutput`; pointwise, so equivariance is kept), so
every image whose likelihood is evaluated is positive. ``assisted.early_stop`` (off in the
paper configuration) ends a run at the loss plateau (:class:`PlateauStop`).

Written into the run directory: the files of :func:`equipet.networks.training.train` (``loss.csv``,
``snapshots/``, ``timing.json``, ...), ``metrics.csv`` (tidy rows: ``experiment=assisted,
method, model, seed, epoch, metric, value, ctr_ps, rod_mm, split``; ``split`` is ``input``
for the early MLEM slice, ``train`` for each snapshot, ``training`` for the loss-curve
summaries ``plateau_epoch``, ``plateau_time_s``, ``min_loss``, ``final_loss``,
``total_time_s``, ``s_per_epoch``, and for the likelihood methods ``full_nll``, the full-batch
``L`` of the final image) and ``eval.npz`` (truth, input, scaled snapshots).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from equipet.errors import ConfigError, InputDataError
from equipet.files import atomic_path
from equipet.runs import loss_summary
from equipet.assisted.central_slice import slice_projector
from equipet.reconstruction.projector import ImageGeometry, ListmodeTOFProjector, SparseSystemMatrix
from equipet.networks.nets import SOFTPLUS_BETA, NonNegativeOutput  # noqa: F401  (SOFTPLUS_BETA: documented here)
from equipet.networks.stacked import StackedRun
from equipet.networks.training import MSELoss, TrainResult, TrainSettings, predict, seed_everything, train

log = logging.getLogger("equipet.assisted.methods")

SUMMARY_METRICS = ("plateau_epoch", "plateau_time_s", "min_loss", "final_loss", "total_time_s", "s_per_epoch")

#: the assisted methods (module doc); the likelihood ones get a non-negative output
METHODS = ("paper", "poisson", "poisson_full", "l2")
LIKELIHOOD_METHODS = ("poisson", "poisson_full")


class PlateauStop:
    """Early stop at the loss plateau (``assisted.early_stop``), for :func:`equipet.networks.training.train`.

    Every ``window`` epochs from ``2 window`` on, the running mean ``m_k`` of the last
    ``window`` losses is compared with the best so far, ``m_best``: it counts as an
    improvement when ``m_k < m_best - tolerance (m_ref - m_best)``, with ``m_ref`` the largest
    running mean seen from epoch ``2 window`` on (the scale of the decrease, as in
    :func:`equipet.runs.plateau_epoch`). Training stops once ``patience`` epochs have passed without an
    improvement. Stateless towards the caller: it replays the history it has not seen, so a
    resumed run takes the same decision.

    A loss falling linearly to 0 at epoch 300, then flat: the last running mean that improves
    is that of epoch 310 (the first window of zeros), and 50 epochs later the run stops.

    >>> stop = PlateauStop(window=10, tolerance=0.01, patience=50)
    >>> losses = list(np.linspace(1.0, 0.0, 300)) + [0.0] * 300
    >>> next(k for k in range(1, 601) if stop(losses[:k]))
    360
    """

    def __init__(self, window: int, tolerance: float, patience: int):
        self.window, self.tolerance, self.patience = int(window), float(tolerance), int(patience)
        self._checked = 0
        self._best = math.inf
        self._ref = -math.inf
        self._best_epoch = 0

    def __call__(self, losses: Sequence[float]) -> bool:
        w = self.window
        k = max(self._checked + w, 2 * w)
        while k <= len(losses):
            m = float(np.mean(losses[k - w:k]))
            self._ref = max(self._ref, m)
            scale = self._ref - self._best if math.isfinite(self._best) else math.inf
            if m < self._best - self.tolerance * scale or not math.isfinite(self._best):
                self._best, self._best_epoch = m, k
            self._checked = k
            k += w
        return self._best_epoch > 0 and self._checked - self._best_epoch >= self.patience


# --------------------------------------------------------------------------- losses


def _floored_log_sum(expected: torch.Tensor, floor: float) -> torch.Tensor:
    """``sum log(expected)``, continued below ``floor`` by its tangent (finite, keeps pushing up).

    The two branches are selected, not added: adding the tangent's ``(expected - floored) / floor``
    term everywhere would give, above the floor, gradients ``1/floor - 1/floor + 1/expected``
    that cancel catastrophically in float32.
    """
    above = expected > floor
    safe = torch.where(above, expected, torch.full_like(expected, floor))
    return torch.sum(torch.where(above, torch.log(safe), math.log(floor) + (expected - floor) / floor))


class SliceForwardModel(torch.nn.Module):
    """``x = c * output[0, 0]`` on the slice geometry -> expected event densities ``eta (A x + b)`` (N,).

    ``projector`` is a :class:`ListmodeTOFProjector` on a single-slice geometry ``(nx, ny, 1)``;
    ``background`` ``b`` the fixed out-of-slice term; ``attenuation`` ``eta`` the optional
    per-LOR attenuation factor (left out for the Poisson likelihood, where it cancels).
    Differentiable (the backward is ``A^T``).
    """

    def __init__(self, projector: ListmodeTOFProjector, background: torch.Tensor, scale: float,
                 attenuation: torch.Tensor | None = None):
        super().__init__()
        if projector.geometry.shape[2] != 1:
            raise ValueError(f"the slice projector needs a single-slice geometry, got {projector.geometry.shape}")
        self.projector = projector
        self.scale = float(scale)
        self.register_buffer("background", torch.as_tensor(background, dtype=torch.float32))
        self.register_buffer("attenuation", None if attenuation is None
                             else torch.as_tensor(attenuation, dtype=torch.float32))

    def image(self, output: torch.Tensor) -> torch.Tensor:
        return (output[0, 0] * self.scale)[..., None]

    def forward(self, output: torch.Tensor) -> torch.Tensor:
        y = self.projector(self.image(output)) + self.background
        return y if self.attenuation is None else self.attenuation * y


class ListmodePoissonLoss(torch.nn.Module):
    """``L(x) = [f s^T x - sum_e log((A x)_e + b_e)] / N`` (module doc), ``loss(output) -> scalar``.

    Below ``floor`` (density units; :func:`build_loss` takes 1e-3 of the mean expected density
    of the early-MLEM input) the log is continued by its tangent, as in
    :class:`equipet.networks.training.PoissonNLLLoss`.
    """

    def __init__(self, forward_model: SliceForwardModel, sensitivity: torch.Tensor, event_fraction: float = 1.0,
                 floor: float = 1e-8):
        super().__init__()
        self.forward_model = forward_model
        self.register_buffer("sensitivity", torch.as_tensor(sensitivity, dtype=torch.float32) * float(event_fraction))
        self.floor = float(floor)

    def forward(self, output: torch.Tensor) -> torch.Tensor:
        n = self.forward_model.background.shape[0]
        expected = self.forward_model(output)
        x = self.forward_model.image(output)[..., 0]
        return (torch.sum(self.sensitivity * x) - _floored_log_sum(expected, self.floor)) / n


class SubsetPoissonLoss(torch.nn.Module):
    """The stochastic list-mode Poisson objective of the module doc, ``loss(output) -> scalar``.

    ``subsets`` are the ``K`` row blocks of the stored slice matrix (:meth:`SparseSystemMatrix.subsets`),
    ``backgrounds`` the matching blocks of ``b``. Each call draws the block ``k`` from torch's
    global generator (so a checkpoint, which saves its state, resumes the same sequence); ``k``
    forces one. Its value is always ``L_k``; its gradient depends on ``estimator``:

    - ``"none"`` (default): ``grad L_k`` (plain stochastic gradient);
    - ``"saga"``: the log term's image gradient ``g_k(x) = A_k^T (1 / (A_k x + b_k))``
      enters as ``K (g_k(x) - G_k) + sum_j G_j``, with ``G_j`` the table of each block's last
      computed ``g_j`` (filled at the first call by one pass over all blocks, then ``G_k <- g_k(x)``
      after every call). Unbiased for any table (``E_k`` gives ``sum_j g_j(x)``); its variance
      vanishes as the image stops changing, at the cost of one block per call (how close it
      comes to the full-batch likelihood: docs/results.md). Every call is one step of the estimator (it
      updates the table); :meth:`checkpoint_state` / :meth:`load_checkpoint_state` carry the
      table through a checkpoint.

    :meth:`full` is ``L`` itself (the mean of ``L_k`` over all ``k``; no table update).
    """

    ESTIMATORS = ("saga", "none")

    def __init__(self, subsets: Sequence[SparseSystemMatrix], backgrounds: Sequence[torch.Tensor],
                 sensitivity: torch.Tensor, scale: float, event_fraction: float = 1.0, floor: float = 1e-8,
                 estimator: str = "none"):
        super().__init__()
        if len(subsets) != len(backgrounds) or not subsets:
            raise ValueError("one background block per subset, at least one subset")
        if estimator not in self.ESTIMATORS:
            raise ValueError(f"unknown gradient estimator {estimator!r}; use one of {self.ESTIMATORS}")
        self.subsets = list(subsets)
        for k, b in enumerate(backgrounds):
            self.register_buffer(f"background_{k}", torch.as_tensor(b, dtype=torch.float32))
        self.register_buffer("sensitivity", torch.as_tensor(sensitivity, dtype=torch.float32) * float(event_fraction))
        self.scale = float(scale)
        self.floor = float(floor)
        self.estimator = estimator
        self.n_events = sum(m.n_events for m in self.subsets)
        if estimator == "saga":   # the table exists only where it is read
            shape = tuple(self.subsets[0].geometry.shape)
            device = self.sensitivity.device
            self.register_buffer("saga_table", torch.zeros((len(self.subsets),) + shape, device=device))
            self.register_buffer("saga_ready", torch.zeros((), dtype=torch.bool, device=device))

    def image(self, output: torch.Tensor) -> torch.Tensor:
        return (output[0, 0] * self.scale)[..., None]

    def subset_loss(self, output: torch.Tensor, k: int) -> torch.Tensor:
        x = self.image(output)
        expected = self.subsets[k](x) + getattr(self, f"background_{k}")
        log_term = len(self.subsets) * _floored_log_sum(expected, self.floor)
        return (torch.sum(self.sensitivity * x[..., 0]) - log_term) / self.n_events

    def block_log_gradient(self, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sum_{e in S_k} log((A x)_e + b_e), g_k(x))`` at the image ``x`` (nx, ny, 1), both detached."""
        with torch.enable_grad():
            xd = x.detach().requires_grad_(True)
            value = _floored_log_sum(self.subsets[k](xd) + getattr(self, f"background_{k}"), self.floor)
            (grad,) = torch.autograd.grad(value, xd)
        return value.detach(), grad

    def refresh(self, x: torch.Tensor) -> None:
        """Fill the SAGA table at ``x``: one pass over all blocks."""
        for k in range(len(self.subsets)):
            self.saga_table[k] = self.block_log_gradient(x, k)[1]
        self.saga_ready.fill_(True)

    def forward(self, output: torch.Tensor, k: int | None = None) -> torch.Tensor:
        if k is None:
            k = int(torch.randint(len(self.subsets), (1,)))
        if self.estimator == "none":
            return self.subset_loss(output, k)
        x = self.image(output)
        if not bool(self.saga_ready):
            self.refresh(x)
        log_k, g_k = self.block_log_gradient(x, k)
        direction = len(self.subsets) * (g_k - self.saga_table[k]) + self.saga_table.sum(0)
        self.saga_table[k] = g_k
        sens_term = torch.sum(self.sensitivity * x[..., 0])
        value = (sens_term.detach() - len(self.subsets) * log_k) / self.n_events
        surrogate = (sens_term - torch.sum(direction * x)) / self.n_events   # its gradient is the estimate
        return value + (surrogate - surrogate.detach())

    def full(self, output: torch.Tensor) -> torch.Tensor:
        """``L`` over all events (the deterministic objective)."""
        return sum(self.subset_loss(output, k) for k in range(len(self.subsets))) / len(self.subsets)

    def fingerprint(self) -> dict[str, Any]:
        """What a checkpoint of a run with this loss must match (see :func:`equipet.networks.training.train`)."""
        return {"estimator": self.estimator, "blocks": len(self.subsets)}

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """The estimator's state (the SAGA table; nothing for the plain block gradient)."""
        if self.estimator == "none":
            return {}
        return {"saga_table": self.saga_table.detach().cpu().clone(), "saga_ready": self.saga_ready.cpu().clone()}

    def load_checkpoint_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore :meth:`checkpoint_state`; a plain-gradient run ignores any table in ``state``
        (checkpoints written before the table was SAGA-only carry an unused one)."""
        if self.estimator == "none":
            return
        self.saga_table.copy_(state["saga_table"])
        self.saga_ready.copy_(state["saga_ready"])


class ListmodeLeastSquaresLoss(torch.nn.Module):
    """``L(x) = [w sum_mc y_mc^2 - 2 sum_e y_e] / N`` (module doc), ``loss(output) -> scalar``.

    ``mc_model`` maps the output to ``y`` at the Monte Carlo (LOR, TOF) samples, each standing
    for the measure ``mc_weight``.
    """

    def __init__(self, forward_model: SliceForwardModel, mc_model: SliceForwardModel, mc_weight: float):
        super().__init__()
        self.forward_model = forward_model
        self.mc_model = mc_model
        self.mc_weight = float(mc_weight)

    def forward(self, output: torch.Tensor) -> torch.Tensor:
        n = self.forward_model.background.shape[0]
        y_mc = self.mc_model(output)
        y_ev = self.forward_model(output)
        return (self.mc_weight * torch.sum(y_mc ** 2) - 2.0 * torch.sum(y_ev)) / n


# --------------------------------------------------------------------------- one run


def input_scale(early: np.ndarray) -> float:
    """The fixed scale ``c`` (99.5th percentile of the early slice; 1 if that is not positive)."""
    c = float(np.percentile(early, 99.5))
    return c if c > 0 else 1.0


def load_system(path: Path, device: torch.device) -> SparseSystemMatrix:
    """The stored slice matrix (``system.pt`` of :mod:`equipet.assisted.central_slice`) on ``device``."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        return SparseSystemMatrix.from_state_dict(state).to(device)
    except (OSError, RuntimeError, KeyError, EOFError) as exc:
        raise InputDataError(f"cannot read the stored slice system matrix ({type(exc).__name__}: {exc})",
                             where=str(path), fix="rerun the central_slice rule for this CTR") from exc


def subset_count(n_events: int, subset_events: int | None) -> int:
    """``K``, the number of event blocks of about ``subset_events`` each (1 for null: full batch).

    >>> subset_count(1_500_000, 100_000), subset_count(1000, None), subset_count(50, 100)
    (15, 1, 1)
    """
    if not subset_events:
        return 1
    return max(1, int(round(n_events / int(subset_events))))


def _poisson_floor(forward: Any, early: np.ndarray, scale: float, device: torch.device) -> float:
    """Floor of the log: 1e-3 of the mean expected density of the early-MLEM input image."""
    with torch.no_grad():
        typical = float(forward(torch.as_tensor(early / scale, device=device)[None, None]).mean())
    return max(1e-3 * typical, 1e-30)


def build_loss(cfg: Mapping[str, Any], data: Mapping[str, np.ndarray], scale: float, device: torch.device,
               method: str, system: SparseSystemMatrix | None = None) -> torch.nn.Module:
    """The objective of ``method`` for this slice (module doc); ``poisson`` needs ``system``."""
    sec = cfg["assisted"]
    if method not in METHODS:
        raise ConfigError(f"unknown assisted method {method!r}", where="assisted.methods", fix=f"use one of {METHODS}")
    if method == "paper":
        its = [int(i) for i in data["iterations"]]
        k = sec["image_target_iterations"] or its[-1]
        if k not in its:
            raise ConfigError(f"no MLEM iteration {k} (have {its[0]}..{its[-1]})",
                              where="assisted.image_target_iterations", fix="keep it <= mlem.iterations")
        return MSELoss(data["mlem"][its.index(k)] / scale)
    background = torch.as_tensor(data["background"], device=device)
    if method == "poisson":
        if system is None:
            raise ValueError("method poisson needs the stored slice matrix (system.pt)")
        if system.n_events != len(background):
            raise InputDataError(f"system.pt has {system.n_events} events, slice.npz {len(background)}",
                                 where="system.pt", fix="rerun the central_slice rule for this CTR")
        parts = system.subsets(subset_count(system.n_events, sec["subset_events"]))
        bounds = np.cumsum([0] + [m.n_events for m in parts])
        loss = SubsetPoissonLoss(parts, [background[a:b] for a, b in zip(bounds[:-1], bounds[1:])],
                                 torch.as_tensor(data["sensitivity"], device=device), scale,
                                 float(data["event_fraction"]), estimator=sec["variance_reduction"])
        loss.floor = _poisson_floor(lambda o: system(loss.image(o)) + background, data["early"], scale, device)
        return loss
    cache = float(sec["cache_mb"])
    fm = SliceForwardModel(slice_projector(data, "p1", "p2", "tof", device, cache / 2 if method == "l2" else cache),
                           background, scale)
    if method == "poisson_full":
        return ListmodePoissonLoss(fm, torch.as_tensor(data["sensitivity"], device=device),
                                   float(data["event_fraction"]), floor=_poisson_floor(fm, data["early"], scale, device))
    if "mc_p1" not in data:
        raise ConfigError("slice.npz has no Monte Carlo LORs for method l2", where="assisted.methods",
                          fix="rerun the central_slice rule with l2 in assisted.methods")
    fm.attenuation = torch.as_tensor(data["eta"], device=device)
    mc = SliceForwardModel(slice_projector(data, "mc_p1", "mc_p2", "mc_tof", device, cache / 2),
                           torch.as_tensor(data["mc_background"], device=device), scale,
                           torch.as_tensor(data["mc_eta"], device=device))
    return ListmodeLeastSquaresLoss(fm, mc, float(data["mc_weight"]))


def full_nll(loss: torch.nn.Module, output: torch.Tensor) -> float:
    """The full-batch objective ``L`` of a likelihood method's loss at ``output`` (module doc)."""
    with torch.no_grad():
        return float(loss.full(output) if isinstance(loss, SubsetPoissonLoss) else loss(output))


class _SliceData:
    """A slice file read once per process: its arrays, scale, device and stored matrix."""

    def __init__(self, cfg: Mapping[str, Any], slice_path: Path, system_path: Path | None, device: torch.device):
        self.data = dict(np.load(slice_path))
        self.ctr = float(self.data["ctr_ps"])
        self.early = self.data["early"].astype(np.float32)
        self.scale = input_scale(self.early)
        self.device = device
        self.system_path = system_path
        self._system: SparseSystemMatrix | None = None

    def system(self) -> SparseSystemMatrix:
        if self._system is None:
            if self.system_path is None:
                raise ValueError("method poisson needs the stored slice matrix (system.pt)")
            self._system = load_system(self.system_path, self.device)
        return self._system


def _train_settings(cfg: Mapping[str, Any], seed: int) -> TrainSettings:
    sec = cfg["assisted"]
    return TrainSettings(
        epochs=sec["epochs"], learning_rate=sec["learning_rate"] or cfg["training"]["learning_rate"],
        snapshots=sorted(set(sec["snapshots"]) | {sec["epochs"]}),
        checkpoint_every=cfg["training"]["checkpoint_every"], seed=seed, device=cfg["device"],
        deterministic=cfg["training"]["deterministic"],
        lr_milestones=sorted({max(1, round(f * sec["epochs"])) for f in sec["lr_decay"]["at_fraction"]}),
        lr_gamma=sec["lr_decay"]["factor"])


def _prepare_run(cfg: Mapping[str, Any], sl: _SliceData, method: str, model_name: str, seed: int,
                 out_dir: Path) -> StackedRun:
    """The run's network (initialised from its seed), input, loss, settings and stop rule."""
    from equipet.networks.nets import build_model

    sec = cfg["assisted"]
    settings = _train_settings(cfg, seed)
    loss = build_loss(cfg, sl.data, sl.scale, sl.device, method, sl.system() if method == "poisson" else None)
    seed_everything(seed, settings.deterministic)
    model = build_model(model_name, cfg["models"])
    if method in LIKELIHOOD_METHODS:
        model = NonNegativeOutput(model)
    stop = sec["early_stop"]
    stop_rule = PlateauStop(stop["window"], stop["tolerance"], stop["patience"]) if stop["enabled"] else None
    return StackedRun(model, torch.from_numpy(sl.early / sl.scale)[None, None], loss, settings, Path(out_dir),
                      desc=f"assisted/ctr{sl.ctr:g}/{method}/{model_name}/seed{seed}", stop_rule=stop_rule)


def _finish_run(cfg: Mapping[str, Any], sl: _SliceData, method: str, model_name: str, seed: int,
                run: StackedRun, result: TrainResult) -> pd.DataFrame:
    """Score the run's snapshots; write metrics.csv, eval.npz and summary.json in its directory."""
    from equipet.assisted.central_slice import geometry_from_npz
    from equipet.assisted.rod_metrics import SliceScorer

    sec, data, ctr, scale, out_dir = cfg["assisted"], sl.data, sl.ctr, sl.scale, run.out_dir
    scorer = SliceScorer(cfg["phantom"], geometry_from_npz(data), data["truth"], cfg["mlem"]["metrics"],
                         sec["metrics"])
    base = dict(experiment="assisted", method=method, model=model_name, seed=seed, ctr_ps=ctr)
    rows = scorer.tidy(scorer.score(sl.early), **base, epoch=0, split="input")
    snapshots = {e: img * scale for e, img in sorted(result.snapshots.items())}
    for epoch, img in snapshots.items():
        rows += scorer.tidy(scorer.score(img), **base, epoch=epoch, split="train")
    summary = loss_summary(result.losses, result.wall_time_s, sec["plateau"])
    if method in LIKELIHOOD_METHODS:
        final = predict(result.model.to(sl.device), run.net_input.to(sl.device))
        summary["full_nll"] = full_nll(run.loss, final)
    last_epoch = len(result.losses)
    rows += [{**base, "epoch": last_epoch, "metric": k, "value": v, "rod_mm": float("nan"), "split": "training"}
             for k, v in summary.items()]
    columns = ["experiment", "method", "model", "seed", "epoch", "metric", "value", "ctr_ps", "rod_mm", "split"]
    df = pd.DataFrame(rows)[columns]
    epochs = sorted(snapshots)
    with atomic_path(out_dir / "eval.npz") as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(fh, truth=data["truth"], net_input=sl.early, scale=np.asarray(scale),
                            snapshot_epochs=np.asarray(epochs), snapshots=np.stack([snapshots[e] for e in epochs]),
                            ctr_ps=np.asarray(ctr), method=np.asarray(method))
    with atomic_path(out_dir / "metrics.csv") as tmp:
        df.to_csv(tmp, index=False)
    with atomic_path(out_dir / "summary.json") as tmp:
        tmp.write_text(json.dumps({"ctr_ps": ctr, "method": method, "model": model_name, "seed": seed,
                                   "n_events": int(len(data["tof"])), "scale": scale, "epochs_run": last_epoch,
                                   **summary}, indent=2) + "\n")
    log.info("assisted/ctr%g/%s/%s/seed%d: plateau at epoch %d, %.4f s/epoch; %d metric rows",
             ctr, method, model_name, seed, summary["plateau_epoch"], summary["s_per_epoch"], len(df))
    return df


def run_assisted(cfg: Mapping[str, Any], slice_path: Path, method: str, model_name: str, seed: int,
                 out_dir: Path, system_path: Path | None = None) -> pd.DataFrame:
    """Train ``model_name`` with ``method`` for ``seed`` on the slice; write metrics.csv and eval.npz in ``out_dir``."""
    from equipet.device import select_device

    sl = _SliceData(cfg, slice_path, system_path if method == "poisson" else None, select_device(cfg["device"]))
    run = _prepare_run(cfg, sl, method, model_name, seed, out_dir)
    result = train(run.model, run.net_input, run.loss, run.settings, run.out_dir, desc=run.desc,
                   stop_rule=run.stop_rule)
    return _finish_run(cfg, sl, method, model_name, seed, run, result)


def run_dir(root: Path, method: str, model_name: str, seed: int) -> Path:
    """Where a run of a CTR's assisted directory ``root`` lives (the rules' layout)."""
    return Path(root) / method / model_name / f"seed{seed}"


def run_assisted_group(cfg: Mapping[str, Any], slice_path: Path, runs: Sequence[tuple[str, str, int]],
                       out_root: Path, system_path: Path | None = None) -> list[pd.DataFrame]:
    """Train the ``(method, model, seed)`` runs of one slice together in this process
    (:func:`equipet.networks.stacked.train_stacked`; ``assisted.group_runs: ctr``), each into
    :func:`run_dir` of ``out_root`` with the files of :func:`run_assisted`.

    A run that diverges leaves its last checkpoint and the others finish; the group then
    raises the first run's :class:`TrainingDivergedError` (after every other run's files are written).
    """
    from equipet.device import select_device
    from equipet.networks.stacked import train_stacked

    sl = _SliceData(cfg, slice_path, system_path, select_device(cfg["device"]))
    prepared = [_prepare_run(cfg, sl, m, model, seed, run_dir(out_root, m, model, seed)) for m, model, seed in runs]
    results = train_stacked(prepared)
    frames, errors = [], []
    for (method, model_name, seed), run, result in zip(runs, prepared, results):
        if isinstance(result, Exception):
            errors.append(result)
            continue
        frames.append(_finish_run(cfg, sl, method, model_name, seed, run, result))
    if errors:
        raise errors[0]
    return frames


__all__ = ["ListmodePoissonLoss", "ListmodeLeastSquaresLoss", "SubsetPoissonLoss", "SliceForwardModel",
           "NonNegativeOutput", "PlateauStop", "build_loss",
           "load_system", "run_assisted", "run_assisted_group", "run_dir", "METHODS", "ImageGeometry"]
