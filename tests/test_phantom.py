"""The hot-rod phantom: geometry, voxelisation, decay sampling, Fig. 1 (equipet.simulation.phantom)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from equipet.simulation.phantom import HotRodPhantom, hot_rod_phantom


@pytest.fixture(scope="module")
def ph() -> HotRodPhantom:
    return hot_rod_phantom()


def test_paper_values_are_the_defaults(ph):
    assert ph.rod_diameters_mm == (6.5, 5.5, 4.5, 3.5, 2.2, 1.6)
    assert ph.rod_length_mm == 5.0
    assert ph.rod_activity_bq_per_ml == 5300.0
    assert ph.background_bq_per_ml == pytest.approx(530.0)
    assert ph.cold_diameter_mm == 30.0


def test_six_sectors_of_rods_at_twice_the_diameter(ph):
    rods = ph.rods
    for k, d in enumerate(ph.rod_diameters_mm):
        r = ph.rods_in_sector(k)
        assert len(r) >= 3
        assert np.all(r[:, 2] == d)
        dist = np.hypot(r[:, None, 0] - r[None, :, 0], r[:, None, 1] - r[None, :, 1])
        np.fill_diagonal(dist, np.inf)
        np.testing.assert_allclose(dist.min(axis=1), 2 * d, rtol=1e-9)
        # inside the sector's 60 degree wedge
        ang = np.degrees(np.arctan2(r[:, 1], r[:, 0])) - np.degrees(ph.sector_angle_rad(k))
        ang = (ang + 180) % 360 - 180
        assert np.all(np.abs(ang) < 30)
    # no overlaps anywhere, outside the cold region, inside the warm disk
    dist = np.hypot(rods[:, None, 0] - rods[None, :, 0], rods[:, None, 1] - rods[None, :, 1])
    gap = dist - (rods[:, None, 2] + rods[None, :, 2]) / 2
    np.fill_diagonal(gap, np.inf)
    assert gap.min() > 0
    rad = np.hypot(rods[:, 0], rods[:, 1])
    assert np.all(rad - rods[:, 2] / 2 >= ph.cold_diameter_mm / 2)
    assert np.all(rad + rods[:, 2] / 2 <= ph.active_diameter_mm / 2)


def test_point_activity_and_mu(ph):
    x, y, d, _ = ph.rods[0]
    pts = np.array([[x, y, 0.0], [0, 0, 0], [0, 0, 8.0], [ph.active_diameter_mm / 2 - 0.5, 0, 0]])
    np.testing.assert_allclose(ph.activity_at(pts)[:3], [5300.0, 0.0, 0.0])
    mu = ph.mu_at(np.array([[0, 0, 0], [0, 0, 9.9], [0, 0, 10.1], [60, 0, 0]]))
    np.testing.assert_allclose(mu, [0.0096, 0.0096, 0, 0])
    assert hot_rod_phantom({"material": "Air"}).mu_at(np.zeros((1, 3)))[0] == 0


def test_voxelised_maps_conserve_activity_and_attenuation(ph):
    maps = ph.voxelise(0.8)
    assert maps.shape == ph.default_shape(0.8)
    total = maps.activity_bq_per_ml.sum() * 0.8**3 * 1e-3
    assert total == pytest.approx(ph.total_activity_bq(), rel=0.01)
    water = maps.mu_per_mm.sum() * 0.8**3
    expected = ph.mu_per_mm * math.pi * (ph.diameter_mm / 2) ** 2 * ph.length_mm
    assert water == pytest.approx(expected, rel=0.01)
    assert maps.mu_per_mm.max() == pytest.approx(0.0096)
    nx, ny, nz = maps.shape
    assert maps.activity_bq_per_ml[nx // 2, ny // 2, nz // 2] == 0  # cold centre
    # a rod centre is hot; voxel centres follow the documented convention
    x, y, _, _ = ph.rods[0]
    cx, cy = maps.axis_centres_mm(0), maps.axis_centres_mm(1)
    i, j = np.argmin(np.abs(cx - x)), np.argmin(np.abs(cy - y))
    assert maps.activity_bq_per_ml[i, j, nz // 2] == pytest.approx(5300.0)
    np.testing.assert_allclose(maps.affine[:3, :3] @ [i, j, 0] + maps.affine[:3, 3], [cx[i], cy[j], maps.axis_centres_mm(2)[0]])


def test_voxelise_any_voxel_size_shape_or_fov(ph):
    assert ph.voxelise(2.0, shape=(10, 12, 3)).shape == (10, 12, 3)
    assert ph.voxelise(1.0, fov_mm=(64, 64, 8)).shape == (64, 64, 8)
    coarse = ph.voxelise(2.0)
    assert coarse.activity_bq_per_ml.sum() * 8e-3 == pytest.approx(ph.total_activity_bq(), rel=0.02)


def test_sampled_decays_follow_the_activity(ph):
    rng = np.random.default_rng(0)
    pos, region = ph.sample_decay_positions(200_000, rng, return_region=True)
    assert np.all(np.abs(pos[:, 2]) <= ph.rod_length_mm / 2)
    r = np.hypot(pos[:, 0], pos[:, 1])
    assert np.all(r >= ph.cold_diameter_mm / 2) and np.all(r <= ph.active_diameter_mm / 2)
    in_rod = ph.rod_index(pos[:, 0], pos[:, 1])
    np.testing.assert_array_equal(np.where(region < len(ph.rods), region, -1), in_rod)
    rod_act = ph.rod_activity_bq_per_ml * ph.rod_volume_mm3().sum() * 1e-3
    frac = np.mean(in_rod >= 0)
    assert frac == pytest.approx(rod_act / ph.total_activity_bq(), abs=0.005)


def test_activity_scale_multiplies_everything():
    a = hot_rod_phantom().total_activity_bq()
    assert hot_rod_phantom(activity_scale=3.0).total_activity_bq() == pytest.approx(3 * a)


def test_cli_writes_maps_rods_and_fig1(tmp_path):
    import nibabel as nib

    from equipet.config import schema_defaults
    from equipet.commands.simulation.phantom import main

    cfg = {"phantom": {**schema_defaults("phantom"), "truth_voxel_size_mm": 2.0}}
    main(["--settings", json.dumps(cfg), "--activity", str(tmp_path / "a.nii.gz"), "--mu", str(tmp_path / "m.nii.gz"),
          "--rods", str(tmp_path / "rods.csv"), "--fig", str(tmp_path / "fig1.png")])
    img = nib.load(tmp_path / "a.nii.gz")
    assert img.header.get_zooms() == (2.0, 2.0, 2.0)
    assert (tmp_path / "fig1.png").stat().st_size > 10_000
    assert len((tmp_path / "rods.csv").read_text().splitlines()) == len(hot_rod_phantom().rods) + 1
