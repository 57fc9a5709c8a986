"""The latent cache: every image of a shard folder encoded once into a zarr v3 store of unit-norm
tokens (scatter/gather), validated, then read back by training code, or by anyone with plain zarr.

Store (`results/latents/<split>.zarr`); row i is image i of the shard manifest:

    tokens       float16 [N, T, C]   unit-norm (along C) encoder tokens of image i
    labels       int64   [N]         class index of image i (attribute `classes` names them)
    norms        float32 [N, T]      the encoder's raw token norms (before normalising)
    tokens_flip  float16 [N, T, C]   the same for image i flipped left-right   (only when flip)
    norms_flip   float32 [N, T]                                             (only when flip)
    written      uint8   [U]         bookkeeping: written[u] = 1 once unit u is written

Units. Every array is cut along N into units of S = chunk_rows × shard_chunks rows. A unit is
exactly one zarr shard of each array (tokens: inner chunks of chunk_rows rows, so one sample or a
contiguous batch is one or a few reads), and it is written whole, in one call, by exactly one
job. Two jobs therefore never touch the same zarr object (writing part of a shard is a
read-modify-write that would race). A unit is also the grain of batching (so the values never
depend on how the work is split) and of resume (`written[u]`, set after the unit's data).

Regions. Part k of K takes the webdataset shards [k·M/K, (k+1)·M/K) of the M in the manifest and
writes the units that begin among their images. Tars hold arbitrary counts, so the unit that
straddles a part boundary is written whole by the part where it begins, which reads the first
few (at most S − 1) images of the next part's first tar; the next part skips them.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import math
import os
import queue
import shutil
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec, ZstdCodec
from zarr.core.buffer import default_buffer_prototype

from dinosae.dist import pick_device
from dinosae.errors import CacheError
from dinosae.faults import fault_point
from dinosae.files import atomic_write_text, sha256_file
from dinosae.outputs import names_only, output_lock, replace_dir, writing
from dinosae.progress import Progress

log = logging.getLogger(__name__)

FORMAT, VERSION = "dinosae-latents", 1
NORM_TOL = 1e-3  # |‖token‖ − 1| allowed in the stored (fp16) tokens
CHUNK_BYTES = 1 << 20  # chunk_rows: null -> about 1 MiB of tokens per chunk
SHARD_CHUNKS = 16  # shard_chunks default
DESCRIPTION = (
    "Row i of tokens/labels/norms is image i of the source shard manifest. tokens: float16 "
    "[N, T, C] unit-norm along C (T = grid[0]*grid[1], row-major); norms: the raw token norms; "
    "tokens_flip/norms_flip (when flip): the same for image i flipped left-right. "
    "Use only when complete is true.")


ARRAYS = ("tokens", "labels", "norms", "tokens_flip", "norms_flip", "written")
# what encode_init writes into the store (zarr's own files only)
STORE_NAMES = names_only("zarr.json", *ARRAYS)
MEAN_NORM_EXACT_VALUES = 1 << 24  # open_cache recomputes mean_norm exactly up to N x T norms


# ---------------------------------------------------------------- small helpers


def compressors(name: str) -> tuple:
    """Codec chain for cfg latents.compression (see bench/latents.py for the measurements)."""
    if name == "none":
        return ()
    if name == "zstd":
        return (ZstdCodec(level=3),)
    if name == "blosc":
        return (BloscCodec(cname="zstd", clevel=3, shuffle="shuffle"),)
    raise ValueError(f"latents.compression: unknown codec {name!r} (none | zstd | blosc)")


def chunking(lcfg: dict, row_bytes: int) -> tuple[int, int]:
    """(chunk_rows, unit_rows): chunk_rows null -> about CHUNK_BYTES per chunk."""
    chunk = lcfg.get("chunk_rows") or max(1, CHUNK_BYTES // row_bytes)
    return chunk, chunk * lcfg.get("shard_chunks", SHARD_CHUNKS)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _check_manifest(m: dict, where: str) -> None:
    expect = 0
    for s in m["shards"]:
        if s["first_index"] != expect:
            raise ValueError(f"{where}: shard {s['name']} starts at sample {s['first_index']}, "
                             f"expected {expect} (shards must be contiguous in manifest order)")
        expect += s["count"]


def plan_regions(manifest: dict, unit_rows: int, parts: int) -> list[dict]:
    """The K regions: a pure function of (manifest, unit_rows, parts); see the module doc."""
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    shards, n = manifest["shards"], manifest["count"]
    m = len(shards)
    regions = []
    for k in range(parts):
        lo, hi = k * m // parts, (k + 1) * m // parts
        first = shards[lo]["first_index"] if lo < m else n
        end = shards[hi]["first_index"] if hi < m else n
        u0, u1 = _ceil_div(first, unit_rows), _ceil_div(end, unit_rows)
        regions.append({
            "part": k, "shards": [lo, hi],
            "shard_names": [shards[lo]["name"], shards[hi - 1]["name"]] if hi > lo else [],
            "units": [u0, u1], "rows": [min(u0 * unit_rows, n), min(u1 * unit_rows, n)]})
    return regions


def describe_region(r: dict, parts: int) -> str:
    names = "..".join(r["shard_names"]) or "no shards"
    a, b = r["rows"]
    rows = f"rows {a}..{b - 1}" if b > a else "no rows"
    return f"region {r['part']} (encode-part --index {r['part']} --parts {parts}: {names}, {rows})"


def _region_of_unit(u: int, layout: dict) -> dict:
    return next(r for r in layout["regions"] if r["units"][0] <= u < r["units"][1])


def _background(items: Iterable, depth: int = 2) -> Iterator:
    """Iterate `items` in a thread, `depth` ahead; exceptions are re-raised here; stopping early
    (break, close) stops the thread."""
    q: queue.Queue = queue.Queue(depth)
    stop, end = threading.Event(), object()

    def put(x: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(x, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def run() -> None:
        try:
            for x in items:
                if not put(x):
                    return
            put(end)
        except BaseException as e:  # handed to the consumer
            put(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        while True:
            x = q.get()
            if x is end:
                return
            if isinstance(x, BaseException):
                raise x
            yield x
    finally:
        stop.set()


# ---------------------------------------------------------------- encoder and images

def _load_encoder(checkpoint: str | Path, device: str | torch.device) -> Any:
    """The stage checkpoint's EMA autoencoder (eval mode): `.grid`, `.channels`, `.encode(x)`."""
    from dinosae.models.autoencoder import DinoSAE

    return DinoSAE.load(checkpoint, device=device)


