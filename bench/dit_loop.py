"""DiT training-loop overhead: what the loop costs beyond forward, backward and the optimizer.

    PYTHONPATH=$PWD python bench/dit_loop.py                         # S and B, 16x16x1024, CPU
    PYTHONPATH=$PWD python bench/dit_loop.py --sizes XL --batch 64 --device cuda

bench/gpu_check.py prints the same measurement for the paper config's DiT on the GPU.

Runs the real loop, `dinosae.train.dit.train_dit`, on a latent cache of the given token shape
(random unit tokens in the cache's zarr layout, read by the real `LatentCache` reader), and
times, in the same run, what happens inside `train_step` (forward with the path and the loss,
backward, clipping, the one host sync, AdamW) against the whole loop. Everything else is the
overhead: reading and moving the batch, projecting it, drawing noise/times/labels, the LR, EMA,
metrics, progress and checkpoint bookkeeping. Its parts are timed where the loop calls them
(reader `next`, `ema_update`, `RunCheckpoints.after_step`); the rest is "other". The first
`--warmup` steps (allocations, optimizer state) are not counted.

On CUDA the host waits for the device once per step (inside `train_step`), so the time outside
it is time the device may sit idle: the ratio is the loop's overhead as the issue counts it.
Target: overhead <= 5% of the step.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr

import dinosae.train.dit as train_dit_module
from dinosae import latents
from dinosae.config import load_config
from dinosae.train.loop import RunCheckpoints

ROOT = Path(__file__).resolve().parents[1]


def unit_cache(path: Path, rows: int, grid: int, channels: int, classes: int,
               chunk_rows: int, unit_rows: int) -> latents.LatentCache:
    """A cache of `rows` random unit tokens in the cache's layout (fp16 tokens in zarr shards of
    `unit_rows` rows), opened with the real reader."""
    rng = np.random.default_rng(0)
    g = zarr.open_group(path, mode="w")
    T = grid * grid
    tokens = g.create_array("tokens", shape=(rows, T, channels), dtype="float16",
                            chunks=(chunk_rows, T, channels), shards=(unit_rows, T, channels),
                            compressors=())
    for a in range(0, rows, unit_rows):
        x = rng.standard_normal((min(unit_rows, rows - a), T, channels), dtype=np.float32)
        tokens[a:a + len(x)] = (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float16)
    g.create_array("labels", data=rng.integers(0, classes, rows), chunks=(unit_rows,))
    attrs = {"count": rows, "rows": rows, "chunk_rows": chunk_rows, "unit_rows": unit_rows,
             "flip": False, "grid": [grid, grid], "tokens": T, "channels": channels,
             "num_classes": classes, "mean_norm": 1.0}
    g.attrs.update(attrs)
    return latents.LatentCache(path, g, attrs)


class Clock:
    """Seconds spent inside each timed call, per step, from step `warmup` on."""

    def __init__(self, device: torch.device, warmup: int) -> None:
        self.device, self.warmup = device, warmup
        self.step, self.start, self.end = 0, None, None
        self.inside: dict[str, float] = {}

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def wrap(self, name: str, fn):
        def timed(*a, **kw):
            self.sync()
            t0 = time.perf_counter()
            out = fn(*a, **kw)
            self.sync()
            if self.step >= self.warmup:
                self.inside[name] = self.inside.get(name, 0.0) + time.perf_counter() - t0
            return out
        return timed


class TimedCache:
    """The reader, with the time spent getting each batch counted as "read"."""

    def __init__(self, cache: latents.LatentCache, clock: Clock) -> None:
        self.cache, self.clock = cache, clock
        self.attrs, self.path = cache.attrs, cache.path

    def __len__(self) -> int:
        return len(self.cache)

    def batches(self, *a, **kw):
        it = self.cache.batches(*a, **kw)
        get = self.clock.wrap("read", lambda: next(it, None))
        while True:
            if self.clock.step == self.clock.warmup and self.clock.start is None:
                self.clock.sync()  # the counted window opens with the first counted read
                self.clock.start = time.perf_counter()
            if (batch := get()) is None:
                return
            yield batch


def run(cfg: dict, cache: latents.LatentCache, out: Path, device: torch.device, warmup: int
        ) -> dict:
    """One train_dit run with the loop's parts timed; seconds per counted step."""
    clock = Clock(device, warmup)
    step_fn, ema_fn, after = (train_dit_module.train_step, train_dit_module.ema_update,
                              RunCheckpoints.after_step)

    def after_step(self, done, state, stop=None):
        clock.wrap("checkpoints", after)(self, done, state, stop)
        clock.step = done
        if done == cfg["dit"]["steps"]:
            clock.sync()
            clock.end = time.perf_counter()

    train_dit_module.train_step = clock.wrap("step", step_fn)
    train_dit_module.ema_update = clock.wrap("ema", ema_fn)
    RunCheckpoints.after_step = after_step
    try:
        train_dit_module.train_dit(cfg, TimedCache(cache, clock), None, out, force=True)
    finally:
        train_dit_module.train_step, train_dit_module.ema_update = step_fn, ema_fn
        RunCheckpoints.after_step = after
    n = cfg["dit"]["steps"] - warmup
    loop = (clock.end - clock.start) / n
    parts = {k: v / n for k, v in clock.inside.items()}
    parts["other"] = loop - sum(parts.values())
    return {"loop": loop, **parts}


