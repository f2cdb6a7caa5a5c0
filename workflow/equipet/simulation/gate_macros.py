"""GATE 9.3+ macro set of the acquisition, written from the one scanner/phantom/acquisition description.

For one CTR, :func:`write_macros` writes into a directory::

    main.mac        the whole acquisition in one job:      Gate main.mac
    job000.mac ...  split job j (its time slice and seed): Gate job003.mac   -> part_003.root
    setup.mac       common part: materials, geometry, phantom, physics, initialize,
                    digitizer, sources (executed by main.mac and every job macro)
    geometry.mac    world and the cylindricalPET system (rsector, module, submodule, crystal,
                    layer0..layerN-1), its attachments and crystal sensitive detectors
    phantom.mac     water cylinder, warm disk, cold centre and rods (phantom SDs)
    physics.mac     electromagnetic physics list and production cuts
    digitizer.mac   one singles chain per sensitive detector (GATE 9.3 digitizerMgr syntax),
                    merger of the DOI layers, readout, energy and time resolution, energy window,
                    coincidence sorter
    sources.mac     one back-to-back 511 keV source per rod (sourceID = rod index) and the warm
                    background (sourceID = number of rods), confined to the warm disk so the rods
                    and the cold centre (its daughters) are excluded

Macros use relative paths: run Gate in the macro directory (:mod:`equipet.simulation.gate_backend` does).
The coincidence time resolution enters as the single-time FWHM ``CTR / sqrt(2)`` of
``timeResolution/fwhm`` (the ``timeResolution/CTR`` command is avoided, see GATE facts).
Readout: ``TakeEnergyWinner`` at depth 1 (the rsector), like the embedded simulator that sums a
photon's deposits into one single placed at its largest deposit.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from equipet.simulation.phantom import HotRodPhantom, hot_rod_phantom
from equipet.simulation.scanner import Scanner

log = logging.getLogger("equipet.simulation.gate_macros")

ML_PER_MM3 = 1e-3


def single_time_fwhm_ps(ctr_ps: float) -> float:
    """Single-time FWHM giving a coincidence time resolution ``ctr_ps``: ``CTR / sqrt(2)``."""
    return ctr_ps / math.sqrt(2.0)


def _f(x: float) -> str:
    x = round(float(x), 6) + 0.0  # no 1e-15 noise, no -0
    return f"{x:.6g}"


def geometry_mac(sc: Scanner) -> str:
    T, W, P = sc.crystal_thickness_mm, sc.module_width_mm, sc.pitch_mm
    d = sc.layer_thickness_mm
    r_out = math.hypot(sc.radius_mm + T, W / 2) + 1.0
    L = [
        "# World and cylindricalPET scanner (written by equipet.simulation.gate_macros; lengths in mm)",
        f"# {sc.rings} rings x {sc.modules_per_ring} modules, {sc.pixels_transaxial} x {sc.pixels_axial} "
        f"pixels of {_f(sc.pixel_size_mm)} mm, {_f(T)} mm {sc.material} in {sc.doi_layers} DOI layers, "
        f"inner radius {_f(sc.radius_mm)} mm",
        "/gate/world/geometry/setXLength 2000. mm",
        "/gate/world/geometry/setYLength 2000. mm",
        "/gate/world/geometry/setZLength 2000. mm",
        "/gate/world/setMaterial Air",
        "",
        "/gate/world/daughters/name cylindricalPET",
        "/gate/world/daughters/insert cylinder",
        "/gate/cylindricalPET/setMaterial Air",
        f"/gate/cylindricalPET/geometry/setRmin {_f(sc.radius_mm - 1.0)} mm",
        f"/gate/cylindricalPET/geometry/setRmax {_f(r_out)} mm",
        f"/gate/cylindricalPET/geometry/setHeight {_f(sc.axial_length_mm + 2.0)} mm",
        "/gate/cylindricalPET/vis/forceWireframe",
        "",
        "# rsector: one detector module of all rings, x radial",
        "/gate/cylindricalPET/daughters/name rsector",
        "/gate/cylindricalPET/daughters/insert box",
        f"/gate/rsector/placement/setTranslation {_f(sc.radius_mm + T / 2)} 0. 0. mm",
        f"/gate/rsector/geometry/setXLength {_f(T)} mm",
        f"/gate/rsector/geometry/setYLength {_f(W)} mm",
        f"/gate/rsector/geometry/setZLength {_f(sc.axial_length_mm)} mm",
        "/gate/rsector/setMaterial Air",
        "",
        "# module: one ring's block",
        "/gate/rsector/daughters/name module",
        "/gate/rsector/daughters/insert box",
        f"/gate/module/geometry/setXLength {_f(T)} mm",
        f"/gate/module/geometry/setYLength {_f(W)} mm",
        f"/gate/module/geometry/setZLength {_f(sc.module_length_mm)} mm",
        "/gate/module/setMaterial Air",
        "",
        "/gate/module/daughters/name submodule",
        "/gate/module/daughters/insert box",
        f"/gate/submodule/geometry/setXLength {_f(T)} mm",
        f"/gate/submodule/geometry/setYLength {_f(W)} mm",
        f"/gate/submodule/geometry/setZLength {_f(sc.module_length_mm)} mm",
        "/gate/submodule/setMaterial Air",
        "",
        "# crystal: one pixel column through both DOI layers",
        "/gate/submodule/daughters/name crystal",
        "/gate/submodule/daughters/insert box",
        f"/gate/crystal/geometry/setXLength {_f(T)} mm",
        f"/gate/crystal/geometry/setYLength {_f(P)} mm",
        f"/gate/crystal/geometry/setZLength {_f(P)} mm",
        "/gate/crystal/setMaterial Air",
        "",
    ]
    for l in range(sc.doi_layers):
        L += [
            f"# DOI layer {l} ({'inner' if l == 0 else 'outer' if l == sc.doi_layers - 1 else 'middle'})",
            "/gate/crystal/daughters/name layer%d" % l,
            "/gate/crystal/daughters/insert box",
            f"/gate/layer{l}/placement/setTranslation {_f(-T / 2 + (l + 0.5) * d)} 0. 0. mm",
            f"/gate/layer{l}/geometry/setXLength {_f(d)} mm",
            f"/gate/layer{l}/geometry/setYLength {_f(sc.pixel_size_mm)} mm",
            f"/gate/layer{l}/geometry/setZLength {_f(sc.pixel_size_mm)} mm",
            f"/gate/layer{l}/setMaterial {sc.material}",
            "",
        ]
    L += [
        "# repeaters",
        "/gate/crystal/repeaters/insert cubicArray",
        "/gate/crystal/cubicArray/setRepeatNumberX 1",
        f"/gate/crystal/cubicArray/setRepeatNumberY {sc.pixels_transaxial}",
        f"/gate/crystal/cubicArray/setRepeatNumberZ {sc.pixels_axial}",
        f"/gate/crystal/cubicArray/setRepeatVector 0. {_f(P)} {_f(P)} mm",
        "/gate/module/repeaters/insert cubicArray",
        "/gate/module/cubicArray/setRepeatNumberX 1",
        "/gate/module/cubicArray/setRepeatNumberY 1",
        f"/gate/module/cubicArray/setRepeatNumberZ {sc.rings}",
        f"/gate/module/cubicArray/setRepeatVector 0. 0. {_f(sc.module_length_mm)} mm",
        "/gate/rsector/repeaters/insert ring",
        f"/gate/rsector/ring/setRepeatNumber {sc.modules_per_ring}",
        "",
        "# system",
        "/gate/systems/cylindricalPET/rsector/attach rsector",
        "/gate/systems/cylindricalPET/module/attach module",
        "/gate/systems/cylindricalPET/submodule/attach submodule",
        "/gate/systems/cylindricalPET/crystal/attach crystal",
    ]
    L += [f"/gate/systems/cylindricalPET/layer{l}/attach layer{l}" for l in range(sc.doi_layers)]
    L += ["", "# sensitive detectors: one per DOI layer"]
    L += [f"/gate/layer{l}/attachCrystalSD" for l in range(sc.doi_layers)]
    L += ["/gate/systems/cylindricalPET/describe", ""]
    return "\n".join(L)


def phantom_mac(ph: HotRodPhantom) -> str:
    mat = ph.material
    L = [
        "# Hot-rod phantom in water (written by equipet.simulation.gate_macros; lengths in mm)",
        "/gate/world/daughters/name phantom",
        "/gate/world/daughters/insert cylinder",
        "/gate/phantom/geometry/setRmin 0. mm",
        f"/gate/phantom/geometry/setRmax {_f(ph.diameter_mm / 2)} mm",
        f"/gate/phantom/geometry/setHeight {_f(ph.length_mm)} mm",
        f"/gate/phantom/setMaterial {mat}",
        "",
        "# warm disk holding the rods (background source confined here)",
        "/gate/phantom/daughters/name hotdisk",
        "/gate/phantom/daughters/insert cylinder",
        "/gate/hotdisk/geometry/setRmin 0. mm",
        f"/gate/hotdisk/geometry/setRmax {_f(ph.active_diameter_mm / 2)} mm",
        f"/gate/hotdisk/geometry/setHeight {_f(ph.rod_length_mm)} mm",
        f"/gate/hotdisk/setMaterial {mat}",
        "",
        "# central cold region",
        "/gate/hotdisk/daughters/name coldcentre",
        "/gate/hotdisk/daughters/insert cylinder",
        "/gate/coldcentre/geometry/setRmin 0. mm",
        f"/gate/coldcentre/geometry/setRmax {_f(ph.cold_diameter_mm / 2)} mm",
        f"/gate/coldcentre/geometry/setHeight {_f(ph.rod_length_mm)} mm",
        f"/gate/coldcentre/setMaterial {mat}",
        "",
    ]
    for i, (x, y, d, k) in enumerate(ph.rods):
        n = f"rod{i:03d}"
        L += [
            f"# rod {i}: sector {int(k)}, diameter {_f(d)} mm",
            f"/gate/hotdisk/daughters/name {n}",
            "/gate/hotdisk/daughters/insert cylinder",
            f"/gate/{n}/geometry/setRmin 0. mm",
            f"/gate/{n}/geometry/setRmax {_f(d / 2)} mm",
            f"/gate/{n}/geometry/setHeight {_f(ph.rod_length_mm)} mm",
            f"/gate/{n}/placement/setTranslation {_f(x)} {_f(y)} 0. mm",
            f"/gate/{n}/setMaterial {mat}",
        ]
    L += ["", "# phantom sensitive detectors (comptonPhantom / RayleighPhantom counters)",
          "/gate/phantom/attachPhantomSD", "/gate/hotdisk/attachPhantomSD", "/gate/coldcentre/attachPhantomSD"]
    L += [f"/gate/rod{i:03d}/attachPhantomSD" for i in range(len(ph.rods))]
    return "\n".join(L) + "\n"


def physics_mac(physics_list: str) -> str:
    return "\n".join([
        "# Physics (written by equipet.simulation.gate_macros)",
        f"/gate/physics/addPhysicsList {physics_list}",
        "/gate/physics/Gamma/SetCutInRegion world 1. mm",
        "/gate/physics/Electron/SetCutInRegion world 1. mm",
        "/gate/physics/Positron/SetCutInRegion world 1. mm",
        "/gate/physics/processList Enabled",
        "",
    ])


def digitizer_mac(sc: Scanner, acq: Mapping[str, Any], ctr_ps: float) -> str:
    last = f"layer{sc.doi_layers - 1}"
    pre = f"/gate/digitizerMgr/{last}/SinglesDigitizer/Singles"
    lo, hi = sc.energy_window_kev
    L = ["# Digitizer, GATE 9.3+ syntax (written by equipet.simulation.gate_macros)",
         "# one chain per sensitive detector: the hits of each DOI layer are summed per crystal"]
    for l in range(sc.doi_layers):
        L.append(f"/gate/digitizerMgr/layer{l}/SinglesDigitizer/Singles/insert adder")
    if sc.doi_layers > 1:
        L += ["", f"# merge the DOI layers into the {last} chain, then process them together",
              f"{pre}/insert merger"]
        L += [f"{pre}/merger/addInput Singles_layer{l}" for l in range(sc.doi_layers - 1)]
    L += [
        "",
        "# readout: one single per rsector, at the crystal with the largest deposit",
        f"{pre}/insert readout",
        f"{pre}/readout/setPolicy TakeEnergyWinner",
        f"{pre}/readout/setDepth 1",
        "",
        f"# energy resolution {_f(sc.energy_resolution_fwhm * 100)} % FWHM at 511 keV",
        f"{pre}/insert energyResolution",
        f"{pre}/energyResolution/fwhm {_f(sc.energy_resolution_fwhm)}",
        f"{pre}/energyResolution/energyOfReference 511. keV",
        "",
        f"# time resolution: CTR {_f(ctr_ps)} ps FWHM -> single-time FWHM CTR/sqrt(2) = {_f(single_time_fwhm_ps(ctr_ps))} ps",
        f"{pre}/insert timeResolution",
        f"{pre}/timeResolution/fwhm {_f(single_time_fwhm_ps(ctr_ps))} ps",
        "",
        "# energy window",
        f"{pre}/insert energyFraming",
        f"{pre}/energyFraming/setMin {_f(lo)} keV",
        f"{pre}/energyFraming/setMax {_f(hi)} keV",
        "",
        "# coincidence sorter",
        f"/gate/digitizerMgr/CoincidenceSorter/Coincidences/setInputCollection Singles_{last}",
        f"/gate/digitizerMgr/CoincidenceSorter/Coincidences/setWindow {_f(sc.coincidence_window_ns)} ns",
        f"/gate/digitizerMgr/CoincidenceSorter/Coincidences/setMinSectorDifference {int(acq['min_sector_difference'])}",
        f"/gate/digitizerMgr/CoincidenceSorter/Coincidences/MultiplesPolicy {acq['multiples_policy']}",
        "",
    ]
    return "\n".join(L)


def _source(name: str, activity_bq: float, acq: Mapping[str, Any], radius: float, halfz: float,
            x: float, y: float, confine: str | None = None) -> list[str]:
    s = f"/gate/source/{name}"
    L = [
        f"/gate/source/addSource {name}",
        f"{s}/setActivity {activity_bq:.6g} becquerel",
        f"{s}/setType backtoback",
        f"{s}/gps/particle gamma",
        f"{s}/gps/monoenergy 0.511 MeV",
    ]
    if acq["acollinearity_fwhm_deg"] > 0:
        L += ["# acollinearity: a GATE with OpenGATE/Gate PR #762 gives each projected component of the",
              "# deviation this FWHM (equipet's 'projected' model); an older GATE 9 draws the polar angle",
              "# with it, about 0.71x the spread per component (equipet's 'gate9' model)",
              f"{s}/setAccolinearityFlag True", f"{s}/setAccoValue {_f(acq['acollinearity_fwhm_deg'])} deg"]
    L += [
        f"{s}/gps/type Volume",
        f"{s}/gps/shape Cylinder",
        f"{s}/gps/radius {_f(radius)} mm",
        f"{s}/gps/halfz {_f(halfz)} mm",
        f"{s}/gps/centre {_f(x)} {_f(y)} 0. mm",
        f"{s}/gps/angtype iso",
    ]
    if confine:
        L.append(f"{s}/gps/confine {confine}")
    return L


def sources_mac(ph: HotRodPhantom, acq: Mapping[str, Any]) -> str:
    """One source per rod, then the background; the rods' activity already includes ``activity_scale``."""
    halfz = ph.rod_length_mm / 2
    L = ["# Sources: back-to-back 511 keV pairs (written by equipet.simulation.gate_macros)",
         f"# rods {_f(ph.rod_activity_bq_per_ml)} Bq/mL, background {_f(ph.background_bq_per_ml)} Bq/mL, "
         f"total {_f(ph.total_activity_bq())} Bq; positron range neglected"]
    vols = ph.rod_volume_mm3()
    for i, ((x, y, d, _), v) in enumerate(zip(ph.rods, vols)):
        L += _source(f"rod{i:03d}", ph.rod_activity_bq_per_ml * v * ML_PER_MM3, acq, d / 2, halfz, x, y)
    L += ["", "# warm background: the disk minus its daughters (rods, cold centre)"]
    L += _source("background", ph.background_bq_per_ml * ph.background_volume_mm3() * ML_PER_MM3, acq,
                 ph.active_diameter_mm / 2, halfz, 0.0, 0.0, confine="hotdisk_phys")
    L += ["/gate/source/list", ""]
    return "\n".join(L)


