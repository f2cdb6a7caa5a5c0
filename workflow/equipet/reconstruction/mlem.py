"""List-mode TOF MLEM/OSEM with an on-the-fly system matrix, and its sensitivity image.

**Model.** Event ``e`` (a LOR with a TOF offset) has the expected density
``\\bar y_e = \\eta_e \\sum_j a_{ej} x_j``, with ``a_{ej}`` the TOF Joseph weights of
:class:`equipet.reconstruction.projector.ListmodeTOFProjector` and ``\\eta_e = \\exp(-\\int_{LOR_e}\\mu)``
the attenuation of its LOR, times ``n_e`` its crystal-pair efficiency when ``mlem.normalisation``
is on (:mod:`equipet.reconstruction.normalisation`; both written ``eta_e`` below). The list-mode EM update is

.. math::

    x^{k+1}_j = \\frac{x^k_j}{s_j} \\sum_e \\frac{\\eta_e a_{ej}}{\\eta_e \\sum_i a_{ei} x^k_i}
              = \\frac{x^k_j}{s_j} \\big[A^T (1 / A x^k)\\big]_j,
    \\qquad s_j = \\sum_{\\text{all LORs } L} \\eta_L \\, \\bar a_{Lj}.

With all prompts (:mod:`equipet.reconstruction.corrections`) the denominator becomes
``\\eta_e \\sum_i a_{ei} x_i + r_e + s_e`` (randoms and scatter densities per element pair and
mm of TOF offset), i.e. ``A x + b`` with ``b_e = (r_e + s_e)/\\eta_e`` once ``\\eta_e`` is divided out.

Any per-event factor (here ``\\eta_e``, and the normalisation of the TOF kernel) cancels
between numerator and denominator, so the event loop uses the plain TOF projector and
attenuation enters **only** through the sensitivity ``s`` (this is attenuation
correction). ``\\bar a_{Lj}`` is the non-TOF weight: the TOF kernel integrates to one over
the TOF offset, so summing over all possible TOF values gives the non-TOF projector.
OSEM with ``M`` subsets (events split by index modulo ``M``) uses ``s / M`` per subset.
Events whose ``A x^k`` is 0 contribute nothing. The image is in arbitrary units (no
absolute calibration); CRC and COV do not depend on the scale.

**Sensitivity by Monte Carlo.** The exact sum runs over all detection-element pairs
(253,440^2 / 2 ~ 3e10 LORs for the default scanner), too many even on a GPU every time
the settings change. :func:`sensitivity_image` estimates it without bias:

* *candidate rsector offsets* ``D``: those ``delta`` for which some transaxial line between
  crystal centres of rsector 0 and rsector ``delta`` (any pixel, any DOI layer) passes within
  the image's bounding circle plus one voxel of the axis. Pairs outside ``D`` cannot touch
  the image, so leaving them out is exact;
* ordered pairs ``(i, j)`` are drawn uniformly from ``{all i} x {j in rsector(i) + D}``, a
  set of ``N |D| E_r`` pairs (``E_r`` elements per rsector); every unordered pair appears
  twice, so ``s ~ N |D| E_r / (2 n) * sum_samples eta a``;
* drawn pairs whose LOR misses the image box contribute exactly 0 and are dropped before
  projecting; the number of draws ``n`` is fixed from ``sensitivity_lors`` and a separate
  pilot estimate of the hit fraction (pilot draws are not reused, so the estimate stays
  unbiased).

The estimate carries Monte Carlo noise: relative standard deviation about
``1/sqrt(number of sampled LORs through the voxel)``. Averaging over the symmetries the
scanner, the centred grid and the (cylindrical) mu-map share (mirrors in x, y, z and the
90-degree rotation: up to 16 elements, :func:`symmetry_ops`) divides the variance by up to
16 (measured: 5e5 LORs on the quick 130 x 130 x 8 image give 1.5% per voxel; 2e7 on the default
grid are expected near 0.3%). It is measured from ``sensitivity_batches`` independent batches,
logged and stored in the sidecar JSON. In MLEM it multiplies the image as a fixed pattern
(``x ~ x_true * s_true / s``), so it adds that much voxel noise to every iteration; raise
``sensitivity_lors`` (cheap on a GPU) to reduce it.

Approximations (documented, not hidden): with ``mlem.normalisation.enabled: false`` every
crystal pair counts with equal detection efficiency, although the simulated detector is not
uniform: penetration makes the front DOI layer detect about 65% of the photons and the back one
35%, and oblique pairs and the axial end rings differ. With it on, the efficiency of each pair
is the product of per-end components (DOI layer, axial ring, incidence angle) fitted to a
simulated blank scan (:mod:`equipet.reconstruction.normalisation`). With ``lor_endpoints=global`` the events'
LORs end at exact interaction points while ``s`` is still summed over crystal-centre LORs.

The sidecar ``<sensitivity>.json`` holds the settings it was computed for (scanner,
phantom mu-map, image grid, sampling) and their hash; :func:`load_sensitivity` refuses a
file whose key does not match the current settings, so a stale cache never enters MLEM.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from equipet.reconstruction.corrections import check_corrections, prompts_per_element
from equipet.errors import ConfigError, InputDataError
from equipet.files import atomic_path
from equipet.reconstruction.projector import ImageGeometry, ListmodeTOFProjector, tof_fwhm_mm
from equipet.reconstruction.geometry import (box_with_halo, candidate_rsector_offsets, image_geometry, key_hash,
                                             lor_hits_box, sample_pairs)
from equipet.reconstruction.stage import stage_setup
from equipet.reconstruction.system import (CPU_CHUNK_EVENTS, GPU_CHUNK_EVENTS, SystemModel,  # noqa: F401 (re-exported)
                                           chunk_events, event_attenuation, event_eta, load_sensitivity,
                                           phantom_mu_map, sensitivity_doi_sigma_mm, sensitivity_key,
                                           sidecar, tof_kernel_fwhm_mm)
from equipet.simulation.scanner import Scanner

log = logging.getLogger("equipet.reconstruction.mlem")



# ---------------------------------------------------------------------------------------
# sensitivity


def symmetry_ops(scanner: Scanner, geometry: ImageGeometry) -> list[Callable[[torch.Tensor], torch.Tensor]]:
    """Grid symmetries shared by the scanner and a centred grid, as functions on images.

    The scanner is mirror-symmetric in y (module 0 sits on +x, pixels centred) and in z
    (rings centred); in x when the number of modules is even; and symmetric under a
    90-degree rotation (x, y) -> (-y, x) when it is a multiple of 4. A centred grid shares
    them (the rotation needs a square in-plane grid). The list holds every element of the
    group generated by those that apply (identity first).
    """
    iso_xy = geometry.shape[0] == geometry.shape[1] and geometry.voxel_size_mm[0] == geometry.voxel_size_mm[1]
    centred = all(abs(o + (n - 1) / 2 * v) < 1e-6 for o, v, n in
                  zip(geometry.origin_mm, geometry.voxel_size_mm, geometry.shape))
    if not centred:
        return [lambda t: t]
    flips = [(), (1,), (2,), (1, 2)]
    if scanner.modules_per_ring % 2 == 0:
        flips = [f + g for f in flips for g in ((), (0,))]
    ops: list[Callable[[torch.Tensor], torch.Tensor]] = [
        (lambda t, f=f: torch.flip(t, f) if f else t) for f in flips]
    if scanner.modules_per_ring % 4 == 0 and iso_xy:
        ops = ops + [(lambda t, op=op: op(t).transpose(0, 1)) for op in ops]
    return ops


def sensitivity_image(scanner: Scanner, geometry: ImageGeometry, n_lors: int,
                      mu_map: np.ndarray | None = None, mu_geometry: ImageGeometry | None = None,
                      batches: int = 4, seed: int = 0, device: torch.device | str = "cpu",
                      chunk_size: int = CPU_CHUNK_EVENTS, progress: bool = True,
                      symmetrise: bool = True, efficiency: Any = None) -> tuple[np.ndarray, dict]:
    """Monte Carlo estimate of ``s_j = sum_LOR exp(-int mu) a_Lj`` over all crystal pairs.

    See the module docstring for the method. ``mu_map`` (1/mm) on ``mu_geometry`` (which
    should cover the whole attenuating object) gives the attenuation; ``None`` ignores it.
    Returns the image (float32 numpy, ``geometry.shape``) and a dict of diagnostics
    (``relative_noise`` = median relative standard error over voxels above 10% of the max).
    ``symmetrise`` averages each batch over :func:`symmetry_ops` (exact symmetries of the
    expectation when the mu-map has them, as the phantom's water cylinder does), which divides
    the noise variance by up to 16 at no cost. ``efficiency`` (a
    :class:`equipet.reconstruction.normalisation.Normalisation`), when given, weights each line by its
    crystal-pair efficiency ``n_L``: ``s_j = sum_L n_L exp(-int mu) a_Lj`` (its components share
    the symmetries above).
    """
    device = torch.device(device)
    t0 = time.perf_counter()
    lo, hi = box_with_halo(geometry)
    radius = float(np.linalg.norm(np.maximum(np.abs(lo[:2]), np.abs(hi[:2]))))
    offsets = candidate_rsector_offsets(scanner, radius)
    per_rsector = scanner.rings * scanner.crystals_per_module * scanner.doi_layers
    space = float(scanner.n_crystals) * len(offsets) * per_rsector        # ordered pairs sampled from
    rng = np.random.default_rng(seed)
    centres = scanner.all_crystal_centres_mm()

    pilot = 200_000
    i, j = sample_pairs(scanner, offsets, pilot, rng)
    frac = max(lor_hits_box(centres[i], centres[j], lo, hi).mean(), 1.0 / pilot)
    n_draws = int(math.ceil(n_lors / frac))
    per_batch = int(math.ceil(n_draws / batches))
    n_draws = per_batch * batches
    log.info("sensitivity: %d candidate rsector offsets of %d, hit fraction %.4f, %d draws for ~%d LORs",
             len(offsets), scanner.modules_per_ring, frac, n_draws, n_lors)
    mu_t = None if mu_map is None else torch.as_tensor(mu_map, dtype=torch.float32, device=device)

    ops = symmetry_ops(scanner, geometry)
    draw_block = 1 << 20
    batch_images = []
    n_used = 0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n_draws, desc="sensitivity", unit="pair", unit_scale=True)
    for _ in range(batches):
        acc = torch.zeros(geometry.shape, dtype=torch.float32, device=device)
        left = per_batch
        while left > 0:
            m = min(draw_block, left)
            left -= m
            i, j = sample_pairs(scanner, offsets, m, rng)
            p1, p2 = centres[i], centres[j]
            hit = lor_hits_box(p1, p2, lo, hi)
            n_used += int(hit.sum())
            p1t = torch.as_tensor(p1[hit], dtype=torch.float32, device=device)
            p2t = torch.as_tensor(p2[hit], dtype=torch.float32, device=device)
            weight = torch.ones(p1t.shape[0], dtype=torch.float32, device=device)
            if efficiency is not None:
                weight = torch.as_tensor(efficiency.pair_efficiency(scanner, i[hit], j[hit], p1[hit], p2[hit]),
                                         dtype=torch.float32, device=device)
            if mu_t is not None:
                att = ListmodeTOFProjector(mu_geometry, p1t, p2t, chunk_size=chunk_size)
                weight = weight * torch.exp(-att.apply(mu_t))
            proj = ListmodeTOFProjector(geometry, p1t, p2t, chunk_size=chunk_size)
            acc += proj.adjoint(weight)
            if bar is not None:
                bar.update(m)
        if symmetrise:
            acc = sum(op(acc) for op in ops) / len(ops)
        batch_images.append(acc * (space / (2.0 * per_batch)))
    if bar is not None:
        bar.close()
    stack = torch.stack(batch_images)
    sens = stack.mean(0)
    sem = stack.std(0) / math.sqrt(batches)
    sel = sens > 0.1 * sens.max()
    rel = float((sem[sel] / sens[sel]).median()) if bool(sel.any()) else float("nan")
    info = {"candidate_rsector_offsets": offsets.tolist(), "hit_fraction": float(frac),
            "pairs_drawn": n_draws, "lors_projected": n_used, "ordered_pair_space": space,
            "relative_noise": rel, "symmetries_averaged": len(ops) if symmetrise else 1,
            "seconds": time.perf_counter() - t0}
    log.info("sensitivity: %d LORs projected in %.1f s; median relative noise %.3f",
             n_used, info["seconds"], rel)
    return sens.cpu().numpy().astype(np.float32), info


def save_nifti(image: np.ndarray, geometry: ImageGeometry, path: str | Path) -> None:
    """Write ``image`` as float32 NIfTI with the grid's affine (mm), atomically."""
    import nibabel as nib

    img = nib.Nifti1Image(np.asarray(image, dtype=np.float32), geometry.affine())
    img.header.set_xyzt_units("mm")
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))