def overhead(cfg: dict, device: torch.device, grid: int, channels: int, classes: int,
             batch: int, steps: int, warmup: int, unit_rows: int = 64, chunk_rows: int = 2
             ) -> dict:
    """train_dit with `cfg`'s DiT (dit.model, head, switches, compile...) for warmup + steps
    steps on a fresh random cache; seconds per counted step: loop, step and the parts."""
    total = warmup + steps
    cfg = copy.deepcopy(cfg)
    cfg["device"] = device.type
    cfg["dit"].update(steps=total, batch_size=batch, warmup_steps=0, log_every=1,
                      image_every=total + 1, ckpt_every=total + 1)
    with tempfile.TemporaryDirectory(prefix="bench_dit_loop_") as tmp_name:
        tmp = Path(tmp_name)
        cache = unit_cache(tmp / "cache.zarr", max(4 * unit_rows, total * batch), grid,
                           channels, classes, chunk_rows, unit_rows)
        return run(cfg, cache, tmp / "run", device, warmup)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", nargs="+", default=["S", "B"])
    p.add_argument("--grid", type=int, default=16)
    p.add_argument("--channels", type=int, default=1024)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=8, help="counted steps per run")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--chunk-rows", type=int, default=2, help="paper: 2 rows per zarr chunk")
    p.add_argument("--unit-rows", type=int, default=64)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    load0 = os.getloadavg()[0]
    rows_out = []
    for size in args.sizes:
        cfg = load_config(ROOT / "config.yaml", None, [f"dit.model={size}"], check_paths=False)
        results = [overhead(cfg, device, args.grid, args.channels, args.classes, args.batch,
                            args.steps, args.warmup, args.unit_rows, args.chunk_rows)
                   for _ in range(args.repeats)]
        rows_out.append((size, {k: statistics.median(r[k] for r in results) for k in results[0]}))

    print(f"\nDiT loop overhead: device {device}, threads {torch.get_num_threads()}, "
          f"{args.grid}x{args.grid}x{args.channels} tokens, batch {args.batch}, {args.steps} "
          f"counted steps (after {args.warmup}), median of {args.repeats} runs, load average "
          f"{load0:.2f} -> {os.getloadavg()[0]:.2f}\n")
    head = ("size", "loop s/step", "train_step s", "read ms", "ema ms", "checkpoints ms",
            "other ms", "overhead")
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("-" * (len(h) + 2) for h in head) + "|")
    for size, m in rows_out:
        cells = (size, f"{m['loop']:.3f}", f"{m['step']:.3f}", f"{1e3 * m.get('read', 0):.1f}",
                 f"{1e3 * m.get('ema', 0):.1f}", f"{1e3 * m.get('checkpoints', 0):.1f}",
                 f"{1e3 * m['other']:.1f}", f"{m['loop'] / m['step'] - 1:.2%}")
        print("| " + " | ".join(c.rjust(len(h)) for c, h in zip(cells, head, strict=True)) + " |")


if __name__ == "__main__":
    main()
