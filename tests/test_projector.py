"""The list-mode TOF Joseph projector: adjointness, reference agreement, TOF model, autograd, devices."""

import math

import numpy as np
import pytest
import torch

from equipet.reconstruction.projector import (ImageGeometry, ListmodeTOFProjector, reference_forward_per_event,
                               tof_fwhm_mm)


def random_lors(n, rng, radius=40.0, z_spread=4.0):
    """LORs through and around a small grid, incl. oblique, steep (z-dominant) and missing ones."""
    ang = rng.uniform(0, 2 * np.pi, n)
    off = rng.uniform(-15, 15, n)
    d = np.stack([np.cos(ang), np.sin(ang), np.zeros(n)], 1)
    nrm = np.stack([-np.sin(ang), np.cos(ang), np.zeros(n)], 1)
    p1 = radius * d + off[:, None] * nrm
    p2 = -radius * d + off[:, None] * nrm + rng.normal(0, 3, (n, 3))
    p1[:, 2] = rng.normal(0, z_spread, n)
    p2[:, 2] += rng.normal(0, z_spread, n)
    # a few z-dominant LORs and one that misses the grid entirely
    p1[:5] = [[1.0, 2.0, -40.0]] * 5 + rng.normal(0, 1, (5, 3))
    p2[:5] = [[-2.0, 1.0, 40.0]] * 5 + rng.normal(0, 1, (5, 3))
    p1[5], p2[5] = [100.0, 100.0, 0.0], [100.0, -100.0, 0.0]
    return p1, p2


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(1)
    g = ImageGeometry.centred((17, 14, 6), (1.0, 1.1, 0.9))
    p1, p2 = random_lors(300, rng)
    tof = rng.normal(0, 8, 300)
    return g, p1, p2, tof


@pytest.mark.parametrize("use_tof", [False, True])
def test_adjointness_float64(setup, use_tof):
    g, p1, p2, tof = setup
    t = torch.float64
    A = ListmodeTOFProjector(g, torch.tensor(p1, dtype=t), torch.tensor(p2, dtype=t),
                             torch.tensor(tof, dtype=t) if use_tof else None,
                             tof_fwhm_mm(100.0) if use_tof else None, chunk_size=37)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(g.shape, dtype=t, generator=gen)
    y = torch.rand(A.n_events, dtype=t, generator=gen)
    lhs = float(A.apply(x) @ y)
    rhs = float((x * A.adjoint(y)).sum())
    assert lhs > 0
    assert abs(lhs - rhs) / abs(lhs) < 1e-12


def test_adjointness_float32(setup):
    g, p1, p2, tof = setup
    A = ListmodeTOFProjector(g, torch.tensor(p1, dtype=torch.float32), torch.tensor(p2, dtype=torch.float32),
                             torch.tensor(tof, dtype=torch.float32), tof_fwhm_mm(200.0))
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(g.shape, generator=gen)
    y = torch.rand(A.n_events, generator=gen)
    lhs = float(A.apply(x).double() @ y.double())
    rhs = float((x.double() * A.adjoint(y).double()).sum())
    assert abs(lhs - rhs) / abs(lhs) < 1e-5


@pytest.mark.parametrize("use_tof", [False, True])
def test_matches_per_event_reference(setup, use_tof):
    g, p1, p2, tof = setup
    x = np.random.default_rng(2).random(g.shape)
    A = ListmodeTOFProjector(g, torch.tensor(p1), torch.tensor(p2), torch.tensor(tof) if use_tof else None,
                             30.0 if use_tof else None)
    ours = A.apply(torch.tensor(x)).numpy()
    ref = reference_forward_per_event(x, g, p1[:60], p2[:60], tof[:60] if use_tof else None, 30.0)
    np.testing.assert_allclose(ours[:60], ref, rtol=1e-10, atol=1e-12)
    assert ours[5] == 0.0   # the LOR that misses the grid


def test_line_integral_of_constant_image():
    g = ImageGeometry.centred((20, 20, 10), 0.8)
    p1 = torch.tensor([[-100.0, 0.3, 0.1], [0.2, -100.0, -0.3]], dtype=torch.float64)
    p2 = torch.tensor([[100.0, 0.3, 0.1], [-3.0, 100.0, 0.2]], dtype=torch.float64)
    out = ListmodeTOFProjector(g, p1, p2).apply(torch.ones(g.shape, dtype=torch.float64))
    # chord through the 16 mm wide box: 16 mm along x; the second LOR is slightly oblique
    assert out[0] == pytest.approx(16.0, rel=1e-12)
    d = (p2[1] - p1[1]).numpy()
    assert out[1] == pytest.approx(16.0 * np.linalg.norm(d) / abs(d[1]), rel=1e-12)


