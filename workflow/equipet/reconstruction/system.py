"""The system model of a reconstruction stage, built once from the config and passed on.

A list-mode PET stage needs the same forward model everywhere: the image grid, the scanner, the
TOF kernel of its CTR (widened by the depth of interaction measured on the blank scan), the
phantom's attenuation, the crystal-pair efficiencies of the blank-scan normalisation and the
sensitivity image. :class:`SystemModel` holds them, built by :meth:`SystemModel.from_config` at
the start of a stage (``equipet-sensitivity``, ``equipet-mlem``, ``equipet-central-slice``,
``equipet-psf``) from the validated config and the files of the earlier stages, and hands out
what the stage computes with: ``eta_e = n_e exp(-int mu)`` per event (:meth:`SystemModel.event_eta`),
the attenuation factors alone (:meth:`SystemModel.attenuation`), list-mode projectors with the
stage's TOF kernel (:meth:`SystemModel.projector`), the kernel's FWHM
(:attr:`SystemModel.tof_fwhm_mm`) and the projector chunk size (:attr:`SystemModel.chunk`). The
additive term (randoms and scatter over ``eta_e``) is computed from it by
:func:`equipet.reconstruction.mlem.prompt_corrections`.

The functions below are the pieces it is made of; each stays usable on its own.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from equipet.errors import ConfigError, InputDataError
from equipet.reconstruction.geometry import image_geometry, key_hash
from equipet.reconstruction.projector import ImageGeometry, ListmodeTOFProjector, tof_fwhm_mm
from equipet.reconstruction.stage import stage_settings
from equipet.simulation.scanner import Scanner

CPU_CHUNK_EVENTS = 16384
GPU_CHUNK_EVENTS = 1 << 20


@dataclass
class SystemModel:
    """The forward model of one stage (module doc). Build it with :meth:`from_config`."""

    scanner: Scanner
    mlem: dict
    phantom: dict
    acquisition: dict
    geometry: ImageGeometry
    device: torch.device
    ctr_ps: float | None = None
    doi_sigma_mm: float | None = None
    efficiency: Any = None                 # Normalisation of the blank scan, None = every n_e is 1
    sensitivity: torch.Tensor | None = None
    _mu: tuple[np.ndarray, ImageGeometry] | None = field(default=None, repr=False)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], device: torch.device, ctr_ps: float | None = None,
                    sensitivity_path: Path | None = None, normalisation_path: Path | None = None,
                    with_efficiency: bool = True, stage: str = "this stage") -> "SystemModel":
        """The stage's model: settings from ``cfg``; the DOI spread from the sensitivity image's
        sidecar and the image itself (checked against the settings) when ``sensitivity_path`` is
        given; the blank-scan normalisation when ``mlem.normalisation.enabled`` and
        ``with_efficiency`` (``normalisation_path`` is then required)."""
        scanner, mlem, phantom = stage_settings(cfg)
        geometry = image_geometry(mlem)
        model = cls(scanner, mlem, phantom, dict(cfg.get("acquisition") or {}), geometry, device, ctr_ps)
        if sensitivity_path is not None:
            model.doi_sigma_mm = sensitivity_doi_sigma_mm(sensitivity_path)
            sens = load_sensitivity(sensitivity_path, geometry, sensitivity_key(cfg["scanner"], phantom, mlem))
            model.sensitivity = torch.as_tensor(sens, device=device)
        if with_efficiency:
            model.efficiency = load_efficiency(normalisation_path, cfg, mlem, stage)
        return model

    @property
    def tof_fwhm_mm(self) -> float | None:
        """FWHM of the TOF kernel (:func:`tof_kernel_fwhm_mm`), None without TOF or a CTR."""
        if not self.mlem["tof"] or self.ctr_ps is None:
            return None
        return tof_kernel_fwhm_mm(self.ctr_ps, self.scanner, self.mlem, self.doi_sigma_mm)

    @property
    def chunk(self) -> int:
        return chunk_events(self.mlem, self.device)

    def mu_map(self) -> tuple[np.ndarray, ImageGeometry]:
        """The phantom's mu-map and its grid (:func:`phantom_mu_map`), made once."""
        if self._mu is None:
            self._mu = phantom_mu_map(self.phantom, self.mlem["voxel_size_mm"])
        return self._mu

    def attenuation(self, p1: torch.Tensor, p2: torch.Tensor) -> torch.Tensor:
        """``exp(-int mu)`` along each LOR (ones without ``mlem.attenuation``)."""
        if not self.mlem["attenuation"]:
            return torch.ones(p1.shape[0], dtype=p1.dtype, device=p1.device)
        return line_attenuation(*self.mu_map(), p1, p2, chunk_events(self.mlem, p1.device))

    def event_eta(self, ev: Any, p1: torch.Tensor, p2: torch.Tensor) -> torch.Tensor:
        """``eta_e = n_e exp(-int mu)`` of each event (:func:`event_eta`)."""
        return event_eta(ev, p1, p2, self.scanner, self.mlem, self.phantom, self.efficiency)

    def projector(self, geometry: ImageGeometry, p1: torch.Tensor, p2: torch.Tensor,
                  tof: torch.Tensor | None, cache_mb: float = 0.0) -> ListmodeTOFProjector:
        """A list-mode projector on ``geometry`` with the stage's TOF kernel (non-TOF when ``tof`` is None)."""
        return ListmodeTOFProjector(geometry, p1, p2, tof, self.tof_fwhm_mm if tof is not None else None,
                                    self.mlem["tof_truncation_sigma"], chunk_events(self.mlem, p1.device),
                                    cache_mb)


