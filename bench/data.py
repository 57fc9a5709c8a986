"""Data benchmark: sharding images/s, and the shard loader against a torchvision ImageFolder +
DataLoader baseline on the original JPEGs (same transforms, batch size and worker count).

    .venv/bin/python bench/data.py [--root ../shared/imagenet-sample] [--workers 2]

Both loaders are timed in steady state (workers started, one batch of warm-up) over the same
number of batches; the baseline uses persistent workers so epoch restarts cost it nothing.
Without --root and without ../shared/imagenet-sample, the embedded dataset is built and used.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import logging
import os
import tempfile
import time
from pathlib import Path

import torch
import yaml
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from dinosae.data.loader import infinite_batches
from dinosae.data.mini import build_mini_dataset
from dinosae.data.shard import shard_split

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SAMPLE = ROOT.parent / "shared" / "imagenet-sample"


def endless(loader: DataLoader):
    while True:
        yield from loader


def images_per_s(batches, n_batches: int) -> float:
    next(batches)  # warm-up: workers started, pipelines filled
    t0, n = time.perf_counter(), 0
    for images, _ in itertools.islice(batches, n_batches):
        n += images.shape[0]
    return n / (time.perf_counter() - t0)


def bench_size(cfg: dict, root: Path, split: str, size: int, args, tmp: Path) -> dict:
    cfg = copy.deepcopy(cfg)
    cfg["data"].update(root=str(root), image_size=size, workers=args.workers)
    out = tmp / f"shards{size}"
    t0 = time.perf_counter()
    manifest = shard_split(cfg, split, out)
    shard_rate = manifest["count"] / (time.perf_counter() - t0)

    ours = infinite_batches(out, args.batch_size, workers=args.workers, train=True, flip=True,
                            shuffle_buffer=args.shuffle_buffer)
    ours_rate = images_per_s(ours, args.batches)
    del ours

    tf = transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size),
                             transforms.RandomHorizontalFlip(), transforms.ToTensor()])
    base = DataLoader(datasets.ImageFolder(str(root / split), transform=tf), args.batch_size,
                      shuffle=True, num_workers=args.workers, drop_last=True,
                      persistent_workers=args.workers > 0)
    base_rate = images_per_s(endless(base), args.batches)
    return {"size": size, "images": manifest["count"], "shard": shard_rate, "ours": ours_rate,
            "base": base_rate}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", type=Path, default=None, help="ImageNet-style folder")
    p.add_argument("--mini", action="store_true", help="use the embedded dataset")
    p.add_argument("--split", default="train")
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 256])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--batches", type=int, default=60, help="timed batches per loader")
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
          f"{args.workers} workers, batch {args.batch_size}, {os.cpu_count()} CPUs, "
          f"load average {load0:.2f} -> {os.getloadavg()[0]:.2f}\n")
    head = ("image size", "shard img/s", "loader img/s", "ImageFolder img/s", "loader/baseline")
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("-" * (len(h) + 2) for h in head) + "|")
    for r in rows:
        cells = (f"{r['size']}", f"{r['shard']:.0f}", f"{r['ours']:.0f}", f"{r['base']:.0f}",
                 f"{r['ours'] / r['base']:.2f}x")
        print("| " + " | ".join(c.rjust(len(h)) for c, h in zip(cells, head, strict=True)) + " |")


if __name__ == "__main__":
    main()
