"""GATE ROOT Coincidences tree: writer, validated chunked reader, merge (equipet.simulation.gate_root)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import uproot

from equipet.errors import InputDataError
from equipet.simulation.gate_root import BRANCHES, CoincidenceWriter, count_coincidences, iter_coincidences, merge_root, read_coincidences, read_meta
from equipet.commands.simulation.gate_root import merge_main


def fake(n, seed=0, event_offset=0):
    rng = np.random.default_rng(seed)
    ev = np.arange(n) + event_offset
    ev2 = ev.copy()
    ev2[::10] += 1  # every tenth is a random
    d = {"eventID1": ev, "eventID2": ev2, "time1": np.sort(rng.random(n)), "energy1": rng.uniform(0.435, 0.585, n),
         "globalPosX1": rng.normal(size=n) * 300, "globalPosY1": rng.normal(size=n) * 300, "globalPosZ1": rng.normal(size=n),
         "globalPosX2": rng.normal(size=n) * 300, "globalPosY2": rng.normal(size=n) * 300, "globalPosZ2": rng.normal(size=n),
         "comptonPhantom1": (rng.random(n) < 0.2).astype(int), "crystalID2": rng.integers(0, 576, n)}
    d["time2"] = d["time1"] + 1e-10
    d["energy2"] = d["energy1"]
    return d


@pytest.fixture()
def root_file(tmp_path):
    p = tmp_path / "c.root"
    d = fake(2500)
    with CoincidenceWriter(p, meta={"n_decays": 9000}) as w:
        w.write({k: v[:1000] for k, v in d.items()})
        w.write({k: v[1000:] for k, v in d.items()})
    return p, d


def test_roundtrip_gate_branch_names_types_and_values(root_file):
    p, d = root_file
    with uproot.open(p) as f:
        t = f["Coincidences"]
        assert set(t.keys()) == set(BRANCHES)
        assert t["time1"].interpretation.from_dtype == np.dtype(">f8")  # seconds as double, as GATE
        assert t["eventID1"].interpretation.from_dtype == np.dtype(">i4")
        assert t["energy1"].interpretation.from_dtype == np.dtype(">f4")
    back = read_coincidences(p)
    for k, v in d.items():
        np.testing.assert_allclose(back[k], np.asarray(v).astype(BRANCHES[k]), err_msg=k)
    assert np.all(back["RayleighPhantom1"] == 0)  # unspecified branches are zero
    assert 0 <= back["sinogramTheta"].min() and back["sinogramTheta"].max() < np.pi
    assert read_meta(p) == {"n_decays": 9000, "n_coincidences": 2500}


def test_iter_coincidences_in_chunks_with_branch_selection(root_file):
    p, d = root_file
    chunks = list(iter_coincidences(p, ["time1", "eventID1"], step_size=1000))
    assert [len(c["time1"]) for c in chunks] == [1000, 1000, 500]
    assert set(chunks[0]) == {"time1", "eventID1"}
    np.testing.assert_array_equal(np.concatenate([c["eventID1"] for c in chunks]), d["eventID1"])


def test_missing_branch_is_a_clear_error(root_file):
    p, _ = root_file
    with pytest.raises(InputDataError) as e:
        next(iter_coincidences(p, ["time1", "tofBin1"]))
    assert "tofBin1" in str(e.value) and str(p) in str(e.value) and "fix:" in str(e.value)


def test_file_without_required_branch_is_rejected(tmp_path):
    p = tmp_path / "partial.root"
    with uproot.recreate(p) as f:
        f["Coincidences"] = {"eventID1": np.arange(3, dtype=np.int32), "time1": np.zeros(3)}
    with pytest.raises(InputDataError, match="globalPosX1"):
        read_coincidences(p)


def test_missing_tree_missing_file_and_not_root(tmp_path):
    p = tmp_path / "hits.root"
    with uproot.recreate(p) as f:
        f["Hits"] = {"x": np.zeros(3)}
    with pytest.raises(InputDataError, match="setRootCoincidencesFlag"):
        read_coincidences(p)
    with pytest.raises(InputDataError, match="not found"):
        read_coincidences(tmp_path / "nope.root")
    (tmp_path / "text.root").write_text("hello")
    with pytest.raises(InputDataError, match="not a readable ROOT file"):
        read_coincidences(tmp_path / "text.root")


def test_truncated_file_is_a_clear_error(root_file, tmp_path):
    p, _ = root_file
    raw = p.read_bytes()
    for frac in (0.5, 0.9):
        q = tmp_path / f"trunc{frac}.root"
        q.write_bytes(raw[: int(len(raw) * frac)])
        with pytest.raises(InputDataError, match="truncated or corrupt"):
            read_coincidences(q)


def test_writer_leaves_nothing_on_error(tmp_path):
    p = tmp_path / "x.root"
    with pytest.raises(RuntimeError):
        with CoincidenceWriter(p) as w:
            w.write(fake(10))
            raise RuntimeError("boom")
    assert not p.exists() and list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="not GATE"):
        with CoincidenceWriter(p) as w:
            w.write({"notABranch": [1]})


def test_counts_classify_trues_scatter_randoms(root_file):
    p, d = root_file
    c = count_coincidences(p)
    rnd = d["eventID1"] != d["eventID2"]
    sc = ~rnd & (d["comptonPhantom1"] > 0)
    assert c["prompts"] == 2500 and c["randoms"] == rnd.sum() and c["scatter"] == sc.sum()
    assert c["trues"] == 2500 - rnd.sum() - sc.sum()
    assert c["n_decays"] == 9000


def test_merge_offsets_event_ids(tmp_path):
    parts = []
    for j, n_dec in enumerate((100, 120)):
        p = tmp_path / f"p{j}.root"
        with CoincidenceWriter(p, meta={"n_decays": n_dec, "ctr_ps": 100}) as w:
            w.write(fake(50, seed=j))
        parts.append(p)
    meta = merge_root(parts, tmp_path / "m.root")
    m = read_coincidences(tmp_path / "m.root")
    assert len(m["eventID1"]) == 100 and meta["n_decays"] == 220
    np.testing.assert_array_equal(m["eventID1"][50:], fake(50, seed=1)["eventID1"] + 100)
    # GATE files without our metadata: offset by max eventID + 1
    g = tmp_path / "gate.root"
    with uproot.recreate(g) as f:
        f["Coincidences"] = {k: np.asarray(v).astype(BRANCHES[k]) for k, v in fake(5).items()}
    merge_root([g, g], tmp_path / "m2.root")
    ev = read_coincidences(tmp_path / "m2.root", ["eventID1"])["eventID1"]
    np.testing.assert_array_equal(ev, np.r_[np.arange(5), np.arange(5) + 5])


def test_merge_cli_and_counts_table(tmp_path):
    from equipet.commands.simulation.gate_root import counts_table_main

    p = tmp_path / "p.root"
    with CoincidenceWriter(p, meta={"n_decays": 10}) as w:
        w.write(fake(20))
    merge_main([str(p), "--out", str(tmp_path / "m.root"), "--counts", str(tmp_path / "c.json")])
    c = json.loads((tmp_path / "c.json").read_text())
    assert c["prompts"] == 20
    counts_table_main([str(tmp_path / "c.json"), "--ctrs", "100", "--out", str(tmp_path / "t.csv")])
    lines = (tmp_path / "t.csv").read_text().splitlines()
    assert lines[0].startswith("ctr_ps,n_decays,prompts,trues,scatter,randoms") and lines[1].startswith("100,10,20,")
    with pytest.raises(SystemExit):
        merge_main([str(tmp_path / "missing.root"), "--out", str(tmp_path / "x.root")])
    assert not (tmp_path / "x.root").exists()