def tof_kernel_fwhm_mm(ctr_ps: float, scanner: Scanner, mlem: Mapping[str, Any],
                       doi_sigma_mm: float | None = None) -> float:
    r"""FWHM (mm) of the TOF kernel along the LOR: the CTR's, widened by the depth of interaction.

    With ``lor_endpoints: crystal`` an LOR ends at the centre of its DOI layer while the time
    runs to the first interaction, at some depth (and, after inter-crystal scatter, maybe in
    another crystal). The TOF offset is then off by a DOI error of standard deviation
    ``sigma_DOI``, added in quadrature (``mlem.tof_doi: true``):

    .. math:: \mathrm{FWHM}_{eff}^2 = (c\,\mathrm{CTR}/2)^2 + 8 \ln 2 \; \sigma_{DOI}^2 .

    ``doi_sigma_mm`` is the one measured on the perfect-timing blank scan
    (:mod:`equipet.reconstruction.normalisation`, 2.64 mm for the default scanner: 7.49 -> 9.74 mm FWHM at
    50 ps). Without it, depths uniform within each layer of thickness ``d``, independent at both
    ends, give ``sigma_DOI^2 = d^2 / 24`` (2.04 mm for 10 mm layers), which leaves out
    inter-crystal scatter and is about 9% too narrow at 50 ps on the simulated data. With
    ``lor_endpoints: global`` (exact interaction points) or ``tof_doi: false`` the CTR's FWHM.
    """
    fwhm = tof_fwhm_mm(ctr_ps)
    if not mlem.get("tof_doi", False) or mlem.get("lor_endpoints", "crystal") != "crystal":
        return fwhm
    sigma = doi_sigma_mm if doi_sigma_mm is not None else scanner.layer_thickness_mm / math.sqrt(24.0)
    return math.sqrt(fwhm * fwhm + 8.0 * math.log(2.0) * sigma * sigma)


def sensitivity_doi_sigma_mm(sensitivity_path: str | Path) -> float | None:
    """The blank scan's DOI timing spread recorded in a sensitivity image's sidecar (None if absent)."""
    side = sidecar(Path(sensitivity_path))
    if not side.exists():
        return None
    value = json.loads(side.read_text()).get("doi_tof_sigma_mm")
    return None if value is None else float(value)


def chunk_events(mlem: Mapping[str, Any], device: torch.device) -> int:
    """Events per projector chunk: the configured value, or a device default (the one device branch)."""
    if mlem.get("chunk_events"):
        return int(mlem["chunk_events"])
    return GPU_CHUNK_EVENTS if device.type == "cuda" else CPU_CHUNK_EVENTS



def sensitivity_key(scanner: Mapping[str, Any], phantom: Mapping[str, Any], mlem: Mapping[str, Any]) -> dict:
    """Everything the sensitivity image depends on (its cache key)."""
    keep = ("voxel_size_mm", "fov_mm", "attenuation", "sensitivity_lors", "sensitivity_batches",
            "sensitivity_seed", "sensitivity_symmetrise")
    ph = {k: phantom[k] for k in ("diameter_mm", "length_mm", "material", "mu_water_per_mm")
          if k in phantom} if mlem["attenuation"] else {}
    key = {"scanner": dict(scanner), "phantom_mu": ph, "mlem": {k: mlem[k] for k in keep}}
    norm = mlem.get("normalisation") or {}
    if norm.get("enabled"):
        key["normalisation"] = dict(norm)
    return key



