"""Central slice: the single-slice TOF forward model, the event selection and the LOR sampling."""

import numpy as np
import pytest
import torch

from equipet.assisted.central_slice import (lors_crossing, out_of_slab_projection, sample_slice_lors, slab_range,
                                   slice_geometry)
from equipet.errors import ConfigError
from equipet.reconstruction.projector import ImageGeometry, ListmodeTOFProjector, tof_fwhm_mm
from equipet.simulation.scanner import Scanner

GEOM = ImageGeometry.centred((20, 18, 6), (1.0, 1.0, 1.0))
SMALL = Scanner(rings=2, modules_per_ring=24, pixels_transaxial=8, pixels_axial=4, pixel_size_mm=2.1,
                pixel_gap_mm=0.0, crystal_thickness_mm=20.0, doi_layers=2, inner_radius_mm=None,
                material="LYSO", energy_resolution_fwhm=0.11, energy_window_kev=(435.0, 585.0),
                coincidence_window_ns=4.0)


def random_lors(n, rng, z_half=4.0, radius=40.0):
    """LORs between points on a cylinder, mostly transaxial, some oblique enough to cross many planes."""
    a1, a2 = rng.uniform(0, 2 * np.pi, n), rng.uniform(0, 2 * np.pi, n)
    z1, z2 = rng.uniform(-z_half, z_half, n), rng.uniform(-z_half, z_half, n)
    p1 = np.stack([radius * np.cos(a1), radius * np.sin(a1), z1], 1)
    p2 = np.stack([radius * np.cos(a2), radius * np.sin(a2), z2], 1)
    return p1.astype(np.float64), p2.astype(np.float64), rng.normal(0, 8.0, n)


@pytest.mark.parametrize("tof", [False, True])
def test_slice_model_equals_3d_projector_restricted_to_the_slice(tof):
    rng = np.random.default_rng(0)
    p1, p2, t = random_lors(3000, rng, z_half=2.5)
    fwhm = tof_fwhm_mm(100.0) if tof else None
    k = 3
    g2 = slice_geometry(GEOM, k, k + 1)
    assert g2.shape == (20, 18, 1) and g2.origin_mm[2] == pytest.approx(GEOM.origin_mm[2] + k)
    x3 = torch.zeros(GEOM.shape, dtype=torch.float64)
    x3[:, :, k] = torch.as_tensor(rng.uniform(0.5, 2.0, (20, 18)))
    args = [torch.as_tensor(p1), torch.as_tensor(p2), torch.as_tensor(t) if tof else None, fwhm]
    full = ListmodeTOFProjector(GEOM, *args).apply(x3).numpy()
    sliced = ListmodeTOFProjector(g2, *args).apply(x3[:, :, k:k + 1].clone()).numpy()
    assert np.count_nonzero(full) > 300
    np.testing.assert_allclose(sliced, full, rtol=1e-10, atol=1e-12)
    # events outside the slab box (+ halo) see nothing of the slice; the rest add up with the other planes
    outside = ~lors_crossing(p1, p2, g2)
    assert outside.any() and np.all(sliced[outside] == 0)
    x_all = torch.as_tensor(rng.uniform(0.5, 2.0, GEOM.shape))
    other = out_of_slab_projection(x_all.numpy(), GEOM, k, k + 1, p1, p2, t if tof else None, fwhm, 3.0, 4096)
    together = ListmodeTOFProjector(g2, *args).apply(x_all[:, :, k:k + 1].clone()).numpy() + other
    np.testing.assert_allclose(together, ListmodeTOFProjector(GEOM, *args).apply(x_all).numpy(),
                               rtol=1e-4, atol=1e-4)  # b is float32


def test_slab_range_centre_and_bounds():
    assert slab_range(16, None, 1) == (8, 9)
    assert slab_range(7, None, 3) == (2, 5)
    with pytest.raises(ConfigError, match="slice_index"):
        slab_range(8, 7, 3)


def test_monte_carlo_lor_measure_matches_exhaustive_sum():
    """sum_samples w int(A_tof x) estimates sum over all LORs of the non-TOF projection (the l2 loss's measure)."""
    geom3 = ImageGeometry.centred((24, 24, 4), (1.5, 1.5, 1.0))
    g2 = slice_geometry(geom3, 2, 3)
    tiny = Scanner(rings=2, modules_per_ring=16, pixels_transaxial=4, pixels_axial=2, pixel_size_mm=2.1,
                   pixel_gap_mm=0.0, crystal_thickness_mm=10.0, doi_layers=1, inner_radius_mm=None,
                   material="LYSO", energy_resolution_fwhm=0.11, energy_window_kev=(435.0, 585.0),
                   coincidence_window_ns=4.0)
    centres = tiny.all_crystal_centres_mm()
    n = len(centres)
    i, j = np.triu_indices(n, 1)
    hit = lors_crossing(centres[i], centres[j], g2)
    x = torch.as_tensor(np.random.default_rng(1).uniform(0.5, 1.5, g2.shape), dtype=torch.float64)
    exact = float(ListmodeTOFProjector(g2, torch.as_tensor(centres[i[hit]]), torch.as_tensor(centres[j[hit]]))
                  .apply(x).sum())
    fwhm = tof_fwhm_mm(200.0)
    t_range = 2 * 26.0 + 6 * fwhm / 2.355
    p1, p2, tof, w = sample_slice_lors(tiny, g2, 40_000, t_range, np.random.default_rng(2), block=1 << 18)
    mc = ListmodeTOFProjector(g2, torch.as_tensor(p1, dtype=torch.float64), torch.as_tensor(p2, dtype=torch.float64),
                              torch.as_tensor(tof, dtype=torch.float64), fwhm).apply(x)
    estimate = w * float(mc.sum())
    assert estimate == pytest.approx(exact, rel=0.05)
