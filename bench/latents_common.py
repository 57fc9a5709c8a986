"""What the latent-cache benches share: timing, sizes on disk, and the setup they all start from
(real photographs sharded by `dinosae shard`, the configured autoencoder with random weights
saved as a stage checkpoint), plus a cache of a given store dtype built by the real
encode_init / encode_part / encode_gather path."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch

from dinosae import latents
from dinosae.checkpoint import save_checkpoint
from dinosae.data.mini import build_mini_dataset
from dinosae.data.shard import shard_split
from dinosae.models.autoencoder import ae_config, build_autoencoder

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def best_of(fn: Callable[[], object], reps: int = 3) -> float:
    """Shortest wall time of `reps` calls (the machine is shared: the minimum is the signal)."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def subset(root: Path, n: int, out: Path) -> Path:
    """`out/train/<class>/<file>`: copies of `n` images of `root/train`, spread evenly over the
    sorted list (so over the classes)."""
    files = sorted(p for p in (root / "train").rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    for f in files[::max(1, len(files) // n)][:n]:
        dst = out / "train" / f.parent.name / f.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, dst)
    return out


def shards_and_encoder(cfg: dict, tmp: Path, root: str | None = None,
                       images: int | None = None) -> tuple[Path, Path]:
    """(shard folder, autoencoder checkpoint) in `tmp`: the photographs of `root` (an
    ImageNet-style folder; default the embedded dataset), `images` of them (default all),
    sharded; the configured autoencoder, random init (seed 0), as a stage-4 checkpoint."""
    folder = Path(root) if root else tmp / "mini"
    if not root:
        build_mini_dataset(cfg, folder)
    if images:
        folder = subset(folder, images, tmp / "subset")
    cfg["data"].update(root=str(folder), workers=min(2, os.cpu_count() or 1))
    shard_split(cfg, "train", tmp / "shards")
    torch.manual_seed(0)
    ae = build_autoencoder(cfg)
    sd = ae.state_dict()
    save_checkpoint(tmp / "ae.pt", {"kind": "dinosae-ae", "stage": 4, "step": 0,
                                    "config": ae_config(cfg), "model": sd, "ema": sd})
    return tmp / "shards", tmp / "ae.pt"


def build_cache(cfg: dict, shards: Path, ckpt: Path, out: Path, **lcfg: object) -> Path:
    """A complete cache at `out` through the pipeline's own steps, one part; `lcfg` overrides
    latents settings (e.g. dtype="int8")."""
    c = json.loads(json.dumps(cfg))
    c["latents"].update(lcfg, parts=1, root=None)
    shutil.rmtree(out, ignore_errors=True)
    latents.encode_init(c, shards, ckpt, out)
    latents.encode_part(c, out, shards, ckpt, 0, 1, out.with_name(out.name + ".done"))
    latents.encode_gather(c, out, out.with_name(out.name + ".report.json"))
    return out
