"""Physics checks of the embedded Monte Carlo (equipet.simulation.montecarlo)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from equipet.simulation.gate_root import C_MM_PER_S, classify, lor_endpoints_mm, read_coincidences, read_meta, tof_offset_mm
from equipet.simulation.montecarlo import (AcquisitionSettings, Simulator, kn_total_relative, rotate_directions,
                                sample_klein_nishina, simulator_from_settings)
from equipet.config import schema_defaults
from equipet.simulation.phantom import hot_rod_phantom
from equipet.simulation.scanner import Scanner
from conftest import crystal_box

SOURCE_MM = np.array([30.0, -20.0, 4.0])


def scanner() -> Scanner:
    return Scanner.from_config(schema_defaults("scanner"))


def point_source_sim(activity_bq=2e5, duration_s=1.0, material="Air", ctr_ps=100.0, **acq):
    def source(n, rng):
        return np.broadcast_to(SOURCE_MM, (n, 3)).copy(), np.zeros(n, dtype=np.int32)

    ph = hot_rod_phantom({"material": material})
    acq.setdefault("n_jobs", 1)
    settings = AcquisitionSettings.from_config(duration_s=duration_s, **acq)
    return Simulator(scanner(), ph, settings, source=source, source_activity_bq=activity_bq)


@pytest.fixture(scope="module")
def point_air():
    return point_source_sim().run_job(0, 100.0, progress=False)


@pytest.fixture(scope="module")
def phantom_runs():
    """The hot-rod phantom in water and in air, same seed (a few seconds of acquisition)."""
    out = {}
    for mat in ("Water", "Air"):
        cfg = {"scanner": schema_defaults("scanner"), "phantom": {"material": mat},
               "acquisition": {"duration_s": 4.0, "n_jobs": 1}}
        out[mat] = simulator_from_settings(cfg).run_job(0, 100.0, progress=False)
    return out


def test_klein_nishina_sampling_matches_cross_section():
    rng = np.random.default_rng(1)
    e = np.full(400_000, 0.511)
    cos_t, e_out = sample_klein_nishina(e, rng)
    k = 0.511 / 0.51099895
    edges = np.linspace(-1, 1, 21)
    c = 0.5 * (edges[1:] + edges[:-1])
    ratio = 1 / (1 + k * (1 - c))
    dsig = ratio**2 * (ratio + 1 / ratio - (1 - c**2))  # KN dsigma/dOmega up to a constant
    expected = dsig / dsig.sum()
    observed = np.histogram(cos_t, edges)[0] / len(cos_t)
    np.testing.assert_allclose(observed, expected, rtol=0.05)
    np.testing.assert_allclose(e_out, e / (1 + k * (1 - cos_t)))


def test_klein_nishina_total_cross_section_matches_integrated_differential():
    """kn_total_relative(E) against the Klein-Nishina dsigma/dOmega integrated numerically
    over the sphere (scipy quad), relative to 511 keV: water's mu(E) = mu_511 x this ratio."""
    from scipy.integrate import quad

    def sigma(e_mev):
        k = e_mev / 0.51099895

        def dsig(c):
            r = 1 / (1 + k * (1 - c))
            return r**2 * (r + 1 / r - (1 - c**2))
        return quad(dsig, -1, 1, epsabs=0, epsrel=1e-12)[0]

    energies = np.array([0.03, 0.1, 0.2, 0.34, 0.511, 0.8, 1.2])
    expected = np.array([sigma(e) for e in energies]) / sigma(0.511)
    np.testing.assert_allclose(kn_total_relative(energies), expected, rtol=1e-5)  # code normalises at m_e c^2 = 510.999 keV


