"""The latent cache's store format: its arrays, attributes, chunking and region layout; creating
the arrays and opening a store. The one place that spells the format (checks.py checks it).

Store (`results/latents/<split>.zarr`); row i is image i of the shard manifest:

    tokens       DTYPE   [N, T, C]   unit-norm (along C) encoder tokens of image i
    scales       float16 [N, T]      int8 stores only: each token's scale (dequantize)
    labels       int64   [N]         class index of image i (attribute `classes` names them)
    norms        float32 [N, T]      the encoder's raw token norms (before normalising)
    tokens_flip  DTYPE   [N, T, C]   the same for image i flipped left-right   (only when flip)
    scales_flip  float16 [N, T]                                   (only when flip, int8 only)
    norms_flip   float32 [N, T]                                             (only when flip)
    written      uint8   [U]         bookkeeping: written[u] = 1 once unit u is written

Dtype (attribute `dtype`, cfg latents.dtype; absent in stores made before it: float16). The
stored tokens, and how `dequantize` turns them back into unit tokens (every reader goes through
it; a plain zarr reader repeats it in two lines):

    float16   tokens as float16                      z = tokens
    bfloat16  tokens as uint16: the bfloat16 bits    z = (tokens << 16) viewed as float32, / ‖·‖
    int8      tokens as int8, q = round(z / s),      z = q · s, / ‖·‖
              s = max|z| / 127 per token (float16, array `scales`)

The norm a stored token may be off 1 by (NORM_TOLS; checked by gather and `cache verify`,
before the projection to unit norm): float16 1e-3 (its rounding: 2^-11 per value), bfloat16
4e-3 (2^-8), int8 ½·s·√C + 1e-3 per token (each value is off by at most half a step s).

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
import torch
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from dinosae.errors import CacheError
from dinosae.outputs import names_only

FORMAT, VERSION = "dinosae-latents", 1
NORM_TOL = 1e-3  # |‖token‖ − 1| allowed in float16 tokens (what every reader serves)
DTYPES = ("float16", "bfloat16", "int8")
ZARR_DTYPES = {"float16": "float16", "bfloat16": "uint16", "int8": "int8"}  # tokens array
NORM_TOLS = {"float16": NORM_TOL, "bfloat16": 4e-3, "int8": NORM_TOL}  # int8: + ½·s·√C
INT8_MAX = 127
CHUNK_BYTES = 1 << 20  # chunk_rows: null -> about 1 MiB of tokens per chunk
SHARD_CHUNKS = 16  # shard_chunks default
DESCRIPTION = (
    "Row i of tokens/labels/norms is image i of the source shard manifest. tokens: [N, T, C] "
    "unit-norm along C (T = grid[0]*grid[1], row-major), stored as attribute dtype (absent: "
    "float16; bfloat16: the bits as uint16; int8: times scales [N, T], then divided by its "
    "norm); norms: the raw token norms; tokens_flip/scales_flip/norms_flip (when flip): the "
    "same for image i flipped left-right. Use only when complete is true.")


ARRAYS = ("tokens", "labels", "norms", "tokens_flip", "norms_flip", "written", "scales",
          "scales_flip")
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


# ---------------------------------------------------------------- dtypes

def store_dtype(attrs: dict) -> str:
    """A store's token dtype: its attribute `dtype` (absent: float16, the format before dtypes)."""
    return attrs.get("dtype") or "float16"


def bytes_per_image(tokens: int, channels: int, dtype: str | None = "float16",
                    flip: bool = False) -> int:
    """Bytes one image takes in a cache, uncompressed: tokens [T, C] in `dtype` (int8: + a
    float16 scale per token), norms float32 [T] (each twice with flips), a label int64.
    `dinosae plan`'s cache size is count × this."""
    dtype = dtype or "float16"
    if dtype not in DTYPES:
        raise ValueError(f"latents.dtype: unknown dtype {dtype!r} ({' | '.join(DTYPES)})")
    token = tokens * channels * np.dtype(ZARR_DTYPES[dtype]).itemsize
    scales = tokens * 2 if dtype == "int8" else 0
    return (2 if flip else 1) * (token + scales + tokens * 4) + 8


