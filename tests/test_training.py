"""Tests of equipet.networks.training: losses, learning, outputs, resume, divergence, fingerprint."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from equipet.errors import EquipetError, InputDataError, TrainingDivergedError
from equipet.networks.nets import CNN, SCNN, smooth_test_image
from equipet.networks.training import (
    ForwardModelMSELoss,
    MSELoss,
    PoissonNLLLoss,
    TrainSettings,
    seed_everything,
    train,
)

SIZE = 32


def settings(**overrides) -> TrainSettings:
    base = dict(epochs=6, learning_rate=1e-3, snapshots=[2, 5, 6], checkpoint_every=3,
                seed=0, device="cpu", deterministic=True)
    base.update(overrides)
    return TrainSettings(**base)


def denoising_problem(seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    clean = smooth_test_image(SIZE, seed=seed)
    noisy = clean + 0.3 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(seed))
    return noisy[None, None], clean


def make(name: str, seed: int = 0) -> torch.nn.Module:
    seed_everything(seed, True)
    return SCNN() if name == "scnn" else CNN()


def read_loss_csv(path):
    with open(path) as fh:
        rows = list(csv.DictReader(fh))
    return rows


# ------------------------------------------------------------------ losses


def test_losses_share_one_signature_and_compute_their_equations():
    y = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    assert float(MSELoss(torch.zeros(2, 2))(y)) == pytest.approx((1 + 4 + 9 + 16) / 4)
    double = ForwardModelMSELoss(lambda t: 2 * t, 2 * y + 1)
    assert float(double(y)) == pytest.approx(1.0)
    m = torch.tensor([[[[0.0, 1.0], [2.0, 5.0]]]])
    expected = float((y - m * torch.log(y)).sum())
    assert float(PoissonNLLLoss(lambda t: t, m)(y)) == pytest.approx(expected, rel=1e-6)
    # below the floor: finite, and the gradient pushes the prediction up
    z = torch.tensor([[[[-1.0]]]], requires_grad=True)
    value = PoissonNLLLoss(lambda t: t, torch.ones(1, 1))(z)
    value.backward()
    assert torch.isfinite(value) and z.grad.item() < 0
    with pytest.raises(ValueError, match="shape"):
        MSELoss(torch.zeros(3, 3))(y)


def test_forward_model_loss_gradients_reach_the_network_through_an_operator_module():
    operator = torch.nn.AvgPool2d(2)  # any differentiable module stands in for the Radon transform
    truth = smooth_test_image(SIZE, seed=1)[None, None]
    loss = ForwardModelMSELoss(operator, operator(truth))
    assert "operator" in dict(loss.named_children())
    net = make("cnn")
    value = loss(net(truth))
    value.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


# ------------------------------------------------------------------ learning and outputs


@pytest.mark.parametrize("name", ["scnn", "cnn"])
def test_both_networks_learn_to_denoise_on_the_cpu(name, tmp_path):
    noisy, clean = denoising_problem()
    result = train(make(name), noisy, MSELoss(clean), settings(epochs=20, snapshots=[10, 20], checkpoint_every=10),
                   tmp_path, desc=name)
    # measured: SCNN 3.37 -> 0.46, CNN 0.62 -> 0.040
    assert result.losses.shape == (20,)
    assert result.losses[-1] < 0.3 * result.losses[0]
    assert result.device == "cpu"
    assert sorted(result.snapshots) == [10, 20]
    assert result.snapshots[20].shape == (SIZE, SIZE) and result.snapshots[20].dtype == np.float32


def test_train_writes_every_output(tmp_path):
    noisy, clean = denoising_problem()
    model = make("cnn")
    result = train(model, noisy, MSELoss(clean), settings(), tmp_path)
    rows = read_loss_csv(tmp_path / "loss.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert np.array_equal([float(r["loss"]) for r in rows], result.losses)
    walls = [float(r["wall_time_s"]) for r in rows]
    assert walls == sorted(walls) and walls[0] > 0
    for epoch in (2, 5, 6):
        snap = np.load(tmp_path / "snapshots" / f"epoch_{epoch:06d}.npy")
        assert np.array_equal(snap, result.snapshots[epoch])
    timing = json.loads((tmp_path / "timing.json").read_text())
    assert timing["epochs"] == 6 and timing["device"] == "cpu" and timing["resumed_from_epoch"] == 0
    assert timing["n_parameters"] == sum(p.numel() for p in model.parameters())
    assert timing["total_s"] == pytest.approx(result.total_s) and timing["torch"] == torch.__version__
    # the final snapshot is the eval-mode output of the saved weights
    fresh = make("cnn", seed=99)
    fresh.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    with torch.no_grad():
        assert np.allclose(fresh.eval()(noisy)[0, 0].numpy(), result.snapshots[6], atol=1e-6)
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 6
    assert not list(tmp_path.glob(".*.tmp*")), "no temporary files may be left behind"


def test_timing_records_the_launchers_concurrent_jobs(tmp_path, monkeypatch):
    """EQUIPET_CONCURRENT_JOBS (run_ablation.py --jobs) lands in timing.json for the contention rule;
    unset it is null, and a value that is not a positive count is refused before training."""
    from equipet.errors import ConfigError

    noisy, clean = denoising_problem()
    for value, expected in (("1", 1), ("8", 8), (None, None)):
        out = tmp_path / f"jobs{value}"
        if value is None:
            monkeypatch.delenv("EQUIPET_CONCURRENT_JOBS", raising=False)
        else:
            monkeypatch.setenv("EQUIPET_CONCURRENT_JOBS", value)
        train(make("cnn"), noisy, MSELoss(clean), settings(epochs=2, snapshots=[2]), out)
        timing = json.loads((out / "timing.json").read_text())
        assert timing["concurrent_jobs"] == expected
        assert len(timing["load_average_end"]) == 3 and timing["cpu_count"] >= 1
    for bad in ("two", "0"):   # refused before a step is trained
        monkeypatch.setenv("EQUIPET_CONCURRENT_JOBS", bad)
        with pytest.raises(ConfigError, match="EQUIPET_CONCURRENT_JOBS"):
            train(make("cnn"), noisy, MSELoss(clean), settings(epochs=2, snapshots=[2]), tmp_path / "bad")
        assert not (tmp_path / "bad" / "loss.csv").exists() and not (tmp_path / "bad" / "checkpoint.pt").exists()


def test_scnn_model_pt_loads_into_a_fresh_scnn(tmp_path):
    noisy, clean = denoising_problem()
    result = train(make("scnn"), noisy, MSELoss(clean), settings(epochs=3, snapshots=[3]), tmp_path)
    fresh = make("scnn", seed=7)
    fresh.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    from equipet.networks.training import predict

    assert np.allclose(predict(fresh, noisy)[0, 0].numpy(), result.snapshots[3], atol=1e-5)


# ------------------------------------------------------------------ resume


class Interrupt(Exception):
    pass


def interrupt_after(epoch_to_stop: int):
    def callback(epoch: int, loss: float) -> None:
        if epoch == epoch_to_stop:
            raise Interrupt  # like Ctrl-C / a killed job: epoch 4's work is lost, checkpoint 3 remains
    return callback


@pytest.mark.parametrize("name", ["scnn", "cnn"])
def test_interrupted_and_resumed_run_is_bit_identical(name, tmp_path):
    noisy, clean = denoising_problem()
    full = train(make(name), noisy, MSELoss(clean), settings(), tmp_path / "full")

    part = tmp_path / "interrupted"
    with pytest.raises(Interrupt):
        train(make(name), noisy, MSELoss(clean), settings(), part, on_epoch_end=interrupt_after(4))
    assert torch.load(part / "checkpoint.pt", weights_only=True)["epoch"] == 3
    resumed = train(make(name, seed=123), noisy, MSELoss(clean), settings(), part)  # init is overwritten

    assert resumed.resumed_from_epoch == 3
    assert np.array_equal(resumed.losses, full.losses)
    assert sorted(resumed.snapshots) == [2, 5, 6]
    for epoch in (2, 5, 6):
        assert np.array_equal(resumed.snapshots[epoch], full.snapshots[epoch])
    full_sd = torch.load(tmp_path / "full" / "model.pt", weights_only=True)
    resumed_sd = torch.load(part / "model.pt", weights_only=True)
    assert full_sd.keys() == resumed_sd.keys()
    assert all(torch.equal(full_sd[k], resumed_sd[k]) for k in full_sd)
    assert json.loads((part / "timing.json").read_text())["resumed_from_epoch"] == 3
    assert [r["loss"] for r in read_loss_csv(part / "loss.csv")] == [
        r["loss"] for r in read_loss_csv(tmp_path / "full" / "loss.csv")]


def test_extending_a_finished_run_matches_a_longer_run(tmp_path):
    noisy, clean = denoising_problem()
    full = train(make("cnn"), noisy, MSELoss(clean), settings(), tmp_path / "full")
    ext = tmp_path / "extended"
    train(make("cnn"), noisy, MSELoss(clean), settings(epochs=3, snapshots=[2]), ext)
    longer = train(make("cnn"), noisy, MSELoss(clean), settings(), ext)
    assert longer.resumed_from_epoch == 3
    assert np.array_equal(longer.losses, full.losses)
    assert np.array_equal(longer.snapshots[2], full.snapshots[2])  # read back from disk
    assert np.array_equal(longer.snapshots[6], full.snapshots[6])


def test_step_decay_scales_the_step_and_resumes_exactly(tmp_path):
    """After a milestone the step size is lr x gamma: with gamma = 1e-9 the network (Adam steps of
    about lr) stops changing after epoch 3, and without the decay it keeps changing. An
    interrupted decayed run resumes to the same losses (the rate is a function of the epoch)."""
    noisy, clean = denoising_problem()
    s = dict(snapshots=[3, 6], checkpoint_every=2)
    const = train(make("cnn"), noisy, MSELoss(clean), settings(**s), tmp_path / "const")
    decayed = train(make("cnn"), noisy, MSELoss(clean), settings(**s, lr_milestones=[3], lr_gamma=1e-9),
                    tmp_path / "decayed")
    assert np.array_equal(const.losses[:3], decayed.losses[:3])   # same path up to the milestone
    moved_const = np.abs(const.snapshots[6] - const.snapshots[3]).max()
    moved_decayed = np.abs(decayed.snapshots[6] - decayed.snapshots[3]).max()
    assert moved_const > 1e-3 and moved_decayed < 1e-6 * moved_const, (moved_const, moved_decayed)
    part = tmp_path / "interrupted"
    with pytest.raises(Interrupt):
        train(make("cnn"), noisy, MSELoss(clean), settings(**s, lr_milestones=[3], lr_gamma=0.1), part,
              on_epoch_end=interrupt_after(5))
    resumed = train(make("cnn"), noisy, MSELoss(clean), settings(**s, lr_milestones=[3], lr_gamma=0.1), part)
    whole = train(make("cnn"), noisy, MSELoss(clean), settings(**s, lr_milestones=[3], lr_gamma=0.1),
                  tmp_path / "whole")
    assert resumed.resumed_from_epoch == 4
    assert np.array_equal(resumed.losses, whole.losses)


# ------------------------------------------------------------------ failures


class NaNAtEpoch:
    """An MSE loss that returns NaN from a given call on (a diverging run)."""

    def __init__(self, target: torch.Tensor, nan_from_epoch: int):
        self.inner = MSELoss(target)
        self.calls = 0
        self.nan_from_epoch = nan_from_epoch

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        value = self.inner(output)
        return value * float("nan") if self.calls >= self.nan_from_epoch else value


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint(tmp_path):
    noisy, clean = denoising_problem()
    with pytest.raises(TrainingDivergedError) as info:
        train(make("cnn"), noisy, NaNAtEpoch(clean, 5), settings(epochs=8, snapshots=[8], checkpoint_every=2), tmp_path)
    message = str(info.value)
    assert "epoch 5" in message and str(tmp_path) in message and "learning_rate" in message
    assert "epoch 4" in message  # names the checkpoint that was kept
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 4 and len(ckpt["losses"]) == 4 and all(np.isfinite(ckpt["losses"]))
    fresh = make("cnn")
    fresh.load_state_dict(ckpt["model"])
    assert all(torch.isfinite(p).all() for p in fresh.parameters())
    assert not (tmp_path / "model.pt").exists()


def test_non_finite_input_is_rejected_up_front(tmp_path):
    noisy, clean = denoising_problem()
    noisy[0, 0, 3, 3] = float("nan")
    with pytest.raises(InputDataError, match="network input has 1 non-finite"):
        train(make("cnn"), noisy, MSELoss(clean), settings(), tmp_path)
    clean_bad = clean.clone()
    clean_bad[0, 0] = float("inf")
    with pytest.raises(InputDataError, match="loss target"):
        train(make("cnn"), denoising_problem()[0], MSELoss(clean_bad), settings(), tmp_path)
    assert not (tmp_path / "checkpoint.pt").exists()


def test_checkpoint_of_a_different_run_is_refused(tmp_path):
    noisy, clean = denoising_problem()
    train(make("cnn"), noisy, MSELoss(clean), settings(epochs=3, snapshots=[3]), tmp_path)
    with pytest.raises(EquipetError) as info:
        train(make("cnn"), noisy, MSELoss(clean), settings(learning_rate=1e-2), tmp_path)
    message = str(info.value)
    assert str(tmp_path / "checkpoint.pt") in message and "learning_rate" in message and "delete" in message
    with pytest.raises(EquipetError, match="model_class"):
        train(make("scnn"), noisy, MSELoss(clean), settings(), tmp_path)
    with pytest.raises(EquipetError, match="input_sha256"):
        train(make("cnn"), noisy + 1, MSELoss(clean), settings(), tmp_path)
    with pytest.raises(EquipetError, match="beyond the requested epochs"):
        train(make("cnn"), noisy, MSELoss(clean), settings(epochs=2, snapshots=[2]), tmp_path)


def test_corrupt_checkpoint_is_reported_with_a_fix(tmp_path):
    noisy, clean = denoising_problem()
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(InputDataError, match="delete"):
        train(make("cnn"), noisy, MSELoss(clean), settings(), tmp_path)


def test_snapshots_outside_the_run_are_refused(tmp_path):
    noisy, clean = denoising_problem()
    with pytest.raises(EquipetError, match="snapshot"):
        train(make("cnn"), noisy, MSELoss(clean), settings(snapshots=[7]), tmp_path)


def test_docstring_examples():
    import doctest

    import equipet.networks.training

    result = doctest.testmod(equipet.networks.training)
    assert result.attempted >= 4 and result.failed == 0


def test_predict_uses_batch_statistics_and_leaves_running_stats_untouched():
    from equipet.networks.nets import SCNN
    from equipet.networks.training import predict

    torch.manual_seed(0)
    model = SCNN(group="C", order=4, fields=2)
    x = torch.rand(1, 1, 17, 17)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(5):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    before = [m.running_mean.clone() for m in norms]
    model.eval()
    out = predict(model, x)
    assert not model.training  # mode restored
    assert all(torch.equal(b, m.running_mean) for b, m in zip(before, norms))
    with torch.no_grad():
        model.train()
        for m in norms:
            m.momentum = 0.0
        reference = model(x)
        model.eval()
        stale = model(x)
    assert torch.allclose(out, reference, atol=1e-6)
    # after 5 steps the running averages lag: eval mode is a different function
    assert (stale - reference).abs().max() > 1e-3
    # predict is still exactly equivariant to 90-degree rotations
    rotated = predict(model, torch.rot90(x, 1, dims=(-2, -1)))
    assert torch.allclose(rotated, torch.rot90(out, 1, dims=(-2, -1)), atol=1e-5)