def test_rotated_directions_have_the_requested_angle():
    rng = np.random.default_rng(2)
    d = rng.normal(size=(1000, 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    d[0] = [0, 0, 1]
    cos_t = rng.uniform(-1, 1, 1000)
    new = rotate_directions(d, cos_t, rng.uniform(0, 2 * np.pi, 1000))
    np.testing.assert_allclose(np.einsum("ij,ij->i", d, new), cos_t, atol=1e-9)
    np.testing.assert_allclose(np.linalg.norm(new, axis=1), 1.0)


def _true_unscattered(data):
    m = classify(data)["true"] & (data["comptonCrystal1"] == 0) & (data["comptonCrystal2"] == 0)
    return {k: v[m] for k, v in data.items()}


def _lor(data):
    return lor_endpoints_mm(data)


@pytest.mark.parametrize("ctr_ps", [50.0, 200.0])
def test_tof_offset_width_matches_ctr_and_sign_convention(ctr_ps):
    data = point_source_sim(activity_bq=1e5).run_job(0, ctr_ps, progress=False)["data"]
    d = _true_unscattered(data)
    assert len(d["time1"]) > 2000
    g1, g2 = _lor(d)
    e = (g1 - g2) / np.linalg.norm(g1 - g2, axis=1, keepdims=True)
    # documented convention: c (t2 - t1) / 2 = offset of the annihilation point from the LOR
    # centre towards detector 1
    offset_true = np.einsum("ij,ij->i", SOURCE_MM - 0.5 * (g1 + g2), e)
    offset_tof = tof_offset_mm(d)
    np.testing.assert_allclose(offset_tof, C_MM_PER_S * (d["time2"] - d["time1"]) / 2)
    # single 1 is the earlier one, so the labels depend on the noise; compare in a frame
    # fixed by geometry (towards the detector with larger x) to avoid that selection bias
    flip = np.where(g1[:, 0] > g2[:, 0], 1.0, -1.0)
    resid = flip * (offset_tof - offset_true)
    q25, q75 = np.percentile(resid, [25, 75])
    fwhm = (q75 - q25) / 1.349 * 2.3548
    expected = C_MM_PER_S * ctr_ps * 1e-12 / 2
    assert fwhm == pytest.approx(expected, rel=0.1)
    assert abs(np.median(resid)) < 0.05 * expected
    # the off-centre source makes the sign matter: the offsets are far from zero on average
    assert np.mean(np.abs(offset_true)) > 10
    assert np.all(d["time1"] <= d["time2"])


def _projected_deviation_deg(u1: np.ndarray, u2: np.ndarray) -> list[np.ndarray]:
    """The deviation of ``u2`` from ``-u1`` projected on two orthonormal axes normal to ``u1``, deg."""
    helper = np.where(np.abs(u1[:, [2]]) < 0.9, [[0.0, 0.0, 1.0]], [[1.0, 0.0, 0.0]])
    e1 = np.cross(u1, helper)
    e1 /= np.linalg.norm(e1, axis=1, keepdims=True)
    e2 = np.cross(u1, e1)
    back = -np.sum(u2 * u1, axis=1)
    return [np.degrees(np.arctan2(np.sum(u2 * e, axis=1), back)) for e in (e1, e2)]


FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))


def test_acollinearity_angle_has_the_configured_fwhm(point_air):
    """Each projected component of the simulated photons' deviation from back-to-back, measured
    from the true source position to each first interaction, has the configured FWHM (0.5 deg, per
    component: Toussaint et al., Phys. Med. Biol. 69 (2024) 195010).

    Singles without a Compton interaction in the crystal before the winner (comptonCrystal 0) have
    globalPos at the first interaction, so the direction from the source is the photon's, exactly
    (air: no phantom scatter). GATE 9's old sampling (a Gaussian polar angle) gives 0.71x.
    """
    d = _true_unscattered(point_air["data"])
    assert len(d["time1"]) > 5000
    g1, g2 = _lor(d)
    u1 = (g1 - SOURCE_MM) / np.linalg.norm(g1 - SOURCE_MM, axis=1, keepdims=True)
    u2 = (g2 - SOURCE_MM) / np.linalg.norm(g2 - SOURCE_MM, axis=1, keepdims=True)
    for comp in _projected_deviation_deg(u1, u2):
        fwhm_deg = FWHM_PER_SIGMA * comp.std()
        print(f"acollinearity FWHM {fwhm_deg:.4f} deg per projected component from {len(comp)} pairs")
        assert fwhm_deg == pytest.approx(schema_defaults("acquisition")["acollinearity_fwhm_deg"], rel=0.05)
    src = np.stack([d["sourcePosX1"], d["sourcePosY1"], d["sourcePosZ1"]], 1)
    np.testing.assert_allclose(src, np.broadcast_to(SOURCE_MM, src.shape), atol=1e-4)


def test_no_acollinearity_puts_points_exactly_on_lor():
    d = _true_unscattered(point_source_sim(acollinearity_fwhm_deg=0.0).run_job(0, 100.0, progress=False)["data"])
    g1, g2 = _lor(d)
    u = (g2 - g1) / np.linalg.norm(g2 - g1, axis=1, keepdims=True)
    v = SOURCE_MM - g1
    dist = np.linalg.norm(v - np.einsum("ij,ij->i", v, u)[:, None] * u, axis=1)
    assert np.percentile(dist, 99) < 0.01


