"""Reading a complete cache: open_cache checks it, LatentCache serves rows and fast batches."""

from __future__ import annotations

from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path

import numpy as np
import torch
import zarr
from zarr.core.buffer import default_buffer_prototype

from dinosae.errors import CacheError
from dinosae.files import sha256_file
from dinosae.latents.background import background
from dinosae.latents.checks import bad_rows, check_attrs, check_chunks, rows_error
from dinosae.latents.shared import encoder_tensors, mark_used
from dinosae.latents.store import VERSION, ceil_div, dequantize_into, open_group, store_dtype


def open_cache(path: str | Path, expect_encoder_sha: str | None = None,
               expect_encoder: str | Path | None = None) -> LatentCache:
    """Open a complete cache for reading; CacheError if it is incomplete, not a cache, or was
    encoded by another encoder than `expect_encoder_sha` (a checkpoint file's sha256) or
    `expect_encoder` (a checkpoint: the same file, or the same tensors in another file, as a
    cache shared by content is for a second experiment's imported autoencoder)."""
    path = Path(path)
    group, attrs = open_group(path, "r", "run the `encode` rule")
    if attrs.get("version") != VERSION:
        raise CacheError(f"{path}: cache version {attrs.get('version')}, this reader reads "
                         f"{VERSION}")
    if attrs.get("complete") is not True:
        raise CacheError(f"{path}: the latent cache is incomplete (attribute complete is not "
                         "true): a region was never written or failed validation; run "
                         "`dinosae encode-gather` (Snakemake rule `encode`)")
    check_attrs(path, group, attrs, reading=True)
    check_chunks(path, group, [k for k in ("tokens", "tokens_flip", "norms", "norms_flip",
                                           "labels") if k in group])
    have = attrs["encoder"]["sha256"]
    if expect_encoder is not None:
        expect_encoder_sha = sha256_file(expect_encoder)
        tensors = attrs["encoder"].get("tensors")
        if have != expect_encoder_sha and tensors and tensors == encoder_tensors(expect_encoder):
            expect_encoder_sha = have  # the same weights in another file
    if expect_encoder_sha is not None and have != expect_encoder_sha:
        raise CacheError(f"{path}: encoded with {attrs['encoder']['path']} (sha256 {have[:16]}…), "
                         f"not the expected encoder (sha256 {expect_encoder_sha[:16]}…): the "
                         "cache is stale; re-encode it")
    mark_used(path.resolve())
    return LatentCache(path, group, attrs)

