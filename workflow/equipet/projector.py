"""List-mode TOF forward and back projection through a voxel grid, in PyTorch.

The projector is a linear operator ``A`` from images (shape ``(nx, ny, nz)``) to one value
per list-mode event (shape ``(N,)``), with :meth:`ListmodeTOFProjector.apply` (``A x``)
and :meth:`ListmodeTOFProjector.adjoint` (``A^T y``), in the style of parallelproj.
The system matrix is never stored: every element is computed on the fly from the event's
line of response (LOR) each time it is needed.

Ray model: **Joseph** (1982). For a LOR from ``p1`` to ``p2`` (mm) the axis along which the
LOR advances the most voxels is its *dominant axis* ``a``; the other two are ``b`` and
``c``. The LOR crosses every voxel-centre plane ``i`` of axis ``a`` at a point whose
``(b, c)`` coordinates are generally between voxel centres; the image is bilinearly
interpolated there and weighted by the path length between planes,

.. math::

    (A x)_e = \\sum_i \\Delta_e \\, g_e(t_i) \\sum_{(j_b, j_c)} w^{bilin}_{i, j_b j_c}
              \\, x_{i, j_b, j_c}, \\qquad \\Delta_e = \\frac{L_e}{|q_{2,a} - q_{1,a}|},

with ``L_e = |p2 - p1|`` the LOR length (mm), ``q`` the endpoints in voxel-index units and
``t_i`` the distance (mm) from ``p1`` to the crossing of plane ``i``. Without TOF,
``g_e = 1`` and ``(A x)_e`` approximates the line integral of ``x`` (units: image x mm).

TOF kernel: the event's TOF offset ``tof_mm`` is the signed distance of the most likely
annihilation point from the LOR midpoint, **positive towards** ``p1`` (endpoint 1); see
:func:`equipet.listmode.tof_offset_mm` for how it comes from GATE times. With
``delta = (L/2 - t) - tof_mm`` the displacement of the sample from that point,

.. math::

    g_e(t) = \\frac{\\exp(-\\delta^2 / 2\\sigma^2)}{\\sqrt{2\\pi}\\,\\sigma\\,
             \\mathrm{erf}(k/\\sqrt{2})} \\;\\; \\text{for } |\\delta| \\le k\\sigma,
             \\text{ else } 0,
    \\qquad \\sigma = \\frac{\\mathrm{FWHM}}{2\\sqrt{2\\ln 2}},
    \\qquad \\mathrm{FWHM}_{mm} = \\frac{c\\,\\mathrm{CTR}}{2}

(``c = 0.299792458 mm/ps``; ``k`` = ``truncation_sigma``). ``g`` is a probability density
in the TOF offset (1/mm), renormalised after truncation, so integrating the TOF
projection over ``tof_mm`` (or summing TOF bins times their width) gives the non-TOF
projection exactly (away from the image border). In list-mode MLEM a constant per-event
factor cancels, so this normalisation only matters for consistency with the non-TOF
sensitivity image.

Exact adjoint: :meth:`adjoint` recomputes the very same indices and weights and
scatters with ``index_add_``; ``<A x, y> = <x, A^T y>`` holds to rounding error
(tested in ``tests/test_projector.py``).

Devices: the events live on the device of the tensors given; images passed to
``apply`` / ``adjoint`` results share it. Nothing branches on the device.

>>> import torch
>>> g = ImageGeometry.centred((8, 8, 4), (1.0, 1.0, 1.0))
>>> p1 = torch.tensor([[-50.0, 0.0, 0.0]]); p2 = torch.tensor([[50.0, 0.0, 0.0]])
>>> A = ListmodeTOFProjector(g, p1, p2)
>>> round(float(A.apply(torch.ones(g.shape))[0]), 3)   # 8 voxels x 1 mm, LOR between 2 z-rows
8.0
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

#: speed of light, mm per ps
C_MM_PER_PS = 0.299792458
FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))


def tof_fwhm_mm(ctr_ps: float) -> float:
    """Spatial FWHM (mm) along the LOR of the TOF kernel for a coincidence time resolution.

    ``FWHM_mm = c * CTR / 2``: a time difference ``dt`` moves the estimated point by ``c dt / 2``.

    >>> round(tof_fwhm_mm(100.0), 3)
    14.99
    """
    return C_MM_PER_PS * float(ctr_ps) / 2.0


@dataclass(frozen=True)
class ImageGeometry:
    """A regular voxel grid in scanner coordinates (mm).

    ``origin_mm`` is the centre of voxel ``(0, 0, 0)``; voxel ``(i, j, k)`` has its centre at
    ``origin_mm + (i, j, k) * voxel_size_mm``. Array axes are scanner x, y, z.
    """

    shape: tuple[int, int, int]
    voxel_size_mm: tuple[float, float, float]
    origin_mm: tuple[float, float, float]

    @classmethod
    def centred(cls, shape: Sequence[int], voxel_size_mm: float | Sequence[float]) -> "ImageGeometry":
        """Grid of ``shape`` centred on the scanner's origin."""
        shape = tuple(int(n) for n in shape)
        vox = (tuple(float(v) for v in voxel_size_mm) if isinstance(voxel_size_mm, Sequence)
               else (float(voxel_size_mm),) * 3)
        origin = tuple(-(n - 1) / 2.0 * v for n, v in zip(shape, vox))
        return cls(shape, vox, origin)

    @classmethod
    def from_fov(cls, fov_mm: Sequence[float], voxel_size_mm: float) -> "ImageGeometry":
        """Centred grid covering at least ``fov_mm`` (x, y, z) with cubic voxels."""
        shape = [max(1, int(math.ceil(f / voxel_size_mm - 1e-9))) for f in fov_mm]
        return cls.centred(shape, voxel_size_mm)

    @property
    def n_voxels(self) -> int:
        return int(np.prod(self.shape))

    @property
    def extent_mm(self) -> tuple[float, float, float]:
        return tuple(n * v for n, v in zip(self.shape, self.voxel_size_mm))

    def affine(self) -> np.ndarray:
        """4x4 voxel-index -> mm affine (NIfTI ``sform``/``qform``)."""
        a = np.diag([*self.voxel_size_mm, 1.0])
        a[:3, 3] = self.origin_mm
        return a

    def voxel_centres_mm(self) -> np.ndarray:
        """Centres of all voxels, shape ``(*shape, 3)``."""
        axes = [o + v * np.arange(n) for o, v, n in zip(self.origin_mm, self.voxel_size_mm, self.shape)]
        return np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)