def test_crystal_ids_agree_with_global_positions(point_air):
    """Every single's IDs name the crystal (and DOI layer) that contains its globalPos, by
    the scanner's numbers and GATE's ID convention (conftest.crystal_box), not by locate()."""
    d = point_air["data"]
    sc = scanner()
    for s in "12":
        pos = np.stack([d["globalPosX" + s], d["globalPosY" + s], d["globalPosZ" + s]], 1).astype(float)
        inside, _ = crystal_box(sc, d["rsectorID" + s], d["moduleID" + s], d["crystalID" + s],
                                d["layerID" + s], pos)
        assert inside.all(), f"{(~inside).sum()} of {inside.size} singles {s} outside their crystal"
    # both layers, several rings and pixels occur (the check is not vacuous)
    assert set(np.unique(d["layerID1"])) == {0, 1}
    assert len(np.unique(d["moduleID1"])) == sc.rings and len(np.unique(d["crystalID1"])) > 100


def test_photopeak_fwhm_is_the_energy_resolution():
    """Energies measured with the window opened to 100-800 keV: a Gaussian (plus a linear
    Compton background) fitted to the photopeak has FWHM 11% +- 1.5% of 511 keV (the
    configured energy_resolution_fwhm) at 511 keV."""
    import dataclasses

    from scipy.optimize import curve_fit

    sc = dataclasses.replace(scanner(), energy_window_kev=(100.0, 800.0))
    ph = hot_rod_phantom({"material": "Air"})
    settings = AcquisitionSettings.from_config(duration_s=1.0, n_jobs=1, randoms=False)
    sim = Simulator(sc, ph, settings, source=lambda n, rng: (np.broadcast_to(SOURCE_MM, (n, 3)).copy(),
                                                             np.zeros(n, np.int32)), source_activity_bq=1e5)
    d = sim.run_job(0, 100.0, progress=False)["data"]
    e = np.concatenate([d["energy1"], d["energy2"]]).astype(float)
    assert e.min() < 0.3  # the wide window lets the Compton continuum in
    edges = np.arange(0.42, 0.62, 0.004)
    h = np.histogram(e, edges)[0]
    c = 0.5 * (edges[1:] + edges[:-1])

    def model(x, a, mu, sig, b0, b1):
        return a * np.exp(-0.5 * ((x - mu) / sig) ** 2) + b0 + b1 * (x - 0.511)

    popt, _ = curve_fit(model, c, h, p0=[h.max(), 0.5, 0.03, 0.0, 0.0], sigma=np.sqrt(h + 1))
    assert popt[1] == pytest.approx(0.511, abs=0.003)
    rel_fwhm = 2.3548 * abs(popt[2]) / 0.511
    print(f"photopeak FWHM {rel_fwhm:.4f} of 511 keV")
    assert rel_fwhm == pytest.approx(sc.energy_resolution_fwhm, abs=0.015), rel_fwhm
    assert sc.energy_resolution_fwhm == 0.11


def _cylinder_exit_mm(p, u, radius, half_length):
    """Distance from p (inside) along unit u to the surface of the z-cylinder (independent of the code's)."""
    a = u[:, 0] ** 2 + u[:, 1] ** 2
    b = p[:, 0] * u[:, 0] + p[:, 1] * u[:, 1]
    c = p[:, 0] ** 2 + p[:, 1] ** 2 - radius**2
    with np.errstate(divide="ignore", invalid="ignore"):
        side = np.where(a > 0, (-b + np.sqrt(b * b - a * c)) / a, np.inf)
        cap = np.where(u[:, 2] != 0, (np.sign(u[:, 2]) * half_length - p[:, 2]) / u[:, 2], np.inf)
    return np.minimum(side, cap)


