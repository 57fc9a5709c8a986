"""DiT training-step throughput: images/s and achieved FLOP/s next to this machine's own matmul
FLOP/s, measured in the same run.

    .venv/bin/python bench/dit_step.py                       # tiny and B, CPU, default grid
    .venv/bin/python bench/dit_step.py --sizes tiny --grid 16 16 --channels 1024 --device cuda

A step = the real train_step (slerp path, forward, fp32 RFM loss, backward, clip, AdamW).
Times are medians over steps (other jobs share the machine). FLOPs are counted by
torch.utils.flop_counter.FlopCounterMode over one step (matmuls and attention, forward and
backward; elementwise work is not counted), so the ratio to the matmul peak is the fraction of
the machine the network's matrix work achieves. Where the attention kernel has no flop formula
(CPU SDPA), its matmul FLOPs are added analytically (column "attention": added).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from dinosae import rfm
from dinosae.models.dit import build_dit
from dinosae.train.dit import draw_inputs, train_step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_flops(device: torch.device, n: int, dtype: torch.dtype, seconds: float = 2.0) -> float:
    """Achieved FLOP/s of an n×n×n matmul on this device (the machine's practical peak)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    times, start = [], time.perf_counter()
    while time.perf_counter() - start < seconds or len(times) < 5:
        t0 = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times)


def bench_size(size: str, args: argparse.Namespace, device: torch.device) -> dict:
    grid = tuple(args.grid)
    T, C, K, B = grid[0] * grid[1], args.channels, args.classes, args.batch
    R, alpha = math.sqrt(C), rfm.alpha_for(T, C)
    torch.manual_seed(0)
    model = build_dit(size, T, C, K, grid).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95))
    gen = torch.Generator(device=device).manual_seed(0)
    z0 = rfm.noise((B, T, C), R, "rfm", gen, device=device)
    y = torch.randint(0, K, (B,), device=device, generator=gen)
    amp = device.type == "cuda"

    def step() -> None:
        z1, t, yy = draw_inputs(z0, y, gen, r=R, alpha=alpha, path="rfm", label_dropout=0.1,
                                null_class=K)
        train_step(model, opt, z0, z1, t, yy, r=R, path="rfm", lambda_rad=0.1, grad_clip=1.0,
                   amp=amp)

    for _ in range(args.warmup):
        step()
    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    counted = {str(op) for op in counter.get_flop_counts()["Global"]}
    attn_missing = not any("attention" in op for op in counted)
    if attn_missing:  # CPU SDPA kernels have no flop formula: QKᵀ and AV, forward + backward
        hidden, depth = model.hidden, len(model.blocks)
        flops += 3 * depth * 2 * (2 * B * T * T * hidden)
    times = []
    for _ in range(args.steps):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    dt = statistics.median(times)  # robust to other jobs on a shared machine
    return {"size": size, "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
            "step_s": dt, "img_per_s": B / dt, "gflop_step": flops / 1e9,
            "achieved": flops / dt, "attn": "added" if attn_missing else "counted"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", nargs="+", default=["tiny", "B"])
    p.add_argument("--grid", type=int, nargs=2, default=[4, 4], help="token grid (h w)")
    p.add_argument("--channels", type=int, default=192, help="token channels C")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=5, help="timed steps (the median is reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--matmul-n", type=int, default=1024)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    mm_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    peak = matmul_flops(device, args.matmul_n, mm_dtype)
    rows = [bench_size(s, args, device) for s in args.sizes]
    peak_after = matmul_flops(device, args.matmul_n, mm_dtype)

    print(f"device {device}, threads {torch.get_num_threads()}, grid {args.grid[0]}x"
          f"{args.grid[1]} tokens x {args.channels} ch, batch {args.batch}, "
          f"median of {args.steps} timed steps")
    print(f"matmul {args.matmul_n}^3 {str(mm_dtype).replace('torch.', '')}: "
          f"{peak / 1e9:.1f} GFLOP/s before, {peak_after / 1e9:.1f} GFLOP/s after the steps")
    ref = max(peak, peak_after)
    print(f"{'size':>5} {'params(M)':>10} {'GFLOP/step':>11} {'s/step':>8} {'img/s':>8} "
          f"{'GFLOP/s':>9} {'/matmul':>8} {'attention':>10}")
    for r in rows:
        print(f"{r['size']:>5} {r['params_M']:>10.2f} {r['gflop_step']:>11.2f} "
              f"{r['step_s']:>8.3f} {r['img_per_s']:>8.1f} {r['achieved'] / 1e9:>9.1f} "
              f"{r['achieved'] / ref:>8.2f} {r['attn']:>10}")


if __name__ == "__main__":
    main()
