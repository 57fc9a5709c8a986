"""Configuration: load YAML, merge overrides, validate against the JSON schema.

Every stage receives the config as a plain dict. Snakemake rules pass only the sections a stage
depends on (so a changed value reruns exactly what depends on it); validation then checks the
sections that are present. An unknown key, a wrong type or a missing path is one clear message
that names the key.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from dinosae.errors import ConfigError

SCHEMA_PATH = Path(__file__).with_name("config.schema.yaml")


def load_schema() -> dict:
    return yaml.safe_load(SCHEMA_PATH.read_text())


def _key(path: Iterable[Any]) -> str:
    parts = [str(p) if not isinstance(p, int) else f"[{p}]" for p in path]
    return ".".join(parts).replace(".[", "[") or "<root>"


def _message(err: jsonschema.ValidationError) -> str:
    key = _key(err.absolute_path)
    if err.validator == "additionalProperties":
        extra = sorted(set(err.instance) - set(err.schema.get("properties", {})))
        where = f" in '{key}'" if err.absolute_path else ""
        plural = "s" if len(extra) > 1 else ""
        return f"config: unknown key{plural} {', '.join(map(repr, extra))}{where}"
    if err.validator == "required":
        return f"config: '{key}' is missing a required key: {err.message.split(' ')[0]}"
    return f"config: '{key}': {err.message}"


def validate(cfg: dict, check_paths: bool = True) -> dict:
    """Validate `cfg` (a full config or a subset of its top-level sections); return it.

    Raises ConfigError naming the first offending key.
    """
    schema = load_schema()
    partial = copy.deepcopy(schema)
    partial["required"] = [k for k in schema.get("required", []) if k in cfg]
    validator = jsonschema.Draft202012Validator(partial)
    errors = sorted(validator.iter_errors(cfg), key=lambda e: (len(e.absolute_path), str(e.path)))
    if errors:
        raise ConfigError(_message(errors[0]))
    _check_semantics(cfg)
    if check_paths:
        _check_paths(cfg)
    return cfg


def _check_semantics(cfg: dict) -> None:
    mini = cfg.get("data", {}).get("mini")
    if mini and mini["min_scale"] > mini["max_scale"]:
        raise ConfigError("config: 'data.mini.min_scale' must not exceed 'data.mini.max_scale'")


def _check_paths(cfg: dict) -> None:
    """Paths that must exist before any job starts (outputs are created by the pipeline)."""
    data = cfg.get("data")
    if data and data["source"] == "folder" and not Path(data["root"]).is_dir():
        raise ConfigError(f"config: 'data.root': folder {data['root']!r} does not exist")
    checks = [
        ("data.val_labels", (data or {}).get("val_labels")),
        ("eval.inception_weights", cfg.get("eval", {}).get("inception_weights")),
        ("eval.adm_reference", cfg.get("eval", {}).get("adm_reference")),
    ]
    weights = cfg.get("autoencoder", {}).get("teacher", {}).get("weights")
    if weights and weights != "random" and not weights.startswith("hf-hub:"):
        checks.append(("autoencoder.teacher.weights", weights))
    lp = cfg.get("autoencoder", {}).get("lpips", {}).get("weights")
    if lp and lp not in ("random", "imagenet"):
        checks.append(("autoencoder.lpips.weights", lp))
    for section in ("autoencoder", "dit"):  # released weights to import: a file, or the hub
        pre = (cfg.get(section) or {}).get("pretrained")
        if pre and not pre.startswith("hf-hub:"):
            checks.append((f"{section}.pretrained", pre))
    for key, value in checks:
        if value is not None and not Path(value).exists():
            raise ConfigError(f"config: '{key}': file {value!r} does not exist")


def set_key(cfg: dict, dotted: str, value: Any) -> None:
    """Set `a.b.c` in a nested dict; the value is parsed as YAML (numbers, lists, null)."""
    node = cfg
    *parents, last = dotted.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = yaml.safe_load(value) if isinstance(value, str) else value


def load_config(
    path: str | Path | None = None,
    cfg_json: str | None = None,
    overrides: Iterable[str] = (),
    check_paths: bool = True,
) -> dict:
    """Read a YAML config file and/or a JSON string of sections, apply `key=value` overrides."""
    cfg: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config: file {str(p)!r} does not exist")
        cfg = yaml.safe_load(p.read_text()) or {}
        if not isinstance(cfg, dict):
            raise ConfigError(f"config: {str(p)!r} must hold a mapping of sections")
    if cfg_json:
        cfg.update(json.loads(cfg_json))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"config: override {item!r} is not of the form key=value")
        key, value = item.split("=", 1)
        set_key(cfg, key, value)
    return validate(cfg, check_paths=check_paths)
