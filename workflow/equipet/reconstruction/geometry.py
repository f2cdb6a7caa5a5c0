"""Geometry shared by the reconstruction stages: the image grid of the ``mlem`` settings, which LORs
cross the image box, the rsector pairs that can reach it, and the settings hash of cached outputs."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import numpy as np

from equipet.reconstruction.projector import ImageGeometry
from equipet.simulation.scanner import Scanner


def image_geometry(mlem: Mapping[str, Any]) -> ImageGeometry:
    """The reconstruction grid from the ``mlem`` section (centred, cubic voxels)."""
    return ImageGeometry.from_fov(mlem["fov_mm"], mlem["voxel_size_mm"])


def lor_hits_box(p1: np.ndarray, p2: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Whether each segment ``p1 -> p2`` intersects the axis-aligned box ``[lo, hi]`` (slab test)."""
    d = p2 - p1
    with np.errstate(divide="ignore", invalid="ignore"):
        t1 = (lo - p1) / d
        t2 = (hi - p1) / d
    tmin = np.where(d == 0, np.where((p1 >= lo) & (p1 <= hi), -np.inf, np.inf), np.minimum(t1, t2))
    tmax = np.where(d == 0, np.where((p1 >= lo) & (p1 <= hi), np.inf, -np.inf), np.maximum(t1, t2))
    t_enter = np.maximum(tmin.max(axis=1), 0.0)
    t_exit = np.minimum(tmax.min(axis=1), 1.0)
    return t_enter <= t_exit


def box_with_halo(geometry: ImageGeometry) -> tuple[np.ndarray, np.ndarray]:
    org = np.asarray(geometry.origin_mm)
    vox = np.asarray(geometry.voxel_size_mm)
    n = np.asarray(geometry.shape)
    return org - vox, org + n * vox          # one voxel of interpolation halo each side


def candidate_rsector_offsets(scanner: Scanner, radius_mm: float) -> np.ndarray:
    """Rsector offsets whose crystal-centre LORs can pass within ``radius_mm`` of the axis (transaxially)."""
    n_t, n_l = scanner.pixels_transaxial, scanner.doi_layers
    iy, layer = np.meshgrid(np.arange(n_t), np.arange(n_l), indexing="ij")
    iy, layer = iy.ravel(), layer.ravel()
    a = scanner.crystal_centres_mm(0, 0, iy, layer)[:, :2]
    out = []
    for delta in range(1, scanner.modules_per_ring):
        b = scanner.crystal_centres_mm(delta, 0, iy, layer)[:, :2]
        cross = np.abs(a[:, None, 0] * b[None, :, 1] - b[None, :, 0] * a[:, None, 1])
        dist = cross / np.linalg.norm(b[None, :, :] - a[:, None, :], axis=-1)
        if dist.min() <= radius_mm:
            out.append(delta)
    return np.asarray(out, dtype=np.int64)


def key_hash(key: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def sample_pairs(scanner: Scanner, offsets: np.ndarray, n: int, rng: np.random.Generator):
    per_rsector = scanner.rings * scanner.crystals_per_module * scanner.doi_layers
    i = rng.integers(0, scanner.n_crystals, n)
    rs_i = i // per_rsector
    rs_j = (rs_i + offsets[rng.integers(0, len(offsets), n)]) % scanner.modules_per_ring
    j = rs_j * per_rsector + rng.integers(0, per_rsector, n)
    return i, j
