"""Sampling throughput: samples/s of dinosae.rfm.sample, and the sampler's own work (integrator,
CFG mixing, projection) as a fraction of the network's time per step.

    PYTHONPATH=$PWD python bench/sample.py                      # B, 16x16x1024, CPU, 2 threads
    PYTHONPATH=$PWD python bench/sample.py --sizes XL --device cuda --batch 64

The network is wrapped in a timer (synchronised on CUDA), so one run gives both: the time inside
the network calls and the rest of the sampler's time. Runs with and without guidance are
alternated; medians over `--repeats` runs.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from dinosae import rfm
from dinosae.models.dit import SIZES, LightningDiT


class Timed(torch.nn.Module):
    """The network, with the seconds spent inside it accumulated."""

    def __init__(self, net: torch.nn.Module, device: torch.device) -> None:
        super().__init__()
        self.net, self.device, self.seconds = net, device, 0.0
        self.tokens, self.channels, self.num_classes = net.tokens, net.channels, net.num_classes

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        sync(self.device)
        t0 = time.perf_counter()
        out = self.net(x, t, y)
        sync(self.device)
        self.seconds += time.perf_counter() - t0
        return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(model: Timed, args: argparse.Namespace, cfg: float, integrator: str,
        device: torch.device) -> tuple[float, float]:
    """(total seconds, network seconds) of one sampling run."""
    labels = torch.arange(args.batch, device=device) % model.num_classes
    gen = torch.Generator(device=device).manual_seed(0)
    model.seconds = 0.0
    sync(device)
    t0 = time.perf_counter()
    rfm.sample(model, labels, args.steps, cfg, math.sqrt(model.channels),
               rfm.alpha_for(model.tokens, model.channels), gen, amp=device.type == "cuda",
               integrator=integrator)
    sync(device)
    return time.perf_counter() - t0, model.seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", nargs="+", default=["B"], choices=list(SIZES))
    p.add_argument("--depth", type=int, default=None, help="blocks (default: the size's)")
    p.add_argument("--grid", type=int, default=16)
    p.add_argument("--channels", type=int, default=1024)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=4, help="sampler steps per run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"device {device}, threads {torch.get_num_threads()}, {args.grid}x{args.grid} tokens x "
          f"{args.channels} ch, batch {args.batch}, {args.steps} steps, median of "
          f"{args.repeats}, settings alternated")
    print(f"{'size':>8} {'cfg':>4} {'integrator':>14} {'samples/s':>10} {'net s/step':>11} "
          f"{'sampler s/step':>15} {'sampler/net':>12}")
    for size in args.sizes:
        hidden, depth, heads = SIZES[size]
        depth = args.depth or depth
        g = args.grid
        net = LightningDiT(g * g, args.channels, args.classes, (g, g), hidden, depth, heads)
        model = Timed(net.to(device).eval().requires_grad_(False), device)
        settings = [(1.0, "euler_project"), (4.0, "euler_project"), (4.0, "expmap")]
        results: dict = {s: [] for s in settings}
        run(model, args, 4.0, "euler_project", device)  # warm-up
        for i in range(args.repeats):
            for s in (settings if i % 2 == 0 else settings[::-1]):
                results[s].append(run(model, args, *s, device))
        for (cfg, integ), rs in results.items():
            total = statistics.median(r[0] for r in rs)
            net_s = statistics.median(r[1] for r in rs)
            own = statistics.median(r[0] - r[1] for r in rs)
            print(f"{size + '/d' + str(depth):>8} {cfg:>4.1f} {integ:>14} "
                  f"{args.batch / total:>10.3f} {net_s / args.steps:>11.4f} "
                  f"{own / args.steps:>15.4f} {own / net_s:>12.3f}")


if __name__ == "__main__":
    main()
