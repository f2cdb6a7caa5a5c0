"""GATE coincidences -> list-mode events: selection, endpoints, TOF sign, chunked ROOT reading."""

import numpy as np
import pytest

from equipet.errors import ConfigError, InputDataError
from equipet.reconstruction.listmode import (C_MM_PER_S, branches_needed, convert_chunk, read_listmode, select_mask,
                              simulate_true_events, tof_offset_mm, tof_sign_residual_mm)
from equipet.simulation.scanner import Scanner
from conftest import crystal_box

SCANNER = Scanner(rings=5, modules_per_ring=44, pixels_transaxial=24, pixels_axial=24, pixel_size_mm=2.1,
                  pixel_gap_mm=0.0, crystal_thickness_mm=20.0, doi_layers=2, inner_radius_mm=None,
                  material="LYSO", energy_resolution_fwhm=0.11, energy_window_kev=(435.0, 585.0),
                  coincidence_window_ns=4.0)


def test_tof_offset_formula_and_sign():
    # source 30 mm from the midpoint towards detector 1: photon 1 arrives 2*30 mm / c earlier
    chunk = {"time1": np.array([1.0]), "time2": np.array([1.0 + 60.0 / C_MM_PER_S])}
    assert tof_offset_mm(chunk)[0] == pytest.approx(30.0, rel=1e-6)


@pytest.mark.parametrize("mode", ["crystal", "global"])
def test_known_source_positions_recovered(mode):
    """End to end from GATE-like branches: midpoint + tof * (p1 - p2)/|p1 - p2| lands on the source."""
    rng = np.random.default_rng(0)
    src = np.array([25.0, -12.0, 3.0])
    chunk = simulate_true_events(SCANNER, np.tile(src, (4000, 1)), 50.0, rng, axial_cos_max=0.3)
    ev = convert_chunk(chunk, SCANNER, "trues", mode)
    assert len(ev) > 3000
    p1, p2, tof = ev.p1_mm.astype(float), ev.p2_mm.astype(float), ev.tof_mm.astype(float)
    u = (p1 - p2) / np.linalg.norm(p1 - p2, axis=1)[:, None]
    est = 0.5 * (p1 + p2) + tof[:, None] * u
    np.testing.assert_allclose(np.median(est, axis=0), src, atol=0.5)
    # spread along the LOR is the TOF resolution: FWHM c*CTR/2 = 7.5 mm -> sigma 3.2 mm
    along = ((est - src) * u).sum(1)
    assert 2.5 < np.std(along) < 4.5
    if mode == "global":
        res = tof_sign_residual_mm(chunk, p1, p2)
        assert abs(np.median(res)) < 0.3


def test_crystal_endpoints_are_crystal_centres_at_doi_layer():
    """Each crystal-mode endpoint is the centre of the crystal, in its DOI layer, that contains
    the interaction point, computed from the scanner's numbers (conftest.crystal_box), not
    with crystal_centres_mm."""
    rng = np.random.default_rng(1)
    chunk = simulate_true_events(SCANNER, rng.normal(0, 10, (500, 3)), 100.0, rng, 0.2)
    ev = convert_chunk(chunk, SCANNER, "trues", "crystal")
    assert len(ev) > 400
    for k, p in (("1", ev.p1_mm), ("2", ev.p2_mm)):
        q = np.stack([chunk[f"globalPos{a}{k}"] for a in "XYZ"], 1)
        inside, centre = crystal_box(SCANNER, chunk["rsectorID" + k], chunk["moduleID" + k],
                                     chunk["crystalID" + k], chunk["layerID" + k], q)
        assert inside.all()
        np.testing.assert_allclose(p, centre, atol=1e-3)
    assert set(np.unique(chunk["layerID1"])) == {0, 1}


def test_selection_energy_window_randoms_and_scatter():
    n = 6
    chunk = {
        "energy1": np.array([0.511, 0.400, 0.511, 0.511, 0.511, 0.590]),
        "energy2": np.array([0.511, 0.511, 0.511, 0.511, 0.511, 0.511]),
        "eventID1": np.array([1, 2, 3, 4, 5, 6]),
        "eventID2": np.array([1, 2, 9, 4, 5, 6]),
        "comptonPhantom1": np.array([0, 0, 0, 1, 0, 0]),
        "comptonPhantom2": np.zeros(n, int),
        "RayleighPhantom1": np.zeros(n, int),
        "RayleighPhantom2": np.array([0, 0, 0, 0, 2, 0]),
    }
    trues = select_mask(chunk, "trues", (435, 585))
    assert trues.tolist() == [True, False, False, False, False, False]
    prompts = select_mask(chunk, "all", (435, 585))
    assert prompts.tolist() == [True, False, True, True, True, False]


def test_bad_modes_are_config_errors():
    with pytest.raises(ConfigError, match="mlem.events"):
        branches_needed("randoms", "crystal")
    with pytest.raises(ConfigError, match="mlem.lor_endpoints"):
        branches_needed("trues", "centroid")


def test_read_root_in_chunks_equals_one_pass(tmp_path):
    from equipet.simulation.gate_root import CoincidenceWriter

    rng = np.random.default_rng(2)
    chunk = simulate_true_events(SCANNER, rng.normal(0, 20, (3000, 3)), 200.0, rng, 0.2)
    chunk["energy1"][::7] = 0.3                      # out of the window
    chunk["eventID2"][::11] += 1                     # randoms
    path = tmp_path / "coincidences.root"
    with CoincidenceWriter(path) as w:
        w.write(chunk)
    small = read_listmode(path, SCANNER, "trues", "crystal", step_size=1000)
    whole = convert_chunk(chunk, SCANNER, "trues", "crystal")
    assert small.n_read == len(chunk["time1"])
    assert len(small) == len(whole) < small.n_read
    np.testing.assert_allclose(small.p1_mm, whole.p1_mm)
    np.testing.assert_allclose(small.tof_mm, whole.tof_mm, atol=1e-4)
    prompts = read_listmode(path, SCANNER, "all", "global", step_size=1000)
    assert len(prompts) > len(small)


def test_missing_file_is_input_error(tmp_path):
    with pytest.raises(InputDataError, match="not found"):
        read_listmode(tmp_path / "nope.root", SCANNER)
