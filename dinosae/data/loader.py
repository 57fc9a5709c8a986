"""Batches of (images, labels) from a shard folder, as a webdataset pipeline.

Splitting: the R ranks x W DataLoader workers form R*W readers. With at least R*W shards, each
reader gets whole shards (shard order permuted per epoch when training); with fewer, every reader
reads all shards and keeps the samples whose index is its own modulo R*W. Either way each sample
is read by exactly one reader per epoch. Workers shuffle compressed samples in a buffer, decode,
flip and batch as uint8; the main process only converts the batch to float.

With one-epoch loaders, each worker drops its own last partial batch when `drop_last`, and ranks
may get different numbers of batches (whole shards): use `infinite_batches` in DDP training loops.
"""

from __future__ import annotations

import atexit
import functools
import io
import itertools
import multiprocessing.util  # before the atexit hook below: hooks run last-in first-out
import random
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, get_worker_info

from dinosae.data.shard import member_key, read_manifest
from dinosae.errors import DataError

_BLOCK = 512
_ZEROS = bytes(_BLOCK)


@dataclass(frozen=True)
class _Plan:
    """Who reads what: everything a worker needs, picklable."""

    folder: str
    names: tuple[str, ...]  # shard file names in manifest order
    counts: tuple[int, ...]  # samples per shard
    rank: int
    world_size: int
    workers: int  # DataLoader workers per rank (>= 1; 0 workers = 1 in-process reader)
    seed: int
    epoch: int
    train: bool
    flip: bool
    shuffle_buffer: int
    infinite: bool

    @property
    def readers(self) -> int:
        return self.world_size * self.workers

    @property
    def by_sample(self) -> bool:
        return len(self.names) < self.readers

    def shards_for(self, epoch: int, reader: int) -> list[int]:
        """Shard indices read by `reader` (= rank * workers + worker) in `epoch`."""
        order = list(range(len(self.names)))
        if self.train:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(order)).tolist()
        return order if self.by_sample else order[reader::self.readers]

    def samples_for(self, epoch: int, reader: int) -> int:
        if self.by_sample:
            return len(range(reader, sum(self.counts), self.readers))
        return sum(self.counts[i] for i in self.shards_for(epoch, reader))

    def rng(self, reader: int, purpose: int) -> np.random.Generator:
        """Independent streams per (seed, epoch, reader) and purpose (0 shuffle, 1 flips)."""
        return np.random.default_rng([self.seed, self.epoch, reader, purpose])


def _reader(plan: _Plan) -> int:
    info = get_worker_info()
    worker, num = (0, 1) if info is None else (info.id, info.num_workers)
    if num != plan.workers:
        raise RuntimeError(f"loader planned for {plan.workers} workers but runs in {num}")
    return plan.rank * plan.workers + worker


# ------------------------------------------------------------------ pipeline stages (in workers)

def _urls(plan: _Plan) -> Iterator[dict]:
    reader = _reader(plan)
    epochs = itertools.count(plan.epoch) if plan.infinite else [plan.epoch]
    if plan.infinite and plan.samples_for(plan.epoch, reader) == 0:
        return  # an endless loop over nothing would stall the DataLoader
    for epoch in epochs:
        for i in plan.shards_for(epoch, reader):
            yield {"url": str(Path(plan.folder) / plan.names[i])}


def _tar_samples(src: Iterator[dict]) -> Iterator[dict]:
    """{"__key__", ext: bytes} samples of the plain ustar tars that `shard_split` writes.

    Replaces webdataset's tarfile-based reader here: 7-30 us instead of ~190 us per sample (two
    members), which is as much as decoding a 64 px JPEG. Anything but a regular ustar member is
    an error.
    """
    for item in src:
        url, sample = item["url"], None
        with open(url, "rb", buffering=1 << 20) as f:
            while len(header := f.read(_BLOCK)) == _BLOCK and header != _ZEROS:
                if (header[257:262] != b"ustar" or header[156:157] not in (b"0", b"\0")
                        or header[345:500].strip(b"\0")):  # a path prefix: not ours
                    raise DataError(f"{url}: unexpected tar member (not written by dinosae)")
                size = int(header[124:136].rstrip(b"\0 ") or b"0", 8)
                data = f.read(size)
                if len(data) != size:
                    raise DataError(f"{url}: truncated tar")
                f.seek(-size % _BLOCK, io.SEEK_CUR)
                key, ext = member_key(header[:100].rstrip(b"\0").decode(errors="replace"), url)
                if sample is None or sample["__key__"] != key:
                    if sample is not None:
                        yield sample
                    sample = {"__key__": key}
                sample[ext] = data
        if sample is not None:
            yield sample


def _mine(src: Iterator[dict], plan: _Plan) -> Iterator[dict]:
    if not plan.by_sample:
        yield from src
        return
    reader = _reader(plan)
    for sample in src:
        if int(sample["__key__"]) % plan.readers == reader:
            yield sample


def _shuffle(src: Iterator[dict], plan: _Plan) -> Iterator[dict]:
    if not plan.train or plan.shuffle_buffer <= 1:
        return src
    rng = random.Random(int(plan.rng(_reader(plan), 0).integers(2**62)))
    return wds.shuffle(plan.shuffle_buffer, plan.shuffle_buffer, rng=rng)(src)


