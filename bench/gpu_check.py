"""GPU check of the autoencoder models: forward + backward of each in bf16 autocast on CUDA,
with step time and peak memory, then one full stage-2 training step (generator with the adaptive
GAN weight, discriminator).

    .venv/bin/python bench/gpu_check.py                                   # config.yaml
    .venv/bin/python bench/gpu_check.py --config workflow/configs/imagenet256.yaml --batch 32

Teacher and LPIPS weights are random here (architecture and cost only). Without CUDA it says
so and exits 0; `--device cpu` runs the same code on the CPU (slow; to check the script).
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable

import torch

from dinosae.config import load_config
from dinosae.models.autoencoder import build_autoencoder
from dinosae.models.discriminator import (
    Discriminator,
    adaptive_weight,
    d_hinge_loss,
    diffaug,
    g_hinge_loss,
    teacher_features,
)
from dinosae.models.perceptual import build_lpips
from dinosae.train.ae import alignment_loss


def measure(fn: Callable[[], None], device: torch.device, warmup: int, iters: int
            ) -> tuple[float, float]:
    """(mean seconds per call, peak memory in GiB) of fn()."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    dt = (time.perf_counter() - t0) / iters
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return dt, mem


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="config.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cuda")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA: nothing to check on this machine (run it where a GPU is available)")
        return 0
    device = torch.device(args.device)
    cfg = load_config(args.config, None, args.set, check_paths=False)
    cfg = copy.deepcopy(cfg)
    cfg["autoencoder"]["teacher"]["weights"] = "random"
    cfg["autoencoder"]["lpips"]["weights"] = "random"
    size, B = cfg["data"]["image_size"], args.batch
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    ae = build_autoencoder(cfg).to(device).train()
    ae.set_grad_checkpointing(args.checkpointing)
    dcfg = cfg["autoencoder"]["discriminator"]
    disc = Discriminator(ae.channels, dcfg["layers"], dcfg["channels"]).to(device)
    lpips = build_lpips(cfg["autoencoder"]["lpips"]["net"], "random").to(device)
    x = torch.rand(B, 3, size, size, device=device)
    T, C = ae.grid[0] * ae.grid[1], ae.channels
    z0 = torch.randn(B, T, C, device=device)
    vit, layers = ae.encoder.vit, dcfg["layers"]
    g = torch.Generator(device=device).manual_seed(0)

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16)

    def stem():
        with autocast():
            y = ae.encoder.stem(ae.encoder.normalize(x))
        y.float().square().mean().backward()

    def encoder():
        with autocast():
            z = ae.encode(x)
        z.float().square().mean().backward()

    def teacher():
        with torch.no_grad(), autocast():
            ae.teacher_tokens(x)

    def decoder():
        with autocast():
            y = ae.decode(z0)
        y.float().square().mean().backward()

    def discriminator():
        xr = x.clone().requires_grad_(True)
        with autocast():
            logits = disc(teacher_features(vit, diffaug(xr, g), layers))
        logits.float().mean().backward()

    def perceptual():
        xr = x.clone().requires_grad_(True)
        with autocast():
            d = lpips(xr, x.flip(0), normalize=True)
        d.float().mean().backward()

    def stage2_step():
        with autocast():
            z, rec = ae(x)
            rec_loss = (rec.float() - x).abs().mean() + lpips(rec.float(), x).mean()
            align = alignment_loss(z, ae.teacher_tokens(x))
            disc.requires_grad_(False)
            g_gan = g_hinge_loss(disc(teacher_features(vit, diffaug(rec, g), layers)))
            lam = adaptive_weight(rec_loss, g_gan, ae.decoder.last_layer, 1e4)
            loss = rec_loss + 0.5 * align + 0.5 * lam * g_gan
        loss.backward()
        disc.requires_grad_(True)
        with autocast():
            with torch.no_grad():
                feats = teacher_features(vit, diffaug(torch.cat([x, rec.detach()]), g), layers)
            logits = disc(feats)
            d_loss = d_hinge_loss(logits[:B], logits[B:])
        d_loss.backward()

    n = {"stem": ae.encoder.stem, "ViT (frozen)": vit, "decoder": ae.decoder, "disc heads": disc}
    print(f"config {args.config}: {size} px, batch {B}, tokens {ae.grid[0]}x{ae.grid[1]}x{C}, "
          f"activation checkpointing {args.checkpointing}")
    print("parameters: " + ", ".join(f"{k} {sum(q.numel() for q in m.parameters()) / 1e6:.2f} M"
                                     for k, m in n.items()))
    print(f"{'model (bf16 autocast)':<34}{'ms/step':>10}{'img/s':>10}{'peak GiB':>10}")
    for name, fn in [("stem fwd+bwd", stem), ("encoder (stem+ViT) fwd+bwd", encoder),
                     ("teacher fwd", teacher), ("decoder fwd+bwd", decoder),
                     ("discriminator fwd+bwd (+DiffAug)", discriminator),
                     ("LPIPS fwd+bwd", perceptual), ("full stage-2 step (G + D)", stage2_step)]:
        ae.zero_grad(set_to_none=True)
        disc.zero_grad(set_to_none=True)
        dt, mem = measure(fn, device, args.warmup, args.iters)
        print(f"{name:<34}{dt * 1e3:>10.1f}{B / dt:>10.1f}{mem:>10.2f}")
        assert all(p.grad is None for p in vit.parameters()), "gradient reached the frozen ViT"
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