class LatentCache:
    """A complete latent cache. Row r < N is image r; with flip, row N + i is image i flipped.

    `cache[r]` -> (tokens float32 (T, C), label); `batches(...)` is the fast path. Whatever the
    store's dtype, every read serves float16 unit tokens (store.dequantize: a float16 store's
    as stored, a bfloat16 or int8 store's dequantized and projected to unit norm). Every row
    read is checked (finite, unit norm: checks.bad_rows); `check = False` skips that.
    """

    def __init__(self, path: Path, group: zarr.Group, attrs: dict) -> None:
        self.path, self.group, self.attrs = path, group, attrs
        self.tokens = group["tokens"]
        self.dtype = store_dtype(attrs)
        self.labels = group["labels"][:]
        self.count, self.chunk_rows = int(attrs["count"]), int(attrs["chunk_rows"])
        self.unit_rows = int(attrs["unit_rows"])
        suffixes = ("", "_flip") if attrs["flip"] else ("",)
        self._arrays = [group[f"tokens{s}"] for s in suffixes]
        self._scales = [group[f"scales{s}"] for s in suffixes] if self.dtype == "int8" else []
        self._chunk: tuple[tuple[int, int], np.ndarray] | None = None
        self.check = True

    def _where(self, rows: np.ndarray) -> tuple[str, np.ndarray]:
        """(array name, row numbers in it) for rows of this reader (row N + i: tokens_flip i)."""
        a = int(rows[0]) // self.count
        return ("tokens", "tokens_flip")[a], rows[rows // self.count == a] % self.count

    def __len__(self) -> int:
        return self.count * len(self._arrays)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"row {i} out of range for a cache of {len(self)} rows")
        a, r = divmod(i, self.count)
        key = (a, r // self.chunk_rows)  # keep the last chunk: sequential access reads it once
        if self._chunk is None or self._chunk[0] != key:
            start = key[1] * self.chunk_rows
            chunk = self._arrays[a][start:start + self.chunk_rows]
            if self.dtype != "float16":
                scales = self._scales[a][start:start + self.chunk_rows] if self._scales else None
                chunk = dequantize_into(np.empty(chunk.shape, np.float16), chunk, scales,
                                        self.dtype)
            if self.check and len(bad := bad_rows(chunk)):
                raise rows_error(self.path, ("tokens", "tokens_flip")[a], start + bad)
            self._chunk = (key, chunk)
        row = self._chunk[1][r - key[1] * self.chunk_rows]
        return torch.from_numpy(row.astype(np.float32)), int(self.labels[r])

    def order(self, *, shuffle: bool = True, seed: int = 0, epoch: int = 0, rank: int = 0,
              world_size: int = 1) -> np.ndarray:
        """The rows this rank reads in one epoch, in reading order. Shuffled: whole units (zarr
        shards, the cheap thing to read) in a random order that is the same on every rank for a
        given (seed, epoch); each rank takes its own contiguous slice of it. With world_size > 1
        every rank gets len // world_size rows, so all ranks take the same number of steps."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        total, s = len(self), self.unit_rows
        if shuffle:
            starts = np.concatenate([a * self.count + np.arange(0, self.count, s)
                                     for a in range(len(self._arrays))])
            stops = np.minimum(starts + s, (starts // self.count + 1) * self.count)
            perm = np.random.default_rng([seed, epoch]).permutation(len(starts))
            rows = starts[perm][:, None] + np.arange(s)[None, :]
            rows = rows[rows < stops[perm][:, None]]
        else:
            rows = np.arange(total)
        if world_size == 1:
            return rows
        per = total // world_size
        return rows[rank * per:(rank + 1) * per]

    def read_rows(self, rows: np.ndarray, out: np.ndarray | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
        """Tokens float16 (n, T, C) and labels (n,) of the given rows, in that order; the tokens
        go into `out` when given. A float16 store's tokens go straight into `out`; another
        dtype's are read the same way into a buffer of the stored values (and scales), then
        dequantized into `out`. Rows are read in sorted order: a run of consecutive rows
        that keeps its order in `out` is one zarr call straight into place; any other run is
        read unit (zarr shard) by unit into one reused buffer, each row then copied to its place.
        What a memmap would not pay is zarr's own work per shard: a file read, a copy of each
        inner chunk into a shard buffer, and one of that into ours (bench/latents.py)."""
        rows = np.asarray(rows)
        if out is None:
            out = np.empty((len(rows), *self.tokens.shape[1:]), dtype=np.float16)
        if self.dtype == "float16":
            self._gather(self._arrays, rows, out)
        else:
            stored = self._gather(self._arrays, rows, np.empty(out.shape, self.tokens.dtype))
            scales = (self._gather(self._scales, rows, np.empty(out.shape[:2], np.float16))
                      if self._scales else None)
            dequantize_into(out, stored, scales, self.dtype)
        if self.check and len(bad := bad_rows(out)):
            raise rows_error(self.path, *self._where(rows[bad]))
        return out, self.labels[rows % self.count]

    def _gather(self, arrays: list[zarr.Array], rows: np.ndarray, out: np.ndarray
                ) -> np.ndarray:
        """Rows `rows` of `arrays` (the reader's rows: row N + i is arrays[1]'s row i) into
        `out`, in that order (see read_rows)."""
        sort = np.argsort(rows, kind="stable")
        srt = rows[sort]
        buf = None
        for lo, hi in self._runs(srt):
            dst = sort[lo:hi]
            if (np.diff(dst) == 1).all():  # in order in `out`, e.g. not shuffled
                self._read(arrays, int(srt[lo]), out[dst[0]:dst[0] + hi - lo])
                continue
            if buf is None:
                buf = np.empty((self.unit_rows, *out.shape[1:]), dtype=out.dtype)
            starts = lo + np.flatnonzero(srt[lo:hi] % self.count % self.unit_rows == 0)
            for a, b in pairwise([lo, *starts[starts > lo].tolist(), hi]):  # unit by unit
                self._read(arrays, int(srt[a]), buf[:b - a])
                out[sort[a:b]] = buf[:b - a]
        return out

    def _runs(self, srt: np.ndarray) -> list[tuple[int, int]]:
        """Sorted rows -> [lo, hi) index ranges of consecutive rows of one array."""
        if not len(srt):
            return []
        breaks = np.flatnonzero((np.diff(srt) != 1) | (srt[1:] % self.count == 0)) + 1
        return list(zip(np.r_[0, breaks].tolist(), np.r_[breaks, len(srt)].tolist(),
                        strict=True))

    def _read(self, arrays: list[zarr.Array], row: int, into: np.ndarray) -> None:
        """Rows row..row+len(into)-1 (of one array) into `into`, one zarr call."""
        a, first = divmod(row, self.count)
        arrays[a].get_basic_selection(
            slice(first, first + len(into)),
            out=default_buffer_prototype().nd_buffer.from_numpy_array(into))

    def batches(self, batch_size: int, *, shuffle: bool = True, seed: int = 0, epoch: int = 0,
                rank: int = 0, world_size: int = 1, radius: float = 1.0, drop_last: bool = True,
                window: int | None = None, raw: bool = False
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(tokens float32 (B, T, C) on the sphere of `radius`, labels int64 (B,)) for one epoch.
        `raw`: the float16 tokens read_rows serves instead (unit norm up to fp16 rounding; in pinned
        memory when CUDA is available), for a training loop that moves them to its device as
        they are and projects them to its radius there (`radius` is then unused).

        Several processes: `batch_size` is this rank's share of a global batch of
        batch_size * world_size rows, cut from the one order of all rows (`order()` of one
        process); rank r gets rows r*batch_size .. (r+1)*batch_size - 1 of each global batch, so
        the global batches are the same whatever the world size (a run's result does not depend
        on it). Without drop_last the last global batch may be short: some ranks then get a
        shorter batch or none.

        Reads `window` global rows at a time in a background thread (default: 8 global batches,
        at least 8 units; this rank reads its share); shuffled, the rows of a window (whole
        units picked at random) are shuffled among themselves (default_rng([seed, epoch, 0,
        1]), the same on every rank), so a batch mixes rows from many units (rows within a unit
        are neighbours in manifest order, mostly one class). A larger window mixes more and
        holds more memory."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        rows = self.order(shuffle=shuffle, seed=seed, epoch=epoch)  # all rows: one order
        whole = batch_size * world_size
        if drop_last:
            rows = rows[:len(rows) // whole * whole]
        window = ceil_div(window or max(8 * whole, 8 * self.unit_rows), whole) * whole
        rng = np.random.default_rng([seed, epoch, 0, 1])
        pin = raw and torch.cuda.is_available()
        mine = slice(rank * batch_size, (rank + 1) * batch_size)  # in each global batch

        def windows() -> Iterator[tuple[torch.Tensor, np.ndarray]]:
            for w in range(0, len(rows), window):
                r = rows[w:w + window]
                r = rng.permutation(r) if shuffle else r
                r = np.concatenate([r[i:i + whole][mine] for i in range(0, len(r), whole)])
                if not len(r):
                    continue
                shape = (len(r), *self.tokens.shape[1:])
                # pinned: read straight into page-locked memory; the batches are views of it
                z = (torch.empty(shape, dtype=torch.float16, pin_memory=True) if pin
                     else torch.from_numpy(np.empty(shape, dtype=np.float16)))
                yield z, self.read_rows(r, out=z.numpy())[1]

        for tokens, labels in background(windows()):
            for i in range(0, len(labels), batch_size):
                z, y = tokens[i:i + batch_size], torch.from_numpy(labels[i:i + batch_size])
                if raw:
                    yield z, y
                    continue
                z = z.float()
                z.mul_(radius / z.norm(dim=-1, keepdim=True))  # exact radius after fp16
                yield z, y
