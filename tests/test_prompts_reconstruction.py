"""All prompts with randoms and scatter corrections against the trues-only reference, through the
command-line stages the workflow runs, on an acquisition where scatter is a substantial part of
the events crossing the image.

The quick settings' phantom is small (110 mm of water around a 100 mm warm disk in a 704 mm
ring): only 1.6 % of the prompts that cross its image box are scattered, so uncorrected prompts
reconstruct as well as corrected ones there and a test on it cannot tell them apart. Here the
phantom is a 300 mm water cylinder, 60 mm long, with a 280 mm warm disk (rods and a 30 mm cold
centre as before, 10 mm long) at 50 times the paper's activity concentration for 0.64 s, imaged
on a 304 x 304 x 12 mm box of 2 mm voxels: 28 % of the prompts are scattered and 18 % random, and
about 14 % and 3 % of those crossing the box. The acquisition (CTR 100 ps) is simulated,
normalised and reconstructed three times with the quick MLEM settings: trues only (a
simulation-only reference), all prompts uncorrected, and all prompts with both corrections as
additive terms. The check, at the last iteration: the resolved rods' CRCs within 10 % (relative)
of the trues' and the image's total activity ``sum_j s_j x_j`` within 3 % of the trues' (the
quantitation: list-mode MLEM attributes ``(A x)_e / ((A x)_e + b_e)`` of each event to the image,
so without the additive term the image carries every prompt). Corrected prompts must pass it and
uncorrected prompts must fail it, so it fails when MLEM drops the additive term. The estimated
non-trues crossing the box must match the simulation's labels within 10 %. The central slice of
the corrected reconstruction must carry, for every kept event, the additive term MLEM used for
that same event.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pandas as pd
import pytest

from equipet.assisted.central_slice import extract_slice
from equipet.commands.simulation.gate_root import merge_main
from equipet.commands.reconstruction.mlem import mlem_main, sensitivity_main
from equipet.commands.simulation.montecarlo import main as simulate_main
from equipet.commands.reconstruction.normalisation import main as normalisation_main
from equipet.commands.reconstruction.recon_metrics import main as metrics_main

CTR = "100"


def stage_settings(path, cfg):
    path.write_text(json.dumps(cfg))
    return f"@{path}"


@pytest.fixture(scope="module")
def reconstructions(tmp_path_factory, quick_config):
    tmp = tmp_path_factory.mktemp("prompts")
    cfg = copy.deepcopy(quick_config)
    cfg.update(device="cpu", results_dir=str(tmp))
    assert cfg["mlem"]["events"] == "all" and set(cfg["mlem"]["corrections"]) == {"randoms", "scatter"}
    cfg["phantom"].update(diameter_mm=300.0, active_diameter_mm=280.0, length_mm=60.0, rod_length_mm=10.0)
    cfg["mlem"].update(fov_mm=[304.0, 304.0, 12.0], voxel_size_mm=2.0)
    cfg["acquisition"].update(activity_scale=50.0, duration_s=0.64)
    base = stage_settings(tmp / "settings_all.json", cfg)
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
        s = stage_settings(tmp / f"settings_{name}.json", c)
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


def _total_activity(sens_path, out):
    """``sum_j s_j x_j`` of the last MLEM image: the events the image accounts for (list-mode MLEM
    keeps ``sum_j s_j x_j = sum_e (A x)_e / ((A x)_e + b_e)``, the trues when ``b_e`` is right)."""
    import nibabel as nib

    last = max(out.glob("mlem_it*.nii.gz"), key=lambda p: int(p.name[7:].split(".")[0]))
    sens = np.asarray(nib.load(sens_path).dataobj, dtype=np.float64)
    return float((sens * np.asarray(nib.load(last).dataobj, dtype=np.float64)).sum())


def _matches_trues(crc, total, name, big):
    """The check of the module doc: the resolved rods' CRCs within 10 % of the trues' and the
    image's total activity within 3 %."""
    return bool(np.allclose(crc[name][big], crc["trues"][big], rtol=0.10, atol=0.0)
                and abs(total[name] / total["trues"] - 1.0) <= 0.03)


def test_corrected_prompts_match_the_trues_reconstruction_and_uncorrected_do_not(reconstructions):
    cfg, _, sens, runs, counts = reconstructions
    rods = cfg["phantom"]["rod_diameters_mm"]
    crc = {name: np.array([_last(out, f"crc_{d:g}mm") for d in rods]) for name, (_, out) in runs.items()}
    mean = {name: _last(out, "background_mean") for name, (_, out) in runs.items()}
    cov = {name: _last(out, "background_cov") for name, (_, out) in runs.items()}
    total = {name: _total_activity(sens, out) for name, (_, out) in runs.items()}
    timing = json.loads((runs["corrected"][1] / "timing.json").read_text())
    n_trues = json.loads((runs["trues"][1] / "timing.json").read_text())["events"]
    print(f"scatter fraction {counts['scatter_fraction']:.3f}, randoms {counts['random_fraction']:.4f}; "
          f"non-trues among the {timing['events']} prompts crossing the box: "
          f"{1 - n_trues / timing['events']:.3f}; CRC per rod {rods}: trues {np.round(crc['trues'], 3)}, "
          f"corrected {np.round(crc['corrected'], 3)}, uncorrected {np.round(crc['uncorrected'], 3)}; "
          f"background mean {mean}; COV {cov}; total activity {total}")
    assert timing["corrections"] == ["randoms", "scatter"]
    expected = timing["scatter_round1"]["scatter_expected"] + timing["randoms_expected"]
    print(f"non-trues crossing the box: labelled {timing['events'] - n_trues}, estimated {expected:.0f}; "
          f"randoms estimated {timing['randoms_expected']:.0f}")
    # scatter and randoms are a substantial part of what crosses the image
    assert 1 - n_trues / timing["events"] > 0.07
    big = crc["trues"] > 0.3                       # the rods this reconstruction resolves
    assert big.sum() >= 3, crc["trues"]
    assert _matches_trues(crc, total, "corrected", big)
    assert not _matches_trues(crc, total, "uncorrected", big)
    # the additive terms account for the prompts that are not trues among the events crossing the
    # image box (labels of the simulation, unused by the estimate): within 10 %
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
    from equipet.reconstruction.listmode import read_listmode
    from equipet.simulation.scanner import Scanner

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