# ---------------------------------------------------------------------------------------
# MLEM
def _inverse_expected(ax: torch.Tensor, start: int) -> torch.Tensor:
    """``1 / (A x)_e`` of MLEM's back projection, 0 where the expected value is 0."""
    return torch.where(ax > 0, 1.0 / ax.clamp_min(torch.finfo(ax.dtype).tiny), torch.zeros_like(ax))


def listmode_mlem(events_p1: torch.Tensor, events_p2: torch.Tensor, tof_mm: torch.Tensor | None,
                  sensitivity: torch.Tensor, geometry: ImageGeometry, iterations: int,
                  subsets: int = 1, tof_fwhm: float | None = None, truncation_sigma: float = 3.0,
                  min_sensitivity_fraction: float = 0.02, chunk_size: int = CPU_CHUNK_EVENTS,
                  cache_mb: float = 0.0, callback: Callable[[int, torch.Tensor, float], None] | None = None,
                  progress: bool = True, additive: torch.Tensor | None = None) -> torch.Tensor:
    """List-mode (OS)EM, ``x <- x / (s/M) * A_m^T (1 / (A_m x + b_m))`` (module docstring).

    Tensors carry the device. ``tof_mm=None`` runs non-TOF. ``callback(iteration, image,
    seconds)`` is called after every full iteration (1-based). ``cache_mb`` lets the
    projectors keep that much of the system matrix between iterations (split over subsets).
    ``additive`` (N,), optional, is the per-event additive term ``b_e = (r_e + s_e) / eta_e``
    of randoms and scatter (:mod:`equipet.reconstruction.corrections`), in the units of ``A x``.
    Returns the last image.
    """
    s = sensitivity
    support = s > min_sensitivity_fraction * s.max()
    x = support.to(s.dtype)
    s_safe = torch.where(support, s, torch.ones_like(s))
    # events of subset m are every M-th event: reorder once so each subset is a contiguous view
    n = events_p1.shape[0]
    order = torch.cat([torch.arange(m, n, subsets, device=events_p1.device) for m in range(subsets)])
    bounds = [0]
    for m in range(subsets):
        bounds.append(bounds[-1] + len(range(m, n, subsets)))
    p1, p2 = events_p1[order], events_p2[order]
    tof = None if tof_mm is None else tof_mm[order]
    add = None if additive is None else additive.to(sensitivity.dtype)[order]
    adds = [None if add is None else add[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    projs = [ListmodeTOFProjector(geometry, p1[a:b], p2[a:b], None if tof is None else tof[a:b],
                                  tof_fwhm if tof is not None else None, truncation_sigma, chunk_size,
                                  cache_mb / subsets)
             for a, b in zip(bounds[:-1], bounds[1:])]
    it_range = range(1, iterations + 1)
    if progress:
        from tqdm import tqdm

        it_range = tqdm(it_range, desc="MLEM" if subsets == 1 else f"OSEM({subsets})", unit="it")
    for it in it_range:
        t0 = time.perf_counter()
        for A, b in zip(projs, adds):
            if b is None:
                h = _inverse_expected
            else:   # A^T (1 / (A x + b)) with the additive term of the chunk's events
                h = lambda ax, start, b=b: _inverse_expected(ax + b[start:start + ax.shape[0]], start)  # noqa: E731
            back = A.apply_adjoint(x, h)   # each chunk's rows computed once
            x = torch.where(support, x * back * (subsets / s_safe), torch.zeros_like(x))
        if x.is_cuda:  # timing only; the one device-dependent line
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if callback is not None:
            callback(it, x, dt)
    return x


ADDITIVE_FILE = "additive.npz"


def save_additive(path: Path, hit: np.ndarray, tof_sum: float, additive: np.ndarray | None,
                  corrections: Sequence[str]) -> None:
    """Store the per-event additive term ``b_e`` MLEM used, for the later stages (``additive.npz``).

    ``additive`` is indexed like the events crossing the image box (``hit``, a mask over the
    events as read from the ROOT file); it is written in read order (``NaN`` for events that
    miss the box, 0 everywhere without corrections), with the number of read events and the
    sum of their TOF offsets, so that a reader can check it read the same events.
    """
    full = np.zeros(len(hit), np.float32)
    if additive is not None:
        full[~hit] = np.nan
        full[hit] = additive
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(fh, additive=full, n_read=np.asarray(len(hit)), tof_sum_mm=np.asarray(tof_sum),
                            corrections=np.asarray(list(corrections), dtype=str))


def load_additive(path: Path, n_read: int, tof_sum: float) -> np.ndarray:
    """The per-event additive term of ``additive.npz`` (read order), checked against the events read."""
    try:
        with np.load(path) as f:
            additive, n, t = f["additive"], int(f["n_read"]), float(f["tof_sum_mm"])
    except (OSError, KeyError, ValueError) as exc:
        raise InputDataError(f"cannot read the MLEM additive term: {exc}", where=str(path),
                             fix="rerun equipet-mlem for this CTR (it writes additive.npz)") from exc
    if n != n_read or len(additive) != n_read or not math.isclose(t, tof_sum, rel_tol=1e-9, abs_tol=1e-6):
        raise InputDataError(f"it describes {n} events (TOF sum {t:.6g} mm), the acquisition read here has "
                             f"{n_read} (TOF sum {tof_sum:.6g} mm)", where=str(path),
                             fix="rerun equipet-mlem on this acquisition with the same mlem settings")
    return additive


def prompt_corrections(model: SystemModel, corrections: Sequence[str], coincidences: Path, ev: Any,
                       prompts_el: np.ndarray) -> tuple[torch.Tensor, dict]:
    """The per-event additive term ``b_e = (r_e + s_e) / eta_e`` (:mod:`equipet.reconstruction.corrections`).

    ``eta_e = n_e exp(-int mu)`` is the factor the model puts on ``(A x)_e`` (module docstring):
    the crystal-pair efficiency ``n_e`` of the model's blank-scan normalisation (the one the
    sensitivity image was weighted with; none = 1) times the LOR's attenuation
    (:meth:`SystemModel.event_eta`). ``model`` is the stage's :class:`SystemModel` (with its
    CTR, sensitivity image and DOI spread).
    ``ev`` holds the events crossing the image box (with element indices), ``prompts_el``
    the prompts per element of the whole file. Scatter is estimated ``scatter.rounds`` times,
    each time from an MLEM image of ``scatter.estimate_iterations`` iterations reconstructed
    with the current additive term.
    """
    from equipet.reconstruction.corrections import ScatterBins, SinglesModel, estimate_scatter, pair_measure, scatter_settings
    from equipet.simulation.gate_root import read_singles_counts
    from equipet.simulation.montecarlo import AcquisitionSettings
    from equipet.simulation.phantom import hot_rod_phantom

    scanner, mlem, phantom, geom, device = model.scanner, model.mlem, model.phantom, model.geometry, model.device
    sens, ctr_ps = model.sensitivity, model.ctr_ps
    acq = AcquisitionSettings.from_config(model.acquisition)
    chunk = chunk_events(mlem, device)
    if not mlem["tof"]:
        raise ConfigError("randoms and scatter corrections need TOF events (densities per mm of TOF offset)",
                          where="mlem.tof", fix="set mlem.tof: true, or mlem.corrections: []")
    p1, p2, tof = ev.to_torch(device)
    eta = model.event_eta(ev, p1, p2)
    info: dict[str, Any] = {}
    randoms_model = None
    r = np.zeros(len(ev))
    if "randoms" in corrections:
        singles = read_singles_counts(coincidences, scanner)
        if singles is None:
            raise InputDataError("no singles counts (singlesPerElement or Singles tree) for the randoms estimate",
                                 where=str(coincidences),
                                 fix="re-simulate with this equipet version, or drop randoms from mlem.corrections")
        if mlem.get("energy_window_kev") and tuple(mlem["energy_window_kev"]) != tuple(scanner.energy_window_kev):
            raise ConfigError("the singles were counted in the scanner's energy window, not mlem.energy_window_kev",
                              where="mlem.energy_window_kev", fix="set it to null with randoms correction")
        randoms_model = SinglesModel.from_counts(scanner, singles, prompts_el, acq.duration_s,
                                                 scanner.coincidence_window_ns, acq.multiples_policy,
                                                 acq.min_sector_difference)
        r = randoms_model.density(ev.element1, ev.element2)
        info["randoms_window_density_sum"] = float(r.sum())
    r_t = torch.as_tensor(r, dtype=torch.float32, device=device)
    additive = r_t / eta
    if "scatter" in corrections:
        sc = scatter_settings(mlem)
        ph = hot_rod_phantom(phantom)
        lo, hi = box_with_halo(geom)
        s_max = float(np.linalg.norm(np.maximum(np.abs(lo[:2]), np.abs(hi[:2]))))
        fwhm = model.tof_fwhm_mm
        bins = ScatterBins.make(scanner, s_max, ph.diameter_mm / 2, fwhm if mlem["tof"] else None,
                                sc["theta_bins"], sc["s_bins"], sc["dz_bins"], sc["tof_bin_mm"])
        measure, randoms_in_box = pair_measure(scanner, geom, bins, sc["lor_pairs"], sc["seed"], randoms_model,
                                               acq.min_sector_difference)
        info["randoms_expected"] = randoms_in_box
        for k in range(sc["rounds"]):
            x = listmode_mlem(p1, p2, tof if mlem["tof"] else None, sens, geom, sc["estimate_iterations"],
                              mlem["subsets"], fwhm, mlem["tof_truncation_sigma"],
                              mlem["min_sensitivity_fraction"], chunk, mlem["system_cache_mb"],
                              progress=False, additive=additive)
            est = estimate_scatter(scanner, ph, acq, x.cpu().numpy(), geom, float(len(ev)), randoms_in_box,
                                   measure, bins, sc["decays"], sc["seed"] + 1 + k, ctr_ps, mlem["lor_endpoints"])
            s_e = est.per_event(ev.p1_mm, ev.p2_mm, ev.tof_mm)
            additive = torch.as_tensor(r + s_e, dtype=torch.float32, device=device) / eta
            info[f"scatter_round{k + 1}"] = est.info
    log.info("corrections %s: %s", list(corrections), info)
    return additive, info


# ---------------------------------------------------------------------------------------
# command-line entry points


# ---------------------------------------------------------------------------------------
# the stages (their command lines: equipet.commands.reconstruction.mlem)


def write_sensitivity(model: SystemModel, scanner_cfg: Mapping[str, Any], out: Path) -> None:
    """The stage ``equipet-sensitivity``: the sensitivity image of ``model`` (with its attenuation and
    blank-scan normalisation) as NIfTI, and its JSON sidecar (settings key, DOI spread, device)."""
    scanner, mlem, phantom, device = model.scanner, model.mlem, model.phantom, model.device
    geom, efficiency = model.geometry, model.efficiency
    mu, mu_geom = model.mu_map() if mlem["attenuation"] else (None, None)
    sens, info = sensitivity_image(scanner, geom, mlem["sensitivity_lors"], mu, mu_geom,
                                   mlem["sensitivity_batches"], mlem["sensitivity_seed"], device,
                                   model.chunk, symmetrise=mlem["sensitivity_symmetrise"],
                                   efficiency=efficiency)
    key = sensitivity_key(scanner_cfg, phantom, mlem)
    if efficiency is not None:
        info["doi_tof_sigma_mm"] = efficiency.doi_tof_sigma_mm
    save_nifti(sens, geom, out)
    with atomic_path(sidecar(out)) as tmp:
        tmp.write_text(json.dumps({"key": key, "key_hash": key_hash(key), "device": str(device),
                                   "shape": list(geom.shape), **info}, indent=2, default=str))


def reconstruct(model: SystemModel, corrections: Sequence[str], coincidences: Path, out_dir: Path) -> None:
    """The stage ``equipet-mlem``: list-mode TOF MLEM of one acquisition with ``model`` (its CTR,
    sensitivity image and, with ``corrections``, the randoms and scatter term), one NIfTI per
    iteration, ``additive.npz`` and ``timing.json`` in ``out_dir``."""
    from equipet.reconstruction.listmode import read_listmode

    scanner, mlem, device, ctr_ps = model.scanner, model.mlem, model.device, model.ctr_ps
    geom, sens = model.geometry, model.sensitivity
    fwhm = tof_kernel_fwhm_mm(ctr_ps, scanner, mlem, model.doi_sigma_mm)
    t0 = time.perf_counter()
    window = tuple(mlem["energy_window_kev"]) if mlem.get("energy_window_kev") else None
    ev = read_listmode(coincidences, scanner, mlem["events"], mlem["lor_endpoints"], window,
                       mlem["read_step_size"], progress=True, elements=bool(corrections))
    t_read = time.perf_counter() - t0
    if len(ev) == 0:
        raise InputDataError("no events left after selection", where=str(coincidences),
                             fix="check the energy window and mlem.events, or the simulation output")
    ev_read_tof_sum = float(np.sum(ev.tof_mm, dtype=np.float64))
    lo, hi = box_with_halo(geom)
    hit = lor_hits_box(ev.p1_mm.astype(np.float64), ev.p2_mm.astype(np.float64), lo, hi)
    log.info("%d of %d events cross the image box", int(hit.sum()), len(ev))
    prompts_el = (prompts_per_element(scanner, ev.element1, ev.element2) if corrections else None)
    ev = ev.subset(hit)
    p1, p2, tof = ev.to_torch(device)
    additive, corr_info = None, {}
    if corrections:
        additive, corr_info = prompt_corrections(model, corrections, coincidences, ev, prompts_el)
    timing: dict[str, Any] = {"device": str(device), "events": len(ev), "read_s": t_read,
                              "ctr_ps": ctr_ps, "tof": mlem["tof"],
                              "tof_kernel_fwhm_mm": fwhm,
                              "subsets": mlem["subsets"],
                              "iterations_s": [], "corrections": list(corrections), **corr_info}
    out_dir.mkdir(parents=True, exist_ok=True)

    def save(it: int, x: torch.Tensor, dt: float) -> None:
        timing["iterations_s"].append(dt)
        save_nifti(x.cpu().numpy(), geom, out_dir / f"mlem_it{it}.nii.gz")
        log.info("iteration %d: %.2f s (%.3g events/s fwd+back)", it, dt, len(ev) / max(dt, 1e-9))

    listmode_mlem(p1, p2, tof if mlem["tof"] else None, sens, geom,
                  mlem["iterations"], mlem["subsets"], fwhm,
                  mlem["tof_truncation_sigma"], mlem["min_sensitivity_fraction"],
                  chunk_events(mlem, device), mlem["system_cache_mb"], callback=save, additive=additive)
    save_additive(out_dir / ADDITIVE_FILE, hit, ev_read_tof_sum,
                  None if additive is None else additive.cpu().numpy(), corrections)
    with atomic_path(out_dir / "timing.json") as tmp:
        tmp.write_text(json.dumps(timing, indent=2))
