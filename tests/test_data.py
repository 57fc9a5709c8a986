"""Data stage: folder scan, embedded dataset, sharding, loader.

Shards are checked by reading the tars with the standard `tarfile` module and decoding with PIL,
against a folder listing done here with os.walk.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import SHARED, require_shared, tiny_config
from PIL import Image

from dinosae.data.loader import infinite_batches, make_loader
from dinosae.data.mini import build_mini_dataset
from dinosae.data.shard import read_manifest, shard_split

IMAGENET_SAMPLE = SHARED / "imagenet-sample"
SIZE = 32
EXTS = (".JPEG", ".jpg", ".png", ".Jpeg", ".PNG")
SHAPES = ((40, 56), (90, 64), (64, 150), (33, 33), (200, 120))  # (w, h); some >= 2*SIZE


def _config(tmp: Path, root: Path, **data) -> dict:
    cfg = tiny_config(tmp)
    cfg["data"].update({"root": str(root), "image_size": SIZE, "workers": 2} | data)
    return cfg


def _colour(i: int) -> tuple[int, int, int]:
    """Distinct flat colours (>= 40 apart in some channel) identify the images."""
    return 20 + 40 * (i % 6), 20 + 40 * (i // 6 % 6), 20 + 40 * (i // 36 % 6)


def _flat(i: int, shape=(40, 56)) -> Image.Image:
    return Image.new("RGB", shape, _colour(i))


def _ramp(i: int, shape=(40, 56)) -> Image.Image:
    """Colour i fading to black from right to left: a horizontal flip shows."""
    w, h = shape
    fade = np.linspace(0.2, 1.0, w)[None, :, None]
    return Image.fromarray(np.broadcast_to(fade * _colour(i), (h, w, 3)).astype(np.uint8))


def _save(img: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".png":
        img.save(path, format="PNG")
    else:
        img.save(path, format="JPEG", quality=95)


def _make_folder(root: Path, classes=("n02", "n01", "n03"), per_class=(5, 7, 4), split="train",
                 draw=_flat):
    """ImageNet layout with flat-colour images of mixed extensions and sizes; returns the
    colour of each file."""
    colours, i = {}, 0
    for wnid, n in zip(classes, per_class, strict=True):
        for j in range(n):
            path = root / split / wnid / f"img_{j:03d}{EXTS[(i + j) % len(EXTS)]}"
            _save(draw(i, SHAPES[i % len(SHAPES)]), path)
            colours[str(path)] = _colour(i)
            i += 1
    return colours


def _read_tars(folder: Path) -> dict[str, dict[str, bytes]]:
    """{key: {ext: bytes}} over every shard tar, with the standard tarfile module only."""
    samples: dict[str, dict[str, bytes]] = {}
    for tar_path in sorted(folder.glob("shard-*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                assert m.isfile() and not m.pax_headers, m.name  # plain ustar members
                assert "/" not in m.name and not m.name.startswith("/") and ".." not in m.name
                key, ext = m.name.split(".", 1)
                assert ext not in samples.setdefault(key, {}), f"duplicate {m.name}"
                samples[key][ext] = tar.extractfile(m).read()
    return samples


def _decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        assert im.mode == "RGB", im.mode
        return np.asarray(im)


def _walk(root: Path, split: str) -> list[tuple[str, str]]:
    """(path, wnid) of every file, sorted by (wnid, filename): the order the manifest promises."""
    out = []
    for dirpath, _, files in os.walk(root / split):
        out += [(os.path.join(dirpath, f), Path(dirpath).name) for f in files]
    return sorted(out, key=lambda pw: (pw[1], os.path.basename(pw[0])))


# ----------------------------------------------------------------------------------- sharding

@pytest.mark.parametrize("max_bytes,max_count", [(11000, 100), (10**6, 4)])
def test_every_image_once_with_its_label(tmp_path, max_bytes, max_count):
    colours = _make_folder(tmp_path / "in")
    cfg = _config(tmp_path, tmp_path / "in", shard_max_bytes=max_bytes, shard_max_count=max_count)
    out = tmp_path / "shards"
    shard_split(cfg, "train", out)

    files = _walk(tmp_path / "in", "train")
    classes = sorted({w for _, w in files})
    samples = _read_tars(out)
    assert sorted(samples) == [f"{i:08d}" for i in range(len(files))]
    for i, (path, wnid) in enumerate(files):
        s = samples[f"{i:08d}"]
        assert set(s) == {"jpg", "cls"}
        assert int(s["cls"]) == classes.index(wnid)
        img = _decode(s["jpg"])
        assert img.shape == (SIZE, SIZE, 3)
        assert np.abs(img.reshape(-1, 3).mean(0) - colours[path]).max() < 6, path

    m = json.loads((out / "manifest.json").read_text())
    assert m["format"] == "dinosae-shards" and m["version"] == 1 and m["split"] == "train"
    assert m["count"] == len(files) and m["classes"] == classes and m["skipped"] == []
    assert m["class_counts"] == dict(collections.Counter(w for _, w in files))
    assert m["preprocess"] == {"image_size": SIZE, "format": "jpeg", "quality": 95,
                               "resize": "adm-center-crop"}
    assert [s["name"] for s in m["shards"]] == sorted(p.name for p in out.glob("*.tar"))
    first = 0
    for s in m["shards"]:
        data = (out / s["name"]).read_bytes()
        assert s["sha256"] == hashlib.sha256(data).hexdigest() and s["bytes"] == len(data)
        assert len(data) <= max_bytes and 1 <= s["count"] <= max_count
        assert s["first_index"] == first
        first += s["count"]
    assert len(m["shards"]) > 1
    assert read_manifest(out, verify=True)["count"] == len(files)


def _adm_reference(img: Image.Image, size: int) -> np.ndarray:
    """ADM's center_crop_arr, written out here for an exact comparison."""
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = size / min(img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)
    a = np.array(img)
    y, x = (a.shape[0] - size) // 2, (a.shape[1] - size) // 2
    return a[y:y + size, x:x + size]


