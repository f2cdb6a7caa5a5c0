"""Tests of equipet.metrics: known values, masks, tidy rows."""

from __future__ import annotations

import csv
import io
import math
import warnings

import numpy as np
import pytest

from equipet.metrics import ROW_COLUMNS, image_metrics, tidy_rows


@pytest.fixture
def truth() -> np.ndarray:
    yy, xx = np.mgrid[:48, :48]
    return np.sin(xx / 5.0) * np.cos(yy / 7.0) + 0.1 * np.random.default_rng(0).random((48, 48))


def test_identical_images(truth):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no divide-by-zero warning leaks out
        m = image_metrics(truth, truth)
    assert m == {"psnr": math.inf, "ssim": 1.0, "nrmse": 0.0}


def test_constant_offset_has_analytic_psnr_and_nrmse(truth):
    c = 0.05
    r = truth.max() - truth.min()
    m = image_metrics(truth + c, truth)
    assert m["psnr"] == pytest.approx(10 * np.log10(r**2 / c**2), rel=1e-12)
    assert m["nrmse"] == pytest.approx(c * np.sqrt(truth.size) / np.linalg.norm(truth), rel=1e-12)
    assert 0 < m["ssim"] < 1
    # a worse estimate scores worse on every metric
    w = image_metrics(truth + 4 * c, truth)
    assert w["psnr"] < m["psnr"] and w["ssim"] < m["ssim"] and w["nrmse"] > m["nrmse"]


def test_data_range_comes_from_truth_not_estimate(truth):
    """Scaling the estimate's range must not change the scale of the PSNR."""
    noise = np.random.default_rng(1).normal(0, 0.02, truth.shape)
    noise[0, 0] = 50.0  # one wild pixel widens the estimate's range, not the truth's
    m = image_metrics(truth + noise, truth)
    mse = np.mean(noise**2)
    assert m["psnr"] == pytest.approx(10 * np.log10((truth.max() - truth.min()) ** 2 / mse))


def test_mask_restricts_to_masked_pixels(truth):
    est = truth.copy()
    mask = np.zeros(truth.shape, bool)
    mask[:, :24] = True
    est[:, 24:] += 1.0  # errors only outside the mask
    inside = image_metrics(est, truth, mask=mask)
    assert inside["psnr"] == math.inf and inside["nrmse"] == 0.0
    full = image_metrics(est, truth)
    assert full["psnr"] < 20 and full["nrmse"] > 0.1 and full["ssim"] < inside["ssim"]
    # SSIM over the mask is the full SSIM map averaged over it: the columns next to the
    # edited half see its windows (7 x 7), so it is below 1, but above the full-image SSIM
    assert full["ssim"] < inside["ssim"] < 1.0
    far = mask.copy()
    far[:, 20:] = False  # at least 4 columns away from the edit: windows unaffected
    assert image_metrics(est, truth, mask=far)["ssim"] == pytest.approx(1.0)
    # masked errors count: an error inside the mask is seen
    est2 = truth.copy()
    est2[:, :24] += 0.1
    assert image_metrics(est2, truth, mask=mask)["psnr"] == pytest.approx(
        10 * np.log10((truth.max() - truth.min()) ** 2 / 0.01))


def test_invalid_inputs(truth):
    with pytest.raises(ValueError, match="shape"):
        image_metrics(truth[:-1], truth)
    with pytest.raises(ValueError, match="constant"):
        image_metrics(truth, np.ones_like(truth))
    with pytest.raises(ValueError, match="boolean"):
        image_metrics(truth, truth, mask=np.ones(truth.shape))
    with pytest.raises(ValueError, match="no pixels"):
        image_metrics(truth, truth, mask=np.zeros(truth.shape, bool))


def test_tidy_rows_long_format():
    rows = tidy_rows("denoise", "equivariant", 2, 500, {"psnr": 30.5, "ssim": 0.9, "nrmse": 0.1},
                     split="heldout", slice=87)
    assert [r["metric"] for r in rows] == ["psnr", "ssim", "nrmse"]
    assert all(list(r)[:6] == list(ROW_COLUMNS) and list(r)[6:] == ["split", "slice"] for r in rows)
    assert rows[0] == {"experiment": "denoise", "model": "equivariant", "seed": 2, "epoch": 500,
                       "metric": "psnr", "value": 30.5, "split": "heldout", "slice": 87}
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(tidy_rows("radon", "cnn", 0, 1, {"psnr": math.inf}, split="train", slice=77))
    back = list(csv.DictReader(io.StringIO(buf.getvalue())))
    assert float(back[0]["value"]) == math.inf  # inf survives a CSV round trip
    with pytest.raises(ValueError, match="metric"):
        tidy_rows("radon", "cnn", 0, 1, {"psnr": 1.0}, metric="x")