def quantize(z: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Unit tokens float32 (..., C) -> (stored tokens, int8's per-token float16 scales or None).
    int8: s = max|z| / 127 rounded to float16, q = round(z / s) with that s (so q · s is what
    dequantize sees); max |q| is 127 in every token."""
    z = np.asarray(z, dtype=np.float32)
    if dtype == "float16":
        return z.astype(np.float16), None
    if dtype == "bfloat16":  # round to nearest even, as torch does; keep the 16 high bits
        return torch.from_numpy(z).bfloat16().view(torch.int16).numpy().view(np.uint16), None
    if dtype == "int8":
        s = (np.abs(z).max(axis=-1) / INT8_MAX).astype(np.float16)
        q = np.rint(z / s.astype(np.float32)[..., None]).clip(-INT8_MAX, INT8_MAX)
        return q.astype(np.int8), s
    raise ValueError(f"latents.dtype: unknown dtype {dtype!r} ({' | '.join(DTYPES)})")


def dequantize(tokens: np.ndarray, scales: np.ndarray | None, dtype: str,
               project: bool = True) -> torch.Tensor:
    """Stored tokens (..., C) (+ int8's scales (...)) -> float32 tokens; `project`: divided by
    their norm (unit vectors; float16 tokens are returned as stored, already unit norm to
    their rounding). The one way every reader turns stored values into tokens."""
    if dtype == "float16":
        return torch.from_numpy(np.ascontiguousarray(tokens)).float()
    if dtype == "bfloat16":
        bits = np.ascontiguousarray(tokens).view(np.int16)
        z = torch.from_numpy(bits).view(torch.bfloat16).float()
    elif dtype == "int8":
        z = torch.from_numpy(np.ascontiguousarray(tokens)).float()
        z.mul_(torch.from_numpy(np.ascontiguousarray(scales)).float().unsqueeze(-1))
    else:
        raise ValueError(f"unknown store dtype {dtype!r} ({' | '.join(DTYPES)})")
    if project:
        z.div_(z.norm(dim=-1, keepdim=True))
    return z


def dequantize_into(out: np.ndarray, tokens: np.ndarray, scales: np.ndarray | None, dtype: str,
                    block: int = 16) -> np.ndarray:
    """dequantize (projected) into the float16 array `out`, `block` rows at a time (bounded
    float32 memory)."""
    for i in range(0, len(out), block):
        z = dequantize(tokens[i:i + block], None if scales is None else scales[i:i + block],
                       dtype)
        out[i:i + block] = z.half().numpy()
    return out


def norm_tolerance(dtype: str, scales: np.ndarray | None, channels: int) -> float | np.ndarray:
    """How far a stored token's norm (dequantize, not projected) may be off 1 (see the module
    doc): a number, or for int8 one per token (a NaN scale gives NaN: never within)."""
    if dtype == "int8":
        return NORM_TOL + 0.5 * np.sqrt(channels) * np.asarray(scales, dtype=np.float32)
    return NORM_TOLS[dtype]


def create_arrays(path: Path, attrs: dict, flip: bool, n: int, T: int, C: int, chunk: int,
                   unit: int, units: int, comp: tuple, dtype: str = "float16") -> None:
    group = zarr.open_group(path, mode="w")
    # unwritten tokens read back as NaN (float16; bfloat16's NaN bits) or as zero (int8; its
    # scales NaN): no fill value is a unit vector
    fill = {"float16": np.nan, "bfloat16": 0x7FC0, "int8": 0}[dtype]
    for suffix in ("", "_flip") if flip else ("",):
        group.create_array(f"tokens{suffix}", shape=(n, T, C), dtype=ZARR_DTYPES[dtype],
                           chunks=(chunk, T, C), shards=(unit, T, C), compressors=comp,
                           fill_value=fill)
        if dtype == "int8":
            group.create_array(f"scales{suffix}", shape=(n, T), dtype="float16",
                               chunks=(unit, T), compressors=comp, fill_value=np.nan)
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
