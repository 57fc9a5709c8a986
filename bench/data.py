"""Data benchmark: sharding images/s, and the shard loader against a torchvision ImageFolder +
DataLoader baseline on the original JPEGs (same transforms, batch size and worker count).

    .venv/bin/python bench/data.py [--root ../shared/imagenet-sample] [--workers 2]

Both loaders run in steady state: files in the page cache, workers started and warmed up, and
no epoch restarts (ours is `infinite_batches`; the baseline samples one long epoch, as on
ImageNet, where a 3-batch epoch of the sample would idle a worker at each restart). Rounds
alternate between the two so that other load on the machine hits both alike, each starting
with the other's workers idle; the table gives the median round's images/s, and CPU time per
image summed over the main process and workers (load-independent, up to cache sharing).
Without --root and without ../shared/imagenet-sample, the embedded dataset is built and used.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import logging
import multiprocessing
import os
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import yaml
from torch.utils.data import DataLoader, RandomSampler
from torchvision import datasets, transforms

from dinosae.data.loader import infinite_batches
from dinosae.data.mini import build_mini_dataset
from dinosae.data.shard import shard_split

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SAMPLE = ROOT.parent / "shared" / "imagenet-sample"


def cpu_seconds() -> float:
    """CPU time of this process and its live children (the loaders' workers; idle ones add
    nothing), from /proc."""
    total = time.process_time()
    for child in multiprocessing.active_children():
        try:
            stat = Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")
    return total


def settle(timeout: float = 30.0) -> None:
    """Wait for the workers to go idle (their prefetch queues full)."""
    end, last = time.monotonic() + timeout, cpu_seconds()
    while time.monotonic() < end:
        time.sleep(0.1)
        if (now := cpu_seconds()) - last < 0.005:
            return
        last = now


def timed(batches: Iterator, n_batches: int, queued: int) -> tuple[float, float]:
    """(images/s, CPU us per image) of the next n_batches. The clock starts once the `queued`
    batches prefetched while idle are taken; the CPU time counts every batch taken, up to the
    workers' refilling the queue afterwards."""
    settle()
    c0, n = cpu_seconds(), 0
    for images, _ in itertools.islice(batches, queued):
        n += images.shape[0]
    t0, n_queued = time.perf_counter(), n
    for images, _ in itertools.islice(batches, n_batches):
        n += images.shape[0]
    rate = (n - n_queued) / (time.perf_counter() - t0)
    settle()
    return rate, (cpu_seconds() - c0) / n * 1e6


def read_all(folder: Path) -> None:
    """Into the page cache."""
    for path in folder.rglob("*"):
        if path.is_file():
            path.read_bytes()


def bench_size(cfg: dict, root: Path, split: str, size: int, args, tmp: Path) -> dict:
    cfg = copy.deepcopy(cfg)
    cfg["data"].update(root=str(root), image_size=size, workers=args.workers)
    out = tmp / f"shards{size}"
    t0 = time.perf_counter()
    manifest = shard_split(cfg, split, out)
    shard_rate = manifest["count"] / (time.perf_counter() - t0)
    read_all(out)
    read_all(root / split)

    ours = infinite_batches(out, args.batch_size, workers=args.workers, train=True, flip=True,
                            shuffle_buffer=args.shuffle_buffer)
    tf = transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size),
                             transforms.RandomHorizontalFlip(), transforms.ToTensor()])
    folder = datasets.ImageFolder(str(root / split), transform=tf)
    base = iter(DataLoader(folder, args.batch_size, num_workers=args.workers, drop_last=True,
                           sampler=RandomSampler(folder, num_samples=10**9)))
    loaders = {"ours": ours, "base": base}
    rounds: dict[str, list[tuple[float, float]]] = {"ours": [], "base": []}
    queued = 2 * max(1, args.workers)  # DataLoader's default prefetch_factor per worker
    for batches in loaders.values():
        timed(batches, queued, queued)  # warm-up: workers started, pipelines filled
    for _ in range(args.rounds):
        for name, batches in loaders.items():
            rounds[name].append(timed(batches, args.batches, queued))
    del ours, base, loaders
    row = {"size": size, "images": manifest["count"], "shard": shard_rate}
    for name, r in rounds.items():
        row[name] = statistics.median(rate for rate, _ in r)
        row[f"{name}_cpu"] = statistics.median(cpu for _, cpu in r)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", type=Path, default=None, help="ImageNet-style folder")
    p.add_argument("--mini", action="store_true", help="use the embedded dataset")
    p.add_argument("--split", default="train")
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 256])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--batches", type=int, default=20, help="timed batches per loader and round")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (median reported)")
    p.add_argument("--shuffle-buffer", type=int, default=1000)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    load0 = os.getloadavg()[0]

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        root = args.root or (DEFAULT_SAMPLE if DEFAULT_SAMPLE.is_dir() else None)
        if root is None or args.mini:
            root = tmp / "mini"
            build_mini_dataset(cfg, root)
        rows = [bench_size(cfg, root, args.split, s, args, tmp) for s in args.sizes]

    print(f"\ndata benchmark: {root}/{args.split}, {rows[0]['images']} images, "
          f"{args.workers} workers, batch {args.batch_size}, {args.rounds} rounds of "
          f"{args.batches} batches, {os.cpu_count()} CPUs, "
          f"load average {load0:.2f} -> {os.getloadavg()[0]:.2f}\n")
    head = ("image size", "shard img/s", "loader img/s", "ImageFolder img/s", "loader/baseline",
            "loader CPU us/img", "ImageFolder CPU us/img", "CPU ratio")
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("-" * (len(h) + 2) for h in head) + "|")
    for r in rows:
        cells = (f"{r['size']}", f"{r['shard']:.0f}", f"{r['ours']:.0f}", f"{r['base']:.0f}",
                 f"{r['ours'] / r['base']:.2f}x", f"{r['ours_cpu']:.0f}", f"{r['base_cpu']:.0f}",
                 f"{r['base_cpu'] / r['ours_cpu']:.2f}x")
        print("| " + " | ".join(c.rjust(len(h)) for c, h in zip(cells, head, strict=True)) + " |")


if __name__ == "__main__":
    main()
