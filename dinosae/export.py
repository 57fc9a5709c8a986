"""`dinosae export-model`: a trained autoencoder or DiT checkpoint -> a portable folder.

    <out>/config.json          what the model is: format, kind, the config that rebuilds it, the
                               source checkpoint (path, sha256, step, stage)
    <out>/model.safetensors    its EMA weights: no optimizer or other training state, no pickle
    <out>/autoencoder/         DiT only: the autoencoder that decodes its samples (same layout)

`dinosae.load_autoencoder` / `dinosae.load_generator` read it back (json + safetensors only).
The folder is written under a temporary name beside `out` and renamed into place, holding the
lock on `out`; an existing `out` that is not an export is refused (dinosae.outputs).

An export is untrusted input: `read_export` checks config.json's fields against each other and
against the tensors (counts, grid vs tokens, radius = sqrt(channels), finite positive radii), and
a bundled autoencoder must be a folder inside the export.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from dinosae.checkpoint import AE_KIND, DIT_KIND, load_checkpoint, read_checkpoint
from dinosae.errors import ConfigError, ExportError
from dinosae.files import read_safetensors
from dinosae.outputs import default_mode, names_only, replace_dir, writing

log = logging.getLogger("dinosae.export")

FORMAT, VERSION = "dinosae-model", 1
CONFIG, WEIGHTS, AE_DIR = "config.json", "model.safetensors", "autoencoder"
MAX_CONFIG_BYTES = 16 << 20


def is_export(path: str | Path) -> bool:
    path = Path(path)
    return (path / CONFIG).is_file() and (path / WEIGHTS).is_file()


def read_config(folder: str | Path) -> dict:
    """An export's config.json: a dinosae-model document of a known kind and version."""
    path = Path(folder) / CONFIG
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ExportError(f"{path}: {path.stat().st_size} bytes; not an export's config")
    try:
        doc = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as e:
        raise ExportError(f"{path}: not valid JSON ({str(e)[:200]})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("kind") not in (
            AE_KIND, DIT_KIND):
        what = (f"format {doc.get('format')!r:.60}, kind {doc.get('kind')!r:.60}"
                if isinstance(doc, dict) else f"a JSON {type(doc).__name__}")
        raise ExportError(f"{path}: not a {FORMAT} config ({what})")
    version = doc.get("version", 0)
    if not isinstance(version, int) or version > VERSION:
        raise ExportError(f"{Path(folder)}: export version {version!r:.40}; this dinosae reads "
                          f"up to {VERSION}")
    return doc


