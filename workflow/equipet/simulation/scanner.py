"""The cylindrical PET scanner, defined once for macros, simulator and reconstruction.

Geometry follows GATE's ``cylindricalPET`` system so that our IDs mean what
GATE's do:

* ``rsectorID`` ``k`` in ``[0, modules_per_ring)``: the module's centre lies at azimuth
  ``phi_k = 2 pi k / modules_per_ring`` (GATE ring repeater, counter-clockwise from +x);
* ``moduleID`` ``m`` in ``[0, rings)``: the ring, ordered along +z (GATE cubicArray along Z);
* ``crystalID`` ``c = i_y + n_y * i_z``: the pixel in the module's cubicArray (x fastest,
  then y, then z; one pixel along x), ``i_y`` across the ring, ``i_z`` along z;
* ``layerID`` ``l`` in ``[0, doi_layers)``: the DOI layer, 0 innermost.

In the rsector's frame, x is radial, y transaxial and z axial. A crystal centre is

.. math::

    r_l = R_{in} + (l + 1/2)\\,d,\\quad t = (i_y - (n_y-1)/2)\\,p,\\quad
    z = (m - (n_r-1)/2)\\,n_z p + (i_z - (n_z-1)/2)\\,p

    (x, y) = (r_l\\cos\\phi_k - t\\sin\\phi_k,\\; r_l\\sin\\phi_k + t\\cos\\phi_k)

with pitch ``p``, layer thickness ``d = thickness / doi_layers`` and inner radius
``R_in``. All lengths are mm.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np


@dataclass(frozen=True)
class Scanner:
    """Cylindrical PET scanner geometry and detector response parameters (lengths in mm).

    >>> s = Scanner(rings=5, modules_per_ring=44, pixels_transaxial=24, pixels_axial=24,
    ...             pixel_size_mm=2.1, pixel_gap_mm=0.0, crystal_thickness_mm=20.0,
    ...             doi_layers=2, inner_radius_mm=None, material="LYSO",
    ...             energy_resolution_fwhm=0.11, energy_window_kev=(435.0, 585.0),
    ...             coincidence_window_ns=4.0)
    >>> round(s.radius_mm, 1), s.n_crystals
    (352.3, 253440)
    """

    rings: int
    modules_per_ring: int
    pixels_transaxial: int
    pixels_axial: int
    pixel_size_mm: float
    pixel_gap_mm: float
    crystal_thickness_mm: float
    doi_layers: int
    inner_radius_mm: float | None
    material: str
    energy_resolution_fwhm: float
    energy_window_kev: tuple[float, float]
    coincidence_window_ns: float

    @classmethod
    def from_config(cls, scanner: Mapping[str, Any]) -> "Scanner":
        """Build from the validated ``scanner`` config section."""
        fields = dict(scanner)
        fields["energy_window_kev"] = tuple(fields["energy_window_kev"])
        return cls(**fields)

    # ---- derived sizes -------------------------------------------------------------
    @property
    def pitch_mm(self) -> float:
        """Centre-to-centre distance of neighbouring pixels."""
        return self.pixel_size_mm + self.pixel_gap_mm

    @property
    def layer_thickness_mm(self) -> float:
        return self.crystal_thickness_mm / self.doi_layers

    @property
    def module_width_mm(self) -> float:
        """Transaxial extent of one module (GATE box y size)."""
        return self.pixels_transaxial * self.pitch_mm

    @property
    def module_length_mm(self) -> float:
        """Axial extent of one module (GATE box z size)."""
        return self.pixels_axial * self.pitch_mm

    @property
    def axial_length_mm(self) -> float:
        return self.rings * self.module_length_mm

    @property
    def radius_mm(self) -> float:
        """Distance from the axis to the inner face of a module.

        ``inner_radius_mm`` when given; else the smallest radius at which the inner
        corners of neighbouring modules meet, ``(w/2) / tan(pi / n_modules)``.
        """
        if self.inner_radius_mm is not None:
            return float(self.inner_radius_mm)
        return 0.5 * self.module_width_mm / math.tan(math.pi / self.modules_per_ring)

    @property
    def crystals_per_module(self) -> int:
        return self.pixels_transaxial * self.pixels_axial

    @property
    def n_crystals(self) -> int:
        """Number of (crystal, layer) detection elements."""
        return self.modules_per_ring * self.rings * self.crystals_per_module * self.doi_layers

    @property
    def rsector_angles_rad(self) -> np.ndarray:
        return 2.0 * np.pi * np.arange(self.modules_per_ring) / self.modules_per_ring

    # ---- IDs <-> positions ---------------------------------------------------------
    def flat_index(self, rsector, module, crystal, layer) -> np.ndarray:
        """One integer per detection element: ((rsector * rings + module) * crystals + crystal) * layers + layer."""
        rsector, module, crystal, layer = (np.asarray(a, dtype=np.int64) for a in (rsector, module, crystal, layer))
        return ((rsector * self.rings + module) * self.crystals_per_module + crystal) * self.doi_layers + layer

    def split_index(self, flat) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Inverse of :meth:`flat_index`: ``(rsector, module, crystal, layer)``."""
        flat = np.asarray(flat, dtype=np.int64)
        layer = flat % self.doi_layers
        rest = flat // self.doi_layers
        crystal = rest % self.crystals_per_module
        rest = rest // self.crystals_per_module
        return rest // self.rings, rest % self.rings, crystal, layer

    def crystal_centres_mm(self, rsector, module, crystal, layer) -> np.ndarray:
        """Centre of each (rsector, module, crystal, layer) element, shape ``(..., 3)``, mm."""
        rsector, module, crystal, layer = np.broadcast_arrays(
            *(np.asarray(a, dtype=np.int64) for a in (rsector, module, crystal, layer)))
        iy = crystal % self.pixels_transaxial
        iz = crystal // self.pixels_transaxial
        r = self.radius_mm + (layer + 0.5) * self.layer_thickness_mm
        t = (iy - (self.pixels_transaxial - 1) / 2.0) * self.pitch_mm
        z = ((module - (self.rings - 1) / 2.0) * self.module_length_mm
             + (iz - (self.pixels_axial - 1) / 2.0) * self.pitch_mm)
        phi = 2.0 * np.pi * rsector / self.modules_per_ring
        c, s = np.cos(phi), np.sin(phi)
        return np.stack([r * c - t * s, r * s + t * c, z], axis=-1).astype(np.float64)

    def all_crystal_centres_mm(self) -> np.ndarray:
        """Centres of every detection element in :meth:`flat_index` order, shape ``(n_crystals, 3)``."""
        return self.crystal_centres_mm(*self.split_index(np.arange(self.n_crystals)))

    def locate(self, points_mm: np.ndarray) -> tuple[np.ndarray, ...]:
        """Detection element containing each point, or ``-1`` IDs for points outside every crystal.

        Returns ``(rsector, module, crystal, layer)`` arrays. A point belongs to the module
        whose azimuth is nearest to its own, then to the pixel and layer by its local
        coordinates; points in gaps, in front of or behind the crystals get ``-1``.
        """
        p = np.asarray(points_mm, dtype=np.float64)
        x, y, z = p[..., 0], p[..., 1], p[..., 2]
        n = self.modules_per_ring
        step = 2.0 * np.pi / n
        rsector = np.mod(np.rint(np.arctan2(y, x) / step), n).astype(np.int64)
        phi = rsector * step
        c, s = np.cos(phi), np.sin(phi)
        radial = x * c + y * s
        trans = -x * s + y * c
        depth = radial - self.radius_mm
        layer = np.floor(depth / self.layer_thickness_mm).astype(np.int64)
        iy = np.floor(trans / self.pitch_mm + self.pixels_transaxial / 2.0).astype(np.int64)
        zz = z + self.axial_length_mm / 2.0
        module = np.floor(zz / self.module_length_mm).astype(np.int64)
        iz = np.floor((zz - module * self.module_length_mm) / self.pitch_mm).astype(np.int64)
        # inside a pixel, not in the reflector gap
        u = trans / self.pitch_mm + self.pixels_transaxial / 2.0 - iy
        v = (zz - module * self.module_length_mm) / self.pitch_mm - iz
        half_gap = 0.5 * self.pixel_gap_mm / self.pitch_mm
        inside = ((layer >= 0) & (layer < self.doi_layers)
                  & (iy >= 0) & (iy < self.pixels_transaxial)
                  & (module >= 0) & (module < self.rings)
                  & (iz >= 0) & (iz < self.pixels_axial)
                  & (u >= half_gap) & (u <= 1 - half_gap) & (v >= half_gap) & (v <= 1 - half_gap))
        crystal = iy + self.pixels_transaxial * iz
        out = [np.where(inside, a, -1) for a in (rsector, module, crystal, layer)]
        return tuple(out)
