"""All prompts with randoms and scatter corrections against the trues-only reference, on the quick
acquisition, through the command-line stages the workflow runs (issue: one physics model).

The quick acquisition (CTR 100 ps, 120 s) is simulated, normalised and reconstructed twice with
the quick MLEM settings: trues only (a simulation-only reference) and every prompt with both
corrections as additive terms. Corrected prompts must give the trues' rod CRCs within 5 %
(relative) and their background COV within 10 % at the same iteration; uncorrected prompts must
not (the scatter background lowers the CRCs), so the comparison can fail. The central slice of
the corrected reconstruction must carry, for every kept event, the additive term MLEM used for
that same event.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pandas as pd
import pytest

from equipet.central_slice import extract_slice
from equipet.gate_root import merge_main
from equipet.mlem import mlem_main, sensitivity_main
from equipet.montecarlo import main as simulate_main
from equipet.normalisation import main as normalisation_main
from equipet.recon_metrics import main as metrics_main

CTR = "100"


def _settings(path, cfg):
    path.write_text(json.dumps(cfg))
    return f"@{path}"


@pytest.fixture(scope="module")
def reconstructions(tmp_path_factory, quick_config):
    tmp = tmp_path_factory.mktemp("prompts")
    cfg = copy.deepcopy(quick_config)
    cfg.update(device="cpu", results_dir=str(tmp))
    assert cfg["mlem"]["events"] == "all" and set(cfg["mlem"]["corrections"]) == {"randoms", "scatter"}
    base = _settings(tmp / "settings_all.json", cfg)
    parts = []
    for job in range(cfg["acquisition"]["n_jobs"]):
        parts.append(tmp / f"job{job}.root")
        simulate_main(["--settings", base, "--ctr-ps", CTR, "--job", str(job), "--out", str(parts[-1])])
    root = tmp / "coincidences.root"
    merge_main([*map(str, parts), "--out", str(root), "--counts", str(tmp / "counts.json")])
    norm = tmp / "normalisation.json"
    normalisation_main(["--settings", base, "--out", str(norm), "--threads", "2"])
    sens = tmp / "sensitivity.nii.gz"
    sensitivity_main(["--settings", base, "--out", str(sens), "--threads", "2", "--normalisation", str(norm)])
    runs = {}
    variants = {"trues": ("trues", []), "uncorrected": ("all", []), "corrected": ("all", ["randoms", "scatter"])}
    for name, (events, corrections) in variants.items():
        c = copy.deepcopy(cfg)
        c["mlem"].update(events=events, corrections=corrections)
        s = _settings(tmp / f"settings_{name}.json", c)
        out = tmp / name
        mlem_main(["--settings", s, "--coincidences", str(root), "--sensitivity", str(sens), "--ctr-ps", CTR,
                   "--out-dir", str(out), "--threads", "2", "--normalisation", str(norm)])
        images = sorted(out.glob("mlem_it*.nii.gz"))
        metrics_main(["--settings", s, "--images", *map(str, images), "--ctr-ps", CTR,
                      "--out", str(out / "metrics.csv")])
        runs[name] = (c, out)
    return cfg, root, sens, runs, json.loads((tmp / "counts.json").read_text())


def _last(out, metric):
    df = pd.read_csv(out / "metrics.csv")
    df = df[(df.metric == metric) & (df.epoch == df.epoch.max())]
    return float(df.value.iloc[0])


def test_corrected_prompts_match_the_trues_reconstruction(reconstructions):
    cfg, _, _, runs, counts = reconstructions
    rods = cfg["phantom"]["rod_diameters_mm"]
    crc = {name: np.array([_last(out, f"crc_{d:g}mm") for d in rods]) for name, (_, out) in runs.items()}
    cov = {name: _last(out, "background_cov") for name, (_, out) in runs.items()}
    timing = json.loads((runs["corrected"][1] / "timing.json").read_text())
    print(f"scatter fraction {counts['scatter_fraction']:.3f}, randoms {counts['random_fraction']:.4f}; "
          f"CRC per rod {rods}: trues {np.round(crc['trues'], 3)}, corrected {np.round(crc['corrected'], 3)}, "
          f"uncorrected {np.round(crc['uncorrected'], 3)}; COV {cov}")
    assert timing["corrections"] == ["randoms", "scatter"]
    # the rods the quick reconstruction resolves (CRC well above noise): within 5 % relative
    big = crc["trues"] > 0.3
    assert big.sum() >= 3, crc["trues"]
    np.testing.assert_allclose(crc["corrected"][big], crc["trues"][big], rtol=0.05)
    assert cov["corrected"] == pytest.approx(cov["trues"], rel=0.10)
    # the additive terms account for the prompts that are not trues among the events crossing the
    # image box (labels of the simulation, unused by the estimate): within 10 %
    n_trues = json.loads((runs["trues"][1] / "timing.json").read_text())["events"]
    expected = timing["scatter_round1"]["scatter_expected"] + timing["randoms_expected"]
    print(f"non-trues crossing the box: labelled {timing['events'] - n_trues}, estimated {expected:.0f}")
    assert timing["events"] - n_trues > 1000
    assert expected == pytest.approx(timing["events"] - n_trues, rel=0.10)


def test_central_slice_carries_the_additive_term_of_each_event(reconstructions):
    _, root, sens, runs, _ = reconstructions
    c, out = runs["corrected"]
    with np.load(out / "additive.npz") as f:
        additive = f["additive"]
    data = extract_slice(c, out, sens, root, float(CTR), out / "additive.npz")
    assert np.allclose(data["background"], data["background_out_of_slab"] + data["background_additive"])
    assert data["background_additive"].min() > 0
    # match each slice event to the event MLEM read (same LOR ends and TOF offset)
    from equipet.listmode import read_listmode
    from equipet.scanner import Scanner

    ev = read_listmode(root, Scanner.from_config(c["scanner"]), "all", c["mlem"]["lor_endpoints"], None, 10**6)
    key = {(*np.round(a, 3), np.round(t, 3)): i for i, (a, t) in
           enumerate(zip(np.hstack([ev.p1_mm, ev.p2_mm]), ev.tof_mm))}
    sample = np.random.default_rng(0).choice(len(data["tof"]), 200, replace=False)
    idx = [key[(*np.round(np.hstack([data["p1"][k], data["p2"][k]]), 3), np.round(data["tof"][k], 3))]
           for k in sample]
    np.testing.assert_allclose(data["background_additive"][sample], additive[idx], rtol=1e-6)
    # the stored term belongs to that acquisition: another one is refused, naming the file
    from equipet.errors import InputDataError

    bad = out / "additive_other.npz"
    np.savez(bad, additive=additive[:-1], n_read=np.asarray(len(additive) - 1), tof_sum_mm=np.asarray(0.0))
    with pytest.raises(InputDataError, match="additive_other.npz"):
        extract_slice(c, out, sens, root, float(CTR), bad)
