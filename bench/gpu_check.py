"""The one script a GPU session runs: img/s, peak memory and MFU of every rule's hot loop
(autoencoder stage-1 and stage-2 steps, encode, DiT train step, sampling) in one table, and the
bf16 autocast outputs of each network against fp32 on the same batch.

    .venv/bin/python bench/gpu_check.py                       # paper sizes (imagenet256.yaml)
    .venv/bin/python bench/gpu_check.py --ae-parts            # + the autoencoder's parts alone
    .venv/bin/python bench/gpu_check.py --cpu-smoke           # every row on CPU, config.yaml's
                                                              # tiny models (< 1 min)

Teacher and LPIPS weights are random (architecture and cost only). FLOPs are counted once per
row by torch's FlopCounterMode (dinosae.plan.flop_counter: conv backward and CPU attention
fixed); MFU = FLOPs / time / the GPU's dense bf16 peak (dinosae/gpus.yaml, found by the device
name or --gpu). On CPU the peak is this machine's measured fp32 matmul rate and "peak GiB" is the
process's max RSS. The encode row runs as encode_part does (fp32, TF32 convolutions); the other
rows run under bf16 autocast, as their rules do. Without CUDA (and without --cpu-smoke) it says so
and exits 0. Exit 1 when a bf16-vs-fp32 error exceeds --tol.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from dinosae import rfm, sphere
from dinosae.config import load_config
from dinosae.models.autoencoder import build_autoencoder
from dinosae.models.discriminator import (
    adaptive_weight,
    build_discriminator,
    d_hinge_loss,
    disc_logits,
    g_hinge_loss,
)
from dinosae.models.dit import dit_from_config
from dinosae.models.perceptual import build_lpips
from dinosae.plan import flop_counter, load_gpus
from dinosae.train.ae import alignment_loss
from dinosae.train.dit import draw_inputs, train_step

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "workflow/configs/imagenet256.yaml"
TINY = ROOT / "config.yaml"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30  # Linux: KiB


def measure(fn: Callable[[], object], device: torch.device, warmup: int, iters: int
            ) -> tuple[float, float, float]:
    """(mean seconds per call, peak memory GiB, FLOPs of one call) of fn()."""
    for _ in range(warmup):
        fn()
    sync(device)
    counter = flop_counter()
    with counter:
        fn()
    flops = float(counter.get_total_flops())
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / iters, peak_gib(device), flops


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in fp64."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def cpu_peak_flops() -> float:
    """This CPU's fp32 matmul rate (FLOP/s), best of 5: the CPU's 'peak' for the MFU column."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    best = math.inf
    for _ in range(5):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * 1024**3 / best


def gpu_peak(name: str, key: str | None) -> tuple[str, float]:
    """(gpus.yaml key, dense bf16 FLOP/s) of the device called `name`."""
    gpus = load_gpus()
    if key is None:
        key = next((k for k in gpus if k in name.lower()), None)
        if key is None:
            raise SystemExit(f"gpu_check: {name!r} is none of {sorted(gpus)} in dinosae/gpus.yaml;"
                             " give --gpu")
    return key, gpus[key]["bf16"] * 1e12


class Table:
    def __init__(self, device: torch.device, peak: float, tol: float) -> None:
        self.device, self.peak, self.tol, self.rows = device, peak, tol, []
        print(f"{'row':<38}{'batch':>6}{'ms/call':>10}{'img/s':>10}{'peak GiB':>10}"
              f"{'TFLOP/call':>11}{'MFU':>7}{'bf16 err':>10}  check")

    def row(self, name: str, batch: int, images: int, fn: Callable[[], object], warmup: int,
            iters: int, err: float | None = None) -> None:
        dt, mem, flops = measure(fn, self.device, warmup, iters)
        mfu = flops / dt / self.peak
        ok = err is None or err <= self.tol
        check = "-" if err is None else ("ok" if ok else f"FAIL (> {self.tol:g})")
        e = "" if err is None else f"{err:.2e}"
        print(f"{name:<38}{batch:>6}{dt * 1e3:>10.1f}{images / dt:>10.1f}{mem:>10.2f}"
              f"{flops / 1e12:>11.4f}{mfu:>7.1%}{e:>10}  {check}", flush=True)
        self.rows.append({"name": name, "ok": ok})


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=torch.bfloat16)