def test_png_output_is_the_adm_center_crop(tmp_path):
    rng = np.random.default_rng(0)
    imgs = {f"c{k}/x.png": Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            for k, (w, h) in enumerate([(150, 100), (64, 200), (40, 33)])}
    for name, img in imgs.items():
        _save(img, tmp_path / "in" / "train" / name)
    cfg = _config(tmp_path, tmp_path / "in", format="png", workers=1)
    shard_split(cfg, "train", tmp_path / "s")
    samples = _read_tars(tmp_path / "s")
    for i, name in enumerate(sorted(imgs)):
        np.testing.assert_array_equal(_decode(samples[f"{i:08d}"]["png"]),
                                      _adm_reference(imgs[name], SIZE))


def test_val_format_png_keeps_val_lossless(tmp_path):
    # data.val_format: png with format jpeg: train stays JPEG, val holds the crop's own pixels
    rng = np.random.default_rng(1)
    imgs = {f"c{k}/x.png": Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8))
            for k in range(2)}
    for split in ("train", "val"):
        for name, img in imgs.items():
            _save(img, tmp_path / "in" / split / name)
    cfg = _config(tmp_path, tmp_path / "in", format="jpeg", val_format="png", workers=1)
    for split in ("train", "val"):
        shard_split(cfg, split, tmp_path / split)
    train, val = _read_tars(tmp_path / "train"), _read_tars(tmp_path / "val")
    assert all(set(s) == {"jpg", "cls"} for s in train.values())
    assert read_manifest(tmp_path / "val")["preprocess"]["format"] == "png"
    for i, name in enumerate(sorted(imgs)):
        np.testing.assert_array_equal(_decode(val[f"{i:08d}"]["png"]),
                                      _adm_reference(imgs[name], SIZE))