def _decode(src: Iterator[dict], plan: _Plan) -> Iterator[tuple[torch.Tensor, int, int]]:
    rng = plan.rng(_reader(plan), 1)
    flip = plan.train and plan.flip
    for sample in src:
        with Image.open(io.BytesIO(sample.get("jpg", sample.get("png")))) as im:
            hwc = np.asarray(im if im.mode == "RGB" else im.convert("RGB"))
        if flip and rng.random() < 0.5:
            hwc = hwc[:, ::-1]
        image = torch.from_numpy(np.ascontiguousarray(hwc.transpose(2, 0, 1)))  # (3,H,W) uint8
        yield image, int(sample["cls"]), int(sample["__key__"])


def _collate(samples: list[tuple[torch.Tensor, int, int]]) -> tuple[torch.Tensor, ...]:
    images, labels, keys = zip(*samples, strict=True)
    return torch.stack(images), torch.tensor(labels), torch.tensor(keys)


def _pipeline(plan: _Plan, batch_size: int, partial: bool) -> wds.DataPipeline:
    return wds.DataPipeline(
        functools.partial(_urls, plan),
        _tar_samples,
        functools.partial(_mine, plan=plan),
        functools.partial(_shuffle, plan=plan),
        functools.partial(_decode, plan=plan),
        wds.batched(batch_size, collation_fn=_collate, partial=partial),
    )


def _ignore_stop_signals(worker_id: int) -> None:
    """Workers leave SIGTERM/SIGINT to the main process. Slurm signals every process of a job
    at its time limit; a worker that died of it would crash the loop before it checkpoints."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@atexit.register
def _kill_leftover_workers() -> None:
    """Workers ignore SIGTERM, which is how multiprocessing stops daemon children at exit: when
    the main process dies of an exception while a loader is open (its traceback keeps the
    loader alive until after the exit hooks), kill them instead (they hold no state)."""
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


# --------------------------------------------------------------------------------- public API

class ShardLoader:
    """Iterable of (images float32 (B,3,H,W) in [0,1], labels int64 (B,)) [, indices int64 (B,)]."""

    def __init__(self, plan: _Plan, batch_size: int, drop_last: bool, with_index: bool,
                 workers: int, pin_memory: bool) -> None:
        self.plan, self.batch_size, self.drop_last = plan, batch_size, drop_last
        self.with_index = with_index
        self.loader = DataLoader(
            _pipeline(plan, batch_size, partial=not drop_last and not plan.infinite),
            batch_size=None, num_workers=workers, pin_memory=pin_memory,
            persistent_workers=False, worker_init_fn=_ignore_stop_signals if workers else None,
        )

    def __len__(self) -> int:
        """Batches this rank yields in one epoch."""
        if self.plan.infinite:
            raise TypeError("an infinite loader has no length")
        rnd = (lambda n: n // self.batch_size) if self.drop_last else (
            lambda n: -(-n // self.batch_size))
        first = self.plan.rank * self.plan.workers
        return sum(rnd(self.plan.samples_for(self.plan.epoch, r))
                   for r in range(first, first + self.plan.workers))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        for images, labels, keys in self.loader:
            images = images.float().div_(255.0)
            yield (images, labels, keys) if self.with_index else (images, labels)


def make_loader(
    shards_dir: str | Path,
    batch_size: int,
    *,
    train: bool = True,
    flip: bool = True,
    shuffle_buffer: int = 1000,
    workers: int = 2,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    epoch: int = 0,
    drop_last: bool = True,
    with_index: bool = False,
    pin_memory: bool = False,
    infinite: bool = False,
) -> ShardLoader:
    """One epoch (or, with `infinite`, endless epochs) of batches for `rank` of `world_size`.

    `train` enables shard-order shuffling, the shuffle buffer and (with `flip`) random horizontal
    flips; otherwise the order is fixed. `with_index` adds each sample's global index.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world_size {world_size}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    manifest = read_manifest(shards_dir)
    plan = _Plan(
        folder=str(shards_dir), names=tuple(s["name"] for s in manifest["shards"]),
        counts=tuple(s["count"] for s in manifest["shards"]), rank=rank, world_size=world_size,
        workers=max(1, workers), seed=seed, epoch=epoch, train=train, flip=flip,
        shuffle_buffer=shuffle_buffer, infinite=infinite,
    )
    first = rank * plan.workers
    if sum(plan.samples_for(epoch, r) for r in range(first, first + plan.workers)) == 0:
        raise ValueError(f"{shards_dir}: {manifest['count']} samples leave nothing for rank "
                         f"{rank} of {world_size} with {plan.workers} worker(s)")
    return ShardLoader(plan, batch_size, drop_last, with_index, workers, pin_memory)


def infinite_batches(shards_dir: str | Path, batch_size: int, **kw) -> Iterator[tuple]:
    """Endless batches for training loops: epochs `epoch`, `epoch + 1`, ... each with its own
    shuffle; batches run across epoch boundaries, so nothing is dropped. Same keywords as
    `make_loader` (drop_last is ignored)."""
    kw.pop("drop_last", None)
    return iter(make_loader(shards_dir, batch_size, infinite=True, **kw))
