"""Batches of (images, labels) from a shard folder, as a webdataset pipeline.

Splitting: the R ranks x W DataLoader workers form R*W readers. With at least R*W shards, each
reader gets whole shards (shard order permuted per epoch when training); with fewer, every reader
reads all shards and keeps the samples whose index is its own modulo R*W. Either way each sample
is read by exactly one reader per epoch. Workers shuffle compressed samples in a buffer, then
decode and flip each batch straight into one uint8 tensor in shared memory; the main process only
converts the batch to float.

With one-epoch loaders, each worker drops its own last partial batch when `drop_last`, and ranks
may get different numbers of batches (whole shards): use `infinite_batches` in DDP training loops.
"""

from __future__ import annotations

import atexit
import collections
import functools
import io
import itertools
import math
import multiprocessing.util  # before the atexit hook below: hooks run last-in first-out
import random
import signal
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, get_worker_info

from dinosae.data.shard import encode, member_key, read_manifest
from dinosae.errors import DataError

try:  # deprecated since torchvision 0.29 (pinned); without it, PIL decodes every image
    from torchvision.io import ImageReadMode, decode_jpeg
except ImportError:
    decode_jpeg = None

_BLOCK = 512
_ZEROS = bytes(_BLOCK)
_POOL = 4  # batch tensors per worker: DataLoader's 2 in flight, 1 filling, 1 being converted


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
            for key, ext, _, size in _members(f, url):
                data = f.read(size)
                if len(data) != size:
                    raise DataError(f"{url}: truncated tar")
                if sample is None or sample["__key__"] != key:
                    if sample is not None:
                        yield sample
                    sample = {"__key__": key}
                sample[ext] = data
        if sample is not None:
            yield sample


def _members(f: io.BufferedReader, url: str) -> Iterator[tuple[str, str, int, int]]:
    """(key, extension, data offset, size) of each member of an open dinosae tar, f positioned
    at the member's data when each is yielded (the caller may read it or not)."""
    while len(header := f.read(_BLOCK)) == _BLOCK and header != _ZEROS:
        if (header[257:262] != b"ustar" or header[156:157] not in (b"0", b"\0")
                or header[345:500].strip(b"\0")):  # a path prefix: not ours
            raise DataError(f"{url}: unexpected tar member (not written by dinosae)")
        size = int(header[124:136].rstrip(b"\0 ") or b"0", 8)
        key, ext = member_key(header[:100].rstrip(b"\0").decode(errors="replace"), url)
        start = f.tell()
        yield key, ext, start, size
        f.seek(start + size + (-size % _BLOCK))


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


def _pil_chw(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im if im.mode == "RGB" else im.convert("RGB")).transpose(2, 0, 1)


def _turbo_chw(data: bytes) -> torch.Tensor | None:
    """torchvision's decode, None where it fails (PIL then raises its usual error)."""
    try:
        with warnings.catch_warnings():  # its deprecation notice, on every call
            warnings.simplefilter("ignore", DeprecationWarning)
            return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                               mode=ImageReadMode.UNCHANGED)
    except RuntimeError:
        return None


@functools.cache
def _turbo_decodes_like_pil() -> bool:
    """Whether torchvision's libjpeg-turbo gives PIL's pixels, bit for bit, in this process: both
    bundle libjpeg-turbo (integer IDCT, fancy upsampling), but their builds and versions differ.
    Checked once on a noisy JPEG of odd size, encoded as the shards are."""
    if decode_jpeg is None:
        return False
    noise = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    data = encode(noise, "jpeg", 90)
    turbo = _turbo_chw(data)
    same = turbo is not None and np.array_equal(turbo.numpy(), _pil_chw(data))
    if not same:
        warnings.warn("torchvision decodes JPEGs unlike PIL here: the loader decodes with PIL "
                      "(slower)", RuntimeWarning, stacklevel=2)
    return same


def _decode(data: bytes, ext: str) -> np.ndarray:
    """(3, H, W) uint8 (a view, maybe strided) of a shard image, as PIL decodes it to RGB.
    torchvision's decode_jpeg takes ~25% less time at 256 px: no header parsing in Python, no
    4-bytes-per-pixel image to copy out of."""
    if ext == "jpg" and _turbo_decodes_like_pil():
        chw = _turbo_chw(data)
        if chw is not None and chw.shape[0] == 3:  # grey or CMYK: PIL converts them
            return chw.numpy()
    return _pil_chw(data)