def phantom_mu_map(phantom_cfg: Mapping[str, Any], voxel_size_mm: float) -> tuple[np.ndarray, ImageGeometry]:
    """The phantom's mu-map (1/mm) on a centred grid covering the whole water cylinder."""
    from equipet.simulation.phantom import hot_rod_phantom

    ph = hot_rod_phantom(phantom_cfg)
    shape = ph.default_shape(voxel_size_mm)
    maps = ph.voxelise(voxel_size_mm, shape=shape)
    return maps.mu_per_mm, ImageGeometry.centred(shape, voxel_size_mm)



def load_sensitivity(path: str | Path, geometry: ImageGeometry, key: Mapping[str, Any] | None = None) -> np.ndarray:
    """Read a sensitivity NIfTI, checking its grid and (when given) its settings key."""
    import nibabel as nib

    path = Path(path)
    if not path.exists():
        raise InputDataError("sensitivity image not found", where=str(path),
                             fix="run equipet-sensitivity (snakemake rule sensitivity) first")
    data = np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)
    if data.shape != geometry.shape:
        raise InputDataError(f"sensitivity grid {data.shape} differs from the image grid {geometry.shape}",
                             where=str(path), fix="recompute it with the current mlem.fov_mm / voxel_size_mm")
    if key is not None:
        side = sidecar(path)
        stored = json.loads(side.read_text()).get("key_hash") if side.exists() else None
        if stored != key_hash(key):
            raise InputDataError("sensitivity image was computed for other settings (scanner, phantom or mlem)",
                                 where=str(path), fix="delete it and rerun equipet-sensitivity")
    return data


def sidecar(path: Path) -> Path:
    name = path.name
    for suf in (".nii.gz", ".nii"):
        if name.endswith(suf):
            name = name[: -len(suf)]
    return path.with_name(name + ".json")



def event_attenuation(p1: torch.Tensor, p2: torch.Tensor, phantom: Mapping[str, Any], voxel_size_mm: float,
                      chunk_size: int) -> torch.Tensor:
    """``eta_e = exp(-int mu)`` along each event's LOR through the phantom's mu-map."""
    return line_attenuation(*phantom_mu_map(phantom, voxel_size_mm), p1, p2, chunk_size)


def line_attenuation(mu: np.ndarray, mu_geom: ImageGeometry, p1: torch.Tensor, p2: torch.Tensor,
                     chunk_size: int) -> torch.Tensor:
    """``exp(-int mu)`` along each LOR ``p1 -> p2`` through the mu-map ``mu`` (1/mm) on ``mu_geom``."""
    att = ListmodeTOFProjector(mu_geom, p1, p2, chunk_size=chunk_size)
    return torch.exp(-att.apply(torch.as_tensor(mu, dtype=p1.dtype, device=p1.device)))


def event_eta(ev: Any, p1: torch.Tensor, p2: torch.Tensor, scanner: Scanner, mlem: Mapping[str, Any],
              phantom: Mapping[str, Any], efficiency: Any) -> torch.Tensor:
    """``eta_e = n_e exp(-int mu)`` of each event: crystal-pair efficiency times attenuation.

    ``p1``, ``p2`` are the events' LOR ends as tensors (``ev.to_torch``, on the device used). ``n_e`` comes from ``efficiency`` (:meth:`equipet.reconstruction.normalisation.Normalisation.pair_efficiency`
    of the event's elements and LOR ends; 1 when ``None``), the attenuation from the phantom's
    mu-map when ``mlem.attenuation`` (1 otherwise). The same factors weight the sensitivity image.
    """
    device = p1.device
    eta = (event_attenuation(p1, p2, phantom, mlem["voxel_size_mm"], chunk_events(mlem, device))
           if mlem["attenuation"] else torch.ones(len(ev), device=device))
    if efficiency is not None:
        n_e = efficiency.pair_efficiency(scanner, ev.element1, ev.element2, ev.p1_mm, ev.p2_mm)
        eta = eta * torch.as_tensor(n_e, dtype=eta.dtype, device=device)
    return eta



def load_efficiency(path: Path | None, cfg: Mapping[str, Any], mlem: Mapping[str, Any], stage: str) -> Any:
    """The blank-scan normalisation when ``mlem.normalisation.enabled`` (``None`` otherwise), refusing
    a missing file or one computed for other settings."""
    if not (mlem.get("normalisation") or {}).get("enabled"):
        return None
    from equipet.reconstruction.normalisation import blank_radius_mm, load_normalisation, normalisation_key

    if path is None:
        raise ConfigError(f"mlem.normalisation.enabled needs the blank-scan normalisation in {stage}",
                          where="--normalisation", fix="run equipet-normalisation and pass its JSON")
    return load_normalisation(path, normalisation_key(cfg["scanner"], mlem, blank_radius_mm(mlem)))