def ae_rows(cfg: dict, args: argparse.Namespace, device: torch.device, table: Table) -> None:
    ae = build_autoencoder(cfg).to(device).train()
    ae.set_grad_checkpointing(bool(cfg["ae_train"].get("activation_checkpointing")))
    dcfg = cfg["autoencoder"]["discriminator"]
    disc = build_discriminator(dcfg, ae.channels).to(device)
    lpips = build_lpips(cfg["autoencoder"]["lpips"]["net"], "random").to(device)
    size, B = cfg["data"]["image_size"], args.ae_batch
    x = torch.rand(B, 3, size, size, device=device)
    vit = ae.encoder.vit
    g = torch.Generator(device=device).manual_seed(0)
    params = [p for p in ae.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=True)
    d_opt = torch.optim.AdamW([p for p in disc.parameters() if p.requires_grad], lr=1e-5,
                              fused=True)

    def stage1_step() -> None:
        with autocast(device):
            z, rec = ae(x)
            rec_loss = (rec.float() - x).abs().mean() + lpips(rec.float(), x).mean()
            loss = rec_loss + 0.5 * alignment_loss(z, ae.teacher_tokens(x))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def stage2_step() -> None:
        with autocast(device):
            z, rec = ae(x)
            rec_loss = (rec.float() - x).abs().mean() + lpips(rec.float(), x).mean()
            align = alignment_loss(z, ae.teacher_tokens(x))
            disc.requires_grad_(False)
            g_gan = g_hinge_loss(disc_logits(disc, rec, dcfg, vit, g))
            lam = adaptive_weight(rec_loss, g_gan, ae.decoder.last_layer, 1e4)
            loss = rec_loss + 0.5 * align + 0.5 * lam * g_gan
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        disc.requires_grad_(True)
        with autocast(device):
            d_loss = d_hinge_loss(*disc_logits(disc, torch.cat([x, rec.detach()]), dcfg, vit,
                                               g).split(B))
        d_loss.backward()
        d_opt.step()
        d_opt.zero_grad(set_to_none=True)

    with torch.no_grad():  # the reconstruction, bf16 autocast against fp32, eval mode
        ae.eval()
        ref = ae(x)[1].float()
        with autocast(device):
            low = ae(x)[1].float()
        ae.train()
    err = rel_err(low, ref)
    table.row("AE stage-1 step (stem+decoder)", B, B, stage1_step, args.warmup, args.iters, err)
    table.row("AE stage-2 step (G + D)", B, B, stage2_step, args.warmup, args.iters)
    assert all(p.grad is None for p in vit.parameters()), "gradient reached the frozen ViT"
    if args.ae_parts:
        ae_part_rows(ae, disc, lpips, x, g, dcfg, args, device, table)

    enc_b = args.encode_batch
    xe = torch.rand(enc_b, 3, size, size, device=device)
    ae.eval()
    with torch.no_grad():
        ref = ae.encode_unit(xe)[0]
        with autocast(device):
            low = ae.encode_unit(xe)[0]
    err = rel_err(low, ref)
    passes = 2 if cfg["latents"].get("flip") else 1
    table.row(f"encode_unit fp32, {passes} pass{'es' if passes > 1 else ''} (flip)", enc_b, enc_b,
              lambda: [ae.encode_unit(xe if f == 0 else xe.flip(-1)) for f in range(passes)],
              args.warmup, args.iters)

    def encode_bf16() -> None:
        with autocast(device):
            ae.encode_unit(xe)

    table.row("encode_unit bf16 autocast (1 pass)", enc_b, enc_b, encode_bf16, args.warmup,
              args.iters, err)


