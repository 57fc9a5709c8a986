"""Scan an ImageNet-style folder: `<root>/<split>/<wnid>/<file>`, or a flat val folder whose
labels come from the ILSVRC2012 `LOC_val_solution.csv` (columns ImageId,PredictionString; the
class is the first token of PredictionString)."""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset(
    {".jpeg", ".jpg", ".jpe", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm",
     ".pbm", ".pnm"}
)
VAL_LABEL_FILE = "LOC_val_solution.csv"


def is_image_name(name: str) -> bool:
    """True when the file name has an image extension (any case)."""
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _visible_files(folder: Path) -> list[os.DirEntry]:
    with os.scandir(folder) as it:
        return [e for e in it if not e.name.startswith(".") and e.is_file()]


def class_dirs(split_dir: Path) -> list[str]:
    """Sorted names of the class sub-folders of a split (hidden folders ignored)."""
    with os.scandir(split_dir) as it:
        return sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))


def read_val_labels(path: str | Path) -> dict[str, str]:
    """LOC_val_solution.csv -> {image id (file stem): wnid}."""
    labels: dict[str, str] = {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"ImageId", "PredictionString"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: val label file lacks column(s) {sorted(missing)}")
        for row in reader:
            tokens = (row["PredictionString"] or "").split()
            if not tokens:
                raise ValueError(f"{path}: row for {row['ImageId']!r} has no class")
            labels[row["ImageId"].strip()] = tokens[0]
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
    Image files are recognised by extension, case-insensitively; other files are not images and
    are appended to `ignored` as (path, reason) when a list is given. Flat images without a label
    are also reported there.
    """
    split_dir = Path(root) / split
    if not split_dir.is_dir():
        raise FileNotFoundError(f"no {split!r} folder in {str(root)!r} (expected {split_dir})")
    ignored = [] if ignored is None else ignored
    items: list[tuple[str, str]] = []
    classes = class_dirs(split_dir)
    flat = [e for e in _visible_files(split_dir) if is_image_name(e.name)]

    if classes:
        if flat:
            raise ValueError(
                f"{split_dir} mixes class folders and {len(flat)} loose images; use one layout")
        for wnid in classes:
            for entry in _visible_files(split_dir / wnid):
                if is_image_name(entry.name):
                    items.append((entry.path, wnid))
                else:
                    ignored.append((entry.path, "not an image file extension"))
    elif flat:
        if val_labels is None and (Path(root) / VAL_LABEL_FILE).is_file():
            val_labels = Path(root) / VAL_LABEL_FILE
        if val_labels is None:
            raise ValueError(f"{split_dir} holds loose images but no label file was given "
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
