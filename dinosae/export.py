"""`dinosae export-model`: a trained autoencoder or DiT checkpoint -> a portable folder.

    <out>/config.json          what the model is: format, kind, the config that rebuilds it, the
                               source checkpoint (path, sha256, step, stage)
    <out>/model.safetensors    its EMA weights: no optimizer or other training state, no pickle
    <out>/autoencoder/         DiT only: the autoencoder that decodes its samples (same layout)

`dinosae.load_autoencoder` / `dinosae.load_generator` read it back (json + safetensors only).
The folder is written under a temporary name beside `out` and renamed into place.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from dinosae.config import ConfigError

log = logging.getLogger("dinosae.export")

FORMAT, VERSION = "dinosae-model", 1
CONFIG, WEIGHTS, AE_DIR = "config.json", "model.safetensors", "autoencoder"
AE_KIND, DIT_KIND = "dinosae-ae", "dinosae-dit"


def is_export(path: str | Path) -> bool:
    path = Path(path)
    return (path / CONFIG).is_file() and (path / WEIGHTS).is_file()


def read_export(folder: str | Path, device: str | torch.device = "cpu"
                ) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json, state dict) of an export folder."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not is_export(folder):
        raise ConfigError(f"{folder}: not an exported model (needs {CONFIG} and {WEIGHTS})")
    config = json.loads((folder / CONFIG).read_text())
    if config.get("format") != FORMAT or config.get("kind") not in (AE_KIND, DIT_KIND):
        raise ConfigError(f"{folder}/{CONFIG}: not a {FORMAT} config (format "
                          f"{config.get('format')!r}, kind {config.get('kind')!r})")
    if int(config.get("version", 0)) > VERSION:
        raise ConfigError(f"{folder}: export version {config['version']}; this dinosae reads "
                          f"up to {VERSION}")
    return config, load_file(str(folder / WEIGHTS), device=str(device))


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
    doc = {"format": FORMAT, "version": VERSION, "kind": kind, "config": config,
           "source": source, "weights": WEIGHTS, "tensors": len(tensors),
           "dtype": str(next(iter(tensors.values())).dtype).replace("torch.", "")}
    doc.update(extra or {})
    (folder / CONFIG).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")


def _source(path: Path, ck: dict) -> dict:
    from dinosae.train.common import sha256_file

    return {"checkpoint": str(path), "sha256": sha256_file(path), "step": ck.get("step"),
            "stage": ck.get("stage"), "imported": ck.get("imported")}


def _write_ae(folder: Path, path: Path, ck: dict) -> None:
    from dinosae.models.autoencoder import build_autoencoder

    if ck.get("stage") != 4:
        log.warning("%s is a stage %s checkpoint: its decoder is not the final (stage 4) one",
                    path, ck.get("stage"))
    ae = build_autoencoder(ck["config"], load_teacher_weights=False)  # checks the names/shapes
    ae.load_state_dict(ck["ema"])
    size = int(ck["config"]["data"]["image_size"])
    _write(folder, AE_KIND, ck["config"], ck["ema"], _source(path, ck),
           {"image_size": size, "grid": list(ae.grid), "channels": int(ae.channels)})


def export_model(cfg: dict, checkpoint: str | Path, out: str | Path,
                 ae: str | Path | None = None) -> Path:
    """Write the EMA weights of an AE or DiT checkpoint as `out`/ (see the module doc). For a
    DiT, the autoencoder `ae` (default: the one it was trained with, if that file exists) is
    bundled as `out`/autoencoder/. `cfg` is not used (the checkpoint carries its config)."""
    from dinosae.train.common import load_checkpoint

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
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if kind == AE_KIND:
            _write_ae(tmp, checkpoint, ck)
        else:
            _write_dit(tmp, checkpoint, ck, ae)
        _replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("exported %s (%s) -> %s", checkpoint, kind, out)
    return out


def _write_dit(folder: Path, path: Path, ck: dict, ae: str | Path | None) -> None:
    from dinosae.models.dit import dit_from_config
    from dinosae.train.common import load_checkpoint

    c = ck["config"]
    dit_from_config(c).load_state_dict(ck["ema"])  # checks the names/shapes
    if ae is None and ck.get("ae") and Path(ck["ae"]).is_file():
        ae = ck["ae"]
    extra: dict[str, Any] = {"autoencoder": None, "decode_radius": c.get("mean_norm")}
    _write(folder, DIT_KIND, c, ck["ema"], _source(path, ck), extra)
    if ae is None:
        log.warning("no autoencoder bundled with %s: load_generator(..., autoencoder=...) will "
                    "need one to decode samples", path)
        return
    ae_ck = load_checkpoint(ae)
    if ae_ck.get("kind") != AE_KIND:
        raise ConfigError(f"--ae {ae}: not an autoencoder checkpoint (kind {ae_ck.get('kind')!r})")
    _write_ae(folder / AE_DIR, Path(ae), ae_ck)
    doc = json.loads((folder / CONFIG).read_text())
    doc["autoencoder"] = AE_DIR
    (folder / CONFIG).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")


def _replace_dir(tmp: Path, out: Path) -> None:
    """`tmp` becomes `out`; an existing `out` is moved aside first and removed after."""
    old = out.with_name(f".{out.name}.old{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except OSError:
        if old.exists():
            os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)
