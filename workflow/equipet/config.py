"""Loading and validating the workflow configuration.

The schema lives in ``config/schema/``, one YAML file per top-level section
(``<section>.schema.yaml``); :func:`load_schema` assembles them into one JSON
schema. The schema is the single source of defaults: :func:`validate` fills every
missing key from it, so the code never carries defaults of its own.

Errors name the file, the dotted key and the fix, e.g.::

    config/quick.yaml: denoise.epochs: -3 is less than the minimum of 1
      fix: number of training epochs (integer >= 1)
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from equipet.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]
SCHEMA_DIR = REPO_ROOT / "config" / "schema"


TEMPLATE_HEADER = """\
# equipet configuration: the paper's settings, every key with its default.
# Generated from config/schema/ by `equipet-config --template`; edit values freely,
# or override them in another file: snakemake --configfile config/config.yaml my.yaml
# Keys are documented in config/README.md.

"""


def load_schema(schema_dir: str | Path = SCHEMA_DIR) -> dict[str, Any]:
    """Assemble the per-section schema files into one JSON schema (a dict)."""
    schema_dir = Path(schema_dir)
    files = sorted(schema_dir.glob("*.schema.yaml"))
    if not files:
        raise ConfigError("no *.schema.yaml files found", where=str(schema_dir),
                          fix="run from an equipet checkout, or pass schema_dir")
    properties: dict[str, Any] = {}
    for f in files:
        try:
            part = yaml.safe_load(f.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"schema file is not valid YAML: {exc}", where=str(f),
                              fix="correct the YAML syntax at the line shown") from exc
        if f.name == "top.schema.yaml":
            properties.update(part["properties"])
        else:
            properties[f.name.removesuffix(".schema.yaml")] = part
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "equipet workflow configuration",
        "type": "object",
        "additionalProperties": False,
        "properties": properties,
    }


def _fill_defaults(instance: Any, schema: Mapping[str, Any]) -> None:
    """Insert schema defaults for missing keys, recursively (objects create their sub-defaults)."""
    if not isinstance(instance, dict) or schema.get("type") != "object":
        return
    for key, sub in schema.get("properties", {}).items():
        if key not in instance:
            if "default" in sub:
                instance[key] = copy.deepcopy(sub["default"])
            elif sub.get("type") == "object":
                instance[key] = {}
        if key in instance:
            _fill_defaults(instance[key], sub)


def schema_defaults(section: str, schema_dir: str | Path = SCHEMA_DIR) -> dict[str, Any]:
    """One config section with every default filled in from its schema file."""
    path = Path(schema_dir) / f"{section}.schema.yaml"
    schema = yaml.safe_load(path.read_text())
    values: dict[str, Any] = {}
    _fill_defaults(values, schema)
    return values


def _describe(error: jsonschema.ValidationError, schema: Mapping[str, Any]) -> tuple[str, str | None]:
    path = ".".join(str(p) for p in error.absolute_path) or "(top level)"
    sub = schema
    for p in error.absolute_path:
        if isinstance(p, int):
            sub = sub.get("items", {})
        else:
            sub = sub.get("properties", {}).get(p, {})
    fix = sub.get("description")
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        fix = f"remove or correct the key; allowed keys here: {', '.join(allowed)}"
    return path, fix


def validate(config: dict[str, Any], source: str = "config", schema: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Fill defaults into ``config`` in place and validate it; return it.

    Raises :class:`ConfigError` naming ``source``, the key and the fix for the
    first problem found (all problems are listed in the message).
    """
    schema = load_schema() if schema is None else schema
    _fill_defaults(config, schema)
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        lines = []
        first_fix = None
        for err in errors:
            path, fix = _describe(err, schema)
            lines.append(f"{path}: {err.message}")
            first_fix = first_fix or fix
        raise ConfigError("; ".join(lines), where=source, fix=first_fix)
    _check_consistency(config, source)
    return config


def _check_consistency(config: Mapping[str, Any], source: str) -> None:
    """Cross-key rules that a JSON schema cannot express."""
    for section in ("denoise", "radon_recon", "assisted"):
        sec = config.get(section)
        if not sec:
            continue
        bad = [s for s in sec["snapshots"] if s > sec["epochs"]]
        if bad:
            raise ConfigError(
                f"snapshot epochs {bad} exceed epochs={sec['epochs']}",
                where=f"{source}: {section}.snapshots",
                fix=f"keep every snapshot <= {section}.epochs",
            )

    models = config.get("models")
    if models and models["scnn"]["match_parameters"] and models["cnn"]["match_parameters"]:
        raise ConfigError(
            "models.scnn.match_parameters and models.cnn.match_parameters are both true (circular)",
            where=f"{source}: models",
            fix="match one network's width to the other's, not both",
        )

    mlem = config.get("mlem")
    if mlem:
        bad = [e for e in mlem["early_iterations"] if e > mlem["iterations"]]
        if bad:
            raise ConfigError(
                f"early iterations {bad} exceed iterations={mlem['iterations']}",
                where=f"{source}: mlem.early_iterations",
                fix="keep every early iteration <= mlem.iterations",
            )
    if mlem and mlem["corrections"] and not mlem["tof"]:
        raise ConfigError(
            f"mlem.corrections={mlem['corrections']} with mlem.tof: false: the randoms and scatter "
            "estimates are densities per mm of TOF offset, which a non-TOF event has not",
            where=f"{source}: mlem.corrections",
            fix="set mlem.tof: true, or mlem.corrections: [] with mlem.events: trues",
        )
    assisted = config.get("assisted")
    if mlem and assisted:
        if assisted["early_iterations"] not in mlem["early_iterations"]:
            raise ConfigError(
                f"assisted.early_iterations={assisted['early_iterations']} is not one of "
                f"mlem.early_iterations={mlem['early_iterations']}",
                where=f"{source}: assisted.early_iterations",
                fix="use one of mlem.early_iterations, or add it there",
            )
        if "l2" in assisted["methods"] and mlem["corrections"]:
            raise ConfigError(
                f"assisted method l2 with mlem.corrections={mlem['corrections']}: its quadratic term "
                "integrates the model over sampled LORs, which carry no randoms or scatter term",
                where=f"{source}: assisted.methods",
                fix="drop l2 from assisted.methods, or set mlem.events: trues and mlem.corrections: []",
            )
        target = assisted["image_target_iterations"]
        if target is not None and target > mlem["iterations"]:
            raise ConfigError(
                f"assisted.image_target_iterations={assisted['image_target_iterations']} exceeds "
                f"mlem.iterations={mlem['iterations']}",
                where=f"{source}: assisted.image_target_iterations",
                fix="keep it <= mlem.iterations",
            )


