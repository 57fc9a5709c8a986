"""`dinosae status`: which stages of a results folder are done, their key metrics and the
checkpoint (or cache) each used, read back from the files the stages leave behind.

Those files are untrusted: a stage whose file cannot be read (damaged, truncated, unreadable,
not what the stage writes, any JSON shape) is shown as `unreadable` with the file and the
reason, and the other stages are still reported. Only regular files are opened (a FIFO, device
or folder in a file's place is reported, never read: nothing blocks). A results folder that does
not exist is an error."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dinosae.errors import DinosaeError, StatusError
from dinosae.files import check_regular, read_kv, read_regular

AE_METRICS = ("loss", "l1", "lpips", "align", "g_gan")
RECON_SKIP = {"num_samples", "extractor", "extractor_id", "lpips_net", "checkpoint", "shards",
              # recon.txt's protocol (evaluate.eval_recon)
              "extractor_weights_sha256", "checkpoint_sha256", "reference",
              "shards_manifest_sha256", "shards_format", "selection"}


@dataclass
class Stage:
    name: str
    state: str  # done | partial | missing | unreadable
    metrics: str = ""
    uses: str = ""


def status(cfg: dict, results: str = "results") -> None:
    """Print the status table of `results` (`cfg` is unused: the files say it all)."""
    folder = Path(results)
    if not folder.is_dir():
        raise StatusError(f"--results {results}: no such folder (nothing has run there yet, or "
                          "a typo)")
    print(format_table(folder, collect(folder)))


# what a damaged results file raises while its stage is read: reported, never a traceback
UNREADABLE = (DinosaeError, OSError, ValueError, KeyError, TypeError, IndexError, EOFError,
              AttributeError, csv.Error)


def _guarded(name: str, files: str, read: Callable[[], Stage]) -> Stage:
    try:
        return read()
    except StatusError as e:  # names the file
        return Stage(name, "unreadable", str(e))
    except UNREADABLE as e:
        why = " ".join(str(e).split())[:200]
        return Stage(name, "unreadable", f"{files}: {type(e).__name__}{': ' + why if why else ''}")


def collect(results: Path) -> list[Stage]:
    """One Stage per pipeline stage; a stage whose files cannot be read is `unreadable`."""
    readers = [(f"ae stage{k}", f"{results}/ae/stage{k}", lambda k=k: ae_stage(results, k))
               for k in (1, 2, 3, 4)]
    readers += [("recon", f"{results}/recon.txt", lambda: recon(results)),
                ("latents", f"{results}/latents", lambda: latents(results)),
                ("dit", f"{results}/dit", lambda: dit(results)),
                ("samples", f"{results}/samples", lambda: samples(results)),
                ("gfid", f"{results}/gfid.txt", lambda: gfid(results))]
    return [_guarded(name, files, read) for name, files, read in readers]


def format_table(results: Path, stages: list[Stage]) -> str:
    rows = [("stage", "state", "key metrics", "uses")]
    rows += [(s.name, s.state, s.metrics or "-", s.uses or "-") for s in stages]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"results folder: {results}"]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[3]
              for r in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------- stages

def ae_stage(results: Path, k: int) -> Stage:
    name, folder = f"ae stage{k}", results / "ae" / f"stage{k}"
    path, ck, state = _checkpoint(folder)
    with _reading(path):
        if ck is None or "imported" in ck:
            return _imported(name, ck, state)
        total = ck["train"]["stages"][k - 1]["steps"]
        weights = ck["config"]["autoencoder"]["teacher"]["weights"]
        step, uses = ck["step"], ck.get("init") or f"teacher weights: {weights}"
    metrics = [f"step {step}/{total}", *last_metrics(folder / "metrics.csv", AE_METRICS)]
    return Stage(name, state, ", ".join(metrics), str(uses))


def dit(results: Path) -> Stage:
    folder = results / "dit"
    path, ck, state = _checkpoint(folder)
    with _reading(path):
        if ck is None or "imported" in ck:
            return _imported("dit", ck, state)
        step, uses = f"step {ck['step']}/{ck['config']['dit']['steps']}", \
            f"{ck['ae']} (cache {ck['cache']})"
    return Stage("dit", state, ", ".join([step, *last_metrics(folder / "metrics.csv",
                                                               ("loss",))]), uses)


def latents(results: Path) -> Stage:
    reports = sorted((results / "latents").glob("*.report.json"))
    if not reports:
        partial = sorted((results / "latents").glob("*.zarr"))
        return Stage("latents", "partial" if partial else "missing",
                     f"{partial[0].name} not validated yet" if partial else "")
    with _reading(reports[0]):
        r = json.loads(read_regular(reports[0]))
        if not isinstance(r, dict):
            raise ValueError(f"a JSON {type(r).__name__}, not the report's object")
        return Stage("latents", "done" if r.get("complete") else "partial",
                     f"{int(r['count'])} images, mean token norm {float(r['mean_norm']):.4g}",
                     str(r["encoder"]["path"]))


def samples(results: Path) -> Stage:
    import h5py

    path = results / "samples" / "samples.h5"
    partial = path.with_name(path.name + ".partial")
    if not path.exists():
        parts = sorted(path.parent.glob("parts/*.h5*"))  # sample.parts > 1: rule sample_part
        if parts and not partial.exists():
            return _sample_parts(parts)
        if not partial.exists():
            return Stage("samples", "missing")
        with _reading(partial), h5py.File(partial, "r") as f:
            return Stage("samples", "partial",
                         f"{int(f.attrs['done'])}/{int(f.attrs['num_samples'])} images")
    with _reading(path), h5py.File(path, "r") as f:
        a = f.attrs
        metrics = (f"{int(a['num_samples'])} images, {int(a['num_classes'])} classes, "
                   f"{int(a['steps'])} steps, cfg {float(a['cfg_scale']):g}")
        return Stage("samples", "done", metrics, f"{_str(a['dit_checkpoint'])} + "
                                                  f"{_str(a['ae_checkpoint'])}")


def _sample_parts(files: list[Path]) -> Stage:
    """The samples drawn so far by the part jobs (their finished and .partial files)."""
    import h5py

    done = total = finished = 0
    for p in files:
        with _reading(p), h5py.File(p, "r") as f:
            done += int(f.attrs["done"])
            total = int(f.attrs["num_samples"])
            k = int(f.attrs["part"][1])
            finished += p.suffix == ".h5"
    return Stage("samples", "partial", f"{done}/{total} images ({finished} of {k} parts done)")


def recon(results: Path) -> Stage:
    path = results / "recon.txt"
    if not path.exists():
        return Stage("recon", "missing")
    with _reading(path):
        kv = read_kv(path)
    metrics = [f"{k} {v}" for k, v in kv.items() if k not in RECON_SKIP]
    metrics.append(f"{kv.get('num_samples', '?')} images")
    return Stage("recon", "done", ", ".join(metrics), kv.get("checkpoint", ""))


def gfid(results: Path) -> Stage:
    path = results / "gfid.txt"
    if not path.exists():
        return Stage("gfid", "missing")
    with _reading(path):
        kv = read_kv(path)
    metric = kv.get("metric", "FID")
    metrics = [f"{metric} {kv.get(metric, '?')}"]
    for key in ("sFID", "IS", "precision", "recall"):
        if _is_number(kv.get(key)):
            metrics.append(f"{key} {kv[key]}")
    metrics.append(f"{kv.get('num_samples', '?')} samples")
    return Stage("gfid", "done", ", ".join(metrics), kv.get("dit_checkpoint", ""))


# ---------------------------------------------------------------- reading helpers

@contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Errors while reading `path` become a StatusError naming it; a path that is not a
    regular file (a FIFO would block) is not opened."""
    try:
        check_regular(path)
        yield
    except StatusError:
        raise
    except UNREADABLE as e:
        why = " ".join(str(e).split())[:200]
        raise StatusError(f"{path}: {type(e).__name__}{': ' + why if why else ''}") from None


def _checkpoint(folder: Path) -> tuple[Path, dict | None, str]:
    """The finished checkpoint (state done) or the periodic last.pt (partial), memory-mapped so
    that a large checkpoint is not read whole."""
    from dinosae.checkpoint import load_checkpoint

    for name, state in (("checkpoint.pt", "done"), ("last.pt", "partial")):
        if (folder / name).exists():
            with _reading(folder / name):
                return folder / name, load_checkpoint(folder / name, mmap=True), state
    return folder, None, "missing"


def _imported(name: str, ck: dict | None, state: str) -> Stage:
    """A stage with no checkpoint, or one imported from released or exported weights."""
    if ck is None:
        return Stage(name, state)
    return Stage(name, state, f"imported (step {ck.get('step', '?')})",
                 f"imported from {ck['imported']['source']}")


def last_metrics(path: Path, names: tuple[str, ...]) -> list[str]:
    """'name value' of the last metrics.csv row, for the named columns that are finite there."""
    from dinosae.report import read_metrics

    if not path.exists():
        return []
    with _reading(path):
        cols = read_metrics(path)
        return [f"{n} {cols[n][-1]:.4g}" for n in names
                if n in cols and len(cols[n]) and math.isfinite(cols[n][-1])]


def _is_number(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
