"""Tests of equipet.networks.stacked: R runs trained together equal the same runs trained alone."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from equipet.errors import EquipetError, TrainingDivergedError
from equipet.networks.nets import CNN, SCNN, NonNegativeOutput, smooth_test_image
from equipet.networks.stacked import StackedNetwork, StackedRun, train_stacked
from equipet.networks.training import MSELoss, TrainSettings, predict, seed_everything, train

SIZE = 24


def settings(seed: int, **overrides) -> TrainSettings:
    base = dict(epochs=8, learning_rate=3e-3, snapshots=[3, 8], checkpoint_every=4, seed=seed, device="cpu",
                deterministic=True, lr_milestones=[6], lr_gamma=0.5)
    base.update(overrides)
    return TrainSettings(**base)


def build(kind: str, seed: int) -> torch.nn.Module:
    """The run's network, initialised from its seed as the assisted runs do."""
    seed_everything(seed, True)
    if kind == "scnn":
        return SCNN(group="C", order=4, fields=3)
    if kind == "scnn_d4":
        return SCNN(group="D", order=4, fields=2, kernel_size=5, max_frequency=2)
    if kind == "scnn+":
        return NonNegativeOutput(SCNN(group="C", order=4, fields=3))
    if kind == "cnn_bn":
        return CNN(layers=3, channels=6, batch_norm=True)
    return CNN(layers=3, channels=6)


