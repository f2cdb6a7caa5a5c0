"""Bad input to the reconstruction commands: each run stops with exit status 2 and a message
that names the file or key and the fix, and writes nothing (no partial output)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from equipet.config import validate
from equipet.simulation.gate_root import CoincidenceWriter
from equipet.reconstruction.listmode import simulate_true_events
from equipet.reconstruction.mlem import save_nifti
from equipet.commands.reconstruction.mlem import mlem_main, sensitivity_main
from equipet.reconstruction.projector import ImageGeometry
from equipet.commands.reconstruction.recon_metrics import main as metrics_main
from equipet.simulation.scanner import Scanner

SMALL = Scanner(rings=2, modules_per_ring=24, pixels_transaxial=8, pixels_axial=4, pixel_size_mm=2.1,
                pixel_gap_mm=0.0, crystal_thickness_mm=20.0, doi_layers=2, inner_radius_mm=None,
                material="LYSO", energy_resolution_fwhm=0.11, energy_window_kev=(435.0, 585.0),
                coincidence_window_ns=4.0)


def _cfg(tmp: Path, **mlem) -> dict:
    scanner = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(SMALL).items()}
    return validate({"scanner": scanner, "device": "cpu", "results_dir": str(tmp),
                     "mlem": {"fov_mm": [40.0, 40.0, 4.0], "iterations": 2, "sensitivity_lors": 5000,
                              "sensitivity_batches": 2, "system_cache_mb": 50,
                              "normalisation": {"enabled": False}, "events": "trues", "corrections": [],
                              **mlem}})


def _write_settings(path: Path, cfg: dict) -> Path:
    path.write_text(json.dumps(cfg))
    return path


@pytest.fixture(scope="module")
def stage(tmp_path_factory) -> dict:
    """Settings, a good coincidence file and its sensitivity image."""
    tmp = tmp_path_factory.mktemp("bad_input")
    settings = _write_settings(tmp / "settings.json", _cfg(tmp))
    rng = np.random.default_rng(0)
    chunk = simulate_true_events(SMALL, rng.normal(0, 6, (4000, 3)) * [1, 1, 0.2], 100.0, rng, 0.2)
    root = tmp / "coincidences.root"
    with CoincidenceWriter(root) as w:
        w.write(chunk)
    sens = tmp / "sensitivity.nii.gz"
    sensitivity_main(["--settings", f"@{settings}", "--out", str(sens)])
    return {"tmp": tmp, "settings": settings, "root": root, "sens": sens, "chunk": chunk}


def _fails(capfd, main, argv, *needles):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capfd.readouterr().err
    for needle in needles:
        assert needle in err, (needle, err)
    assert "fix:" in err, err
    assert "Traceback" not in err
    return err


def _mlem(stage, out: Path, root: Path | None = None, settings: Path | None = None) -> list[str]:
    return ["--settings", f"@{settings or stage['settings']}", "--coincidences", str(root or stage["root"]),
            "--sensitivity", str(stage["sens"]), "--ctr-ps", "100", "--out-dir", str(out)]


def test_truncated_root_file(stage, tmp_path, capfd):
    data = stage["root"].read_bytes()
    bad = tmp_path / "truncated.root"
    bad.write_bytes(data[: len(data) // 2])
    out = tmp_path / "recon"
    _fails(capfd, mlem_main, _mlem(stage, out, bad), str(bad), "truncated or corrupt", "rerun")
    assert not out.exists() or not any(out.iterdir())


def test_root_file_without_a_needed_branch(stage, tmp_path, capfd):
    bad = tmp_path / "no_layer.root"
    import uproot

    with uproot.recreate(bad) as f:   # GATE's tree, written by hand without layerID1
        f["Coincidences"] = {k: np.asarray(v) for k, v in stage["chunk"].items() if k != "layerID1"}
    out = tmp_path / "recon"
    _fails(capfd, mlem_main, _mlem(stage, out, bad), str(bad), "layerID1")
    assert not out.exists() or not any(out.iterdir())


def test_energy_window_with_no_events(stage, tmp_path, capfd):
    """All simulated energies are 511 keV: a 100-200 keV window selects nothing."""
    cfg = _cfg(stage["tmp"], energy_window_kev=[100.0, 200.0])
    settings = _write_settings(tmp_path / "settings.json", cfg)
    out = tmp_path / "recon"
    # the sensitivity does not depend on the window: the cached one is accepted
    _fails(capfd, mlem_main, _mlem(stage, out, settings=settings), str(stage["root"]),
           "no events left after selection", "energy window")
    assert not out.exists() or not any(out.iterdir())


def test_nifti_of_the_wrong_shape(stage, tmp_path, capfd):
    wrong = ImageGeometry.from_fov((40.0, 40.0, 8.0), 0.8)        # 10 slices instead of 5
    img = tmp_path / "mlem_it1.nii.gz"
    save_nifti(np.ones(wrong.shape, np.float32), wrong, img)
    out = tmp_path / "metrics.csv"
    _fails(capfd, metrics_main, ["--settings", f"@{stage['settings']}", "--images", str(img), "--ctr-ps", "100",
                                 "--out", str(out)], str(img), "(50, 50, 10)", "(50, 50, 5)")
    assert not out.exists()
    assert not list(tmp_path.glob(".metrics.csv*"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_device_cuda_without_a_gpu(stage, tmp_path, capfd):
    cfg = _cfg(stage["tmp"])
    cfg["device"] = "cuda"
    settings = _write_settings(tmp_path / "settings.json", cfg)
    out = tmp_path / "sensitivity.nii.gz"
    _fails(capfd, sensitivity_main, ["--settings", f"@{settings}", "--out", str(out)], "device", "cuda",
           "device: auto")
    assert not out.exists() and not list(tmp_path.glob("*.nii.gz"))
