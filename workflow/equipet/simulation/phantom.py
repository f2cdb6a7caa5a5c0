"""The hot-rod (Derenzo-like) phantom of the paper (II-B, Fig. 1), defined once.

Geometry (all lengths mm, the phantom axis is the scanner's z axis, centred at the origin):

* a water cylinder of diameter ``diameter_mm`` and length ``length_mm`` ("positioned in water");
* inside it, a warm disk of diameter ``active_diameter_mm`` and length ``rod_length_mm``
  holding the rods, at ``background_ratio`` times the rods' concentration;
* a central cold region (water, no activity) of diameter ``cold_diameter_mm``;
* six 60-degree sectors of hot rods. Sector ``k`` has its axis at azimuth
  ``90 deg + 60 k deg`` (counter-clockwise from +x, sector 0 on +y) and holds rods of diameter
  ``d_k`` on a triangular lattice of pitch ``s = spacing_factor * d_k``: row ``j`` lies at
  distance ``r_j = r_0 + j s sqrt(3)/2`` from the centre and holds ``j + 1`` rods at lateral
  offsets ``(i - j/2) s``. The apex rod sits just outside the cold region,
  ``r_0 = R_cold + margin + d/2``; a lattice triangle has a 30-degree half angle, so every rod
  stays inside its sector; rows are filled while the rods fit in the warm disk
  (``|c| + d/2 <= R_active - margin``).

Activity concentration ``A(x)`` in Bq/mL: ``rod_activity`` in rods, ``background_ratio *
rod_activity`` in the rest of the warm disk, 0 in the cold region and the surrounding water.
Attenuation ``mu(x)`` at 511 keV: ``mu_water_per_mm`` in the water cylinder, 0 outside (air).

>>> ph = HotRodPhantom.from_config({})
>>> [len(ph.rods_in_sector(k)) for k in range(6)][:2]
[6, 6]
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from equipet import config

log = logging.getLogger("equipet.simulation.phantom")

ML_PER_MM3 = 1e-3  # 1 mL = 1000 mm^3


@dataclass(frozen=True)
class PhantomMaps:
    """Voxelised ground truth on a grid centred on the phantom.

    Arrays are indexed ``[ix, iy, iz]`` (x fastest-varying last, NIfTI order); voxel ``i``
    along an axis of ``n`` voxels has its centre at ``(i - (n - 1)/2) * voxel_size_mm``.
    """

    activity_bq_per_ml: np.ndarray
    mu_per_mm: np.ndarray
    voxel_size_mm: float

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.activity_bq_per_ml.shape)  # type: ignore[return-value]

    def axis_centres_mm(self, axis: int) -> np.ndarray:
        n = self.shape[axis]
        return (np.arange(n) - (n - 1) / 2.0) * self.voxel_size_mm

    @property
    def affine(self) -> np.ndarray:
        """Voxel index -> mm (NIfTI affine)."""
        a = np.diag([self.voxel_size_mm] * 3 + [1.0])
        a[:3, 3] = [-(n - 1) / 2.0 * self.voxel_size_mm for n in self.shape]
        return a


@dataclass(frozen=True)
class HotRodPhantom:
    """Analytic hot-rod phantom; see the module docstring for the geometry."""

    rod_diameters_mm: tuple[float, ...]
    spacing_factor: float
    rod_length_mm: float
    rod_activity_bq_per_ml: float
    background_ratio: float
    cold_diameter_mm: float
    active_diameter_mm: float
    diameter_mm: float
    length_mm: float
    sector_margin_mm: float
    material: str
    mu_water_per_mm: float
    truth_voxel_size_mm: float = 0.8
    _rods: np.ndarray = field(init=False, repr=False, compare=False)
    _tree: Any = field(init=False, repr=False, compare=False)
    _clear: Any = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        from scipy.spatial import cKDTree

        object.__setattr__(self, "_rods", self._layout_rods())
        object.__setattr__(self, "_tree", cKDTree(self._rods[:, :2]) if len(self._rods) else None)
        object.__setattr__(self, "_clear", self._clear_cells())

    _CELL_MM = 1.0

    def _clear_cells(self) -> np.ndarray:
        """Boolean grid of 1 mm cells (over the active disk) that no rod touches: a fast path for rod_index."""
        half = self.active_diameter_mm / 2.0 + 1.0
        n = int(math.ceil(2 * half / self._CELL_MM))
        c = -half + (np.arange(n) + 0.5) * self._CELL_MM
        X, Y = np.meshgrid(c, c, indexing="ij")
        if self._tree is None:
            return np.ones((n, n), dtype=bool)
        k = min(4, len(self._rods))
        dist, idx = self._tree.query(np.stack([X.ravel(), Y.ravel()], axis=1), k=k)
        dist = np.asarray(dist).reshape(-1, k)
        idx = np.asarray(idx).reshape(-1, k)
        margin = dist - self._rods[idx, 2] / 2.0 - self._CELL_MM * math.sqrt(0.5) - 1e-9
        # k nearest centres suffice: any other rod is farther than these (all rods < 2 * spacing apart)
        return (margin > 0).all(axis=1).reshape(n, n)

    @classmethod
    def from_config(cls, phantom: Mapping[str, Any], activity_scale: float = 1.0) -> "HotRodPhantom":
        """Build from the ``phantom`` config section (missing keys take schema defaults)."""
        fields = config.schema_defaults("phantom")
        fields.update(phantom)
        fields["rod_diameters_mm"] = tuple(float(d) for d in fields["rod_diameters_mm"])
        fields["rod_activity_bq_per_ml"] = float(fields["rod_activity_bq_per_ml"]) * activity_scale
        return cls(**fields)

    # ---- geometry ---------------------------------------------------------------------
    @property
    def mu_per_mm(self) -> float:
        """Attenuation of the phantom material at 511 keV (0 for Air)."""
        return self.mu_water_per_mm if self.material == "Water" else 0.0

    @property
    def background_bq_per_ml(self) -> float:
        return self.rod_activity_bq_per_ml * self.background_ratio

    @staticmethod
    def sector_angle_rad(k: int) -> float:
        return math.pi / 2 + k * math.pi / 3

    def _layout_rods(self) -> np.ndarray:
        rows = []
        r_cold = self.cold_diameter_mm / 2.0
        r_max = self.active_diameter_mm / 2.0 - self.sector_margin_mm
        for k, d in enumerate(self.rod_diameters_mm):
            s = self.spacing_factor * d
            r0 = max(r_cold + self.sector_margin_mm + d / 2.0, d + self.sector_margin_mm)
            a = self.sector_angle_rad(k)
            u = np.array([math.cos(a), math.sin(a)])
            v = np.array([-math.sin(a), math.cos(a)])
            j = 0
            while True:
                rj = r0 + j * s * math.sqrt(3) / 2.0
                if rj + d / 2.0 > r_max:
                    break
                for i in range(j + 1):
                    lat = (i - j / 2.0) * s
                    if math.hypot(rj, lat) + d / 2.0 <= r_max:
                        c = rj * u + lat * v
                        rows.append((c[0], c[1], d, k))
                j += 1
        return np.array(rows, dtype=np.float64).reshape(-1, 4)

    @property
    def rods(self) -> np.ndarray:
        """Rod table, shape ``(n_rods, 4)``: centre x, centre y, diameter (mm), sector index."""
        return self._rods.copy()

    def rods_in_sector(self, k: int) -> np.ndarray:
        return self._rods[self._rods[:, 3] == k]

    def rod_volume_mm3(self) -> np.ndarray:
        return math.pi * (self._rods[:, 2] / 2.0) ** 2 * self.rod_length_mm

    def background_volume_mm3(self) -> float:
        disk = math.pi * ((self.active_diameter_mm / 2) ** 2 - (self.cold_diameter_mm / 2) ** 2)
        return disk * self.rod_length_mm - float(self.rod_volume_mm3().sum())

    def total_activity_bq(self) -> float:
        """Total activity in the phantom, Bq."""
        return ML_PER_MM3 * (self.rod_activity_bq_per_ml * float(self.rod_volume_mm3().sum())
                             + self.background_bq_per_ml * self.background_volume_mm3())

    # ---- point-wise description ---------------------------------------------------------
    def rod_index(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Index of the rod containing each (x, y), or -1 (ignores z)."""
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        out = np.full(x.shape, -1, dtype=np.int64)
        if len(self._rods) == 0:
            return out
        xf, yf = x.ravel(), y.ravel()
        flat = out.ravel()
        n = self._clear.shape[0]
        half = n * self._CELL_MM / 2.0
        ix = np.floor((xf + half) / self._CELL_MM).astype(np.int64)
        iy = np.floor((yf + half) / self._CELL_MM).astype(np.int64)
        ing = (ix >= 0) & (ix < n) & (iy >= 0) & (iy < n)
        check = ~ing.copy()
        check[ing] = ~self._clear[ix[ing], iy[ing]]
        sel = np.flatnonzero(check)
        if sel.size:
            k = min(4, len(self._rods))
            dist, idx = self._tree.query(np.stack([xf[sel], yf[sel]], axis=1), k=k)
            dist = np.asarray(dist).reshape(-1, k)
            idx = np.asarray(idx).reshape(-1, k)
            inside = dist <= (self._rods[idx, 2] / 2.0)
            hit = inside.any(axis=1)
            first = np.argmax(inside, axis=1)
            flat[sel[hit]] = idx[hit, first[hit]]
        return flat.reshape(x.shape)

    def activity_at(self, points_mm: np.ndarray) -> np.ndarray:
        """Activity concentration (Bq/mL) at each point, shape ``(..., 3)`` -> ``(...)``."""
        p = np.asarray(points_mm, dtype=np.float64)
        x, y, z = p[..., 0], p[..., 1], p[..., 2]
        r2 = x * x + y * y
        in_slab = np.abs(z) <= self.rod_length_mm / 2.0
        in_disk = (r2 <= (self.active_diameter_mm / 2) ** 2) & in_slab
        cold = r2 < (self.cold_diameter_mm / 2) ** 2
        rod = self.rod_index(x, y) >= 0
        a = np.where(in_disk & ~cold, self.background_bq_per_ml, 0.0)
        return np.where(in_disk & rod, self.rod_activity_bq_per_ml, a)

    def mu_at(self, points_mm: np.ndarray) -> np.ndarray:
        """Linear attenuation (1/mm, 511 keV) at each point."""
        p = np.asarray(points_mm, dtype=np.float64)
        inside = ((p[..., 0] ** 2 + p[..., 1] ** 2 <= (self.diameter_mm / 2) ** 2)
                  & (np.abs(p[..., 2]) <= self.length_mm / 2))
        return np.where(inside, self.mu_per_mm, 0.0)

    # ---- sampling decays ----------------------------------------------------------------
    def sample_decay_positions(self, n: int, rng: np.random.Generator, return_region: bool = False):
        """``n`` annihilation points (mm) drawn from the activity distribution, shape ``(n, 3)``.

        Exact: a region (each rod, the background) is chosen with probability proportional to
        its activity; rods are sampled uniformly in their cylinder, the background uniformly in
        the warm annulus with rejection of points inside rods. Positron range is neglected
        (as for GATE's ``backtoback`` source). With ``return_region`` also returns the region of
        each point: the rod index, or ``n_rods`` for the background (GATE's ``sourceID`` when the
        macros list one source per rod, then the background).
        """
        vol = self.rod_volume_mm3()
        w = np.concatenate([vol * self.rod_activity_bq_per_ml,
                            [self.background_volume_mm3() * self.background_bq_per_ml]])
        if w.sum() <= 0:
            raise ValueError("the phantom has no activity")
        region = rng.choice(len(w), size=n, p=w / w.sum())
        out = np.empty((n, 3))
        out[:, 2] = (rng.random(n) - 0.5) * self.rod_length_mm
        is_rod = region < len(vol)
        m = int(is_rod.sum())
        rr = self._rods[region[is_rod]]
        rad = rr[:, 2] / 2.0 * np.sqrt(rng.random(m))
        ang = 2 * np.pi * rng.random(m)
        out[is_rod, 0] = rr[:, 0] + rad * np.cos(ang)
        out[is_rod, 1] = rr[:, 1] + rad * np.sin(ang)
        idx = np.flatnonzero(~is_rod)
        r_in2, r_out2 = (self.cold_diameter_mm / 2) ** 2, (self.active_diameter_mm / 2) ** 2
        while len(idx):
            k = len(idx)
            rad = np.sqrt(r_in2 + (r_out2 - r_in2) * rng.random(k))
            ang = 2 * np.pi * rng.random(k)
            x, y = rad * np.cos(ang), rad * np.sin(ang)
            ok = self.rod_index(x, y) < 0
            out[idx[ok], 0] = x[ok]
            out[idx[ok], 1] = y[ok]
            idx = idx[~ok]
        if return_region:
            return out, region
        return out

    # ---- voxelisation ---------------------------------------------------------------------
    def default_shape(self, voxel_size_mm: float) -> tuple[int, int, int]:
        """Smallest grid covering the water cylinder."""
        nxy = int(math.ceil(self.diameter_mm / voxel_size_mm))
        nz = int(math.ceil(self.length_mm / voxel_size_mm))
        return nxy, nxy, nz

    def voxelise(self, voxel_size_mm: float, shape: Sequence[int] | None = None,
                 fov_mm: Sequence[float] | None = None, supersample: int = 4) -> PhantomMaps:
        """Ground-truth activity (Bq/mL) and attenuation (1/mm at 511 keV) maps.

        Parameters
        ----------
        voxel_size_mm:
            cubic voxel side, mm.
        shape:
            ``(nx, ny, nz)`` voxels; or give ``fov_mm`` = ``(fx, fy, fz)`` (voxels =
            ``ceil(f / voxel)``); default covers the water cylinder. The grid is centred on
            the origin (see :class:`PhantomMaps`).
        supersample:
            sub-samples per voxel side in-plane; along z the rod/cylinder overlap is exact.
            Each value is the volume average over the voxel (partial volume).
        """
        if shape is None:
            shape = (self.default_shape(voxel_size_mm) if fov_mm is None
                     else tuple(int(math.ceil(f / voxel_size_mm)) for f in fov_mm))
        nx, ny, nz = (int(n) for n in shape)
        ss = int(supersample)
        sub = (np.arange(ss) + 0.5) / ss - 0.5
        cx = (np.arange(nx) - (nx - 1) / 2.0) * voxel_size_mm
        cy = (np.arange(ny) - (ny - 1) / 2.0) * voxel_size_mm
        xs = (cx[:, None] + sub[None, :] * voxel_size_mm).ravel()
        ys = (cy[:, None] + sub[None, :] * voxel_size_mm).ravel()
        X, Y = np.meshgrid(xs, ys, indexing="ij")
        r2 = X * X + Y * Y
        rod = self.rod_index(X, Y) >= 0
        in_disk = r2 <= (self.active_diameter_mm / 2) ** 2
        cold = r2 < (self.cold_diameter_mm / 2) ** 2
        act2 = np.where(in_disk & ~cold, self.background_bq_per_ml, 0.0)
        act2 = np.where(in_disk & rod, self.rod_activity_bq_per_ml, act2)
        water2 = (r2 <= (self.diameter_mm / 2) ** 2).astype(np.float64)
        act2 = act2.reshape(nx, ss, ny, ss).mean(axis=(1, 3))
        water2 = water2.reshape(nx, ss, ny, ss).mean(axis=(1, 3))
        cz = (np.arange(nz) - (nz - 1) / 2.0) * voxel_size_mm

        def overlap(half: float) -> np.ndarray:
            lo = np.maximum(cz - voxel_size_mm / 2, -half)
            hi = np.minimum(cz + voxel_size_mm / 2, half)
            return np.clip(hi - lo, 0, None) / voxel_size_mm

        act = act2[:, :, None] * overlap(self.rod_length_mm / 2)[None, None, :]
        mu = self.mu_per_mm * water2[:, :, None] * overlap(self.length_mm / 2)[None, None, :]
        return PhantomMaps(act.astype(np.float32), mu.astype(np.float32), float(voxel_size_mm))

    # ---- figure -------------------------------------------------------------------------
    def plot_fig1(self, path: str | Path, voxel_size_mm: float = 0.25) -> None:
        """Fig. 1 equivalent: the central transaxial slice of the activity, sectors labelled."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from equipet.files import atomic_path

        n = int(math.ceil(self.diameter_mm / voxel_size_mm))
        maps = self.voxelise(voxel_size_mm, shape=(n, n, 1), supersample=2)
        half = n * voxel_size_mm / 2
        fig, ax = plt.subplots(figsize=(5.2, 4.4), dpi=150)
        im = ax.imshow(maps.activity_bq_per_ml[:, :, 0].T, origin="lower", cmap="hot",
                       extent=(-half, half, -half, half))
        ax.add_patch(plt.Circle((0, 0), self.diameter_mm / 2, fill=False, color="tab:blue", lw=1))
        r_lab = 0.5 * (self.cold_diameter_mm / 2 + self.active_diameter_mm / 2)
        for k, d in enumerate(self.rod_diameters_mm):
            a = self.sector_angle_rad(k)
            ax.text(1.2 * r_lab * math.cos(a), 1.2 * r_lab * math.sin(a) - 0, f"{d:g} mm",
                    color="white", ha="center", va="center", fontsize=7,
                    bbox=dict(fc="black", alpha=0.4, lw=0, pad=1))
        ax.set_xlabel("x (mm)")
        ax.set_ylabel("y (mm)")
        ax.set_title(f"Hot-rod phantom, {len(self._rods)} rods, {self.rod_length_mm:g} mm long")
        fig.colorbar(im, ax=ax, label="activity (Bq/mL)")
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=Path(path).suffix.lstrip(".") or "png")
        plt.close(fig)


def hot_rod_phantom(phantom: Mapping[str, Any] | None = None, activity_scale: float = 1.0) -> HotRodPhantom:
    """The paper's phantom from the ``phantom`` config section (defaults when omitted)."""
    return HotRodPhantom.from_config(phantom or {}, activity_scale=activity_scale)


def save_maps_nifti(maps: PhantomMaps, activity_path: str | Path, mu_path: str | Path) -> None:
    import nibabel as nib

    from equipet.files import atomic_path

    for arr, path in ((maps.activity_bq_per_ml, activity_path), (maps.mu_per_mm, mu_path)):
        img = nib.Nifti1Image(arr, maps.affine)
        img.header.set_xyzt_units("mm")
        with atomic_path(path) as tmp:
            nib.save(img, str(tmp))