class ListmodeTOFProjector:
    """TOF (or non-TOF) list-mode Joseph projector ``A`` for fixed events; see the module doc.

    Parameters
    ----------
    geometry:
        Image grid.
    p1_mm, p2_mm:
        LOR endpoints, tensors of shape ``(N, 3)`` in mm; their device and dtype are used.
    tof_mm:
        TOF offsets (N,) in mm, positive towards ``p1``; ``None`` for a non-TOF projector.
    tof_fwhm_mm:
        FWHM of the TOF kernel along the LOR, mm (see :func:`tof_fwhm_mm`); required with ``tof_mm``.
    truncation_sigma:
        Kernel support in sigmas (``k``); the kernel is renormalised to unit integral.
    chunk_size:
        Events processed at once; bounds memory at about ``chunk_size * planes * 100`` bytes.
    cache_mb:
        Keep the computed system-matrix chunks (indices int32 + weights, 32 bytes per ray
        sample) for reuse by later ``apply``/``adjoint`` calls, up to this many MB; chunks
        beyond the budget are recomputed on the fly every time. 0 (default) = purely on the
        fly. Iterative reconstruction on a CPU runs several times faster with a cache.
    """

    def __init__(self, geometry: ImageGeometry, p1_mm: torch.Tensor, p2_mm: torch.Tensor,
                 tof_mm: torch.Tensor | None = None, tof_fwhm_mm: float | None = None,
                 truncation_sigma: float = 3.0, chunk_size: int = 32768, cache_mb: float = 0.0):
        if p1_mm.shape != p2_mm.shape or p1_mm.ndim != 2 or p1_mm.shape[1] != 3:
            raise ValueError(f"p1_mm and p2_mm must both be (N, 3); got {tuple(p1_mm.shape)}, {tuple(p2_mm.shape)}")
        if tof_mm is not None and tof_fwhm_mm is None:
            raise ValueError("tof_fwhm_mm is required with tof_mm")
        self.geometry = geometry
        self.p1 = p1_mm
        self.p2 = p2_mm.to(p1_mm.dtype)
        self.tof = None if tof_mm is None else tof_mm.to(p1_mm.dtype).reshape(-1)
        self.sigma_mm = None if tof_fwhm_mm is None else float(tof_fwhm_mm) * FWHM_TO_SIGMA
        self.truncation_sigma = float(truncation_sigma)
        self.chunk_size = int(chunk_size)
        self.cache_mb = float(cache_mb)
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._cache_bytes = 0
        self._cache_dtype: torch.dtype | None = None

    @property
    def n_events(self) -> int:
        return int(self.p1.shape[0])

    @property
    def device(self) -> torch.device:
        return self.p1.device

    @property
    def in_shape(self) -> tuple[int, int, int]:
        return self.geometry.shape

    @property
    def out_shape(self) -> tuple[int]:
        return (self.n_events,)

    # ---- the linear operator ------------------------------------------------------------
    def apply(self, image: torch.Tensor) -> torch.Tensor:
        """Forward projection ``A x``: image ``(nx, ny, nz)`` -> ``(N,)``."""
        flat = image.reshape(-1)
        out = torch.zeros(self.n_events, dtype=image.dtype, device=image.device)
        for start, idx, wt in self._chunks(image.dtype):
            vals = (flat[idx] * wt).sum(dim=(1, 2))
            out[start:start + vals.shape[0]] += vals
        return out

    def adjoint(self, values: torch.Tensor) -> torch.Tensor:
        """Back projection ``A^T y``: ``(N,)`` -> image ``(nx, ny, nz)``."""
        flat = torch.zeros(self.geometry.n_voxels, dtype=values.dtype, device=values.device)
        for start, idx, wt in self._chunks(values.dtype):
            y = values[start:start + idx.shape[0]]
            flat.index_add_(0, idx.reshape(-1), (wt * y[:, None, None]).reshape(-1))
        return flat.reshape(self.geometry.shape)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """Differentiable forward projection (autograd uses :meth:`adjoint` as the backward)."""
        return ProjectFunction.apply(image, self)

    # ---- on-the-fly system matrix -------------------------------------------------------
    def _chunks(self, dtype: torch.dtype):
        """Yield ``(start, index (M, S, 4) int32, weight (M, S, 4))`` per chunk of events.

        Chunk ``[start, start + M)`` of events: sample ``s`` of event ``m`` touches the 4 voxels
        ``index[m, s]`` with weights ``weight[m, s]`` (zero for padding and out-of-grid voxels;
        their index is clamped to a valid voxel).
        """
        for start in range(0, self.n_events, self.chunk_size):
            cached = self._cache.get(start) if dtype == self._cache_dtype else None
            if cached is not None:
                yield start, cached[0], cached[1]
                continue
            stop = min(start + self.chunk_size, self.n_events)
            p1 = self.p1[start:stop].to(dtype)
            p2 = self.p2[start:stop].to(dtype)
            tof = None if self.tof is None else self.tof[start:stop].to(dtype)
            idx, wt = self._system_chunk(p1, p2, tof)
            if self.cache_mb > 0 and self._cache_dtype in (None, dtype):
                nbytes = idx.numel() * idx.element_size() + wt.numel() * wt.element_size()
                if self._cache_bytes + nbytes <= self.cache_mb * 1e6:
                    self._cache[start] = (idx, wt)
                    self._cache_bytes += nbytes
                    self._cache_dtype = dtype
            yield start, idx, wt

    def _system_chunk(self, p1, p2, tof):
        g = self.geometry
        dev, dt = p1.device, p1.dtype
        M = p1.shape[0]
        shape = torch.tensor(g.shape, device=dev)
        vox = torch.tensor(g.voxel_size_mm, dtype=dt, device=dev)
        org = torch.tensor(g.origin_mm, dtype=dt, device=dev)
        strides = (g.shape[1] * g.shape[2], g.shape[2], 1)
        q1 = (p1 - org) / vox                      # endpoints in voxel-index units
        q2 = (p2 - org) / vox
        dq = q2 - q1
        length = torch.linalg.vector_norm(p2 - p1, dim=1)
        dom = dq.abs().argmax(dim=1)

        # Gather per event the (a, b, c) axes: a dominant, (b, c) the other two in order.
        ax_table = torch.tensor([[0, 1, 2], [1, 0, 2], [2, 0, 1]], device=dev)
        axes = ax_table[dom]                                             # (M, 3)
        qa1, qb1, qc1 = (q1.gather(1, axes[:, k:k + 1])[:, 0] for k in range(3))
        dqa, dqb, dqc = (dq.gather(1, axes[:, k:k + 1])[:, 0] for k in range(3))
        na, nb, nc = (shape[axes[:, k]] for k in range(3))
        st = torch.tensor(strides, device=dev)
        sa, sb, sc = (st[axes[:, k]] for k in range(3))
        ok = (length > 0) & (dqa.abs() > 0)
        dqa_safe = torch.where(ok, dqa, torch.ones_like(dqa))
        kb, kc = dqb / dqa_safe, dqc / dqa_safe           # (b, c) advance per plane of a

        # Plane range along a: the grid along a, the grid (+1 voxel halo) along b and c,
        # and the TOF window. s = a-index coordinate along the LOR.
        lo = torch.zeros_like(qa1)
        hi = (na - 1).to(dt)
        for qx1, kx, nx in ((qb1, kb, nb), (qc1, kc, nc)):
            # -1 < qx1 + (s - qa1) * kx < nx
            kx_safe = torch.where(kx == 0, torch.ones_like(kx), kx)
            s_a = qa1 + (-1.0 - qx1) / kx_safe
            s_b = qa1 + (nx.to(dt) - qx1) / kx_safe
            inside_const = (qx1 > -1.0) & (qx1 < nx.to(dt))
            lo = torch.where(kx == 0, lo, torch.maximum(lo, torch.minimum(s_a, s_b)))
            hi = torch.where(kx == 0, hi, torch.minimum(hi, torch.maximum(s_a, s_b)))
            ok = ok & ((kx != 0) | inside_const)
        if tof is not None:
            half = self.truncation_sigma * self.sigma_mm
            t_centre = 0.5 * length - tof                  # distance from p1 of the TOF centre
            s1 = qa1 + (t_centre - half) / length.clamp_min(1e-12) * dqa
            s2 = qa1 + (t_centre + half) / length.clamp_min(1e-12) * dqa
            lo = torch.maximum(lo, torch.minimum(s1, s2))
            hi = torch.minimum(hi, torch.maximum(s1, s2))
        i_lo = torch.ceil(lo)
        count = torch.where(ok, torch.floor(hi) - i_lo + 1, torch.zeros_like(lo)).clamp_min(0).to(torch.int64)
        n_steps = int(count.max()) if M > 0 else 0
        if n_steps == 0:
            return (torch.zeros((M, 1, 4), dtype=torch.int32, device=dev),
                    torch.zeros((M, 1, 4), dtype=dt, device=dev))

        steps = torch.arange(n_steps, device=dev)
        valid = steps[None, :] < count[:, None]                          # (M, S)
        ia = i_lo[:, None] + steps[None, :].to(dt)                       # plane index (float)
        rel = ia - qa1[:, None]
        b = qb1[:, None] + rel * kb[:, None]
        c = qc1[:, None] + rel * kc[:, None]
        b0 = torch.floor(b)
        c0 = torch.floor(c)
        fb = b - b0
        fc = c - c0
        # path length per plane, and TOF kernel
        w = (length / dqa_safe.abs())[:, None] * valid.to(dt)
        if tof is not None:
            t = rel / dqa_safe[:, None] * length[:, None]              # distance from p1, mm
            delta = (0.5 * length[:, None] - t) - tof[:, None]
            norm = 1.0 / (math.sqrt(2.0 * math.pi) * self.sigma_mm
                          * math.erf(self.truncation_sigma / math.sqrt(2.0)))
            kern = torch.exp(-0.5 * (delta / self.sigma_mm) ** 2) * norm
            kern = kern * (delta.abs() <= self.truncation_sigma * self.sigma_mm).to(dt)
            w = w * kern

        # the 2 x 2 bilinear neighbours as outer products over (b, c): shape (M, S, 2, 2)
        it = torch.int32 if g.n_voxels < 2**31 else torch.int64
        ia_i = torch.minimum(ia.to(it).clamp(min=0), (na - 1).to(it)[:, None])
        two = torch.arange(2, device=dev, dtype=it)
        jb = b0.to(it)[..., None] + two                                   # (M, S, 2)
        jc = c0.to(it)[..., None] + two
        ok_b = (jb >= 0) & (jb < nb.to(it)[:, None, None])
        ok_c = (jc >= 0) & (jc < nc.to(it)[:, None, None])
        wb = torch.stack((1 - fb, fb), dim=-1) * ok_b                      # (M, S, 2)
        wc = torch.stack((1 - fc, fc), dim=-1) * ok_c
        # out-of-grid neighbours have weight 0; clamping keeps their index valid
        zero = torch.zeros((), dtype=it, device=dev)
        jb = torch.minimum(torch.maximum(jb, zero), (nb.to(it) - 1)[:, None, None])
        jc = torch.minimum(torch.maximum(jc, zero), (nc.to(it) - 1)[:, None, None])
        ob = (ia_i * sa.to(it)[:, None])[..., None] + jb * sb.to(it)[:, None, None]
        oc = jc * sc.to(it)[:, None, None]
        idx = ob[..., :, None] + oc[..., None, :]
        wt = (w[..., None] * wb)[..., :, None] * wc[..., None, :]
        return idx.reshape(M, -1, 4), wt.reshape(M, -1, 4)


