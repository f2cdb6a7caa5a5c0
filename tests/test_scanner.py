"""Scanner geometry: GATE-consistent IDs, analytic radius, positions <-> IDs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from equipet.simulation.scanner import Scanner


@pytest.fixture
def scanner(paper_config) -> Scanner:
    return Scanner.from_config(paper_config["scanner"])


def test_paper_scanner_size(scanner):
    assert scanner.n_crystals == 44 * 5 * 24 * 24 * 2
    assert scanner.axial_length_mm == pytest.approx(5 * 24 * 2.1)
    # modules touch at their inner corners: the inner-face half-width subtends pi/44
    half_angle = math.atan2(scanner.module_width_mm / 2, scanner.radius_mm)
    assert half_angle == pytest.approx(math.pi / 44)


def test_flat_index_round_trip(scanner):
    flat = np.arange(0, scanner.n_crystals, 97)
    assert np.array_equal(scanner.flat_index(*scanner.split_index(flat)), flat)


def test_locate_inverts_crystal_centres(scanner):
    rng = np.random.default_rng(1)
    ids = scanner.split_index(rng.integers(0, scanner.n_crystals, 5000))
    centres = scanner.crystal_centres_mm(*ids)
    for got, want in zip(scanner.locate(centres), ids):
        assert np.array_equal(got, want)


def test_layers_are_radially_ordered_and_rsector0_on_plus_x(scanner):
    inner = scanner.crystal_centres_mm(0, 2, 12 * 24 + 12, 0)
    outer = scanner.crystal_centres_mm(0, 2, 12 * 24 + 12, 1)
    assert outer[0] - inner[0] == pytest.approx(scanner.layer_thickness_mm)
    assert abs(inner[1]) < scanner.pitch_mm and abs(inner[2]) < scanner.pitch_mm
    quarter = scanner.crystal_centres_mm(11, 2, 12 * 24 + 12, 0)  # 11 of 44 modules = 90 degrees
    assert quarter[1] == pytest.approx(inner[0]) and abs(quarter[0]) < scanner.pitch_mm


def test_points_outside_crystals_are_not_located(scanner):
    pts = np.array([[0.0, 0.0, 0.0], [scanner.radius_mm - 1.0, 0, 0],
                    [scanner.radius_mm + scanner.crystal_thickness_mm + 1.0, 0, 0],
                    [scanner.radius_mm + 1.0, 0, scanner.axial_length_mm]])
    assert np.all(scanner.locate(pts)[0] == -1)