def test_tof_integrates_to_non_tof():
    """Integral over the TOF offset of the TOF projection equals the non-TOF projection."""
    g = ImageGeometry.centred((30, 30, 3), 1.0)
    x = torch.rand(g.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    taus = torch.arange(-80.0, 80.0, 0.25, dtype=torch.float64)
    p1 = torch.tensor([[200.0, 3.0, 0.2]], dtype=torch.float64).repeat(len(taus), 1)
    p2 = torch.tensor([[-200.0, -5.0, -0.1]], dtype=torch.float64).repeat(len(taus), 1)
    tof = ListmodeTOFProjector(g, p1, p2, taus, 12.0).apply(x)
    non = ListmodeTOFProjector(g, p1[:1], p2[:1]).apply(x)
    assert float(tof.sum() * 0.25) == pytest.approx(float(non[0]), rel=2e-3)


def test_tof_sign_positive_is_towards_p1():
    g = ImageGeometry.centred((41, 5, 1), 1.0)
    x = torch.zeros(g.shape, dtype=torch.float64)
    x[30, 2, 0] = 1.0                               # a hot voxel at x = +10 mm
    p1 = torch.tensor([[300.0, 0.0, 0.0]] * 2, dtype=torch.float64)   # endpoint 1 on +x
    p2 = torch.tensor([[-300.0, 0.0, 0.0]] * 2, dtype=torch.float64)
    tof = torch.tensor([10.0, -10.0], dtype=torch.float64)
    y = ListmodeTOFProjector(g, p1, p2, tof, 10.0).apply(x)
    assert y[0] > 10 * y[1]


def test_truncation_and_normalisation():
    g = ImageGeometry.centred((101, 1, 1), 0.5)
    x = torch.ones(g.shape, dtype=torch.float64)
    p1 = torch.tensor([[100.0, 0.0, 0.0]], dtype=torch.float64)
    p2 = torch.tensor([[-100.0, 0.0, 0.0]], dtype=torch.float64)
    A = ListmodeTOFProjector(g, p1, p2, torch.zeros(1, dtype=torch.float64), 10.0, truncation_sigma=2.0)
    # kernel renormalised after truncation: integral over the 50 mm line of a constant image ~ 1
    assert float(A.apply(x)[0]) == pytest.approx(1.0, rel=1e-2)


def test_autograd_backward_is_adjoint(setup):
    g, p1, p2, tof = setup
    t = torch.float64
    A = ListmodeTOFProjector(g, torch.tensor(p1, dtype=t), torch.tensor(p2, dtype=t), torch.tensor(tof, dtype=t), 20.0)
    x = torch.rand(g.shape, dtype=t, requires_grad=True)
    y = torch.rand(A.n_events, dtype=t)
    loss = (A(x) * y).sum()
    loss.backward()
    torch.testing.assert_close(x.grad, A.adjoint(y))
    xs = torch.rand(g.shape, dtype=t, requires_grad=True)
    assert torch.autograd.gradcheck(lambda im: A(im), (xs,), eps=1e-6, atol=1e-8, fast_mode=True)


def test_chunking_does_not_change_result(setup):
    g, p1, p2, tof = setup
    x = torch.rand(g.shape, dtype=torch.float64)
    a = ListmodeTOFProjector(g, torch.tensor(p1), torch.tensor(p2), torch.tensor(tof), 20.0, chunk_size=7).apply(x)
    b = ListmodeTOFProjector(g, torch.tensor(p1), torch.tensor(p2), torch.tensor(tof), 20.0, chunk_size=10**6).apply(x)
    torch.testing.assert_close(a, b)


def test_tof_fwhm_from_ctr():
    assert tof_fwhm_mm(200.0) == pytest.approx(29.9792458)
    assert tof_fwhm_mm(50.0) == pytest.approx(0.299792458 * 25)


def test_geometry_affine():
    g = ImageGeometry.from_fov((112, 112, 12.8), 0.8)
    assert g.shape == (140, 140, 16)
    aff = g.affine()
    centre = aff @ np.array([(g.shape[0] - 1) / 2, (g.shape[1] - 1) / 2, (g.shape[2] - 1) / 2, 1])
    np.testing.assert_allclose(centre[:3], 0, atol=1e-12)
    assert math.isclose(aff[0, 0], 0.8)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_and_cuda_agree(setup):
    g, p1, p2, tof = setup
    x = torch.rand(g.shape, dtype=torch.float32)
    y = torch.rand(len(p1), dtype=torch.float32)
    out = []
    for dev in ("cpu", "cuda"):
        A = ListmodeTOFProjector(g, torch.tensor(p1, dtype=torch.float32, device=dev),
                                 torch.tensor(p2, dtype=torch.float32, device=dev),
                                 torch.tensor(tof, dtype=torch.float32, device=dev), 20.0)
        out.append((A.apply(x.to(dev)).cpu(), A.adjoint(y.to(dev)).cpu()))
    torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out[0][1], out[1][1], rtol=1e-4, atol=1e-5)