def _uint8_tensor(shape: tuple[int, ...]) -> torch.Tensor:
    """Uninitialised; in a worker, in shared memory as torch's default_collate allocates it, so
    sending it to the main process copies nothing."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=torch.uint8)
    storage = torch.UntypedStorage._new_shared(math.prod(shape))
    return torch.empty(0, dtype=torch.uint8).set_(storage).view(shape)


class _BatchPool:
    """A worker's uint8 batch tensors, each with a `done` flag that the main process sets once it
    has converted the batch; only then is the tensor refilled. Fresh shared memory costs about
    as much as the decode (allocation, then a page fault per 4 KiB on each side)."""

    def __init__(self, size: int) -> None:
        self.size, self.slots = size, []

    def take(self, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        for images, done in self.slots:
            if images.shape == shape and done.item():
                done.zero_()
                return images, done
        slot = _uint8_tensor(shape), _uint8_tensor((1,)).zero_()
        if len(self.slots) < self.size:
            self.slots.append(slot)
        return slot


def _batches(src: Iterator[dict], plan: _Plan, batch_size: int, partial: bool
             ) -> Iterator[tuple[torch.Tensor, ...]]:
    """(images uint8 (B,3,H,W), labels, keys, done flag): each sample decoded into its row of the
    batch, flipped there (one draw per sample, in order). Labels and keys travel as arrays, in
    the pickle: a tensor would cost a shared-memory file each."""
    rng = plan.rng(_reader(plan), 1)
    flip = plan.train and plan.flip
    pool = _BatchPool(_POOL)
    while samples := list(itertools.islice(src, batch_size)):
        if len(samples) < batch_size and not partial:
            return
        images = done = None
        for i, sample in enumerate(samples):
            ext = "jpg" if "jpg" in sample else "png"
            chw = _decode(sample.get(ext), ext)
            if images is None:
                images, done = pool.take((len(samples), *chw.shape))
            elif chw.shape != images.shape[1:]:
                raise DataError(f"sample {sample['__key__']}: image of shape {chw.shape[1:]}, "
                                f"others in its batch {tuple(images.shape[2:])}")
            np.copyto(images[i].numpy(), chw)  # from the decoders' (H,W,3): the transpose
            if flip and rng.random() < 0.5:
                images[i] = images[i].flip(-1)
        labels = np.array([int(s["cls"]) for s in samples], dtype=np.int64)
        yield images, labels, np.array([int(s["__key__"]) for s in samples], dtype=np.int64), done


def _pipeline(plan: _Plan, batch_size: int, partial: bool) -> wds.DataPipeline:
    return wds.DataPipeline(
        functools.partial(_urls, plan),
        _tar_samples,
        functools.partial(_mine, plan=plan),
        functools.partial(_shuffle, plan=plan),
        functools.partial(_batches, plan=plan, batch_size=batch_size, partial=partial),
    )


def _as_is(batch: tuple) -> tuple:
    """DataLoader's collate_fn: its default would turn the label arrays into tensors."""
    return batch


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
            batch_size=None, collate_fn=_as_is, num_workers=workers, pin_memory=pin_memory,
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
        # the workers send their pooled tensors again: holding them keeps them mapped here
        held = collections.deque(maxlen=_POOL * max(1, self.loader.num_workers))
        for uint8, labels, keys, done in self.loader:
            images = uint8.float().div_(255.0)
            done.fill_(1)
            held.append((uint8, done))
            labels, keys = torch.from_numpy(labels), torch.from_numpy(keys)
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


# ------------------------------------------------------- training batches, the same for any world

# Training batches whose content does not depend on the number of processes or workers (a run's
# result then does not either): one permutation of all samples per (seed, epoch) cut into global
# batches of batch_size * world_size samples; rank r takes samples r*batch_size ..
# (r+1)*batch_size - 1 of each; each sample's flip is drawn per (seed, epoch, position). Samples
# are read by random access (an index of the tars' member offsets, built once per process), as
# an image-folder loader reads files; the DataLoader's workers take turns, one batch each.

_INDEX = ("shard", "offset", "size", "png", "label", "key")


@functools.lru_cache(maxsize=4)
def _shard_index(folder: str, names: tuple[str, ...], sizes: tuple[int, ...]) -> np.ndarray:
    """(N, 6) int64, one row per sample in key order: shard, image data offset and size, png
    (else jpg), label, key -- from the tars' headers (a seek per member, the labels read)."""
    rows = []
    for i, name in enumerate(names):
        url = str(Path(folder) / name)
        samples: dict[str, list[int]] = {}
        with open(url, "rb", buffering=1 << 16) as f:
            for key, ext, start, size in _members(f, url):
                if start + size > sizes[i]:
                    raise DataError(f"{url}: truncated tar")
                row = samples.setdefault(key, [i, -1, 0, 0, -1, int(key)])
                if ext == "cls":
                    row[4] = int(f.read(size))
                else:
                    row[1:4] = [start, size, int(ext == "png")]
        for key, row in samples.items():
            if row[1] < 0 or row[4] < 0:
                raise DataError(f"{url}: sample {key} lacks its image or its label")
        rows += samples.values()
    index = np.array(rows, dtype=np.int64).reshape(-1, len(_INDEX))
    return index[np.argsort(index[:, 5], kind="stable")]


