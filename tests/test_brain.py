"""Tests of equipet.brain.image: sources, orientation, slice choice, crop/disk geometry, CLI."""

from __future__ import annotations

import json
import socket
import warnings

import nibabel as nib
import numpy as np
import pytest
from skimage import io

import equipet.brain.image as brain
from equipet.commands.brain.image import main as brain_main
from equipet.brain.image import BrainSlices, brain_slices, disk_mask, load_brain_volume
from equipet.errors import ConfigError, InputDataError

SIZE = 64


@pytest.fixture(scope="module")
def mni_slices() -> BrainSlices:
    return brain_slices({"brain": {"source": "mni152", "size": SIZE}})


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access attempted during a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_mni152_loads_offline_with_axial_slices_first(no_network):
    vol = load_brain_volume("mni152")
    # 1 mm template: 197 (x) x 233 (y) x 189 (z) voxels -> (z, y, x)
    assert vol.shape == (189, 233, 197)
    assert vol.min() >= 0 and vol.max() > 0


def test_nifti_orientation_is_radiological_and_affine_aware(tmp_path):
    """A voxel at the anterior, right, superior corner lands at the top-left of the last slice,
    whatever the voxel order on disk (RAS or LPS affine)."""
    data = np.zeros((5, 6, 4))  # x, y, z
    data[4, 5, 3] = 1.0  # most right (x), most anterior (y), most superior (z) in RAS
    data[0, 0, 0] = 2.0  # left, posterior, inferior
    ras = np.eye(4)
    nib.save(nib.Nifti1Image(data, ras), tmp_path / "ras.nii.gz")
    # the same physical image stored in LPS voxel order: x and y axes reversed
    lps = np.diag([-1.0, -1.0, 1.0, 1.0])
    lps[:3, 3] = [4, 5, 0]
    nib.save(nib.Nifti1Image(data[::-1, ::-1, :].copy(), lps), tmp_path / "lps.nii")
    for name in ("ras.nii.gz", "lps.nii"):
        vol = load_brain_volume("file", tmp_path / name)
        assert vol.shape == (4, 6, 5)
        assert vol[3, 0, 0] == 1.0, name  # superior slice, anterior row 0, patient's right at col 0
        assert vol[0, 5, 4] == 2.0, name  # inferior slice, posterior bottom row, patient's left at right


def test_default_slices_geometry(mni_slices):
    s = mni_slices
    assert s.source == "mni152"
    assert s.train.shape == (SIZE, SIZE) and s.train.dtype == np.float32
    assert s.heldout.shape == (4, SIZE, SIZE) and s.heldout.dtype == np.float32
    assert s.heldout_offsets == [-20, -10, 10, 20]
    # middle of the template's non-zero slice range 0..154
    assert s.train_index == 77
    assert s.heldout_indices == [57, 67, 87, 97]
    for img in (s.train, *s.heldout):
        assert img.min() >= 0 and img.max() <= 1
        assert not img[~disk_mask(SIZE)].any()
    assert s.train.max() > 0.5
    # the brain fills the image: it spans more than 80 % of the rows
    rows = np.flatnonzero(s.train.any(axis=1))
    assert rows[-1] - rows[0] > 0.8 * SIZE
    # held-out slices are different anatomy
    assert all(np.abs(h - s.train).mean() > 0.02 for h in s.heldout)


def test_disk_mask_cuts_no_brain(monkeypatch, mni_slices):
    """With the disk mask disabled the images are the same: the head lies inside the circle."""
    monkeypatch.setattr(brain, "disk_mask", lambda n: np.ones((n, n), bool))
    unmasked = brain_slices({"brain": {"size": SIZE}})
    for masked, full in zip((mni_slices.train, *mni_slices.heldout), (unmasked.train, *unmasked.heldout)):
        assert np.abs(full - masked).sum() <= 1e-5 * full.sum()


