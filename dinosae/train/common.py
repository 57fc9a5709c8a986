"""What the training loops share: device and DDP setup, EMA, LR schedule, atomic checkpoint I/O,
metrics.csv, image grids and progress lines. Small functions; the loops stay linear."""

from __future__ import annotations

import csv
import hashlib
import logging
import math
import os
import pickle
import signal
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from dinosae.config import DinosaeError
from dinosae.files import atomic_path, atomic_write_text, read_kv, write_kv  # noqa: F401

log = logging.getLogger("dinosae")


# ---------------------------------------------------------------- files (atomic writes)

class CheckpointError(DinosaeError, ValueError):
    """A checkpoint that must not be used: not ours, the wrong kind or stage, unsafe to load."""


class MissingCheckpoint(CheckpointError, FileNotFoundError):
    """A checkpoint path that does not exist."""


class NumericsError(DinosaeError, FloatingPointError):
    """Too many non-finite steps in a row: training stops rather than silently diverging."""


def save_checkpoint(path: str | Path, state: Mapping[str, Any]) -> None:
    """torch.save to a temporary name, fsync, rename. `state` must hold only tensors, plain
    containers, strings and numbers, so that it loads with weights_only=True."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        try:
            torch.save(dict(state), f)
        except RuntimeError as e:  # torch's zip writer reports a failed write (full disk) so
            if isinstance(e.__context__, OSError):
                raise e.__context__ from None
            raise
        f.flush()
        os.fsync(f.fileno())


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu",
                    mmap: bool = False) -> dict:
    """Load a checkpoint or weights file without unpickling code (weights_only=True); a file
    that holds anything but tensors, plain containers, strings and numbers is refused. `mmap`
    maps the tensors instead of reading them (to look at a large file's metadata)."""
    path = Path(path)
    if not path.is_file():
        raise MissingCheckpoint(f"checkpoint {str(path)!r} does not exist")
    try:
        ck = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        what = [ln.strip() for ln in str(e).splitlines() if "Unsupported global" in ln]
        if not what:  # not a pickle of something else: not a torch file at all
            raise CheckpointError(f"{str(path)!r} is not a readable checkpoint (not a torch "
                                  "file of tensors)") from None
        raise CheckpointError(f"refusing to load {str(path)!r}: it holds pickled objects other "
                              "than tensors and plain containers"
                              + (f" ({what[0]})" if what else "")) from None
    except (RuntimeError, EOFError) as e:
        raise CheckpointError(f"{str(path)!r} is not a readable checkpoint (truncated or not a "
                              f"torch file): {e}") from None
    if not isinstance(ck, dict):
        raise CheckpointError(f"{str(path)!r} is not a dinosae checkpoint (a {type(ck).__name__})")
    return ck


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in blocks (checkpoints, manifests, weights)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------- device and DDP

def pick_device(name: str = "auto") -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("config asks for device 'cuda' but no CUDA device is available")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def setup_ddp(device_name: str = "auto") -> tuple[int, int, torch.device]:
    """(rank, world_size, device). Initialises the process group when launched by torchrun
    (WORLD_SIZE > 1): NCCL on GPUs, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    device = pick_device(device_name)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return rank, world, device


def cleanup_ddp() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# ---------------------------------------------------------------- optimisation helpers

def lr_at(step: int, base: float, warmup: int, total: int, schedule: str = "cosine") -> float:
    """Linear warm-up over `warmup` steps, then constant or cosine decay to 10% at `total`."""
    if warmup > 0 and step < warmup:
        return base * (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return base
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema ← decay·ema + (1−decay)·model over parameters; buffers are copied."""
    for e, p in zip(ema.parameters(), model.parameters(), strict=True):
        e.lerp_(p.detach().to(e.dtype), 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers(), strict=True):
        e.copy_(b)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP / torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)


# ---------------------------------------------------------------- stop on SIGTERM

class StopFlag:
    """Set when SIGTERM/SIGINT arrives (Slurm sends SIGTERM at the time limit): the loop then
    writes a checkpoint and exits cleanly instead of dying mid-step."""

    def __init__(self) -> None:
        self.stop = False
        self._old = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass

    def _handle(self, signum, frame) -> None:  # noqa: ANN001
        log.warning("received signal %d: checkpointing and stopping", signum)
        self.stop = True

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


# ---------------------------------------------------------------- metrics.csv and progress

class MetricsCSV:
    """Append-only metrics.csv that survives resume: rows at or after the resumed step are
    dropped first, so a rerun after a kill never duplicates steps."""

    def __init__(self, path: str | Path, resume_step: int = 0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fields: list[str] | None = None
        if self.path.exists():
            with open(self.path, newline="") as f:
                rows = list(csv.DictReader(f))
            keep = [r for r in rows if int(float(r.get("step", 0))) < resume_step]
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


class Progress:
    """Progress for long loops: a tqdm bar on a terminal, and a log line every `every` steps
    (or `seconds`) with rate and ETA, which is what Slurm's log files show."""

    def __init__(self, total: int, start: int = 0, desc: str = "", unit: str = "step",
                 seconds: float = 30.0) -> None:
        self.total, self.done, self.desc, self.unit = total, start, desc, unit
        self.t0, self.start, self.last = time.time(), start, 0.0
        self.seconds = seconds
        self.bar = None
        if sys.stderr.isatty() and is_main():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc=desc, unit=unit)

    def update(self, n: int = 1, **info: Any) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            if info:
                self.bar.set_postfix({k: f"{v:.4g}" if isinstance(v, float) else v
                                      for k, v in info.items()})
            return
        now = time.time()
        if is_main() and (now - self.last >= self.seconds or self.done >= self.total):
            self.last = now
            rate = (self.done - self.start) / max(now - self.t0, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            extra = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                             for k, v in info.items())
            log.info("%s %d/%d %s (%.2f %s/s, ETA %s) %s", self.desc, self.done, self.total,
                     self.unit, rate, self.unit, _fmt_eta(eta), extra)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _fmt_eta(sec: float) -> str:
    if not math.isfinite(sec):
        return "?"
    sec = int(sec)
    return f"{sec // 3600:d}:{sec % 3600 // 60:02d}:{sec % 60:02d}"


def save_grid(images: torch.Tensor, path: str | Path, nrow: int = 8) -> None:
    """Save images in [0, 1] (B, 3, H, W) as one PNG grid (atomic)."""
    from torchvision.utils import save_image

    with atomic_path(path, suffix=".png") as tmp:
        save_image(images.detach().float().clamp(0, 1).cpu(), tmp, nrow=nrow, padding=2)
