"""The random draws of a training step as functions of the sample, never of the process.

A run on W processes (each holding `local` rows of the global batch: rank r the global rows
r*local .. (r+1)*local - 1, see `my_rows`) draws for every sample what one process holding the
whole global batch draws for it, and so ends with the same weights (up to float rounding).
Two kinds of draws:

* per-sample tensors (the DiT's noise, times and label dropout; stage 4's latent noise): each
  sample from its own generator, seeded by (seed, ..., step, global row) -- `row_generators`;
  the cost is this process's rows only;
* small per-sample parameters of a whole-batch draw (DiffAugment's shifts, colours, cutouts):
  drawn for the global batch from one generator seeded by (seed, ..., step), the same on every
  process, this process's rows taken (models.discriminator.draw_aug / take_rows).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import torch


def seed_of(*key: int) -> int:
    """A well-mixed 63-bit seed of a tuple of non-negative integers (numpy's SeedSequence)."""
    return int(np.random.SeedSequence([int(k) for k in key]).generate_state(2, np.uint64)[0] >> 1)


def my_rows(rank: int, local: int) -> range:
    """The global-batch rows a process of `rank` holds when each holds `local` rows."""
    return range(rank * local, (rank + 1) * local)


def key_generator(*key: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded by `key` (e.g. (seed, stage, step)): the same on every process."""
    return torch.Generator(device=device).manual_seed(seed_of(*key))


def row_generators(key: tuple[int, ...], rows: Iterable[int],
                   device: torch.device | str = "cpu") -> Iterator[torch.Generator]:
    """For each global row j of `rows`, one generator seeded by (*key, j) (the same object,
    reseeded: draw from it before taking the next)."""
    g = torch.Generator(device=device)
    for j in rows:
        g.manual_seed(seed_of(*key, j))
        yield g
