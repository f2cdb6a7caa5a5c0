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
:func:`equipet.reconstruction.listmode.tof_offset_mm` for how it comes from GATE times. With
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

Layout of the on-the-fly computation (what makes it fast): per chunk of events, the plane
count of every event is computed first; events are sorted by it and padded in
:data:`GROUPS_PER_CHUNK` groups of similar length (not all to the chunk's longest event);
samples index the image padded by one zero voxel on every side, so that bilinear
neighbours just outside the grid need no mask. :meth:`ListmodeTOFProjector.apply_adjoint`
computes ``A^T h(A x)`` with each chunk's rows computed once (MLEM's update), and
:meth:`ListmodeTOFProjector.to_sparse` stores the matrix as CSR plus the CSR of its
transpose (:class:`SparseSystemMatrix`): both directions are then plain sparse products,
with no atomics, for callers that reuse a fixed set of events many times (the assisted
training of one slice).

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
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

#: events of a chunk are sorted by their number of ray samples and padded in this many groups
GROUPS_PER_CHUNK = 8
#: ... each of at least this many events (fewer groups for small chunks)
MIN_GROUP_EVENTS = 256

#: speed of light, mm per ps
C_MM_PER_PS = 0.299792458
FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))



def _csr(crow: torch.Tensor, col: torch.Tensor, val: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """A torch CSR tensor. torch marks the layout "beta" with a warning at each construction;
    the products used here (CSR @ dense column) are tested against the on-the-fly projector."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        return torch.sparse_csr_tensor(crow, col, val, shape, check_invariants=False)


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
        flat = self.padded_flat(image)
        out = torch.empty(self.n_events, dtype=image.dtype, device=image.device)
        for start, chunk in self._chunks(image.dtype):
            out[start:start + chunk.n_rows] = chunk.apply(flat)
        return out

    def adjoint(self, values: torch.Tensor) -> torch.Tensor:
        """Back projection ``A^T y``: ``(N,)`` -> image ``(nx, ny, nz)``."""
        flat = torch.zeros(self._padded_voxels, dtype=values.dtype, device=values.device)
        for start, chunk in self._chunks(values.dtype):
            chunk.adjoint_add_(values[start:start + chunk.n_rows], flat)
        return self.unpad(flat).contiguous()

    def apply_adjoint(self, image: torch.Tensor,
                      per_event: Callable[[torch.Tensor, int], torch.Tensor]) -> torch.Tensor:
        """``A^T h(A x)`` for a per-event function ``h``, computing each chunk's matrix once.

        ``per_event(ax_chunk, start)`` gets ``(A x)_e`` for the events ``start .. start + M - 1``
        and returns the values to back-project for them (e.g. ``1 / (A x)_e`` in MLEM). Equal to
        ``adjoint(h(apply(x)))`` whenever ``h`` acts event by event, at half the cost of the
        system matrix when it is computed on the fly.
        """
        flat = self.padded_flat(image)
        back = torch.zeros_like(flat)
        for start, chunk in self._chunks(image.dtype):
            chunk.adjoint_add_(per_event(chunk.apply(flat), start), back)
        return self.unpad(back).contiguous()

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """Differentiable forward projection (autograd uses :meth:`adjoint` as the backward)."""
        return ProjectFunction.apply(image, self)

    def to_sparse(self, dtype: torch.dtype = torch.float32) -> "SparseSystemMatrix":
        """The whole system matrix, stored (CSR and its transpose); see :class:`SparseSystemMatrix`."""
        chunks = [chunk for _, chunk in self._chunks(dtype, use_cache=False)]
        return SparseSystemMatrix.from_chunks(chunks, self.geometry)

    # ---- on-the-fly system matrix -------------------------------------------------------
    def _chunks(self, dtype: torch.dtype, use_cache: bool = True):
        """Yield ``(start, SystemRows)`` for consecutive chunks of at most ``chunk_size`` events."""
        for start in range(0, self.n_events, self.chunk_size):
            cached = self._cache.get(start) if use_cache and dtype == self._cache_dtype else None
            if cached is not None:
                yield start, cached
                continue
            stop = min(start + self.chunk_size, self.n_events)
            p1 = self.p1[start:stop].to(dtype)
            p2 = self.p2[start:stop].to(dtype)
            tof = None if self.tof is None else self.tof[start:stop].to(dtype)
            chunk = self._system_chunk(p1, p2, tof)
            if use_cache and self.cache_mb > 0 and self._cache_dtype in (None, dtype):
                if self._cache_bytes + chunk.nbytes <= self.cache_mb * 1e6:
                    self._cache[start] = chunk
                    self._cache_bytes += chunk.nbytes
                    self._cache_dtype = dtype
            yield start, chunk

    def _system_chunk(self, p1: torch.Tensor, p2: torch.Tensor, tof: torch.Tensor | None) -> "SystemRows":
        """The rows of ``A`` for the events ``(p1, p2, tof)`` (see :class:`SystemRows`).

        Per event, the planes ``i`` of its dominant axis that the LOR crosses inside the grid
        (with a one-voxel halo along ``b`` and ``c``, where bilinear neighbours can still be
        inside) and inside the truncated TOF window are counted. The events are then sorted by
        that count and cut into :data:`GROUPS_PER_CHUNK` groups, each padded only to its own
        longest event: the padding of a chunk to its single longest event cost about a third
        of the work.
        """
        ev = self._event_rays(p1, p2, tof)
        M = p1.shape[0]
        order = torch.argsort(ev["count"])
        order = order[int((ev["count"] == 0).sum()):]      # events that miss the grid project to 0
        n = order.shape[0]
        bounds = np.linspace(0, n, min(GROUPS_PER_CHUNK, max(1, n // MIN_GROUP_EVENTS)) + 1).round().astype(int)
        # one gather per group for all per-event values (floats and integers kept in two tables)
        fkeys = [k for k, v in ev.items() if v.is_floating_point()]
        ikeys = [k for k in ev if k not in fkeys]
        ftab = torch.stack([ev[k] for k in fkeys], dim=1)
        itab = torch.stack([ev[k] for k in ikeys], dim=1)
        blocks = []
        for a, b in zip(bounds[:-1], bounds[1:]):
            if b > a:
                rows = order[a:b]
                r = dict(zip(fkeys, ftab[rows].unbind(1))) | dict(zip(ikeys, itab[rows].unbind(1)))
                idx, wt = self._ray_samples(r, tof is not None)
                blocks.append((rows, idx, wt))
        return SystemRows(M, self.geometry, blocks)

    def _event_rays(self, p1: torch.Tensor, p2: torch.Tensor, tof: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Per-event ray parameters (dominant axis, plane range, strides) of the Joseph model."""
        g = self.geometry
        dev, dt = p1.device, p1.dtype
        shape = torch.tensor(g.shape, device=dev)
        vox = torch.tensor(g.voxel_size_mm, dtype=dt, device=dev)
        org = torch.tensor(g.origin_mm, dtype=dt, device=dev)
        ps = self._padded_shape                    # samples index the zero-padded image
        strides = torch.tensor((ps[1] * ps[2], ps[2], 1), device=dev)
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
        sa, sb, sc = (strides[axes[:, k]] for k in range(3))
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
        out = {}
        if tof is not None:
            half = self.truncation_sigma * self.sigma_mm
            t_centre = 0.5 * length - tof                  # distance from p1 of the TOF centre
            s1 = qa1 + (t_centre - half) / length.clamp_min(1e-12) * dqa
            s2 = qa1 + (t_centre + half) / length.clamp_min(1e-12) * dqa
            lo = torch.maximum(lo, torch.minimum(s1, s2))
            hi = torch.minimum(hi, torch.maximum(s1, s2))
            out["tof"] = tof
        i_lo = torch.ceil(lo)
        count = torch.where(ok, torch.floor(hi) - i_lo + 1, torch.zeros_like(lo)).clamp_min(0).to(torch.int64)
        out.update(count=count, i_lo=i_lo, qa1=qa1, qb1=qb1, qc1=qc1, kb=kb, kc=kc, length=length,
                   dqa=dqa_safe, na=na, nb=nb, nc=nc, sa=sa, sb=sb, sc=sc)
        return out

    def _ray_samples(self, r: dict[str, torch.Tensor], use_tof: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded samples ``(index (m, S, 4), weight (m, S, 4))`` of the events ``r`` (from
        :meth:`_event_rays`), indexing the image padded by one zero voxel on every side
        (:meth:`padded_flat`): a bilinear neighbour just outside the grid then lands on the
        zero border instead of needing a mask. Samples beyond an event's count repeat its last
        plane with weight 0."""
        count, i_lo, qa1, dqa, length = r["count"], r["i_lo"], r["qa1"], r["dqa"], r["length"]
        dev, dt = qa1.device, qa1.dtype
        m = count.shape[0]
        n_steps = max(int(count.max()) if m > 0 else 0, 1)
        steps = torch.arange(n_steps, device=dev)
        valid = (steps[None, :] < count[:, None]).to(dt)                  # (m, S)
        ia = i_lo[:, None] + torch.minimum(steps[None, :], (count - 1)[:, None]).to(dt)
        rel = ia - qa1[:, None]
        b = r["qb1"][:, None] + rel * r["kb"][:, None]
        c = r["qc1"][:, None] + rel * r["kc"][:, None]
        b0 = torch.minimum(torch.floor(b).clamp_min(-1.0), (r["nb"] - 1).to(dt)[:, None])
        c0 = torch.minimum(torch.floor(c).clamp_min(-1.0), (r["nc"] - 1).to(dt)[:, None])
        fb = (b - b0).clamp(0.0, 1.0)        # (clamped: a rounding step past the halo -> border)
        fc = (c - c0).clamp(0.0, 1.0)
        # path length per plane, and TOF kernel
        w = (length / dqa.abs())[:, None] * valid
        if use_tof:
            t = rel / dqa[:, None] * length[:, None]                    # distance from p1, mm
            delta = (0.5 * length[:, None] - t) - r["tof"][:, None]
            norm = 1.0 / (math.sqrt(2.0 * math.pi) * self.sigma_mm
                          * math.erf(self.truncation_sigma / math.sqrt(2.0)))
            kern = torch.exp((-0.5 / self.sigma_mm ** 2) * delta * delta) * norm
            w = w * torch.where(delta.abs() <= self.truncation_sigma * self.sigma_mm, kern, 0.0)

        # flat index in the padded image of neighbour (0, 0), in float (exact below 2**24)
        # then once to int, plus the offsets of the 2 x 2 neighbours (0,0) (1,0) (0,1) (1,1)
        sa, sb, sc = (r[k].to(dt) for k in ("sa", "sb", "sc"))
        base = (ia + 1.0) * sa[:, None] + (b0 + 1.0) * sb[:, None] + (c0 + 1.0) * sc[:, None]
        it = torch.int32 if self._padded_voxels < 2**31 else torch.int64
        offs = torch.stack((torch.zeros_like(r["sb"]), r["sb"], r["sc"], r["sb"] + r["sc"]), dim=1).to(it)
        idx = base.to(it)[:, :, None] + offs[:, None, :]
        wb1 = w * fb
        wb0 = w - wb1
        wt = torch.stack((wb0 - wb0 * fc, wb1 - wb1 * fc, wb0 * fc, wb1 * fc), dim=-1)
        return idx, wt

    @property
    def _padded_shape(self) -> tuple[int, int, int]:
        return tuple(n + 2 for n in self.geometry.shape)

    @property
    def _padded_voxels(self) -> int:
        return int(np.prod(self._padded_shape))

    def padded_flat(self, image: torch.Tensor) -> torch.Tensor:
        """The image with one zero voxel added on every side, as one vector."""
        return torch.nn.functional.pad(image.reshape(self.geometry.shape), (1, 1, 1, 1, 1, 1)).reshape(-1)

    def unpad(self, flat_padded: torch.Tensor) -> torch.Tensor:
        """The inner ``geometry.shape`` part of a padded image vector."""
        return flat_padded.reshape(self._padded_shape)[1:-1, 1:-1, 1:-1]


class SystemRows:
    """Rows ``A[start : start + M]`` of the system matrix, in padded blocks of similar length.

    ``blocks`` is a list of ``(rows (m,), index (m, S, 4), weight (m, S, 4))``: event
    ``rows[k]`` (within the chunk) touches the voxels ``index[k]`` of the zero-padded image
    (:meth:`ListmodeTOFProjector.padded_flat`) with ``weight[k]``; padding carries weight 0.
    Events that miss the grid are in no block (their projection is 0).
    """

    def __init__(self, n_rows: int, geometry: ImageGeometry,
                 blocks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]):
        self.n_rows, self.geometry, self.blocks = int(n_rows), geometry, blocks

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for blk in self.blocks for t in blk)

    def apply(self, flat_padded: torch.Tensor) -> torch.Tensor:
        """``A x`` for these rows; ``flat_padded`` is the zero-padded image as one vector."""
        out = flat_padded.new_zeros(self.n_rows)
        for rows, idx, wt in self.blocks:
            out[rows] = (flat_padded[idx] * wt).sum(dim=(1, 2))
        return out

    def adjoint_add_(self, values: torch.Tensor, flat_padded: torch.Tensor) -> None:
        """``flat_padded += A^T values`` for these rows."""
        for rows, idx, wt in self.blocks:
            flat_padded.index_add_(0, idx.reshape(-1), (wt * values[rows][:, None, None]).reshape(-1))

    def coo(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(row, col, val)`` of the non-zero weights inside the grid (``col`` indexes the
        unpadded image), sorted by row."""
        if not self.blocks:
            empty = torch.zeros(0, dtype=torch.int64)
            return empty, empty, torch.zeros(0)
        nx, ny, nz = self.geometry.shape
        rows = torch.cat([r[:, None, None].expand_as(i).reshape(-1) for r, i, _ in self.blocks])
        col = torch.cat([i.reshape(-1) for _, i, _ in self.blocks]).to(torch.int64)
        val = torch.cat([w.reshape(-1) for _, _, w in self.blocks])
        i, rem = col // ((ny + 2) * (nz + 2)) - 1, col % ((ny + 2) * (nz + 2))
        j, k = rem // (nz + 2) - 1, rem % (nz + 2) - 1
        keep = (val != 0) & (i >= 0) & (i < nx) & (j >= 0) & (j < ny) & (k >= 0) & (k < nz)
        rows, val = rows[keep], val[keep]
        col = (i * (ny * nz) + j * nz + k)[keep]
        order = torch.argsort(rows, stable=True)
        return rows[order], col[order], val[order]


class SparseSystemMatrix:
    """A stored system matrix ``A`` (N events x V voxels): CSR of ``A`` and CSR of ``A^T``.

    Built once from a :class:`ListmodeTOFProjector` (:meth:`ListmodeTOFProjector.to_sparse`),
    it holds exactly the projector's weights (same rays, same TOF kernel), so ``apply`` and
    ``adjoint`` equal the on-the-fly ones to float rounding. Both directions are CSR
    products: one pass over the rows of ``A`` or of ``A^T``, no scatter and no atomics.
    Memory: 8 bytes per non-zero for each of the two (int32 column index + float32 weight).
    ``A^T`` is built from ``A`` when first needed (a matrix that is only split into
    :meth:`subsets` never builds its own), and :meth:`state_dict` stores ``A`` alone.

    :meth:`subsets` splits the events into blocks of rows, each again a
    ``SparseSystemMatrix``, for stochastic (subset) objectives. Devices: the matrix lives
    where its tensors are (:meth:`to`).
    """

    def __init__(self, crow: torch.Tensor, col: torch.Tensor, val: torch.Tensor, geometry: ImageGeometry,
                 transpose: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None):
        self.geometry = geometry
        n_rows = int(crow.numel()) - 1
        self.crow, self.col, self.val = crow, col, val
        self.A = _csr(crow, col, val, (n_rows, geometry.n_voxels))
        self._transpose = transpose
        self._AT: torch.Tensor | None = None

    @property
    def transpose_parts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """CSR arrays ``(crow, col, val)`` of ``A^T`` (built on first use)."""
        if self._transpose is None:
            at = self.A.to_sparse_coo().t().coalesce()   # (V, N), sorted by voxel
            r, c = at.indices()
            counts = torch.bincount(r, minlength=self.geometry.n_voxels)
            tcrow = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)]).to(self.crow.dtype)
            self._transpose = (tcrow, c.to(self.col.dtype), at.values())
        return self._transpose

    @property
    def AT(self) -> torch.Tensor:
        """``A^T`` as a sparse CSR tensor (built on first use)."""
        if self._AT is None:
            self._AT = _csr(*self.transpose_parts, (self.geometry.n_voxels, self.n_events))
        return self._AT

    @classmethod
    def from_chunks(cls, chunks: Sequence[SystemRows], geometry: ImageGeometry) -> "SparseSystemMatrix":
        """Concatenate the non-zero weights of consecutive chunks of rows into one CSR matrix."""
        if not chunks:
            raise ValueError("no events: an empty system matrix")
        it = torch.int32 if geometry.n_voxels < 2**31 else torch.int64
        counts, cols, vals = [], [], []
        for ch in chunks:
            r, c, v = ch.coo()
            counts.append(torch.bincount(r, minlength=ch.n_rows))
            cols.append(c.to(it))
            vals.append(v)
        counts = torch.cat(counts)
        crow = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)]).to(it)
        return cls(crow, torch.cat(cols), torch.cat(vals), geometry)

    @property
    def n_events(self) -> int:
        return int(self.crow.numel()) - 1

    @property
    def nnz(self) -> int:
        return int(self.val.numel())

    @property
    def device(self) -> torch.device:
        return self.val.device

    @property
    def nbytes(self) -> int:
        parts = (self.crow, self.col, self.val, *(self._transpose or ()))
        return sum(t.numel() * t.element_size() for t in parts)

    def to(self, device: torch.device | str) -> "SparseSystemMatrix":
        mv = lambda t: t.to(device)  # noqa: E731
        return SparseSystemMatrix(mv(self.crow), mv(self.col), mv(self.val), self.geometry,
                                  None if self._transpose is None else tuple(mv(t) for t in self._transpose))

    def apply(self, image: torch.Tensor) -> torch.Tensor:
        """``A x``: image -> ``(N,)``."""
        return (self.A @ image.reshape(-1, 1).to(self.val.dtype))[:, 0]

    def adjoint(self, values: torch.Tensor) -> torch.Tensor:
        """``A^T y``: ``(N,)`` -> image."""
        return (self.AT @ values.reshape(-1, 1).to(self.val.dtype))[:, 0].reshape(self.geometry.shape)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """Differentiable ``A x`` (the backward is :meth:`adjoint`)."""
        return ProjectFunction.apply(image, self)

    def rows(self, start: int, stop: int) -> "SparseSystemMatrix":
        """The block of events ``start .. stop - 1`` as its own matrix (its transpose is built)."""
        a, b = int(self.crow[start]), int(self.crow[stop])
        return SparseSystemMatrix(self.crow[start:stop + 1] - self.crow[start], self.col[a:b], self.val[a:b],
                                  self.geometry)

    def subsets(self, n_subsets: int) -> list["SparseSystemMatrix"]:
        """Split the events into ``n_subsets`` contiguous blocks of (nearly) equal size."""
        bounds = np.linspace(0, self.n_events, int(n_subsets) + 1).round().astype(int)
        return [self.rows(a, b) for a, b in zip(bounds[:-1], bounds[1:])]

    def state_dict(self) -> dict:
        """CSR of ``A`` and the geometry, for ``torch.save`` (loads with ``weights_only=True``);
        ``A^T`` is derived again on loading, when needed."""
        g = self.geometry
        return {"crow": self.crow, "col": self.col, "val": self.val,
                "shape": list(g.shape), "voxel_size_mm": list(g.voxel_size_mm), "origin_mm": list(g.origin_mm)}

    @classmethod
    def from_state_dict(cls, d: dict) -> "SparseSystemMatrix":
        g = ImageGeometry(tuple(int(v) for v in d["shape"]), tuple(float(v) for v in d["voxel_size_mm"]),
                          tuple(float(v) for v in d["origin_mm"]))
        transpose = (d["t_crow"], d["t_col"], d["t_val"]) if "t_crow" in d else None   # older files kept A^T
        return cls(d["crow"], d["col"], d["val"], g, transpose)


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
