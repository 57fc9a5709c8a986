"""What a training run logs, written once: `metrics.csv` always, plus the live backends that
`logging.backends` chooses (tensorboard, wandb), every scalar with the same step number in all
of them; image grids go to the backends too. Only rank 0 makes a RunLog.

    metrics.csv             one row per logged step. A resumed run first drops the rows after
                            the step it resumes at (`resumed_at`): steps never repeat
    events.out.tfevents.*   TensorBoard (`tensorboard --logdir results`); a resumed run writes
                            purge_step = resumed_at + 1, so readers drop the points that the
                            killed run logged after its last checkpoint
    wandb/, wandb.json      Weights & Biases, offline unless WANDB_MODE says otherwise. The run
                            id and the last step sent live in wandb.json: a resumed run continues
                            the same W&B run and sends only the steps after that one

The backends get the finite numbers of a row (a NaN cell means "not measured at this step": a
loss of another stage, GPU memory on a CPU), tagged `metrics/<column>` (one section: every curve
of the run on one page), and the grids as `images/<name>`. A backend that cannot start (not
installed, no network) says so in one line and the run goes on with metrics.csv; one that fails
later is dropped the same way. tensorboard and wandb are optional extras (`pip install
dinosae[tensorboard,wandb]`), imported only when chosen.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dinosae.files import atomic_write_text

log = logging.getLogger("dinosae")

BACKENDS = ("csv", "tensorboard", "wandb")  # logging.backends (csv is always on)
ENV = "DINOSAE_LOGGING"  # the backends when the config has no logging section (the rules)
EVENTS = r"events\.out\.tfevents\..+"  # TensorBoard's files: run folders accept these names
WANDB_NAMES = (r"wandb", r"wandb\.json")
GPU_MEM = "gpu_mem_gb"  # the column RunLog adds: peak GPU memory since the last row (GB)


class MetricsCSV:
    """Append-only metrics.csv that survives resume: rows after `resumed_at` (the number of
    steps the resumed state has done) are dropped first, so a rerun after a kill never
    duplicates steps. The header is the first row's keys."""

    def __init__(self, path: str | Path, resumed_at: int = 0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fields: list[str] | None = None
        if self.path.exists():
            with open(self.path, newline="") as f:
                rows = list(csv.DictReader(f))
            keep = [r for r in rows if int(float(r.get("step", 0))) <= resumed_at]
            if keep:
                self.fields = list(keep[0].keys())
                tmp = self.path.with_suffix(".csv.tmp")
                with open(tmp, "w", newline="") as f:
                    w = csv.DictWriter(f, fieldnames=self.fields)
                    w.writeheader()
                    w.writerows(keep)
                os.replace(tmp, self.path)
            else:
                self.path.unlink()

    def log(self, row: Mapping[str, Any]) -> None:
        row = {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()}
        new = not self.path.exists()
        if self.fields is None:
            self.fields = list(row.keys())
        with open(self.path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.fields, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow(row)


class _TensorBoard:
    def __init__(self, out: Path, resumed_at: int, **_: Any) -> None:
        from torch.utils.tensorboard import SummaryWriter  # ImportError without tensorboard

        if not resumed_at:  # a fresh run: the event files of an earlier one are not its past
            for old in out.glob("events.out.tfevents.*"):
                old.unlink()
        self.writer = SummaryWriter(str(out), purge_step=resumed_at + 1 if resumed_at else None)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()  # every log_every steps: live, and cheap

    def image(self, tag: str, step: int, image: np.ndarray) -> None:
        self.writer.add_image(tag, image, step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, out: Path, resumed_at: int, name: str, config: dict) -> None:
        import wandb  # ImportError without wandb

        self.state = out / "wandb.json"
        old = json.loads(self.state.read_text()) if resumed_at and self.state.is_file() else {}
        run_id = str(old.get("id") or secrets.token_hex(4))  # W&B ids: [a-z0-9]
        self.sent = self.floor = int(old.get("step", 0))  # steps <= floor: sent before the kill
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "dinosae"), name=name, id=run_id,
            resume="allow", dir=str(out), mode=os.environ.get("WANDB_MODE", "offline"),
            config=config, settings=wandb.Settings(console="off", silent=True,
                                                   x_disable_stats=True))
        self._wandb = wandb
        self._save()

    def _save(self) -> None:
        atomic_write_text(self.state, json.dumps({"id": self.run.id, "step": self.sent}) + "\n")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if step <= self.floor:
            return
        self.run.log(values, step=step)
        self.sent = step
        self._save()

    def image(self, tag: str, step: int, image: np.ndarray) -> None:
        if step > self.floor:
            self.run.log({tag: self._wandb.Image(image)}, step=step)

    def close(self) -> None:
        self.run.finish()


