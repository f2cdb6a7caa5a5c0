"""The two networks compared throughout the paper (section II-A).

* :class:`SCNN` -- a steerable, group-equivariant CNN built with escnn: three
  group convolutions over the rotation group C_N or the dihedral group D_N.
* :class:`CNN` -- a conventional CNN of the same width (64 channels by default).

Both map a one-channel image ``(B, 1, H, W)`` to a one-channel image of the
same size, so either can stand in for the other in every experiment.

Orientation convention (checked against escnn, see ``tests/test_nets.py``):
images are indexed ``[row, column]`` with row 0 at the top, as ``matplotlib``
shows them. A positive angle rotates the picture *counter-clockwise* as
displayed, so escnn's 90-degree element equals ``torch.rot90(x, 1, dims=(-2, -1))``.
escnn's reflection of D_N mirrors left-right (``torch.flip(x, dims=(-1,))``)
and the element ``(flip, theta)`` mirrors first and then rotates by ``theta``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch
from escnn import gspaces
from escnn import nn as enn

__all__ = [
    "SCNN",
    "CNN",
    "build_model",
    "count_parameters",
    "matched_width",
    "group_action_copies",
    "rotate_image",
    "disk_mask",
    "smooth_test_image",
    "NonNegativeOutput",
    "SOFTPLUS_BETA",
]

#: softplus sharpness of :class:`NonNegativeOutput`, in units of the network's input scale ``c``
#: (the assisted methods feed images of order one): softplus_beta(z) - max(z, 0) <= ln 2 / beta
#: = 0.035 c, at z = 0
SOFTPLUS_BETA = 20.0


# --------------------------------------------------------------------------- escnn compatibility


def _escnn_accepts_np_matrix() -> None:
    """Let escnn 1.0.11 build dihedral (D_N) kernel bases with scikit-learn >= 1.6.

    escnn solves for intertwiners with ``sklearn.utils.extmath.randomized_svd``
    on ``sparse_matrix.todense()``, an ``np.matrix``; recent scikit-learn rejects
    ``np.matrix`` ("np.matrix is not supported"). Passing the same numbers as an
    ``ndarray`` restores escnn's intended computation. Idempotent.
    """
    from escnn.group import _numerical

    svd = getattr(_numerical, "randomized_svd", None)
    if svd is None or getattr(svd, "equipet_accepts_matrix", False):
        return

    def randomized_svd(M: Any, *args: Any, **kwargs: Any) -> Any:
        return svd(np.asarray(M), *args, **kwargs)

    randomized_svd.equipet_accepts_matrix = True  # type: ignore[attr-defined]
    _numerical.randomized_svd = randomized_svd


_escnn_accepts_np_matrix()


# --------------------------------------------------------------------------- geometry helpers


def _gspace(group: str, order: int) -> gspaces.GSpace2D:
    """The escnn gspace of the planar symmetry group ``group``\\ :sub:`order`."""
    if group == "C":
        return gspaces.rot2dOnR2(N=order)
    if group == "D":
        return gspaces.flipRot2dOnR2(N=order)
    raise ValueError(f"group must be 'C' (rotations C_N) or 'D' (dihedral D_N), not {group!r}")


def _element_angle_flip(element: Any) -> tuple[float, bool]:
    """(rotation angle in degrees, reflection?) of an escnn C_N or D_N element."""
    value = element.to("radians")
    if isinstance(value, tuple):  # D_N: (flip, angle)
        flip, angle_rad = value
        return round(math.degrees(angle_rad), 9), bool(flip)
    return round(math.degrees(value), 9), False


def _element_label(angle_deg: float, flip: bool) -> str:
    return f"flip, {angle_deg:g}°" if flip else f"{angle_deg:g}°"


def rotate_image(x: torch.Tensor, angle_deg: float) -> torch.Tensor:
    """Rotate square image(s) ``x`` of shape ``(..., H, W)`` counter-clockwise by ``angle_deg``.

    The rotation is about the image centre, pixel ``((H-1)/2, (W-1)/2)``:
    ``f'(p) = f(R(-angle) p)``. Multiples of 90 degrees are exact
    (``torch.rot90``, the same as escnn's group action); other angles use
    bilinear interpolation (``torch.nn.functional.grid_sample``) with zeros
    outside the image, which is differentiable and runs on any device.

    >>> x = torch.tensor([[0., 1.], [0., 0.]])        # bright pixel at top right
    >>> rotate_image(x, 90)                            # moves to top left
    tensor([[1., 0.],
            [0., 0.]])
    >>> torch.allclose(rotate_image(x, 360), x)
    True
    """
    if x.ndim < 2 or x.shape[-1] != x.shape[-2]:
        raise ValueError(f"rotate_image needs square images (..., H, H), got shape {tuple(x.shape)}")
    quarter_turns = angle_deg / 90.0
    if float(quarter_turns).is_integer():
        return torch.rot90(x, int(quarter_turns) % 4, dims=(-2, -1))
    size = x.shape[-1]
    flat = x.reshape(-1, 1, size, size)
    theta_rad = math.radians(angle_deg)
    cos, sin = math.cos(theta_rad), math.sin(theta_rad)
    # Output pixel at normalised (u=column, v=row, v downwards) samples the input at
    # (u cos - v sin, u sin + v cos): a counter-clockwise turn as displayed.
    affine = torch.tensor([[cos, -sin, 0.0], [sin, cos, 0.0]], dtype=flat.dtype, device=flat.device)
    grid = torch.nn.functional.affine_grid(affine.expand(flat.shape[0], 2, 3), list(flat.shape), align_corners=True)
    out = torch.nn.functional.grid_sample(flat, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return out.reshape(x.shape)


def disk_mask(size_px: int, margin_px: float = 0.0) -> torch.Tensor:
    """Boolean ``(size_px, size_px)`` mask of the inscribed disk, shrunk by ``margin_px``.

    The disk is centred on the rotation centre ``(size_px-1)/2`` with radius
    ``(size_px-1)/2 - margin_px``; it is the region that every rotation maps into itself.

    >>> disk_mask(5).int()
    tensor([[0, 0, 1, 0, 0],
            [0, 1, 1, 1, 0],
            [1, 1, 1, 1, 1],
            [0, 1, 1, 1, 0],
            [0, 0, 1, 0, 0]], dtype=torch.int32)
    """
    centre = (size_px - 1) / 2
    coords = torch.arange(size_px, dtype=torch.float64) - centre
    radius_sq = coords[:, None] ** 2 + coords[None, :] ** 2
    return radius_sq <= (centre - margin_px) ** 2 + 1e-9


def _relative_error(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """``||a - b|| / ||b||`` over the pixels in ``mask`` (all pixels when None)."""
    if mask is not None:
        a, b = a[..., mask], b[..., mask]
    denom = torch.linalg.vector_norm(b).item()
    return torch.linalg.vector_norm(a - b).item() / max(denom, 1e-30)


def smooth_test_image(size_px: int, seed: int = 0, sigma_px: float = 2.0) -> torch.Tensor:
    """A smooth random ``(size_px, size_px)`` image, zero outside the inscribed disk.

    Gaussian-blurred white noise (std ``sigma_px``) times :func:`disk_mask`; a
    band-limited input that bilinear rotation resamples accurately, used to
    measure equivariance to rotations that are not multiples of 90 degrees.
    """
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(1, 1, size_px, size_px, generator=gen, dtype=torch.float64)
    radius = int(math.ceil(3 * sigma_px))
    taps = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel_1d = torch.exp(-0.5 * (taps / sigma_px) ** 2)
    kernel_1d /= kernel_1d.sum()
    blurred = torch.nn.functional.conv2d(noise, kernel_1d.view(1, 1, -1, 1), padding=(radius, 0))
    blurred = torch.nn.functional.conv2d(blurred, kernel_1d.view(1, 1, 1, -1), padding=(0, radius))
    image = blurred[0, 0] / blurred.std() * disk_mask(size_px, margin_px=1.0)
    return image.float()


# --------------------------------------------------------------------------- networks


class SCNN(torch.nn.Module):
    """Steerable CNN equivariant to the planar group G = C_N or D_N (escnn).

    Three group convolutions (paper II-A)::

        h1 = ReLU(BN(K1 * x))        trivial field -> ``fields`` regular fields
        h2 = ReLU(BN(K2 * h1))       regular -> regular
        y  = K3 * h2                 regular -> one trivial field

    Each kernel is a linear combination of a G-steerable basis, ``K = sum_i w_i B_i``,
    so that ``K(g x) = rho_out(g) K(x) rho_in(g)^-1`` and the network commutes with G:

        SCNN(g . x) = g . SCNN(x)    for every g in G,

    where ``g .`` rotates (and for D_N mirrors) the image. BN is escnn's
    ``InnerBatchNorm`` (one statistic per regular field), which keeps equivariance.
    Each hidden layer has ``fields * |G|`` channels; 8 fields of C8 give 64.

    Band limit. escnn samples each kernel basis element on rings of radius ``r`` and keeps
    the angular frequencies ``|m| <= F(r)``. Its default ``F`` keeps only ``|m| <= 2`` on the
    ring ``r = 1`` of a 3x3 kernel: a first-layer filter (trivial -> regular field of C8) then
    has 6 of the 9 degrees of freedom of a 3x3 kernel, and the C8 irreps of frequency 3 and 4
    (the sign representation) are never excited. ``max_frequency = M`` sets ``F(r) = M`` for
    ``r > 0`` (``F(0) = 0``); ``M = N // 2`` makes every frequency of C_N / D_N reachable,
    which for C8 at kernel 3 gives the first layer all 9 degrees of freedom. The price is
    aliasing: frequencies 3 and 4 sampled on a 3x3 grid rotate badly by 45 degrees (measured
    with :meth:`check_equivariance` at 45 degrees on fresh 4-field C8 networks, seeds 0-2:
    relative error 0.04-0.11 by default, 0.09-0.32 with ``max_frequency=4``, 0.04-0.07 at
    kernel 5 with ``max_frequency=4``); quarter turns stay exact.

    Parameters
    ----------
    group: ``"C"`` (rotations C_N) or ``"D"`` (rotations and reflections D_N).
    order: N, the number of rotations in the group.
    fields: regular-representation fields per hidden layer.
    kernel_size: side of the convolution kernels (``padding = kernel_size // 2``).
    max_frequency: angular band limit ``M`` of the kernel bases (None: escnn's default).

    >>> net = SCNN(group="C", order=4, fields=2).eval()
    >>> net.channels
    8
    >>> net(torch.zeros(1, 1, 9, 9)).shape
    torch.Size([1, 1, 9, 9])
    """

    def __init__(self, group: str = "C", order: int = 8, fields: int = 8, kernel_size: int = 3,
                 max_frequency: int | None = None):
        super().__init__()
        self.group = group
        self.order = order
        self.fields = fields
        self.kernel_size = kernel_size
        self.max_frequency = max_frequency
        self.gspace = _gspace(group, order)
        self.group_size = self.gspace.fibergroup.order()
        self.channels = fields * self.group_size
        self.in_type = enn.FieldType(self.gspace, [self.gspace.trivial_repr])
        hidden = enn.FieldType(self.gspace, fields * [self.gspace.regular_repr])
        self.out_type = enn.FieldType(self.gspace, [self.gspace.trivial_repr])
        conv = {"kernel_size": kernel_size, "padding": kernel_size // 2}
        if max_frequency is not None:
            if max_frequency < 0:
                raise ValueError(f"max_frequency must be >= 0 or None, got {max_frequency}")
            conv["frequencies_cutoff"] = functools.partial(_constant_cutoff, float(max_frequency))
        self.net = enn.SequentialModule(
            enn.R2Conv(self.in_type, hidden, **conv),
            enn.InnerBatchNorm(hidden),
            enn.ReLU(hidden, inplace=True),
            enn.R2Conv(hidden, hidden, **conv),
            enn.InnerBatchNorm(hidden),
            enn.ReLU(hidden, inplace=True),
            enn.R2Conv(hidden, self.out_type, **conv),
        )

    def first_layer_frequencies(self) -> list[int]:
        """Angular frequencies (irreps of G) that the first layer's kernel basis can excite.

        >>> SCNN(group="C", order=8, fields=1).first_layer_frequencies()
        [0, 1, 2]
        >>> SCNN(group="C", order=8, fields=1, max_frequency=4).first_layer_frequencies()
        [0, 1, 2, 3, 4]
        """
        first = self.net._modules[next(iter(self.net._modules))]
        irreps = {info["out_irrep"] for info in first.basisexpansion.get_basis_info()}
        return sorted({int(irrep[-1]) for irrep in irreps})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map a plain ``(B, 1, H, W)`` tensor to a plain ``(B, 1, H, W)`` tensor."""
        return self.net(enn.GeometricTensor(x, self.in_type)).tensor

    def group_elements(self) -> list[tuple[float, bool]]:
        """(angle in degrees, reflection?) of every element of G, identity first."""
        return [_element_angle_flip(e) for e in self.gspace.fibergroup.elements]

    @torch.no_grad()
    def check_equivariance(
        self,
        x: torch.Tensor | None = None,
        angles_deg: Iterable[float] | None = None,
        flip: bool = False,
        atol: float | None = None,
    ) -> list[tuple[float, float]]:
        """Measure ``||SCNN(g.x) - g.SCNN(x)|| / ||g.SCNN(x)||`` inside the inscribed disk.

        Runs in eval mode (BatchNorm uses its running statistics) and restores
        the previous mode afterwards.

        Parameters
        ----------
        x: input ``(B, 1, S, S)``; default a smooth random 33x33 image, zero
            outside the inscribed disk (:func:`smooth_test_image`).
        angles_deg: rotation angles to test with :func:`rotate_image` (exact
            for multiples of 90, bilinear otherwise). Default: the rotations of
            G, transformed with escnn's own action (``GeometricTensor.transform``).
        flip: test the reflected elements instead (mirror left-right, then
            rotate); only for D_N.
        atol: if given, raise ``AssertionError`` when any relative error exceeds it.

        Returns
        -------
        ``[(angle_deg, relative_error), ...]``, one per angle tested.

        >>> net = SCNN(group="C", order=4, fields=2).eval()
        >>> errors = net.check_equivariance(atol=1e-5)
        >>> [angle for angle, _ in errors]
        [0.0, 90.0, 180.0, 270.0]
        """
        if flip and self.group != "D":
            raise ValueError("flip=True needs a dihedral SCNN (group='D')")
        was_training = self.training
        self.eval()
        try:
            if x is None:
                x = smooth_test_image(33)[None, None]
            param = next(self.parameters())
            x = x.to(device=param.device, dtype=param.dtype)
            mask = disk_mask(x.shape[-1], margin_px=1.0).to(x.device)
            y = self(x)
            results: list[tuple[float, float]] = []
            if angles_deg is None:
                for element in self.gspace.fibergroup.elements:
                    angle_deg, is_flip = _element_angle_flip(element)
                    if is_flip != flip:
                        continue
                    gx = enn.GeometricTensor(x, self.in_type).transform(element).tensor
                    gy = enn.GeometricTensor(y, self.out_type).transform(element).tensor
                    results.append((angle_deg, _relative_error(self(gx), gy, mask)))
            else:
                def act(t: torch.Tensor, angle: float) -> torch.Tensor:
                    return rotate_image(torch.flip(t, dims=(-1,)) if flip else t, angle)

                for angle_deg in angles_deg:
                    gx, gy = act(x, angle_deg), act(y, angle_deg)
                    results.append((float(angle_deg), _relative_error(self(gx), gy, mask)))
        finally:
            self.train(was_training)
        if atol is not None:
            bad = [(a, e) for a, e in results if not e <= atol]
            assert not bad, f"SCNN({self.group}{self.order}) not equivariant within {atol}: {bad}"
        return results


class CNN(torch.nn.Module):
    """Conventional CNN: ``layers`` 'same'-padded convolutions with ReLU between them.

        h1 = ReLU(W1 * x + b1)                     1 -> C channels
        hk = ReLU(Wk * h(k-1) + bk),  k = 2..L-1   C -> C channels
        y  = WL * h(L-1) + bL                      C -> 1 channel

    With ``batch_norm`` every hidden convolution is followed by a ``BatchNorm2d``
    before its ReLU, ``hk = ReLU(BN(Wk * h(k-1) + bk))``, as the SCNN's layers are.
    It commutes with translations but not with rotations.

    >>> net = CNN(layers=3, channels=4)
    >>> net(torch.zeros(2, 1, 8, 8)).shape
    torch.Size([2, 1, 8, 8])
    >>> count_parameters(net)  # (1*4*9+4) + (4*4*9+4) + (4*1*9+1)
    225
    """

    def __init__(self, layers: int = 5, channels: int = 64, kernel_size: int = 3, batch_norm: bool = False):
        super().__init__()
        if layers < 2:
            raise ValueError(f"CNN needs at least 2 layers (input and output), got {layers}")
        self.layers = layers
        self.channels = channels
        self.kernel_size = kernel_size
        self.batch_norm = batch_norm
        pad = kernel_size // 2

        def block(c_in: int) -> list[torch.nn.Module]:
            norm = [torch.nn.BatchNorm2d(channels)] if batch_norm else []
            return [torch.nn.Conv2d(c_in, channels, kernel_size, padding=pad), *norm, torch.nn.ReLU()]

        modules: list[torch.nn.Module] = block(1)
        for _ in range(layers - 2):
            modules += block(channels)
        modules.append(torch.nn.Conv2d(channels, 1, kernel_size, padding=pad))
        self.net = torch.nn.Sequential(*modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(B, 1, H, W)`` to ``(B, 1, H, W)``."""
        return self.net(x)


class NonNegativeOutput(torch.nn.Module):
    """``softplus_beta(net(x))``: the network's image made positive (the likelihood methods of
    :mod:`equipet.assisted.methods`).

    Softplus acts pixel by pixel, so a network equivariant under rotations stays so.
    """

    def __init__(self, net: torch.nn.Module, beta: float = SOFTPLUS_BETA):
        super().__init__()
        self.net = net
        self.softplus = torch.nn.Softplus(beta=beta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.softplus(self.net(x))


def _constant_cutoff(max_frequency: float, radius: float) -> float:
    """escnn ``frequencies_cutoff``: frequency ``max_frequency`` on every ring but the centre."""
    return max_frequency if radius > 0 else 0.0


def _scnn(c: Mapping[str, Any], fields: int) -> SCNN:
    return SCNN(group=c["group"], order=c["order"], fields=fields, kernel_size=c["kernel_size"],
                max_frequency=c.get("max_frequency"))


def _cnn(c: Mapping[str, Any], channels: int) -> CNN:
    return CNN(layers=c["layers"], channels=channels, kernel_size=c["kernel_size"],
               batch_norm=bool(c.get("batch_norm", False)))


def matched_width(count: Callable[[int], int], target: int) -> int:
    """The width ``w >= 1`` whose parameter count ``count(w)`` is closest to ``target``.

    Both networks' counts are exact quadratics in the width, ``n(w) = a w^2 + b w + c``
    (hidden-to-hidden convolutions scale with ``w^2``, the first and last layer, biases and
    batch norms with ``w``), so ``a, b, c`` follow from ``n(1), n(2), n(3)``; the positive root
    of ``n(w) = target`` is rounded to the neighbour with the smaller ``|n(w) - target|``.

    >>> matched_width(lambda w: 27 * w * w + 10 * w + 1, 3217)
    11
    """
    n1, n2, n3 = count(1), count(2), count(3)
    a = (n3 - 2 * n2 + n1) / 2.0
    b = n2 - n1 - 3 * a
    c = n1 - a - b
    if a > 0:
        root = (-b + math.sqrt(max(b * b - 4 * a * (c - target), 0.0))) / (2 * a)
    else:
        root = (target - c) / b
    candidates = {max(1, math.floor(root)), max(1, math.ceil(root))}
    return min(sorted(candidates), key=lambda w: abs(count(w) - target))


def model_width(name: str, models_cfg: Mapping[str, Mapping[str, Any]]) -> int:
    """Hidden width of ``name`` (SCNN fields or CNN channels), matched when the config asks.

    ``models.scnn.match_parameters`` picks the number of fields whose parameter count is
    closest to the CNN's (as configured); ``models.cnn.match_parameters`` picks the CNN
    channels closest to the SCNN's. Matching both ways at once is circular and refused.
    """
    scnn_c, cnn_c = models_cfg["scnn"], models_cfg["cnn"]
    if scnn_c.get("match_parameters") and cnn_c.get("match_parameters"):
        raise ValueError("models.scnn.match_parameters and models.cnn.match_parameters are both true; "
                         "match one network to the other, not both")
    if name == "scnn":
        if not scnn_c.get("match_parameters"):
            return int(scnn_c["fields"])
        target = count_parameters(_cnn(cnn_c, cnn_c["channels"]))
        return matched_width(lambda w: count_parameters(_scnn(scnn_c, w)), target)
    if name == "cnn":
        if not cnn_c.get("match_parameters"):
            return int(cnn_c["channels"])
        target = count_parameters(_scnn(scnn_c, scnn_c["fields"]))
        return matched_width(lambda w: count_parameters(_cnn(cnn_c, w)), target)
    raise ValueError(f"unknown model {name!r}; expected 'scnn' or 'cnn'")


def build_model(name: str, models_cfg: Mapping[str, Mapping[str, Any]]) -> torch.nn.Module:
    """Build ``"scnn"`` or ``"cnn"`` from the config's ``models`` section.

    >>> cfg = {"scnn": {"group": "C", "order": 4, "fields": 2, "kernel_size": 3},
    ...        "cnn": {"layers": 3, "channels": 4, "kernel_size": 3}}
    >>> type(build_model("cnn", cfg)).__name__
    'CNN'
    """
    if name == "scnn":
        return _scnn(models_cfg["scnn"], model_width("scnn", models_cfg))
    if name == "cnn":
        return _cnn(models_cfg["cnn"], model_width("cnn", models_cfg))
    raise ValueError(f"unknown model {name!r}; expected 'scnn' or 'cnn'")


def count_parameters(model: torch.nn.Module) -> int:
    """Number of trainable scalars (for the SCNN: the steerable-basis coefficients and biases)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def group_action_copies(
    image: torch.Tensor | np.ndarray, group: str = "C", order: int = 8
) -> tuple[torch.Tensor, list[str]]:
    """``image`` ``(H, W)`` transformed by every element g of C_N / D_N (paper Fig. 6).

    Computed with escnn's own action on a trivial field, ``f'(x) = f(g^-1 x)``
    (``GeometricTensor.transform``): exact for multiples of 90 degrees and
    reflections, second-order spline interpolation otherwise.

    Returns ``(copies, labels)``: ``copies`` is ``(|G|, H, W)`` with the identity
    first, ``labels`` names each element, e.g. ``"45°"`` or ``"flip, 90°"``
    (mirror left-right, then rotate counter-clockwise).

    >>> copies, labels = group_action_copies(torch.eye(3), "C", 4)
    >>> labels
    ['0°', '90°', '180°', '270°']
    >>> torch.equal(copies[1], torch.rot90(torch.eye(3)))
    True
    """
    image = torch.as_tensor(image, dtype=torch.float32)
    if image.ndim != 2:
        raise ValueError(f"group_action_copies needs one (H, W) image, got shape {tuple(image.shape)}")
    gspace = _gspace(group, order)
    field = enn.FieldType(gspace, [gspace.trivial_repr])
    tensor = enn.GeometricTensor(image[None, None], field)
    copies, labels = [], []
    for element in gspace.fibergroup.elements:
        copies.append(tensor.transform(element).tensor[0, 0].to(torch.float32))
        labels.append(_element_label(*_element_angle_flip(element)))
    return torch.stack(copies), labels
