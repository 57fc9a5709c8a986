"""Figures and tables for the Snakemake report (`snakemake --report results/report.html`): loss
curves from a run's metrics.csv, its last image grid, one sample grid per class, the results
files and the config as HTML tables. Matplotlib draws; every file is written atomically."""

from __future__ import annotations

import csv
import html
import io
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import yaml

from dinosae.errors import DinosaeError
from dinosae.files import atomic_path, atomic_write_text, check_regular, read_kv, read_regular
from dinosae.outputs import HTML_MARK, PNG_MARK, claim_file, html_ours, png_ours

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

# metrics.csv columns that are bookkeeping, not curves worth a panel
NOT_PLOTTED = {"step", "skipped", "bad_steps", "sec_per_step", "images_per_sec", "img_per_s",
               "proxy_sec"}
SAMPLES_PER_CLASS = 16  # images in one class's grid (two rows of eight)
PAGE_STYLE = ("body{font-family:sans-serif;background:#fff;color:#111;margin:1.5em}"
              "table{border-collapse:collapse}td,th{border:1px solid #bbb;padding:.3em .8em;"
              "text-align:left}th{background:#eee}pre{font-size:13px}")


# ---------------------------------------------------------------- loss curves and grids

def read_metrics(path: str | Path) -> dict[str, np.ndarray]:
    """metrics.csv as column name -> float array (empty or non-numeric cells are NaN)."""
    text = read_regular(path).decode("utf-8")  # never blocks on a FIFO
    rows = list(csv.DictReader(io.StringIO(text, newline="")))
    if not rows:
        raise DinosaeError(f"{path}: no metrics rows yet")
    return {k: np.array([_number(r.get(k)) for r in rows]) for k in rows[0]}


def _number(cell: str | None) -> float:
    try:
        return float(cell)
    except (TypeError, ValueError):
        return float("nan")


