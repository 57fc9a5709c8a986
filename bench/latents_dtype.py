"""What each store dtype (latents.dtype) costs the method: a cache is built in each dtype through
the pipeline's own encode_init / encode_part / encode_gather, then read back through the reader
(LatentCache.read_rows: what training reads, float16 unit tokens whatever the dtype).

    .venv/bin/python bench/latents_dtype.py [--config config.yaml] [--root FOLDER] [--images 64]
    .venv/bin/python bench/latents_dtype.py --config workflow/configs/imagenet256.yaml \
        --set autoencoder.teacher.weights=random --root ../shared/imagenet-sample --images 4

The configured autoencoder and DiT with random weights (no weights can be downloaded) encode
real photographs (--root, an ImageNet-style folder; default the embedded dataset). Reported per
dtype, against the encoder's float32 tokens and against the float16 store:
  * direction error: the angle between a served token and the encoder's (degrees, mean / max);
  * decode PSNR: the decoder's image from the served tokens (at the encoder's own norms, the
    store's norms array) against its image from the float16 store's tokens (dB; inf: equal);
  * DiT loss: the RFM loss of the DiT on the same batch, noise, times and labels, relative
    difference from the float16 store's loss;
  * bytes per image: store.bytes_per_image (tokens, int8's scales, norms, label) and on disk.
Random weights put the numbers at a scale that a trained encoder may not share: the direction
error depends only on the token values, the PSNR and loss on how sensitive random networks are.
Read rates per dtype: bench/latents.py.
"""

from __future__ import annotations

import argparse
import math
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from latents_common import build_cache, du, shards_and_encoder

from dinosae import latents, rfm
from dinosae.config import load_config
from dinosae.data.shard import read_manifest
from dinosae.latents.store import DTYPES, bytes_per_image
from dinosae.models.autoencoder import DinoSAE
from dinosae.models.dit import build_dit

ROOT = Path(__file__).resolve().parents[1]


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a.clamp(0, 1) - b.clamp(0, 1)) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "config.yaml"))
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--root", default=None, help="ImageNet-style folder (default: embedded)")
    p.add_argument("--images", type=int, default=64,
                   help="images encoded (the last zarr chunk is stored whole: few images "
                        "inflate 'on disk')")
    p.add_argument("--keep", default=None, help="keep the work folder here")
    args = p.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(args.config, None, args.set, check_paths=False)
    cfg["device"] = "cpu"
    tmp = Path(args.keep or tempfile.mkdtemp(prefix="bench_dtype_"))
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        shards, ckpt = shards_and_encoder(cfg, tmp, args.root, args.images)
        stores = {d: build_cache(cfg, shards, ckpt, tmp / f"{d}.zarr", dtype=d, flip=False)
                  for d in DTYPES}
        report(cfg, args, shards, ckpt, stores)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


def report(cfg: dict, args: argparse.Namespace, shards: Path, ckpt: Path,
           stores: dict[str, Path]) -> None:
    ae = DinoSAE.load(ckpt).eval()
    manifest = read_manifest(shards)
    n = manifest["count"]
    _, images, labels = next(latents.iter_units(shards, manifest, [0], n))
    # the truth: the encoder's float32 unit tokens of the same images
    z, _ = latents.encode_images(ae, images, torch.device("cpu"), 8, dtype=None)
    z = torch.from_numpy(z)
    B, T, C = z.shape
    norms = torch.from_numpy(latents.open_cache(stores["float16"]).group["norms"][:])
    grid = tuple(int(g) for g in ae.grid)
    dc = cfg["dit"]
    dit = build_dit(dc["model"], T, C, 1000, grid, dc["head"]).eval()
    r, alpha = math.sqrt(C), rfm.alpha_for(T, C)
    g = torch.Generator().manual_seed(1)
    z1 = rfm.noise(z.shape, r, dc["path"], g)
    t = rfm.sample_time(B, alpha, g)
    y = torch.randint(0, 1000, (B,), generator=g)

    def loss(tokens: torch.Tensor) -> float:
        zt, u = rfm.point_and_target(tokens * r, z1, t, r, dc["path"])
        return float(rfm.flow_loss_at(dit(zt, t, y), zt, u, dc["path"], dc["lambda_rad"])[0])

    def served(dtype: str) -> torch.Tensor:
        lc = latents.open_cache(stores[dtype])
        return torch.from_numpy(lc.read_rows(np.arange(n))[0]).float()

    ref = served("float16")
    ref_img, ref_loss = ae.decode_at(ref, norms[..., None]), loss(ref)
    size = cfg["data"]["image_size"]
    print(f"config {args.config}: {B} images of {size} px -> {T}x{C} tokens; DiT {dc['model']}"
          f"{' + head' if dc['head'] else ''}; random weights; one thread; stores written and "
          "read through dinosae.latents\n")
    print("| store dtype | bytes/image (plan) | on disk / image | direction error vs fp32, "
          "mean / max (deg) | decode PSNR vs fp16 (dB) | DiT loss vs fp16 (rel.) |")
    print("|---|---:|---:|---:|---:|---:|")
    for dtype in DTYPES:
        back = served(dtype)
        angle = torch.rad2deg(torch.arccos(
            ((back * z).sum(-1) / back.norm(dim=-1) / z.norm(dim=-1)).clamp(-1, 1)))
        img = ae.decode_at(back, norms[..., None])
        rel = abs(loss(back) - ref_loss) / ref_loss
        disk = sum(du(stores[dtype] / k) for k in ("tokens", "scales", "norms", "labels")
                   if (stores[dtype] / k).exists()) / n
        print(f"| {dtype} | {bytes_per_image(T, C, dtype)} | {disk:.0f} | "
              f"{float(angle.mean()):.4f} / {float(angle.max()):.4f} | "
              f"{psnr(img, ref_img):.1f} | {rel:.2e} |")


if __name__ == "__main__":
    main()
