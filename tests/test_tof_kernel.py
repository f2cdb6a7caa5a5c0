"""The width of the projector's TOF kernel, measured, against the physical value.

The projector derives its Gaussian's sigma from the FWHM through ``FWHM_TO_SIGMA``; the per-event
reference projector shares that constant, so agreement with it says nothing about the width.
Here the FWHM is *measured* on the projector's TOF profile of a single hot voxel (half-maximum
crossings, no Gaussian assumed, no constant of the package used) and compared with
``c CTR / 2`` (and with the DOI-widened width), both computed in the test from literals.

Why the measurement is exact: with one hot voxel, the Joseph model picks it up only at the plane
of the LOR's dominant axis through that voxel (bilinear weights act within a plane), with a
weight that does not depend on the TOF offset. The profile over the offset is therefore the TOF
kernel itself, sampled at that plane's crossing: no voxel-box blur. The sweep of offsets is dense
(0.01 mm), so the linear interpolation of the crossings is good to ~1e-5 relative.
"""

import math

import numpy as np
import pytest
import torch

from equipet.reconstruction.projector import ImageGeometry, ListmodeTOFProjector

#: speed of light in mm/ns, typed here (not taken from the package)
C_MM_PER_NS = 299.792458
#: FWHM / sigma of a Gaussian, the literal 2 sqrt(2 ln 2)
FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))
#: the measured width must be within this of the physical one; the kernel 18% too wide (sigma
#: from FWHM / 2 instead of FWHM / 2.3548) is far outside
REL_TOL = 0.01

GEOM = ImageGeometry.centred((41, 21, 9), 0.8)
HOT = (30, 7, 5)                                     # a voxel off the centre on all three axes


def physical_fwhm_mm(ctr_ps: float) -> float:
    """``c CTR / 2``: a time difference dt moves the estimated annihilation point by c dt / 2."""
    return C_MM_PER_NS * (ctr_ps * 1e-3) / 2.0


