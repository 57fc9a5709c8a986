"""What the AE and DiT training loops share, written once: the LR schedule, EMA, endless
epochs, and the run's checkpoint files (periodic `last.pt`, stop on a signal on any rank, the
final `checkpoint.pt`). The loops themselves stay linear in train/ae.py, train/dit.py; what they
log (metrics.csv and the live backends) is train/logs.py.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from dinosae.checkpoint import load_checkpoint, save_checkpoint
from dinosae.dist import any_rank, barrier, is_main
from dinosae.faults import fault_point
from dinosae.signals import StopFlag

log = logging.getLogger("dinosae")


def lr_at(step: int, base: float, warmup: int, total: int, schedule: str = "cosine") -> float:
    """Linear warm-up over `warmup` steps, then constant or cosine decay to 10% at `total`."""
    if warmup > 0 and step < warmup:
        return base * (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return base
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema ← decay·ema + (1−decay)·model over parameters (one foreach op); buffers copied."""
    e = list(ema.parameters())
    p = [q.detach().to(x.dtype) for q, x in zip(model.parameters(), e, strict=True)]
    torch._foreach_lerp_(e, p, 1.0 - decay)
    for eb, b in zip(ema.buffers(), model.buffers(), strict=True):
        eb.copy_(b)


def endless(epoch_fn: Callable[[int], Iterable], epoch: int, index: int
            ) -> Iterator[tuple[tuple[int, int], Any]]:
    """Endless ((epoch, batches consumed in it after this one), batch), starting `index`
    batches into `epoch`; an epoch without a single batch is an error, not an endless loop."""
    while True:
        n = 0
        for i, batch in enumerate(epoch_fn(epoch)):
            n += 1
            if i >= index:
                yield (epoch, i + 1), batch
        if n == 0:
            raise RuntimeError(f"epoch {epoch} produced no batches: too few training samples for "
                               "the batch size and number of processes")
        epoch, index = epoch + 1, 0


def _flat(doc: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(doc, Mapping):
        return {prefix: doc}
    out: dict[str, Any] = {}
    for k, v in doc.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def identity_differences(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """Each setting or input identity that differs between what made a last.pt (`saved`) and
    this run (`now`), as 'key: was -> now'."""
    a, b = _flat(saved), _flat(now)

    def show(v: Any) -> str:
        text = repr(v)
        return text if len(text) <= 40 else text[:37] + "..."

    return [f"{k}: {show(a.get(k, '(none)'))} -> {show(b.get(k, '(none)'))}"
            for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


class RunCheckpoints:
    """The checkpoint files of one training run in `out`:

    * `last.pt`, the full state (optimizer included) every `every` steps and when a signal
      stops the run; a rerun resumes from it (`resume()`);
    * `checkpoint.pt`, written once at the end (`finish()`), after which last.pt is removed.

    `after_step(done, state)` is called by every rank after each step: it saves last.pt when
    due, and when SIGTERM/SIGINT reached any rank, saves and exits every rank with
    "<name>: stopped by signal after step N; rerun to resume from <out>/last.pt".
    `state` is a function returning the dict to save (built only when saving); `stop`, when
    given, is the signal flag already agreed over the ranks (the DiT step reduces it together
    with its losses: one host sync per step; under DDP a signal that arrives after that reduction
    is acted on one step later).
    """

    def __init__(self, out: Path, every: int, steps: int, name: str, fault: str,
                 device: torch.device, identity: Mapping[str, Any] | None = None,
                 restart: bool = False) -> None:
        self.last, self.final = out / "last.pt", out / "checkpoint.pt"
        self.every, self.steps, self.name, self.fault = every, steps, name, fault
        self.device = device
        self.identity, self.restart = dict(identity or {}), restart
        self.signal = StopFlag()

    def resume(self) -> dict | None:
        """last.pt's contents, or None when there is none (or `restart`: it is then replaced at
        the first save). A last.pt made by another run (its `identity`: input checkpoints and
        cache, seed, every setting that changes the trajectory) or a final checkpoint put in
        its place is refused in one line naming each difference."""
        from dinosae.errors import CheckpointError

        if not os.path.lexists(self.last):
            return None
        if self.restart:
            log.warning("%s: --restart: starting afresh; %s (another run's) will be replaced",
                        self.name, self.last)
            return None
        ck = load_checkpoint(self.last, map_location=self.device)
        again = "rerun with the settings it was made with, or pass --restart to start afresh"
        if "optimizer" not in ck:
            raise CheckpointError(f"{self.last}: a final checkpoint (no optimizer state), not a "
                                  f"last.pt a run resumes from; move it away, or {again}")
        saved = ck.get("identity")
        if not isinstance(saved, Mapping):
            raise CheckpointError(f"{self.last}: does not record what made it (an older "
                                  f"dinosae's?); it may be another run's: {again}")
        diffs = identity_differences(saved, self.identity)
        if diffs:
            raise CheckpointError(f"{self.last}: made by another run ({'; '.join(diffs)}); "
                                  f"{again}")
        return ck

    def _stamped(self, state: dict) -> dict:
        return {**state, "identity": self.identity}

    def after_step(self, done: int, state: Callable[[], dict], stop: bool | None = None
                   ) -> None:
        fault_point(self.fault, done)
        if stop is None:  # not yet agreed over the ranks by the caller
            stop = any_rank(self.signal.stop, self.device)
        elif not torch.distributed.is_initialized():  # alone: a signal since then counts too
            stop = stop or self.signal.stop
        stopping = stop and done < self.steps
        if (done % self.every == 0 and done < self.steps) or stopping:
            if is_main():
                save_checkpoint(self.last, self._stamped(state()))
            barrier()
        if stopping:
            raise SystemExit(f"{self.name}: stopped by signal after step {done}; rerun to resume "
                             f"from {self.last}")

    def finish(self, state: Callable[[], dict]) -> Path:
        if is_main():
            save_checkpoint(self.final, self._stamped(state()))
            self.last.unlink(missing_ok=True)
            log.info("%s: wrote %s", self.name, self.final)
        barrier()
        return self.final

    def close(self) -> None:
        self.signal.restore()