@torch.no_grad()
def encode_images(model: Any, images: np.ndarray, device: torch.device, batch_size: int,
                  flip: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (n, H, W, 3) -> (unit-norm tokens float16 (n, T, C), raw norms float32 (n, T)).
    Normalised in fp32, then cast."""
    tokens, norms = [], []
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(images[i:i + batch_size]).to(device)
        x = x.permute(0, 3, 1, 2).float().div_(255.0)  # (B, 3, H, W) in [0, 1]
        if flip:
            x = x.flip(-1)
        z, n = model.encode_unit(x)  # (B, T, C) unit tokens, (B, T) raw norms
        tokens.append(z.half().cpu().numpy())
        norms.append(n.cpu().numpy())
    return np.concatenate(tokens), np.concatenate(norms)


def _ordered_map(fn: Any, items: Iterable, pool: ThreadPoolExecutor | None, ahead: int
                 ) -> Iterator:
    """fn(*item) for each item, in order; with a pool, up to `ahead` calls run in its threads
    while the caller consumes (bounded: a large tar is never decoded whole into memory)."""
    if pool is None:
        for item in items:
            yield fn(*item)
        return
    pending: deque = deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, *item))
            if len(pending) >= ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for f in pending:
            f.cancel()


def iter_images(shards: str | Path, manifest: dict, start: int, stop: int,
                pool: ThreadPoolExecutor | None = None, ahead: int = 32
                ) -> Iterator[tuple[int, np.ndarray, int]]:
    """(index, image, label) for images start..stop-1 in manifest order, opening only the tars
    that hold them; checks that the tars hold what the manifest says. With `pool`, the JPEGs
    are decoded in its threads (PIL releases the GIL), in order, at most `ahead` in flight."""
    from dinosae.data.shard import decode_sample, iter_shard_bytes

    for s in manifest["shards"]:
        a, b = s["first_index"], s["first_index"] + s["count"]
        if b <= start or a >= stop:
            continue
        tar = Path(shards) / s["name"]

        def wanted(tar: Path = tar, a: int = a) -> Iterator[tuple[str, dict, Path]]:
            """The undecoded samples from `start` on (those before are read, not decoded)."""
            for i, (key, sample) in enumerate(iter_shard_bytes(tar)):
                if a + i >= stop:
                    return
                if a + i >= start:
                    yield key, sample, tar

        expect = max(a, start)
        for index, image, label in _ordered_map(decode_sample, wanted(), pool, ahead):
            if index != expect:
                raise ValueError(f"{s['name']}: sample {index} where the manifest puts {expect}")
            expect += 1
            yield index, image, label
        if expect < min(b, stop):
            raise ValueError(f"{s['name']}: holds {expect - a} samples, manifest says {s['count']}")


def _runs(units: list[int]) -> list[tuple[int, int]]:
    """Sorted unit numbers -> contiguous [start, stop) runs."""
    runs: list[tuple[int, int]] = []
    for u in units:
        if runs and runs[-1][1] == u:
            runs[-1] = (runs[-1][0], u + 1)
        else:
            runs.append((u, u + 1))
    return runs


def iter_units(shards: str | Path, manifest: dict, units: list[int], unit_rows: int,
               workers: int = 0) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(unit, images uint8 (n, H, W, 3), labels int64 (n,)) for each listed unit, streaming each
    contiguous run of units through the tars once; `workers` > 0 threads decode the JPEGs."""
    n = manifest["count"]
    with contextlib.ExitStack() as stack:
        pool = stack.enter_context(ThreadPoolExecutor(workers)) if workers > 0 else None
        yield from _units(shards, manifest, units, unit_rows, n, pool, 4 * max(1, workers))


def _units(shards: str | Path, manifest: dict, units: list[int], unit_rows: int, n: int,
           pool: ThreadPoolExecutor | None, ahead: int
           ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    for u0, u1 in _runs(units):
        images, labels, u = [], [], u0
        for index, image, label in iter_images(shards, manifest, u0 * unit_rows,
                                               min(u1 * unit_rows, n), pool, ahead):
            images.append(image)
            labels.append(label)
            if index + 1 == min((u + 1) * unit_rows, n):
                yield u, np.stack(images), np.asarray(labels, dtype=np.int64)
                images, labels, u = [], [], u + 1


# ---------------------------------------------------------------- scatter / gather

def _own_store(store: Path) -> str | None:
    """The first entry of `store` that encode_init does not write (None: a dinosae cache)."""
    foreign = STORE_NAMES(store)
    if foreign is not None:
        return foreign
    try:
        with open(store / "zarr.json", "rb") as f:
            doc = json.loads(f.read(1 << 24))
        ok = isinstance(doc, dict) and (doc.get("attributes") or {}).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        ok = False
    return None if ok else "zarr.json"


_own_store.accepts = STORE_NAMES.accepts  # type: ignore[attr-defined]


def _create_arrays(path: Path, attrs: dict, flip: bool, n: int, T: int, C: int, chunk: int,
                   unit: int, units: int, comp: tuple) -> None:
    group = zarr.open_group(path, mode="w")
    for suffix in ("", "_flip") if flip else ("",):
        group.create_array(f"tokens{suffix}", shape=(n, T, C), dtype="float16",
                           chunks=(chunk, T, C), shards=(unit, T, C), compressors=comp,
                           fill_value=np.nan)
        group.create_array(f"norms{suffix}", shape=(n, T), dtype="float32", chunks=(unit, T),
                           compressors=comp, fill_value=np.nan)
    group.create_array("labels", shape=(n,), dtype="int64", chunks=(unit,), compressors=comp,
                       fill_value=-1)
    group.create_array("written", shape=(units,), dtype="uint8", chunks=(1,), compressors=(),
                       fill_value=0)
    group.attrs.update(attrs)


def encode_init(cfg: dict, shards: str | Path, checkpoint: str | Path, out: str | Path,
                force: bool = False) -> Path:
    """Create the cache's arrays (all unwritten) and attributes. Config section: latents.
    The store is built beside `out` and renamed into place, holding the lock on `out`; an
    existing `out` that is not a dinosae cache is refused (`force`: replaced)."""
    from dinosae.data.shard import MANIFEST, check_image_size, read_manifest

    lcfg, out = cfg.get("latents", {}), Path(out)
    manifest = read_manifest(shards)
    manifest_path = Path(shards) / MANIFEST
    _check_manifest(manifest, str(manifest_path))
    size = int(manifest["preprocess"]["image_size"])
    model = _load_encoder(checkpoint, "cpu")
    grid = [int(g) for g in model.grid]
    check_image_size(manifest, shards, 16 * grid[0], f"the autoencoder {checkpoint}")
    with torch.no_grad():  # the token shape this encoder gives at this image size
        _, T, C = model.encode(torch.zeros(1, 3, size, size)).shape
    if grid[0] * grid[1] != T or int(model.channels) != C:
        raise CacheError(f"{checkpoint}: the encoder gives {T}x{C} tokens at {size} px, but "
                         f"declares grid {grid} and {model.channels} channels")
    n, flip = int(manifest["count"]), bool(lcfg.get("flip", False))
    chunk, unit = chunking(lcfg, T * C * 2)
    units = _ceil_div(n, unit)
    parts = int(lcfg.get("parts", 1))
    codec = lcfg.get("compression", "zstd")
    attrs = {
        "format": FORMAT, "version": VERSION, "description": DESCRIPTION,
        "count": n, "rows": n * (2 if flip else 1), "grid": grid, "tokens": int(T),
        "channels": int(C), "radius": 1.0, "image_size": size, "flip": flip,
        "num_classes": len(manifest["classes"]), "classes": list(manifest["classes"]),
        "encoder": {"path": str(checkpoint), "sha256": sha256_file(checkpoint)},
        "source": {"path": str(manifest_path), "sha256": sha256_file(manifest_path),
                   "split": manifest["split"], "count": n},
        "chunk_rows": chunk, "unit_rows": unit, "units": units, "compression": codec,
        "batch_size": int(lcfg.get("batch_size", 64)),
        "parts_layout": {"parts": parts, "regions": plan_regions(manifest, unit, parts)},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "complete": False, "mean_norm": None,
    }
    with writing(out, "encode-init", _own_store, force=force, inputs=[shards, checkpoint]):
        tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            _create_arrays(tmp, attrs, flip, n, T, C, chunk, unit, units, compressors(codec))
            replace_dir(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("%s: %d images -> %d units of %d rows (chunks of %d), %d parts, %s, flip=%s",
             out, n, units, unit, chunk, parts, codec, flip)
    return out


def _open_group(path: str | Path, mode: str, missing_hint: str) -> tuple[zarr.Group, dict]:
    """The store's group and attributes; CacheError if there is no store or not ours."""
    path = Path(path)
    if not (path / "zarr.json").is_file():
        raise CacheError(f"{path}: no latent cache here ({missing_hint})")
    try:
        group = zarr.open_group(path, mode=mode)
        attrs = group.attrs.asdict()
    except (ValueError, TypeError, KeyError, zarr.errors.BaseZarrError) as e:
        raise CacheError(f"{path}: unreadable zarr store ({type(e).__name__}: "
                         f"{str(e)[:200]})") from None
    if attrs.get("format") != FORMAT:
        raise CacheError(f"{path}: not a {FORMAT} store (format {attrs.get('format')!r:.60})")
    return group, attrs


def _open_for_write(cache: str | Path) -> tuple[zarr.Group, dict]:
    return _open_group(cache, "r+", "run `dinosae encode-init` first")


def encode_part(cfg: dict, cache: str | Path, shards: str | Path, checkpoint: str | Path,
                index: int, parts: int, done: str | Path) -> dict:
    """Encode region `index` of `parts`, skipping units already written; write `done` (a JSON
    summary) at the end. Config sections: device, latents (batch_size)."""
    from dinosae.data.shard import MANIFEST, read_manifest

    group, attrs = _open_for_write(cache)
    check_attrs(cache, group, attrs)
    if not 0 <= index < parts:
        raise ValueError(f"encode-part: index {index} is not in 0..{parts - 1}")
    manifest = read_manifest(shards)
    if sha256_file(Path(shards) / MANIFEST) != attrs["source"]["sha256"]:
        raise CacheError(f"{cache}: {Path(shards) / MANIFEST} differs from the manifest the cache "
                         f"was created for ({attrs['source']['path']}); rerun encode-init")
    if sha256_file(checkpoint) != attrs["encoder"]["sha256"]:
        raise CacheError(f"{cache}: encoder {checkpoint} is not the checkpoint the cache was "
                         f"created for ({attrs['encoder']['path']}); rerun encode-init")
    unit, flip, size = attrs["unit_rows"], attrs["flip"], attrs["image_size"]
    region = plan_regions(manifest, unit, parts)[index]
    u0, u1 = region["units"]
    written = group["written"][u0:u1]
    todo = [u for u in range(u0, u1) if not written[u - u0]]
    n_todo = sum(min((u + 1) * unit, attrs["count"]) - u * unit for u in todo)
    log.info("%s: %d of %d units to encode (%d images)", describe_region(region, parts),
             len(todo), u1 - u0, n_todo)

    t0 = time.time()
    if todo:
        device = pick_device(cfg.get("device", "auto"))
        torch.backends.cudnn.benchmark = False  # same kernels every run: values reproducible
        torch.backends.cudnn.deterministic = True
        model = _load_encoder(checkpoint, device)
        t0 = time.time()  # the rate below is decoding + encoding + writing
        batch_size = int(cfg.get("latents", {}).get("batch_size", attrs["batch_size"]))
        arrays = {name: group[name] for name in group.array_keys()}
        progress = Progress(n_todo, desc=f"encode part {index}", unit="img")
        workers = max(1, int(cfg.get("data", {}).get("workers", 1)))  # JPEG decoding threads
        units = _background(iter_units(shards, manifest, todo, unit, workers))
        write_units(model, units, arrays, device, batch_size, flip, size, unit, progress, index)
        progress.close()
    seconds = time.time() - t0
    summary = {"part": index, "parts": parts, "units": [u0, u1], "rows": region["rows"],
               "encoded_units": len(todo), "encoded_images": n_todo, "seconds": round(seconds, 3),
               "images_per_s": round(n_todo / seconds, 2) if n_todo and seconds > 0 else None}
    atomic_write_text(done, json.dumps(summary, indent=1) + "\n")
    return summary


def write_units(model: Any, units: Iterable[tuple[int, np.ndarray, np.ndarray]],
                arrays: dict, device: torch.device, batch_size: int, flip: bool, size: int,
                unit_rows: int, progress: Progress | None = None, part: int = 0) -> None:
    """Encode each (unit, images, labels) and write it, one unit's write in flight while the
    next is encoded. Leaving (also on an error) waits for that write, so a unit is either fully
    written and marked, or not marked."""
    written = 0

    def wait(job: Any) -> None:
        nonlocal written
        job.result()
        written += 1
        fault_point(f"encode-part{part}", written)

    with ThreadPoolExecutor(1) as writer:
        pending = None
        for u, images, labels in units:
            if images.shape[1:] != (size, size, 3):
                raise ValueError(f"unit {u}: images of shape {images.shape[1:]}, the cache "
                                 f"expects {size}x{size}x3")
            data = {"labels": labels}
            data["tokens"], data["norms"] = encode_images(model, images, device, batch_size)
            if flip:
                data["tokens_flip"], data["norms_flip"] = encode_images(
                    model, images, device, batch_size, flip=True)
            if pending is not None:
                wait(pending)
            pending = writer.submit(_write_unit, arrays, u, unit_rows, data)
            if progress is not None:
                progress.update(len(labels))
        if pending is not None:
            wait(pending)


def _write_unit(arrays: dict, u: int, unit_rows: int, data: dict) -> None:
    """Write unit u (one whole zarr shard per array), then mark it written."""
    a = u * unit_rows
    for name, values in data.items():
        arrays[name][a:a + len(values)] = values
    arrays["written"][u] = 1


def validate_cache(group: zarr.Group, attrs: dict, where: str = "") -> dict:
    """Check every unit; returns summary statistics or raises CacheError naming the first bad
    region: every unit written, shapes = manifest count, labels in range, every stored token
    norm within NORM_TOL of 1, no NaN/Inf in tokens or norms."""
    check_attrs(where, group, attrs)
    n, unit, units, T, C = (attrs[k] for k in ("count", "unit_rows", "units", "tokens",
                                                  "channels"))
    layout, k = attrs["parts_layout"], attrs["num_classes"]
    parts = layout["parts"]
    names = ["tokens", "tokens_flip"] if attrs["flip"] else ["tokens"]
    if n != attrs["source"]["count"]:
        raise CacheError(f"{where}: count {n} differs from the manifest's "
                         f"{attrs['source']['count']}")
    for name, shape in [(t, (n, T, C)) for t in names] + [
            (t.replace("tokens", "norms"), (n, T)) for t in names] + [
            ("labels", (n,)), ("written", (units,))]:
        if name not in group or tuple(group[name].shape) != shape:
            got = tuple(group[name].shape) if name in group else "missing"
            raise CacheError(f"{where}: array {name} is {got}, expected {shape} (manifest count)")
    source = Path(attrs["source"]["path"])
    if source.is_file() and sha256_file(source) != attrs["source"]["sha256"]:
        raise CacheError(f"{where}: the shard manifest {source} changed since the cache was "
                         "created; rerun encode-init")
    if units != _ceil_div(n, unit) or layout["regions"][-1]["units"][1] != units:
        raise CacheError(f"{where}: the region layout does not cover {units} units")

    written = group["written"][:]
    missing = np.flatnonzero(written == 0)
    if len(missing):
        r = _region_of_unit(int(missing[0]), layout)
        todo = [int(u) for u in missing if r["units"][0] <= u < r["units"][1]]
        raise CacheError(f"{where}: {describe_region(r, parts)} is not written: {len(todo)} of "
                         f"{r['units'][1] - r['units'][0]} units missing (first: unit {todo[0]})")

    def read(u: int) -> tuple[int, dict]:
        a, b = u * unit, min((u + 1) * unit, n)
        return u, {name: group[name][a:b] for name in
                   names + [t.replace("tokens", "norms") for t in names] + ["labels"]}

    stats = {"norm_sum": 0.0, "norm_min": np.inf, "norm_max": -np.inf, "unit_norm_error": 0.0}
    for u, data in _background(read(u) for u in range(units)):
        a = u * unit
        bad = _check_unit(data, names, k, a)
        if bad:
            raise CacheError(f"{where}: {describe_region(_region_of_unit(u, layout), parts)}: "
                             f"{bad}")
        for name in names:
            err = np.abs(np.linalg.norm(data[name].astype(np.float32), axis=-1) - 1.0).max()
            stats["unit_norm_error"] = max(stats["unit_norm_error"], float(err))
        raw = data["norms"].astype(np.float64)
        stats["norm_sum"] += float(raw.sum())
        stats["norm_min"] = min(stats["norm_min"], float(raw.min()))
        stats["norm_max"] = max(stats["norm_max"], float(raw.max()))
    return {"count": n, "rows": attrs["rows"], "units": units,
            "mean_norm": stats["norm_sum"] / (n * T), "min_norm": stats["norm_min"],
            "max_norm": stats["norm_max"], "max_unit_norm_error": stats["unit_norm_error"]}


def _check_unit(data: dict, names: list[str], num_classes: int, first_row: int) -> str | None:
    """The first problem in one unit's arrays, or None."""
    labels = data["labels"]
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if len(bad):
        return (f"label {labels[bad[0]]} at row {first_row + bad[0]} is outside "
                f"0..{num_classes - 1}")
    for name in names:
        t = data[name].astype(np.float32)
        finite = np.isfinite(t).all(axis=(1, 2))
        if not finite.all():
            return f"{name} row {first_row + np.flatnonzero(~finite)[0]} has NaN/Inf"
        err = np.abs(np.linalg.norm(t, axis=-1) - 1.0).max(axis=1)
        bad = np.flatnonzero(err > NORM_TOL)
        if len(bad):
            return (f"{name} row {first_row + bad[0]}: a token norm is off 1 by "
                    f"{err[bad[0]]:.3g} (> {NORM_TOL})")
        norms = data[name.replace("tokens", "norms")]
        ok = np.isfinite(norms).all(axis=1) & (norms > 0).all(axis=1)
        if not ok.all():
            row = first_row + np.flatnonzero(~ok)[0]
            return f"{name.replace('tokens', 'norms')} row {row} is not finite and positive"
    return None


def _update_attrs(group: zarr.Group, cache: str | Path, values: dict) -> None:
    """Update group attributes, keeping the store folder's mtime: Snakemake dates a directory
    output by it, and the encode-part jobs (which take the store as input) must not look
    outdated because the gather step rewrote zarr.json."""
    st = os.stat(cache)
    group.attrs.update(values)
    os.utime(cache, ns=(st.st_atime_ns, st.st_mtime_ns))


def encode_gather(cfg: dict, cache: str | Path, out: str | Path) -> dict:
    """Validate every region; only then set `complete: true` and `mean_norm`; write a JSON report
    to `out`. A failure raises CacheError naming the first bad region and leaves complete
    false. Config: none needed."""
    with output_lock(cache, "encode-gather"):  # one writer of the attributes at a time
        group, attrs = _open_for_write(cache)
        t0 = time.time()
        try:
            report = validate_cache(group, attrs, where=f"latent cache {cache}")
        except Exception:
            _update_attrs(group, cache, {"complete": False})
            raise
        _update_attrs(group, cache, {"complete": True, "mean_norm": report["mean_norm"]})
    report = {"cache": str(cache), "complete": True, **report,
              "encoder": attrs["encoder"], "source": attrs["source"],
              "seconds": round(time.time() - t0, 3)}
    atomic_write_text(out, json.dumps(report, indent=1) + "\n")
    log.info("%s: complete: %d images, mean raw token norm %.4g", cache, report["count"],
             report["mean_norm"])
    return report


# ---------------------------------------------------------------- reading

def open_cache(path: str | Path, expect_encoder_sha: str | None = None) -> LatentCache:
    """Open a complete cache for reading; CacheError if it is incomplete, not a cache, or was
    encoded by another encoder than `expect_encoder_sha`."""
    path = Path(path)
    group, attrs = _open_group(path, "r", "run the `encode` rule")
    if attrs.get("version") != VERSION:
        raise CacheError(f"{path}: cache version {attrs.get('version')}, this reader reads "
                         f"{VERSION}")
    if attrs.get("complete") is not True:
        raise CacheError(f"{path}: the latent cache is incomplete (attribute complete is not "
                         "true): a region was never written or failed validation; run "
                         "`dinosae encode-gather` (Snakemake rule `encode`)")
    check_attrs(path, group, attrs, reading=True)
    have = attrs["encoder"]["sha256"]
    if expect_encoder_sha is not None and have != expect_encoder_sha:
        raise CacheError(f"{path}: encoded with {attrs['encoder']['path']} (sha256 {have[:16]}…), "
                         f"not the expected encoder (sha256 {expect_encoder_sha[:16]}…): the "
                         "cache is stale; re-encode it")
    return LatentCache(path, group, attrs)


def _posint(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _posnum(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and value > 0)


def check_attrs(path: str | Path, group: zarr.Group, attrs: dict, reading: bool = False) -> None:
    """Compare every attribute the code relies on with the arrays (attributes are untrusted):
    types, count and grid/tokens/channels against the array shapes, flip against the flipped
    arrays, rows, units, the region layout; with `reading` (a complete cache) also labels
    against num_classes, radius 1 and mean_norm against the stored norms. CacheError naming the
    attribute that lies."""

    def lie(key: str, why: str) -> CacheError:
        return CacheError(f"{path}: attribute '{key}' {why} (the attributes must describe the "
                          "arrays; re-encode the cache)")

    def posint(key: str) -> int:
        if not _posint(attrs.get(key)):
            raise lie(key, f"is {attrs.get(key)!r:.40}, not a positive integer")
        return attrs[key]

    n, T, C, K = posint("count"), posint("tokens"), posint("channels"), posint("num_classes")
    unit, units = posint("unit_rows"), posint("units")
    for key in ("chunk_rows", "image_size", "batch_size"):
        posint(key)
    grid, flip = attrs.get("grid"), attrs.get("flip")
    if not (isinstance(grid, list) and len(grid) == 2 and all(map(_posint, grid))):
        raise lie("grid", f"is {grid!r:.40}, not [height, width]")
    if grid[0] * grid[1] != T:
        raise lie("grid", f"{grid} gives {grid[0] * grid[1]} tokens, attribute 'tokens' {T}")
    size = attrs["image_size"]
    if grid != [size // 16, size // 16]:  # the encoder's 16x stem: one token per 16x16 pixels
        raise lie("grid", f"is {grid}, but {size} px images give "
                          f"{[size // 16, size // 16]} tokens")
    if not isinstance(flip, bool):
        raise lie("flip", f"is {flip!r:.40}, not true or false")
    if attrs.get("rows") != n * (2 if flip else 1):
        raise lie("rows", f"is {attrs.get('rows')!r:.40}, not count x {2 if flip else 1}")
    if units != _ceil_div(n, unit):
        raise lie("units", f"is {units}, but {n} rows in units of {unit} make {_ceil_div(n, unit)}")
    classes = attrs.get("classes")
    if classes is not None and (not isinstance(classes, list) or len(classes) != K):
        raise lie("num_classes", f"is {K}, but 'classes' lists "
                                 f"{len(classes) if isinstance(classes, list) else classes!r:.40}")
    for key in ("encoder", "source"):
        if not (isinstance(attrs.get(key), dict) and isinstance(attrs[key].get("sha256"), str)):
            raise lie(key, "has no sha256")
    layout = attrs.get("parts_layout")
    try:  # regions cover units 0..units-1 in order, without gaps
        bounds = [0] + [b for r in layout["regions"] for b in r["units"]] + [units]
        ok = (_posint(layout["parts"]) and len(layout["regions"]) == layout["parts"]
              and all(isinstance(b, int) for b in bounds)
              and all(bounds[i] == bounds[i + 1] for i in range(0, len(bounds), 2))
              and bounds == sorted(bounds))
    except (KeyError, TypeError, IndexError):
        ok = False
    if not ok:
        raise lie("parts_layout", f"does not split {units} units into regions")
    arrays = {k: group[k] for k in ARRAYS if k in group}
    if not all(isinstance(a, zarr.Array) for a in arrays.values()):
        raise CacheError(f"{path}: {sorted(arrays)} must all be arrays")
    names = ["tokens", "norms", "labels", "written"] + (["tokens_flip", "norms_flip"] if flip
                                                        else [])
    for name in names:
        if name not in arrays:
            raise lie("flip" if name.endswith("_flip") else "format",
                      f"promises array {name!r}, which the store lacks")
    if not flip and ("tokens_flip" in arrays or "norms_flip" in arrays):
        raise lie("flip", "is false, but the store holds flipped tokens")
    for name in names:
        shape = tuple(arrays[name].shape)
        if name == "written":
            if shape != (units,):
                raise lie("units", f"is {units}, but array written has {shape}")
            continue
        if shape[0] != n:
            raise lie("count", f"is {n}, but array {name} has {shape[0]} rows")
        if name.startswith(("tokens", "norms")) and (len(shape) < 2 or shape[1] != T):
            raise lie("grid", f"{grid} gives {T} tokens a row, but array {name} is {shape}")
        if name.startswith("tokens") and shape[2:] != (C,):
            raise lie("channels", f"is {C}, but array {name} is {shape}")
    if not reading:
        return
    if attrs.get("radius") != 1.0:
        raise lie("radius", f"is {attrs.get('radius')!r:.40}; the cache stores unit-norm "
                            "tokens (radius 1.0)")
    labels = arrays["labels"][:]
    if len(labels) and (labels.min() < 0 or labels.max() >= K):
        raise lie("num_classes", f"is {K}, but the labels run from {labels.min()} to "
                                 f"{labels.max()}")
    _check_mean_norm(path, arrays["norms"], attrs.get("mean_norm"), lie)


def _check_mean_norm(path: str | Path, norms: zarr.Array, mean_norm: Any, lie: Any) -> None:
    """mean_norm is the mean of the stored raw norms: recomputed exactly for a cache of up to
    MEAN_NORM_EXACT_VALUES values, else compared with the first unit's (within a factor of 2)."""
    if not _posnum(mean_norm):
        raise lie("mean_norm", f"is {mean_norm!r:.40}, not a finite positive number")
    n, T = norms.shape
    if n * T <= MEAN_NORM_EXACT_VALUES:
        want = float(np.asarray(norms[:], dtype=np.float64).sum() / (n * T))
        if not math.isclose(mean_norm, want, rel_tol=1e-6):
            raise lie("mean_norm", f"is {mean_norm:.6g}, but the stored norms average "
                                   f"{want:.6g}")
        return
    sample = float(np.asarray(norms[:norms.chunks[0]], dtype=np.float64).mean())
    if not 0.5 < mean_norm / sample < 2.0:
        raise lie("mean_norm", f"is {mean_norm:.6g}, far from the stored norms' {sample:.6g}")


class LatentCache:
    """A complete latent cache. Row r < N is image r; with flip, row N + i is image i flipped.

    `cache[r]` -> (tokens float32 (T, C) as stored, label); `batches(...)` is the fast path.
    """

    def __init__(self, path: Path, group: zarr.Group, attrs: dict) -> None:
        self.path, self.group, self.attrs = path, group, attrs
        self.tokens = group["tokens"]
        self.labels = group["labels"][:]
        self.count, self.chunk_rows = int(attrs["count"]), int(attrs["chunk_rows"])
        self.unit_rows = int(attrs["unit_rows"])
        self._arrays = [group["tokens"]] + ([group["tokens_flip"]] if attrs["flip"] else [])
        self._chunk: tuple[tuple[int, int], np.ndarray] | None = None

    def __len__(self) -> int:
        return self.count * len(self._arrays)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"row {i} out of range for a cache of {len(self)} rows")
        a, r = divmod(i, self.count)
        key = (a, r // self.chunk_rows)  # keep the last chunk: sequential access reads it once
        if self._chunk is None or self._chunk[0] != key:
            start = key[1] * self.chunk_rows
            self._chunk = (key, self._arrays[a][start:start + self.chunk_rows])
        row = self._chunk[1][r - key[1] * self.chunk_rows]
        return torch.from_numpy(row.astype(np.float32)), int(self.labels[r])

    def order(self, *, shuffle: bool = True, seed: int = 0, epoch: int = 0, rank: int = 0,
              world_size: int = 1) -> np.ndarray:
        """The rows this rank reads in one epoch, in reading order. Shuffled: whole units (zarr
        shards, the cheap thing to read) in a random order that is the same on every rank for a
        given (seed, epoch); each rank takes its own contiguous slice of it. With world_size > 1
        every rank gets len // world_size rows, so all ranks take the same number of steps."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        total, s = len(self), self.unit_rows
        if shuffle:
            starts = np.concatenate([a * self.count + np.arange(0, self.count, s)
                                     for a in range(len(self._arrays))])
            stops = np.minimum(starts + s, (starts // self.count + 1) * self.count)
            perm = np.random.default_rng([seed, epoch]).permutation(len(starts))
            rows = starts[perm][:, None] + np.arange(s)[None, :]
            rows = rows[rows < stops[perm][:, None]]
        else:
            rows = np.arange(total)
        if world_size == 1:
            return rows
        per = total // world_size
        return rows[rank * per:(rank + 1) * per]

    def read_rows(self, rows: np.ndarray, out: np.ndarray | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
        """Stored tokens float16 (n, T, C) and labels (n,) of the given rows, in that order; the
        tokens go into `out` when given. Rows are read in sorted order: a run of consecutive rows
        that keeps its order in `out` is one zarr call straight into place; any other run is
        read unit (zarr shard) by unit into one reused buffer, each row then copied to its place.
        What a memmap would not pay is zarr's own work per shard: a file read, a copy of each
        inner chunk into a shard buffer, and one of that into ours (bench/latents.py)."""
        rows = np.asarray(rows)
        if out is None:
            out = np.empty((len(rows), *self.tokens.shape[1:]), dtype=np.float16)
        sort = np.argsort(rows, kind="stable")
        srt = rows[sort]
        buf = None
        for lo, hi in self._runs(srt):
            dst = sort[lo:hi]
            if (np.diff(dst) == 1).all():  # in order in `out`, e.g. not shuffled
                self._read(int(srt[lo]), out[dst[0]:dst[0] + hi - lo])
                continue
            if buf is None:
                buf = np.empty((self.unit_rows, *out.shape[1:]), dtype=np.float16)
            starts = lo + np.flatnonzero(srt[lo:hi] % self.count % self.unit_rows == 0)
            for a, b in pairwise([lo, *starts[starts > lo].tolist(), hi]):  # unit by unit
                self._read(int(srt[a]), buf[:b - a])
                out[sort[a:b]] = buf[:b - a]
        return out, self.labels[rows % self.count]

    def _runs(self, srt: np.ndarray) -> list[tuple[int, int]]:
        """Sorted rows -> [lo, hi) index ranges of consecutive rows of one array."""
        if not len(srt):
            return []
        breaks = np.flatnonzero((np.diff(srt) != 1) | (srt[1:] % self.count == 0)) + 1
        return list(zip(np.r_[0, breaks].tolist(), np.r_[breaks, len(srt)].tolist(),
                        strict=True))

    def _read(self, row: int, into: np.ndarray) -> None:
        """Rows row..row+len(into)-1 (of one array) into `into`, one zarr call."""
        a, first = divmod(row, self.count)
        self._arrays[a].get_basic_selection(
            slice(first, first + len(into)),
            out=default_buffer_prototype().nd_buffer.from_numpy_array(into))

    def batches(self, batch_size: int, *, shuffle: bool = True, seed: int = 0, epoch: int = 0,
                rank: int = 0, world_size: int = 1, radius: float = 1.0, drop_last: bool = True,
                window: int | None = None, raw: bool = False
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(tokens float32 (B, T, C) on the sphere of `radius`, labels int64 (B,)) for one epoch.
        `raw`: the tokens as stored instead (float16, unit norm up to fp16 rounding; in pinned
        memory when CUDA is available), for a training loop that moves them to its device as
        they are and projects them to its radius there (`radius` is then unused).

        Reads `window` rows at a time in a background thread (default: 8 batches, at least 8
        units); shuffled, the rows of a window (whole units picked at random) are shuffled among
        themselves, so a batch mixes rows from many units (rows within a unit are neighbours in
        manifest order, mostly one class). A larger window mixes more and holds more memory."""
        rows = self.order(shuffle=shuffle, seed=seed, epoch=epoch, rank=rank,
                          world_size=world_size)
        if drop_last:
            rows = rows[:len(rows) // batch_size * batch_size]
        window = _ceil_div(window or max(8 * batch_size, 8 * self.unit_rows), batch_size)
        window *= batch_size  # whole batches per window
        rng = np.random.default_rng([seed, epoch, rank, 1])
        pin = raw and torch.cuda.is_available()

        def windows() -> Iterator[tuple[torch.Tensor, np.ndarray]]:
            for w in range(0, len(rows), window):
                r = rows[w:w + window]
                r = rng.permutation(r) if shuffle else r
                shape = (len(r), *self.tokens.shape[1:])
                # pinned: read straight into page-locked memory; the batches are views of it
                z = (torch.empty(shape, dtype=torch.float16, pin_memory=True) if pin
                     else torch.from_numpy(np.empty(shape, dtype=np.float16)))
                yield z, self.read_rows(r, out=z.numpy())[1]

        for tokens, labels in _background(windows()):
            for i in range(0, len(labels), batch_size):
                z, y = tokens[i:i + batch_size], torch.from_numpy(labels[i:i + batch_size])
                if raw:
                    yield z, y
                    continue
                z = z.float()
                z.mul_(radius / z.norm(dim=-1, keepdim=True))  # exact radius after fp16
                yield z, y


# ---------------------------------------------------------------- export

def _h5_attr(value: Any) -> Any:
    """Attribute value HDF5 can hold: scalars and flat lists as they are, the rest as JSON."""
    if isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, list) and value and all(isinstance(v, (int, float)) and
                                                 not isinstance(v, bool) for v in value):
        return np.asarray(value)
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return value
    return json.dumps(value)


def export_hdf5(cfg: dict, cache: str | Path, out: str | Path) -> Path:
    """Write a complete cache's arrays (tokens, labels, norms, and the flipped ones) and
    attributes to one HDF5 file; `attrs_json` holds all attributes exactly. Config: none."""
    import h5py

    lc, out = open_cache(cache), Path(out)
    group, unit = lc.group, lc.attrs["unit_rows"]
    names = [k for k in ("tokens", "labels", "norms", "tokens_flip", "norms_flip") if k in group]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    with h5py.File(tmp, "w") as f:
        for name in names:
            src = group[name]
            chunks = (min(lc.chunk_rows if name.startswith("tokens") else unit, lc.count),
                      *src.shape[1:])
            dst = f.create_dataset(name, shape=src.shape, dtype=src.dtype, chunks=chunks)
            for a in range(0, lc.count, unit):
                dst[a:a + unit] = src[a:a + unit]
        for key, value in lc.attrs.items():
            if value is not None:
                f.attrs[key] = _h5_attr(value)
        f.attrs["attrs_json"] = json.dumps(lc.attrs)
    os.replace(tmp, out)
    log.info("exported %s -> %s", cache, out)
    return out