def deep_merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Merge ``override`` into ``base`` recursively (like Snakemake's --configfile)."""
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            deep_merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read one YAML config file; a syntax error names the file and line."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read config file: {exc.strerror}", where=str(path),
                          fix="check the path passed with --configfile/--config") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"not valid YAML: {exc}", where=str(path),
                          fix="correct the YAML syntax at the line shown") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("the top level must be a mapping of section names to settings",
                          where=str(path))
    return data


def load_config(paths: str | Path | Iterable[str | Path]) -> dict[str, Any]:
    """Read, merge (later files win), fill defaults and validate config file(s)."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    paths = [Path(p) for p in paths]
    config: dict[str, Any] = {}
    for p in paths:
        deep_merge(config, read_yaml(p))
    return validate(config, source=" + ".join(map(str, paths)))


def template(schema: Mapping[str, Any] | None = None) -> str:
    """The full default configuration as commented YAML (each key preceded by its description).

    ``config/config.yaml`` is this template: the paper's settings, all keys spelt out.
    """
    import textwrap

    schema = load_schema() if schema is None else schema
    lines: list[str] = []

    def emit(node: Mapping[str, Any], indent: int) -> None:
        pad = "  " * indent
        for key, sub in node.get("properties", {}).items():
            desc = " ".join(str(sub.get("description", "")).split())
            for chunk in textwrap.wrap(desc, 96 - len(pad)):
                lines.append(f"{pad}# {chunk}")
            if sub.get("type") == "object" and "properties" in sub:
                lines.append(f"{pad}{key}:")
                emit(sub, indent + 1)
            else:
                value = yaml.safe_dump({key: sub.get("default")}, default_flow_style=True,
                                       width=1000).strip()
                lines.append(f"{pad}{value.removeprefix('{').removesuffix('}')}")
            if indent == 0:
                lines.append("")

    emit(schema, 0)
    return "\n".join(lines)


MARKDOWN_HEADER = """\
# Configuration reference

`config/config.yaml` holds the paper's settings with every key spelt out; `config/quick.yaml`
overrides a few of them so that the whole workflow runs in minutes on a 2-core CPU (the tests
use it). Any other YAML file given with `--configfile` overrides keys the same way (later files
win, nested sections merge). Every run is validated against the schema in `config/schema/`
(one file per section); a missing key takes the default below, an unknown key or a wrong value
stops the run with a message naming the file, the key and the fix.

Check a config without running anything: `equipet-config config/config.yaml my.yaml`.

This page is generated from the schema (`equipet-config --markdown > config/README.md`);
a test keeps it, `config/config.yaml` and the schema in step.
"""


def markdown(schema: Mapping[str, Any] | None = None) -> str:
    """A Markdown reference of every key: one table per section (key, default, description)."""
    schema = load_schema() if schema is None else schema
    out = [MARKDOWN_HEADER]

    def rows(node: Mapping[str, Any], prefix: str) -> list[str]:
        lines = []
        for key, sub in node.get("properties", {}).items():
            if sub.get("type") == "object" and "properties" in sub:
                lines += rows(sub, f"{prefix}{key}.")
                continue
            default = json.dumps(sub.get("default"))
            desc = " ".join(str(sub.get("description", "")).split()).replace("|", "\\|")
            lines.append(f"| `{prefix}{key}` | `{default}` | {desc} |")
        return lines

    top = {k: v for k, v in schema["properties"].items() if v.get("type") != "object"}
    out += ["## Top-level keys", "", "| key | default | description |", "|---|---|---|"]
    out += rows({"properties": top}, "")
    for name, sub in schema["properties"].items():
        if sub.get("type") != "object":
            continue
        desc = " ".join(str(sub.get("description", "")).split())
        out += ["", f"## `{name}`", "", desc, "", "| key | default | description |", "|---|---|---|"]
        out += rows(sub, f"{name}.")
    return "\n".join(out) + "\n"


