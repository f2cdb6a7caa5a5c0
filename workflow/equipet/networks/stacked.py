"""Many runs trained together in one process: stacked parameters, one step for all of them.

One run fits one small network to one image; on a GPU its step is mostly kernel launches, so
training the runs of a study one after the other leaves the device idle. :func:`train_stacked`
trains R runs (seeds, and runs of different methods or inputs whose networks share an
architecture) as one network whose every layer holds the R runs' parameters side by side:

- a convolution becomes one grouped convolution (``groups = R``) built from each run's own
  filters: for an escnn ``R2Conv`` the R filters come out of one basis expansion (the stacked
  coefficients times the layer's sampled basis; escnn's own expansion, run by run, where a layer
  has several blocks), for a torch ``Conv2d`` they are the stacked weights;
- a batch normalisation (torch ``BatchNorm2d``, escnn ``InnerBatchNorm``) normalises R times as
  many channels or fields, each with its run's own statistics and affine parameters;
- pointwise maps (ReLU; the softplus of :class:`equipet.networks.nets.NonNegativeOutput`, applied
  to the runs that have one) act as before.

Each run keeps its own input, its own loss (called on its own output, with its own torch random
stream, so a stochastic loss draws the same blocks as the run trained alone), its own Adam moments
(Adam acts element by element, so one Adam over the stacked parameters is R Adams), its own loss
curve, snapshots, ``checkpoint.pt``, ``model.pt`` and ``timing.json`` in its own directory, in the
layout of :func:`equipet.networks.training.train`: a run trained here resumes alone and vice
versa. The R losses are summed and backpropagated once; run r's parameters receive run r's
gradient only. On the CPU the result equals the runs trained one by one to float rounding (the
grouped convolution sums in another order); ``tests/test_stacked.py`` checks both that and an
exact resume.

A run that diverges (non-finite loss) or stops early leaves the stack, which is rebuilt from the
remaining runs' current state; the others go on. ``timing.json`` records ``batched_runs``, the
number of runs that shared the steps: a run's wall time is that of the shared steps.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from escnn import nn as enn
from tqdm.auto import tqdm

from equipet.device import select_device
from equipet.errors import EquipetError, TrainingDivergedError
from equipet.networks.nets import CNN, SCNN, NonNegativeOutput
from equipet.networks.training import (CHECKPOINT_NAME, TrainResult, TrainSettings, _check_finite_data, _checkpoint,
                                       _earlier_snapshots, _fingerprint, _finish, _load_checkpoint, _rng_state,
                                       _save_npy, _set_rng_state, _snapshot_path, _state_dict_cpu,
                                       _write_checkpoint, concurrent_jobs, seed_everything)

log = logging.getLogger(__name__)

__all__ = ["StackedNetwork", "StackedRun", "stack_key", "train_stacked"]


# --------------------------------------------------------------------------- the stacked network


def _unwrap(model: torch.nn.Module) -> tuple[torch.nn.Module, float | None]:
    """(the SCNN or CNN inside ``model``, the softplus beta of its non-negative output or None)."""
    beta = None
    if isinstance(model, NonNegativeOutput):
        beta = float(model.softplus.beta)
        model = model.net
    if not isinstance(model, (SCNN, CNN)):
        raise EquipetError(f"no stacked version of {type(model).__name__}",
                           where="stacked training", fix="train these runs one by one (assisted.group_runs: run)")
    return model, beta


def stack_key(model: torch.nn.Module) -> tuple:
    """Runs whose models have equal keys can share one :class:`StackedNetwork`."""
    core, _ = _unwrap(model)
    return (type(core).__name__, tuple((n, tuple(p.shape)) for n, p in core.named_parameters()),
            tuple(type(m).__name__ for m in core.modules()))


def _is_norm(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.modules.batchnorm._BatchNorm)


class StackedNetwork(torch.nn.Module):
    """R networks of one architecture as one: ``forward(x)`` maps ``(R, 1, H, W)`` to ``(R, 1, H, W)``.

    Built from the runs' own models (module doc); their parameters and batch-norm statistics are
    copied in, and :meth:`copy_to` writes run r's back into a model of the same architecture.
    """

    def __init__(self, models: Sequence[torch.nn.Module]):
        super().__init__()
        if not models:
            raise ValueError("StackedNetwork needs at least one model")
        cores, betas = zip(*(_unwrap(m) for m in models))
        key = stack_key(models[0])
        if any(stack_key(m) != key for m in models[1:]):
            raise EquipetError("the models to stack differ in architecture", where="stacked training",
                               fix="stack only runs of one network configuration")
        wrapped = {b for b in betas if b is not None}
        if len(wrapped) > 1:
            raise EquipetError(f"the non-negative outputs differ in softplus beta ({sorted(wrapped)})",
                               where="stacked training", fix="stack runs with one output transform")
        self.runs = len(models)
        self.beta = wrapped.pop() if wrapped else None
        self.register_buffer("softplus_mask", torch.tensor([b is not None for b in betas]).view(-1, 1, 1, 1))
        template = cores[0]
        self.param_names = [n for n, _ in template.named_parameters()]
        self.params = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.stack([dict(c.named_parameters())[n].detach() for c in cores]).clone())
             for n in self.param_names])
        norm_prefixes = [name for name, m in template.named_modules() if _is_norm(m)]
        self.buffer_names = [n for n, _ in template.named_buffers()
                             if any(n.startswith(p + ".") for p in norm_prefixes)]
        for i, n in enumerate(self.buffer_names):
            self.register_buffer(f"stat{i}", torch.stack([dict(c.named_buffers())[n].detach() for c in cores]).clone())
        self._index = {n: i for i, n in enumerate(self.param_names)}
        self._bindex = {n: i for i, n in enumerate(self.buffer_names)}
        # fixed (weight-independent) parts of the layers: escnn's basis expansions, moved with the stack
        self.expansions = torch.nn.ModuleDict()
        self.layers: list[tuple[str, torch.nn.Module]] = []
        body = template.net
        for name, module in body.named_children():
            prefix = f"net.{name}"
            if isinstance(module, enn.R2Conv):
                if module.padding_mode != "zeros":
                    raise EquipetError(f"no stacked R2Conv with padding_mode={module.padding_mode!r}",
                                       where="stacked training", fix="train these runs one by one")
                self.expansions[name] = copy.deepcopy(module.basisexpansion)   # the model keeps its own
                self.register_buffer(f"bias_expansion_{name}", getattr(module, "bias_expansion", None))
            elif not isinstance(module, (torch.nn.Conv2d, enn.InnerBatchNorm, torch.nn.BatchNorm2d, enn.ReLU,
                                         torch.nn.ReLU)):
                raise EquipetError(f"no stacked version of layer {type(module).__name__}", where="stacked training",
                                   fix="train these runs one by one (assisted.group_runs: run)")
            self.layers.append((prefix, module))

    # -------------------------------------------------------------- per-run state

    def _p(self, name: str) -> torch.Tensor:
        return self.params[self._index[name]]

    def _b(self, name: str) -> torch.Tensor:
        return getattr(self, f"stat{self._bindex[name]}")

    @torch.no_grad()
    def copy_to(self, r: int, model: torch.nn.Module) -> None:
        """Write run ``r``'s parameters and batch-norm statistics into ``model`` (same architecture)."""
        core, _ = _unwrap(model)
        params, buffers = dict(core.named_parameters()), dict(core.named_buffers())
        for i, n in enumerate(self.param_names):
            params[n].copy_(self.params[i][r])
        for i, n in enumerate(self.buffer_names):
            buffers[n].copy_(getattr(self, f"stat{i}")[r])

    def run_parameters_finite(self, r: int) -> bool:
        return all(bool(torch.isfinite(p[r]).all()) for p in self.params)

    # -------------------------------------------------------------- forward

    def _conv(self, prefix: str, module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        R = self.runs
        if isinstance(module, torch.nn.Conv2d):
            w = self._p(prefix + ".weight")
            weight = w.reshape(R * w.shape[1], *w.shape[2:])
            bias = self._p(prefix + ".bias").reshape(-1) if module.bias is not None else None
            return F.conv2d(x, weight, bias, module.stride, module.padding, module.dilation, R * module.groups)
        name = prefix.split(".", 1)[1]
        weight = self._expand(self.expansions[name], self._p(prefix + ".weights"), module)
        bias = None
        if module.bias is not None:
            bias = (self._p(prefix + ".bias") @ getattr(self, f"bias_expansion_{name}").T).reshape(-1)
        return F.conv2d(x, weight, bias, module.stride, module.padding, module.dilation, R * module.groups)

    def _expand(self, expansion: torch.nn.Module, weights: torch.Tensor, module: torch.nn.Module) -> torch.Tensor:
        """The R filters of an escnn convolution, ``(R out, in, k, k)``, from the stacked coefficients."""
        R = self.runs
        kernel = (module.kernel_size,) * 2
        if getattr(expansion, "_n_pairs", None) == 1:
            # one block of basis filters (one input and one output field type): one einsum for all
            # runs, arranged as escnn's BlocksBasisExpansion arranges one run's
            io = expansion._representations_pairs[0]
            block = getattr(expansion, f"block_expansion_{expansion._escape_pair(io)}")
            lo, hi = expansion._weights_ranges[io]
            oc, ic = expansion._out_count[io[1]], expansion._in_count[io[0]]
            coefficients = weights[:, lo:hi].reshape(R * oc * ic, block.dimension())
            f = block(coefficients)
            _, o, i = f.shape[:3]
            f = f.reshape(R, oc, ic, o, i, -1).transpose(2, 3)
            return f.reshape(R * oc * o, ic * i, *kernel)
        filters = [expansion(weights[r]) for r in range(R)]
        return torch.cat([f.reshape(f.shape[0], f.shape[1], *kernel) for f in filters])

    def _norm(self, prefix: str, module: torch.nn.Module, x: torch.Tensor, frozen: bool) -> torch.Tensor:
        if isinstance(module, enn.InnerBatchNorm):
            sizes = list(module._contiguous.items())
            if len(sizes) != 1 or not sizes[0][1]:
                raise EquipetError("no stacked InnerBatchNorm over fields of several sizes", where="stacked training",
                                   fix="train these runs one by one")
            s = sizes[0][0]
            norm = getattr(module, f"batch_norm_[{s}]")
            prefix = f"{prefix}.batch_norm_[{s}]"
            shape = x.shape
            x = x.reshape(shape[0], shape[1] // s, s, *shape[2:])
        else:
            norm, shape = module, None
        mean, var = self._b(prefix + ".running_mean"), self._b(prefix + ".running_var")
        counter = self._b(prefix + ".num_batches_tracked")
        counter.add_(1)   # as torch's batch norm does in training mode, frozen (momentum 0) too
        if frozen:
            factor = 0.0
        elif norm.momentum is None:
            factor = 1.0 / float(counter[0])
        else:
            factor = norm.momentum
        weight = self._p(prefix + ".weight").reshape(-1) if norm.affine else None
        bias = self._p(prefix + ".bias").reshape(-1) if norm.affine else None
        y = F.batch_norm(x, mean.view(-1), var.view(-1), weight, bias, True, factor, norm.eps)
        return y.reshape(shape) if shape is not None else y

    def forward(self, x: torch.Tensor, frozen_statistics: bool = False) -> torch.Tensor:
        """``(R, 1, H, W)`` -> ``(R, 1, H, W)``; ``frozen_statistics``: batch norm with momentum 0
        (the evaluation of :func:`equipet.networks.training.predict`)."""
        R = self.runs
        if x.shape[0] != R or x.shape[1] != 1:
            raise ValueError(f"StackedNetwork of {R} runs needs input (R, 1, H, W), got {tuple(x.shape)}")
        h = x.reshape(1, R, *x.shape[2:])
        for prefix, module in self.layers:
            if isinstance(module, (enn.R2Conv, torch.nn.Conv2d)):
                h = self._conv(prefix, module, h)
            elif isinstance(module, (enn.InnerBatchNorm, torch.nn.BatchNorm2d)):
                h = self._norm(prefix, module, h, frozen_statistics)
            else:
                h = F.relu(h)
        y = h.reshape(R, -1, *h.shape[2:])
        if self.beta is not None:
            y = torch.where(self.softplus_mask, F.softplus(y, beta=self.beta), y)
        return y


# --------------------------------------------------------------------------- the runs


@dataclass
class StackedRun:
    """One run of :func:`train_stacked`: what :func:`equipet.networks.training.train` takes."""

    model: torch.nn.Module
    net_input: torch.Tensor
    loss: Callable[[torch.Tensor], torch.Tensor]
    settings: TrainSettings
    out_dir: Path
    desc: str = ""
    stop_rule: Callable[[list[float]], bool] | None = None


class _Run:
    """A run's bookkeeping while it trains in a stack."""

    def __init__(self, spec: StackedRun, device: torch.device):
        self.spec = spec
        s = spec.settings
        self.out_dir = Path(spec.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.desc = spec.desc or str(self.out_dir)
        if spec.net_input.ndim != 4 or spec.net_input.shape[:2] != (1, 1):
            raise ValueError(f"net_input must have shape (1, 1, H, W), got {tuple(spec.net_input.shape)}")
        bad = [e for e in s.snapshots if not 1 <= e <= s.epochs]
        if bad:
            raise EquipetError(f"snapshot epochs {bad} are outside 1..epochs={s.epochs}",
                               where="training settings: snapshots", fix="keep every snapshot between 1 and epochs")
        self.fingerprint = _fingerprint(spec.model, spec.net_input, spec.loss, s)
        self.net_input = spec.net_input.detach().to(device=device, dtype=torch.float32)
        if isinstance(spec.loss, torch.nn.Module):
            spec.loss.to(device)
        _check_finite_data(self.net_input, spec.loss, self.out_dir)
        spec.model.train()
        seed_everything(s.seed, s.deterministic)   # the run's random streams, as train() starts them
        self.rng = _rng_state()
        self.optimizer_state: dict[str, Any] | None = None
        self.losses: list[float] = []
        self.wall_time_s: list[float] = []
        self.start_epoch = 0
        self.stopped_at = 0
        self.last_checkpoint = 0
        self.error: TrainingDivergedError | None = None
        self.batched_runs = 1
        path = self.out_dir / CHECKPOINT_NAME
        if path.exists():
            ckpt = _load_checkpoint(path, self.fingerprint, s)
            spec.model.eval()
            spec.model.load_state_dict(ckpt["model"])
            spec.model.train()
            self.optimizer_state = ckpt["optimizer"]
            if "loss_state" in ckpt:
                spec.loss.load_checkpoint_state(ckpt["loss_state"])
            self.losses = [float(v) for v in ckpt["losses"]]
            self.wall_time_s = [float(v) for v in ckpt["wall_time_s"]]
            self.start_epoch = self.last_checkpoint = int(ckpt["epoch"])
            self.stopped_at = self.start_epoch if ckpt.get("stopped_early") else 0
            self.rng = ckpt["rng"]
            self.batched_runs = int(ckpt.get("batched_runs", 1))   # of the steps so far (a refresh keeps it)
            log.info("%s: resuming from %s at epoch %d", self.desc, path, self.start_epoch)
        self.snapshots = _earlier_snapshots(self.out_dir, s, self.start_epoch, self.desc)
        self.end_epoch = self.stopped_at or s.epochs

    @property
    def done(self) -> bool:
        return len(self.losses) >= self.end_epoch or self.error is not None

    def write_checkpoint(self, epoch: int) -> None:
        s = self.spec
        _write_checkpoint(self.out_dir, _checkpoint(self.fingerprint, epoch, _state_dict_cpu(s.model),
                                                    self.optimizer_state, self.losses, self.wall_time_s, self.rng,
                                                    s.settings, bool(self.stopped_at), s.loss, self.batched_runs))
        self.last_checkpoint = epoch

    def save_snapshot(self, epoch: int, image: np.ndarray) -> None:
        self.snapshots[epoch] = image
        _save_npy(_snapshot_path(self.out_dir, epoch), image)


class _Group:
    """The stacks of the runs that train now, their Adam optimiser, and the per-run state exchange."""

    def __init__(self, runs: list[_Run], settings: TrainSettings, device: torch.device):
        self.runs = runs
        self.device = device
        by_key: dict[tuple, list[_Run]] = {}
        for run in runs:
            by_key.setdefault(stack_key(run.spec.model), []).append(run)
        self.stacks = [(members, StackedNetwork([r.spec.model for r in members]).to(device).train())
                       for members in by_key.values()]
        shapes = {tuple(r.net_input.shape) for members, _ in self.stacks for r in members}
        if len({s[2:] for s in shapes}) > 1:
            raise EquipetError(f"the runs' inputs differ in size ({sorted(shapes)})", where="stacked training",
                               fix="stack only runs on images of one size")
        self.inputs = [torch.cat([r.net_input for r in members]) for members, _ in self.stacks]
        self.optimizer = torch.optim.Adam([p for _, stack in self.stacks for p in stack.params],
                                          lr=settings.learning_rate)
        states = [r.optimizer_state for r in runs]
        if any(s is not None for s in states):
            if any(s is None for s in states):
                raise EquipetError("some runs of the stack resume from a checkpoint and some start afresh",
                                   where=", ".join(str(r.out_dir) for r in runs),
                                   fix="train them in separate stacks (train_stacked does when their epochs differ)")
            self._load_optimizer_states()

    def _load_optimizer_states(self) -> None:
        for members, stack in self.stacks:
            for i, p in enumerate(stack.params):
                per_run = [r.optimizer_state["state"][i] for r in members]
                steps = {float(s["step"]) for s in per_run}
                if len(steps) != 1:
                    raise EquipetError(f"the runs' optimiser steps differ ({sorted(steps)})", where="stacked training",
                                       fix="train runs at different epochs in separate stacks")
                self.optimizer.state[p] = {
                    "step": per_run[0]["step"].clone(),
                    **{k: torch.stack([s[k] for s in per_run]).to(self.device)
                       for k in per_run[0] if k != "step"},
                }

    def sync(self, members_only: list[_Run] | None = None) -> None:
        """Copy every run's (or the given runs') weights and Adam state out of the stacks."""
        group = {k: v for k, v in self.optimizer.state_dict()["param_groups"][0].items() if k != "params"}
        for members, stack in self.stacks:
            for r, run in enumerate(members):
                if members_only is not None and run not in members_only:
                    continue
                stack.copy_to(r, run.spec.model)
                state = {}
                for i, p in enumerate(stack.params):
                    st = self.optimizer.state.get(p)
                    if st:
                        state[i] = {k: (v.detach().clone().cpu() if k == "step" else v[r].detach().to("cpu").clone())
                                    for k, v in st.items()}
                run.optimizer_state = {"state": state, "param_groups": [{**group,
                                                                         "params": list(range(len(stack.params)))}]}

    def set_lr(self, lr: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    def losses(self) -> list[tuple[_Run, torch.Tensor]]:
        """Each run's loss on its own output, drawn with its own torch random stream."""
        values = []
        for (members, stack), x in zip(self.stacks, self.inputs):
            out = stack(x)
            for r, run in enumerate(members):
                torch.set_rng_state(run.rng["torch"])
                values.append((run, run.spec.loss(out[r:r + 1])))
                run.rng["torch"] = torch.get_rng_state()
        return values

    @torch.no_grad()
    def predict(self) -> dict[int, np.ndarray]:
        """Each run's output as :func:`equipet.networks.training.predict` gives it (id(run) -> (H, W))."""
        images = {}
        for (members, stack), x in zip(self.stacks, self.inputs):
            out = stack(x, frozen_statistics=True).to("cpu", torch.float32)
            for r, run in enumerate(members):
                images[id(run)] = out[r, 0].numpy().copy()
        return images

    def parameters_finite(self, run: _Run) -> bool:
        for members, stack in self.stacks:
            if run in members:
                return stack.run_parameters_finite(members.index(run))
        raise KeyError(run.desc)


def _check_same_settings(specs: Sequence[StackedRun]) -> TrainSettings:
    first = {k: v for k, v in asdict(specs[0].settings).items() if k != "seed"}
    for spec in specs[1:]:
        other = {k: v for k, v in asdict(spec.settings).items() if k != "seed"}
        if other != first:
            differing = sorted(k for k in first if first[k] != other[k])
            raise EquipetError(f"runs trained together need the same settings but for the seed (differ in {differing})",
                               where=str(spec.out_dir), fix="group only runs of one configuration")
    return specs[0].settings


def train_stacked(specs: Sequence[StackedRun]) -> list[TrainResult | TrainingDivergedError]:
    """Train the runs together (module doc); one :class:`TrainResult` per run, in order.

    A run that diverged gets its :class:`TrainingDivergedError` in its place instead (its last
    checkpoint is kept, the other runs trained on); the caller decides what to raise. Runs
    resuming at different epochs are trained in successive stacks, the earliest first.
    """
    if not specs:
        return []
    settings = _check_same_settings(specs)
    device = select_device(settings.device)
    concurrent_jobs()   # a malformed EQUIPET_CONCURRENT_JOBS is refused before training
    previous_det = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    if settings.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=device.type != "cpu")
    torch_state = torch.get_rng_state()
    try:
        runs = [_Run(spec, device) for spec in specs]
        for start in sorted({r.start_epoch for r in runs if not r.done}):
            _train_phase([r for r in runs if r.start_epoch == start and not r.done], settings, device)
        results: list[TrainResult | TrainingDivergedError] = []
        for run in runs:
            if run.error is not None:
                results.append(run.error)
                continue
            if run.start_epoch == run.end_epoch:   # nothing left to do; refresh the outputs
                run.write_checkpoint(run.start_epoch)
            n_parameters = sum(p.numel() for p in run.spec.model.parameters() if p.requires_grad)
            results.append(_finish(run.out_dir, run.desc, run.spec.model, run.losses, run.wall_time_s, run.snapshots,
                                   run.spec.settings, bool(run.stopped_at), device, n_parameters, run.start_epoch,
                                   batched_runs=run.batched_runs))
        return results
    finally:
        torch.set_rng_state(torch_state)
        torch.use_deterministic_algorithms(previous_det[0], warn_only=previous_det[1])


def _train_phase(runs: list[_Run], settings: TrainSettings, device: torch.device) -> None:
    """Train runs that all resume at the same epoch, together, to their ends."""
    start = runs[0].start_epoch
    for run in runs:
        run.batched_runs = len(runs)
    group = _Group(runs, settings, device)
    snapshot_set = set(settings.snapshots)
    log.info("training %d runs together on %s from epoch %d to %d (%d stack(s): %s)", len(runs), device, start,
             settings.epochs, len(group.stacks), ", ".join(f"{len(m)} x {type(_unwrap(m[0].spec.model)[0]).__name__}"
                                                           for m, _ in group.stacks))
    active = list(runs)
    bar = tqdm(range(start + 1, settings.epochs + 1), desc=f"{len(runs)} runs", initial=start, total=settings.epochs,
               mininterval=1.0, leave=False)

    def restack(leaving: list[_Run]) -> _Group | None:
        nonlocal active
        group.sync(active)
        active = [r for r in active if r not in leaving]
        return _Group(active, settings, device) if active else None

    for epoch in bar:
        t0 = time.perf_counter()
        rng_before = {id(r): r.rng["torch"].clone() for r in active}
        group.optimizer.zero_grad(set_to_none=True)
        pairs = group.losses()
        values = torch.stack([v.reshape(()) for _, v in pairs])
        floats = values.detach().to("cpu", torch.float64).tolist()
        bad = [run for (run, _), f in zip(pairs, floats) if not math.isfinite(f)]
        if bad:
            for run, f in zip((r for r, _ in pairs), floats):
                if run in bad:
                    kept = (f"the checkpoint of epoch {run.last_checkpoint} is kept: {run.out_dir / CHECKPOINT_NAME}"
                            if run.last_checkpoint else "no checkpoint was written yet")
                    run.error = TrainingDivergedError(
                        f"the loss became {f} at epoch {epoch} ({kept})", where=str(run.out_dir),
                        fix="lower the learning rate, and check the input for NaN or extreme values; "
                        f"delete {run.out_dir / CHECKPOINT_NAME} to start over")
                    log.error("%s: %s", run.desc, run.error)
            for run in active:
                run.rng["torch"] = rng_before[id(run)]
            group = restack(bad)
            if group is None:
                break
            # this epoch again, without the diverged runs
            group.optimizer.zero_grad(set_to_none=True)
            pairs = group.losses()
            values = torch.stack([v.reshape(()) for _, v in pairs])
            floats = values.detach().to("cpu", torch.float64).tolist()
            if not all(math.isfinite(f) for f in floats):
                raise EquipetError(f"a loss changed between two evaluations at epoch {epoch}", where="stacked training",
                                   fix="train these runs one by one")
        values.sum().backward()
        if settings.lr_milestones:
            group.set_lr(settings.learning_rate * settings.lr_gamma ** sum(epoch > m for m in settings.lr_milestones))
        group.optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        step_s = time.perf_counter() - t0
        for (run, _), f in zip(pairs, floats):
            run.losses.append(f)
            run.wall_time_s.append((run.wall_time_s[-1] if run.wall_time_s else 0.0) + step_s)

        stopping = [r for r in active if r.spec.stop_rule is not None and epoch < settings.epochs
                    and r.spec.stop_rule(r.losses)]
        if epoch in snapshot_set or stopping:
            images = group.predict()
            for run in active:
                if epoch in snapshot_set or (run in stopping and epoch not in run.snapshots):
                    run.save_snapshot(epoch, images[id(run)])
        checkpointing = [r for r in active if epoch % settings.checkpoint_every == 0 or epoch == settings.epochs]
        if checkpointing or stopping:
            group.sync(checkpointing + stopping)
        for run in checkpointing:
            if not group.parameters_finite(run):
                run.error = TrainingDivergedError(
                    f"the weights became non-finite at epoch {epoch} (the checkpoint of epoch {run.last_checkpoint} "
                    f"is kept: {run.out_dir / CHECKPOINT_NAME})", where=str(run.out_dir),
                    fix="lower the learning rate; delete the checkpoint to start over")
                stopping.append(run)
                continue
            run.write_checkpoint(epoch)
        for run in stopping:
            if run.error is None:
                run.stopped_at = run.end_epoch = epoch
                run.write_checkpoint(epoch)
                log.info("%s: early stop at epoch %d (loss plateau)", run.desc, epoch)
        bar.set_postfix(loss=f"{floats[0]:.4g}", refresh=False)
        if stopping:
            group = restack(stopping)
            if group is None:
                break
    bar.close()
    if active:
        group.sync(active)