def setup_mac(material_database: str | None) -> str:
    return "\n".join([
        "# Common setup (written by equipet.simulation.gate_macros)",
        "/control/verbose 1",
        "/run/verbose 0",
        "/event/verbose 0",
        "/tracking/verbose 0",
        f"/gate/geometry/setMaterialDatabase {material_database or 'GateMaterials.db'}",
        "/control/execute geometry.mac",
        "/control/execute phantom.mac",
        "/control/execute physics.mac",
        "/gate/run/initialize",
        "/control/execute digitizer.mac",
        "/control/execute sources.mac",
        "",
    ])


def run_mac(title: str, output_name: str, seed: int, t_start: float, t_stop: float) -> str:
    return "\n".join([
        f"# {title} (written by equipet.simulation.gate_macros). Run in this directory: Gate <this file>",
        "/control/execute setup.mac",
        "",
        "# ROOT output: the Coincidences tree",
        "/gate/output/root/enable",
        f"/gate/output/root/setFileName {output_name}",
        "/gate/output/root/setRootHitFlag 0",
        "/gate/output/root/setRootSinglesFlag 0",
        "/gate/output/root/setRootCoincidencesFlag 1",
        "/gate/output/root/setRootNtupleFlag 0",
        "",
        "# random engine and seed of this job",
        "/gate/random/setEngineName MersenneTwister",
        f"/gate/random/setEngineSeed {int(seed)}",
        "",
        "# time slice of this job",
        f"/gate/application/setTimeSlice {_f(t_stop - t_start)} s",
        f"/gate/application/setTimeStart {_f(t_start)} s",
        f"/gate/application/setTimeStop {_f(t_stop)} s",
        "/gate/application/startDAQ",
        "",
    ])


