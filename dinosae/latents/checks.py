"""What a latent cache promises, checked: its attributes against its arrays (check_attrs), every
unit before the cache is marked complete (validate_cache), and the rows a reader reads
(bad_rows: finite, unit norm), and the chunk files a complete cache must hold (missing_chunks)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from dinosae.errors import CacheError
from dinosae.files import sha256_file
from dinosae.latents.background import background
from dinosae.latents.store import (
    ARRAYS,
    DTYPES,
    MEAN_NORM_EXACT_VALUES,
    NORM_TOL,
    NORM_TOLS,
    ZARR_DTYPES,
    ceil_div,
    dequantize,
    describe_region,
    norm_tolerance,
    region_of_unit,
    store_dtype,
)


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
    if units != ceil_div(n, unit):
        raise lie("units", f"is {units}, but {n} rows in units of {unit} make {ceil_div(n, unit)}")
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
    dtype = attrs.get("dtype", "float16")
    if dtype not in DTYPES:
        raise lie("dtype", f"is {dtype!r:.40}, not one of {', '.join(DTYPES)}")
    for name in [k for k in names if k.startswith("tokens")]:
        if str(arrays[name].dtype) != ZARR_DTYPES[dtype]:
            raise lie("dtype", f"is {dtype}, but array {name} holds {arrays[name].dtype} "
                               f"(a {dtype} store holds {ZARR_DTYPES[dtype]})")
        scales = name.replace("tokens", "scales")
        if dtype == "int8" and scales not in arrays:
            raise lie("dtype", f"is int8, but the store lacks the scales of {name} ({scales})")
        if dtype != "int8" and scales in arrays:
            raise lie("dtype", f"is {dtype}, but the store holds {scales} (an int8 store's)")
        if dtype == "int8":
            names.append(scales)
    for name in names:
        shape = tuple(arrays[name].shape)
        if name == "written":
            if shape != (units,):
                raise lie("units", f"is {units}, but array written has {shape}")
            continue
        if shape[0] != n:
            raise lie("count", f"is {n}, but array {name} has {shape[0]} rows")
        if name.startswith("scales") and shape != (n, T):
            raise lie("dtype", f"is int8, but array {name} is {shape}, not {(n, T)}")
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

def validate_cache(group: zarr.Group, attrs: dict, where: str = "",
                   on_unit: Callable[[], None] | None = None) -> dict:
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
    if units != ceil_div(n, unit) or layout["regions"][-1]["units"][1] != units:
        raise CacheError(f"{where}: the region layout does not cover {units} units")

    written = group["written"][:]
    missing = np.flatnonzero(written == 0)
    if len(missing):
        r = region_of_unit(int(missing[0]), layout)
        todo = [int(u) for u in missing if r["units"][0] <= u < r["units"][1]]
        raise CacheError(f"{where}: {describe_region(r, parts)} is not written: {len(todo)} of "
                         f"{r['units'][1] - r['units'][0]} units missing (first: unit {todo[0]})")

    dtype = store_dtype(attrs)
    extra = [t.replace("tokens", "scales") for t in names] if dtype == "int8" else []

    def read(u: int) -> tuple[int, dict]:
        a, b = u * unit, min((u + 1) * unit, n)
        return u, {name: group[name][a:b] for name in
                   names + [t.replace("tokens", "norms") for t in names] + ["labels"] + extra}

    stats = {"norm_sum": 0.0, "norm_min": np.inf, "norm_max": -np.inf, "unit_norm_error": 0.0}
    for u, data in background(read(u) for u in range(units)):
        a = u * unit
        if on_unit is not None:
            on_unit()
        bad = _check_unit(data, names, k, a, dtype)
        if bad:
            raise CacheError(f"{where}: {describe_region(region_of_unit(u, layout), parts)}: "
                             f"{bad}")
        for name in names:
            z = dequantize(data[name], data.get(name.replace("tokens", "scales")), dtype,
                           project=False)
            err = float((z.norm(dim=-1) - 1.0).abs().max())
            stats["unit_norm_error"] = max(stats["unit_norm_error"], err)
        raw = data["norms"].astype(np.float64)
        stats["norm_sum"] += float(raw.sum())
        stats["norm_min"] = min(stats["norm_min"], float(raw.min()))
        stats["norm_max"] = max(stats["norm_max"], float(raw.max()))
    return {"count": n, "rows": attrs["rows"], "units": units,
            "mean_norm": stats["norm_sum"] / (n * T), "min_norm": stats["norm_min"],
            "max_norm": stats["norm_max"], "max_unit_norm_error": stats["unit_norm_error"]}


def _check_unit(data: dict, names: list[str], num_classes: int, first_row: int,
                dtype: str = "float16") -> str | None:
    """The first problem in one unit's arrays, or None."""
    labels = data["labels"]
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if len(bad):
        return (f"label {labels[bad[0]]} at row {first_row + bad[0]} is outside "
                f"0..{num_classes - 1}")
    for name in names:
        scales = data.get(name.replace("tokens", "scales"))
        t = dequantize(data[name], scales, dtype, project=False).numpy()
        finite = np.isfinite(t).all(axis=(1, 2))
        if scales is not None:
            finite &= np.isfinite(scales).all(axis=1)
        if not finite.all():
            return f"{name} row {first_row + np.flatnonzero(~finite)[0]} has NaN/Inf"
        tol = norm_tolerance(dtype, scales, t.shape[-1])
        off = np.abs(np.linalg.norm(t, axis=-1) - 1.0) - tol
        bad = np.flatnonzero(off.max(axis=1) > 0)
        if len(bad):
            return (f"{name} row {first_row + bad[0]}: a token norm is off 1 by more than "
                    f"the {dtype} store allows (by {off[bad[0]].max():.3g} beyond it)")
        norms = data[name.replace("tokens", "norms")]
        ok = np.isfinite(norms).all(axis=1) & (norms > 0).all(axis=1)
        if not ok.all():
            row = first_row + np.flatnonzero(~ok)[0]
            return f"{name.replace('tokens', 'norms')} row {row} is not finite and positive"
    return None


