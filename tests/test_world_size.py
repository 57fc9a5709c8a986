"""A run's result does not depend on its number of processes: every random draw of a sample is a
function of (seed, step, its row in the global batch), and the rows of a global batch are the
same for any world size. Each test splits one global batch over 1, 2 and 4 "processes" (rank r
holds rows r*b .. (r+1)*b - 1) through the real draw and data functions, and compares the
rows with one process's."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import zarr

from dinosae.latents.reader import LatentCache
from dinosae.models.discriminator import apply_aug, diffaug, draw_aug, rae_diffaug
from dinosae.train import ae as TA
from dinosae.train import dit as TD
from dinosae.train.draws import my_rows

pytestmark = pytest.mark.usefixtures("one_thread")
GLOBAL = 8


def _split(world: int) -> list[range]:
    return [my_rows(rank, GLOBAL // world) for rank in range(world)]


# ---------------------------------------------------------------- DiT: noise, time, dropout

def test_dit_draws_of_a_sample_are_the_same_for_any_world_size():
    R, K = 4.0, 3
    z0 = torch.randn(GLOBAL, 4, 16)
    z0 = R * z0 / z0.norm(dim=-1, keepdim=True)
    y = torch.arange(GLOBAL) % K
    kw = {"r": R, "alpha": 1.5, "path": "rfm", "label_dropout": 0.5, "null_class": K}
    whole = TD.draw_rows(z0, y, 7, 3, range(GLOBAL), **kw)
    assert (whole[2] == K).any() and (whole[2] != K).any()  # dropout both ways: a real check
    for world in (2, 4):
        parts = [TD.draw_rows(z0[rows.start:rows.stop], y[rows.start:rows.stop], 7, 3, rows,
                              **kw) for rows in _split(world)]
        for got, want in zip((torch.cat(p) for p in zip(*parts, strict=True)), whole,
                             strict=True):
            assert torch.equal(got, want), world
    # and they are the step's: another step, other draws; each row its own
    other = TD.draw_rows(z0, y, 7, 4, range(GLOBAL), **kw)
    assert not torch.allclose(other[0], whole[0]) and not torch.allclose(other[1], whole[1])
    assert len(set(whole[1].tolist())) == GLOBAL


# ---------------------------------------------------------------- AE: stage-4 noise, DiffAugment

def _stand_in(backbone: str) -> SimpleNamespace:
    """What _noise and _aug_rows read of a Stage."""
    return SimpleNamespace(ae=SimpleNamespace(grid=(2, 2), channels=8),
                           args=SimpleNamespace(discriminator={"backbone": backbone}))


def test_stage4_noise_of_a_sample_is_the_same_for_any_world_size():
    st = _stand_in("teacher")
    x = torch.rand(GLOBAL, 3, 16, 16)
    whole, tau = TA._noise(st, x, 5, 10, [0.5, 0.8], (11, 4, 5), range(GLOBAL))
    assert whole.shape == (GLOBAL, 4, 8) and tau == pytest.approx(0.5 + 0.3 * 5 / 9)
    for world in (2, 4):
        parts = [TA._noise(st, x[r.start:r.stop], 5, 10, [0.5, 0.8], (11, 4, 5), r)[0]
                 for r in _split(world)]
        assert torch.equal(torch.cat(parts), whole), world
    # sigma = tau * U(0, 1) per sample: each row's RMS differs
    assert len(set(whole.square().mean(dim=(1, 2)).tolist())) == GLOBAL


@pytest.mark.parametrize("backbone", ["teacher", "dino_vits8"])
def test_diffaug_of_a_sample_is_the_same_for_any_world_size(backbone):
    """The generator step's augmentation (the reconstructions) and the discriminator step's
    (reals, then fakes): each process draws the global batch's parameters from the step's
    generator and applies its rows'."""
    st = _stand_in(backbone)
    dcfg = st.args.discriminator
    x = torch.rand(GLOBAL, 3, 16, 16)
    fake = torch.rand(GLOBAL, 3, 16, 16)

    def augmented(images, rows, fakes_too):
        gen = TA.step_generator(3, 2, 9, torch.device("cpu"))  # each process its own copy
        return apply_aug(dcfg, images, TA._aug_rows(st, images[:len(rows)], gen, rows, GLOBAL,
                                                    fakes_too))

    g_whole = augmented(x, range(GLOBAL), False)
    d_whole = augmented(torch.cat([x, fake]), range(GLOBAL), True)
    for world in (2, 4):
        g = [augmented(x[r.start:r.stop], r, False) for r in _split(world)]
        assert torch.equal(torch.cat(g), g_whole), world
        d = [augmented(torch.cat([x[r.start:r.stop], fake[r.start:r.stop]]), r, True)
             for r in _split(world)]
        assert torch.equal(torch.cat([p[:len(p) // 2] for p in d]), d_whole[:GLOBAL])
        assert torch.equal(torch.cat([p[len(p) // 2:] for p in d]), d_whole[GLOBAL:])
    # the whole-batch draw is the one-call augmentation's (for dino_vits8: RAE's numbers)
    gen = TA.step_generator(3, 2, 9, torch.device("cpu"))
    assert torch.equal(g_whole, (rae_diffaug if backbone == "dino_vits8" else diffaug)(x, gen))
    assert not torch.equal(g_whole[0], g_whole[1])  # per-sample parameters


def test_diffaug_draw_then_apply_is_the_one_call_augmentation():
    x = torch.rand(6, 3, 16, 16)
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    p = draw_aug({"backbone": "teacher"}, 6, (16, 16), g1)
    assert torch.equal(apply_aug({"backbone": "teacher"}, x, p), diffaug(x, g2))


# ---------------------------------------------------------------- data order: the latent reader

def _cache(tmp_path, n: int = 30, unit: int = 4) -> LatentCache:
    """A LatentCache over a plain zarr group whose row r holds the number r (tokens[r, 0, 0]; the
    flipped copy holds 1000 + r): a batch's rows are read off its tokens."""
    g = zarr.open_group(tmp_path / "c.zarr", mode="w")
    tokens = np.zeros((n, 2, 4), dtype=np.float16)
    tokens[:, 0, 0] = np.arange(n)
    g.create_array("tokens", data=tokens, chunks=(1, 2, 4))
    flip = tokens.copy()
    flip[:, 0, 0] += 1000
    g.create_array("tokens_flip", data=flip, chunks=(1, 2, 4))
    g.create_array("labels", data=np.arange(n) % 5)
    lc = LatentCache(tmp_path / "c.zarr", g, {"count": n, "chunk_rows": 1, "unit_rows": unit,
                                               "flip": True})
    lc.check = False
    return lc


def _global_batches(lc: LatentCache, world: int, **kw) -> list[list[int]]:
    """Global batch t = rank 0's t-th batch, then rank 1's, ... (as rows of the reader)."""
    per_rank = [[z[:, 0, 0].int().tolist() for z, _ in
                 lc.batches(GLOBAL // world, rank=r, world_size=world, raw=True, **kw)]
                for r in range(world)]
    assert len({len(b) for b in per_rank}) == 1  # every rank takes as many steps
    return [sum((per_rank[r][t] for r in range(world)), []) for t in range(len(per_rank[0]))]


def _as_row(v: int, n: int = 30) -> int:
    return v if v < 1000 else n + v - 1000


@pytest.mark.parametrize("window", [None, 16])
def test_latent_batches_are_the_same_global_batches_for_world_1_2_4(tmp_path, window):
    lc = _cache(tmp_path)
    kw = {"seed": 5, "epoch": 2, "window": window}
    one = _global_batches(lc, 1, **kw)
    assert len(one) == 60 // GLOBAL  # rows of both copies, whole global batches
    rows = [_as_row(v) for b in one for v in b]
    assert len(set(rows)) == len(rows)  # no row twice in an epoch
    assert rows != sorted(rows)  # shuffled
    for world in (2, 4):
        assert _global_batches(lc, world, **kw) == one, world
    assert _global_batches(lc, 2, seed=5, epoch=3, window=window) != one  # another epoch


# ---------------------------------------------------------------- data order: the image loader

def test_image_loader_gives_the_same_global_batches_for_world_1_2_4(tmp_path):
    from helpers import write_shards

    from dinosae.data.loader import global_batch_loader

    n = 37
    images = np.random.default_rng(0).integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)
    write_shards(tmp_path / "shards", images, np.arange(n) % 3, (9, 7, 12, 9),
                 classes=["a", "b", "c"])

    def global_batches(world: int, workers: int, epoch: int = 1) -> list[torch.Tensor]:
        per_rank = [[(x, k) for x, _, k in global_batch_loader(
            tmp_path / "shards", GLOBAL // world, flip=True, workers=workers,
            rank=r, world_size=world, seed=3, epoch=epoch, with_index=True)]
            for r in range(world)]
        assert len({len(b) for b in per_rank}) == 1
        return [(torch.cat([per_rank[r][t][0] for r in range(world)]),
                 torch.cat([per_rank[r][t][1] for r in range(world)]))
                for t in range(len(per_rank[0]))]

    one = global_batches(1, 0)
    assert len(one) == n // GLOBAL
    keys = torch.cat([k for _, k in one]).tolist()
    assert len(set(keys)) == len(keys) and keys != sorted(keys)
    # the flips: each image as stored or mirrored, both happen
    flipped = []
    for b, ks in one:
        for x, k in zip(b, ks.tolist(), strict=True):
            ref = torch.from_numpy(images[k]).permute(2, 0, 1).float() / 255  # PNG: lossless
            assert torch.equal(x, ref) or torch.equal(x, ref.flip(-1)), k
            flipped.append(not torch.equal(x, ref))
    assert any(flipped) and not all(flipped)
    for world, workers in ((1, 2), (2, 1), (2, 2), (4, 1)):
        got = global_batches(world, workers)
        assert len(got) == len(one)
        for (x, k), (x1, k1) in zip(got, one, strict=True):
            assert torch.equal(k, k1) and torch.equal(x, x1), (world, workers)
    assert [k.tolist() for _, k in global_batches(2, 1, epoch=2)] != [k.tolist() for _, k in one]
