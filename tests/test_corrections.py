"""Randoms and scatter estimates against the simulation's labels (equipet.corrections)."""

from __future__ import annotations

import numpy as np
import pytest

from equipet.config import schema_defaults
from equipet.corrections import SinglesModel, prompts_per_element
from equipet.gate_root import classify
from equipet.montecarlo import AcquisitionSettings, Simulator
from equipet.phantom import hot_rod_phantom
from equipet.scanner import Scanner

#: a one-ring scanner of 8 modules (radius 38.6 mm) with a 50 ns window: about 7% randoms
SMALL = Scanner.from_config({**schema_defaults("scanner"), "rings": 1, "modules_per_ring": 8,
                             "pixels_transaxial": 8, "pixels_axial": 8, "pixel_size_mm": 4.0,
                             "coincidence_window_ns": 50.0})


def _off_centre_cylinder(n, rng):
    """Uniform cylinder of radius 15 mm, 20 mm long, centred 12 mm off the axis (uneven singles)."""
    r = 15.0 * np.sqrt(rng.random(n))
    ph = 2 * np.pi * rng.random(n)
    pos = np.stack([12.0 + r * np.cos(ph), r * np.sin(ph), rng.uniform(-10, 10, n)], axis=1)
    return pos, np.zeros(n, np.int32)


@pytest.fixture(scope="module", params=["takeWinnerOfGoods", "killAll"])
def high_rate_run(request):
    acq = AcquisitionSettings.from_config(duration_s=3.0, n_jobs=1, seed=3, multiples_policy=request.param)
    sim = Simulator(SMALL, hot_rod_phantom({"material": "Air"}), acq, source=_off_centre_cylinder,
                    source_activity_bq=1.5e6)
    return acq, sim.run_job(0, 200.0, progress=False)


def test_randoms_from_singles_and_prompts_match_labelled_randoms(high_rate_run):
    acq, run = high_rate_run
    d = run["data"]
    el = [SMALL.flat_index(d[f"rsectorID{k}"], d[f"moduleID{k}"], d[f"crystalID{k}"], d[f"layerID{k}"])
          for k in (1, 2)]
    model = SinglesModel.from_counts(SMALL, run["singles_counts"], prompts_per_element(SMALL, *el),
                                     acq.duration_s, SMALL.coincidence_window_ns, acq.multiples_policy,
                                     acq.min_sector_difference)
    expected = model.by_sector_pair(SMALL, acq.min_sector_difference)
    rnd = classify(d)["random"]
    a = np.minimum(d["rsectorID1"][rnd], d["rsectorID2"][rnd])
    b = np.maximum(d["rsectorID1"][rnd], d["rsectorID2"][rnd])
    observed = np.zeros_like(expected)
    np.add.at(observed, (a, b), 1)
    assert observed[expected == 0].sum() == 0          # the sorter keeps no pair the model excludes
    # sectors: quarters of the ring (2 rsectors each), 6 sector pairs of 500-2000 randoms
    quarter = np.arange(SMALL.modules_per_ring) // (SMALL.modules_per_ring // 4)
    group = np.zeros((4, SMALL.modules_per_ring))
    group[quarter, np.arange(SMALL.modules_per_ring)] = 1
    expected, observed = (group @ (m + m.T) @ group.T for m in (expected, observed))
    iu = np.triu_indices(4, 1)
    expected, observed = expected[iu], observed[iu]
    total = expected.sum() / observed.sum()
    per_pair = observed / expected
    print(f"{acq.multiples_policy}: randoms labelled {observed.sum():.0f}, estimated {expected.sum():.1f} "
          f"(ratio {total:.3f}); per sector pair observed/estimated {per_pair.min():.3f}..{per_pair.max():.3f}")
    assert observed.min() > 400
    assert total == pytest.approx(1.0, abs=0.05)
    np.testing.assert_allclose(per_pair, 1.0, atol=0.15)
    # the textbook 2 tau S_i S_j, which ignores the singles' partners, is measurably biased here
    naive = SinglesModel.from_counts(SMALL, run["singles_counts"], np.zeros(SMALL.n_crystals), acq.duration_s,
                                     SMALL.coincidence_window_ns, "killAll")
    assert naive.by_sector_pair(SMALL, acq.min_sector_difference).sum() / observed.sum() > 1.1
