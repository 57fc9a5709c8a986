"""Files: atomic writes (temp name, then rename), small `key: value` results files, sha256.
No torch, so light jobs (plots, tables, status, sharding workers) start fast."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dinosae.errors import WeightsFileError


def read_safetensors(path: str | Path, device: str = "cpu") -> dict:
    """The tensors of a .safetensors file (torch, imported here); a missing, empty, truncated or
    malformed file (header length 2^62, bad JSON) is a WeightsFileError naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise WeightsFileError(f"weights file {str(path)!r} does not exist")
    try:
        return load_file(str(path), device=device)
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsFileError(f"{str(path)!r} is not a readable .safetensors file ({e})") from None


@contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """A temporary name beside `path` to write to; renamed over `path` when the block succeeds
    and removed when it fails (a full disk, a kill signal handled as an exception), so `path`
    is never partly written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in blocks (checkpoints, manifests, weights, tars)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def write_kv(path: str | Path, items: Mapping[str, Any]) -> None:
    """A small `key: value` results file (results/gfid.txt, results/recon.txt)."""
    atomic_write_text(path, "".join(f"{k}: {v}\n" for k, v in items.items()))


def read_kv(path: str | Path) -> dict[str, str]:
    out = {}
    for line in Path(path).read_text().splitlines():
        if ":" in line:
            k, v = line.split(":", 1)
            out[k.strip()] = v.strip()
    return out
