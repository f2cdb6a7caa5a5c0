"""The benchmark brain image: one training slice and a few held-out slices.

Sources (config section ``brain``)
----------------------------------
``mni152``
    The 1 mm MNI152 T1 template shipped inside nilearn's wheel
    (``nilearn.datasets.load_mni152_template``); needs no network.
``skimage``
    ``skimage.data.brain()`` (10 MRI slices), which scikit-image downloads with
    ``pooch`` on first use; offline this fails with an :class:`InputDataError`.
``file``
    A NIfTI volume or slice (``.nii``/``.nii.gz``, read with nibabel), or a PNG/TIFF
    image (``skimage.io``; colour is converted to grey, a multi-page TIFF is a stack of
    axial slices).

Orientation
-----------
:func:`load_brain_volume` returns ``(n_slices, H, W)`` with axial slices along axis 0.
NIfTI data are first brought to RAS+ with ``nibabel.as_closest_canonical`` (the
template already is), then ``vol[k, row, col]`` is the voxel at the ``k``-th axial
position counted from inferior to superior, with anterior at the top (row 0) and the
patient's right on the left of the image (col 0): the radiological convention.
PNG/TIFF data are taken as they are.

Preparing the slices (:func:`brain_slices`)
-------------------------------------------
1. The training slice is ``brain.slice``, or (null) the middle of the range of slices
   that contain any non-zero voxel; the held-out slices are at ``brain.heldout_slices``
   offsets from it.
2. Intensities are divided by the volume's maximum (one scale for every slice) and
   clipped to [0, 1].
3. Every slice is cut to the same square: centred on the bounding box of the volume's
   in-plane footprint (non-zero in any slice), with half-side the distance from that
   centre to the farthest footprint pixel plus a 5 % margin, padding with zeros where
   the square leaves the array. The head thus fills the image, and lies inside the
   square's inscribed circle.
4. The square is resized to ``brain.size`` pixels with ``skimage.transform.resize``
   (bilinear, anti-aliased) and multiplied by :func:`disk_mask`, the disk that
   ``skimage.transform.radon(..., circle=True)`` (and :class:`equipet.brain.radon.RadonTransform`)
   assume the object lies in. Step 3 makes the mask cut only background.
"""

from __future__ import annotations

import copy
import json
import logging
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from equipet.errors import ConfigError, InputDataError
from equipet.files import atomic_path

log = logging.getLogger("equipet.brain.image")

SOURCES = ("mni152", "skimage", "file")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
IMAGE_SUFFIXES = (".png", ".tif", ".tiff")
CROP_MARGIN = 0.05  # relative margin around the head's circumscribed circle


def disk_mask(size: int) -> np.ndarray:
    """Boolean ``size x size`` disk ``(row - c)**2 + (col - c)**2 <= c**2``, ``c = size // 2``.

    The reconstruction circle of ``skimage.transform.radon(..., circle=True)``: an image
    that is zero outside it is seen completely by every projection.
    """
    c = size // 2
    rows, cols = np.ogrid[:size, :size]
    return (rows - c) ** 2 + (cols - c) ** 2 <= c**2


def _ras_to_axial(data: np.ndarray) -> np.ndarray:
    """RAS+ array ``data[x, y, z]`` -> ``vol[z, row, col]``, anterior up, patient's right on the left."""
    return np.ascontiguousarray(np.flip(np.transpose(data, (2, 1, 0)), axis=(1, 2)))


def _nifti_to_axial(img: Any, where: str) -> np.ndarray:
    import nibabel as nib

    data = np.asanyarray(img.dataobj)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim == 2:
        data = data[..., None]
    if data.ndim != 3:
        raise InputDataError(f"expected a 2-D or 3-D NIfTI image, got shape {data.shape}", where=where,
                             fix="give a single 3-D volume (extract one frame of a 4-D series)")
    canonical = nib.as_closest_canonical(nib.Nifti1Image(np.asarray(data, dtype=np.float64), img.affine))
    return _ras_to_axial(np.asarray(canonical.dataobj, dtype=np.float64))