def ae_part_rows(ae: torch.nn.Module, disc: torch.nn.Module, lpips: torch.nn.Module,
                 x: torch.Tensor, g: torch.Generator, dcfg: dict,
                 args: argparse.Namespace,
                 device: torch.device, table: Table) -> None:
    """Forward + backward of each autoencoder part alone (where a stage's time goes)."""
    B, vit = len(x), ae.encoder.vit
    z0 = torch.randn(B, ae.grid[0] * ae.grid[1], ae.channels, device=device)

    def stem() -> None:
        with autocast(device):
            y = ae.encoder.stem(ae.encoder.normalize(x))
        y.float().square().mean().backward()

    def encoder() -> None:
        with autocast(device):
            z = ae.encode(x)
        z.float().square().mean().backward()

    def teacher() -> None:
        with torch.no_grad(), autocast(device):
            ae.teacher_tokens(x)

    def decoder() -> None:
        with autocast(device):
            y = ae.decode(z0)
        y.float().square().mean().backward()

    def disc_fb() -> None:
        xr = x.clone().requires_grad_(True)
        with autocast(device):
            logits = disc_logits(disc, xr, dcfg, vit, g)
        logits.float().mean().backward()

    def perceptual() -> None:
        xr = x.clone().requires_grad_(True)
        with autocast(device):
            d = lpips(xr, x.flip(0), normalize=True)
        d.float().mean().backward()

    parts = [("  stem fwd+bwd", stem), ("  encoder (stem+ViT) fwd+bwd", encoder),
             ("  teacher fwd", teacher), ("  decoder fwd+bwd", decoder),
             ("  LPIPS fwd+bwd", perceptual), ("  discriminator fwd+bwd (+DiffAug)", disc_fb)]
    for name, fn in parts:
        table.row(name, B, B, fn, args.warmup, args.iters)
    ae.zero_grad(set_to_none=True)
    disc.zero_grad(set_to_none=True)