def test_unscattered_trues_follow_narrow_beam_attenuation():
    """Point source inside the water cylinder vs the same in air: the unscattered trues of
    water are the air ones weighted by exp(-mu L), L the water path of both photons
    (from the source along each photon's direction to the cylinder surface), within 3%.

    Photons are compared on the subset without Compton interactions in the crystals
    (comptonCrystal 0, so globalPos lies on the photon's straight path); the detector's
    response to a 511 keV photon is the same in both runs, so the subset does not bias.
    """
    ph = hot_rod_phantom({"material": "Water"})
    mu, radius, half = ph.mu_per_mm, ph.diameter_mm / 2, ph.length_mm / 2
    assert mu == pytest.approx(0.0096)   # water at 511 keV, 1/mm (config)
    runs = {}
    for mat in ("Water", "Air"):
        data = point_source_sim(activity_bq=8e5, material=mat, randoms=False).run_job(0, 100.0, progress=False)["data"]
        d = _true_unscattered(data)
        runs[mat] = d
    path = np.zeros(len(runs["Air"]["time1"]))
    for g in _lor(runs["Air"]):
        u = (g - SOURCE_MM) / np.linalg.norm(g - SOURCE_MM, axis=1, keepdims=True)
        path += _cylinder_exit_mm(np.broadcast_to(SOURCE_MM, u.shape), u, radius, half)
    expected = np.exp(-mu * path).sum()
    observed = len(runs["Water"]["time1"])
    print(f"unscattered trues in water {observed}, expected from air x exp(-mu L) {expected:.0f}")
    assert len(path) > 40_000
    assert observed == pytest.approx(expected, rel=0.03), (observed, expected)
    # the check has teeth: the paths are long enough that attenuation removes most photons
    assert expected < 0.6 * len(path)


def test_scatter_only_in_water(phantom_runs):
    water = classify(phantom_runs["Water"]["data"])
    air = classify(phantom_runs["Air"]["data"])
    assert water["scatter"].sum() > 0
    assert air["scatter"].sum() == 0
    # sourceIDs point at rods or the background
    n_rods = len(hot_rod_phantom().rods)
    sid = phantom_runs["Water"]["data"]["sourceID1"]
    assert sid.min() >= 0 and sid.max() <= n_rods


def _poisson_close(a, b, k=4.0):
    return abs(a - b) < k * math.sqrt(a + b)


def test_counts_scale_linearly_with_activity_and_time():
    base = point_source_sim(activity_bq=5e4, duration_s=1.0, randoms=False).run_job(0, 100.0, progress=False)
    act2 = point_source_sim(activity_bq=1e5, duration_s=1.0, randoms=False, seed=7).run_job(0, 100.0, progress=False)
    time2 = point_source_sim(activity_bq=5e4, duration_s=2.0, randoms=False, seed=9).run_job(0, 100.0, progress=False)
    n0 = len(base["data"]["eventID1"])
    assert _poisson_close(2 * n0, len(act2["data"]["eventID1"]), k=4 * math.sqrt(2))
    assert _poisson_close(2 * n0, len(time2["data"]["eventID1"]), k=4 * math.sqrt(2))
    assert _poisson_close(2 * base["n_decays"], act2["n_decays"], k=4 * math.sqrt(2))


def test_randoms_scale_with_activity_squared_and_can_be_switched_off():
    """Randoms arise from pairs of singles (rate 2 tau S1 S2, see the sorter tests below), so
    doubling the activity doubles trues and quadruples randoms (Poisson 4 sigma ~ 20%)."""
    runs = [point_source_sim(activity_bq=a, duration_s=0.4, seed=s).run_job(0, 100.0, progress=False)
            for a, s in ((2e6, 1), (4e6, 2))]
    kinds = [classify(r["data"]) for r in runs]
    randoms = [k["random"].sum() for k in kinds]
    trues = [k["true"].sum() for k in kinds]
    print(f"randoms {randoms}, trues {trues}")
    assert randoms[0] > 300
    assert randoms[1] / randoms[0] == pytest.approx(4.0, rel=0.2), randoms
    assert trues[1] / trues[0] == pytest.approx(2.0, rel=0.05), trues
    off = point_source_sim(activity_bq=4e6, duration_s=0.25, randoms=False).run_job(0, 100.0, progress=False)
    assert classify(off["data"])["random"].sum() == 0


def test_split_jobs_match_unsplit_run_within_poisson_noise(tmp_path):
    from equipet.simulation.gate_root import merge_root

    one = point_source_sim(activity_bq=5e4, duration_s=2.0, randoms=False).run_job(0, 100.0, progress=False)
    sim = point_source_sim(activity_bq=5e4, duration_s=2.0, randoms=False, n_jobs=3)
    parts = []
    for j in range(3):
        parts.append(tmp_path / f"job{j}.root")
        meta = sim.run_job(j, 100.0, parts[-1], progress=False)
        assert meta["t_start_s"] == pytest.approx(2.0 * j / 3)
    merged = merge_root(parts, tmp_path / "merged.root")
    data = read_coincidences(tmp_path / "merged.root")
    assert _poisson_close(one["n_decays"], merged["n_decays"])
    assert _poisson_close(len(one["data"]["eventID1"]), len(data["eventID1"]))
    # eventIDs are unique across jobs after the merge and times are within the acquisition
    assert len(np.unique(data["eventID1"])) == len(data["eventID1"])
    assert data["time1"].min() >= 0 and data["time1"].max() < 2.0 + 1e-6
    assert read_meta(tmp_path / "merged.root")["n_jobs"] == 3


