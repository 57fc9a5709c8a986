"""Latent cache benchmark: encoding overhead, reader throughput, compression.

    .venv/bin/python bench/latents.py [--config config.yaml] [--set key=value ...]
                                      [--root ../shared/imagenet-sample] [--read-rows 16384]
    # the read bench alone, synthetic tokens at the paper's row size and chunking, the batch of
    # one of 8 GPUs (~30 s on 2 cores):
    .venv/bin/python bench/latents.py --only read --read-shape 256 1024 --read-batch 128 \
        --read-rows 1024 --config workflow/configs/imagenet256.yaml --read-codecs none

1. Encode: the configured autoencoder (random init) encodes real photographs (the embedded
   dataset, or --root, an ImageNet-style folder), sharded by `dinosae shard`. Timed on the same
   pre-decoded units and batches: the encoder's forward alone, and the cache path (forward,
   normalise, fp16, write to zarr, one write in flight); then encode_part end to end (with JPEG
   decoding), alternated: decoding in one background thread (baseline, data.workers=0) and in
   --workers threads (candidate), best of 3 each; the two caches are compared array by array.
   Goal: encode_part >= 0.9x the forward alone.
2. Read: the encoded tokens (or, with --read-shape, random unit-norm tokens), tiled to
   --read-rows rows, stored with the cache's chunking in each codec (--read-codecs) and as a raw
   .npy; the reader's batches() (raw=True: fp16 as stored, what the DiT trainer reads; and the
   fp32/radius conversion) against a memmap reading the same rows in the same windows, each
   window into fresh memory: mm[rows] (one copy; the baseline), + the same conversion. Files
   were just written, so reads come from the page cache for all (warm). Best of 3. Goal: the
   shuffled raw read >= 0.5x the memmap's at the paper's row size. Then each store dtype
   (--read-dtypes; store.quantize of the same tokens, the same chunking, the first codec)
   read shuffled by the reader (float16 unit tokens out: store.dequantize) against the same
   memmap of the float16 .npy, in GB/s of float32-equivalent tokens delivered.
   Quick, e.g.: --only read --read-shape 16 192 --read-codecs none (the default config's rows)
   and --only read --read-shape 256 1024 --read-rows 512 --read-codecs none (the paper's).
3. Bytes on disk per image, per codec and for the real cache (all arrays).

Random-init encoder tokens are closer to noise than a trained encoder's, so they compress a
little less; the read/write speeds do not depend on the values much.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr
from latents_common import best_of, du, shards_and_encoder
from zarr.core.buffer import default_buffer_prototype

from dinosae import latents
from dinosae.config import load_config
from dinosae.data.shard import read_manifest
from dinosae.dist import pick_device
from dinosae.latents.store import DTYPES, ZARR_DTYPES, quantize

ROOT = Path(__file__).resolve().parents[1]
ND = default_buffer_prototype().nd_buffer


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- 1. encode

def bench_encode(cfg: dict, shards: Path, ckpt: Path, tmp: Path, device: torch.device,
                 workers: int, reps: int = 3) -> dict:
    lcfg = cfg["latents"]
    cache = tmp / "cache.zarr"
    end_to_end: dict[int, list[float]] = {0: [], workers: []}

    def run_part(w: int, out: Path) -> float:
        shutil.rmtree(out, ignore_errors=True)
        c = {**cfg, "data": {**cfg["data"], "workers": w}}
        latents.encode_init(c, shards, ckpt, out)
        return latents.encode_part(c, out, shards, ckpt, 0, 1, tmp / "part.done")["images_per_s"]

    run_part(workers, tmp / "warm.zarr")  # warm-up (page cache, kernels)
    for i in range(reps):  # alternated, so that load from other processes hits both alike
        for w in ((0, workers) if i % 2 == 0 else (workers, 0)):
            end_to_end[w].append(run_part(w, tmp / f"e2e_{w}.zarr"))
    identical = all(np.array_equal(zarr.open_group(tmp / "e2e_0.zarr", mode="r")[k][:],
                                   zarr.open_group(tmp / f"e2e_{workers}.zarr", mode="r")[k][:])
                    for k in zarr.open_group(tmp / "e2e_0.zarr", mode="r").array_keys())
    shutil.copytree(tmp / f"e2e_{workers}.zarr", cache)
    latents.encode_gather(cfg, cache, tmp / "report.json")

    manifest = read_manifest(shards)
    attrs = zarr.open_group(cache, mode="r").attrs.asdict()
    n, unit, size = attrs["count"], attrs["unit_rows"], attrs["image_size"]
    all_units = list(range(attrs["units"]))
    units = list(latents.iter_units(shards, manifest, all_units, unit))
    decode: dict[int, list[float]] = {0: [], workers: []}
    for i in range(reps):  # the decode limit: reading + decoding the tars, nothing else
        for w in ((0, workers) if i % 2 == 0 else (workers, 0)):
            decode[w].append(best_of(lambda w=w: list(latents.iter_units(
                shards, manifest, all_units, unit, w)), 1))
    model = latents.load_encoder(ckpt, device)
    bs, flip = lcfg["batch_size"], attrs["flip"]
    passes = 2 if flip else 1

    @torch.no_grad()
    def forward_only() -> None:
        for _, images, _ in units:
            for f in range(passes):
                for i in range(0, len(images), bs):
                    x = torch.from_numpy(images[i:i + bs]).to(device)
                    x = x.permute(0, 3, 1, 2).float().div_(255.0)
                    z = model.encode(x.flip(-1) if f else x)
                    z.cpu()  # the cache path also brings the tokens back
        sync(device)

    scratch = tmp / "scratch.zarr"
    shutil.copytree(cache, scratch)  # same arrays and codecs; every run rewrites whole shards
    g = zarr.open_group(scratch, mode="r+")
    arrays = {k: g[k] for k in g.array_keys()}

    def cache_path() -> None:
        latents.write_units(model, units, arrays, device, bs, flip, size, unit)

    forward_only()  # warm-up
    t_fwd, t_cache = [], []
    for _ in range(5):  # interleaved, so that load from other processes hits both alike
        t_fwd.append(best_of(forward_only, 1))
        t_cache.append(best_of(cache_path, 1))
    t_fwd, t_cache = min(t_fwd), min(t_cache)
    return {"images": n, "flip": flip, "fwd": n / t_fwd, "cache": n / t_cache,
            "serial": max(end_to_end[0]), "parallel": max(end_to_end[workers]),
            "decode_serial": n / min(decode[0]), "decode_parallel": n / min(decode[workers]),
            "workers": workers, "identical": identical, "cache_dir": cache, "attrs": attrs}


# ---------------------------------------------------------------- 2./3. read and compression

def tile(x: np.ndarray, rows: int) -> np.ndarray:
    return np.concatenate([x] * -(-rows // len(x)))[:rows]


def tiled_store(path: Path, big: np.ndarray, labels: np.ndarray, norms: np.ndarray,
                attrs: dict, codec: str, dtype: str = "float16") -> float:
    """A complete single-array cache holding the float16 tokens `big` stored as `dtype`
    (store.quantize; labels, norms: one per row), the cache's chunking; returns the write time
    (with the quantization)."""
    shutil.rmtree(path, ignore_errors=True)
    g = zarr.open_group(path, mode="w")
    rows, t, c = big.shape
    unit, chunk = attrs["unit_rows"], attrs["chunk_rows"]
    arr = g.create_array("tokens", shape=(rows, t, c), dtype=ZARR_DTYPES[dtype],
                         chunks=(chunk, t, c), shards=(unit, t, c),
                         compressors=latents.compressors(codec))
    scales = g.create_array("scales", shape=(rows, t), dtype="float16", chunks=(unit, t),
                            compressors=latents.compressors(codec)) if dtype == "int8" else None
    g.create_array("labels", data=labels, chunks=(unit,))
    units = -(-rows // unit)  # what the reader checks: norms, written, the parts layout
    g.create_array("norms", data=norms, chunks=(unit, t))
    g.create_array("written", data=np.ones(units, np.uint8), chunks=(1,))
    t0 = time.perf_counter()
    for a in range(0, rows, unit):
        if dtype == "float16":
            arr[a:a + unit] = big[a:a + unit]
            continue
        q, s = quantize(big[a:a + unit].astype(np.float32), dtype)
        arr[a:a + unit] = q
        if scales is not None:
            scales[a:a + unit] = s
    seconds = time.perf_counter() - t0
    g.attrs.update({**attrs, "count": rows, "rows": rows, "units": units,
                    "parts_layout": {"parts": 1, "regions": [{"part": 0, "units": [0, units]}]},
                    "flip": False, "complete": True, "compression": codec, "dtype": dtype,
                    "mean_norm": float(norms.astype(np.float64).mean())})
    return seconds


def synthetic(shape: tuple[int, int], lcfg: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                            dict]:
    """Two units of random unit-norm fp16 tokens (T, C) = `shape`, labels, norms and the
    attributes of a cache with the configured chunking (no encoder involved)."""
    t, c = shape
    side = math.isqrt(t)
    if side * side != t:
        raise SystemExit(f"--read-shape: {t} tokens is not a square grid")
    chunk, unit = latents.chunking(lcfg, t * c * 2)
    rng = np.random.default_rng(0)
    z = rng.standard_normal((2 * unit, t, c), dtype=np.float32)
    z /= np.linalg.norm(z, axis=-1, keepdims=True)
    attrs = {"format": latents.FORMAT, "version": latents.VERSION, "tokens": t, "channels": c,
             "grid": [side, side], "image_size": 16 * side, "radius": 1.0, "num_classes": 10,
             "chunk_rows": chunk, "unit_rows": unit, "batch_size": 64,
             "encoder": {"path": "synthetic", "sha256": "0" * 64},
             "source": {"path": "synthetic", "sha256": "0" * 64}}
    return (z.astype(np.float16), rng.integers(0, 10, 2 * unit),
            np.ones((2 * unit, t), np.float32), attrs)


def reader_rate(lc: latents.LatentCache, batch: int, shuffle: bool, raw: bool,
                check: bool = True) -> float:
    """Seconds for one epoch of batches(); `check`: every row checked finite and unit norm (the
    default), or not (what that check costs)."""
    lc.check = check

    def run() -> None:
        for _ in lc.batches(batch, shuffle=shuffle, seed=0, epoch=0, radius=8.0, raw=raw):
            pass

    try:
        return best_of(run)
    finally:
        lc.check = True


def memmap_rates(npy: Path, lc: latents.LatentCache, batch: int) -> dict[str, float]:
    """A memmap of the same tokens read in the reader's windows (default window, same rows in
    the same order per window), each window into fresh memory: contiguous or shuffled; as stored
    (raw) or + the reader's fp32/radius conversion per batch (conv). `sorted`: shuffled, read in
    sorted order then un-permuted (two copies; this bench's baseline before the raw rows)."""
    mm = np.load(npy, mmap_mode="r")
    window = -(-max(8 * batch, 8 * lc.unit_rows) // batch) * batch  # the reader's default
    rng = np.random.default_rng(0)
    contig = np.arange(len(mm))[:len(mm) // batch * batch]
    shuffled = lc.order(shuffle=True, seed=0, epoch=0)[:len(contig)]
    wins = {"contig": [contig[w:w + window] for w in range(0, len(contig), window)],
            "shuffled": [rng.permutation(shuffled[w:w + window])
                         for w in range(0, len(shuffled), window)]}

    def run(order: str, convert: bool = False, sort: bool = False) -> None:
        for r in wins[order]:
            if order == "contig":
                tok = np.array(mm[r[0]:r[-1] + 1])
            elif sort:
                srt = np.sort(r)
                tok = mm[srt][np.searchsorted(srt, r)]
            else:
                tok = mm[r]
            if convert:
                for i in range(0, len(r), batch):
                    z = torch.from_numpy(tok[i:i + batch]).float()
                    z.mul_(8.0 / z.norm(dim=-1, keepdim=True))

    return {"contig_raw": best_of(lambda: run("contig")),
            "shuffled_raw": best_of(lambda: run("shuffled")),
            "sorted_raw": best_of(lambda: run("shuffled", sort=True)),
            "contig_conv": best_of(lambda: run("contig", True)),
            "shuffled_conv": best_of(lambda: run("shuffled", True))}


def bench_read(tokens: np.ndarray, labels: np.ndarray, norms: np.ndarray, attrs: dict,
               tmp: Path, rows: int, batch: int, codecs: list[str],
               dtypes: tuple[str, ...] = ()) -> list[dict]:
    big, labels, norms = tile(tokens, rows), tile(labels, rows), tile(norms, rows)
    npy = tmp / "raw.npy"
    np.save(npy, big)
    out = []
    for codec in codecs:
        path = tmp / f"read_{codec}.zarr"
        write_s = tiled_store(path, big, labels, norms, attrs, codec)
        os.sync()  # no writeback of the files just written during the timings
        lc = latents.open_cache(path)

        def plain(arr: zarr.Array = lc.tokens, unit: int = lc.unit_rows) -> None:
            for a in range(0, rows, unit):
                arr[a:a + unit]

        def into(arr: zarr.Array = lc.tokens, unit: int = lc.unit_rows) -> None:
            """The reader's zarr part: whole shards into one reused buffer."""
            buf = np.empty((unit, *arr.shape[1:]), dtype=np.float16)
            for a in range(0, rows, unit):
                n = min(unit, rows - a)
                arr.get_basic_selection(slice(a, a + n), out=ND.from_numpy_array(buf[:n]))

        out.append({"codec": codec, "bytes": du(path / "tokens"), "write": write_s,
                    "plain": best_of(plain), "into": best_of(into),
                    **{f"{o}_{k}": reader_rate(lc, batch, o == "shuffled", k == "raw")
                       for o in ("contig", "shuffled") for k in ("raw", "conv")},
                    "shuffled_raw_nocheck": reader_rate(lc, batch, True, True, check=False),
                    "check": best_of(lambda b=big: [latents.checks.bad_rows(b[a:a + batch])
                                                   for a in range(0, rows, batch)])})
        if codec != codecs[-1]:
            shutil.rmtree(path)
    for dtype in dtypes:  # each store dtype, in the first codec
        path = tmp / f"read_{dtype}.zarr"
        write_s = tiled_store(path, big, labels, norms, attrs, codecs[0], dtype)
        os.sync()
        lc = latents.open_cache(path)
        out.append({"dtype": dtype, "codec": codecs[0], "write": write_s,
                    "bytes": sum(du(path / k) for k in ("tokens", "scales")
                                 if (path / k).exists()),
                    **{f"shuffled_{k}": reader_rate(lc, batch, True, k == "raw")
                       for k in ("raw", "conv")}})
        shutil.rmtree(path)
    del big
    raw = memmap_rates(npy, latents.open_cache(tmp / f"read_{codecs[-1]}.zarr"), batch)
    out.append({"codec": "raw .npy", "bytes": npy.stat().st_size - 128, "memmap": raw})
    return out


def print_read(res: list[dict], rows: int, row_bytes: int, batch: int) -> None:
    gb = rows * row_bytes / 1e9
    mm = res[-1]["memmap"]
    by_dtype = [r for r in res if "dtype" in r]
    res = [r for r in res if "dtype" not in r]
    print(f"\n| read {rows} rows ({gb * 1e3:.0f} MB fp16), batch {batch}, warm page cache"
          "                 | samples/s |  GB/s | vs memmap |")
    print("|--------------------------------------------------------------------------|"
          "----------:|------:|----------:|")

    def line(name: str, t: float, base: float) -> None:
        print(f"| {name:72s} | {rows / t:9.0f} | {gb / t:5.2f} | {base / t:9.2f} |")

    for name, key in (("contiguous windows, raw (copy)", "contig_raw"),
                      ("shuffled windows, raw: mm[rows] (the trainer's baseline)", "shuffled_raw"),
                      ("shuffled windows, raw: sorted read + un-permute (2 copies)", "sorted_raw"),
                      ("contiguous windows + fp32 + radius", "contig_conv"),
                      ("shuffled windows + fp32 + radius", "shuffled_conv")):
        line(f"memmap: {name}", mm[key], mm[key if key != "sorted_raw" else "shuffled_raw"])
    for r in res[:-1]:
        line(f"{r['codec']}: zarr arr[unit] slices (vs contiguous)", r["plain"], mm["contig_raw"])
        line(f"{r['codec']}: zarr shards into one reused buffer (the reader's zarr part)",
             r["into"], mm["shuffled_raw"])
        for name, key in (("batches(raw=True), contiguous", "contig_raw"),
                          ("batches(raw=True), shuffled (the trainer's read)", "shuffled_raw"),
                          ("batches(), contiguous, fp32 + radius", "contig_conv"),
                          ("batches(), shuffled, fp32 + radius", "shuffled_conv")):
            line(f"{r['codec']}: reader {name}", r[key], mm[key])
        line(f"{r['codec']}: reader batches(raw=True), shuffled, rows not checked",
             r["shuffled_raw_nocheck"], mm["shuffled_raw"])
    for r in res[:-1]:
        print(f"{r['codec']}: the read check (every row finite, unit norm) alone: "
              f"{gb / r['check']:.2f} GB/s on one thread; the shuffled raw read with it takes "
              f"{r['shuffled_raw'] / r['shuffled_raw_nocheck']:.2f}x the time without it")
    for r in res[:-1]:  # the reader fills fresh memory too (the memmap's work) and reads zarr
        print(f"{r['codec']}: one-thread bound for a reader through zarr, memmap / (memmap + "
              f"zarr part) = {mm['shuffled_raw'] / (mm['shuffled_raw'] + r['into']):.2f}")
    if by_dtype:
        f32 = rows * row_bytes * 2 / 1e9  # the tokens as float32: what training consumes
        print(f"\n| store dtype ({by_dtype[0]['codec']}), shuffled windows, batch {batch} | "
              "token bytes/row | write+quantize GB/s | raw (float16 out) GB/s fp32-eq | "
              "vs memmap | fp32 + radius GB/s fp32-eq | vs memmap |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        print(f"| memmap of the float16 .npy (mm[rows]) | {row_bytes} | - | "
              f"{f32 / mm['shuffled_raw']:.2f} | 1.00 | {f32 / mm['shuffled_conv']:.2f} | 1.00 |")
        for r in by_dtype:
            print(f"| {r['dtype']} | {r['bytes'] / rows:.0f} | {gb / r['write']:.2f} | "
                  f"{f32 / r['shuffled_raw']:.2f} | {mm['shuffled_raw'] / r['shuffled_raw']:.2f} | "
                  f"{f32 / r['shuffled_conv']:.2f} | "
                  f"{mm['shuffled_conv'] / r['shuffled_conv']:.2f} |")
    print("\n| codec    | bytes/row | ratio | write GB/s | arr[unit] read GB/s | "
          "reader shuffled raw GB/s |")
    print("|----------|----------:|------:|-----------:|--------------------:|"
          "-------------------------:|")
    for r in res[:-1]:
        print(f"| {r['codec']:8s} | {r['bytes'] / rows:9.0f} | "
              f"{rows * row_bytes / r['bytes']:5.3f} | {gb / r['write']:10.2f} | "
              f"{gb / r['plain']:19.2f} | {gb / r['shuffled_raw']:24.2f} |")


def encode_part_of_bench(cfg: dict, args: argparse.Namespace, tmp: Path,
                         device: torch.device) -> dict:
    """1. and the cache's size; returns bench_encode's results."""
    shards, ckpt = shards_and_encoder(cfg, tmp, args.root)
    enc = bench_encode(cfg, shards, ckpt, tmp, device, args.workers)
    a = enc["attrs"]
    row_bytes = a["tokens"] * a["channels"] * 2
    print(f"\nlatent cache benchmark  device={device}  threads={torch.get_num_threads()}  "
          f"images={enc['images']} ({'root ' + args.root if args.root else 'embedded set'}, "
          f"{a['image_size']} px)  tokens={a['tokens']}x{a['channels']} fp16 "
          f"({row_bytes} B/row)  chunk={a['chunk_rows']} rows  unit(shard)={a['unit_rows']} "
          f"rows  codec={a['compression']}  flip={a['flip']}  "
          f"batch={cfg['latents']['batch_size']}")
    print("\n| encode (same pre-decoded batches)            | images/s | time vs forward |")
    print("|----------------------------------------------|---------:|----------------:|")
    for name, key in (("encoder forward alone", "fwd"),
                      ("forward + normalise + fp16 + zarr write", "cache"),
                      ("encode_part, decoding in 1 thread (baseline)", "serial"),
                      (f"encode_part, decoding in {enc['workers']} worker threads",
                       "parallel"),
                      ("decode only (iter_units), 1 thread", "decode_serial"),
                      (f"decode only (iter_units), {enc['workers']} threads",
                       "decode_parallel")):
        print(f"| {name:44s} | {enc[key]:8.1f} | {enc['fwd'] / enc[key] - 1:+15.1%} |")
    print(f"encode_part throughput / forward-only: baseline {enc['serial'] / enc['fwd']:.2f}x, "
          f"candidate {enc['parallel'] / enc['fwd']:.2f}x; caches bit-identical (plain zarr "
          f"read of every array): {enc['identical']}")
    total = du(enc["cache_dir"])
    print(f"\ncache on disk: {total / enc['images']:.0f} B/image (all arrays, "
          f"{'two token rows' if a['flip'] else 'one token row'} per image; raw tokens "
          f"{row_bytes * (2 if a['flip'] else 1)} B)")
    print(json.dumps({"encode": {k: v for k, v in enc.items() if k in
                                 ("images", "fwd", "cache", "serial", "parallel",
                                  "identical")}}))
    return enc


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(ROOT / "config.yaml"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--root", default=None, help="ImageNet-style folder (default: embedded set)")
    p.add_argument("--only", choices=("all", "read"), default="all",
                   help="read: only 2., on synthetic tokens of --read-shape (no encoder)")
    p.add_argument("--read-shape", type=int, nargs=2, metavar=("T", "C"), default=None,
                   help="synthetic unit-norm tokens T x C per row for the read bench, chunked "
                        "per the config's latents section (default: the encoded cache's)")
    p.add_argument("--read-rows", type=int, default=None,
                   help="rows read (default: 16384, at most 1 GiB of tokens)")
    p.add_argument("--read-batch", type=int, default=256)
    p.add_argument("--read-codecs", default="none,zstd,blosc")
    p.add_argument("--read-dtypes", default=",".join(DTYPES),
                   help="store dtypes read against the memmap (in the first codec); '' none")
    p.add_argument("--workers", type=int, default=2,
                   help="JPEG decoding threads of the candidate encode_part (baseline: 0)")
    p.add_argument("--keep", default=None, help="keep the work folder here")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: steadier timings on a shared machine)")
    args = p.parse_args()
    if args.only == "read" and args.read_shape is None:
        p.error("--only read needs --read-shape T C")
    logging.basicConfig(level=logging.WARNING)
    cfg = load_config(args.config, None, args.set, check_paths=False)
    torch.set_num_threads(args.threads)
    tmp = Path(args.keep or tempfile.mkdtemp(prefix="bench_latents_"))
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        if args.only == "all":
            enc = encode_part_of_bench(cfg, args, tmp, pick_device(cfg["device"]))
        if args.read_shape:
            tokens, labels, norms, attrs = synthetic(tuple(args.read_shape), cfg["latents"])
            source = "synthetic random tokens"
        else:
            g = zarr.open_group(enc["cache_dir"], mode="r")
            tokens, labels, norms, attrs = g["tokens"][:], g["labels"][:], g["norms"][:], \
                enc["attrs"]
            source = "the encoded cache's tokens, tiled"
        row_bytes = tokens[0].nbytes
        rows = args.read_rows or min(16384, (1 << 30) // row_bytes)
        codecs = args.read_codecs.split(",")
        print(f"\nread bench: {source}, {attrs['tokens']}x{attrs['channels']} fp16 "
              f"({row_bytes} B/row), chunk {attrs['chunk_rows']} rows, unit (shard) "
              f"{attrs['unit_rows']} rows; torch threads {torch.get_num_threads()}; load average "
              f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} (before)")
        dtypes = tuple(d for d in args.read_dtypes.split(",") if d)
        res = bench_read(tokens, labels, norms, attrs, tmp, rows, args.read_batch, codecs,
                         dtypes)
        print_read(res, rows, row_bytes, args.read_batch)
        print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} (after)")
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