def test_bad_files_are_listed_and_good_ones_kept(tmp_path):
    root = tmp_path / "in"
    _make_folder(root, classes=("a", "b"), per_class=(6, 6))
    good = _walk(root, "train")
    full = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (80, 80, 3), dtype=np.uint8)).save(
        full, format="JPEG")
    bad = {
        "a/truncated.JPEG": full.getvalue()[: len(full.getvalue()) // 2],
        "a/empty.JPEG": b"",
        "b/notes.JPEG": b"this is a text file, not a JPEG\n" * 20,
    }
    for name, data in bad.items():
        (root / "train" / name).write_bytes(data)
    (root / "train" / "b" / "readme.txt").write_text("not an image")
    cfg = _config(tmp_path, root, max_bad_fraction=0.5)
    m = shard_split(cfg, "train", tmp_path / "s")

    reasons = {s["path"]: s["reason"] for s in m["skipped"]}
    expected = {os.path.join("train", n) for n in [*bad, "b/readme.txt"]}
    assert set(reasons) == expected
    assert all(reasons.values())
    assert "empty" in reasons[os.path.join("train", "a/empty.JPEG")]
    samples = _read_tars(tmp_path / "s")
    assert m["count"] == len(samples) == len(good)
    labels = [int(samples[f"{i:08d}"]["cls"]) for i in range(len(good))]
    assert labels == [["a", "b"].index(w) for _, w in good]


def _png16(path: Path, rgb: np.ndarray) -> None:
    """A 48-bit RGB PNG written by hand (PIL cannot write them)."""
    import struct
    import zlib

    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)  # 16 bits per channel, RGB
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_any_colour_mode_becomes_rgb(tmp_path):
    d = tmp_path / "in" / "train"
    for c in "abcdefgh":
        (d / c).mkdir(parents=True)
    Image.new("L", (50, 40), 100).save(d / "a" / "grey.JPEG", quality=95)
    Image.new("CMYK", (50, 40), (0, 255, 255, 0)).save(d / "b" / "cmyk.JPEG", quality=95)
    Image.new("RGBA", (50, 40), (10, 200, 30, 0)).save(d / "c" / "transparent.png")
    pal = Image.new("P", (50, 40), 0)
    pal.putpalette([200, 100, 50] + [0] * 765)
    pal.save(d / "d" / "palette.png")
    Image.fromarray(np.full((40, 50), 32768, np.uint16)).save(d / "e" / "grey16.png")
    _png16(d / "f" / "rgb48.png", np.full((40, 50, 3), [65535, 0, 32768], np.uint16))
    Image.new("1", (50, 40), 1).save(d / "g" / "bilevel.png")
    Image.new("LA", (50, 40), (40, 255)).save(d / "h" / "grey_alpha.png")
    modes = {p.parent.name: Image.open(p).mode for p in d.rglob("*.*")}
    assert modes == {"a": "L", "b": "CMYK", "c": "RGBA", "d": "P", "e": "I;16", "f": "RGB",
                     "g": "1", "h": "LA"}

    shard_split(_config(tmp_path, tmp_path / "in", format="png"), "train", tmp_path / "s")
    samples = _read_tars(tmp_path / "s")
    assert len(samples) == 8
    mean = {c: _decode(samples[f"{i:08d}"]["png"]).reshape(-1, 3).mean(0)
            for i, c in enumerate("abcdefgh")}
    expect = {"a": (100, 100, 100), "b": (255, 0, 0), "c": (255, 255, 255), "d": (200, 100, 50),
              "e": (128, 128, 128), "f": (255, 0, 128), "g": (255, 255, 255), "h": (40, 40, 40)}
    for c, rgb in expect.items():
        assert np.abs(mean[c] - rgb).max() <= 3, (c, mean[c], rgb)