def plot_metrics(metrics: str | Path, out: str | Path, title: str) -> list[str]:
    """One panel per metrics.csv column that has a finite value (loss terms, lr, grad norms),
    against step -> PNG. Returns the plotted column names."""
    from matplotlib.figure import Figure

    cols = read_metrics(metrics)
    names = [k for k, v in cols.items() if k not in NOT_PLOTTED and np.isfinite(v).any()]
    ncol = max(1, min(3, len(names)))
    nrow = max(1, -(-len(names) // ncol))
    fig = Figure(figsize=(4.2 * ncol, 2.8 * nrow + 0.6), layout="constrained")
    axes = list(fig.subplots(nrow, ncol, squeeze=False).flat)
    for ax, name in zip(axes, names, strict=False):
        ok = np.isfinite(cols[name])
        ax.plot(cols["step"][ok], cols[name][ok], marker="." if ok.sum() <= 30 else None)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in axes[len(names):]:
        ax.axis("off")
    fig.suptitle(title)
    save_figure(fig, out)
    return names


def save_figure(fig: Figure, out: str | Path) -> None:
    with atomic_path(out, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=100, metadata={"Software": PNG_MARK})


def last_grid(run: str | Path) -> Path:
    """The AE run's image grid (grid_NNNNNN.png: input | reconstruction pairs) of the highest
    step."""
    grids = [(int(m.group(1)), p) for p in Path(run).glob("grid_*.png")
             if (m := re.fullmatch(r"grid_(\d+)\.png", p.name))]
    if not grids:
        raise DinosaeError(f"{run}: no grid_NNNNNN.png image grids")
    return max(grids)[1]


def image_figure(image: np.ndarray, title: str, out: str | Path) -> None:
    """An image (H, W, 3) enlarged about 2.5x (pixels stay sharp; 5 to 10 inches wide at 100
    dpi) under a title -> PNG."""
    from matplotlib.figure import Figure

    h, w = image.shape[:2]
    width = min(10.0, max(5.0, w * 2.5 / 100))
    fig = Figure(figsize=(width, width * h / w + 0.5), layout="constrained")
    ax = fig.subplots()
    ax.imshow(image, interpolation="nearest")
    ax.set_title(title, fontsize=11)
    ax.axis("off")
    save_figure(fig, out)


def stage_figures(cfg: dict, checkpoint: str, title: str, loss: str,
                  grid: str | None = None, force: bool = False) -> None:
    """Report figures of a training run, from the files beside its `checkpoint`: loss curves of
    metrics.csv -> `loss`; an AE stage's last image grid (input | reconstruction pairs),
    enlarged and titled -> `grid`. `cfg` is unused (the files carry what is needed)."""
    from matplotlib.image import imread

    run = Path(checkpoint).parent
    claim_file({p: png_ours for p in (loss, grid) if p is not None}, "stage-figures",
               force=force, inputs=[checkpoint, run / "metrics.csv"])
    names = plot_metrics(run / "metrics.csv", loss, title)
    log.info("%s: %d curves (%s) -> %s", title, len(names), ", ".join(names), loss)
    if grid is not None:
        src = last_grid(run)
        check_regular(src)
        image_figure(imread(src), f"{title}: input | reconstruction pairs ({src.name})", grid)
        log.info("%s: %s -> %s", title, src, grid)


# ---------------------------------------------------------------- sample grids per class

def montage(images: np.ndarray, ncol: int = 8, pad: int = 2) -> np.ndarray:
    """(N, H, W, 3) uint8 -> one (rows·(H+pad), ncol·(W+pad), 3) image on a white background."""
    n, h, w, _ = images.shape
    ncol = min(ncol, n)
    nrow = -(-n // ncol)
    out = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, 3), 255, np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, ncol)
        out[pad + r * (h + pad):pad + r * (h + pad) + h,
            pad + c * (w + pad):pad + c * (w + pad) + w] = image
    return out


def sample_grids(cfg: dict, samples: str, out: list[str], force: bool = False) -> None:
    """One grid per class of `samples` (samples.h5) for the first len(out) classes, each titled
    with the class index and name -> the PNGs `out` (an empty grid when a class has no samples
    or the run has fewer classes)."""
    import h5py

    claim_file(dict.fromkeys(out, png_ours), "sample-grids", force=force, inputs=[samples])
    check_regular(samples)
    with h5py.File(samples, "r") as f:
        labels = f["labels"][:]
        names = [c.decode() if isinstance(c, bytes) else str(c) for c in f.attrs["classes"]]
        for c, path in enumerate(out):
            idx = np.flatnonzero(labels == c)[:SAMPLES_PER_CLASS]
            name = names[c] if c < len(names) else "(no such class in this run)"
            title = f"class {c}: {name}, {len(idx)} of {int((labels == c).sum())} samples"
            if len(idx):
                image_figure(montage(f["images"][idx]), title, path)
            else:
                image_figure(np.full((8, 64, 3), 255, np.uint8), title, path)
    log.info("%d per-class sample grids of %s -> %s", len(out), samples, Path(out[0]).parent)


# ---------------------------------------------------------------- tables as HTML pages

def html_page(title: str, body: str) -> str:
    return (f"{HTML_MARK}<html><head><meta charset='utf-8'><title>{html.escape(title)}"
            f"</title><style>{PAGE_STYLE}</style></head><body><h2>{html.escape(title)}</h2>"
            f"{body}</body></html>\n")


def metrics_table(cfg: dict, results: str, title: str, out: str, force: bool = False) -> None:
    """A `key: value` results file (results/recon.txt, results/gfid.txt) -> an HTML table."""
    claim_file({out: html_ours}, "metrics-table", force=force, inputs=[results])
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>"
                   for k, v in read_kv(results).items())
    body = (f"<table><tr><th>key</th><th>value</th></tr>{rows}</table>"
            f"<p>from <code>{html.escape(str(results))}</code></p>")
    atomic_write_text(out, html_page(title, body))


def config_page(cfg: dict, out: str, force: bool = False) -> None:
    """The config the run used (the sections the rules pass on) -> an HTML page of YAML."""
    claim_file({out: html_ours}, "config-page", force=force)
    text = yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None)
    atomic_write_text(out, html_page("Configuration", f"<pre>{html.escape(text)}</pre>"))
