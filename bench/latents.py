"""Latent cache benchmark: encoding overhead, reader throughput, compression.

    .venv/bin/python bench/latents.py [--config config.yaml] [--set key=value ...]
                                      [--root ../shared/imagenet-sample] [--read-rows 16384]

1. Encode: the configured autoencoder (random init) encodes real photographs (the embedded
   dataset, or --root, an ImageNet-style folder), sharded by `dinosae shard`. Timed on the same
   pre-decoded units and batches: the encoder's forward alone, and the cache path (forward,
   normalise, fp16, write to zarr, one write in flight); then encode_part end to end (with JPEG
   decoding), alternated: decoding in one background thread (baseline, data.workers=0) and in
   --workers threads (candidate), best of 3 each; the two caches are compared array by array.
   Goal: encode_part >= 0.9x the forward alone.
2. Read: the encoded tokens, tiled to --read-rows rows, stored with the cache's chunking in each
   codec (none, zstd, blosc) and as a raw .npy; the reader's batches() against a memmap reading the
   same rows in the same windows (raw copy, and raw copy + the reader's fp32/radius conversion).
   Files were just written, so reads come from the page cache for all (warm). Best of 3.
3. Bytes on disk per image, per codec and for the real cache (all arrays).

Random-init encoder tokens are closer to noise than a trained encoder's, so they compress a
little less; the read/write speeds do not depend on the values much.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr

from dinosae import latents
from dinosae.checkpoint import save_checkpoint
from dinosae.config import load_config
from dinosae.data.mini import build_mini_dataset
from dinosae.data.shard import read_manifest, shard_split
from dinosae.dist import pick_device
from dinosae.models.autoencoder import ae_config, build_autoencoder

ROOT = Path(__file__).resolve().parents[1]


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def best_of(fn, reps: int = 3) -> float:
    """Shortest wall time of `reps` calls (the machine is shared: the minimum is the signal)."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


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
    model = latents._load_encoder(ckpt, device)
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

