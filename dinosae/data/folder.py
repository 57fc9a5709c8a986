"""Scan an ImageNet-style folder: `<root>/<split>/<wnid>/<file>`, or a flat val folder whose
labels come from the ILSVRC2012 `LOC_val_solution.csv` (columns ImageId,PredictionString; the
class is the first token of PredictionString).

Every entry that does not become an image to shard is reported with its reason (hidden names,
other extensions, sub-folders, special files such as FIFOs and devices, dangling links): a
folder is untrusted input, and nothing in it is dropped silently.
"""

from __future__ import annotations

import csv
import logging
import os
import stat
from pathlib import Path

from dinosae.errors import FolderError, MissingSplit

log = logging.getLogger(__name__)


IMAGE_EXTENSIONS = frozenset(
    {".jpeg", ".jpg", ".jpe", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm",
     ".pbm", ".pnm"}
)
VAL_LABEL_FILE = "LOC_val_solution.csv"


def is_image_name(name: str) -> bool:
    """True when the file name has an image extension (any case)."""
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


_SPECIAL = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
            (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def entry_kind(path: str | Path) -> tuple[str, str | None]:
    """('file', None), ('dir', None), or ('other', why it is neither), links followed."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "other", "dangling symbolic link"
    except OSError as e:
        return "other", f"cannot be read ({e.strerror})"
    if stat.S_ISREG(st.st_mode):
        return "file", None
    if stat.S_ISDIR(st.st_mode):
        return "dir", None
    return "other", special_reason(st.st_mode)


def special_reason(mode: int) -> str:
    """Why a file of this st_mode is not read: 'not a regular file (a FIFO)' etc."""
    what = next((name for test, name in _SPECIAL if test(mode)), None)
    if stat.S_ISDIR(mode):
        what = "a folder"
    return f"not a regular file ({what})" if what else "not a regular file"


def _kind(e: os.DirEntry) -> tuple[str, str | None]:
    """entry_kind without a stat call for the common case (the type readdir reports)."""
    try:
        if not e.is_symlink():
            if e.is_file(follow_symlinks=False):
                return "file", None
            if e.is_dir(follow_symlinks=False):
                return "dir", None
    except OSError:
        pass
    return entry_kind(e.path)


def _scan(folder: Path, ignored: list[tuple[str, str]]
          ) -> tuple[list[os.DirEntry], list[os.DirEntry]]:
    """(regular files, folders) of `folder`, hidden names excluded; every other entry (and
    every hidden one) is appended to `ignored` with its reason."""
    files, dirs = [], []
    with os.scandir(folder) as it:
        entries = sorted(it, key=lambda e: e.name)
    for e in entries:
        kind, why = _kind(e)
        if e.name.startswith("."):
            ignored.append((e.path, f"hidden {'folder' if kind == 'dir' else 'file'}"))
        elif kind == "file":
            files.append(e)
        elif kind == "dir":
            dirs.append(e)
        else:
            ignored.append((e.path, why))
    return files, dirs


def class_dirs(split_dir: Path) -> list[str]:
    """Sorted names of the class sub-folders of a split (hidden folders ignored)."""
    return [e.name for e in _scan(split_dir, [])[1]]


def read_val_labels(path: str | Path) -> dict[str, str]:
    """LOC_val_solution.csv -> {image id (file stem): wnid}."""
    labels: dict[str, str] = {}
    if entry_kind(path)[0] != "file":
        raise FolderError(f"{path}: val label file is not a regular file "
                          f"({entry_kind(path)[1] or 'a folder'})")
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            missing = {"ImageId", "PredictionString"} - set(reader.fieldnames or [])
            if missing:
                raise FolderError(f"{path}: val label file lacks column(s) {sorted(missing)}")
            for row in reader:
                tokens = (row["PredictionString"] or "").split()
                if not tokens or not row["ImageId"]:
                    raise FolderError(f"{path}: line {reader.line_num} has no image id or "
                                      "no class")
                labels[row["ImageId"].strip()] = tokens[0]
    except (UnicodeDecodeError, csv.Error) as e:
        raise FolderError(f"{path}: not a CSV label file ({e})") from None
    return labels


def scan_imagenet_folder(
    root: str | Path,
    split: str,
    val_labels: str | Path | None = None,
    *,
    ignored: list[tuple[str, str]] | None = None,
) -> tuple[list[tuple[str, str]], list[str]]:
    """List the images of `root/split` as sorted (path, wnid) pairs, plus the sorted wnids.

    Layouts: `split/<wnid>/*` (every class sub-folder is a class, even an empty one), or a flat
    `split/*` with labels from `val_labels` (default: `root/LOC_val_solution.csv` if present).
    Image files are recognised by extension, case-insensitively; every other entry (other
    files, hidden names, special files, dangling links, folders inside class folders) is
    appended to `ignored` as (path, reason) when a list is given. Flat images without a label
    are also reported there.
    """
    split_dir = Path(root) / split
    if not split_dir.is_dir():
        raise MissingSplit(f"no {split!r} folder in {str(root)!r} (expected {split_dir})")
    ignored = [] if ignored is None else ignored
    items: list[tuple[str, str]] = []
    top_files, top_dirs = _scan(split_dir, ignored)
    classes = [e.name for e in top_dirs]
    flat = [e for e in top_files if is_image_name(e.name)]
    ignored += [(e.path, "not an image file extension") for e in top_files
                if not is_image_name(e.name)]

    if classes:
        if flat:
            raise FolderError(
                f"{split_dir} mixes class folders and {len(flat)} loose images; use one layout")
        for wnid in classes:
            files, dirs = _scan(split_dir / wnid, ignored)
            ignored += [(e.path, "a folder inside a class folder (not scanned)") for e in dirs]
            for entry in files:
                if is_image_name(entry.name):
                    items.append((entry.path, wnid))
                else:
                    ignored.append((entry.path, "not an image file extension"))
    elif flat:
        if val_labels is None and (Path(root) / VAL_LABEL_FILE).is_file():
            val_labels = Path(root) / VAL_LABEL_FILE
        if val_labels is None:
            raise FolderError(f"{split_dir} holds loose images but no label file was given "
                              f"(data.val_labels, e.g. {VAL_LABEL_FILE})")
        labels = read_val_labels(val_labels)
        for entry in flat:
            wnid = labels.get(os.path.splitext(entry.name)[0])
            if wnid is None:
                ignored.append((entry.path, f"no label in {Path(val_labels).name}"))
            else:
                items.append((entry.path, wnid))
        classes = sorted(set(labels.values()))
    items.sort(key=lambda it: (it[1], os.path.basename(it[0])))
    if ignored:
        log.info("%s: %d file(s) that are not labelled images ignored", split_dir, len(ignored))
    return items, classes