def job_macro_name(job: int) -> str:
    return f"job{job:03d}.mac"


def job_output_name(job: int) -> str:
    """Basename GATE gives job ``job``'s ROOT file (GATE appends ``.root``)."""
    return f"part_{job:03d}"


def write_macros(cfg: Mapping[str, Any], ctr_ps: float, out_dir: str | Path) -> list[Path]:
    """Write the macro set for one CTR into ``out_dir``; return the files written.

    ``cfg`` holds the validated ``scanner``, ``phantom`` and ``acquisition`` sections.
    """
    acq = cfg["acquisition"]
    sc = Scanner.from_config(cfg["scanner"])
    ph = hot_rod_phantom(cfg.get("phantom", {}), activity_scale=float(acq.get("activity_scale", 1.0)))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    T = float(acq["duration_s"])
    n = int(acq["n_jobs"])
    seed = int(acq["seed"])
    files = {
        "setup.mac": setup_mac(acq.get("gate", {}).get("material_database")),
        "geometry.mac": geometry_mac(sc),
        "phantom.mac": phantom_mac(ph),
        "physics.mac": physics_mac(acq.get("physics_list", "emstandard_opt4")),
        "digitizer.mac": digitizer_mac(sc, acq, ctr_ps),
        "sources.mac": sources_mac(ph, acq),
        "main.mac": run_mac(f"Whole acquisition, CTR {_f(ctr_ps)} ps, {_f(T)} s", "coincidences", seed, 0.0, T),
    }
    for j in range(n):
        files[job_macro_name(j)] = run_mac(
            f"Split job {j} of {n}, CTR {_f(ctr_ps)} ps", job_output_name(j), seed + j, j * T / n, (j + 1) * T / n)
    written = []
    from equipet.files import atomic_path

    for name, text in files.items():
        with atomic_path(out / name) as tmp:
            tmp.write_text(text)
        written.append(out / name)
    log.info("wrote %d GATE macros for CTR %g ps to %s", len(written), ctr_ps, out)
    return written