def tiled_store(path: Path, tokens: np.ndarray, labels: np.ndarray, norms: np.ndarray,
                attrs: dict, rows: int, codec: str) -> float:
    """A complete single-array cache of `rows` rows (tokens tiled), the cache's chunking;
    returns the write time."""
    shutil.rmtree(path, ignore_errors=True)
    g = zarr.open_group(path, mode="w")
    _, t, c = tokens.shape
    unit, chunk = attrs["unit_rows"], attrs["chunk_rows"]
    arr = g.create_array("tokens", shape=(rows, t, c), dtype="float16", chunks=(chunk, t, c),
                         shards=(unit, t, c), compressors=latents.compressors(codec))
    reps = -(-rows // len(tokens))
    big = np.concatenate([tokens] * reps)[:rows]
    g.create_array("labels", data=np.concatenate([labels] * reps)[:rows], chunks=(unit,))
    units = -(-rows // unit)  # what the reader checks: norms, written, the parts layout
    g.create_array("norms", data=np.concatenate([norms] * reps)[:rows], chunks=(unit, t))
    g.create_array("written", data=np.ones(units, np.uint8), chunks=(1,))
    t0 = time.perf_counter()
    for a in range(0, rows, unit):
        arr[a:a + unit] = big[a:a + unit]
    seconds = time.perf_counter() - t0
    g.attrs.update({**attrs, "count": rows, "rows": rows, "units": units,
                    "parts_layout": {"parts": 1, "regions": [{"part": 0, "units": [0, units]}]},
                    "flip": False, "complete": True,
                    "compression": codec})
    return seconds


def reader_rate(lc: latents.LatentCache, batch: int, shuffle: bool) -> float:
    def run() -> None:
        for _ in lc.batches(batch, shuffle=shuffle, seed=0, epoch=0, radius=8.0):
            pass

    return best_of(run)


def memmap_rates(npy: Path, lc: latents.LatentCache, batch: int) -> tuple[float, float, float]:
    """(raw contiguous copy, raw copy of the reader's shuffled windows, same + conversion)."""
    mm = np.load(npy, mmap_mode="r")
    rows = lc.order(shuffle=True, seed=0, epoch=0)
    rows = rows[:len(rows) // batch * batch]
    window = -(-max(8 * batch, 8 * lc.unit_rows) // batch) * batch  # the reader's default
    rng = np.random.default_rng(0)

    def contiguous() -> None:
        for a in range(0, len(mm), window):
            np.array(mm[a:a + window])

    def windows(convert: bool) -> None:
        for w in range(0, len(rows), window):
            r = rng.permutation(rows[w:w + window])
            srt = np.sort(r)
            tok = mm[srt][np.searchsorted(srt, r)]
            if convert:
                for i in range(0, len(r), batch):
                    z = torch.from_numpy(tok[i:i + batch]).float()
                    z.mul_(8.0 / z.norm(dim=-1, keepdim=True))

    return (best_of(contiguous), best_of(lambda: windows(False)), best_of(lambda: windows(True)))


def bench_read(enc: dict, tmp: Path, rows: int, batch: int) -> list[dict]:
    g = zarr.open_group(enc["cache_dir"], mode="r")
    tokens, labels, norms, attrs = g["tokens"][:], g["labels"][:], g["norms"][:], enc["attrs"]
    reps = -(-rows // len(tokens))
    big = np.concatenate([tokens] * reps)[:rows]
    npy = tmp / "raw.npy"
    np.save(npy, big)
    out = []
    for codec in ("none", "zstd", "blosc"):
        path = tmp / f"read_{codec}.zarr"
        write_s = tiled_store(path, tokens, labels, norms, attrs, rows, codec)
        lc = latents.open_cache(path)

        def plain(arr: zarr.Array = lc.tokens, unit: int = lc.unit_rows) -> None:
            for a in range(0, rows, unit):
                arr[a:a + unit]

        out.append({"codec": codec, "bytes": du(path / "tokens"), "write": write_s,
                    "plain": best_of(plain), "contig": reader_rate(lc, batch, False),
                    "shuffled": reader_rate(lc, batch, True)})
    raw = memmap_rates(npy, latents.open_cache(tmp / "read_none.zarr"), batch)
    out.append({"codec": "raw .npy", "bytes": npy.stat().st_size - 128, "memmap": raw})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(ROOT / "config.yaml"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--root", default=None, help="ImageNet-style folder (default: embedded set)")
    p.add_argument("--read-rows", type=int, default=16384)
    p.add_argument("--read-batch", type=int, default=256)
    p.add_argument("--workers", type=int, default=2,
                   help="JPEG decoding threads of the candidate encode_part (baseline: 0)")
    p.add_argument("--keep", default=None, help="keep the work folder here")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: steadier timings on a shared machine)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    cfg = load_config(args.config, None, args.set, check_paths=False)
    device = pick_device(cfg["device"])
    torch.set_num_threads(args.threads)
    tmp = Path(args.keep or tempfile.mkdtemp(prefix="bench_latents_"))
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        root = Path(args.root) if args.root else tmp / "mini"
        if not args.root:
            build_mini_dataset(cfg, root)
        cfg["data"].update(root=str(root), workers=min(2, os.cpu_count() or 1))
        shard_split(cfg, "train", tmp / "shards")
        torch.manual_seed(0)
        ae = build_autoencoder(cfg)
        sd = ae.state_dict()
        save_checkpoint(tmp / "ae.pt", {"kind": "dinosae-ae", "stage": 4, "step": 0,
                                        "config": ae_config(cfg), "model": sd, "ema": sd})
        del ae
        enc = bench_encode(cfg, tmp / "shards", tmp / "ae.pt", tmp, device, args.workers)
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

        rows = args.read_rows
        res = bench_read(enc, tmp, rows, args.read_batch)
        gb = rows * row_bytes / 1e9
        raw_contig, raw_win, raw_conv = res[-1]["memmap"]
        print(f"\n| read {rows} rows ({gb * 1e3:.0f} MB fp16), batch {args.read_batch}, warm "
              "page cache | samples/s |  GB/s | vs raw memmap |")
        print("|---------------------------------------------------------|----------:|------:|"
              "--------------:|")
        for name, t in (("raw memmap: contiguous copy", raw_contig),
                        ("raw memmap: reader's shuffled windows", raw_win),
                        ("raw memmap: shuffled windows + fp32 + radius", raw_conv)):
            print(f"| {name:55s} | {rows / t:9.0f} | {gb / t:5.2f} | {raw_contig / t:13.2f} |")
        for r in res[:-1]:
            for name, key, base in (("zarr arr[unit] slices", "plain", raw_contig),
                                    ("reader batches(), contiguous", "contig", raw_conv),
                                    ("reader batches(), shuffled", "shuffled", raw_conv)):
                label = f"{r['codec']}: {name}"
                vs = f"{base / r[key]:.2f}" + (" (conv)" if base is raw_conv else "")
                print(f"| {label:55s} | {rows / r[key]:9.0f} | {gb / r[key]:5.2f} | {vs:>13s} |")

        print("\n| codec    | bytes/row | ratio | write GB/s | arr[unit] read GB/s | "
              "reader shuffled GB/s |")
        print("|----------|----------:|------:|-----------:|--------------------:|"
              "---------------------:|")
        for r in res[:-1]:
            print(f"| {r['codec']:8s} | {r['bytes'] / rows:9.0f} | "
                  f"{rows * row_bytes / r['bytes']:5.3f} | {gb / r['write']:10.2f} | "
                  f"{gb / r['plain']:19.2f} | {gb / r['shuffled']:20.2f} |")
        print(json.dumps({"encode": {k: v for k, v in enc.items() if k in
                                     ("images", "fwd", "cache", "serial", "parallel",
                                      "identical")}}))
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