def test_file_written_equals_events_in_memory(tmp_path):
    sim = point_source_sim(activity_bq=5e4, duration_s=0.5)
    mem = sim.run_job(0, 100.0, progress=False)["data"]
    sim.run_job(0, 100.0, tmp_path / "a.root", progress=False)
    back = read_coincidences(tmp_path / "a.root")
    for k, v in mem.items():
        np.testing.assert_allclose(back[k], v.astype(back[k].dtype), rtol=1e-6, err_msg=k)


def test_cli_writes_a_job_file(tmp_path):
    import json

    from equipet.commands.simulation.montecarlo import main

    cfg = {"scanner": schema_defaults("scanner"), "phantom": schema_defaults("phantom"),
           "acquisition": {**schema_defaults("acquisition"), "duration_s": 0.5, "n_jobs": 2}}
    main(["--settings", json.dumps(cfg), "--ctr-ps", "200", "--job", "1", "--out", str(tmp_path / "p.root"),
          "--log", str(tmp_path / "log.txt")])
    meta = read_meta(tmp_path / "p.root")
    assert meta["job"] == 1 and meta["ctr_ps"] == 200
    assert meta["t_start_s"] == pytest.approx(0.25)
    with pytest.raises(SystemExit):
        main(["--settings", json.dumps(cfg), "--ctr-ps", "200", "--job", "5", "--out", str(tmp_path / "q.root")])


# ---- the coincidence sorter, on hand-made singles ------------------------------------------
WINDOW_S = 4e-9  # the default scanner's coincidence_window_ns


def _sorter(**acq):
    sim = point_source_sim(**acq)
    assert sim.scanner.coincidence_window_ns * 1e-9 == WINDOW_S and sim.scanner.modules_per_ring == 44
    return sim._sort_coincidences


def _singles(t, rsec, e=None, decay=None):
    t = np.asarray(t, dtype=np.float64)
    return {"t": t, "rsec": np.asarray(rsec, dtype=np.int64),
            "e": np.full(t.size, 0.511) if e is None else np.asarray(e, dtype=np.float64),
            "decay": np.arange(t.size) if decay is None else np.asarray(decay)}


def _pairs(result):
    return sorted(zip(result[0].tolist(), result[1].tolist()))


@pytest.mark.parametrize("randoms", [True, False])
def test_sorter_window_edge(randoms):
    """Two singles pair when the second comes within the window (<= tau) of the first, not after."""
    sort = _sorter(randoms=randoms)
    t0 = 0.25
    inside = _singles([t0, t0 + WINDOW_S * (1 - 1e-6)], [0, 22], decay=[5, 5])
    outside = _singles([t0, t0 + WINDOW_S * (1 + 1e-6)], [0, 22], decay=[5, 5])
    assert _pairs(sort(inside)) == [(0, 1)]
    assert _pairs(sort(outside)) == []
    # single 1 is the earlier one, whatever the order of the input
    swapped = _singles([t0 + 1e-9, t0], [0, 22], decay=[5, 5])
    assert _pairs(sort(swapped)) == [(1, 0)]


def test_sorter_windows_are_not_paralysable():
    """Each window is opened by a single not already in one: 0, 3, 6 ns give one pair (0, 3);
    the single at 6 ns is 3 ns after the second but 6 ns after the opener, and opens nothing
    it can close."""
    sort = _sorter()
    s = _singles(0.1 + np.array([0.0, 3e-9, 6e-9]), [0, 22, 11])
    assert _pairs(sort(s)) == [(0, 1)]
    # a fourth single within 4 ns of the third makes a second window
    s = _singles(0.1 + np.array([0.0, 3e-9, 6e-9, 8e-9]), [0, 22, 11, 33])
    assert _pairs(sort(s)) == [(0, 1), (2, 3)]