def _posint(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _posnum(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and value > 0)


def check_config(folder: Path, doc: dict) -> None:
    """config.json's fields agree with each other (see the module doc); ExportError naming the
    field that does not."""
    from dinosae import rfm

    where = folder / CONFIG

    def bad(key: str, why: str) -> ExportError:
        return ExportError(f"{where}: '{key}' {why}")

    cfg = doc.get("config")
    if not isinstance(cfg, dict):
        raise bad("config", "is not a mapping")
    if doc["kind"] == AE_KIND:
        size = (cfg.get("data") or {}).get("image_size")
        if not _posint(size) or size % 16:
            raise bad("config.data.image_size", f"is {size!r:.40}, not a multiple of 16")
        for key, want in (("image_size", size), ("grid", [size // 16, size // 16])):
            if key in doc and doc[key] != want:
                raise bad(key, f"is {doc[key]!r:.40}, but the config gives {want}")
        if "channels" in doc and not _posint(doc["channels"]):
            raise bad("channels", f"is {doc['channels']!r:.40}, not a positive integer")
        return
    for key in ("tokens", "channels", "num_classes"):
        if not _posint(cfg.get(key)):
            raise bad(f"config.{key}", f"is {cfg.get(key)!r:.40}, not a positive integer")
    grid, T, C = cfg.get("grid"), cfg["tokens"], cfg["channels"]
    if not (isinstance(grid, list) and len(grid) == 2 and all(map(_posint, grid))):
        raise bad("config.grid", f"is {grid!r:.40}, not [height, width]")
    if grid[0] * grid[1] != T:
        raise bad("config.grid", f"{grid} holds {grid[0] * grid[1]} tokens, not config.tokens "
                                 f"= {T}")
    for key, want in (("radius", math.sqrt(C)), ("alpha", rfm.alpha_for(T, C))):
        have = cfg.get(key)
        if not _posnum(have) or not math.isclose(have, want, rel_tol=1e-6):
            raise bad(f"config.{key}", f"is {have!r:.40}; {T} tokens x {C} channels give "
                                       f"{want:.6g}")
    for key, value in (("config.mean_norm", cfg.get("mean_norm")),
                       ("decode_radius", doc.get("decode_radius"))):
        if value is not None and not _posnum(value):
            raise bad(key, f"is {value!r:.40}, not a finite positive number")
    if not isinstance(cfg.get("dit"), dict):
        raise bad("config.dit", "is not a mapping")
    bundled = doc.get("autoencoder")
    if bundled is not None:  # its tokens must be the generator's
        ae_dir = bundled_dir(folder, bundled)
        ae_doc = read_config(ae_dir)
        if ae_doc["kind"] != AE_KIND:
            raise bad("autoencoder", f"({bundled!r:.40}) is an exported {ae_doc['kind']}")
        check_config(ae_dir, ae_doc)
        for key, have in (("grid", grid), ("channels", C)):
            if key in ae_doc and ae_doc[key] != have:
                raise bad(f"config.{key}", f"is {have!r:.40}, but the bundled autoencoder's "
                                           f"is {ae_doc[key]!r:.40}")


def bundled_dir(folder: Path, name: Any) -> Path:
    """The export's bundled autoencoder folder: a plain relative name inside the export."""
    where = folder / CONFIG
    if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(
            name).parts:
        raise ExportError(f"{where}: 'autoencoder' is {name!r:.80}: a bundled autoencoder must "
                          "be a folder inside the export")
    path = folder / name
    if not path.resolve().is_relative_to(folder.resolve()) or path.is_symlink():
        raise ExportError(f"{where}: 'autoencoder' ({name!r:.80}) leads outside the export")
    if not is_export(path):
        raise ExportError(f"{where}: 'autoencoder' ({name!r:.80}) is not an export folder")
    return path


def read_export(folder: str | Path, device: str | torch.device = "cpu"
                ) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json, state dict) of an export folder, config.json checked (check_config)."""
    folder = Path(folder)
    if not is_export(folder):
        raise ConfigError(f"{folder}: not an exported model (needs {CONFIG} and {WEIGHTS})")
    doc = read_config(folder)
    check_config(folder, doc)
    state = read_safetensors(folder / WEIGHTS, device=str(device))
    if "tensors" in doc and doc["tensors"] != len(state):
        raise ExportError(f"{folder / CONFIG}: 'tensors' is {doc['tensors']!r:.40}, but "
                          f"{WEIGHTS} holds {len(state)}")
    return doc, state


EXPORT_NAMES = names_only(re.escape(CONFIG), re.escape(WEIGHTS), re.escape(AE_DIR))


def _own_export(folder: Path) -> str | None:
    """The first entry of `folder` that export-model does not write (None: an export)."""
    foreign = EXPORT_NAMES(folder)
    if foreign is not None:
        return foreign
    try:
        read_config(folder)
    except (ExportError, OSError):
        return CONFIG
    return None


_own_export.accepts = EXPORT_NAMES.accepts  # type: ignore[attr-defined]


def _write(folder: Path, kind: str, config: dict, state: dict[str, torch.Tensor],
           source: dict, extra: dict | None = None) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    tensors, seen = {}, set()
    for k, v in state.items():  # safetensors refuses tensors that share memory: copy those
        v = v.detach().cpu()
        ptr = v.untyped_storage().data_ptr() if v.numel() else None
        tensors[k] = v.clone().contiguous() if ptr in seen else v.contiguous()
        seen.add(ptr)
    save_file(tensors, str(folder / WEIGHTS), metadata={"format": "pt", "kind": kind})
    default_mode(folder / WEIGHTS)  # safetensors writes 0600; the other files follow the umask
    doc = {"format": FORMAT, "version": VERSION, "kind": kind, "config": config,
           "source": source, "weights": WEIGHTS, "tensors": len(tensors),
           "dtype": str(next(iter(tensors.values())).dtype).replace("torch.", "")}
    doc.update(extra or {})
    (folder / CONFIG).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")


def _source(path: Path, ck: dict) -> dict:
    from dinosae.files import sha256_file

    return {"checkpoint": str(path), "sha256": sha256_file(path), "step": ck.get("step"),
            "stage": ck.get("stage"), "imported": ck.get("imported")}


def _write_ae(folder: Path, path: Path, ck: dict) -> None:
    """The EMA autoencoder with its teacher: an export is all a user needs to encode."""
    from dinosae.models.autoencoder import DinoSAE

    if ck.get("stage") != 4:
        log.warning("%s is a stage %s checkpoint: its decoder is not the final (stage 4) one",
                    path, ck.get("stage"))
    ae = DinoSAE.from_checkpoint(ck, str(path))  # rebuilds and checks the teacher
    size = int(ck["config"]["data"]["image_size"])
    _write(folder, AE_KIND, ck["config"], ae.state_dict(), _source(path, ck),
           {"image_size": size, "grid": list(ae.grid), "channels": int(ae.channels)})


def export_model(cfg: dict, checkpoint: str | Path, out: str | Path,
                 ae: str | Path | None = None, force: bool = False) -> Path:
    """Write the EMA weights of an AE or DiT checkpoint as `out`/ (see the module doc). For a
    DiT, the autoencoder `ae` (default: the one it was trained with, if that file exists) is
    bundled as `out`/autoencoder/. `cfg` is not used (the checkpoint carries its config). An
    existing `out` that is not an export is refused (`force`: replaced)."""
    checkpoint, out = Path(checkpoint), Path(out)
    if is_export(checkpoint):
        raise ConfigError(f"{checkpoint} is already an exported model")
    if not checkpoint.is_file():
        raise ConfigError(f"checkpoint {str(checkpoint)!r} does not exist")
    ck = load_checkpoint(checkpoint)
    kind = ck.get("kind")
    if kind not in (AE_KIND, DIT_KIND) or "ema" not in ck:
        raise ConfigError(f"{checkpoint}: not a dinosae autoencoder or DiT checkpoint "
                          f"(kind {kind!r})")
    if kind == DIT_KIND and ae is None and ck.get("ae") and Path(str(ck["ae"])).is_file():
        ae = ck["ae"]
    with writing(out, "export-model", _own_export, force=force, inputs=[checkpoint, ae]):
        tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
        try:
            if kind == AE_KIND:
                _write_ae(tmp, checkpoint, ck)
            else:
                _write_dit(tmp, checkpoint, ck, ae)
            replace_dir(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("exported %s (%s) -> %s", checkpoint, kind, out)
    return out


def _write_dit(folder: Path, path: Path, ck: dict, ae: str | Path | None) -> None:
    from dinosae.models.dit import dit_from_checkpoint

    c = ck["config"]
    dit_from_checkpoint(ck, str(path))  # checks the names/shapes
    if ae is None and ck.get("ae") and Path(ck["ae"]).is_file():
        ae = ck["ae"]
    extra: dict[str, Any] = {"autoencoder": None, "decode_radius": c.get("mean_norm")}
    _write(folder, DIT_KIND, c, ck["ema"], _source(path, ck), extra)
    if ae is None:
        log.warning("no autoencoder bundled with %s: load_generator(..., autoencoder=...) will "
                    "need one to decode samples", path)
        return
    ae_ck = read_checkpoint(ae, AE_KIND)
    _write_ae(folder / AE_DIR, Path(ae), ae_ck)
    doc = json.loads((folder / CONFIG).read_text())
    doc["autoencoder"] = AE_DIR
    (folder / CONFIG).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")



def export_latents(cfg: dict, cache: str | Path, out: str | Path, force: bool = False) -> Path:
    """`dinosae export-latents`: the single-file output rule (dinosae.outputs.claim_file: an
    existing `out` that is not an earlier export of a cache is refused unless `force`; never the
    cache itself), then latents.export_hdf5 (written to a temporary name and renamed)."""
    from dinosae import latents
    from dinosae.outputs import claim_file, h5_ours

    claim_file({out: h5_ours("attrs_json")}, "export-latents", force=force, inputs=[cache])
    return latents.export_hdf5(cfg, cache, out)
