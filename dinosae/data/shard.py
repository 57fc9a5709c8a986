"""ImageNet-style folder -> webdataset tars of preprocessed images + manifest.json.

Sample `i` (global index in sorted (wnid, filename) order, counting good images only) is stored as
`{i:08d}.jpg` (or `.png`) and `{i:08d}.cls` (class index, decimal text). Tars are written under a
temporary name and renamed when complete; `manifest.json` is written last and marks the split as
done. Tar headers are fixed (mtime 0, uid/gid 0, fixed user/group), so a rerun writes identical
bytes; members are plain ustar entries (short ASCII names, integer mtime: no pax headers), which
the loader's tar reader relies on.

Tars are written with webdataset's `TarWriter` (fixed mtime/user/group make it deterministic);
the roll-over to the next shard is done here rather than with `ShardWriter`, which writes straight
to the final names and only rolls over after a shard has exceeded its size.

Images are untrusted: a file is opened without blocking and must be a regular file; its size in
pixels is read from its header before anything is decoded, and an image above `data.max_pixels`
is skipped (listed with the reason), as is every file that cannot be read. A JPEG of more than
DRAFT_ABOVE_PIXELS is decoded at 1/2, 1/4 or 1/8 scale (PIL's draft mode), keeping at least
DRAFT_MARGIN x image_size pixels on its short side, for a fraction of the memory: the ADM
box-halvings that follow then give images darker by about one grey level on average than a full
decode (at most 3-4 levels; measured on 4x and 8x upscaled photographs), so smaller JPEGs (all of
ImageNet) are decoded in full, exactly as before.
The output folder is locked while it is written and must be a shard folder or empty
(dinosae.outputs).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import math
import multiprocessing
import os
import re
import stat
import tarfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from dinosae.data.folder import class_dirs, scan_imagenet_folder, special_reason
from dinosae.errors import DataError, MissingShards
from dinosae.faults import fault_point
from dinosae.files import atomic_write_text, sha256_file
from dinosae.outputs import names_only, writing
from dinosae.progress import Progress

log = logging.getLogger(__name__)

FORMAT, VERSION = "dinosae-shards", 1
MANIFEST = "manifest.json"
EXT = {"jpeg": "jpg", "png": "png"}
_BLOCK, _RECORD = 512, 10240  # tar block and record sizes (bytes)


SHARD_NAME = re.compile(r"shard-\d{6}\.tar")
MEMBER_NAME = re.compile(r"(\d{8})\.(jpg|png|cls)")
DEFAULT_MAX_PIXELS = 50_000_000  # data.max_pixels when the config has none
DRAFT_ABOVE_PIXELS = 16_000_000  # JPEGs larger than this are decoded in draft mode
DRAFT_MARGIN = 4  # JPEG draft decoding keeps at least this many times image_size (short side)
# what a shard folder holds (and temporaries): anything else there is not ours to replace
SHARD_FOLDER = names_only(SHARD_NAME.pattern, re.escape(MANIFEST), r"\.progress\.json")


# ---------------------------------------------------------------- preprocessing (in the workers)

def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL image -> 8-bit RGB. 16-bit grey is scaled to 8 bits (not clipped); transparent
    images are composited over white; CMYK, palette, grey and bilevel go through PIL's convert."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.clip(np.asarray(im, dtype=np.int64), 0, 65535)
        im = Image.fromarray(((a * 255 + 32767) // 65535).astype(np.uint8), "L")
    elif im.mode == "F":
        im = Image.fromarray(np.clip(np.asarray(im), 0, 255).round().astype(np.uint8), "L")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)),
                                   im.convert("RGBA"))
    return im if im.mode == "RGB" else im.convert("RGB")


def center_crop_adm(im: Image.Image, size: int) -> np.ndarray:
    """ADM (guided-diffusion) preprocessing: halve with a box filter while the short side is at
    least 2*size, bicubic-resize the short side to `size`, center crop. Returns (size, size, 3)."""
    while min(im.size) >= 2 * size:
        im = im.resize((im.width // 2, im.height // 2), Image.BOX)
    scale = size / min(im.size)
    im = im.resize((round(im.width * scale), round(im.height * scale)), Image.BICUBIC)
    arr = np.asarray(im)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top:top + size, left:left + size]


def encode(arr: np.ndarray, fmt: str, quality: int) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpeg":
        Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    else:
        Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _draft(im: Image.Image, size: int) -> None:
    """Let a JPEG of more than DRAFT_ABOVE_PIXELS decode at 1/2, 1/4 or 1/8 scale, keeping
    >= DRAFT_MARGIN x size on its short side (see the module doc)."""
    w, h = im.size
    keep = DRAFT_MARGIN * size
    if im.format == "JPEG" and w * h > DRAFT_ABOVE_PIXELS and min(w, h) >= 2 * keep:
        short = min(w, h)
        im.draft(im.mode, (math.ceil(w * keep / short), math.ceil(h * keep / short)))


def over_cap(w: int, h: int, max_pixels: int) -> str:
    return f"{w}x{h} = {w * h} pixels, over data.max_pixels ({max_pixels}); not decoded"


def prepare(path: str, size: int, fmt: str, quality: int,
            max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[bytes | None, str | None]:
    """Read, convert, resize, crop and encode one image: (bytes, None) or (None, reason).
    Only a regular file is read, and only when its header gives at most `max_pixels`."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO must not block the job
    except OSError as e:
        return None, f"cannot be opened ({e.strerror})"
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None, special_reason(st.st_mode)
        if st.st_size == 0:
            return None, "empty file (0 bytes)"
        Image.MAX_IMAGE_PIXELS = max_pixels  # PIL's own bomb check agrees (it errs above 2x)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(f) as im:  # reads the header only
                    w, h = im.size
                    if w * h > max_pixels:
                        return None, over_cap(w, h, max_pixels)
                    _draft(im, size)
                    im.load()  # decodes everything: a truncated or corrupt file fails here
                    arr = center_crop_adm(to_rgb(im), size)
            return encode(np.ascontiguousarray(arr), fmt, quality), None
        except Image.DecompressionBombError as e:
            return None, f"over data.max_pixels ({max_pixels}); not decoded ({e})"
        except Exception as e:  # any failure to read one file skips that file, with the reason
            return None, f"{type(e).__name__}: {e}"


