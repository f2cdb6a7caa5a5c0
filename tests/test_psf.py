"""The measured point-source response (equipet.reconstruction.psf) and the CRC of the truth blurred with it."""

import numpy as np
import pytest
import torch

from equipet.config import schema_defaults
from equipet.reconstruction.mlem import sensitivity_image, tof_kernel_fwhm_mm
from equipet.reconstruction.projector import ImageGeometry
from equipet.reconstruction.psf import blurred_truth_rows, measure_psf
from equipet.reconstruction.recon_metrics import phantom_rois, phantom_truth
from test_mlem import SMALL, expected_point_fwhm_mm

GEOM = ImageGeometry.from_fov((40.0, 40.0, 6.4), 0.8)
POSITIONS = {"centre": (0.0, 0.0, 0.0), "rods_radius": (10.0, 0.0, 0.0)}
# the estimate of tests/test_mlem.py assumes a uniform depth within a DOI layer and no
# inter-crystal scatter; the Monte Carlo has an exponential depth and inter-crystal scatter
TOLERANCE = 0.25


@pytest.fixture(scope="module")
def psf():
    torch.set_num_threads(1)
    mlem = schema_defaults("mlem")
    mlem.update(iterations=10, subsets=1, attenuation=False)
    mlem["psf"].update(decays=300_000)
    acq = {"acollinearity_fwhm_deg": 0.5}
    sens, _ = sensitivity_image(SMALL, GEOM, 60_000, batches=2, seed=0, progress=False)
    fwhm = tof_kernel_fwhm_mm(200.0, SMALL, mlem)
    return measure_psf(SMALL, {"material": "Air"}, acq, mlem, torch.tensor(sens), GEOM, 200.0, fwhm,
                       torch.device("cpu"), POSITIONS)


def test_point_source_fwhm_matches_the_resolution_estimate(psf):
    """A point source simulated by the embedded Monte Carlo (air, 0.5 deg acollinearity) and
    reconstructed by 10 MLEM iterations at 200 ps: the fitted in-plane FWHM (voxel box removed)
    at the centre and at 10 mm lies within TOLERANCE of expected_point_fwhm_mm (voxel term 0);
    the fitted centroid lies within 0.4 mm of the source."""
    for name, pos in POSITIONS.items():
        fit = psf["positions"][name]
        expected = expected_point_fwhm_mm(SMALL, float(np.hypot(*pos[:2])), 0.5, 0.0, doi_depth_spread_mm=10.0)
        print(f"{name}: {fit['events']} events, FWHM x/y/z {np.round(fit['fwhm_mm'], 3)} mm, estimate {expected:.3f} mm")
        assert fit["events"] > 5000
        for f in fit["fwhm_mm"][:2]:
            assert f == pytest.approx(expected, rel=TOLERANCE)
        assert 0 < fit["fwhm_mm"][2] < 4 * expected
        assert fit["centroid_x_mm"] == pytest.approx(pos[0], abs=0.4)
        assert fit["centroid_y_mm"] == pytest.approx(pos[1], abs=0.4)


def test_blurred_truth_crc_is_below_one_and_rises_with_rod_size(psf):
    """The phantom's truth blurred with each measured PSF: crc_blurred_truth <= 1 for every rod, rising
    strictly with the rod diameter; crc_fraction is the MLEM CRC over the blurred truth's."""
    g = ImageGeometry.from_fov((104.0, 104.0, 12.8), 0.8)
    metrics = schema_defaults("mlem")["metrics"]
    rods, bkg, ratio = phantom_rois({}, g, metrics)
    mlem_crc = {d: 0.5 for d in rods}
    rows = blurred_truth_rows(psf, phantom_truth({}, g), rods, bkg, ratio, g, mlem_crc)
    for name in POSITIONS:
        sub = sorted((r for r in rows if r["psf_position"] == name), key=lambda r: r["rod_mm"])
        ceil = np.array([r["crc_blurred_truth"] for r in sub])
        print(name, [r["rod_mm"] for r in sub], np.round(ceil, 3))
        assert ceil.max() <= 1.0 and np.all(np.diff(ceil) > 0)
        for r in sub:
            assert r["crc_fraction"] == pytest.approx(0.5 / r["crc_blurred_truth"])


@pytest.mark.parametrize("fwhm", [1.5, 2.0, 3.0])
def test_fit_recovers_a_voxel_averaged_gaussian_and_refuses_an_undetermined_width(fwhm, recwarn):
    """A separable image whose x and y profiles are voxel-averaged Gaussians of a known FWHM and
    centroid (0.8 mm voxels; each voxel's value the Gaussian's probability mass over the voxel,
    from the normal CDF, independent of the fit's own model): the fit returns them to 1e-6 mm.
    Its z profile is one plane: no width is determined by it (singular fit), so the z FWHM is NaN
    and no covariance warning escapes; with a voxel-averaged Gaussian plus background in z
    instead, z is fitted as well."""
    from scipy.stats import norm

    from equipet.reconstruction.psf import fit_fwhm_mm

    g = ImageGeometry.centred((31, 31, 9), 0.8)
    axis = [g.origin_mm[a] + 0.8 * np.arange(n) for a, n in enumerate(g.shape)]
    sigma = fwhm / (2.0 * np.sqrt(2.0 * np.log(2.0)))

    def voxel_mass(x, mu):
        return norm.cdf(x + 0.4, mu, sigma) - norm.cdf(x - 0.4, mu, sigma)

    px = voxel_mass(axis[0], 0.13)
    py = voxel_mass(axis[1], -0.21)
    spike = (np.arange(9) == 4).astype(float)
    fit = fit_fwhm_mm(px[:, None, None] * py[None, :, None] * spike, g, 6.0)
    assert fit["fwhm_mm"][:2] == pytest.approx([fwhm, fwhm], abs=1e-6)
    assert (fit["centroid_x_mm"], fit["centroid_y_mm"]) == pytest.approx((0.13, -0.21), abs=1e-6)
    assert np.isnan(fit["fwhm_mm"][2]) and "centroid_z_mm" not in fit
    assert not [w for w in recwarn if "Covariance" in str(w.message)]
    pz = voxel_mass(axis[2], 0.05)
    fit = fit_fwhm_mm(px[:, None, None] * py[None, :, None] * pz + 0.01, g, 6.0)
    assert fit["fwhm_mm"] == pytest.approx([fwhm] * 3, abs=1e-6)
    assert fit["centroid_z_mm"] == pytest.approx(0.05, abs=1e-6)
