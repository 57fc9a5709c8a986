"""DiT training step, ours next to the reference LightningDiT code, side by side in one process.

    PYTHONPATH=$PWD:/tmp/refdeps python bench/dit_step.py --reference /tmp/ref/LightningDiT
    python bench/dit_step.py --sizes B --depth 12 --batch 8           # ours only (no reference)
    python bench/dit_step.py --profile B                               # where our step's time goes
    PYTHONPATH=$PWD:/tmp/refdeps python bench/dit_step.py --reference /tmp/ref/LightningDiT \
        --compiled --sizes B                          # compiled, as each code runs at scale

Both columns train the same network (hustvl/LightningDiT: SwiGLU, RMSNorm, 2-D RoPE, qkv bias,
adaLN-zero, patch size 1, sinusoidal time embedding) at the same size, on the same (B, T, C)
batch, so both do the same matrix FLOPs. A step is what each code's training loop does per
batch:

* ours: dinosae.train.dit.draw_inputs + train_step (slerp path, forward, fp32 RFM loss,
  backward, clip, AdamW) + train.loop.ema_update;
* reference: its transport's linear path, forward (B, C, H, W), MSE to the velocity, backward,
  clip_grad_norm_, torch AdamW (betas 0.9/0.95, weight decay 0) and its train.py's update_ema.

The reference directory is a checkout of hustvl/LightningDiT (its `models/` is imported; it needs
`einops`: put `pip install --target /tmp/refdeps einops` on PYTHONPATH for the bench only);
without `--reference` (or when the path is absent) that column is skipped. Its modules that the
model never uses (fairscale in models/rmsnorm.py) are stubbed, and its `@torch.compile`
decorators are disabled (TORCHDYNAMO_DISABLE=1) so both run eagerly.

`--compiled` compares the two as their users run them at scale: ours with `torch.compile` of the
whole network (what `dit.compile: true` does in train-dit), the reference with its own
`@torch.compile` decorators on (modulate, the time embedder, each block, the final layer, the
SwiGLU FFN). Warm-up steps then include the compilation; only the timed steps count.

The two are timed alternately (ours, ref, ours, ref, ...) and the medians are reported, so that
other jobs on a shared machine slow both alike; the ratio column is ours / reference. `--depth`
overrides the number of blocks (the per-block cost is what differs; XL's 28 blocks do not fit
twice into a small machine's memory with optimizer and EMA).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import sys
import time
from collections import OrderedDict
from pathlib import Path

if "--compiled" not in sys.argv:  # hustvl decorates forwards with torch.compile
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import torch  # noqa: E402
from reference_stubs import stub_missing  # noqa: E402

from dinosae import rfm  # noqa: E402
from dinosae.models.dit import SIZES, LightningDiT  # noqa: E402
from dinosae.train.dit import draw_inputs, train_step  # noqa: E402
from dinosae.train.loop import ema_update  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Ours:
    """dinosae's step on dinosae's LightningDiT."""

    def __init__(self, hidden: int, depth: int, heads: int, args: argparse.Namespace,
                 device: torch.device) -> None:
        g = args.grid
        self.T, self.C, self.K = g * g, args.channels, args.classes
        self.R, self.alpha = math.sqrt(self.C), rfm.alpha_for(self.T, self.C)
        torch.manual_seed(0)
        self.model = LightningDiT(self.T, self.C, self.K, (g, g), hidden, depth, heads,
                                  time_embed="sinusoidal").to(device)
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.net = torch.compile(self.model) if args.compiled else self.model  # as train-dit
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, betas=(0.9, 0.95),
                                     weight_decay=0.0, fused=args.fused or None)
        self.gen = torch.Generator(device=device).manual_seed(0)
        self.z0 = rfm.noise((args.batch, self.T, self.C), self.R, "rfm", self.gen, device=device)
        self.y = torch.randint(0, self.K, (args.batch,), device=device, generator=self.gen)
        self.amp = device.type == "cuda"

    def step(self) -> None:
        z1, t, y = draw_inputs(self.z0, self.y, self.gen, r=self.R, alpha=self.alpha, path="rfm",
                               label_dropout=0.1, null_class=self.K)
        res = train_step(self.net, self.opt, self.z0, z1, t, y, r=self.R, path="rfm",
                         lambda_rad=0.1, grad_clip=1.0, amp=self.amp)
        if res["ok"]:
            ema_update(self.ema, self.model, 0.9995)


class Reference:
    """hustvl/LightningDiT's model, with its train.py's loss, clip, AdamW and EMA."""

    def __init__(self, root: Path, hidden: int, depth: int, heads: int,
                 args: argparse.Namespace, device: torch.device) -> None:
        stub_missing()
        if str(root) not in sys.path:
            sys.path.insert(0, str(root))
        from models.lightningdit import LightningDiT as RefDiT

        g, C = args.grid, args.channels
        torch.manual_seed(0)
        self.model = RefDiT(input_size=g, patch_size=1, in_channels=C, hidden_size=hidden,
                            depth=depth, num_heads=heads, class_dropout_prob=0.1,
                            num_classes=args.classes, use_qknorm=False, use_swiglu=True,
                            use_rope=True, use_rmsnorm=True).to(device)
        self.model.train()
        self.ema = copy.deepcopy(self.model).requires_grad_(False)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0,
                                     betas=(0.9, 0.95))
        gen = torch.Generator(device=device).manual_seed(0)
        self.x1 = torch.randn(args.batch, C, g, g, device=device, generator=gen)
        self.y = torch.randint(0, args.classes, (args.batch,), device=device, generator=gen)
        self.amp = device.type == "cuda"

    @torch.no_grad()
    def update_ema(self, decay: float = 0.9995) -> None:  # the reference train.py's loop
        ema_params = OrderedDict(self.ema.named_parameters())
        for name, param in OrderedDict(self.model.named_parameters()).items():
            ema_params[name].mul_(decay).add_(param.data, alpha=1 - decay)

    def step(self) -> None:
        x1 = self.x1
        x0 = torch.randn_like(x1)
        t = torch.rand(x1.shape[0], device=x1.device)
        tt = t.view(-1, 1, 1, 1)
        xt, ut = tt * x1 + (1 - tt) * x0, x1 - x0  # its Transport, linear path
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp):
            out = self.model(xt, t, self.y)
        loss = ((out.float() - ut) ** 2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.update_ema()


def timed(fn, device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def bench_size(size: str, args: argparse.Namespace, device: torch.device) -> dict:
    hidden, depth, heads = SIZES[size]
    depth = args.depth or depth
    ours = Ours(hidden, depth, heads, args, device)
    ref = Reference(args.reference, hidden, depth, heads, args, device) if args.reference \
        else None
    runners = [("ours", ours)] + ([("ref", ref)] if ref else [])
    for _ in range(args.warmup):
        for _, r in runners:
            r.step()
    times: dict[str, list[float]] = {name: [] for name, _ in runners}
    for i in range(args.steps):
        order = runners if i % 2 == 0 else runners[::-1]  # alternate who goes first
        for name, r in order:
            times[name].append(timed(r.step, device))
    row = {"size": f"{size}/d{depth}",
           "params_M": sum(p.numel() for p in ours.model.parameters()) / 1e6,
           "ours": statistics.median(times["ours"])}
    if ref:
        row["ref"] = statistics.median(times["ref"])
        ref_params = sum(p.numel() for p in ref.model.parameters()) / 1e6
        row["params_ref_M"] = ref_params
    return row


def profile(size: str, args: argparse.Namespace, device: torch.device) -> None:
    """torch.profiler table of our step (self CPU/CUDA time per op)."""
    from torch.profiler import ProfilerActivity, record_function
    from torch.profiler import profile as tprofile

    hidden, depth, heads = SIZES[size]
    ours = Ours(hidden, args.depth or depth, heads, args, device)
    ours.step()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with tprofile(activities=acts) as prof:
        for _ in range(args.steps):
            with record_function("step"):
                ours.step()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=args.rows))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reference", type=Path, default=None,
                   help="hustvl/LightningDiT checkout (its models/ directory is imported)")
    p.add_argument("--sizes", nargs="+", default=["B", "XL"], choices=list(SIZES))
    p.add_argument("--depth", type=int, default=None, help="blocks (default: the size's)")
    p.add_argument("--grid", type=int, default=16, help="token grid side")
    p.add_argument("--channels", type=int, default=1024, help="token channels C")
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=6, help="timed steps per column (median)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--fused", action=argparse.BooleanOptionalAction, default=True,
                   help="our AdamW fused (as the training loop), or torch's default")
    p.add_argument("--compiled", action="store_true",
                   help="ours under torch.compile, the reference with its @torch.compile on")
    p.add_argument("--profile", metavar="SIZE", default=None,
                   help="print a torch.profiler table of our step at this size instead")
    p.add_argument("--rows", type=int, default=30)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.reference is not None and not (args.reference / "models" / "lightningdit.py").is_file():
        print(f"no reference checkout at {args.reference}: reference column skipped")
        args.reference = None
    if args.profile:
        profile(args.profile, args, device)
        return
    rows = [bench_size(s, args, device) for s in args.sizes]
    print(f"device {device}, threads {torch.get_num_threads()}, {args.grid}x{args.grid} tokens x "
          f"{args.channels} ch, batch {args.batch}, median of {args.steps} steps, alternating, "
          f"{'compiled' if args.compiled else 'eager'}")
    print(f"{'size':>8} {'params(M)':>10} {'ours s':>8} {'ref s':>8} {'ours/ref':>9} "
          f"{'ours img/s':>11}")
    for r in rows:
        ref = r.get("ref")
        print(f"{r['size']:>8} {r['params_M']:>10.1f} {r['ours']:>8.3f} "
              f"{ref if ref else float('nan'):>8.3f} "
              f"{r['ours'] / ref if ref else float('nan'):>9.2f} "
              f"{args.batch / r['ours']:>11.2f}")


if __name__ == "__main__":
    main()
