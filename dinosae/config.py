"""Configuration: load YAML, merge overrides, validate against the JSON schema.

Every stage receives the config as a plain dict. Snakemake rules pass only the sections a stage
depends on (so a changed value reruns exactly what depends on it); validation then checks the
sections that are present. An unknown key, a wrong type or a missing path is one clear message
that names the key.

Configs are untrusted input, bounded before anything walks them: a file of at most
MAX_CONFIG_BYTES, at most MAX_ALIASES YAML aliases, and a config that, with every alias
expanded, holds at most MAX_VALUES values, nests at most MAX_DEPTH deep and has no string longer
than MAX_STRING (an alias bomb is refused in time proportional to its size on disk). Messages
quote values only in part. NaN and infinities are refused wherever they appear (YAML `.nan`,
`--set k=.inf`, JSON `NaN` in --cfg). Paths may hold spaces, quotes, `$` and `;` (the rules
quote every value they hand to a shell line) but no control characters (newlines) or braces
(Snakemake reads those as wildcards).
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from dinosae.errors import ConfigError

SCHEMA_PATH = Path(__file__).with_name("config.schema.yaml")
MAX_CONFIG_BYTES = 1 << 20  # a config file, or --cfg JSON
MAX_ALIASES = 64  # YAML aliases (*name) in one document
MAX_VALUES = 100_000  # values in the whole config, aliases expanded (config.yaml has ~200)
MAX_DEPTH = 32
MAX_STRING = 10_000  # characters in one string (a path is at most 4096)
SHOWN = 60  # characters of a value quoted in a message
PATH_PATTERN = "^[^\\x00-\\x1f\\x7f{}]*$"  # the schema's paths: no control characters, no braces


def load_schema() -> dict:
    return yaml.safe_load(SCHEMA_PATH.read_text())


def _key(path: Iterable[Any]) -> str:
    parts = [_short(p, 40) if not isinstance(p, int) else f"[{p}]" for p in path]
    return ".".join(parts).replace(".[", "[") or "<root>"


def _short(value: Any, n: int = SHOWN) -> str:
    """str(value), cut to about n characters."""
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= n else f"{text[:n]}... ({len(text)} characters)"


def _message(err: jsonschema.ValidationError) -> str:
    key = _key(err.absolute_path)
    if err.validator == "additionalProperties":
        extra = sorted(map(str, set(err.instance) - set(err.schema.get("properties", {}))))
        where = f" in '{key}'" if err.absolute_path else ""
        plural = "s" if len(extra) > 1 else ""
        names = ", ".join(repr(_short(k, 40)) for k in extra[:5])
        more = f" and {len(extra) - 5} more" if len(extra) > 5 else ""
        return f"config: unknown key{plural} {names}{more}{where}"
    if err.validator == "required":
        return f"config: '{key}' is missing a required key: {_short(err.message.split(' ')[0])}"
    if err.validator == "pattern" and err.schema.get("pattern") == PATH_PATTERN:
        return (f"config: '{key}': {_short(repr(err.instance))} holds a control character "
                "(newline, tab, ...) or a brace, which a path handed to the workflow's shell "
                "lines and file patterns must not")
    message = err.message  # jsonschema quotes the whole value: quote only its start
    whole = repr(err.instance)
    if len(whole) > SHOWN and whole in message:
        message = message.replace(whole, _short(whole))
    return f"config: '{key}': {_short(message, 300)}"


def check_bounds(cfg: Any, finite: bool = True) -> None:
    """Refuse a config that is too big once YAML aliases are expanded: more than MAX_VALUES
    values, deeper than MAX_DEPTH, or a string longer than MAX_STRING. Shared sub-trees (what
    aliases make) are measured once, so this takes time in the size of the document, not of its
    expansion."""
    sizes: dict[int, int] = {}

    def size(node: Any, path: tuple, depth: int) -> int:
        if isinstance(node, str):
            if len(node) > MAX_STRING:
                raise ConfigError(f"config: '{_key(path)}': a string of {len(node)} characters "
                                  f"(at most {MAX_STRING})")
            return 1
        if finite and isinstance(node, float) and not math.isfinite(node):
            raise ConfigError(f"config: '{_key(path)}': {node} is not a finite number (NaN and "
                              "infinities are refused)")
        if not isinstance(node, (dict, list)):
            return 1
        if id(node) in sizes:
            return sizes[id(node)]
        if depth >= MAX_DEPTH:
            raise ConfigError(f"config: '{_key(path)}': nested more than {MAX_DEPTH} deep "
                              "(or a recursive YAML alias)")
        items = node.items() if isinstance(node, dict) else enumerate(node)
        total = 1
        for k, v in items:
            total += size(k, path, depth + 1) + size(v, (*path, k), depth + 1)
            if total > MAX_VALUES:
                raise ConfigError(f"config: '{_key(path)}' expands to more than {MAX_VALUES} "
                                  "values (YAML aliases?); refusing to read it")
        sizes[id(node)] = total
        return total

    size(cfg, (), 0)


def validate(cfg: dict, check_paths: bool = True) -> dict:
    """Validate `cfg` (a full config or a subset of its top-level sections); return it.

    Raises ConfigError naming the first offending key.
    """
    if not isinstance(cfg, dict):
        raise ConfigError(f"config: must be a mapping of sections, not a {type(cfg).__name__}")
    check_bounds(cfg)
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


def _splits_needed(cfg: dict) -> tuple[str, ...]:
    """The image folders a whole run reads (checked when the config has every section: the
    Snakefile's): val always (evaluation); train unless both models are imported (released
    weights: nothing is trained or encoded). A job that gets only some sections (the rules'
    --cfg, `dinosae shard --split train`) checks none: its reader requires only the split it
    reads and names it when missing."""
    ae, dit = cfg.get("autoencoder"), cfg.get("dit")
    if ae is None or dit is None:
        return ()
    if ae.get("pretrained") and dit.get("pretrained"):
        return ("val",)
    return ("train", "val")


def _check_paths(cfg: dict) -> None:
    """Paths that must exist before any job starts (outputs are created by the pipeline)."""
    data = cfg.get("data")
    if data and data["source"] == "folder":
        if not Path(data["root"]).is_dir():
            raise ConfigError(f"config: 'data.root': folder {data['root']!r} does not exist")
        for split in _splits_needed(cfg):
            if not (Path(data["root"]) / split).is_dir():
                raise ConfigError(f"config: 'data.root': {data['root']!r} has no {split}/ "
                                  "folder (ImageNet layout: train/<wnid>/*, val/<wnid>/* or a "
                                  "flat val/ with data.val_labels)")
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


class _BoundedLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses more than MAX_ALIASES aliases."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.aliases = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_ALIASES:
                raise ConfigError(f"more than {MAX_ALIASES} YAML aliases (*name)")
        return super().compose_node(parent, index)


def parse_yaml(text: str, where: str) -> Any:
    """YAML text -> Python values, bounded (see the module doc); ConfigError naming `where`."""
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config: {where}: {len(text)} characters, more than "
                          f"{MAX_CONFIG_BYTES}")
    try:
        value = yaml.load(text, Loader=_BoundedLoader)  # noqa: S506 (a SafeLoader)
    except ConfigError as e:
        raise ConfigError(f"config: {where}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"config: {where}: not valid YAML: {_short(problem, 200)}{at}") from None
    except (ValueError, RecursionError) as e:  # e.g. an integer of 10^5 digits; deep nesting
        raise ConfigError(f"config: {where}: unreadable value ({_short(str(e), 200)})") from None
    try:
        check_bounds(value, finite=False)  # numbers: checked by validate, naming the key
    except ConfigError as e:
        raise ConfigError(f"{e} (in {where})") from None
    return value


def read_config_file(path: str | Path) -> dict:
    """A YAML config file as a dict, read within the bounds of the module doc."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config: file {str(p)!r} does not exist")
    if not p.is_file():
        raise ConfigError(f"config: {str(p)!r} is not a regular file")
    if p.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"config: {str(p)!r} is {p.stat().st_size} bytes, more than "
                          f"{MAX_CONFIG_BYTES} (not a config?)")
    try:
        text = p.read_bytes()[:MAX_CONFIG_BYTES + 1].decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"config: {str(p)!r} is not UTF-8 text (a binary file?)") from None
    except OSError as e:
        raise ConfigError(f"config: {str(p)!r} cannot be read ({e.strerror})") from None
    cfg = parse_yaml(text, repr(str(p))) or {}
    if not isinstance(cfg, dict):
        raise ConfigError(f"config: {str(p)!r} must hold a mapping of sections")
    return cfg