def _load_mni152() -> np.ndarray:
    from nilearn.datasets import load_mni152_template

    return _nifti_to_axial(load_mni152_template(resolution=1), "nilearn MNI152 template")


def _load_skimage() -> np.ndarray:
    from skimage import data

    try:
        vol = data.brain()
    except (ImportError, OSError, ValueError) as exc:
        raise InputDataError(
            f"cannot get scikit-image's brain image, which is downloaded on first use ({exc})",
            where="brain.source: skimage",
            fix="use brain.source: mni152 (shipped with nilearn, works offline), "
                "or run once with internet access (scikit-image caches the download)",
        ) from exc
    return np.asarray(vol, dtype=np.float64)


def _load_file(path: str | Path | None) -> np.ndarray:
    if path is None:
        raise ConfigError("brain.source is file but no brain.path is given", where="brain.path",
                          fix="set brain.path to a NIfTI (.nii/.nii.gz), PNG or TIFF file")
    path = Path(path)
    where = f"brain.path: {path}"
    if not path.is_file():
        raise InputDataError("file not found", where=where, fix="check brain.path (relative to the working directory)")
    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        import nibabel as nib

        try:
            return _nifti_to_axial(nib.load(path), where)
        except (nib.filebasedimages.ImageFileError, OSError, EOFError, ValueError) as exc:
            raise InputDataError(f"cannot read NIfTI file ({exc})", where=where,
                                 fix="check that the file is a complete NIfTI-1/2 image") from exc
    if name.endswith(IMAGE_SUFFIXES):
        from skimage import io
        from skimage.color import rgb2gray, rgba2rgb

        try:
            img = io.imread(path)
        except (OSError, ValueError) as exc:
            raise InputDataError(f"cannot read image file ({exc})", where=where,
                                 fix="check that the file is a complete PNG or TIFF image") from exc
        img = np.asarray(img)
        if img.ndim == 3 and img.shape[-1] in (3, 4):
            img = rgb2gray(rgba2rgb(img) if img.shape[-1] == 4 else img)
        if img.ndim == 2:
            img = img[None]
        if img.ndim != 3:
            raise InputDataError(f"expected a grey or colour 2-D image (or a TIFF stack), got shape {img.shape}",
                                 where=where)
        return np.asarray(img, dtype=np.float64)
    raise ConfigError(f"unsupported file type {path.suffix!r}", where=where,
                      fix="use a .nii, .nii.gz, .png, .tif or .tiff file")


def load_brain_volume(source: str, path: str | Path | None = None) -> np.ndarray:
    """The brain image as ``(n_slices, H, W)`` float64, axial slices along axis 0.

    See the module docstring for the sources and the orientation. A 2-D image gives
    ``n_slices == 1``.
    """
    if source == "mni152":
        return _load_mni152()
    if source == "skimage":
        return _load_skimage()
    if source == "file":
        return _load_file(path)
    raise ConfigError(f"unknown brain source {source!r}", where="brain.source", fix=f"use one of {', '.join(SOURCES)}")