def test_val_label_file_layout(tmp_path):
    root = tmp_path / "in"
    _make_folder(root, classes=("n01", "n02", "n03"), per_class=(2, 2, 2))
    rows, wnid_of = ["ImageId,PredictionString"], {}
    for i, wnid in enumerate(["n03", "n02", "n03", "n02", "n03"]):  # no n01 in val
        image_id = f"ILSVRC2012_val_{i + 1:08d}"
        _save(_flat(i), root / "val" / f"{image_id}.JPEG")
        rows.append(f"{image_id},{wnid} 1 2 30 40 {wnid} 5 6 70 80")
        wnid_of[f"{image_id}.JPEG"] = wnid
    (root / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    cfg = _config(tmp_path, root, val_labels=str(root / "LOC_val_solution.csv"))
    m = shard_split(cfg, "val", tmp_path / "val")

    assert m["classes"] == ["n01", "n02", "n03"]  # the train folder's, so indices agree
    order = sorted(wnid_of, key=lambda f: (wnid_of[f], f))
    samples = _read_tars(tmp_path / "val")
    assert len(samples) == len(order)
    for i, f in enumerate(order):
        assert int(samples[f"{i:08d}"]["cls"]) == ["n01", "n02", "n03"].index(wnid_of[f])
        colour = _colour(int(f[-10:-5]) - 1)
        assert np.abs(_decode(samples[f"{i:08d}"]["jpg"]).reshape(-1, 3).mean(0) - colour).max() < 6


def test_too_many_bad_files_or_none_is_an_error(tmp_path):
    root = tmp_path / "in"
    _make_folder(root, classes=("a",), per_class=(4,))
    for k in range(2):
        (root / "train" / "a" / f"bad{k}.JPEG").write_bytes(b"garbage")
    out = tmp_path / "s"
    with pytest.raises(ValueError, match="max_bad_fraction"):
        shard_split(_config(tmp_path, root, max_bad_fraction=0.2, workers=1), "train", out)
    assert not (out / "manifest.json").exists() and not list(out.glob("*.tar*"))
    assert not list(out.glob(".*"))

    (tmp_path / "empty" / "train" / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match="no image files"):
        shard_split(_config(tmp_path, tmp_path / "empty"), "train", tmp_path / "s2")
    assert not (tmp_path / "s2" / "manifest.json").exists()
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        read_manifest(tmp_path / "s2")


def test_rerun_gives_identical_shards(tmp_path):
    _make_folder(tmp_path / "in")
    cfg = _config(tmp_path, tmp_path / "in", shard_max_bytes=11000)
    a, b = tmp_path / "a", tmp_path / "b"
    shard_split(cfg, "train", a)
    first = {p.name: p.read_bytes() for p in a.iterdir()}
    # a killed run leaves a temporary tar and stale shards behind; the rerun replaces them
    (a / "manifest.json").unlink()
    (a / ".shard-000001.tar.tmp999").write_bytes(b"partial")
    (a / "shard-000099.tar").write_bytes(b"stale")
    shard_split(cfg, "train", a)
    assert {p.name: p.read_bytes() for p in a.iterdir()} == first
    cfg["data"]["workers"] = 1  # parallelism does not change the bytes
    shard_split(cfg, "train", b)
    assert {p.name: p.read_bytes() for p in b.iterdir()} == first
    assert len(list(b.glob("*.tar"))) > 1


def test_read_manifest_refuses_a_damaged_folder(tmp_path):
    _make_folder(tmp_path / "in", classes=("a",), per_class=(3,))
    shard_split(_config(tmp_path, tmp_path / "in"), "train", tmp_path / "s")
    tar = next((tmp_path / "s").glob("*.tar"))
    full = tar.read_bytes()
    tar.write_bytes(full[:-512])
    with pytest.raises(ValueError, match=f"{len(full) - 512} bytes.*records {len(full)} .trunc"):
        read_manifest(tmp_path / "s")
    tar.unlink()
    with pytest.raises(ValueError, match=f"{tar.name}: missing"):
        read_manifest(tmp_path / "s")


# ------------------------------------------------------------------------------------- loader

@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """One folder with many shards (whole-shard split) and one with a single shard (split by
    sample), with the images each sample must decode to, read with tarfile + PIL."""
    tmp = tmp_path_factory.mktemp("loader")
    _make_folder(tmp / "in", classes=("a", "b", "c"), per_class=(9, 8, 10), draw=_ramp)
    out = {}
    for name, max_bytes in [("many", 6000), ("one", 10**7)]:
        shard_split(_config(tmp, tmp / "in", shard_max_bytes=max_bytes), "train", tmp / name)
        samples = _read_tars(tmp / name)
        out[name] = (tmp / name, {int(k): (_decode(s["jpg"]), int(s["cls"]))
                                  for k, s in samples.items()})
    assert len(list((tmp / "many").glob("*.tar"))) >= 4 > len(list((tmp / "one").glob("*.tar")))
    return out


@pytest.mark.parametrize("layout", ["many", "one"])
def test_loader_two_ranks_two_workers_each_sample_once(shards, layout):
    folder, expected = shards[layout]
    torch.manual_seed(0)
    seen, flipped = collections.Counter(), 0
    for rank in range(2):
        loader = make_loader(folder, 4, train=True, flip=True, shuffle_buffer=8, workers=2,
                             rank=rank, world_size=2, seed=3, epoch=1, drop_last=False,
                             with_index=True)
        batches = 0
        for images, labels, keys in loader:
            batches += 1
            assert images.dtype == torch.float32 and labels.dtype == torch.int64
            assert images.shape[1:] == (3, SIZE, SIZE) and 0 <= images.min() <= images.max() <= 1
            for img, label, key in zip(images, labels.tolist(), keys.tolist(), strict=True):
                ref, ref_label = expected[key]
                assert label == ref_label
                got = (img.permute(1, 2, 0) * 255).round().numpy()
                same = np.abs(got - ref).max() <= 2
                mirrored = np.abs(got - ref[:, ::-1]).max() <= 2
                assert same or mirrored, key
                flipped += mirrored and not same
            seen.update(keys.tolist())
        assert batches == len(loader)
    assert sorted(seen) == sorted(expected) and set(seen.values()) == {1}
    assert 0 < flipped < len(expected)


def test_loader_eval_order_and_infinite_epochs(shards):
    folder, expected = shards["one"]
    n = len(expected)
    loader = make_loader(folder, 5, train=False, workers=0, drop_last=True, with_index=True)
    keys = [k for _, _, ks in loader for k in ks.tolist()]
    assert keys == list(range(n // 5 * 5))  # fixed order, the partial batch dropped
    stream = infinite_batches(folder, 4, workers=0, shuffle_buffer=0, with_index=True)
    keys = []
    while len(keys) < 2 * n:
        keys += next(stream)[2].tolist()
    counts = collections.Counter(keys[: 2 * n])
    assert set(counts) == set(expected) and set(counts.values()) == {2}


# -------------------------------------------------------------------------------- mini dataset

def test_mini_dataset_is_deterministic(tmp_path):
    cfg = tiny_config(tmp_path)
    cfg["data"]["mini"].update(train_per_class=3, val_per_class=2, crop_size=40)
    build_mini_dataset(cfg, tmp_path / "a")
    build_mini_dataset(cfg, tmp_path / "b")
    cfg["seed"] = 1
    build_mini_dataset(cfg, tmp_path / "c")

    def files(d):
        return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}

    a, b, c = files(tmp_path / "a"), files(tmp_path / "b"), files(tmp_path / "c")
    assert a == b and a.keys() == c.keys() and a != c
    classes = sorted(p.name for p in (tmp_path / "a" / "train").iterdir())
    assert len(classes) >= 5 and "camera" in classes
    assert sorted(p.name for p in (tmp_path / "a" / "val").iterdir()) == classes
    for split, n in [("train", 3), ("val", 2)]:
        for cls in classes:
            names = sorted(p.name for p in (tmp_path / "a" / split / cls).iterdir())
            assert names == [f"{cls}_{i:04d}.JPEG" for i in range(n)]
    modes = {}
    for rel, data in a.items():
        with Image.open(io.BytesIO(data)) as im:
            assert im.format == "JPEG" and im.size == (40, 40)
            modes[rel.split(os.sep)[1]] = im.mode
    assert modes["camera"] == "L" and modes["astronaut"] == "RGB"
    assert len(set(a.values())) == len(a)  # crops differ
    assert not list(tmp_path.glob(".*"))  # no temporary folder left


# ---------------------------------------------------------------------------------- real data

def test_real_imagenet_sample(tmp_path):
    require_shared(IMAGENET_SAMPLE)
    files = [(p, w) for p, w in _walk(IMAGENET_SAMPLE, "train")]
    grey = []
    for p, _ in files:
        with Image.open(p) as im:
            grey += [p] if im.mode != "RGB" else []
    m = shard_split(_config(tmp_path, IMAGENET_SAMPLE), "train", tmp_path / "s")
    samples = _read_tars(tmp_path / "s")
    classes = sorted({w for _, w in files})
    assert m["skipped"] == [] and m["count"] == len(files) == len(samples)
    assert grey, "the sample is expected to hold grayscale JPEGs"
    for i, (_, wnid) in enumerate(files):
        s = samples[f"{i:08d}"]
        assert int(s["cls"]) == classes.index(wnid)
        assert _decode(s["jpg"]).shape == (SIZE, SIZE, 3)