def test_cache_gives_identical_results(setup):
    g, p1, p2, tof = setup
    args = (g, torch.tensor(p1, dtype=torch.float32), torch.tensor(p2, dtype=torch.float32),
            torch.tensor(tof, dtype=torch.float32), 20.0)
    x = torch.rand(g.shape)
    y = torch.rand(len(p1))
    ref = ListmodeTOFProjector(*args, chunk_size=50)
    cached = ListmodeTOFProjector(*args, chunk_size=50, cache_mb=0.05)   # room for part of the chunks
    for _ in range(2):
        torch.testing.assert_close(cached.apply(x), ref.apply(x))
        torch.testing.assert_close(cached.adjoint(y), ref.adjoint(y))
    assert 0 < len(cached._cache) < -(-len(p1) // 50)


def test_fused_apply_adjoint_equals_separate(setup):
    """``A^T h(A x)`` computed chunk by chunk in one pass equals ``adjoint(h(apply(x)))``."""
    g, p1, p2, tof = setup
    t = torch.float64
    A = ListmodeTOFProjector(g, torch.tensor(p1, dtype=t), torch.tensor(p2, dtype=t), torch.tensor(tof, dtype=t),
                             20.0, chunk_size=23)
    x = torch.rand(g.shape, dtype=t, generator=torch.Generator().manual_seed(4)) + 0.1
    seen = []

    def h(ax, start):
        seen.append((start, ax.shape[0]))
        return torch.where(ax > 0, 1.0 / ax.clamp_min(1e-30), torch.zeros_like(ax))

    fused = A.apply_adjoint(x, h)
    ax = A.apply(x)
    torch.testing.assert_close(fused, A.adjoint(h(ax, 0)), rtol=1e-12, atol=1e-12)
    assert [s for s, _ in seen[:-1]] == list(range(0, len(p1), 23))   # chunk by chunk, in order


@pytest.mark.parametrize("shape", [(17, 14, 6), (17, 14, 1)])
def test_sparse_matrix_equals_on_the_fly_and_is_adjoint(setup, shape):
    """The stored CSR matrix (and its transpose) has exactly the projector's weights; on a
    one-voxel-thick slab it keeps no entry outside the slab."""
    _, p1, p2, tof = setup
    g = ImageGeometry.centred(shape, (1.0, 1.1, 0.9))
    f32 = torch.float32
    A = ListmodeTOFProjector(g, torch.tensor(p1, dtype=f32), torch.tensor(p2, dtype=f32), torch.tensor(tof, dtype=f32),
                             20.0, chunk_size=41)
    S = A.to_sparse()
    gen = torch.Generator().manual_seed(5)
    x = torch.rand(g.shape, generator=gen)
    y = torch.rand(A.n_events, generator=gen)
    torch.testing.assert_close(S.apply(x), A.apply(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(S.adjoint(y), A.adjoint(y), rtol=1e-5, atol=1e-6)
    lhs = float(S.apply(x).double() @ y.double())
    rhs = float((x.double() * S.adjoint(y).double()).sum())
    assert abs(lhs - rhs) / abs(lhs) < 1e-5
    assert int(S.col.max()) < g.n_voxels and bool((S.val > 0).all())
    # no stored zero: each entry is a voxel the event's ray really weights
    ones = A.apply(torch.ones(g.shape)).double()
    torch.testing.assert_close(S.apply(torch.ones(g.shape)).double(), ones, rtol=1e-5, atol=1e-6)
    # subsets partition the rows: their projections concatenate to the whole
    parts = S.subsets(3)
    assert sum(p.n_events for p in parts) == A.n_events
    torch.testing.assert_close(torch.cat([p.apply(x) for p in parts]), S.apply(x))
    # round trip through a plain state dict, which stores A alone (A^T is derived again)
    state = S.state_dict()
    assert "t_val" not in state and S.nbytes == sum(state[k].numel() * state[k].element_size()
                                                    for k in ("crow", "col", "val")) + sum(
        t.numel() * t.element_size() for t in S.transpose_parts)
    S2 = type(S).from_state_dict(state)
    torch.testing.assert_close(S2.adjoint(y), A.adjoint(y), rtol=1e-5, atol=1e-6)
    # a file written with its transpose (older format) still loads
    old = {**state, "t_crow": S.transpose_parts[0], "t_col": S.transpose_parts[1], "t_val": S.transpose_parts[2]}
    torch.testing.assert_close(type(S).from_state_dict(old).adjoint(y), S.adjoint(y))


def test_sparse_matrix_with_many_padding_groups():
    """Chunks large enough to be cut into several padding groups (of different lengths) give
    the same stored matrix as the on-the-fly projector."""
    rng = np.random.default_rng(11)
    g = ImageGeometry.centred((20, 18, 5), (1.0, 1.0, 1.2))
    p1, p2 = random_lors(2400, rng)
    tof = rng.normal(0, 8, 2400)
    f32 = torch.float32
    A = ListmodeTOFProjector(g, torch.tensor(p1, dtype=f32), torch.tensor(p2, dtype=f32), torch.tensor(tof, dtype=f32),
                             25.0, chunk_size=10**6)
    blocks = next(A._chunks(f32))[1].blocks
    assert len(blocks) > 1 and len({b[1].shape[1] for b in blocks}) > 1
    S = A.to_sparse()
    x = torch.rand(g.shape, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(S.apply(x), A.apply(x), rtol=1e-5, atol=1e-6)