@dataclass
class BrainSlices:
    """The prepared images: all ``size x size`` float32 in [0, 1], zero outside :func:`disk_mask`."""

    train: np.ndarray  # (H, W)
    heldout: np.ndarray  # (K, H, W); K = 0 for a 2-D source
    heldout_offsets: list[int] = field(default_factory=list)
    train_index: int = 0
    source: str = "mni152"

    @property
    def heldout_indices(self) -> list[int]:
        return [self.train_index + o for o in self.heldout_offsets]

    def save(self, path: str | Path) -> None:
        """Write an ``.npz`` (keys train, heldout, heldout_offsets, train_index, source), atomically."""
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez_compressed(
                fh, train=self.train, heldout=self.heldout,
                heldout_offsets=np.asarray(self.heldout_offsets, dtype=np.int64),
                train_index=np.int64(self.train_index), source=np.str_(self.source),
            )

    @classmethod
    def load(cls, path: str | Path) -> BrainSlices:
        """Read what :meth:`save` wrote; a missing or incomplete file raises :class:`InputDataError`."""
        path = Path(path)
        fix = "rerun the brain rule (equipet-brain) to recreate it"
        try:
            with np.load(path, allow_pickle=False) as z:
                out = cls(train=z["train"], heldout=z["heldout"],
                          heldout_offsets=[int(o) for o in z["heldout_offsets"]],
                          train_index=int(z["train_index"]), source=str(z["source"]))
        except FileNotFoundError as exc:
            raise InputDataError("file not found", where=str(path), fix=fix) from exc
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            raise InputDataError(f"not a complete brain-slices file ({exc})", where=str(path), fix=fix) from exc
        if out.train.ndim != 2 or out.heldout.ndim != 3 or out.heldout.shape[1:] != out.train.shape:
            raise InputDataError(f"inconsistent shapes train {out.train.shape}, heldout {out.heldout.shape}",
                                 where=str(path), fix=fix)
        return out

    def mismatch(self, settings: Mapping[str, Any]) -> str | None:
        """How these slices differ from what the ``brain`` settings make (size, source, held-out
        offsets, the training slice when one is set), or None. A file made with other settings (say
        the quick configuration's 64 x 64 image) must not be trained on by a run of these."""
        cfg = _brain_section(settings)
        size = int(cfg["size"])
        if self.train.shape != (size, size):
            return f"its image is {self.train.shape[0]} x {self.train.shape[1]}, brain.size is {size}"
        if self.source != cfg["source"]:
            return f"it was made from brain.source {self.source}, the settings say {cfg['source']}"
        offsets = [int(o) for o in cfg["heldout_slices"]]
        if list(self.heldout_offsets) != offsets:
            return f"its held-out offsets are {list(self.heldout_offsets)}, brain.heldout_slices is {offsets}"
        if cfg["slice"] is not None and self.train_index != int(cfg["slice"]):
            return f"its training slice is {self.train_index}, brain.slice is {cfg['slice']}"
        return None

    def check(self, settings: Mapping[str, Any], path: str | Path) -> None:
        """Raise :class:`ConfigError` naming the file and the field when :meth:`mismatch` finds a difference."""
        why = self.mismatch(settings)
        if why is not None:
            raise ConfigError(f"the brain slices do not match the settings: {why}", where=str(path),
                              fix="rebuild it with these settings (equipet-brain; snakemake reruns the brain rule "
                                  "when its settings change), or pass the brain file made with them")


