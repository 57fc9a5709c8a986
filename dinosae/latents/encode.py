"""Encoding the cache (scatter/gather): encode_init creates the arrays, encode_part fills one
shard-aligned region (resumable unit by unit), encode_gather validates every unit and only then
marks the cache complete. Images come from the shard tars in manifest order (iter_units)."""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import shutil
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from dinosae.checkpoint import tensors_fingerprint
from dinosae.dist import pick_device
from dinosae.errors import CacheError
from dinosae.faults import fault_point
from dinosae.files import atomic_write_text, sha256_file
from dinosae.latents.background import background
from dinosae.latents.checks import check_attrs, validate_cache
from dinosae.latents.shared import claim_or_wait, heartbeat, identity, link, publish
from dinosae.latents.store import (
    DESCRIPTION,
    DTYPES,
    FORMAT,
    VERSION,
    ZARR_DTYPES,
    ceil_div,
    check_manifest,
    chunking,
    compressors,
    create_arrays,
    describe_region,
    open_for_write,
    open_group,
    own_store,
    plan_regions,
    quantize,
    store_dtype,
    update_attrs,
)
from dinosae.outputs import claim_file, json_ours, output_lock, replace_dir, writing
from dinosae.progress import Progress

log = logging.getLogger(__name__)
REPORT_OURS = json_ours("cache", "identity", "complete", "count")  # encode-gather's report


# ---------------------------------------------------------------- encoder and images

def load_encoder(checkpoint: str | Path, device: str | torch.device) -> Any:
    """The stage checkpoint's EMA autoencoder (eval mode): `.grid`, `.channels`, `.encode(x)`."""
    from dinosae.models.autoencoder import DinoSAE

    return DinoSAE.load(checkpoint, device=device)