def set_key(cfg: dict, dotted: str, value: Any) -> None:
    """Set `a.b.c` in a nested dict; the value is parsed as YAML (numbers, lists, null). A
    number indexes an existing list entry: `ae_train.stages.0.lr`."""
    if not all(dotted.split(".")):
        raise ConfigError(f"config: --set {_short(dotted)!r}: not a dotted key like dit.steps")
    node: Any = cfg
    *parents, last = dotted.split(".")
    for i, p in enumerate(parents):
        if isinstance(node, list) and p.isdigit() and int(p) < len(node):
            node = node[int(p)]
        elif isinstance(node, dict):
            node = node.setdefault(p, {})
        else:
            node = None
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"config: --set {_short(dotted)}: "
                              f"'{'.'.join(parents[:i + 1])}' is not a section")
    value = parse_yaml(value, f"--set {_short(dotted)}") if isinstance(value, str) else value
    if isinstance(node, list):
        if not (last.isdigit() and int(last) < len(node)):
            raise ConfigError(f"config: --set {_short(dotted)}: '{_short(last)}' is not an "
                              f"index of '{'.'.join(parents)}' (0..{len(node) - 1})")
        node[int(last)] = value
    else:
        node[last] = value


def load_config(
    path: str | Path | None = None,
    cfg_json: str | None = None,
    overrides: Iterable[str] = (),
    check_paths: bool = True,
) -> dict:
    """Read a YAML config file and/or a JSON string of sections, apply `key=value` overrides."""
    cfg: dict = {}
    if path is not None:
        cfg = read_config_file(path)
    if cfg_json:
        if len(cfg_json) > MAX_CONFIG_BYTES:
            raise ConfigError(f"config: --cfg: {len(cfg_json)} characters, more than "
                              f"{MAX_CONFIG_BYTES}")
        try:
            sections = json.loads(cfg_json)
        except (ValueError, RecursionError) as e:
            raise ConfigError(f"config: --cfg is not valid JSON ({_short(str(e), 200)})") from None
        if not isinstance(sections, dict):
            raise ConfigError("config: --cfg must be a JSON object of sections")
        cfg.update(sections)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"config: override {_short(item)!r} is not of the form key=value")
        key, value = item.split("=", 1)
        set_key(cfg, key, value)
    return validate(cfg, check_paths=check_paths)