def dit_rows(cfg: dict, args: argparse.Namespace, device: torch.device, table: Table,
             grid: tuple[int, int], channels: int) -> None:
    dc = cfg["dit"]
    T, K = grid[0] * grid[1], args.classes
    r, alpha = math.sqrt(channels), rfm.alpha_for(T, channels)
    config = {"dit": dc, "tokens": T, "channels": channels, "num_classes": K, "grid": list(grid)}
    torch.manual_seed(0)
    model = dit_from_config(config).to(device)
    with torch.no_grad():  # adaLN-zero init gives a zero output: nothing for the bf16 check
        for q in model.parameters():
            if not q.any():
                q.normal_(0.0, 0.02)
    opt = torch.optim.AdamW(model.parameters(), lr=dc["lr"], betas=tuple(dc["betas"]),
                            fused=True)
    B = args.dit_batch
    g = torch.Generator(device=device).manual_seed(0)
    z0 = sphere.project(torch.randn(B, T, channels, device=device), r)  # data on the sphere
    y = torch.randint(0, K, (B,), device=device, generator=g)
    z1, t, yd = draw_inputs(z0, y, g, r=r, alpha=alpha, path=dc["path"],
                            label_dropout=dc["label_dropout"], null_class=K)
    amp = device.type == "cuda"

    def step() -> None:
        # train_step's autocast is CUDA's; on CPU the outer one makes the same bf16 step
        with autocast(device) if not amp else contextlib.nullcontext():
            train_step(model, opt, z0, z1, t, yd, r=r, path=dc["path"],
                       lambda_rad=dc["lambda_rad"], grad_clip=dc["grad_clip"], amp=amp)

    zt, _ = rfm.point_and_target(z0, z1, t, r, dc["path"])
    with torch.no_grad():
        ref = model(zt, t, yd).float()
        with autocast(device):
            low = model(zt, t, yd).float()
    name = f"DiT-{dc['model']} train step ({grid[0]}x{grid[1]}x{channels})"
    table.row(name, B, B, step, args.warmup, args.iters, rel_err(low, ref))

    sc = cfg["sample"]
    model.eval().requires_grad_(False)
    S, steps, scale = args.sample_batch, args.sample_steps, float(sc["cfg_scale"])
    labels = torch.arange(S, device=device) % K
    noise = rfm.noise((S, T, channels), r, dc["path"], torch.Generator(device=device)
                      .manual_seed(1), device=device)

    def sample(low_precision: bool) -> torch.Tensor:
        outer = autocast(device) if low_precision and not amp else contextlib.nullcontext()
        with outer:
            return rfm.sample(model, labels, steps, scale, r, alpha, z1=noise, path=dc["path"],
                              amp=low_precision and amp,
                              guidance_interval=tuple(sc["guidance_interval"]))

    err = rel_err(sample(True), sample(False))
    table.row(f"sampling ({steps} steps, cfg {scale:g})", S, S, lambda: sample(True),
              min(args.warmup, 1), max(1, args.iters // 2), err)


def loop_overhead(cfg: dict, args: argparse.Namespace, device: torch.device,
                  grid: tuple[int, int], channels: int) -> None:
    """The DiT training loop's own time beyond train_step (bench/dit_loop.py), uncompiled so
    that the session's minutes go to measuring; target <= 5%."""
    from dit_loop import overhead  # bench/dit_loop.py, beside this script

    c = copy.deepcopy(cfg)
    c["dit"]["compile"] = False
    m = overhead(c, device, grid[0], channels, args.classes, args.dit_batch,
                 steps=args.iters + 2, warmup=args.warmup)
    parts = ", ".join(f"{k} {1e3 * m[k]:.1f} ms" for k in ("read", "ema", "checkpoints", "other")
                      if k in m)
    print(f"DiT loop overhead: {100 * (m['loop'] / m['step'] - 1):.2f}% of train_step "
          f"({m['loop']:.4f} s/step in the loop, {m['step']:.4f} s in train_step; {parts}; "
          f"batch {args.dit_batch}, {args.iters + 2} steps after {args.warmup})")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=None, help=f"default {PAPER.relative_to(ROOT)}; "
                   f"--cpu-smoke: {TINY.name}")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="every row on CPU at the tiny config's sizes (checks the script)")
    p.add_argument("--gpu", default=None, help="dinosae/gpus.yaml key (default: by name)")
    p.add_argument("--ae-batch", type=int, default=None, help="default 32 (smoke 4)")
    p.add_argument("--encode-batch", type=int, default=None, help="default 256 (smoke 8)")
    p.add_argument("--dit-batch", type=int, default=None, help="default 256 (smoke 8)")
    p.add_argument("--sample-batch", type=int, default=None, help="default 250 (smoke 4)")
    p.add_argument("--sample-steps", type=int, default=None, help="default 10 (smoke 2)")
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--iters", type=int, default=None, help="timed calls per row (default 5/2)")
    p.add_argument("--warmup", type=int, default=None, help="default 2 (smoke 1)")
    p.add_argument("--tol", type=float, default=0.05,
                   help="largest relative error of bf16 autocast against fp32")
    p.add_argument("--ae-parts", action="store_true", help="also each autoencoder part alone")
    p.add_argument("--skip", nargs="*", default=[], choices=["ae", "dit"])
    args = p.parse_args()
    smoke = args.cpu_smoke
    defaults = {"ae_batch": (32, 2), "encode_batch": (256, 8), "dit_batch": (256, 8),
                "sample_batch": (250, 4), "sample_steps": (10, 2), "iters": (5, 2),
                "warmup": (2, 1)}
    for k, (gpu_v, cpu_v) in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, cpu_v if smoke else gpu_v)
    if smoke:
        device = torch.device("cpu")
        torch.set_num_threads(min(2, torch.get_num_threads()))
        peak, what = cpu_peak_flops(), "this CPU's measured fp32 matmul rate"
    elif not torch.cuda.is_available():
        print("no CUDA: nothing to check on this machine (run it where a GPU is available, or "
              "--cpu-smoke)")
        return 0
    else:
        device = torch.device("cuda")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        key, peak = gpu_peak(torch.cuda.get_device_name(device), args.gpu)
        what = f"{key} dense bf16 (dinosae/gpus.yaml)"
    config = args.config or (TINY if smoke else PAPER)
    cfg = copy.deepcopy(load_config(config, None, args.set, check_paths=False))
    cfg["autoencoder"]["teacher"]["weights"] = "random"
    cfg["autoencoder"]["lpips"]["weights"] = "random"
    if "weights" in cfg["autoencoder"]["discriminator"]:
        cfg["autoencoder"]["discriminator"]["weights"] = "random"
    if smoke:
        args.classes = min(args.classes, 10)
    torch.manual_seed(0)
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {device} ({dev_name}), torch {torch.__version__}, config {config}, "
          f"{cfg['data']['image_size']} px, "
          f"MFU against {peak / 1e12:.3g} TFLOP/s ({what})")
    table = Table(device, peak, args.tol)
    probe = build_autoencoder(cfg, load_teacher_weights=False)
    grid, channels = tuple(probe.grid), probe.channels
    del probe
    if "ae" not in args.skip:
        ae_rows(cfg, args, device, table)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if "dit" not in args.skip:
        dit_rows(cfg, args, device, table, grid, channels)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        loop_overhead(cfg, args, device, grid, channels)
    bad = [r["name"] for r in table.rows if not r["ok"]]
    if bad:
        print(f"bf16 autocast differs from fp32 by more than {args.tol:g}: {', '.join(bad)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
