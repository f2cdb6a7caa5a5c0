"""Config validation: defaults from the schema, errors that name the file, key and fix."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from equipet.config import load_config, load_schema, validate
from equipet.errors import ConfigError


def _walk(schema, path=""):
    for key, sub in schema.get("properties", {}).items():
        yield f"{path}{key}", sub
        if sub.get("type") == "object":
            yield from _walk(sub, f"{path}{key}.")


def test_every_key_has_description_and_default():
    for path, sub in _walk(load_schema()):
        assert sub.get("description"), f"{path} has no description"
        if sub.get("type") != "object":
            assert "default" in sub, f"{path} has no default"


def test_empty_config_gets_every_default_and_validates():
    cfg = validate({})
    schema = load_schema()
    for path, sub in _walk(schema):
        node = cfg
        for part in path.split("."):
            node = node[part]
        if "default" in sub:
            assert node == sub["default"], path


def test_paper_config_matches_paper(paper_config):
    assert paper_config["denoise"]["epochs"] == 2000
    assert paper_config["denoise"]["snapshots"] == [500, 2000]
    assert paper_config["radon_recon"]["epochs"] == 5000
    assert paper_config["models"]["scnn"]["order"] == 8
    assert paper_config["models"]["cnn"]["channels"] == 64
    assert paper_config["scanner"]["rings"] == 5
    assert paper_config["scanner"]["modules_per_ring"] == 44


def test_quick_config_is_smaller(quick_config, paper_config):
    assert quick_config["denoise"]["epochs"] < paper_config["denoise"]["epochs"]
    assert quick_config["brain"]["size"] <= paper_config["brain"]["size"]


def test_wrong_value_names_file_key_and_fix(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"denoise": {"epochs": -3}}))
    with pytest.raises(ConfigError) as exc:
        load_config(bad)
    msg = str(exc.value)
    assert str(bad) in msg and "denoise.epochs" in msg and "fix:" in msg


def test_unknown_key_lists_allowed_keys(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("models:\n  scnn:\n    oder: 8\n")
    with pytest.raises(ConfigError) as exc:
        load_config(bad)
    assert "oder" in str(exc.value) and "order" in str(exc.value)


def test_snapshot_beyond_epochs_is_rejected():
    with pytest.raises(ConfigError, match="denoise.snapshots"):
        validate({"denoise": {"epochs": 100, "snapshots": [50, 200]}})


def test_yaml_syntax_error_names_file(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("denoise: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml"):
        load_config(bad)


def test_later_files_override_earlier(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("denoise: {epochs: 10, snapshots: [5]}\n")
    b.write_text("denoise: {epochs: 20}\n")
    cfg = load_config([a, b])
    assert cfg["denoise"]["epochs"] == 20 and cfg["denoise"]["snapshots"] == [5]


def test_cli_exits_2_with_message(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("seeds: []\n")
    proc = subprocess.run([sys.executable, "-c", "from equipet.commands.config import config_main; config_main()", str(bad)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "seeds" in proc.stderr and "bad.yaml" in proc.stderr


def test_config_yaml_and_readme_are_generated_from_the_schema(repo):
    """config/config.yaml and config/README.md must say what the schema says."""
    from equipet.config import TEMPLATE_HEADER, markdown, template

    assert (repo / "config" / "config.yaml").read_text().strip() == (TEMPLATE_HEADER + template()).strip(), \
        "regenerate: equipet-config --template > config/config.yaml"
    assert (repo / "config" / "README.md").read_text() == markdown(), \
        "regenerate: equipet-config --markdown > config/README.md"


def test_corrections_without_tof_are_refused():
    """The randoms and scatter estimates are densities per mm of TOF offset: non-TOF events with
    corrections would divide them by nothing; the config names the key and the fix."""
    cfg = {"mlem": {"tof": False, "events": "all", "corrections": ["randoms"]}}
    with pytest.raises(ConfigError, match="mlem.tof: false") as exc:
        validate(cfg)
    assert exc.value.where.endswith("mlem.corrections") and "mlem.tof: true" in exc.value.fix
    validate({"mlem": {"tof": False, "events": "all", "corrections": []}})
