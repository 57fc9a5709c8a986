"""The latent cache's store format: its arrays, attributes, chunking and region layout; creating
the arrays and opening a store. The one place that spells the format (checks.py checks it).

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

import json
import os
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from dinosae.errors import CacheError
from dinosae.outputs import names_only

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


def compressors(name: str, checksum: bool = False) -> tuple:
    """Codec chain for cfg latents.compression (see bench/latents.py for the measurements);
    `checksum`: a crc32c of every chunk after it, which zarr checks on every read."""
    crc = (Crc32cCodec(),) if checksum else ()
    if name == "none":
        return crc
    if name == "zstd":
        return (ZstdCodec(level=3), *crc)
    if name == "blosc":
        return (BloscCodec(cname="zstd", clevel=3, shuffle="shuffle"), *crc)
    raise ValueError(f"latents.compression: unknown codec {name!r} (none | zstd | blosc)")


def chunking(lcfg: dict, row_bytes: int) -> tuple[int, int]:
    """(chunk_rows, unit_rows): chunk_rows null -> about CHUNK_BYTES per chunk."""
    chunk = lcfg.get("chunk_rows") or max(1, CHUNK_BYTES // row_bytes)
    return chunk, chunk * lcfg.get("shard_chunks", SHARD_CHUNKS)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def check_manifest(m: dict, where: str) -> None:
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
        u0, u1 = ceil_div(first, unit_rows), ceil_div(end, unit_rows)
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


def region_of_unit(u: int, layout: dict) -> dict:
    return next(r for r in layout["regions"] if r["units"][0] <= u < r["units"][1])

def own_store(store: Path) -> str | None:
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


own_store.accepts = STORE_NAMES.accepts  # type: ignore[attr-defined]


def create_arrays(path: Path, attrs: dict, flip: bool, n: int, T: int, C: int, chunk: int,
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

def open_group(path: str | Path, mode: str, missing_hint: str) -> tuple[zarr.Group, dict]:
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


def open_for_write(cache: str | Path) -> tuple[zarr.Group, dict]:
    return open_group(cache, "r+", "run `dinosae encode-init` first")

def update_attrs(group: zarr.Group, cache: str | Path, values: dict) -> None:
    """Update group attributes, keeping the store folder's mtime: Snakemake dates a directory
    output by it, and the encode-part jobs (which take the store as input) must not look
    outdated because the gather step rewrote zarr.json."""
    st = os.stat(cache)
    group.attrs.update(values)
    os.utime(cache, ns=(st.st_atime_ns, st.st_mtime_ns))