def bad_rows(tokens: np.ndarray, tol: float = NORM_TOL, block: int = 16) -> np.ndarray:
    """Indices (along axis 0) of the rows of stored tokens (n, T, C) holding a token that is not
    finite or whose norm is off 1 by more than `tol`: what a reader checks on every row it reads
    (a deleted chunk reads back as NaN rows, an all-zero store as zero rows). One pass in fp32,
    `block` rows at a time; NaN and Inf fail the comparison. Cost: bench/latents.py."""
    t = torch.from_numpy(np.ascontiguousarray(tokens))
    bad = []
    for i in range(0, len(t), block):
        y = t[i:i + block].float()
        ss = (y * y).sum(-1)  # squared token norms (rows, T); |‖z‖² − 1| ≈ 2 |‖z‖ − 1|
        ok = ((ss - 1.0).abs() <= tol * (2.0 + tol)).all(-1)
        if not bool(ok.all()):
            bad.append(i + torch.nonzero(~ok).flatten().numpy())
    return np.concatenate(bad) if bad else np.zeros(0, dtype=np.int64)


def bad_stored_rows(tokens: np.ndarray, scales: np.ndarray | None, dtype: str,
                    block: int = 16) -> np.ndarray:
    """Indices of the rows of stored tokens (n, T, C) of a `dtype` store (int8: + scales
    (n, T)) holding a token that is not finite or whose norm (dequantize, not projected) is off
    1 by more than store.norm_tolerance; what gather and `cache verify` check."""
    if dtype == "float16":
        return bad_rows(tokens, block=block)
    bad = []
    for i in range(0, len(tokens), block):
        s = None if scales is None else scales[i:i + block]
        z = dequantize(tokens[i:i + block], s, dtype, project=False)
        tol = torch.as_tensor(norm_tolerance(dtype, s, z.shape[-1]), dtype=torch.float32)
        ok = ((z.norm(dim=-1) - 1.0).abs() <= tol).all(-1)
        if not bool(ok.all()):
            bad.append(i + torch.nonzero(~ok).flatten().numpy())
    return np.concatenate(bad) if bad else np.zeros(0, dtype=np.int64)


def rows_error(path: str | Path, what: str, rows: np.ndarray) -> CacheError:
    """One line naming the store and the damaged rows (the first few, and how many)."""
    rows = np.unique(rows)
    shown = ", ".join(str(int(r)) for r in rows[:8]) + (", ..." if len(rows) > 8 else "")
    return CacheError(f"{path}: {what} row{'s' if len(rows) > 1 else ''} {shown} "
                      f"({len(rows)} in all) are not finite unit vectors: the cache is damaged "
                      f"(a deleted or corrupt chunk?); `dinosae cache verify {path}` checks it all")


def chunk_keys(array: zarr.Array) -> list[str]:
    """The store keys (paths under the array's folder) of every chunk (or shard) of `array`;
    zarr's default key encoding `c/i/j/...`."""
    grid = array.cdata_shape if array.shards is None else tuple(
        ceil_div(s, c) for s, c in zip(array.shape, array.shards, strict=True))
    return ["c/" + "/".join(map(str, idx)) for idx in np.ndindex(*grid)]


def missing_chunks(path: str | Path, group: zarr.Group, names: list[str]) -> dict[str, list[str]]:
    """Array name -> chunk (shard) files absent from the store: a complete cache writes every one
    (no chunk of valid data equals the fill value), so an absent one was deleted. Listing only."""
    out = {}
    for name in names:
        folder = Path(path) / name
        have = {str(p.relative_to(folder)) for p in (folder / "c").rglob("*") if p.is_file()} \
            if (folder / "c").is_dir() else set()
        gone = [k for k in chunk_keys(group[name]) if k not in have]
        if gone:
            out[name] = gone
    return out