_MAKERS = {"tensorboard": _TensorBoard, "wandb": _WandB}


def chosen_backends(cfg: dict) -> list[str]:
    """cfg logging.backends; without a logging section, the environment's DINOSAE_LOGGING
    (comma-separated; how the Snakemake rules pass it, outside their params: another backend
    must not rerun a finished training); else csv only. Unknown names are said and skipped."""
    if "backends" in (cfg.get("logging") or {}):
        names = list(cfg["logging"]["backends"])
    else:
        names = [n.strip() for n in os.environ.get(ENV, "csv").split(",") if n.strip()]
    unknown = [n for n in names if n not in BACKENDS]
    if unknown:
        log.warning("logging: unknown backend(s) %s in %s (known: %s); skipped",
                    ", ".join(map(repr, unknown)), ENV, ", ".join(BACKENDS))
    return [n for n in dict.fromkeys(names) if n in BACKENDS]


class RunLog:
    """metrics.csv and the chosen backends of one run folder `out`.

    `log(step, row)` writes a metrics.csv row (adding `gpu_mem_gb`, the peak GPU memory since
    the previous row, NaN off CUDA) and sends its finite numbers to the backends;
    `image(tag, step, path)` sends a PNG grid just written. `cfg`: the run's config sections
    (`chosen_backends` reads the backends from them; W&B records them all).
    `resumed_at`: the steps done by the state the run resumed from (0: a fresh run). `name`
    names the W&B run."""

    def __init__(self, out: str | Path, cfg: dict, *, resumed_at: int = 0,
                 device: torch.device | None = None, name: str = "") -> None:
        self.out = Path(out)
        self.csv = MetricsCSV(self.out / "metrics.csv", resumed_at)
        self.device = device
        self.backends: dict[str, Any] = {}
        for b in chosen_backends(cfg):
            if b == "csv":
                continue
            try:
                self.backends[b] = _MAKERS[b](self.out, resumed_at=resumed_at,
                                              name=name or self.out.name, config=cfg)
            except Exception as e:  # noqa: BLE001 - any failure: say so, go on with csv
                log.warning("logging: %s did not start (%s); the run logs to metrics.csv",
                            b, _one_line(e))

    def log(self, step: int, row: Mapping[str, Any]) -> None:
        row = {"step": step, **{k: v for k, v in row.items() if k != "step"},
               GPU_MEM: self._gpu_mem()}
        self.csv.log(row)
        values = {f"metrics/{k}": float(v) for k, v in row.items()
                  if k != "step" and isinstance(v, (int, float)) and math.isfinite(v)}
        self._each("scalars", step, values)

    def image(self, tag: str, step: int, path: str | Path) -> None:
        if self.backends:
            from PIL import Image

            with Image.open(path) as im:
                image = np.asarray(im.convert("RGB"))
            self._each("image", f"images/{tag}", step, image)

    def close(self) -> None:
        self._each("close")
        self.backends = {}

    def _gpu_mem(self) -> float:
        if self.device is None or self.device.type != "cuda":
            return math.nan
        peak = torch.cuda.max_memory_allocated(self.device) / 1e9
        torch.cuda.reset_peak_memory_stats(self.device)
        return peak

    def _each(self, method: str, *args: Any) -> None:
        for name, backend in list(self.backends.items()):
            try:
                getattr(backend, method)(*args)
            except Exception as e:  # noqa: BLE001 - a live view must not stop the training
                log.warning("logging: %s failed (%s); it is dropped, metrics.csv goes on",
                            name, _one_line(e))
                del self.backends[name]


def _one_line(e: BaseException) -> str:
    text = " ".join(f"{type(e).__name__}: {e}".split())
    return text if len(text) <= 300 else text[:297] + "..."
