"""Files: atomic writes (temp name, then rename), small `key: value` results files, sha256.
No torch, so light jobs (plots, tables, status, sharding workers) start fast."""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dinosae.errors import NotRegularFile, WeightsFileError

MAX_SMALL_FILE = 256 << 20  # bytes read_regular reads at most (results files, metrics.csv)


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


def _kind(mode: int) -> str:
    for test, what in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return what
    return "not a regular file"


def check_regular(path: str | Path) -> None:
    """Refuse (NotRegularFile) a path that exists and is not a regular file (links followed):
    call it before a library opens the file, so a FIFO never blocks the reader."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISREG(mode):
        raise NotRegularFile(f"{path}: is {_kind(mode)}, not a regular file; not read")


def read_regular(path: str | Path, limit: int = MAX_SMALL_FILE) -> bytes:
    """The bytes of a regular file of at most `limit` bytes, opened without blocking: a FIFO,
    device, folder or socket is refused (NotRegularFile naming it), never read."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFile(f"{path}: is {_kind(st.st_mode)}, not a regular file; not read")
        if st.st_size > limit:
            raise NotRegularFile(f"{path}: {st.st_size} bytes, more than {limit}; not read")
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read(limit + 1)[:limit]
    finally:
        os.close(fd)


def read_kv(path: str | Path) -> dict[str, str]:
    """A `key: value` results file (a regular file, read without blocking)."""
    out = {}
    for line in read_regular(path).decode("utf-8").splitlines():
        if ":" in line:
            k, v = line.split(":", 1)
            out[k.strip()] = v.strip()
    return out