def _brain_section(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The validated ``brain`` section, defaults filled, from a full config or the section itself."""
    import yaml

    from equipet.config import SCHEMA_DIR, validate

    # Only the brain section's schema is needed (and read), so the stage does not
    # depend on the other sections' schema files.
    schema = {"type": "object", "additionalProperties": False,
              "properties": {"brain": yaml.safe_load((SCHEMA_DIR / "brain.schema.yaml").read_text())}}
    section = settings["brain"] if "brain" in settings else settings
    return validate({"brain": copy.deepcopy(dict(section))}, source="settings", schema=schema)["brain"]


def _crop_box(footprint: np.ndarray) -> tuple[int, int, int]:
    """``(row0, col0, side)`` of the square around the footprint's circumscribed circle (see module doc)."""
    rows, cols = np.nonzero(footprint)
    cy = (rows.min() + rows.max()) / 2
    cx = (cols.min() + cols.max()) / 2
    radius = np.sqrt((rows - cy) ** 2 + (cols - cx) ** 2).max() + 0.5  # to the pixel's far edge
    side = int(np.ceil(2 * radius * (1 + CROP_MARGIN))) + 1
    return int(round(cy - (side - 1) / 2)), int(round(cx - (side - 1) / 2)), side


def _crop(img: np.ndarray, row0: int, col0: int, side: int) -> np.ndarray:
    """``img[row0:row0+side, col0:col0+side]``, zero-padded where the square leaves the image."""
    h, w = img.shape
    pad = ((max(0, -row0), max(0, row0 + side - h)), (max(0, -col0), max(0, col0 + side - w)))
    padded = np.pad(img, pad)
    r, c = row0 + pad[0][0], col0 + pad[1][0]
    return padded[r:r + side, c:c + side]


def brain_slices(settings: Mapping[str, Any]) -> BrainSlices:
    """Load the configured brain and prepare the training and held-out slices.

    ``settings`` is the full config (its ``brain`` section is used) or the ``brain``
    section alone; missing keys take the schema defaults. The steps are described in
    the module docstring.
    """
    from skimage.transform import resize

    cfg = _brain_section(settings)
    vol = load_brain_volume(cfg["source"], cfg["path"])
    where = f"brain.source: {cfg['source']}" + (f" ({cfg['path']})" if cfg["source"] == "file" else "")
    n = vol.shape[0]
    vmax = float(vol.max())
    if not np.isfinite(vol).all() or vmax <= 0:
        raise InputDataError("the image has no positive finite values", where=where,
                             fix="use an image whose brain has positive intensities")
    occupied = np.flatnonzero(vol.reshape(n, -1).any(axis=1))

    if cfg["slice"] is None:
        train_index = int(occupied[0] + occupied[-1]) // 2
    else:
        train_index = int(cfg["slice"])
        if not 0 <= train_index < n:
            raise ConfigError(f"slice {train_index} is outside the image's {n} axial slices",
                              where="brain.slice", fix=f"use an index in 0..{n - 1}, or null for the middle slice")
    offsets = [int(o) for o in cfg["heldout_slices"]]
    if n == 1 and offsets:
        raise ConfigError(f"{where} is a single 2-D image, so there are no slices to hold out",
                          where="brain.heldout_slices", fix="set brain.heldout_slices: [] (or use a 3-D volume)")
    bad = [o for o in offsets if not 0 <= train_index + o < n]
    if bad:
        raise ConfigError(
            f"offsets {bad} from training slice {train_index} fall outside the image's {n} axial slices",
            where="brain.heldout_slices",
            fix=f"use offsets in {-train_index}..{n - 1 - train_index}, or choose another brain.slice",
        )

    size = int(cfg["size"])
    box = _crop_box(vol.any(axis=0))
    disk = disk_mask(size)

    def prepare(k: int) -> np.ndarray:
        img = np.clip(vol[k] / vmax, 0.0, 1.0)
        img = resize(_crop(img, *box), (size, size), order=1, mode="constant",
                     anti_aliasing=True, preserve_range=True)
        return (np.clip(img, 0.0, 1.0) * disk).astype(np.float32)

    train = prepare(train_index)
    heldout = np.zeros((len(offsets), size, size), np.float32)
    for i, o in enumerate(offsets):
        heldout[i] = prepare(train_index + o)
    log.info("brain %s: %d slices of %s, training slice %d, held-out slices %s, crop %d px square -> %d px",
             cfg["source"], n, vol.shape[1:], train_index, [train_index + o for o in offsets], box[2], size)
    return BrainSlices(train=train, heldout=heldout, heldout_offsets=offsets, train_index=train_index,
                       source=str(cfg["source"]))


def write_preview(slices: BrainSlices, path: str | Path) -> None:
    """PNG of the training slice and the held-out slices side by side (atomic)."""
    from matplotlib.figure import Figure

    images = [(slices.train, f"train: slice {slices.train_index}")]
    images += [(img, f"held-out {o:+d}: slice {slices.train_index + o}")
               for img, o in zip(slices.heldout, slices.heldout_offsets)]
    fig = Figure(figsize=(2.6 * len(images), 2.9), layout="constrained")
    axes = fig.subplots(1, len(images), squeeze=False)[0]
    for ax, (img, title) in zip(axes, images):
        ax.imshow(img, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_axis_off()
    fig.suptitle(f"brain ({slices.source}), {slices.train.shape[0]} px", fontsize=10)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