class ProjectFunction(torch.autograd.Function):
    """``y = A x`` as an autograd Function; the backward is ``A^T grad_y`` (no gradient to A)."""

    @staticmethod
    def forward(ctx, image: torch.Tensor, projector: ListmodeTOFProjector) -> torch.Tensor:
        ctx.projector = projector
        return projector.apply(image)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        return ctx.projector.adjoint(grad_out.contiguous()), None


def reference_forward_per_event(image: np.ndarray, geometry: ImageGeometry, p1_mm: np.ndarray,
                                p2_mm: np.ndarray, tof_mm: np.ndarray | None = None,
                                tof_fwhm_mm: float | None = None,
                                truncation_sigma: float = 3.0) -> np.ndarray:
    """Straightforward per-event, per-plane Python loop of the same Joseph TOF model.

    Written independently of :class:`ListmodeTOFProjector` (plain loops, no range
    clipping tricks) to check it and to serve as the speed reference in the benchmark.
    """
    vox = np.asarray(geometry.voxel_size_mm, dtype=np.float64)
    org = np.asarray(geometry.origin_mm, dtype=np.float64)
    shape = geometry.shape
    sigma = None if tof_mm is None else tof_fwhm_mm * FWHM_TO_SIGMA
    out = np.zeros(len(p1_mm))
    for e in range(len(p1_mm)):
        q1 = (p1_mm[e] - org) / vox
        q2 = (p2_mm[e] - org) / vox
        dq = q2 - q1
        L = float(np.linalg.norm(p2_mm[e] - p1_mm[e]))
        a = int(np.argmax(np.abs(dq)))
        b, c = [k for k in range(3) if k != a]
        total = 0.0
        for i in range(shape[a]):
            r = (i - q1[a]) / dq[a]
            qb = q1[b] + r * dq[b]
            qc = q1[c] + r * dq[c]
            wgt = L / abs(dq[a])
            if sigma is not None:
                delta = (L / 2 - r * L) - tof_mm[e]
                if abs(delta) > truncation_sigma * sigma:
                    continue
                wgt *= math.exp(-0.5 * (delta / sigma) ** 2) / (
                    math.sqrt(2 * math.pi) * sigma * math.erf(truncation_sigma / math.sqrt(2)))
            jb, jc = math.floor(qb), math.floor(qc)
            fb, fc = qb - jb, qc - jc
            for db, dc, wbc in ((0, 0, (1 - fb) * (1 - fc)), (1, 0, fb * (1 - fc)),
                                (0, 1, (1 - fb) * fc), (1, 1, fb * fc)):
                kb, kc = jb + db, jc + dc
                if 0 <= kb < shape[b] and 0 <= kc < shape[c]:
                    ijk = [0, 0, 0]
                    ijk[a], ijk[b], ijk[c] = i, kb, kc
                    total += wgt * wbc * image[tuple(ijk)]
        out[e] = total
    return out
