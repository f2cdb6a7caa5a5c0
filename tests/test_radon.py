"""Tests of equipet.brain.radon: agreement with skimage, adjointness, gradients, FBP, Poisson noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.data import shepp_logan_phantom
from skimage.transform import radon, resize

from equipet.brain.image import disk_mask
from equipet.errors import ConfigError
from equipet.brain.radon import RadonTransform, backprojection, fbp, poisson_sinogram, projection_angles


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def phantom(n: int) -> np.ndarray:
    return resize(shepp_logan_phantom(), (n, n), anti_aliasing=True) * disk_mask(n)


@pytest.mark.parametrize("n, theta", [
    (64, projection_angles(45)),
    (63, projection_angles(30)),  # odd size: centre n // 2
    (32, np.array([-30.0, 0.0, 12.5, 90.0, 137.0, 200.0])),  # arbitrary, negative and > 180 degrees
])
def test_matches_skimage_radon(n, theta):
    """Same samples as skimage.transform.radon(circle=True): relative L2 error at float rounding.

    Measured: ~1e-15 in float64 and ~2e-7 in float32.
    """
    rng = np.random.default_rng(0)
    images = np.stack([phantom(n), rng.random((n, n)) * disk_mask(n)])
    op = RadonTransform(n, theta)
    out64 = op.apply(torch.from_numpy(images)).numpy()
    out32 = op(torch.from_numpy(images).float()).numpy()
    for img, o64, o32 in zip(images, out64, out32):
        ref = radon(img, theta, circle=True)
        assert o64.shape == ref.shape == (n, len(theta))
        assert rel_err(o64, ref) < 1e-12
        assert rel_err(o32, ref) < 1e-5


def test_theta_zero_is_column_sums():
    img = torch.rand(1, 16, 16, dtype=torch.float64) * torch.from_numpy(disk_mask(16))
    sino = RadonTransform(16, [0.0]).apply(img)
    torch.testing.assert_close(sino[0, :, 0], img[0].sum(dim=0))


def test_adjointness_batched():
    """<A x, y> == <x, A^T y> over a batch with two leading dimensions (float64)."""
    n, theta = 40, projection_angles(25)
    op = RadonTransform(n, theta)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, n, n, dtype=torch.float64, generator=g)
    y = torch.randn(2, 3, n, len(theta), dtype=torch.float64, generator=g)
    ax, aty = op.apply(x), op.adjoint(y)
    assert aty.shape == x.shape and ax.shape == y.shape
    lhs = (ax * y).sum(dim=(-2, -1))
    rhs = (x * aty).sum(dim=(-2, -1))
    torch.testing.assert_close(lhs, rhs, rtol=1e-12, atol=0)
    # and each item of the batch is transformed independently
    torch.testing.assert_close(aty[1, 2], op.adjoint(y[1, 2]))


def test_adjoint_is_transpose_of_explicit_matrix():
    """Build A column by column; the adjoint of each unit sinogram is the matching row."""
    n, theta = 8, [10.0, 75.0, 130.0]
    op = RadonTransform(n, theta)
    eye = torch.eye(n * n, dtype=torch.float64).reshape(n * n, n, n)
    a = op.apply(eye).reshape(n * n, -1).T  # (n_det * n_angles, n * n)
    eye_y = torch.eye(n * len(theta), dtype=torch.float64).reshape(-1, n, len(theta))
    at = op.adjoint(eye_y).reshape(n * len(theta), -1)  # rows: A^T e_i
    torch.testing.assert_close(at, a, rtol=0, atol=1e-13)


def test_gradcheck_apply_and_adjoint():
    op = RadonTransform(6, [0.0, 33.0, 100.0])
    x = torch.randn(2, 6, 6, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 6, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(op.apply, (x,))
    assert torch.autograd.gradcheck(op.adjoint, (y,))
    assert torch.autograd.gradgradcheck(op.apply, (x,))


def test_data_fidelity_gradient_is_adjoint_of_residual():
    """d/dx 0.5 ||A x - y||^2 = A^T (A x - y): the physics loss of the Radon experiment."""
    n, theta = 24, projection_angles(12)
    op = RadonTransform(n, theta)
    x = torch.rand(n, n, dtype=torch.float64, requires_grad=True)
    y = torch.rand(n, len(theta), dtype=torch.float64)
    (0.5 * (op(x) - y).pow(2).sum()).backward()
    torch.testing.assert_close(x.grad, op.adjoint(op(x.detach()) - y))


def test_bad_shapes_and_module_apply():
    op = RadonTransform(16, projection_angles(4))
    with pytest.raises(ValueError, match="16, 16"):
        op.apply(torch.zeros(15, 16))
    with pytest.raises(ValueError, match="16, 4"):
        op.adjoint(torch.zeros(16, 5))
    seen = []
    torch.nn.Sequential(op).apply(lambda m: seen.append(type(m).__name__))  # nn.Module.apply still works
    assert "RadonTransform" in seen


def test_fbp_of_smooth_phantom():
    """FBP (ramp filter, 180 angles) of a smooth phantom: relative L2 error < 1 % (measured 0.38 %)."""
    n = 64
    yy, xx = np.mgrid[:n, :n] - n // 2
    smooth = np.exp(-((xx - 5) ** 2 + (yy + 3) ** 2) / (2 * 9.0**2)) + 0.5 * np.exp(
        -((xx + 10) ** 2 + (yy - 8) ** 2) / (2 * 5.0**2))
    smooth *= disk_mask(n)
    theta = projection_angles(180)
    sino = RadonTransform(n, theta).apply(torch.from_numpy(smooth)).numpy()
    rec = fbp(sino, theta)
    assert rec.shape == (n, n)
    assert rel_err(rec, smooth) < 0.01
    # batching over leading dimensions gives the same images
    np.testing.assert_allclose(fbp(np.stack([sino, 2 * sino]), theta)[1], 2 * rec)
    # unfiltered back-projection is blurred: much worse than FBP, but correlated with the image
    bp = backprojection(sino, theta)
    assert rel_err(bp / np.abs(bp).max() * smooth.max(), smooth) > 2 * rel_err(rec, smooth)
    assert np.corrcoef(bp.ravel(), smooth.ravel())[0, 1] > 0.8


def test_poisson_sinogram_statistics():
    rng = np.random.default_rng(0)
    sino = np.linspace(0.0, 4.0, 2000).reshape(40, 50)
    counts = 1e3
    draws = np.stack([poisson_sinogram(sino, counts, rng) for _ in range(400)])
    k = counts / sino.max()
    # unbiased, variance sinogram / k: check on the whole array to a few standard errors
    assert np.abs(draws.mean(0) - sino).max() < 6 * np.sqrt(sino.max() / k / 400)
    np.testing.assert_allclose(draws.var(0).mean(), (sino / k).mean(), rtol=0.05)
    # values are multiples of 1 / k (counts in the original units)
    np.testing.assert_allclose(draws[0] * k, np.round(draws[0] * k), atol=1e-9)
    assert poisson_sinogram(sino, None, rng) is not sino
    np.testing.assert_array_equal(poisson_sinogram(sino, None, rng), sino)
    with pytest.raises(ConfigError, match="radon_recon.counts"):
        poisson_sinogram(sino, -1, rng)


def test_module_dtype_conversion_keeps_float64_precision():
    n, theta = 32, projection_angles(10)
    op = RadonTransform(n, theta).float()  # e.g. model.float(): the grid must stay exact
    img = phantom(n)
    assert rel_err(op.apply(torch.from_numpy(img)).numpy(), radon(img, theta, circle=True)) < 1e-12


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    n, theta = 48, projection_angles(30)
    op = RadonTransform(n, theta)
    x = torch.rand(3, n, n, dtype=torch.float64)
    y = torch.rand(3, n, len(theta), dtype=torch.float64)
    torch.testing.assert_close(op.apply(x.cuda()).cpu(), op.apply(x))
    torch.testing.assert_close(op.adjoint(y.cuda()).cpu(), op.adjoint(y))
    xc = x.cuda().float().requires_grad_()
    op(xc).pow(2).sum().backward()
    torch.testing.assert_close(xc.grad.cpu(), 2 * op.adjoint(op(x.float())), rtol=1e-4, atol=1e-3)
