"""The shard loader's batches against an independent reading of the shards: tar members read
with `tarfile` and decoded with PIL, flips drawn from the documented streams
(numpy default_rng([seed, epoch, reader, 1]), one draw per sample in the reader's order), and
orders recorded with the loader before its decode changes (commit aab46e0)."""

from __future__ import annotations

import collections
import io
import itertools
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import SHARED, require_shared, tiny_config
from PIL import Image

from dinosae.data import loader
from dinosae.data.loader import infinite_batches, make_loader
from dinosae.data.shard import shard_split

IMAGENET_SAMPLE = SHARED / "imagenet-sample"
SIZE = 32
N = 27

# keys in the order each rank of 2 (2 workers each) yields them: seed 3, epoch 1, batch 4,
# shuffle buffer 8, drop_last False; recorded with the loader of aab46e0
ORDER = {
    "one": [[8, 20, 0, 24, 21, 1, 9, 13, 16, 4, 12, 17, 5, 25],
            [26, 10, 14, 22, 15, 23, 3, 11, 6, 18, 2, 7, 19]],
    "many": [[1, 15, 10, 2, 23, 3, 5, 4, 17, 11, 16, 9, 21, 22, 0],
             [8, 24, 26, 7, 18, 20, 12, 14, 25, 6, 13, 19]],
}


def _picture(i: int) -> Image.Image:
    """Noise over a colour ramp: every pixel differs from its mirror image."""
    rng = np.random.default_rng(i)
    h, w = 40 + 7 * (i % 5), 40 + 11 * (i % 4)
    ramp = np.linspace(0, 200, w)[None, :, None] * (1 + np.arange(3) * (i % 3 + 1) / 4)
    noise = rng.integers(0, 56, (h, w, 3))
    return Image.fromarray(np.clip(ramp + noise, 0, 255).astype(np.uint8))


