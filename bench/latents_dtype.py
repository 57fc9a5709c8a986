"""What a smaller store dtype would cost the method: the cache's unit tokens stored as float16
(today), bfloat16, or int8 with a per-token scale (absmax / 127), each read back and projected
to unit norm again.

    .venv/bin/python bench/latents_dtype.py [--config config.yaml] [--root FOLDER] [--images 8]
    .venv/bin/python bench/latents_dtype.py --config workflow/configs/imagenet256.yaml \
        --set autoencoder.teacher.weights=random --root ../shared/imagenet-sample --images 4

The configured autoencoder and DiT with random weights (no weights can be downloaded) encode
real photographs (--root, an ImageNet-style folder; default the embedded dataset). Reported per
dtype, against the fp32 tokens and against the fp16 store:
  * direction error: the angle between a stored token and the encoder's (degrees, mean / max);
  * decode PSNR: the decoder's image from the stored tokens (at the encoder's own norms) against
    its image from the fp16 tokens (dB; identical images give inf);
  * DiT loss: the RFM loss of the DiT on the same batch, noise, times and labels, relative
    difference from the fp16 tokens' loss;
  * bytes per image of the tokens (int8: + a float16 scale per token);
  * dequantization rate (stored dtype -> fp16 unit tokens), one thread, GB of fp16 out per s.
Random weights put the numbers at a scale that a trained encoder may not share: the direction
error depends only on the token values, the PSNR and loss on how sensitive random networks are.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dinosae import rfm
from dinosae.config import load_config
from dinosae.data.mini import build_mini_dataset
from dinosae.models.autoencoder import build_autoencoder
from dinosae.models.dit import build_dit

ROOT = Path(__file__).resolve().parents[1]


def quantize(z: torch.Tensor, dtype: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Unit tokens (..., C) float32 -> (stored values, per-token scale or None)."""
    if dtype == "float16":
        return z.half(), None
    if dtype == "bfloat16":
        return z.bfloat16(), None
    if dtype == "int8":
        scale = z.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 127.0
        return torch.round(z / scale).clamp(-127, 127).to(torch.int8), scale.half()
    raise ValueError(dtype)


def dequantize(q: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """Stored values -> unit tokens float32 (projected to norm 1 again)."""
    z = q.float() if scale is None else q.float() * scale.float()
    return z / z.norm(dim=-1, keepdim=True)


def images(folder: Path, n: int, size: int) -> torch.Tensor:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpeg", ".jpg", ".png"))
    out = []
    for f in files[:: max(1, len(files) // n)][:n]:
        im = Image.open(f).convert("RGB")
        s = min(im.size)
        im = im.crop(((im.width - s) // 2, (im.height - s) // 2, (im.width + s) // 2,
                      (im.height + s) // 2)).resize((size, size), Image.BICUBIC)
        out.append(torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255)
    return torch.stack(out)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a.clamp(0, 1) - b.clamp(0, 1)) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def best_of(fn, reps: int = 3) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "config.yaml"))
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--root", default=None, help="ImageNet-style folder (default: embedded)")
    p.add_argument("--images", type=int, default=8)
    args = p.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(args.config, None, args.set, check_paths=False)
    size = int(cfg["data"]["image_size"])
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.root) if args.root else Path(tmp) / "mini"
        if not args.root:
            build_mini_dataset(cfg, root)
        x = images(root, args.images, size)
    torch.manual_seed(0)
    ae = build_autoencoder(cfg).eval()
    z, norms = ae.encode_unit(x)  # fp32 unit tokens (B, T, C), raw norms (B, T)
    B, T, C = z.shape
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

    ref = dequantize(*quantize(z, "float16"))
    ref_img, ref_loss = ae.decode_at(ref, norms[..., None]), loss(ref)
    print(f"config {args.config}: {B} images of {size} px -> {T}x{C} tokens; DiT {dc['model']}"
          f"{' + head' if dc['head'] else ''}; random weights; one thread\n")
    print("| store dtype | bytes/image | direction error vs fp32, mean / max (deg) | decode "
          "PSNR vs fp16 (dB) | DiT loss vs fp16 (rel.) | dequantize GB/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for dtype in ("float16", "bfloat16", "int8"):
        q, scale = quantize(z, dtype)
        back = dequantize(q, scale)
        angle = torch.rad2deg(torch.arccos((back * z).sum(-1).clamp(-1, 1)))
        nbytes = q.element_size() * T * C + (scale.numel() // B * 2 if scale is not None else 0)
        img = ae.decode_at(back, norms[..., None])
        rel = abs(loss(back) - ref_loss) / ref_loss
        big_q, big_s = q.repeat(max(1, 64 // B), 1, 1), (None if scale is None else
                                                        scale.repeat(max(1, 64 // B), 1, 1))
        secs = best_of(lambda q=big_q, s=big_s: dequantize(q, s).half())
        gbs = big_q.numel() * 2 / 1e9 / secs
        print(f"| {dtype} | {nbytes} | {float(angle.mean()):.4f} / {float(angle.max()):.4f} | "
              f"{psnr(img, ref_img):.1f} | {rel:.2e} | {gbs:.2f} |")


if __name__ == "__main__":
    main()