# ---------------------------------------------------------------------------------- tar writing

def _member_bytes(n: int) -> int:
    return _BLOCK + -(-n // _BLOCK) * _BLOCK


class _ShardSink:
    """Writes samples to shard-NNNNNN.tar files; the caller rolls over with `full` + `finish`."""

    def __init__(self, out: Path, ext: str, max_bytes: int, max_count: int,
                 shards: list[dict] | None = None) -> None:
        self.out, self.ext, self.max_bytes, self.max_count = out, ext, max_bytes, max_count
        self.shards: list[dict] = list(shards or [])  # finished tars (kept when resuming)
        self.file = self.writer = None
        self.count = self.payload = self.first = 0

    def _tmp(self, name: str) -> Path:
        return self.out / f".{name}.tmp{os.getpid()}"

    def full(self, nbytes: int) -> bool:
        """Whether the open tar must be finished before a sample of `nbytes` image bytes."""
        size = _member_bytes(nbytes) + _member_bytes(_CLS_BYTES)
        return self.writer is not None and (
            self.count >= self.max_count
            or -(-(self.payload + size + 2 * _BLOCK) // _RECORD) * _RECORD > self.max_bytes)

    def write(self, index: int, label: int, data: bytes) -> None:
        cls = str(label).encode()
        if self.writer is None:
            self.name = f"shard-{len(self.shards):06d}.tar"
            self.file = open(self._tmp(self.name), "wb")
            self.writer = wds.TarWriter(self.file, encoder=False, mtime=0, user="dinosae",
                                        group="dinosae", mode=0o444)
            self.count, self.payload, self.first = 0, 0, index
        self.writer.write({"__key__": f"{index:08d}", self.ext: data, "cls": cls})
        self.count += 1
        self.payload += _member_bytes(len(data)) + _member_bytes(len(cls))

    def finish(self) -> None:
        if self.writer is None:
            return
        self.writer.close()
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        final = self.out / self.name
        os.replace(self._tmp(self.name), final)
        self.shards.append({"name": self.name, "count": self.count, "first_index": self.first,
                            "bytes": final.stat().st_size, "sha256": sha256_file(final)})
        self.writer = self.file = None

    def abort(self) -> None:
        """Remove the tar being written; finished tars stay for a resume (see _Journal)."""
        if self.file is not None:
            self.file.close()
            self._tmp(self.name).unlink(missing_ok=True)
        self.writer = self.file = None


_CLS_BYTES = 4  # room for a class index's decimal text when planning a roll-over


class _Journal:
    """`out/.progress.json`: the finished tars and where to restart, rewritten (atomically) after
    every finished tar. A rerun with the same inputs and settings continues from it; anything
    else starts over. Removed when the manifest is written."""

    NAME = ".progress.json"

    def __init__(self, out: Path, fingerprint: str) -> None:
        self.path, self.fingerprint = out / self.NAME, fingerprint

    def load(self) -> dict | None:
        """The saved state if it belongs to this run and its tars are intact, else None."""
        if not self.path.is_file():
            return None
        try:
            state = json.loads(self.path.read_text())
            if state.get("fingerprint") != self.fingerprint:
                log.warning("%s: written for other inputs or settings; starting over", self.path)
                return None
            for s in state["shards"]:
                tar = self.path.parent / s["name"]
                if (not SHARD_NAME.fullmatch(s["name"]) or not tar.is_file()
                        or tar.stat().st_size != s["bytes"]):
                    log.warning("%s: missing or changed; starting over", tar)
                    return None
            types = {"pos": int, "index": int, "bad": list, "class_counts": dict}
            if not all(isinstance(state.get(k), t) for k, t in types.items()):
                raise ValueError("wrong types")
        except (ValueError, KeyError, TypeError, AttributeError):  # not what this module wrote
            log.warning("%s: unreadable; starting over", self.path)
            return None
        return state

    def save(self, **state: object) -> None:
        atomic_write_text(self.path, json.dumps({"fingerprint": self.fingerprint, **state}))

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def split_format(d: dict, split: str) -> str:
    """The image format of a split's shards: data.val_format for val when set (png: the
    reconstruction metrics then see the original crop's pixels), else data.format."""
    if split == "val" and d.get("val_format"):
        return d["val_format"]
    return d["format"]


def _fingerprint(d: dict, split: str, items: list[tuple[str, str]], classes: list[str]) -> str:
    """What fixes the tars' content: the settings and the listed files (path, class, size)."""
    keys = ("image_size", "quality", "shard_max_bytes", "shard_max_count", "max_bad_fraction")
    settings = {k: d[k] for k in keys} | {"max_pixels": d.get("max_pixels", DEFAULT_MAX_PIXELS),
                                          "format": split_format(d, split)}
    h = hashlib.sha256(json.dumps([split, classes, settings]).encode())
    for path, wnid in items:
        h.update(f"{path}\0{wnid}\0{os.path.getsize(path)}\n".encode())
    return h.hexdigest()


def _clear_previous(out: Path, keep: set[str] = frozenset()) -> None:
    """Remove a previous run's manifest (first: the split is no longer complete), shards other
    than `keep` and temporary files. Only names this module writes are touched."""
    (out / MANIFEST).unlink(missing_ok=True)
    for p in out.iterdir():
        if (p.name.startswith("shard-") and p.name.endswith(".tar") and p.name not in keep) or (
                p.name.startswith((".shard-", f".{MANIFEST}.tmp"))):
            p.unlink()


# ------------------------------------------------------------------------------------ the job

def shard_split(cfg: dict, split: str, out: str | Path, force: bool = False) -> dict:
    """Shard `data.root/<split>` into `out` (config section: data). Returns the manifest.

    Unreadable files are skipped and listed in the manifest with their reason; no images, or a
    fraction of unreadable image files above `data.max_bad_fraction`, is a DataError (and no
    manifest). The class list of val is the train folder's when there is one, so both splits
    share class indices. A rerun after a kill keeps the finished tars and continues after them
    (out/.progress.json); the result is byte-identical to an uninterrupted run. `out` is locked
    while it is written; an existing `out` that is not a shard folder is refused (`force`:
    replaced).
    """
    d = cfg["data"]
    root = Path(d["root"])
    ignored: list[tuple[str, str]] = []
    items, classes = scan_imagenet_folder(root, split, d.get("val_labels"), ignored=ignored)
    if split != "train" and (root / "train").is_dir():
        train_classes = class_dirs(root / "train")
        unknown = sorted({w for _, w in items} - set(train_classes))
        if unknown:
            raise DataError(f"{root / split}: classes not in {root / 'train'}: {unknown[:5]}")
        classes = train_classes
    if not items:
        raise DataError(f"{root / split}: no image files found")
    with writing(out, "shard", SHARD_FOLDER, force=force, inputs=[root, d.get("val_labels")]):
        return _shard(d, split, root, items, classes, ignored, Path(out))


def _shard(d: dict, split: str, root: Path, items: list[tuple[str, str]], classes: list[str],
           ignored: list[tuple[str, str]], out: Path) -> dict:
    size, fmt, quality = d["image_size"], split_format(d, split), d["quality"]
    class_index = {w: i for i, w in enumerate(classes)}
    max_bad = int(d["max_bad_fraction"] * len(items))
    out.mkdir(parents=True, exist_ok=True)
    journal = _Journal(out, _fingerprint(d, split, items, classes))
    state = journal.load() or {"shards": [], "pos": 0, "index": 0, "bad": [],
                               "class_counts": dict.fromkeys(classes, 0)}
    _clear_previous(out, keep={s["name"] for s in state["shards"]})
    if state["pos"]:
        log.info("%s: resuming after %d finished tars (%d of %d files done)", split,
                 len(state["shards"]), state["pos"], len(items))
    sink = _ShardSink(out, EXT[fmt], d["shard_max_bytes"], d["shard_max_count"], state["shards"])
    bad_skipped, class_counts = state["bad"], state["class_counts"]
    index, start = state["index"], state["pos"]
    work = functools.partial(prepare, size=size, fmt=fmt, quality=quality,
                             max_pixels=int(d.get("max_pixels", DEFAULT_MAX_PIXELS)))
    paths = [p for p, _ in items[start:]]
    workers = min(d["workers"], len(paths))
    pool = multiprocessing.get_context("fork").Pool(workers) if workers > 1 else None
    results = (pool.imap(work, paths, chunksize=max(1, min(32, len(paths) // (8 * workers))))
               if pool else map(work, paths))
    progress = Progress(len(items), start=start, desc=f"shard {split}", unit="img")
    try:
        for pos, ((path, wnid), (data, reason)) in enumerate(
                zip(items[start:], results, strict=True), start=start):
            progress.update()
            if data is None:
                bad_skipped.append({"path": os.path.relpath(path, root), "reason": reason})
                log.warning("skipped %s: %s", path, reason)
                if len(bad_skipped) > max_bad:
                    first = bad_skipped[0]
                    raise DataError(
                        f"{root / split}: more than {d['max_bad_fraction']:.1%} of "
                        f"{len(items)} image files are unreadable (data.max_bad_fraction); "
                        f"first: {first['path']}: {first['reason']}")
                continue
            if sink.full(len(data)):  # this sample starts the next tar: a restart point
                sink.finish()
                journal.save(shards=sink.shards, pos=pos, index=index, bad=bad_skipped,
                             class_counts=class_counts)
                fault_point(f"shard-{split}", len(sink.shards))
            sink.write(index, class_index[wnid], data)
            class_counts[wnid] += 1
            index += 1
        if index == 0:
            raise DataError(f"{root / split}: none of {len(items)} image files could be read")
        sink.finish()
    except BaseException:
        sink.abort()
        raise
    finally:
        progress.close()
        if pool is not None:
            pool.terminate()

    skipped = [{"path": os.path.relpath(p, root), "reason": r} for p, r in ignored] + bad_skipped
    manifest = {
        "format": FORMAT, "version": VERSION, "split": split, "count": index,
        "classes": classes, "class_counts": class_counts, "shards": sink.shards,
        "preprocess": {"image_size": size, "format": fmt, "quality": quality,
                       "resize": "adm-center-crop"},
        "skipped": skipped, "source": str(root),
    }
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    journal.remove()
    log.info("%s: %d images in %d shards, %d skipped (%d unreadable)", split, index,
             len(sink.shards), len(skipped), len(bad_skipped))
    return manifest


# ------------------------------------------------------------------------------------- reading

def read_manifest(shards_dir: str | Path, verify: bool = False) -> dict:
    """Load and check `shards_dir/manifest.json`: format, counts, every tar present with its
    recorded size (and sha256 when `verify`). Raises FileNotFoundError / ValueError."""
    shards_dir = Path(shards_dir)
    path = shards_dir / MANIFEST
    if not path.is_file():
        raise MissingShards(f"{path} does not exist: the shards in {shards_dir} are "
                                "incomplete or were never written (run `dinosae shard`)")
    try:
        m = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(m, dict) or m.get("format") != FORMAT or m.get("version") != VERSION:
        raise DataError(f"{path}: not a {FORMAT} v{VERSION} manifest")
    missing = {"split", "count", "classes", "class_counts", "shards", "preprocess"} - set(m)
    if missing:
        raise DataError(f"{path}: missing {sorted(missing)}")
    _check_types(m, path)
    if sum(s["count"] for s in m["shards"]) != m["count"]:
        raise DataError(f"{path}: shard counts do not add up to count={m['count']}")
    for s in m["shards"]:
        if not SHARD_NAME.fullmatch(str(s["name"])):
            raise DataError(f"{path}: shard name {s['name']!r} is not shard-NNNNNN.tar (a "
                            "manifest names files inside its own folder only)")
        tar = shards_dir / s["name"]
        if not tar.is_file():
            raise DataError(f"{tar}: missing (listed in {path}); rerun the shard rule")
        if tar.stat().st_size != s["bytes"]:
            raise DataError(f"{tar}: {tar.stat().st_size} bytes, {path} records {s['bytes']} "
                            "(truncated or replaced); rerun the shard rule")
        if verify and sha256_file(tar) != s["sha256"]:
            raise DataError(f"{tar}: sha256 differs from {path}")
    return m


def _check_types(m: dict, path: Path) -> None:
    """The manifest fields readers use have the types this module writes."""
    def nonneg(v: object) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    shards, pre = m["shards"], m["preprocess"]
    ok = (nonneg(m["count"]) and isinstance(m["classes"], list) and m["classes"]
          and all(isinstance(c, str) for c in m["classes"])
          and isinstance(m["class_counts"], dict) and isinstance(shards, list)
          and all(isinstance(s, dict) and isinstance(s.get("name"), str)
                  and all(nonneg(s.get(k)) for k in ("count", "first_index", "bytes"))
                  for s in shards)
          and isinstance(pre, dict) and nonneg(pre.get("image_size")) and pre["image_size"] > 0)
    if not ok:
        raise DataError(f"{path}: malformed (a field has the wrong type); not written by dinosae "
                        "or damaged: rerun the shard rule")


def check_image_size(manifest: dict, shards: str | Path, size: int, what: str) -> None:
    """DataError unless the shards' images are `size` px (what `what` expects)."""
    have = manifest["preprocess"]["image_size"]
    if have != size:
        raise DataError(f"{Path(shards) / MANIFEST}: images of {have} px, but {what} expects "
                        f"{size} px; reshard with data.image_size: {size}, or use shards of "
                        "that size")


def shard_paths(shards_dir: str | Path) -> list[Path]:
    """The tar files of a complete shard folder, in manifest order."""
    return [Path(shards_dir) / s["name"] for s in read_manifest(shards_dir)["shards"]]


def iter_shard(tar_path: str | Path) -> Iterator[tuple[int, np.ndarray, int]]:
    """(index, image uint8 (H, W, 3), label) for each sample of one tar, in stored order."""
    for key, sample in iter_shard_bytes(tar_path):
        yield decode_sample(key, sample, tar_path)


def iter_shard_bytes(tar_path: str | Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) for each sample of one tar, in stored order, undecoded (to
    decode with decode_sample, in other threads if wanted)."""
    sample: dict[str, bytes] = {}
    key = None
    try:
        with tarfile.open(tar_path, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    raise DataError(f"{tar_path}: member {member.name!r} is not a regular file "
                                    "(not written by dinosae)")
                k, ext = member_key(member.name, tar_path)
                if key is not None and k != key:
                    yield key, sample
                    sample = {}
                key = k
                sample[ext] = tar.extractfile(member).read()
    except tarfile.TarError as e:
        raise DataError(f"{tar_path}: unreadable tar ({e}); rerun the shard rule") from None
    if key is not None:
        yield key, sample


def decode_sample(key: str, sample: dict[str, bytes], tar_path: str | Path
                  ) -> tuple[int, np.ndarray, int]:
    """(index, image uint8 (H, W, 3), label) of one sample's members (PIL decodes without
    the GIL: threads run in parallel)."""
    data = sample.get("jpg", sample.get("png"))
    if data is None or "cls" not in sample:
        raise DataError(f"{tar_path}: sample {key} lacks an image or a .cls member")
    with Image.open(io.BytesIO(data)) as im:
        image = np.asarray(im.convert("RGB"))
    return int(key), image, int(sample["cls"])


def member_key(name: str, tar_path: str | Path) -> tuple[str, str]:
    """(key, extension) of a tar member named like `00000042.jpg`. Anything else (absolute
    paths, `..`, folders, other extensions) is a DataError: members are only ever read into
    memory, never extracted, and a name that is not ours means the tar is not ours."""
    m = MEMBER_NAME.fullmatch(name)
    if m is None:
        raise DataError(f"{tar_path}: unexpected member name {name!r} (expected NNNNNNNN.jpg, "
                        ".png or .cls; not written by dinosae)")
    return m.group(1), m.group(2)
