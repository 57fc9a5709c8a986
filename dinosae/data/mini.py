"""The embedded dataset: random crops of the photographs that ship inside scikit-image, one class
per photograph, written in the ImageNet folder layout (`train/<class>/<class>_<i>.JPEG`).

It exists so that the whole pipeline runs offline on a laptop; it is not a benchmark.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from dinosae.outputs import names_only, replace_dir, writing

log = logging.getLogger(__name__)

# (class name, loader) in a fixed order. camera and coins are grayscale and stay grayscale on disk.
# Photos whose data scikit-image would have to download (pooch) are skipped when they fail.
PHOTOS: list[tuple[str, Callable[[], np.ndarray]]] = [
    ("astronaut", lambda: _skimage("astronaut")),
    ("camera", lambda: _skimage("camera")),
    ("chelsea", lambda: _skimage("chelsea")),
    ("coffee", lambda: _skimage("coffee")),
    ("coins", lambda: _skimage("coins")),
    ("hubble", lambda: _skimage("hubble_deep_field")),
    ("immunohistochemistry", lambda: _skimage("immunohistochemistry")),
    ("motorcycle", lambda: _skimage("stereo_motorcycle")[0]),
    ("retina", lambda: _skimage("retina")),
    ("rocket", lambda: _skimage("rocket")),
]
SPLITS = ("train", "val")


def _skimage(name: str):
    import skimage.data

    return getattr(skimage.data, name)()


def load_photos() -> list[tuple[str, Image.Image]]:
    """The photographs that load offline, as PIL images (mode RGB or L), in PHOTOS order."""
    photos = []
    for name, loader in PHOTOS:
        try:
            arr = np.asarray(loader())
        except Exception as e:  # a photo that needs a download (pooch) is skipped
            log.warning("scikit-image photo %r unavailable, skipped: %s", name, e)
            continue
        if arr.dtype != np.uint8 or arr.ndim not in (2, 3):
            log.warning("scikit-image photo %r is %s %s, skipped", name, arr.shape, arr.dtype)
            continue
        photos.append((name, Image.fromarray(arr[..., :3] if arr.ndim == 3 else arr)))
    if len(photos) < 2:
        raise RuntimeError(f"only {len(photos)} scikit-image photos could be loaded; need >= 2")
    return photos


def random_crop(photo: Image.Image, rng: np.random.Generator, size: int, min_scale: float,
                max_scale: float) -> Image.Image:
    """A square crop of side scale * shorter side (scale ~ U[min_scale, max_scale]) at a uniform
    position, flipped horizontally with probability 1/2, resized to size x size."""
    w, h = photo.size
    side = max(1, round(rng.uniform(min_scale, max_scale) * min(w, h)))
    x0 = int(rng.integers(0, w - side + 1))
    y0 = int(rng.integers(0, h - side + 1))
    flip = bool(rng.random() < 0.5)
    crop = photo.crop((x0, y0, x0 + side, y0 + side)).resize((size, size), Image.BICUBIC)
    return crop.transpose(Image.FLIP_LEFT_RIGHT) if flip else crop


def _first_foreign(out: Path) -> str | None:
    """The first entry of `out` that build_mini_dataset does not write (None: it is a mini
    dataset): only train/ and val/, class folders named for PHOTOS, `<class>_NNNN.JPEG` files."""
    foreign = names_only(*SPLITS)(out)
    if foreign is not None:
        return foreign
    for split in SPLITS:
        if not (out / split).is_dir():
            continue
        with os.scandir(out / split) as classes:
            for c in classes:
                if c.name not in {name for name, _ in PHOTOS} or not c.is_dir():
                    return f"{split}/{c.name}"
                bad = names_only(rf"{re.escape(c.name)}_\d{{4}}\.JPEG")(Path(c.path))
                if bad is not None:
                    return f"{split}/{c.name}/{bad}"
    return None


_first_foreign.accepts = names_only(*SPLITS).accepts  # type: ignore[attr-defined]


def build_mini_dataset(cfg: dict, out: str | Path, force: bool = False) -> None:
    """Write `out/train/<class>/*.JPEG` and `out/val/<class>/*.JPEG` (config sections: seed, data).

    Same seed and settings give byte-identical files. Built in a temporary folder that is renamed
    to `out` when complete. `out` is locked meanwhile; an existing `out` that is not a mini
    dataset is refused (`force`: replaced).
    """
    with writing(out, "mini-dataset", _first_foreign, force=force):
        _build(cfg, Path(out))


def _build(cfg: dict, out: Path) -> None:
    mini = cfg["data"]["mini"]
    seed = int(cfg.get("seed", 0))
    counts = {"train": mini["train_per_class"], "val": mini["val_per_class"]}
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        photos = load_photos()
        for name, photo in photos:
            for split_id, split in enumerate(SPLITS):
                # Seeded by the class *name*, so a skipped photo does not change the others' crops.
                rng = np.random.default_rng([seed, zlib.crc32(name.encode()), split_id])
                folder = tmp / split / name
                folder.mkdir(parents=True)
                for i in range(counts[split]):
                    crop = random_crop(photo, rng, mini["crop_size"], mini["min_scale"],
                                       mini["max_scale"])
                    crop.save(folder / f"{name}_{i:04d}.JPEG", format="JPEG", quality=95)
        log.info("mini dataset: %d classes (%s), %d train + %d val per class", len(photos),
                 ", ".join(n for n, _ in photos), counts["train"], counts["val"])
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, out)
