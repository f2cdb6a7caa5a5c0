"""Assisted reconstruction: list-mode losses, plateau detection, rod metrics and one tiny run."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from equipet.assisted.methods import ListmodeLeastSquaresLoss, ListmodePoissonLoss, NonNegativeOutput, PlateauStop, SliceForwardModel, SubsetPoissonLoss, run_assisted
from equipet.runs import plateau_epoch
from equipet.commands.assisted.methods import main
from equipet.reconstruction.projector import ImageGeometry, ListmodeTOFProjector, tof_fwhm_mm
from equipet.assisted.rod_metrics import pair_vpr, valley_to_peak

G2 = ImageGeometry((6, 5, 1), (2.0, 2.0, 1.0), (-5.0, -4.0, 0.0))


def projector(n, seed, dtype=torch.float64):
    rng = np.random.default_rng(seed)
    a1, a2 = rng.uniform(0, 2 * np.pi, n), rng.uniform(0, 2 * np.pi, n)
    p1 = np.stack([30 * np.cos(a1), 30 * np.sin(a1), rng.uniform(-0.4, 0.4, n)], 1)
    p2 = np.stack([30 * np.cos(a2), 30 * np.sin(a2), rng.uniform(-0.4, 0.4, n)], 1)
    t = torch.as_tensor(rng.normal(0, 3.0, n), dtype=dtype)
    return ListmodeTOFProjector(G2, torch.as_tensor(p1, dtype=dtype), torch.as_tensor(p2, dtype=dtype), t,
                                tof_fwhm_mm(100.0))


def test_poisson_loss_gradient_is_the_listmode_score():
    """grad = c (f s - A^T 1/(A x + b)) / N, and autograd agrees with finite differences."""
    A = projector(60, 0)
    keep = A.apply(torch.ones(G2.shape, dtype=torch.float64)) > 0
    A = ListmodeTOFProjector(G2, A.p1[keep], A.p2[keep], A.tof[keep], tof_fwhm_mm(100.0))
    n = A.n_events
    rng = np.random.default_rng(1)
    b = torch.as_tensor(rng.uniform(0.01, 0.1, n))
    s = torch.as_tensor(rng.uniform(1.0, 2.0, G2.shape[:2]))
    scale, f = 2.5, 0.5
    loss = ListmodePoissonLoss(SliceForwardModel(A, b, scale), s, event_fraction=f).double()
    out = torch.tensor(rng.uniform(0.5, 1.5, (1, 1, 6, 5)), requires_grad=True)
    loss(out).backward()
    x = (out.detach()[0, 0] * scale)[..., None]
    expected = scale * (f * s - A.adjoint(1.0 / (A.apply(x) + b))[..., 0]) / n
    np.testing.assert_allclose(out.grad[0, 0].numpy(), expected.numpy(), rtol=1e-6)  # b, s stored as float32
    assert torch.autograd.gradcheck(lambda o: loss(o), (out.detach().clone().requires_grad_(True),))


def test_poisson_loss_is_finite_and_pushes_up_for_negative_output():
    A = projector(40, 2)
    loss = ListmodePoissonLoss(SliceForwardModel(A, torch.zeros(A.n_events), 1.0),
                               torch.ones(G2.shape[:2]), floor=1e-3).double()
    out = torch.full((1, 1, 6, 5), -1.0, dtype=torch.float64, requires_grad=True)
    value = loss(out)
    value.backward()
    seen = A.adjoint(torch.ones(A.n_events, dtype=torch.float64))[..., 0] > 0
    assert torch.isfinite(value) and seen.sum() > 10
    assert (out.grad[0, 0][seen] < 0).all()       # the tangent continuation pushes seen pixels up


def test_least_squares_loss_gradient():
    A, M = projector(30, 3), projector(50, 4)
    b, bm = torch.full((30,), 0.05, dtype=torch.float64), torch.full((50,), 0.02, dtype=torch.float64)
    w = 0.7
    loss = ListmodeLeastSquaresLoss(SliceForwardModel(A, b, 1.0), SliceForwardModel(M, bm, 1.0), w).double()
    out = torch.tensor(np.random.default_rng(5).uniform(0.5, 1.5, (1, 1, 6, 5)), requires_grad=True)
    loss(out).backward()
    x = out.detach()[0, 0][..., None]
    expected = (2 * w * M.adjoint(M.apply(x) + bm) - 2 * A.adjoint(torch.ones(30, dtype=torch.float64)))[..., 0] / 30
    np.testing.assert_allclose(out.grad[0, 0].numpy(), expected.numpy(), rtol=1e-6, atol=1e-9)


def test_plateau_epoch_known_answer_and_invariance():
    k = np.arange(1, 2001)
    curve = np.exp(-k / 100.0)     # m_ref = L_2 (window 1), min = L_2000: plateau where L_k - min <= 0.05 (L_2 - min)
    expected = int(np.ceil(-100 * np.log(0.05 * (np.exp(-0.02) - np.exp(-20.0)) + np.exp(-20.0))))
    assert plateau_epoch(curve, window=1, tolerance=0.05) == expected
    assert plateau_epoch(3.0 * curve - 7.0, window=1, tolerance=0.05) == expected
    noisy = curve + 0.005 * np.random.default_rng(0).standard_normal(len(curve))
    clean50 = plateau_epoch(curve, window=50, tolerance=0.05)
    assert expected < clean50 <= expected + 2 * 50   # m_ref comes from a later window: later, by < 2 windows
    assert abs(plateau_epoch(noisy, window=50, tolerance=0.05) - clean50) < 30
    # a transient inside the first window (random initialisation) does not set the scale
    spiked = np.r_[[1e3, 1e2], curve]
    assert abs(plateau_epoch(spiked, window=10, tolerance=0.05) - 2 - plateau_epoch(curve, 10, 0.05)) <= 12
    assert plateau_epoch(np.ones(10), 3, 0.05) == 1


def test_valley_to_peak_known_profile_and_phantom_truth():
    t = np.arange(0.0, 12.0, 0.01)
    rod = lambda c: (np.abs(t - c) <= 1.0).astype(float)  # noqa: E731  two 2 mm rods, 4 mm apart
    p = 0.2 + rod(4.0) + rod(8.0)        # peak 1.2, valley 0.2
    assert pair_vpr(t, p, 4.0, 8.0, 2.0) == pytest.approx(0.2 / 1.2)
    from equipet.simulation.phantom import hot_rod_phantom

    ph = hot_rod_phantom({})
    g = ImageGeometry.centred((250, 250, 1), (0.4, 0.4, 0.4))
    truth = ph.voxelise(0.4, shape=g.shape).activity_bq_per_ml[:, :, 0]
    vpr = valley_to_peak(truth, g, ph.rods)
    assert vpr[6.5] == pytest.approx(ph.background_ratio, abs=0.02)
    blurred = valley_to_peak(np.ones_like(truth), g, ph.rods)
    assert all(v == pytest.approx(1.0) for v in blurred.values())


def write_tiny_slice(tmp_path, n=300):
    """A synthetic slice.npz (hot-rod truth on a 28 x 28 grid of 4 mm pixels, random in-plane
    LORs, a noisy early image and a 'converged' MLEM image equal to the truth) and its system.pt."""
    from equipet.assisted.central_slice import slice_system_matrix
    from equipet.simulation.phantom import hot_rod_phantom

    g = ImageGeometry((28, 28, 1), (4.0, 4.0, 0.8), (-54.0, -54.0, 0.4))
    ph = hot_rod_phantom({})
    truth = ph.voxelise(4.0, shape=(28, 28, 1)).activity_bq_per_ml[:, :, 0]
    rng = np.random.default_rng(0)
    a1, a2 = rng.uniform(0, 2 * np.pi, n), rng.uniform(0, 2 * np.pi, n)
    p1 = np.stack([80 * np.cos(a1), 80 * np.sin(a1), np.full(n, 0.4)], 1).astype(np.float32)
    p2 = np.stack([80 * np.cos(a2), 80 * np.sin(a2), np.full(n, 0.4)], 1).astype(np.float32)
    early = (truth / truth.max() + 0.1 * rng.uniform(size=truth.shape)).astype(np.float32)
    data = dict(iterations=np.array([1, 2, 3]), mlem=np.stack([early, early, truth / truth.max()]).astype(np.float32),
                early=early, early_iteration=np.asarray(2), truth=truth, sensitivity=np.ones_like(early), p1=p1,
                p2=p2, tof=rng.normal(0, 5, n).astype(np.float32), background=np.zeros(n, np.float32),
                event_fraction=np.asarray(1.0), ctr_ps=np.asarray(100.0), tof_fwhm_mm=np.asarray(tof_fwhm_mm(100.0)),
                tof_truncation_sigma=np.asarray(3.0), geometry_shape=np.asarray(g.shape),
                geometry_voxel_mm=np.asarray(g.voxel_size_mm), geometry_origin_mm=np.asarray(g.origin_mm))
    np.savez(tmp_path / "slice.npz", **data)
    torch.save(slice_system_matrix(data).state_dict(), tmp_path / "system.pt")
    return ph


def tiny_config(**assisted):
    from equipet.config import schema_defaults

    cfg = {s: schema_defaults(s) for s in ("assisted", "training", "phantom", "mlem", "models")}
    cfg["device"] = "cpu"
    cfg["assisted"].update({**dict(epochs=4, snapshots=[2, 4], cache_mb=10, subset_events=100), **assisted})
    cfg["assisted"]["plateau"]["window"] = 2
    cfg["models"]["cnn"].update(layers=3, channels=4)
    return cfg


@pytest.mark.parametrize("method", ["poisson", "paper"])
def test_tiny_assisted_run(tmp_path, method):
    """A whole run on a synthetic slice: files, tidy rows with the method, resumable outputs."""
    ph = write_tiny_slice(tmp_path)
    cfg = tiny_config()
    out = tmp_path / "run"
    df = run_assisted(cfg, tmp_path / "slice.npz", method, "cnn", 0, out, tmp_path / "system.pt")
    for f in ("loss.csv", "timing.json", "eval.npz", "metrics.csv", "summary.json"):
        assert (out / f).exists(), f
    assert list(df.columns) == ["experiment", "method", "model", "seed", "epoch", "metric", "value", "ctr_ps",
                                "rod_mm", "split"]
    assert set(df["method"]) == {method}
    assert set(df["split"]) == {"input", "train", "training"}
    crc = df[(df.metric == "crc") & (df.split == "train") & (df.epoch == 4)]
    assert sorted(crc.rod_mm) == sorted(ph.rod_diameters_mm)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == method
    assert ("full_nll" in summary) == (method == "poisson")
    assert len(pd.read_csv(out / "loss.csv")) == 4
    ev = np.load(out / "eval.npz")
    assert ev["snapshots"].shape == (2, 28, 28)
    if method == "poisson":
        assert (ev["snapshots"] > 0).all()          # softplus output: every likelihood image is positive


def test_paper_method_learns_its_target(tmp_path):
    """The paper method maps the early slice to the MLEM slice at image_target_iterations."""
    write_tiny_slice(tmp_path)
    cfg = tiny_config(epochs=300, snapshots=[300], learning_rate=1e-2)
    run_assisted(cfg, tmp_path / "slice.npz", "paper", "cnn", 0, tmp_path / "run")
    losses = pd.read_csv(tmp_path / "run" / "loss.csv")["loss"].to_numpy()
    ev = np.load(tmp_path / "run" / "eval.npz")
    target = np.load(tmp_path / "slice.npz")["mlem"][-1]
    out = ev["snapshots"][-1] / float(ev["scale"])
    initial = float(np.mean((ev["net_input"] / float(ev["scale"]) - target / float(ev["scale"])) ** 2))
    assert losses[-1] < 0.05 * losses[0]
    assert float(np.mean((out - target / float(ev["scale"])) ** 2)) < 0.5 * initial   # closer than the input was


def subset_problem(n=400, k=5, estimator="saga"):
    """A small single-slice problem: stored matrix, its K blocks, background and sensitivity."""
    A = projector(n, 7, dtype=torch.float32)
    keep = A.apply(torch.ones(G2.shape)) > 0
    A = ListmodeTOFProjector(G2, A.p1[keep], A.p2[keep], A.tof[keep], tof_fwhm_mm(100.0))
    S = A.to_sparse()
    rng = np.random.default_rng(8)
    b = torch.as_tensor(rng.uniform(0.01, 0.05, S.n_events), dtype=torch.float32)
    sens = torch.as_tensor(rng.uniform(1.0, 2.0, G2.shape[:2]), dtype=torch.float32)
    parts = S.subsets(k)
    bounds = np.cumsum([0] + [p.n_events for p in parts])
    sub = SubsetPoissonLoss(parts, [b[x:y] for x, y in zip(bounds[:-1], bounds[1:])], sens, 1.7, 0.8,
                            estimator=estimator)
    full = ListmodePoissonLoss(SliceForwardModel(A, b, 1.7), sens, 0.8)
    return sub, full


def _output(seed):
    return torch.tensor(np.random.default_rng(seed).uniform(0.5, 1.5, (1, 1, 6, 5)), dtype=torch.float32,
                        requires_grad=True)


def _full_gradient(full, out):
    out.grad = None
    full(out).backward()
    return out.grad.clone()


def test_subset_gradient_is_unbiased():
    """Plain estimator: the mean over the K blocks of grad L_k equals the full-batch gradient, and
    L_k averages to L."""
    sub, full = subset_problem(estimator="none")
    out = _output(9)
    g_full = _full_gradient(full, out)
    grads = []
    for k in range(len(sub.subsets)):
        out.grad = None
        sub(out, k).backward()
        grads.append(out.grad.clone())
    torch.testing.assert_close(torch.stack(grads).mean(0), g_full, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(grads[0], g_full, rtol=1e-2)        # a single block is not the full gradient
    assert sub.full(out).item() == pytest.approx(full(out).item(), rel=1e-5)


def test_saga_gradient_is_unbiased_for_any_table_and_exact_at_the_table_point():
    """SAGA: with a table filled at another image, the mean over k of the estimate equals the full
    gradient (a single one does not); with the table filled at the current image every block's
    estimate is the full gradient; the value is L_k and the table takes the block's new gradient."""
    sub, full = subset_problem(estimator="saga")
    out = _output(9)
    g_full = _full_gradient(full, out)
    sub.refresh(sub.image(_output(10)).detach())                   # a stale table
    table = sub.saga_table.clone()
    grads = []
    for k in range(len(sub.subsets)):
        sub.saga_table.copy_(table)
        out.grad = None
        value = sub(out, k)
        value.backward()
        grads.append(out.grad.clone())
        plain = SubsetPoissonLoss.subset_loss(sub, out, k)
        assert value.item() == pytest.approx(plain.item(), rel=1e-6)               # the value is L_k
        torch.testing.assert_close(sub.saga_table[k], sub.block_log_gradient(sub.image(out), k)[1])
    torch.testing.assert_close(torch.stack(grads).mean(0), g_full, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(grads[0], g_full, rtol=1e-2)
    sub.refresh(sub.image(out).detach())                            # table at the current image
    for k in range(len(sub.subsets)):
        out.grad = None
        sub(out, k).backward()
        torch.testing.assert_close(out.grad, g_full, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("estimator,decay", [("saga", False), ("none", True)])
def test_subset_method_reaches_full_batch_likelihood(estimator, decay):
    """From the same start and for the same number of steps, Adam on random blocks reaches the
    full-batch optimum's likelihood within 1% of the total decrease (a pixel image through a
    softplus, so x > 0): with SAGA at a constant step size, with the plain block gradient only
    after a step decay."""
    sub, full = subset_problem(n=2000, k=8, estimator=estimator)
    start = torch.zeros(1, 1, 6, 5)
    finals = {}
    for name, loss in (("full", full), ("subset", sub)):
        torch.manual_seed(0)
        z = start.clone().requires_grad_(True)
        opt = torch.optim.Adam([z], lr=0.05)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1.0 if e < 1500 or not decay else 0.1)
        for _ in range(3000):
            opt.zero_grad()
            loss(torch.nn.functional.softplus(z, beta=20.0)).backward()
            opt.step()
            sched.step()
        with torch.no_grad():
            finals[name] = float(full(torch.nn.functional.softplus(z, beta=20.0)))
    with torch.no_grad():
        initial = float(full(torch.nn.functional.softplus(start, beta=20.0)))
    decrease = initial - finals["full"]
    assert decrease > 0
    assert abs(finals["subset"] - finals["full"]) <= 0.01 * decrease


@pytest.mark.parametrize("estimator", ["saga", "none"])
def test_subset_run_resumes_exactly_from_its_checkpoint(tmp_path, estimator):
    """A run of the stochastic method stopped at a checkpoint and resumed with a fresh loss object
    ends with the same losses and weights as the run that went through. SAGA: the table (empty in
    the fresh loss) is in the checkpoint. Plain gradient: no table is kept, and a checkpoint from
    before the table was SAGA-only (an unused zero table in it) resumes all the same."""
    from equipet.networks.training import TrainSettings, train

    x = torch.rand(1, 1, 6, 5, generator=torch.Generator().manual_seed(3))

    def run(out, epochs):
        torch.manual_seed(0)
        net = NonNegativeOutput(torch.nn.Conv2d(1, 1, 3, padding=1))
        settings = TrainSettings(epochs=epochs, learning_rate=0.01, snapshots=[epochs], checkpoint_every=5,
                                 seed=0, device="cpu", deterministic=True)
        return train(net, x, subset_problem(estimator=estimator)[0], settings, out)

    through = run(tmp_path / "a", 12)
    run(tmp_path / "b", 5)
    ckpt_path = tmp_path / "b" / "checkpoint.pt"
    if estimator == "none":
        ckpt = torch.load(ckpt_path, weights_only=True)
        assert ckpt["loss_state"] == {}
        blocks = ckpt["fingerprint"]["loss_settings"]["blocks"]
        ckpt["loss_state"] = {"saga_table": torch.zeros((blocks,) + tuple(G2.shape)), "saga_ready": torch.tensor(False)}
        torch.save(ckpt, ckpt_path)
    resumed = run(tmp_path / "b", 12)
    assert resumed.resumed_from_epoch == 5
    np.testing.assert_array_equal(resumed.losses, through.losses)
    for (name, a), (_, b) in zip(through.model.state_dict().items(), resumed.model.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    ckpt = torch.load(ckpt_path, weights_only=True)
    assert ckpt["fingerprint"]["loss_settings"]["estimator"] == estimator
    if estimator == "saga":
        assert bool(ckpt["loss_state"]["saga_ready"])


def test_non_negative_output_and_plateau_stop_in_training(tmp_path):
    """The softplus wrapper gives positive images; an early stop ends training, is recorded, and a
    rerun does not train on."""
    from equipet.networks.training import MSELoss, TrainSettings, train

    net = NonNegativeOutput(torch.nn.Conv2d(1, 1, 3, padding=1))
    x = torch.randn(1, 1, 8, 8)
    assert (net(x) > 0).all()
    target = torch.zeros(8, 8)           # unreachable for a softplus: the loss plateaus above 0
    settings = TrainSettings(epochs=5000, learning_rate=0.05, snapshots=[5000], checkpoint_every=100, seed=0,
                             device="cpu", deterministic=True)
    res = train(net, x, MSELoss(target), settings, tmp_path, stop_rule=PlateauStop(20, 0.01, 100))
    n = len(res.losses)
    assert 40 < n < 5000
    timing = json.loads((tmp_path / "timing.json").read_text())
    assert timing["stopped_early"] and timing["epochs"] == n and timing["epochs_requested"] == 5000
    assert n in res.snapshots
    again = train(NonNegativeOutput(torch.nn.Conv2d(1, 1, 3, padding=1)), x, MSELoss(target), settings, tmp_path,
                  stop_rule=PlateauStop(20, 0.01, 100))
    assert len(again.losses) == n


# ----------------------------------------------------------------------- the scale of the poisson method
#
# For L(x) = [f s^T x - sum_e log((A x)_e + b_e)] / N, the derivative along a global scale is
# d/dalpha L(alpha x) |_(alpha=1) = [f s^T x - sum_e (A x)_e / ((A x)_e + b_e)] / N, so wherever L is
# stationary in the scale (at its optimum, and at the best scale of any image) the expected counts
# from the image, f s^T x, equal the events attributed to it, sum_e (A x)_e / ((A x)_e + b_e): N
# without background. The tests below check that identity, computed from the events alone, on the
# ``poisson`` method's loss as build_loss makes it (event fraction f != 1, K blocks, non-uniform s).


@pytest.fixture
def one_torch_thread():
    """One intra-op thread for these small problems (oversubscribed threads on a shared 2-core
    machine slow them down several-fold)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def scale_problem(background, n=2400, f=0.6, seed=11):
    """A slice.npz-like dict (random in-plane TOF LORs through G2, all seeing the image; background
    ``background`` times the mean (A early)_e) and a float64 on-the-fly projector of its events."""
    rng = np.random.default_rng(seed)
    a1 = rng.uniform(0, 2 * np.pi, n)
    a2 = a1 + np.pi + rng.normal(0, 0.5, n)
    p1 = np.stack([30 * np.cos(a1), 30 * np.sin(a1), rng.uniform(-0.4, 0.4, n)], 1)
    p2 = np.stack([30 * np.cos(a2), 30 * np.sin(a2), rng.uniform(-0.4, 0.4, n)], 1)
    tof = rng.normal(0, 3.0, n)
    shape = 1.0 + rng.uniform(0, 1, G2.shape)               # a positive, non-uniform image

    def events_projector(keep):
        return ListmodeTOFProjector(G2, torch.tensor(p1[keep]), torch.tensor(p2[keep]), torch.tensor(tof[keep]),
                                    tof_fwhm_mm(100.0))

    a = events_projector(slice(None)).apply(torch.tensor(shape)).numpy()
    keep = a > 0.05 * a.mean()                                # no event near the log's floor
    A = events_projector(keep)
    m = int(keep.sum())
    sens = rng.uniform(1.0, 2.0, G2.shape[:2])
    early = shape[..., 0] * 0.7 * m / (f * float((sens * shape[..., 0]).sum()))   # best scale ~1.4 x early
    b = background * float(A.apply(torch.tensor(early[..., None])).mean()) * rng.uniform(0.5, 1.5, m)
    data = dict(p1=p1[keep].astype(np.float32), p2=p2[keep].astype(np.float32), tof=tof[keep].astype(np.float32),
                background=b.astype(np.float32), sensitivity=sens.astype(np.float32), event_fraction=np.asarray(f),
                early=early.astype(np.float32), tof_fwhm_mm=np.asarray(tof_fwhm_mm(100.0)),
                tof_truncation_sigma=np.asarray(3.0), geometry_shape=np.asarray(G2.shape),
                geometry_voxel_mm=np.asarray(G2.voxel_size_mm), geometry_origin_mm=np.asarray(G2.origin_mm))
    return data, A


def count_identity(data, A, x):
    """``(f s^T x, sum_e (A x)_e / ((A x)_e + b_e))`` for an image x (nx, ny), in float64."""
    x = torch.as_tensor(x, dtype=torch.float64)
    a = A.apply(x[..., None]).numpy()
    b = data["background"].astype(np.float64)
    expected = float(data["event_fraction"]) * float((torch.as_tensor(data["sensitivity"], dtype=torch.float64)
                                                      * x).sum())
    return expected, float(np.sum(a / (a + b)))


def poisson_method_loss(data, estimator, method="poisson"):
    from equipet.assisted.methods import build_loss, input_scale
    from equipet.assisted.central_slice import slice_system_matrix

    cfg = tiny_config(subset_events=300, variance_reduction=estimator)
    c = input_scale(data["early"])
    system = slice_system_matrix(data) if method == "poisson" else None
    return build_loss(cfg, data, c, torch.device("cpu"), method, system), c


@pytest.mark.parametrize("background", [0.0, 0.5])
@pytest.mark.parametrize("estimator", ["none", "saga"])
def test_subset_method_best_scale_satisfies_the_count_identity(estimator, background, one_torch_thread):
    """The best global scale alpha of the early image under the poisson method's loss (the root of
    the mean over the K blocks of d/dalpha L_k(alpha x), each block called as the method calls it)
    is where f s^T (alpha x) = sum_e (A alpha x)_e / ((A alpha x)_e + b_e) (= N, the number of
    events, without background), solved in float64 from the events alone, to 1e-3; the full-batch
    loss (method poisson_full) is stationary in the scale at the same alpha. A sensitivity term
    off by 20% moves the root by ~17%."""
    from scipy.optimize import brentq

    data, A = scale_problem(background)
    loss, c = poisson_method_loss(data, estimator)
    K = len(loss.subsets)
    assert K == 5 and loss.n_events == A.n_events
    base = torch.as_tensor(data["early"] / c)[None, None]

    def mean_block_derivative(alpha):
        alpha = torch.tensor(float(alpha), requires_grad=True)
        if estimator == "saga":           # a table at the current image: every block's estimate is exact
            loss.refresh(loss.image(alpha.detach() * base))
        total = 0.0
        for k in range(K):
            (g,) = torch.autograd.grad(loss(alpha * base, k), alpha)
            total += float(g)
        return total / K

    alpha_subset = brentq(mean_block_derivative, 0.05, 20.0, xtol=1e-7)

    early = data["early"].astype(np.float64)
    alpha_ref = brentq(lambda al: np.subtract(*count_identity(data, A, al * early)), 0.05, 20.0, xtol=1e-10)
    expected, attributed = count_identity(data, A, alpha_ref * early)
    assert expected == pytest.approx(attributed, rel=1e-9)
    if background == 0.0:
        assert expected == pytest.approx(A.n_events, rel=1e-9)       # expected counts = number of events
        assert alpha_ref == pytest.approx(A.n_events / (float(data["event_fraction"])
                                                        * float((data["sensitivity"] * early).sum())), rel=1e-9)
    else:
        assert attributed < 0.75 * A.n_events                        # the background term matters here
    assert alpha_subset == pytest.approx(alpha_ref, rel=1e-3)

    full, _ = poisson_method_loss(data, estimator, method="poisson_full")
    alpha = torch.tensor(alpha_ref, dtype=torch.float32, requires_grad=True)
    (g_full,) = torch.autograd.grad(full(alpha * base), alpha)
    (g_off,) = torch.autograd.grad(full(alpha * 1.05 * base), alpha)
    assert abs(float(g_full)) < 1e-3 * abs(float(g_off))          # stationary there, not 5% away


@pytest.mark.parametrize("background", [0.0, 0.5])
@pytest.mark.parametrize("estimator", ["none", "saga"])
def test_subset_method_optimum_has_the_expected_counts(estimator, background, one_torch_thread):
    """Adam on random blocks of the poisson method's loss (each call draws its block, as in
    training), a pixel image through the softplus of NonNegativeOutput started at the early image
    (whose counts are 30% too low; 12% too high with background): after 1500 steps (step size / 10
    after 750) the image's expected counts f s^T x equal the events attributed to it,
    sum_e (A x)_e / ((A x)_e + b_e) (= N without background), within 2% (measured < 0.2%; a
    sensitivity term off by 20% gives -17%)."""
    data, A = scale_problem(background)
    loss, c = poisson_method_loss(data, estimator)
    start, attributed = count_identity(data, A, data["early"])
    assert abs(start / attributed - 1) > 0.1     # the start's scale is off (-30%; +12% with background)
    torch.manual_seed(0)
    out0 = torch.as_tensor(data["early"] / c, dtype=torch.float32)[None, None]
    z = (torch.log(torch.expm1(20.0 * out0)) / 20.0).requires_grad_(True)     # softplus_20(z) = early / c
    opt = torch.optim.Adam([z], lr=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1.0 if e < 750 else 0.1)
    for _ in range(1500):
        opt.zero_grad()
        loss(torch.nn.functional.softplus(z, beta=20.0)).backward()
        opt.step()
        sched.step()
    x = c * torch.nn.functional.softplus(z.detach(), beta=20.0)[0, 0]
    expected, attributed = count_identity(data, A, x)
    if background == 0.0:
        assert attributed == pytest.approx(A.n_events, rel=1e-12)
    assert expected == pytest.approx(attributed, rel=0.02)


def test_runs_of_a_slice_trained_together_write_what_each_run_alone_writes(tmp_path):
    """``equipet-assisted --out-root`` (assisted.group_runs: ctr): the runs' files and metric rows
    equal those of the runs trained one by one (float tolerance), the subset likelihood drawing
    the same blocks per seed."""
    write_tiny_slice(tmp_path)
    cfg = tiny_config(epochs=6, snapshots=[3, 6])
    runs = [("paper", "cnn", 0), ("poisson", "cnn", 0), ("poisson", "cnn", 1), ("poisson", "scnn", 0)]
    for method, model, seed in runs:
        run_assisted(cfg, tmp_path / "slice.npz", method, model, seed, tmp_path / "alone" / method / model / f"seed{seed}",
                     tmp_path / "system.pt")
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps(cfg))
    main(["--settings", f"@{settings}", "--slice", str(tmp_path / "slice.npz"), "--system", str(tmp_path / "system.pt"),
          "--method", "paper", "poisson", "--model", "cnn", "scnn", "--seed", "0", "1", "--out-root",
          str(tmp_path / "together")])
    timing = {"plateau_time_s", "total_time_s", "s_per_epoch"}
    for method, model, seed in runs:
        a, b = (tmp_path / d / method / model / f"seed{seed}" for d in ("alone", "together"))
        np.testing.assert_allclose(pd.read_csv(b / "loss.csv")["loss"], pd.read_csv(a / "loss.csv")["loss"], rtol=1e-4)
        ma, mb = (pd.read_csv(d / "metrics.csv") for d in (a, b))
        keep = ~ma.metric.isin(timing)
        assert (ma.columns == mb.columns).all() and (ma[["metric", "epoch", "split"]] == mb[["metric", "epoch", "split"]]).all().all()
        np.testing.assert_allclose(mb[keep]["value"], ma[keep]["value"], rtol=2e-3, atol=1e-5)
        assert json.loads((b / "timing.json").read_text())["batched_runs"] == 8
    # all 8 combinations were made
    assert len(list((tmp_path / "together").glob("*/*/seed*/metrics.csv"))) == 8