@dataclass(frozen=True)
class _GlobalPlan:
    """What a worker of `global_batch_loader` needs, picklable."""

    folder: str
    names: tuple[str, ...]
    index: np.ndarray
    rank: int
    world_size: int
    workers: int
    batch_size: int  # this rank's rows of each global batch
    seed: int
    epoch: int
    flip: bool
    drop_last: bool

    def batches(self) -> list[np.ndarray]:
        """This rank's batches of the epoch: positions in the index (keys order)."""
        n, whole = len(self.index), self.batch_size * self.world_size
        order = np.random.default_rng([self.seed, self.epoch]).permutation(n)
        stop = n // whole * whole if self.drop_last else n
        mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        out = [order[t:min(t + whole, stop)][mine] for t in range(0, stop, whole)]
        return [b for b in out if len(b)]

    def flips(self) -> np.ndarray:
        """Whether each sample (by index position) is mirrored this epoch."""
        draws = np.random.default_rng([self.seed, self.epoch, 1]).random(len(self.index))
        return (draws < 0.5) & self.flip


class _GlobalBatches(torch.utils.data.IterableDataset):
    """Worker w of W yields this rank's batches w, w + W, ...: the DataLoader takes them in
    turn, so they arrive in order."""

    def __init__(self, plan: _GlobalPlan) -> None:
        self.plan = plan

    def __iter__(self) -> Iterator[tuple]:
        info = get_worker_info()
        worker, num = (0, 1) if info is None else (info.id, info.num_workers)
        plan, pool, files = self.plan, _BatchPool(_POOL), {}
        flips = plan.flips()
        try:
            for rows in plan.batches()[worker::num]:
                images = done = None
                for i, row in enumerate(rows.tolist()):
                    shard, offset, size, png = plan.index[row, :4].tolist()
                    if shard not in files:
                        files[shard] = open(Path(plan.folder) / plan.names[shard], "rb")  # noqa: SIM115
                    f = files[shard]
                    f.seek(offset)
                    chw = _decode(f.read(size), "png" if png else "jpg")
                    if images is None:
                        images, done = pool.take((len(rows), *chw.shape))
                    elif chw.shape != images.shape[1:]:
                        raise DataError(f"sample {plan.index[row, 5]}: image of shape "
                                        f"{chw.shape[1:]}, others in its batch "
                                        f"{tuple(images.shape[2:])}")
                    np.copyto(images[i].numpy(), chw)
                    if flips[row]:
                        images[i] = images[i].flip(-1)
                yield images, plan.index[rows, 4], plan.index[rows, 5], done
        finally:
            for f in files.values():
                f.close()


class GlobalBatchLoader(ShardLoader):
    """Iterable of (images float32 (B,3,H,W) in [0,1], labels int64 (B,)) [, keys int64 (B,)]:
    this rank's rows of each global batch (see `global_batch_loader`)."""

    def __init__(self, plan: _GlobalPlan, with_index: bool, pin_memory: bool) -> None:
        self.gplan, self.with_index = plan, with_index
        self.loader = DataLoader(
            _GlobalBatches(plan), batch_size=None, collate_fn=_as_is,
            num_workers=plan.workers, pin_memory=pin_memory, persistent_workers=False,
            worker_init_fn=_ignore_stop_signals if plan.workers else None)

    def __len__(self) -> int:
        return len(self.gplan.batches())


def global_batch_loader(shards_dir: str | Path, batch_size: int, *, flip: bool = True,
                        workers: int = 2, rank: int = 0, world_size: int = 1, seed: int = 0,
                        epoch: int = 0, drop_last: bool = True, with_index: bool = False,
                        pin_memory: bool = False) -> GlobalBatchLoader:
    """One training epoch of `rank`'s rows (`batch_size` of them) of each global batch of
    batch_size * world_size samples: the global batches, their samples' order and flips are
    the same for any world size and number of workers. Without drop_last the last global batch
    may be short (some ranks then get a shorter batch or none)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world_size {world_size}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    manifest = read_manifest(shards_dir)
    names = tuple(s["name"] for s in manifest["shards"])
    sizes = tuple((Path(shards_dir) / n).stat().st_size for n in names)
    index = _shard_index(str(Path(shards_dir).resolve()), names, sizes)
    plan = _GlobalPlan(str(shards_dir), names, index, rank, world_size, max(0, workers),
                       batch_size, seed, epoch, flip, drop_last)
    if not plan.batches():
        raise ValueError(f"{shards_dir}: {len(index)} samples make no global batch of "
                         f"{batch_size} x {world_size}")
    return GlobalBatchLoader(plan, with_index, pin_memory)
