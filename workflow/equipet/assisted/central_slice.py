"""The central axial slice of one acquisition: network input, truth, baselines and its data.

Paper III-C trains the networks on "a single central slice of the MLEM-reconstructed image"
after two MLEM iterations. :func:`extract_slice` gathers everything the assisted training
and its evaluation need for one CTR into one ``slice.npz``:

* the slab of MLEM voxels ``k0 .. k0 + n - 1`` (``n = assisted.slice_voxels``, ``k0`` from
  ``assisted.slice_index``, default the central ``nz // 2``) averaged into one slice, for
  every MLEM iteration (``mlem``, ``(n_it, nx, ny)``; the early one is the network input);
* the phantom's ground truth on the same slab (``truth``, Bq/mL);
* the *slice geometry*: an :class:`~equipet.reconstruction.projector.ImageGeometry` of shape
  ``(nx, ny, 1)`` whose single voxel layer has thickness ``n * voxel`` and is centred on the
  slab. For ``n = 1`` the single-slice Joseph TOF projector on it is *exactly* the 3-D
  projector applied to an image that is zero outside slice ``k0`` (same dominant axes,
  planes and interpolation weights; ``tests/test_central_slice.py``);
* the measured events of that slice: the list-mode events whose LOR (with the
  projector's one-voxel interpolation halo) crosses the slab box, and whose single-slice
  projection of a uniform image is non-zero (the others do not depend on the slice);
  optionally a uniform random subset of ``max_events`` of them, whose fraction
  ``event_fraction`` scales the sensitivity term of the likelihood; stored in random order
  (``assisted.event_seed``), so that consecutive blocks are random subsets;
* ``background``: for each kept event the contribution of the activity *outside* the slab,
  ``[A_3D x_MLEM^{last}]_e`` with the slab zeroed (``assisted.out_of_slice``;
  ``background_out_of_slab``), plus, with ``mlem.corrections``, the randoms and scatter term
  ``(r_e + s_e) / eta_e`` that MLEM used for the event (its ``additive.npz``;
  ``background_additive``), so that the slice's expected event density is
  ``(A_slice x)_e + b_e``, the same model as the 3-D MLEM's;
* ``sensitivity``: the slab's sum of the 3-D sensitivity image (for ``n = 1`` exactly the
  sensitivity of the single-slice model);
* with ``l2`` among ``assisted.methods``: Monte Carlo LORs ``mc_p1, mc_p2, mc_tof`` (uniform crystal
  pairs crossing the slab, uniform TOF offsets on ``[-T/2, T/2]``), their out-of-slab term
  ``mc_background`` and the measure ``mc_weight`` of each sample, for the quadratic term
  of the least-squares loss (:class:`equipet.assisted.methods.ListmodeLeastSquaresLoss`), and the
  attenuation factors ``eta``, ``mc_eta`` (``exp(-int mu)`` along each LOR) that the squared
  error needs (in the Poisson likelihood a per-event factor cancels, as in MLEM).

``equipet-central-slice --system-out system.pt`` also stores the slice's system matrix for
those events (:func:`slice_system_matrix`: CSR of ``A``; ``A^T`` is derived on loading), built once per CTR
and reused by every model and seed of the ``poisson`` method.

``equipet-central-slice`` also scores the MLEM-only baselines a physicist would use without a
network (``baselines.csv``): MLEM at the early iteration, at its best iteration (lowest
NRMSE against the truth, an oracle choice) and that iteration with the Gaussian post-filter
(FWHM from ``assisted.metrics.gauss_fwhm_mm``) of lowest NRMSE.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from equipet.errors import ConfigError, InputDataError
from equipet.files import atomic_path
from equipet.reconstruction.projector import ImageGeometry, ListmodeTOFProjector, SparseSystemMatrix

log = logging.getLogger("equipet.assisted.central_slice")

FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))


def slab_range(nz: int, slice_index: int | None, slice_voxels: int) -> tuple[int, int]:
    """``(k0, k1)``: the slab of MLEM planes ``k0 <= k < k1`` averaged into the slice.

    >>> slab_range(8, None, 1), slab_range(8, None, 3), slab_range(16, 2, 1)
    ((4, 5), (3, 6), (2, 3))
    """
    centre = nz // 2 if slice_index is None else int(slice_index)
    k0 = centre - slice_voxels // 2
    k1 = k0 + slice_voxels
    if k0 < 0 or k1 > nz:
        raise ConfigError(f"slab {k0}..{k1 - 1} is outside the {nz} image planes",
                          where="assisted.slice_index / assisted.slice_voxels",
                          fix=f"choose slice_index and slice_voxels within 0..{nz - 1}")
    return k0, k1


def slice_geometry(geometry: ImageGeometry, k0: int, k1: int) -> ImageGeometry:
    """Single-layer geometry ``(nx, ny, 1)`` covering planes ``k0 .. k1 - 1`` of ``geometry``."""
    vz = geometry.voxel_size_mm[2]
    z_centre = geometry.origin_mm[2] + vz * (k0 + k1 - 1) / 2.0
    return ImageGeometry((geometry.shape[0], geometry.shape[1], 1),
                         (geometry.voxel_size_mm[0], geometry.voxel_size_mm[1], vz * (k1 - k0)),
                         (geometry.origin_mm[0], geometry.origin_mm[1], z_centre))


def lors_crossing(p1: np.ndarray, p2: np.ndarray, geometry: ImageGeometry) -> np.ndarray:
    """Whether each LOR crosses ``geometry``'s box with its one-voxel interpolation halo."""
    from equipet.reconstruction.geometry import lor_hits_box

    org = np.asarray(geometry.origin_mm)
    vox = np.asarray(geometry.voxel_size_mm)
    n = np.asarray(geometry.shape)
    return lor_hits_box(np.asarray(p1, np.float64), np.asarray(p2, np.float64), org - vox, org + n * vox)