class RandomBlockLoss(torch.nn.Module):
    """A stochastic loss: the squared error on one of four random row blocks, drawn from torch's
    global generator each call (as the assisted subset likelihood draws its event block)."""

    def __init__(self, target: torch.Tensor):
        super().__init__()
        self.register_buffer("target", target)

    def forward(self, output: torch.Tensor) -> torch.Tensor:
        k = int(torch.randint(4, (1,)))
        rows = slice(k * SIZE // 4, (k + 1) * SIZE // 4)
        return torch.mean((output[..., rows, :] - self.target[..., rows, :]) ** 2)


def problem(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    clean = smooth_test_image(SIZE, seed=seed)[None, None]
    noisy = clean + 0.2 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(seed + 50))
    return noisy, clean


# A mixed group: SCNN seeds with and without a non-negative output (one stack), CNNs with batch
# norm (a second stack), different inputs and a stochastic loss for some runs.
RUNS = [("scnn", 0, "mse"), ("scnn", 1, "random"), ("scnn+", 2, "mse"), ("cnn_bn", 0, "random"),
        ("cnn_bn", 1, "mse")]


def spec(kind: str, seed: int, loss: str, out_dir, **overrides) -> StackedRun:
    x, clean = problem(seed)
    target = MSELoss(clean) if loss == "mse" else RandomBlockLoss(clean)
    return StackedRun(build(kind, seed), x, target, settings(seed, **overrides), out_dir, desc=f"{kind}/{seed}")


@pytest.mark.parametrize("kind", ["scnn", "scnn_d4", "scnn+", "cnn", "cnn_bn"])
def test_stacked_forward_and_gradient_equal_each_network(kind):
    models = [build(kind, s) for s in range(3)]
    stack = StackedNetwork(models)
    x = torch.cat([problem(s)[0] for s in range(3)])
    out = stack(x)
    alone = torch.cat([m(x[r:r + 1]) for r, m in enumerate(models)])
    np.testing.assert_allclose(out.detach().numpy(), alone.detach().numpy(), rtol=1e-5, atol=1e-6)
    (out ** 2).sum().backward()
    (alone ** 2).sum().backward()
    core = [m.net if kind == "scnn+" else m for m in models]
    # float rounding relative to the largest gradient (a bias in front of a batch norm has a
    # gradient that is rounding alone)
    scale = max(float(p.grad.abs().max()) for p in stack.params)
    for i, name in enumerate(stack.param_names):
        per_run = torch.stack([dict(c.named_parameters())[name].grad for c in core])
        np.testing.assert_allclose(stack.params[i].grad.numpy(), per_run.numpy(), rtol=1e-4, atol=1e-5 * scale,
                                   err_msg=name)
    # batch-norm statistics: each run's own (one update in training mode)
    for i, name in enumerate(stack.buffer_names):
        per_run = torch.stack([dict(c.named_buffers())[name] for c in core])
        np.testing.assert_allclose(getattr(stack, f"stat{i}").numpy(), per_run.numpy(), rtol=1e-5, atol=1e-6)


def test_runs_trained_together_equal_the_runs_trained_one_by_one(tmp_path):
    alone = []
    for kind, seed, loss in RUNS:
        s = spec(kind, seed, loss, tmp_path / "alone" / f"{kind}_{seed}")
        alone.append(train(s.model, s.net_input, s.loss, s.settings, s.out_dir))
    together = train_stacked([spec(k, s, l, tmp_path / "together" / f"{k}_{s}") for k, s, l in RUNS])
    for (kind, seed, _), a, b in zip(RUNS, alone, together):
        np.testing.assert_allclose(b.losses, a.losses, rtol=2e-4, err_msg=f"{kind}/{seed}")
        assert b.losses[0] == pytest.approx(a.losses[0], rel=1e-6)   # the same initial network and loss
        assert sorted(b.snapshots) == sorted(a.snapshots) == [3, 8]
        for e in a.snapshots:
            np.testing.assert_allclose(b.snapshots[e], a.snapshots[e], rtol=1e-3, atol=1e-5)
        ka = torch.load(tmp_path / "alone" / f"{kind}_{seed}" / "checkpoint.pt", weights_only=True)
        kb = torch.load(tmp_path / "together" / f"{kind}_{seed}" / "checkpoint.pt", weights_only=True)
        assert ka.keys() == kb.keys() and ka["fingerprint"] == kb["fingerprint"] and ka["epoch"] == kb["epoch"]
        assert ka["model"].keys() == kb["model"].keys()
        # the stored networks compute the same function (a bias in front of a batch norm does not
        # enter it: its gradient is rounding, which Adam scales up, so it is not compared alone)
        x = problem(seed)[0]
        images = []
        for state in (ka["model"], kb["model"]):
            net = build(kind, seed).eval()
            net.load_state_dict(state)
            images.append(predict(net, x).numpy())
        np.testing.assert_allclose(images[1], images[0], rtol=1e-3, atol=1e-4)
        assert ka["optimizer"]["param_groups"] == kb["optimizer"]["param_groups"]
        assert torch.equal(ka["rng"]["torch"], kb["rng"]["torch"])   # the same random draws
        ta = json.loads((tmp_path / "alone" / f"{kind}_{seed}" / "timing.json").read_text())
        tb = json.loads((tmp_path / "together" / f"{kind}_{seed}" / "timing.json").read_text())
        assert ta.keys() == tb.keys() and ta["batched_runs"] == 1 and tb["batched_runs"] == len(RUNS)
        assert (tmp_path / "together" / f"{kind}_{seed}" / "loss.csv").read_text().splitlines()[0] == \
            "epoch,loss,wall_time_s"


def test_a_stacked_run_resumes_exactly(tmp_path):
    """Stopped after epoch 4's checkpoint (a run of 4 epochs), then continued to 8: bit-identical."""
    straight = train_stacked([spec(k, s, l, tmp_path / "straight" / f"{k}_{s}") for k, s, l in RUNS])
    first = train_stacked([spec(k, s, l, tmp_path / "resumed" / f"{k}_{s}", epochs=4, snapshots=[3])
                           for k, s, l in RUNS])
    assert all(len(r.losses) == 4 for r in first)
    resumed = train_stacked([spec(k, s, l, tmp_path / "resumed" / f"{k}_{s}") for k, s, l in RUNS])
    for a, b in zip(straight, resumed):
        assert b.resumed_from_epoch == 4
        np.testing.assert_array_equal(b.losses, a.losses)
        np.testing.assert_array_equal(b.snapshots[8], a.snapshots[8])


def test_a_run_trained_alone_resumes_in_a_stack_and_the_runs_at_other_epochs_train_after(tmp_path):
    kind, seed, loss = RUNS[0]
    s = spec(kind, seed, loss, tmp_path / "a", epochs=4, snapshots=[3])
    train(s.model, s.net_input, s.loss, s.settings, s.out_dir)
    results = train_stacked([spec(kind, seed, loss, tmp_path / "a"), spec(*RUNS[1], tmp_path / "b")])
    reference = train_stacked([spec(kind, seed, loss, tmp_path / "ref")])[0]
    assert results[0].resumed_from_epoch == 4 and results[1].resumed_from_epoch == 0
    np.testing.assert_allclose(results[0].losses, reference.losses, rtol=2e-4)


def test_a_diverging_run_leaves_the_stack_and_the_others_finish(tmp_path):
    class Exploding(MSELoss):
        def forward(self, output):
            value = super().forward(output)
            return value * float("nan") if self.calls >= 5 else value + 0 * self.calls

        calls = 0

        def __call__(self, *a, **k):
            type(self).calls += 1 if self is boom else 0
            return super().__call__(*a, **k)

    runs = [spec(*RUNS[0], tmp_path / "ok0"), spec(*RUNS[2], tmp_path / "ok1")]
    x, clean = problem(7)
    boom = Exploding(clean)
    runs.insert(1, StackedRun(build("scnn", 7), x, boom, settings(7), tmp_path / "boom"))
    reference = train_stacked([spec(*RUNS[0], tmp_path / "ref0"), spec(*RUNS[2], tmp_path / "ref1")])
    results = train_stacked(runs)
    assert isinstance(results[1], TrainingDivergedError) and "epoch 5" in str(results[1])
    assert str(tmp_path / "boom") in str(results[1])
    assert (tmp_path / "boom" / "checkpoint.pt").exists()          # epoch 4's is kept
    assert torch.load(tmp_path / "boom" / "checkpoint.pt", weights_only=True)["epoch"] == 4
    for r, ref in zip([results[0], results[2]], reference):
        np.testing.assert_allclose(r.losses, ref.losses, rtol=2e-4)


def test_early_stop_in_a_stack_matches_the_run_alone(tmp_path):
    def stop(losses):
        return len(losses) >= 5

    a = spec(*RUNS[0], tmp_path / "alone")
    alone = train(a.model, a.net_input, a.loss, a.settings, a.out_dir, stop_rule=stop)
    b = spec(*RUNS[0], tmp_path / "stacked")
    b.stop_rule = stop
    together = train_stacked([b, spec(*RUNS[1], tmp_path / "other")])
    assert len(alone.losses) == len(together[0].losses) == 5 and len(together[1].losses) == 8
    assert sorted(together[0].snapshots) == sorted(alone.snapshots) == [3, 5]
    assert json.loads((tmp_path / "stacked" / "timing.json").read_text())["stopped_early"] is True


def test_runs_with_other_settings_or_architectures_are_refused(tmp_path):
    with pytest.raises(EquipetError, match="learning_rate"):
        train_stacked([spec(*RUNS[0], tmp_path / "a"), spec(*RUNS[1], tmp_path / "b", learning_rate=1e-2)])
    with pytest.raises(EquipetError, match="architecture"):
        StackedNetwork([build("scnn", 0), build("cnn", 0)])
    with pytest.raises(EquipetError, match="one by one"):
        StackedNetwork([torch.nn.Sequential(torch.nn.Conv2d(1, 1, 3))])