def lor_through_hot_voxel(kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """An LOR passing (near) the hot voxel's centre; endpoints not symmetric about it."""
    centre = np.asarray(GEOM.origin_mm) + np.asarray(HOT) * np.asarray(GEOM.voxel_size_mm)
    if kind == "axis":                                # along x exactly through the centre
        point, d = centre, np.array([1.0, 0.0, 0.0])
    elif kind == "oblique":                           # x-dominant, off the centre by a fraction of a voxel
        point, d = centre + np.array([0.0, 0.25, -0.2]), np.array([1.0, 0.45, 0.12])
    else:                                             # z-dominant (steep)
        point, d = centre + np.array([0.15, -0.3, 0.0]), np.array([0.2, -0.1, 1.0])
    d = d / np.linalg.norm(d)
    p1, p2 = point + 230.0 * d, point - 170.0 * d
    return torch.tensor(p1[None], dtype=torch.float64), torch.tensor(p2[None], dtype=torch.float64)


def measured_profile_fwhm_mm(kernel_fwhm_mm: float, kind: str, step_mm: float = 0.01) -> tuple[float, float]:
    """(FWHM, peak position) of the projection of the hot voxel as a function of the TOF offset."""
    x = torch.zeros(GEOM.shape, dtype=torch.float64)
    x[HOT] = 1.0
    p1, p2 = lor_through_hot_voxel(kind)
    # the hot voxel sits 30 mm from the LOR midpoint: sweep the offset over +-80 mm around 0
    taus = torch.arange(-80.0, 80.0 + step_mm / 2, step_mm, dtype=torch.float64)
    n = len(taus)
    A = ListmodeTOFProjector(GEOM, p1.repeat(n, 1), p2.repeat(n, 1), taus, kernel_fwhm_mm)
    y = A.apply(x).numpy()
    t = taus.numpy()
    i = int(np.argmax(y))
    assert 0 < i < n - 1 and y[0] == 0.0 and y[-1] == 0.0, "profile not inside the sweep"
    half = 0.5 * y[i]
    left = i - int(np.argmax(y[i::-1] < half))       # first sample below half max, left of the peak
    right = i + int(np.argmax(y[i:] < half))
    t_left = t[left] + (half - y[left]) / (y[left + 1] - y[left]) * step_mm
    t_right = t[right - 1] + (half - y[right - 1]) / (y[right] - y[right - 1]) * step_mm
    return t_right - t_left, t[i]


def test_literal_constants():
    assert FWHM_PER_SIGMA == pytest.approx(2.354820045, abs=1e-9)
    assert physical_fwhm_mm(100.0) == pytest.approx(14.99, abs=0.005)


@pytest.mark.parametrize("kind", ["axis", "oblique", "steep"])
@pytest.mark.parametrize("ctr_ps", [50.0, 100.0, 200.0])
def test_projector_tof_profile_fwhm_is_c_ctr_over_2(ctr_ps, kind):
    """The TOF profile of a point source has FWHM c CTR / 2 (14.99 mm at 100 ps) along the LOR,
    within 1% (an 18% wider kernel fails), for axis-aligned, oblique and steep LORs."""
    expected = physical_fwhm_mm(ctr_ps)
    fwhm, _ = measured_profile_fwhm_mm(expected, kind)
    assert fwhm == pytest.approx(expected, rel=REL_TOL)


def test_tof_profile_peaks_at_the_source():
    """The profile whose width is measured is the hot voxel's: along the x-axis LOR it peaks at
    the voxel's signed distance from the LOR midpoint, positive towards p1 (here -30 mm)."""
    _, peak = measured_profile_fwhm_mm(physical_fwhm_mm(100.0), "axis")
    p1, p2 = (p.numpy()[0] for p in lor_through_hot_voxel("axis"))
    centre = np.asarray(GEOM.origin_mm) + np.asarray(HOT) * np.asarray(GEOM.voxel_size_mm)
    towards_p1 = (p1 - p2) / np.linalg.norm(p1 - p2)
    assert float((centre - 0.5 * (p1 + p2)) @ towards_p1) == pytest.approx(-30.0)
    assert peak == pytest.approx(-30.0, abs=0.01)


@pytest.mark.parametrize("ctr_ps,doi_sigma_mm", [(50.0, 2.64), (100.0, 2.64), (200.0, 5.0), (50.0, None)])
def test_doi_widened_kernel_fwhm(ctr_ps, doi_sigma_mm):
    """``tof_kernel_fwhm_mm`` adds the DOI sigma in quadrature, FWHM^2 = (c CTR/2)^2 + (2.3548 sigma)^2
    (without a measured sigma: layers of thickness d, uniform depths at both ends, sigma^2 = d^2/24),
    and the projector given that FWHM yields a measured profile of that FWHM."""
    from equipet.config import schema_defaults
    from equipet.reconstruction.mlem import tof_kernel_fwhm_mm
    from equipet.simulation.scanner import Scanner

    scanner = Scanner.from_config(schema_defaults("scanner"))
    mlem = {"tof_doi": True, "lor_endpoints": "crystal"}
    sigma = (doi_sigma_mm if doi_sigma_mm is not None
             else scanner.crystal_thickness_mm / scanner.doi_layers / math.sqrt(24.0))
    expected = math.sqrt(physical_fwhm_mm(ctr_ps) ** 2 + (FWHM_PER_SIGMA * sigma) ** 2)
    fwhm = tof_kernel_fwhm_mm(ctr_ps, scanner, mlem, doi_sigma_mm)
    assert fwhm == pytest.approx(expected, rel=1e-9)
    if (ctr_ps, doi_sigma_mm) == (50.0, 2.64):
        assert fwhm == pytest.approx(9.74, abs=0.005)          # the module doc's 7.49 -> 9.74 mm
    measured, _ = measured_profile_fwhm_mm(fwhm, "oblique")
    assert measured == pytest.approx(expected, rel=REL_TOL)
    # no widening without the DOI term
    assert tof_kernel_fwhm_mm(ctr_ps, scanner, {"tof_doi": False}, doi_sigma_mm) == pytest.approx(
        physical_fwhm_mm(ctr_ps), rel=1e-12)