def test_disk_mask_matches_skimage_circle():
    """skimage accepts an image filling disk_mask without a warning, and warns one pixel beyond it."""
    from skimage.transform import radon

    for n in (16, 17):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            radon(disk_mask(n).astype(float), np.array([0.0]), circle=True)
        outside = np.zeros((n, n))
        outside[0, n // 2 + 1] = 1.0  # next to the disk's top point (0, n // 2)
        assert not disk_mask(n)[0, n // 2 + 1] and disk_mask(n)[0, n // 2]
        with pytest.warns(UserWarning, match="outside the reconstruction circle"):
            radon(outside, np.array([0.0]), circle=True)


def test_heldout_outside_volume_names_the_field():
    with pytest.raises(ConfigError, match="brain.heldout_slices") as err:
        brain_slices({"brain": {"slice": 5, "heldout_slices": [-10, 10], "size": 16}})
    assert "-5..183" in str(err.value)  # the valid offset range is in the fix
    with pytest.raises(ConfigError, match="brain.slice"):
        brain_slices({"brain": {"slice": 500, "heldout_slices": [], "size": 16}})


def test_png_source_is_2d(tmp_path):
    img = np.zeros((40, 30), np.uint8)
    img[10:30, 5:25] = 200
    io.imsave(tmp_path / "b.png", img, check_contrast=False)
    with pytest.raises(ConfigError, match="heldout_slices") as err:
        brain_slices({"brain": {"source": "file", "path": str(tmp_path / "b.png"), "size": 32}})
    assert "heldout_slices: []" in str(err.value)
    s = brain_slices({"brain": {"source": "file", "path": str(tmp_path / "b.png"), "size": 32,
                                "heldout_slices": []}})
    assert s.train.shape == (32, 32) and s.heldout.shape == (0, 32, 32) and s.train_index == 0
    assert s.train.max() == pytest.approx(1.0)  # normalised by the image maximum (200)


def test_file_source_errors(tmp_path):
    with pytest.raises(ConfigError, match="brain.path"):
        load_brain_volume("file", None)
    with pytest.raises(InputDataError, match="file not found"):
        load_brain_volume("file", tmp_path / "missing.nii.gz")
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"not a nifti file at all")
    with pytest.raises(InputDataError, match="broken.nii.gz"):
        load_brain_volume("file", bad)
    with pytest.raises(ConfigError, match="unsupported file type"):
        (tmp_path / "x.jpg").write_bytes(b"")
        load_brain_volume("file", tmp_path / "x.jpg")


def test_skimage_source_offline_suggests_mni152(monkeypatch):
    import skimage.data

    def offline():
        raise ConnectionError("Failed to establish a new connection")  # what pooch/requests raise offline

    monkeypatch.setattr(skimage.data, "brain", offline)
    with pytest.raises(InputDataError, match="mni152"):
        load_brain_volume("skimage")


def test_npz_roundtrip_and_truncated_file(tmp_path, mni_slices):
    path = tmp_path / "brain.npz"
    mni_slices.save(path)
    back = BrainSlices.load(path)
    np.testing.assert_array_equal(back.train, mni_slices.train)
    np.testing.assert_array_equal(back.heldout, mni_slices.heldout)
    assert (back.heldout_offsets, back.train_index, back.source) == (
        mni_slices.heldout_offsets, mni_slices.train_index, mni_slices.source)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(InputDataError, match="brain.npz"):
        BrainSlices.load(path)


def test_slices_made_with_other_settings_are_refused(tmp_path, mni_slices):
    """A brain file is checked against the settings that will train on it: the quick
    configuration's 64 x 64 image must not stand in for the paper's 128 x 128 one."""
    same = {"brain": {"source": "mni152", "size": SIZE}}
    assert mni_slices.mismatch(same) is None
    assert mni_slices.mismatch({"brain": {"source": "mni152", "size": 128}}) == f"its image is {SIZE} x {SIZE}, brain.size is 128"
    assert "brain.source" in mni_slices.mismatch({"brain": {"source": "skimage", "size": SIZE}})
    assert "brain.heldout_slices" in mni_slices.mismatch({"brain": {"size": SIZE, "heldout_slices": [-5, 5]}})
    assert "brain.slice" in mni_slices.mismatch({"brain": {"size": SIZE, "slice": mni_slices.train_index + 1}})
    assert mni_slices.mismatch({"brain": {"size": SIZE, "slice": mni_slices.train_index}}) is None
    path = tmp_path / "brain.npz"
    with pytest.raises(ConfigError, match="brain.size is 128") as err:
        mni_slices.check({"brain": {"size": 128}}, path)
    assert str(path) in str(err.value)
    mni_slices.check(same, path)   # matching settings pass


def test_cli_writes_npz_and_preview(tmp_path, capsys):
    settings = {"brain": {"size": 32, "heldout_slices": [-5, 5]}, "seeds": [0]}
    out, preview = tmp_path / "res" / "brain.npz", tmp_path / "res" / "brain.png"
    brain_main(["--settings", json.dumps(settings), "--out", str(out), "--preview", str(preview),
                "--log", str(tmp_path / "log.txt")])
    s = BrainSlices.load(out)
    assert s.train.shape == (32, 32) and s.heldout_indices == [72, 82]
    assert preview.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out.parent.iterdir()) == ["brain.npz", "brain.png"]  # no temp files left
    with pytest.raises(SystemExit) as exc:
        brain_main(["--settings", json.dumps({"brain": {"heldout_slices": [999]}}), "--out", str(out)])
    assert exc.value.code == 2
    assert "brain.heldout_slices" in capsys.readouterr().err
