"""Progress of long loops: a tqdm bar on a terminal, and otherwise a log line every `seconds`
with rate and ETA (what a Slurm log file shows). No torch: sharding workers use it too."""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from typing import Any

log = logging.getLogger("dinosae")


def is_main_process() -> bool:
    """Rank 0 of a torchrun launch (or a plain process)."""
    return os.environ.get("RANK", "0") == "0"


def format_eta(sec: float) -> str:
    if not math.isfinite(sec):
        return "?"
    sec = int(sec)
    return f"{sec // 3600:d}:{sec % 3600 // 60:02d}:{sec % 60:02d}"


class Progress:
    """`update(n, **info)` after each unit of work; `close()` at the end. Only rank 0 shows."""

    def __init__(self, total: int, start: int = 0, desc: str = "", unit: str = "step",
                 seconds: float = 30.0) -> None:
        self.total, self.done, self.desc, self.unit = total, start, desc, unit
        self.t0, self.start, self.last = time.time(), start, 0.0
        self.seconds = seconds
        self.main = is_main_process()
        self.bar = None
        if sys.stderr.isatty() and self.main:
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
        if self.main and (now - self.last >= self.seconds or self.done >= self.total):
            self.last = now
            rate = (self.done - self.start) / max(now - self.t0, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            extra = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                             for k, v in info.items())
            log.info("%s %d/%d %s (%.2f %s/s, ETA %s) %s", self.desc, self.done, self.total,
                     self.unit, rate, self.unit, format_eta(eta), extra)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