def out_of_slab_projection(image3d: np.ndarray, geometry: ImageGeometry, k0: int, k1: int,
                           p1: np.ndarray, p2: np.ndarray, tof: np.ndarray | None, fwhm_mm: float | None,
                           truncation_sigma: float, chunk_size: int) -> np.ndarray:
    """``A_3D x`` for the given LORs with planes ``k0 .. k1 - 1`` of ``x`` zeroed."""
    x = torch.as_tensor(np.asarray(image3d, dtype=np.float32)).clone()
    x[:, :, k0:k1] = 0
    proj = ListmodeTOFProjector(geometry, torch.as_tensor(p1, dtype=torch.float32),
                                torch.as_tensor(p2, dtype=torch.float32),
                                None if tof is None else torch.as_tensor(tof, dtype=torch.float32),
                                fwhm_mm, truncation_sigma, chunk_size)
    with torch.no_grad():
        return proj.apply(x).numpy().astype(np.float32)


def sample_slice_lors(scanner: Any, geometry2d: ImageGeometry, n_lors: int, tof_range_mm: float,
                      rng: np.random.Generator, block: int = 1 << 20,
                      max_draws: int = 2_000_000_000) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Uniform Monte Carlo samples of (LOR, TOF offset) space restricted to LORs crossing the slab.

    Ordered crystal pairs ``(i, j)`` are drawn uniformly from all ``N^2`` pairs and kept when
    their LOR crosses the slab box; TOF offsets are uniform on ``[-T/2, T/2]``. Returns
    ``p1, p2, tof, weight`` where ``weight = N^2 / 2 * T / n_draws`` is the measure each sample
    stands for, so that ``sum_samples w f(L, tau)`` estimates ``sum_{unordered LORs} int f dtau``.
    """
    centres = scanner.all_crystal_centres_mm()
    n_cry = len(centres)
    kept1, kept2, drawn, n_kept = [], [], 0, 0
    while n_kept < n_lors and drawn < max_draws:
        i = rng.integers(0, n_cry, block)
        j = rng.integers(0, n_cry, block)
        drawn += block
        hit = (i != j) & lors_crossing(centres[i], centres[j], geometry2d)
        kept1.append(centres[i[hit]])
        kept2.append(centres[j[hit]])
        n_kept += int(hit.sum())
    p1 = np.concatenate(kept1)[:n_lors]
    p2 = np.concatenate(kept2)[:n_lors]
    # the draws beyond the n_lors-th kept sample are not counted: rescale by the kept fraction used
    used_draws = drawn * len(p1) / max(n_kept, 1)
    tof = rng.uniform(-tof_range_mm / 2.0, tof_range_mm / 2.0, len(p1))
    weight = n_cry * float(n_cry) / 2.0 * tof_range_mm / used_draws
    return p1.astype(np.float32), p2.astype(np.float32), tof.astype(np.float32), float(weight)


def _iteration_files(mlem_dir: Path) -> dict[int, Path]:
    files = {}
    for path in mlem_dir.glob("mlem_it*.nii*"):
        m = re.search(r"mlem_it(\d+)\.nii", path.name)
        if m:
            files[int(m.group(1))] = path
    if not files:
        raise InputDataError("no mlem_it{n}.nii.gz images", where=str(mlem_dir),
                             fix="run the mlem rule for this CTR first")
    return dict(sorted(files.items()))


def _load_nifti(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    import nibabel as nib

    data = np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)
    if data.shape != tuple(shape):
        raise InputDataError(f"image grid {data.shape} differs from the mlem grid {tuple(shape)}",
                             where=str(path), fix="rerun the reconstruction with the current mlem settings")
    return data


def extract_slice(cfg: Mapping[str, Any], mlem_dir: Path, sensitivity_path: Path, coincidences: Path,
                  ctr_ps: float, additive_path: Path | None = None) -> dict[str, np.ndarray]:
    """Everything the assisted training of one CTR needs (module doc), as a dict of arrays.

    ``additive_path`` is MLEM's ``additive.npz`` (per-event randoms and scatter term); it is
    required when ``mlem.corrections`` is not empty.
    """
    from equipet.reconstruction.corrections import check_corrections
    from equipet.reconstruction.listmode import read_listmode
    from equipet.reconstruction.mlem import load_additive
    from equipet.reconstruction.system import SystemModel, sensitivity_doi_sigma_mm
    from equipet.simulation.phantom import hot_rod_phantom

    sec, mlem = cfg["assisted"], cfg["mlem"]
    model = SystemModel.from_config(cfg, torch.device("cpu"), ctr_ps, with_efficiency=False)
    model.doi_sigma_mm = sensitivity_doi_sigma_mm(sensitivity_path)
    geom = model.geometry
    k0, k1 = slab_range(geom.shape[2], sec["slice_index"], sec["slice_voxels"])
    g2 = slice_geometry(geom, k0, k1)
    files = _iteration_files(mlem_dir)
    if sec["early_iterations"] not in files:
        raise ConfigError(f"no MLEM image for iteration {sec['early_iterations']} in {mlem_dir}",
                          where="assisted.early_iterations", fix="keep it <= mlem.iterations")
    iterations = np.asarray(list(files))
    volumes = {it: _load_nifti(p, geom.shape) for it, p in files.items()}
    stack = np.stack([volumes[it][:, :, k0:k1].mean(axis=2) for it in iterations]).astype(np.float32)
    last = volumes[int(iterations[-1])]

    ph = hot_rod_phantom(cfg["phantom"])
    truth = ph.voxelise(geom.voxel_size_mm[0], shape=geom.shape).activity_bq_per_ml[:, :, k0:k1].mean(axis=2)

    sens3d = _load_nifti(sensitivity_path, geom.shape)
    sensitivity = sens3d[:, :, k0:k1].sum(axis=2).astype(np.float32)

    scanner = model.scanner
    window = tuple(mlem["energy_window_kev"]) if mlem.get("energy_window_kev") else None
    ev = read_listmode(coincidences, scanner, mlem["events"], mlem["lor_endpoints"], window, mlem["read_step_size"])
    n_total = len(ev)
    additive = None
    if check_corrections(mlem.get("corrections") or [], mlem["events"]):
        if additive_path is None:
            raise ConfigError("mlem.corrections is not empty but no MLEM additive term was given",
                              where="equipet-central-slice --additive",
                              fix="pass the additive.npz that equipet-mlem wrote for this CTR")
        additive = load_additive(additive_path, n_total, float(np.sum(ev.tof_mm, dtype=np.float64)))
    index = np.arange(n_total)   # read-order index of each kept event, through every selection below
    crossing = lors_crossing(ev.p1_mm, ev.p2_mm, g2)
    ev, index = ev.subset(crossing), index[crossing]
    fwhm = model.tof_fwhm_mm
    tof = ev.tof_mm if mlem["tof"] else None
    chunk = model.chunk
    # events whose single-slice projection of a uniform image vanishes do not depend on the slice
    proj = ListmodeTOFProjector(g2, *(torch.as_tensor(a) for a in (ev.p1_mm, ev.p2_mm)),
                                None if tof is None else torch.as_tensor(tof), fwhm,
                                mlem["tof_truncation_sigma"], chunk)
    with torch.no_grad():
        reach = proj.apply(torch.ones(g2.shape)).numpy() > 0
    ev, index = ev.subset(reach), index[reach]
    n_crossing = len(ev)
    rng = np.random.default_rng(sec["event_seed"])
    if sec["max_events"] is not None and n_crossing > sec["max_events"]:
        keep = np.sort(rng.choice(n_crossing, sec["max_events"], replace=False))
        ev, index = ev.subset(keep), index[keep]
    fraction = len(ev) / max(n_crossing, 1)
    # random order: consecutive blocks of events are then random subsets (the stochastic
    # assisted method draws such blocks)
    order = rng.permutation(len(ev))
    ev, index = ev.subset(order), index[order]
    if len(ev) == 0:
        raise InputDataError("no event crosses the slice", where=str(coincidences),
                             fix="check assisted.slice_index and the acquisition")
    tof = ev.tof_mm if mlem["tof"] else None
    if sec["out_of_slice"]:
        background = out_of_slab_projection(last, geom, k0, k1, ev.p1_mm, ev.p2_mm, tof, fwhm,
                                            mlem["tof_truncation_sigma"], chunk)
    else:
        background = np.zeros(len(ev), np.float32)
    event_additive = np.zeros(len(ev), np.float32)
    if additive is not None:
        event_additive = additive[index].astype(np.float32)
        if not np.all(np.isfinite(event_additive)):
            raise InputDataError("the MLEM additive term is undefined for events that cross the slice",
                                 where=str(additive_path), fix="rerun equipet-mlem with the same mlem.fov_mm")
        log.info("randoms + scatter term: %.4g of the slice events' expected density (out-of-slab %.4g)",
                 float(event_additive.sum()), float(background.sum()))
    log.info("ctr %g ps: slab planes %d..%d (z = %.2f mm, %.2f mm thick); %d of %d events cross it, %d kept",
             ctr_ps, k0, k1 - 1, g2.origin_mm[2], g2.voxel_size_mm[2], n_crossing, n_total, len(ev))
    out: dict[str, np.ndarray] = {
        "iterations": iterations, "mlem": stack,
        "early": stack[list(iterations).index(sec["early_iterations"])],
        "early_iteration": np.asarray(sec["early_iterations"]),
        "truth": truth.astype(np.float32), "sensitivity": sensitivity,
        "p1": ev.p1_mm.astype(np.float32), "p2": ev.p2_mm.astype(np.float32),
        "tof": ev.tof_mm.astype(np.float32), "background": background + event_additive,
        "background_out_of_slab": background, "background_additive": event_additive,
        "event_fraction": np.asarray(fraction), "n_events_crossing": np.asarray(n_crossing),
        "n_events_total": np.asarray(n_total), "ctr_ps": np.asarray(float(ctr_ps)),
        "tof_fwhm_mm": np.asarray(np.nan if fwhm is None else fwhm),
        "tof_truncation_sigma": np.asarray(mlem["tof_truncation_sigma"]),
        "geometry_shape": np.asarray(g2.shape), "geometry_voxel_mm": np.asarray(g2.voxel_size_mm),
        "geometry_origin_mm": np.asarray(g2.origin_mm), "slab": np.asarray([k0, k1]),
    }
    if "l2" in sec["methods"]:
        radius = float(np.hypot(*np.asarray(g2.extent_mm[:2]) / 2.0))
        t_range = 2 * radius + (2 * mlem["tof_truncation_sigma"] * fwhm * FWHM_TO_SIGMA if fwhm else 0.0)
        mp1, mp2, mtof, w = sample_slice_lors(scanner, g2, sec["l2_mc_lors"], t_range, rng)
        out.update(mc_p1=mp1, mc_p2=mp2, mc_tof=mtof, mc_weight=np.asarray(w * fraction))
        out["mc_background"] = (out_of_slab_projection(last, geom, k0, k1, mp1, mp2, mtof if fwhm else None, fwhm,
                                                       mlem["tof_truncation_sigma"], chunk)
                                if sec["out_of_slice"] else np.zeros(len(mp1), np.float32))
        with torch.no_grad():   # eta = exp(-int mu) of each LOR (ones without mlem.attenuation)
            for key, a, b in (("eta", ev.p1_mm, ev.p2_mm), ("mc_eta", mp1, mp2)):
                out[key] = model.attenuation(torch.as_tensor(a, dtype=torch.float32),
                                             torch.as_tensor(b, dtype=torch.float32)).numpy().astype(np.float32)
    return out


def geometry_from_npz(data: Mapping[str, np.ndarray]) -> ImageGeometry:
    """The slice geometry stored in ``slice.npz``."""
    return ImageGeometry(tuple(int(v) for v in data["geometry_shape"]),
                         tuple(float(v) for v in data["geometry_voxel_mm"]),
                         tuple(float(v) for v in data["geometry_origin_mm"]))


def slice_projector(data: Mapping[str, np.ndarray], p1: str, p2: str, tof: str, device: torch.device,
                    cache_mb: float = 0.0, chunk_size: int = 8192) -> ListmodeTOFProjector:
    """Single-slice TOF projector (on the fly) for the stored events ``p1, p2, tof`` of ``slice.npz``."""
    fwhm = float(data["tof_fwhm_mm"])
    t = lambda k: torch.as_tensor(data[k], dtype=torch.float32, device=device)  # noqa: E731
    return ListmodeTOFProjector(geometry_from_npz(data), t(p1), t(p2), None if np.isnan(fwhm) else t(tof),
                                None if np.isnan(fwhm) else fwhm, float(data["tof_truncation_sigma"]),
                                chunk_size, cache_mb)


def slice_system_matrix(data: Mapping[str, np.ndarray], device: torch.device | str = "cpu",
                        chunk_size: int = 8192) -> SparseSystemMatrix:
    """The slice's system matrix for its events, stored once per CTR (``system.pt``).

    Exactly the weights of :func:`slice_projector`, kept as CSR of ``A`` (``A^T`` derived when needed)
    (:class:`equipet.reconstruction.projector.SparseSystemMatrix`), in the event order of ``slice.npz``;
    every assisted run of the CTR (each model and seed) reuses it.
    """
    return slice_projector(data, "p1", "p2", "tof", torch.device(device), 0.0, chunk_size).to_sparse()


def write_slice_system_matrix(data: Mapping[str, np.ndarray], cfg: Mapping[str, Any], out: Path) -> SparseSystemMatrix:
    """Build :func:`slice_system_matrix` on the config's device, in the MLEM's event chunks, and
    save it (on the CPU) to ``out`` (``system.pt``) atomically."""
    from equipet.device import select_device
    from equipet.reconstruction.system import chunk_events

    device = select_device(cfg["device"])
    system = slice_system_matrix(data, device, chunk_events(cfg["mlem"], device))
    with atomic_path(out) as tmp:
        torch.save(system.to("cpu").state_dict(), tmp)
    return system


def gaussian_filter_mm(image: np.ndarray, fwhm_mm: float, voxel_mm: float) -> np.ndarray:
    """2-D Gaussian post-filter of FWHM ``fwhm_mm``."""
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(np.asarray(image, np.float64), fwhm_mm * FWHM_TO_SIGMA / voxel_mm, mode="nearest")


def baseline_images(data: Mapping[str, np.ndarray], scorer: Any, gauss_fwhm_mm: Sequence[float]) -> dict[str, Any]:
    """The MLEM-only baselines (module doc): ``{name: (iteration, fwhm_mm or 0, image)}``."""
    its = [int(i) for i in data["iterations"]]
    early = int(data["early_iteration"])
    nrmse = [scorer.score(img)["nrmse"] for img in data["mlem"]]
    best = int(np.nanargmin(nrmse))
    voxel = float(data["geometry_voxel_mm"][0])
    filtered = [(f, gaussian_filter_mm(data["mlem"][best], f, voxel)) for f in gauss_fwhm_mm]
    f_best, img_best = min(filtered, key=lambda fi: scorer.score(fi[1])["nrmse"])
    return {
        "mlem_early": (early, 0.0, data["mlem"][its.index(early)]),
        "mlem_best": (its[best], 0.0, data["mlem"][best]),
        "mlem_best_gauss": (its[best], float(f_best), img_best),
    }


def baseline_rows(cfg: Mapping[str, Any], data: Mapping[str, np.ndarray]) -> tuple[list[dict[str, Any]], dict]:
    """Tidy metric rows of the baselines (``experiment=assisted``, ``model=mlem_*``, ``seed=0``,
    ``epoch`` = the MLEM iteration, ``split=baseline``) and the images."""
    from equipet.assisted.rod_metrics import SliceScorer

    g2 = geometry_from_npz(data)
    scorer = SliceScorer(cfg["phantom"], g2, data["truth"], cfg["mlem"]["metrics"], cfg["assisted"]["metrics"])
    images = baseline_images(data, scorer, cfg["assisted"]["metrics"]["gauss_fwhm_mm"])
    rows: list[dict[str, Any]] = []
    ctr = float(data["ctr_ps"])
    for name, (it, fwhm, img) in images.items():
        rows += scorer.tidy(scorer.score(img), experiment="assisted", model=name, seed=0, epoch=it,
                            ctr_ps=ctr, split="baseline", filter_fwhm_mm=fwhm)
    for it, img in zip(data["iterations"], data["mlem"]):   # every iteration, for the curves
        rows += scorer.tidy(scorer.score(img), experiment="assisted", model="mlem", seed=0, epoch=int(it),
                            ctr_ps=ctr, split="mlem_iteration", filter_fwhm_mm=0.0)
    return rows, images