def check_chunks(path: str | Path, group: zarr.Group, names: list[str]) -> None:
    """CacheError naming the first absent chunk file of the named arrays and its rows."""
    gone = missing_chunks(path, group, names)
    if gone:
        name, keys = next(iter(gone.items()))
        a = group[name]
        rows = (a.shards or a.chunks)[0]
        first = int(keys[0].split("/")[1]) * rows
        raise CacheError(f"{path}: chunk file {name}/{keys[0]} is missing (rows {first}.."
                         f"{min(first + rows, a.shape[0]) - 1}; {sum(map(len, gone.values()))} "
                         "missing in all): the cache is damaged; re-encode it")


def has_checksums(array: zarr.Array) -> bool:
    """Whether the array's chunks carry a crc32c (zarr checks it on every read)."""
    codecs = [type(c).__name__ for c in array.metadata.codecs]
    inner = getattr(array.metadata.codecs[0], "codecs", ()) if codecs == ["ShardingCodec"] \
        else ()
    return "Crc32cCodec" in codecs + [type(c).__name__ for c in inner]


NORM_TOL_NOTE = {"float16": f"{NORM_TOL:g}", "bfloat16": f"{NORM_TOLS['bfloat16']:g}",
                 "int8": f"{NORM_TOL:g} + half a step (scale) times sqrt(channels)"}


def verify_cache(path: str | Path, group: zarr.Group, attrs: dict) -> dict:
    """Everything a cache promises, checked to the end (`dinosae cache verify`): complete,
    every attribute against the arrays, every chunk file present, every chunk's checksum, every
    row's tokens finite and unit norm, norms finite and positive, labels in range. Returns
    {"problems": [one line each], "checked": what was checked}; never raises for damage."""
    problems: list[str] = []
    if attrs.get("complete") is not True:
        problems.append("incomplete: attribute complete is not true")
    try:  # the layout first: the rows are read by it
        check_attrs(path, group, attrs)
    except CacheError as e:
        return {"problems": problems + [str(e)], "checked": "attributes (they lie: stopped)"}
    if attrs.get("complete") is True:
        try:  # radius, labels against num_classes, mean_norm against the norms
            check_attrs(path, group, attrs, reading=True)
        except CacheError as e:
            problems.append(str(e))
    flip, n, unit, K = attrs["flip"], attrs["count"], attrs["unit_rows"], attrs["num_classes"]
    dtype = store_dtype(attrs)
    tokens = ["tokens", "tokens_flip"] if flip else ["tokens"]
    names = tokens + [t.replace("tokens", "norms") for t in tokens] + ["labels"] + (
        [t.replace("tokens", "scales") for t in tokens] if dtype == "int8" else [])
    for name, keys in missing_chunks(path, group, names + ["written"]).items():
        rows = (group[name].shards or group[name].chunks)[0]
        problems += [f"chunk file {name}/{k} is missing (rows {int(k.split('/')[1]) * rows}.."
                     f"{min((int(k.split('/')[1]) + 1) * rows, group[name].shape[0]) - 1})"
                     for k in keys]
    written = group["written"][:]
    if not written.all():
        problems.append(f"units not written: {np.flatnonzero(written == 0)[:8].tolist()}")
    for u in range(attrs["units"]):
        a, b = u * unit, min((u + 1) * unit, n)
        values = {}
        for name in names:
            try:
                values[name] = group[name][a:b]
            except ValueError as e:  # zarr: "Stored and computed checksum do not match"
                problems.append(f"{name} rows {a}..{b - 1}: unreadable chunk ({str(e)[:80]})")
        for name in [k for k in names if k in values]:
            if name.startswith("scales"):
                continue  # checked with their tokens
            if name.startswith("tokens"):
                scales = name.replace("tokens", "scales")
                if dtype == "int8" and scales not in values:
                    continue
                bad = bad_stored_rows(values[name], values.get(scales), dtype)
                if len(bad):
                    problems.append(f"{name} rows {(a + bad[:8]).tolist()}"
                                    f"{' ...' if len(bad) > 8 else ''}: not finite unit vectors "
                                    f"(as a {dtype} store: {NORM_TOL_NOTE[dtype]})")
            elif name.startswith("norms"):
                bad = np.flatnonzero(~(np.isfinite(values[name]) & (values[name] > 0))
                                     .all(axis=1))
                if len(bad):
                    problems.append(f"{name} rows {(a + bad[:8]).tolist()}: not finite and "
                                    "positive")
            else:
                bad = np.flatnonzero((values[name] < 0) | (values[name] >= K))
                if len(bad):
                    problems.append(f"labels rows {(a + bad[:8]).tolist()}: outside 0..{K - 1}")
    crc = all(has_checksums(group[name]) for name in names)
    return {"problems": problems,
            "checked": f"attributes, chunk files, {n * len(tokens)} rows of {', '.join(names)} "
                       f"({dtype} tokens: norm within {NORM_TOL_NOTE[dtype]} of 1), "
                       + ("crc32c of every chunk" if crc else "no chunk checksums (a store "
                          "made before they were added)")}