@torch.no_grad()
def encode_images(model: Any, images: np.ndarray, device: torch.device, batch_size: int,
                  flip: bool = False, dtype: Literal["float16"] | None = "float16"
                  ) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (n, H, W, 3) -> (unit-norm tokens float16 (n, T, C), raw norms float32 (n, T)).
    Normalised in fp32, then cast (`dtype` None: the float32 tokens, for store.quantize)."""
    tokens, norms = [], []
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(images[i:i + batch_size]).to(device)
        x = x.permute(0, 3, 1, 2).float().div_(255.0)  # (B, 3, H, W) in [0, 1]
        if flip:
            x = x.flip(-1)
        z, n = model.encode_unit(x)  # (B, T, C) unit tokens, (B, T) raw norms
        tokens.append((z.half() if dtype == "float16" else z).cpu().numpy())
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

def encode_init(cfg: dict, shards: str | Path, checkpoint: str | Path, out: str | Path,
                force: bool = False) -> Path:
    """Create the cache's arrays (all unwritten) and attributes. Config section: latents.
    The store is built beside `out` and renamed into place, holding the lock on `out`; an
    existing `out` that is not a dinosae cache is refused (`force`: replaced)."""
    from dinosae.data.shard import MANIFEST, check_image_size, read_manifest

    lcfg, out = cfg.get("latents", {}), Path(out)
    manifest = read_manifest(shards)
    manifest_path = Path(shards) / MANIFEST
    check_manifest(manifest, str(manifest_path))
    size = int(manifest["preprocess"]["image_size"])
    model = load_encoder(checkpoint, "cpu")
    grid = [int(g) for g in model.grid]
    check_image_size(manifest, shards, 16 * grid[0], f"the autoencoder {checkpoint}")
    with torch.no_grad():  # the token shape this encoder gives at this image size
        _, T, C = model.encode(torch.zeros(1, 3, size, size)).shape
    if grid[0] * grid[1] != T or int(model.channels) != C:
        raise CacheError(f"{checkpoint}: the encoder gives {T}x{C} tokens at {size} px, but "
                         f"declares grid {grid} and {model.channels} channels")
    n, flip = int(manifest["count"]), bool(lcfg.get("flip", False))
    dtype = lcfg.get("dtype") or "float16"
    if dtype not in DTYPES:
        raise CacheError(f"latents.dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    chunk, unit = chunking(lcfg, T * C * np.dtype(ZARR_DTYPES[dtype]).itemsize)
    units = ceil_div(n, unit)
    parts = int(lcfg.get("parts", 1))
    codec = lcfg.get("compression", "zstd")
    tensors, manifest_sha = tensors_fingerprint(model), sha256_file(manifest_path)
    attrs = {
        "format": FORMAT, "version": VERSION, "description": DESCRIPTION,
        "identity": identity(tensors, manifest_sha, lcfg),
        "count": n, "rows": n * (2 if flip else 1), "grid": grid, "tokens": int(T),
        "channels": int(C), "radius": 1.0, "image_size": size, "flip": flip, "dtype": dtype,
        "num_classes": len(manifest["classes"]), "classes": list(manifest["classes"]),
        "encoder": {"path": str(checkpoint), "sha256": sha256_file(checkpoint),
                    "tensors": tensors},
        "source": {"path": str(manifest_path), "sha256": manifest_sha,
                   "split": manifest["split"], "count": n},
        "chunk_rows": chunk, "unit_rows": unit, "units": units, "compression": codec,
        "batch_size": int(lcfg.get("batch_size", 64)),
        "parts_layout": {"parts": parts, "regions": plan_regions(manifest, unit, parts)},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "complete": False, "mean_norm": None,
    }
    root = lcfg.get("root")
    if root and (found := claim_or_wait(root, attrs["identity"], out)) is not None:
        with writing(out, "encode-init", own_store, force=force, inputs=[shards, checkpoint]):
            link(out, found)  # another experiment built it meanwhile: nothing to encode here
        log.info("%s: built by another experiment meanwhile: %s (read-only)", out, found)
        return out
    with writing(out, "encode-init", own_store, force=force, inputs=[shards, checkpoint]):
        tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            create_arrays(tmp, attrs, flip, n, T, C, chunk, unit, units,
                          compressors(codec, checksum=True), dtype)
            replace_dir(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("%s: %d images -> %d units of %d rows (chunks of %d), %d parts, %s, %s, flip=%s",
             out, n, units, unit, chunk, parts, dtype, codec, flip)
    return out


def encode_part(cfg: dict, cache: str | Path, shards: str | Path, checkpoint: str | Path,
                index: int, parts: int, done: str | Path) -> dict:
    """Encode region `index` of `parts`, skipping units already written; write `done` (a JSON
    summary) at the end. Config sections: device, latents (batch_size)."""
    from dinosae.data.shard import MANIFEST, read_manifest

    if not 0 <= index < parts:
        raise ValueError(f"encode-part: index {index} is not in 0..{parts - 1}")
    if Path(cache).is_symlink() and open_group(cache, "r", "run `dinosae encode-init` first"
                                               )[1].get("complete") is True:
        # a shared cache another experiment built (encode_init waited for it): read-only
        summary = {"part": index, "parts": parts, "shared": str(Path(cache).resolve()),
                   "encoded_units": 0, "encoded_images": 0}
        atomic_write_text(done, json.dumps(summary, indent=1) + "\n")
        return summary
    group, attrs = open_for_write(cache)
    check_attrs(cache, group, attrs)
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
        model = load_encoder(checkpoint, device)
        t0 = time.time()  # the rate below is decoding + encoding + writing
        batch_size = int(cfg.get("latents", {}).get("batch_size", attrs["batch_size"]))
        arrays = {name: group[name] for name in group.array_keys()}
        progress = Progress(n_todo, desc=f"encode part {index}", unit="img")
        workers = max(1, int(cfg.get("data", {}).get("workers", 1)))  # JPEG decoding threads
        units = background(iter_units(shards, manifest, todo, unit, workers))
        beat = heartbeat((cfg.get("latents") or {}).get("root"), attrs.get("identity"), cache)
        write_units(model, units, arrays, device, batch_size, flip, size, unit, progress, index,
                    dtype=store_dtype(attrs), on_unit=beat)
        progress.close()
    seconds = time.time() - t0
    summary = {"part": index, "parts": parts, "units": [u0, u1], "rows": region["rows"],
               "encoded_units": len(todo), "encoded_images": n_todo, "seconds": round(seconds, 3),
               "images_per_s": round(n_todo / seconds, 2) if n_todo and seconds > 0 else None}
    atomic_write_text(done, json.dumps(summary, indent=1) + "\n")
    return summary


def write_units(model: Any, units: Iterable[tuple[int, np.ndarray, np.ndarray]],
                arrays: dict, device: torch.device, batch_size: int, flip: bool, size: int,
                unit_rows: int, progress: Progress | None = None, part: int = 0,
                dtype: str = "float16", on_unit: Callable[[], None] | None = None) -> None:
    """Encode each (unit, images, labels), store it as `dtype` (store.quantize) and write it,
    one unit's write in flight while the next is encoded. Leaving (also on an error) waits for
    that write, so a unit is either fully written and marked, or not marked."""
    written = 0

    def wait(job: Any) -> None:
        nonlocal written
        job.result()
        written += 1
        if on_unit is not None:
            on_unit()
        fault_point(f"encode-part{part}", written)

    with ThreadPoolExecutor(1) as writer:
        pending = None
        for u, images, labels in units:
            if images.shape[1:] != (size, size, 3):
                raise ValueError(f"unit {u}: images of shape {images.shape[1:]}, the cache "
                                 f"expects {size}x{size}x3")
            data = {"labels": labels}
            for suffix in ("", "_flip") if flip else ("",):
                z, data[f"norms{suffix}"] = encode_images(
                    model, images, device, batch_size, flip=bool(suffix),
                    dtype="float16" if dtype == "float16" else None)
                data[f"tokens{suffix}"], scales = quantize(z, dtype)
                if scales is not None:
                    data[f"scales{suffix}"] = scales
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

def encode_gather(cfg: dict, cache: str | Path, out: str | Path, force: bool = False) -> dict:
    """Validate every region; only then set `complete: true` and `mean_norm`; write a JSON report
    to `out` (the one-file output rule: a file there that is not such a report is refused unless
    `force`). A failure raises CacheError naming the first bad region and leaves complete
    false. Config: latents.root (optional): then the complete cache is published there by its
    identity (shared.publish) and `cache` becomes a link to it."""
    claim_file({out: REPORT_OURS}, "encode-gather", force=force, inputs=[cache])
    root = (cfg.get("latents") or {}).get("root")
    if Path(cache).is_symlink():  # a shared cache another experiment built and validated
        group, attrs = open_group(cache, "r", "run `dinosae encode-init` first")
        if attrs.get("complete") is True:
            report = {"cache": str(cache), "shared": str(Path(cache).resolve()),
                      "identity": attrs.get("identity"), "complete": True,
                      "count": attrs["count"], "rows": attrs["rows"],
                      "mean_norm": attrs["mean_norm"], "encoder": attrs["encoder"],
                      "source": attrs["source"], "seconds": 0.0}
            atomic_write_text(out, json.dumps(report, indent=1) + "\n")
            return report
    with output_lock(cache, "encode-gather"):  # one writer of the attributes at a time
        group, attrs = open_for_write(cache)
        t0 = time.time()
        try:
            report = validate_cache(group, attrs, where=f"latent cache {cache}",
                                    on_unit=heartbeat(root, attrs.get("identity"), cache))
        except Exception:
            update_attrs(group, cache, {"complete": False})
            raise
        update_attrs(group, cache, {"complete": True, "mean_norm": report["mean_norm"]})
    shared = publish(cache, root) if root else None
    report = {"cache": str(cache), "shared": str(shared) if shared else None,
              "identity": attrs.get("identity"), "complete": True, **report,
              "encoder": attrs["encoder"], "source": attrs["source"],
              "seconds": round(time.time() - t0, 3)}
    atomic_write_text(out, json.dumps(report, indent=1) + "\n")
    log.info("%s: complete: %d images, mean raw token norm %.4g", cache, report["count"],
             report["mean_norm"])
    return report