def test_sorter_multiples_policies():
    """Three singles in one window: takeWinnerOfGoods keeps the good pair (sectors >= 2 apart)
    of highest summed energy; killAll keeps none."""
    t = 0.2 + np.array([0.0, 1e-9, 2e-9])
    rsec = [0, 1, 22]              # (0, 1) is not a good pair: neighbouring sectors
    e = [0.45, 0.56, 0.50]         # sums: (0, 1) 1.01 but bad; (0, 22) 0.95; (1, 22) 1.06
    assert _pairs(_sorter(multiples_policy="takeWinnerOfGoods")(_singles(t, rsec, e))) == [(1, 2)]
    e2 = [0.56, 0.45, 0.50]        # now (0, 22) wins
    assert _pairs(_sorter(multiples_policy="takeWinnerOfGoods")(_singles(t, rsec, e2))) == [(0, 2)]
    assert _pairs(_sorter(multiples_policy="killAll")(_singles(t, rsec, e))) == []
    # no good pair at all: nothing
    assert _pairs(_sorter()(_singles(t, [0, 1, 0], e))) == []


@pytest.mark.parametrize("randoms", [True, False])
def test_sorter_min_sector_difference(randoms):
    """Pairs closer than min_sector_difference around the ring (44 sectors, wrapping) are rejected."""
    pairs = [(0, 0), (0, 1), (0, 43), (0, 2), (0, 42), (5, 27), (40, 3)]
    diffs = [0, 1, 1, 2, 2, 22, 7]
    t = np.concatenate([[k * 1e-6, k * 1e-6 + 1e-9] for k in range(len(pairs))])
    rsec = np.concatenate(pairs)
    decay = np.repeat(np.arange(len(pairs)), 2)
    for msd in (0, 1, 2, 3):
        got = _pairs(_sorter(min_sector_difference=msd, randoms=randoms)(_singles(t, rsec, decay=decay)))
        want = [(2 * k, 2 * k + 1) for k, dd in enumerate(diffs) if dd >= msd]
        assert got == want, msd


def test_sorter_randoms_rate_is_two_tau_s1_s2():
    """Independent Poisson singles on two opposite sectors, rates S1 and S2 over T seconds:
    coincidences between them (all random: no two share a decay) arise at 2 tau S1 S2
    (one-sided window of width tau opened by each single); within 20%."""
    rng = np.random.default_rng(11)
    T, s1, s2 = 4.0, 1.0e5, 2.0e5
    t1, t2 = rng.uniform(0, T, rng.poisson(s1 * T)), rng.uniform(0, T, rng.poisson(s2 * T))
    s = _singles(np.concatenate([t1, t2]), np.r_[np.zeros(t1.size, int), np.full(t2.size, 22)])
    i1, i2 = _sorter()(s)
    expected = 2 * WINDOW_S * (t1.size / T) * (t2.size / T) * T
    print(f"randoms {i1.size}, 2 tau S1 S2 T = {expected:.0f}")
    assert expected > 500
    assert i1.size == pytest.approx(expected, rel=0.2)
    assert np.all(s["rsec"][i1] != s["rsec"][i2])
    assert np.all((s["t"][i2] - s["t"][i1] >= 0) & (s["t"][i2] - s["t"][i1] <= WINDOW_S))


@pytest.mark.parametrize("model, per_component", [("projected", 1.0), ("gate9", 1.0 / np.sqrt(2.0))])
def test_acollinearity_models(model, per_component):
    """The two sampling models: each projected component of the deviation has the configured FWHM
    and is Gaussian (FWHM from the standard deviation and from the interquartile range agree) with
    ``projected``, the default; GATE 9's old sampling (``gate9``) gives 1/sqrt(2) of the spread."""
    from equipet.simulation.montecarlo import acollinear_partner, isotropic

    defaults = AcquisitionSettings.from_config()
    assert defaults.acollinearity_model == "projected"
    rng = np.random.default_rng(11)
    u1 = isotropic(400_000, rng)
    u2 = acollinear_partner(u1, defaults.acollinearity_fwhm_deg, model, rng)
    expected = defaults.acollinearity_fwhm_deg * per_component
    for comp in _projected_deviation_deg(u1, u2):
        assert abs(comp.mean()) < 1e-3
        assert FWHM_PER_SIGMA * comp.std() == pytest.approx(expected, rel=0.02), model
        if model == "projected":
            q1, q3 = np.percentile(comp, [25, 75])
            assert FWHM_PER_SIGMA * (q3 - q1) / 1.3489795 == pytest.approx(expected, rel=0.02)