def _pil_reference(folder: Path) -> dict[int, tuple[np.ndarray, int]]:
    """{index: (image (H,W,3) uint8, label)} read with tarfile and decoded with PIL."""
    members: dict[str, dict[str, bytes]] = collections.defaultdict(dict)
    for tar_path in sorted(folder.glob("shard-*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                members[key][ext] = tar.extractfile(m).read()
    out = {}
    for key, s in members.items():
        data = s.get("jpg", s.get("png"))
        with Image.open(io.BytesIO(data)) as im:
            out[int(key)] = np.asarray(im.convert("RGB")), int(s["cls"])
    return out


def _shard(tmp: Path, root: Path, out: Path, size: int, **data) -> dict:
    cfg = tiny_config(tmp)
    cfg["data"].update({"root": str(root), "image_size": size, "workers": 2} | data)
    shard_split(cfg, "train", out)
    return _pil_reference(out)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """Folders of one shard (readers split it by sample) and of 9 (readers take whole shards)."""
    tmp = tmp_path_factory.mktemp("loader")
    for i in range(N):
        path = tmp / "in" / "train" / "abc"[i % 3] / f"img_{i:03d}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        _picture(i).save(path, quality=95)
    out = {name: (tmp / name, _shard(tmp, tmp / "in", tmp / name, SIZE, shard_max_bytes=mb))
           for name, mb in [("one", 10**7), ("many", 20000)]}
    assert len(list((tmp / "many").glob("*.tar"))) > 4 > len(list((tmp / "one").glob("*.tar")))
    return out


def _check(batches, expected: dict, readers: int, seed: int, epoch: int,
           flip: bool | None) -> list[int]:
    """Every image is exactly its PIL decode or, by flip: never (False), either way (None), or
    mirrored when its reader's next draw is < 0.5 (True; one shard: reader = key % readers).
    Returns the keys in order."""
    draws = {r: np.random.default_rng([seed, epoch, r, 1]) for r in range(readers)}
    keys = []
    for images, labels, idx in batches:
        assert images.dtype == torch.float32 and labels.dtype == torch.int64
        assert idx.dtype == torch.int64 and images.shape[1:] == (3, *expected[0][0].shape[:2])
        for img, label, key in zip(images, labels.tolist(), idx.tolist(), strict=True):
            ref, ref_label = expected[key]
            assert label == ref_label
            mirrored = flip and draws[key % readers].random() < 0.5
            candidates = [ref[:, ::-1]] if mirrored else [ref] + ([ref[:, ::-1]] if flip is None
                                                                   else [])
            assert any(torch.equal(img, torch.from_numpy(np.array(c)).permute(2, 0, 1) / 255)
                       for c in candidates), (key, mirrored)
            keys.append(key)
    return keys


def test_turbo_decoder_is_used():
    """The fast path is on here (else every test below checks only the PIL fallback)."""
    assert loader.decode_jpeg is not None and loader._turbo_decodes_like_pil(), (
        "torchvision's JPEG decoder differs from PIL's here: the loader falls back to PIL")


@pytest.mark.parametrize("layout", ["one", "many"])
def test_order_pixels_and_flips_per_rank(shards, layout):
    folder, expected = shards[layout]
    seen = []
    for rank in range(2):
        batches = make_loader(folder, 4, train=True, flip=True, shuffle_buffer=8, workers=2,
                              rank=rank, world_size=2, seed=3, epoch=1, drop_last=False,
                              with_index=True)
        # one shard: readers (rank * 2 + worker) are told apart by key; many: whole shards
        keys = _check(batches, expected, 4, 3, 1, True if layout == "one" else None)
        assert keys == ORDER[layout][rank]
        seen += keys
    assert sorted(seen) == list(range(N))


def test_endless_stream_reuses_batches_safely(shards):
    """Many more batches than a worker's pool holds, across epochs: each image still exact."""
    folder, expected = shards["one"]
    stream = infinite_batches(folder, 4, workers=2, seed=5, epoch=2, shuffle_buffer=8,
                              with_index=True)
    keys = _check(itertools.islice(stream, 6 * N // 4), expected, 2, 5, 2, True)
    assert set(collections.Counter(keys[:3 * N]).values()) >= {2, 3}  # epochs run on


def test_eval_batches_and_pil_fallback(shards, monkeypatch):
    folder, expected = shards["many"]
    kw = dict(train=False, workers=0, drop_last=False, with_index=True)
    fast = list(make_loader(folder, 5, **kw))
    assert _check(fast, expected, 1, 0, 0, False) == list(range(N))
    monkeypatch.setattr(loader, "_turbo_decodes_like_pil", lambda: False)
    slow = list(make_loader(folder, 5, **kw))
    assert all(torch.equal(a, b) for f, s in zip(fast, slow, strict=True)
               for a, b in zip(f, s, strict=True))


def test_a_decoder_unlike_pil_is_not_used(monkeypatch):
    black = torch.zeros((3, 37, 53), dtype=torch.uint8)
    monkeypatch.setattr(loader, "_turbo_chw", lambda data: black)
    with pytest.warns(RuntimeWarning, match="unlike PIL"):
        assert not loader._turbo_decodes_like_pil.__wrapped__()


def test_batch_pool_refills_only_released_batches():
    pool = loader._BatchPool(2)
    a, a_done = pool.take((2, 3, 4, 4))
    b, _ = pool.take((2, 3, 4, 4))
    assert a.data_ptr() != b.data_ptr()
    c, _ = pool.take((2, 3, 4, 4))  # pool full, none released: a fresh one
    assert c.data_ptr() not in (a.data_ptr(), b.data_ptr())
    a_done.fill_(1)
    assert pool.take((1, 3, 4, 4))[0].data_ptr() not in (a.data_ptr(), b.data_ptr())  # shape
    again, again_done = pool.take((2, 3, 4, 4))
    assert again.data_ptr() == a.data_ptr() and again_done.item() == 0


def test_converted_batches_go_back_to_the_pool(shards, monkeypatch):
    """The main process releases each batch once converted: a stream allocates no more tensors
    than one pool holds (in-process here; workers get theirs by the same flag)."""
    made = []
    make = loader._uint8_tensor
    monkeypatch.setattr(loader, "_uint8_tensor", lambda shape: made.append(shape) or make(shape))
    stream = infinite_batches(shards["one"][0], 4, workers=0, shuffle_buffer=8)
    for _ in range(3 * N // 4):
        next(stream)
    assert 0 < len(made) <= 2 * loader._POOL  # images and their flags


def test_real_imagenet_sample_at_256(tmp_path):
    """Real photographs (some grayscale at the source) at full size: exact PIL pixels, flips."""
    require_shared(IMAGENET_SAMPLE)
    expected = _shard(tmp_path, IMAGENET_SAMPLE, tmp_path / "s", 256)
    batches = make_loader(tmp_path / "s", 16, train=True, flip=True, workers=0, seed=1,
                          drop_last=False, with_index=True)
    assert sorted(_check(batches, expected, 1, 1, 0, True)) == sorted(expected)
