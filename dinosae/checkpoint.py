"""Checkpoints: the one place that spells their kinds, saves them and loads them.

A checkpoint is a dict of tensors, plain containers, strings and numbers, so it loads with
`torch.load(weights_only=True)`; it is written to a temporary name and renamed (atomic). Every
checkpoint carries `kind` (below), `step` and `config`, the small model config that rebuilds its
network (`models.autoencoder.AutoencoderArgs`, `models.dit.DiTArgs`, nanoGPT's `model_args`).
"""

from __future__ import annotations

import hashlib
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from dinosae.errors import CheckpointError, MissingCheckpoint, WrongCheckpointKind
from dinosae.files import atomic_path

AE_KIND = "dinosae-ae"  # an autoencoder stage (or an imported release)
DIT_KIND = "dinosae-dit"  # a flow-matching DiT
KIND_NAMES = {AE_KIND: "an autoencoder", DIT_KIND: "a DiT"}


def save_checkpoint(path: str | Path, state: Mapping[str, Any]) -> None:
    """torch.save to a temporary name, fsync, rename. `state` must hold only tensors, plain
    containers, strings and numbers, so that it loads with weights_only=True."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        try:
            torch.save(dict(state), f)
        except RuntimeError as e:  # torch's zip writer reports a failed write (full disk) so
            if isinstance(e.__context__, OSError):
                raise e.__context__ from None
            raise
        f.flush()
        os.fsync(f.fileno())


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu",
                    mmap: bool = False) -> dict:
    """Load a checkpoint or weights file without unpickling code (weights_only=True); a file
    that holds anything but tensors, plain containers, strings and numbers is refused. `mmap`
    maps the tensors instead of reading them (to look at a large file's metadata)."""
    path = Path(path)
    if not path.is_file():
        raise MissingCheckpoint(f"checkpoint {str(path)!r} does not exist")
    try:
        ck = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        what = [ln.strip() for ln in str(e).splitlines() if "Unsupported global" in ln]
        if not what:  # not a pickle of something else: not a torch file at all
            raise CheckpointError(f"{str(path)!r} is not a readable checkpoint (not a torch "
                                  "file of tensors)") from None
        raise CheckpointError(f"refusing to load {str(path)!r}: it holds pickled objects other "
                              f"than tensors and plain containers ({what[0]})") from None
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - garbage makes the unpickler fail in any way
        why = " ".join(str(e).split())[:200]
        raise CheckpointError(f"{str(path)!r} is not a readable checkpoint (truncated or not a "
                              f"torch file: {type(e).__name__}{': ' + why if why else ''})"
                              ) from None
    if not isinstance(ck, dict):
        raise CheckpointError(f"{str(path)!r} is not a dinosae checkpoint (a {type(ck).__name__})")
    return ck


def expect_kind(ck: Mapping[str, Any], kind: str, path: str | Path, hint: str = "") -> None:
    """Refuse a checkpoint of another kind: '<path> is not a DiT checkpoint (kind ...)'."""
    if ck.get("kind") != kind:
        raise WrongCheckpointKind(f"{str(path)!r} is not {KIND_NAMES[kind]} checkpoint (kind "
                              f"{ck.get('kind')!r}, expected {kind!r}){hint}")


def read_checkpoint(path: str | Path, kind: str, map_location: str | torch.device = "cpu",
                    hint: str = "") -> dict:
    """load_checkpoint + expect_kind."""
    ck = load_checkpoint(path, map_location=map_location)
    expect_kind(ck, kind, path, hint)
    return ck


def tensors_fingerprint(module: torch.nn.Module) -> str:
    """sha256 over a module's state dict (names, dtypes, shapes, bytes): which weights these are,
    whatever file they came from (the teacher a stage references; the FD extractor's id)."""
    h = hashlib.sha256()
    for key, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
