"""GATE 9.3+ macro set (equipet.simulation.gate_macros) and the gate backend's command (equipet.simulation.gate_backend)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from equipet.errors import ConfigError
from equipet.simulation.gate_backend import gate_command, run_gate_job
from equipet.commands.simulation.gate_backend import main as gate_run_main
from equipet.simulation.gate_macros import write_macros
from equipet.config import schema_defaults
from equipet.simulation.phantom import hot_rod_phantom

VOL = r"[A-Za-z][A-Za-z0-9_]*"
NUM = r"-?[0-9.eE+-]+"
DIG = r"/gate/digitizerMgr/layer\d+/SinglesDigitizer/Singles"
ALLOWED = [rf"^{p}$" for p in [
    r"/control/execute \S+\.mac", r"/control/verbose \d", r"/(run|event|tracking)/verbose \d",
    r"/gate/geometry/setMaterialDatabase \S+",
    rf"/gate/{VOL}/geometry/set(X|Y|Z)Length {NUM} mm", rf"/gate/{VOL}/geometry/set(Rmin|Rmax|Height) {NUM} mm",
    rf"/gate/{VOL}/setMaterial (Air|Water|LYSO|LSO|BGO)", rf"/gate/{VOL}/daughters/name {VOL}",
    rf"/gate/{VOL}/daughters/insert (box|cylinder)", rf"/gate/{VOL}/placement/setTranslation {NUM} {NUM} {NUM} mm",
    rf"/gate/{VOL}/vis/forceWireframe", rf"/gate/{VOL}/repeaters/insert (cubicArray|ring)",
    rf"/gate/{VOL}/cubicArray/setRepeatNumber(X|Y|Z) \d+", rf"/gate/{VOL}/cubicArray/setRepeatVector {NUM} {NUM} {NUM} mm",
    rf"/gate/{VOL}/ring/setRepeatNumber \d+",
    rf"/gate/systems/cylindricalPET/(rsector|module|submodule|crystal|layer\d) ?/attach {VOL}",
    r"/gate/systems/cylindricalPET/describe", rf"/gate/{VOL}/attach(Crystal|Phantom)SD",
    r"/gate/physics/addPhysicsList emstandard_opt[34]",
    rf"/gate/physics/(Gamma|Electron|Positron)/SetCutInRegion world {NUM} mm", r"/gate/physics/processList Enabled",
    r"/gate/run/initialize",
    rf"{DIG}/insert (adder|merger|readout|energyResolution|timeResolution|energyFraming)",
    rf"{DIG}/merger/addInput Singles_layer\d+", rf"{DIG}/readout/setPolicy TakeEnergyWinner", rf"{DIG}/readout/setDepth \d",
    rf"{DIG}/energyResolution/fwhm {NUM}", rf"{DIG}/energyResolution/energyOfReference 511. keV",
    rf"{DIG}/timeResolution/fwhm {NUM} ps", rf"{DIG}/energyFraming/set(Min|Max) {NUM} keV",
    r"/gate/digitizerMgr/CoincidenceSorter/Coincidences/setInputCollection Singles_layer\d+",
    rf"/gate/digitizerMgr/CoincidenceSorter/Coincidences/setWindow {NUM} ns",
    r"/gate/digitizerMgr/CoincidenceSorter/Coincidences/setMinSectorDifference \d+",
    r"/gate/digitizerMgr/CoincidenceSorter/Coincidences/MultiplesPolicy (takeWinnerOfGoods|killAll)",
    rf"/gate/source/addSource {VOL}", rf"/gate/source/{VOL}/setActivity {NUM} becquerel",
    rf"/gate/source/{VOL}/setType backtoback", rf"/gate/source/{VOL}/gps/particle gamma",
    rf"/gate/source/{VOL}/gps/monoenergy 0.511 MeV", rf"/gate/source/{VOL}/setAccolinearityFlag True",
    rf"/gate/source/{VOL}/setAccoValue {NUM} deg", rf"/gate/source/{VOL}/gps/type Volume",
    rf"/gate/source/{VOL}/gps/shape Cylinder", rf"/gate/source/{VOL}/gps/(radius|halfz) {NUM} mm",
    rf"/gate/source/{VOL}/gps/centre {NUM} {NUM} {NUM} mm", rf"/gate/source/{VOL}/gps/angtype iso",
    rf"/gate/source/{VOL}/gps/confine {VOL}_phys", r"/gate/source/list",
    r"/gate/output/root/enable", r"/gate/output/root/setFileName \w+",
    r"/gate/output/root/setRoot(Hit|Singles|Coincidences|Ntuple)Flag [01]",
    r"/gate/random/setEngineName MersenneTwister", r"/gate/random/setEngineSeed \d+",
    rf"/gate/application/setTime(Slice|Start|Stop) {NUM} s", r"/gate/application/startDAQ",
]]


def cfg(**acq):
    return {"scanner": schema_defaults("scanner"), "phantom": schema_defaults("phantom"),
            "acquisition": {**schema_defaults("acquisition"), **acq}}


@pytest.fixture(scope="module")
def macros(tmp_path_factory):
    d = tmp_path_factory.mktemp("gate")
    write_macros(cfg(n_jobs=4, duration_s=600.0), 100.0, d)
    return d


def expand(d: Path, name: str) -> list[str]:
    """Commands in execution order, following /control/execute."""
    out = []
    for line in (d / name).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("/control/execute"):
            out += expand(d, line.split()[1])
        else:
            out.append(line)
    return out


def test_macro_set_files(macros):
    names = {p.name for p in macros.iterdir()}
    assert {"main.mac", "setup.mac", "geometry.mac", "phantom.mac", "physics.mac", "digitizer.mac",
            "sources.mac"} <= names
    assert {f"job{j:03d}.mac" for j in range(4)} <= names


@pytest.mark.parametrize("name", ["main.mac", "job002.mac"])
def test_only_real_gate_commands_in_a_valid_order(macros, name):
    cmds = expand(macros, name)
    pats = [re.compile(p) for p in ALLOWED]
    bad = [c for c in cmds if not any(p.match(c) for p in pats)]
    assert bad == []
    assert not any(c.startswith("/gate/digitizer/") for c in cmds)  # pre-9.3 syntax
    # volumes are created before they are used; sources added before they are configured
    volumes = {"world", "systems", "physics", "run", "digitizerMgr", "source", "output", "random",
               "application", "geometry"}
    sources = set()
    pending = None
    for c in cmds:
        parts = c.split()
        if "/daughters/name" in c:
            pending = parts[1]
        if "/daughters/insert" in c:
            volumes.add(pending)
        if c.startswith("/gate/") and not c.startswith("/gate/source"):
            assert c.split("/")[2] in volumes, c
        if c.startswith("/gate/source/addSource"):
            sources.add(parts[1])
        elif c.startswith("/gate/source/") and c != "/gate/source/list":
            assert c.split("/")[3] in sources, c
    i = cmds.index("/gate/run/initialize")
    assert all(not c.startswith(("/gate/digitizerMgr", "/gate/source")) for c in cmds[:i])
    assert all("/daughters/insert" not in c for c in cmds[i:])
    assert cmds[-1] == "/gate/application/startDAQ"


@pytest.mark.parametrize("ctr,single", [(50, 35.36), (100, 70.71), (200, 141.42)])
def test_time_resolution_is_ctr_over_sqrt2(tmp_path, ctr, single):
    write_macros(cfg(n_jobs=1), ctr, tmp_path)
    text = (tmp_path / "digitizer.mac").read_text()
    m = re.search(r"timeResolution/fwhm ([0-9.]+) ps", text)
    assert float(m.group(1)) == pytest.approx(single, abs=0.01)
    assert "timeResolution/CTR" not in text


def test_digitizer_chain_per_sd_merger_window_sorter(macros):
    text = (macros / "digitizer.mac").read_text()
    for l in (0, 1):
        assert f"/gate/digitizerMgr/layer{l}/SinglesDigitizer/Singles/insert adder" in text
    assert "merger/addInput Singles_layer0" in text
    assert "energyFraming/setMin 435 keV" in text and "energyFraming/setMax 585 keV" in text
    assert "energyResolution/fwhm 0.11" in text
    assert "Coincidences/setInputCollection Singles_layer1" in text and "setWindow 4 ns" in text
    geo = (macros / "geometry.mac").read_text()
    assert "/gate/rsector/ring/setRepeatNumber 44" in geo and "/gate/module/cubicArray/setRepeatNumberZ 5" in geo
    assert "/gate/crystal/cubicArray/setRepeatNumberY 24" in geo and "/gate/layer1/setMaterial LYSO" in geo
    assert "/gate/layer0/attachCrystalSD" in geo and "/gate/layer1/attachCrystalSD" in geo


def test_sources_match_the_phantom(macros):
    ph = hot_rod_phantom()
    text = (macros / "sources.mac").read_text()
    assert text.count("/gate/source/addSource") == len(ph.rods) + 1
    act = [float(x) for x in re.findall(r"setActivity ([0-9.eE+-]+) becquerel", text)]
    assert sum(act) == pytest.approx(ph.total_activity_bq(), rel=1e-4)
    assert "/gate/source/background/gps/confine hotdisk_phys" in text
    assert "setAccoValue 0.5 deg" in text
    assert (macros / "phantom.mac").read_text().count("attachPhantomSD") == len(ph.rods) + 3


def test_jobs_have_distinct_seeds_and_tile_the_acquisition(macros):
    seeds, slices, names = [], [], []
    for j in range(4):
        t = (macros / f"job{j:03d}.mac").read_text()
        seeds.append(int(re.search(r"setEngineSeed (\d+)", t).group(1)))
        slices.append((float(re.search(r"setTimeStart (\S+) s", t).group(1)),
                       float(re.search(r"setTimeStop (\S+) s", t).group(1))))
        names.append(re.search(r"setFileName (\S+)", t).group(1))
    assert len(set(seeds)) == 4 and len(set(names)) == 4
    assert slices[0][0] == 0 and slices[-1][1] == 600
    assert all(a[1] == b[0] for a, b in zip(slices, slices[1:]))
    main = (macros / "main.mac").read_text()
    assert "setTimeStop 600 s" in main and "setRootCoincidencesFlag 1" in main


def test_gate_commands_built_for_each_runner(tmp_path):
    g = {"executable": "Gate", "container": None, "container_engine": "docker", "extra_args": []}
    assert gate_command(g, tmp_path, "job001.mac") == ["Gate", "job001.mac"]
    d = gate_command({**g, "container": "opengatecollaboration/gate:9.4-docker"}, tmp_path, "job001.mac")
    assert d == ["docker", "run", "--rm", "-v", f"{tmp_path}:/APP", "-w", "/APP",
                 "opengatecollaboration/gate:9.4-docker", "job001.mac"]
    a = gate_command({**g, "container": "gate.sif", "container_engine": "apptainer"}, tmp_path, "main.mac")
    assert a == ["apptainer", "exec", "--bind", f"{tmp_path}:/APP", "--pwd", "/APP", "gate.sif", "Gate", "main.mac"]


def test_gate_backend_dry_run_and_missing_gate(macros, tmp_path, capsys):
    settings = json.dumps({"acquisition": {"gate": {"executable": "Gate-not-installed", "container": None,
                                                    "extra_args": []}}})
    gate_run_main(["--settings", settings, "--macro-dir", str(macros), "--job", "2", "--out",
                   str(tmp_path / "p.root"), "--dry-run"])
    assert capsys.readouterr().out.strip() == "Gate-not-installed job002.mac"
    assert not (tmp_path / ".p_gate_work").exists()
    with pytest.raises(ConfigError, match="not on PATH"):
        run_gate_job({"executable": "Gate-not-installed"}, macros, 2, tmp_path / "p.root")
    with pytest.raises(SystemExit):
        gate_run_main(["--settings", settings, "--macro-dir", str(macros), "--job", "9", "--out", str(tmp_path / "p.root")])


def test_gate_job_runs_a_gate_executable_and_collects_its_root_file(macros, tmp_path):
    """A stand-in 'Gate' that writes the job's Coincidences file checks the real code path."""
    import stat
    import sys

    from equipet.simulation.gate_root import read_coincidences

    fake = tmp_path / "FakeGate"
    fake.write_text(
        f"#!{sys.executable}\n"
        "import re, sys, numpy as np\n"
        "from equipet.simulation.gate_root import CoincidenceWriter\n"
        "name = re.search(r'setFileName (\\S+)', open(sys.argv[-1]).read()).group(1)\n"
        "with CoincidenceWriter(name + '.root') as w:\n"
        "    w.write({k: np.zeros(3) for k in ('eventID1', 'eventID2', 'time1', 'time2', 'energy1', 'energy2',"
        " 'globalPosX1', 'globalPosY1', 'globalPosZ1', 'globalPosX2', 'globalPosY2', 'globalPosZ2')})\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    out = tmp_path / "parts" / "job2.root"
    before = sorted(p.name for p in macros.iterdir())
    run_gate_job({"executable": str(fake)}, macros, 2, out, log_file=tmp_path / "gate.log")
    assert len(read_coincidences(out)["time1"]) == 3
    assert sorted(p.name for p in macros.iterdir()) == before  # macro directory untouched
    assert [p.name for p in out.parent.iterdir()] == ["job2.root"]
