"""`LatentDataset`: a complete cache as a plain torch `Dataset`, for any training code with a
standard `DataLoader` (and a `DistributedSampler` under DDP). LatentCache.batches is the fast
path dinosae's own trainer uses; this one reads row by row (each read fetches the row's zarr
chunk, and keeps the last one), checked like every read."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dinosae.latents.reader import LatentCache, open_cache


class LatentDataset(torch.utils.data.Dataset):
    """Item i -> (tokens float32 (T, C), label int). Items 0..N-1 are the N images; with `flip`
    (and a cache encoded with flips), items N..2N-1 are the same images flipped left-right, so a
    shuffling sampler mixes both. `radius`: tokens scaled to that sphere (None: the reader's
    float16 unit tokens, whatever the store's dtype). `expect_encoder_sha`: refuse a cache
    another encoder made.

        ds = LatentDataset("results/latents/train.zarr", radius=ds_radius)
        loader = DataLoader(ds, batch_size=64, sampler=DistributedSampler(ds), num_workers=4)

    Workers started by fork share the open store; by spawn, each reopens (and rechecks) it."""

    def __init__(self, path: str | Path, *, flip: bool = True, radius: float | None = None,
                 expect_encoder_sha: str | None = None) -> None:
        self.path, self.radius, self._sha = Path(path), radius, expect_encoder_sha
        self._cache: LatentCache | None = open_cache(self.path, expect_encoder_sha)
        attrs = self._cache.attrs
        self.flip = bool(flip and attrs["flip"])
        self.count, self.num_classes = int(attrs["count"]), int(attrs["num_classes"])
        self.grid, self.channels = list(attrs["grid"]), int(attrs["channels"])
        self.tokens = int(attrs["tokens"])

    @property
    def cache(self) -> LatentCache:
        if self._cache is None:  # unpickled in a spawned worker
            self._cache = open_cache(self.path, self._sha)
        return self._cache

    @property
    def attrs(self) -> dict:
        return self.cache.attrs

    def __len__(self) -> int:
        return self.count * (2 if self.flip else 1)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"item {i} out of range for {len(self)} items")
        z, y = self.cache[i % len(self)]  # the reader's row i: image i, or image i - N flipped
        if self.radius is not None:
            z.mul_(self.radius / z.norm(dim=-1, keepdim=True))
        return z, y

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_cache": None}
