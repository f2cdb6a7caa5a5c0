"""Assisted reconstruction: list-mode losses, plateau detection, rod metrics and one tiny run."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from equipet.assisted import (ListmodeLeastSquaresLoss, ListmodePoissonLoss, SliceForwardModel, plateau_epoch,
                              run_assisted)
from equipet.projector import ImageGeometry, ListmodeTOFProjector, tof_fwhm_mm
from equipet.rod_metrics import pair_vpr, valley_to_peak

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
    from equipet.phantom import hot_rod_phantom

    ph = hot_rod_phantom({})
    g = ImageGeometry.centred((250, 250, 1), (0.4, 0.4, 0.4))
    truth = ph.voxelise(0.4, shape=g.shape).activity_bq_per_ml[:, :, 0]
    vpr = valley_to_peak(truth, g, ph.rods)
    assert vpr[6.5] == pytest.approx(ph.background_ratio, abs=0.02)
    blurred = valley_to_peak(np.ones_like(truth), g, ph.rods)
    assert all(v == pytest.approx(1.0) for v in blurred.values())


def test_tiny_assisted_run(tmp_path):
    """A whole run on a synthetic slice: files, tidy rows, resumable training outputs."""
    from equipet.config import schema_defaults
    from equipet.phantom import hot_rod_phantom

    g = ImageGeometry((28, 28, 1), (4.0, 4.0, 0.8), (-54.0, -54.0, 0.4))
    ph = hot_rod_phantom({})
    truth = ph.voxelise(4.0, shape=(28, 28, 1)).activity_bq_per_ml[:, :, 0]
    rng = np.random.default_rng(0)
    n = 300
    a1, a2 = rng.uniform(0, 2 * np.pi, n), rng.uniform(0, 2 * np.pi, n)
    p1 = np.stack([80 * np.cos(a1), 80 * np.sin(a1), np.full(n, 0.4)], 1).astype(np.float32)
    p2 = np.stack([80 * np.cos(a2), 80 * np.sin(a2), np.full(n, 0.4)], 1).astype(np.float32)
    early = (truth / truth.max() + 0.1 * rng.uniform(size=truth.shape)).astype(np.float32)
    np.savez(tmp_path / "slice.npz", iterations=np.array([1, 2]), mlem=np.stack([early, early]), early=early,
             early_iteration=np.asarray(2), truth=truth, sensitivity=np.ones_like(early), p1=p1, p2=p2,
             tof=rng.normal(0, 5, n).astype(np.float32), background=np.zeros(n, np.float32),
             event_fraction=np.asarray(1.0), ctr_ps=np.asarray(100.0), tof_fwhm_mm=np.asarray(tof_fwhm_mm(100.0)),
             tof_truncation_sigma=np.asarray(3.0), geometry_shape=np.asarray(g.shape),
             geometry_voxel_mm=np.asarray(g.voxel_size_mm), geometry_origin_mm=np.asarray(g.origin_mm))
    cfg = {s: schema_defaults(s) for s in ("assisted", "training", "phantom", "mlem", "models")}
    cfg["device"] = "cpu"
    cfg["assisted"].update(epochs=4, snapshots=[2, 4], cache_mb=10)
    cfg["assisted"]["plateau"]["window"] = 2
    cfg["models"]["cnn"].update(layers=3, channels=4)
    out = tmp_path / "run"
    df = run_assisted(cfg, tmp_path / "slice.npz", "cnn", 0, out)
    for f in ("loss.csv", "timing.json", "eval.npz", "metrics.csv", "summary.json"):
        assert (out / f).exists(), f
    assert list(df.columns) == ["experiment", "model", "seed", "epoch", "metric", "value", "ctr_ps", "rod_mm", "split"]
    assert set(df["split"]) == {"input", "train", "training"}
    crc = df[(df.metric == "crc") & (df.split == "train") & (df.epoch == 4)]
    assert sorted(crc.rod_mm) == sorted(ph.rod_diameters_mm)
    assert json.loads((out / "summary.json").read_text())["loss"] == "poisson"
    assert len(pd.read_csv(out / "loss.csv")) == 4
    ev = np.load(out / "eval.npz")
    assert ev["snapshots"].shape == (2, 28, 28)
