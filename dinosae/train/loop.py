"""What the AE and DiT training loops share, written once: the LR schedule, EMA, endless
epochs, and the run's checkpoint files (periodic `last.pt`, stop on a signal on any rank, the
final `checkpoint.pt`). The loops themselves stay linear in train/ae.py, train/dit.py; what they
log (metrics.csv and the live backends) is train/logs.py.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dinosae.chains import CONTINUE_EXIT, Deadline, job_end_time
from dinosae.checkpoint import load_checkpoint, save_checkpoint
from dinosae.dist import any_rank, barrier, is_main
from dinosae.errors import NumericsError
from dinosae.faults import fault_point
from dinosae.signals import StopFlag

if TYPE_CHECKING:
    from dinosae.train.logs import RunLog

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


class StoppedToContinue(SystemExit):
    """Stopped by SIGTERM/SIGINT with last.pt written: exit status CONTINUE_EXIT (a wall-time
    chain's job resubmitted to resume, dinosae.chains); the message goes to stderr."""

    def __init__(self, message: str) -> None:
        super().__init__(CONTINUE_EXIT)
        self.message = message
        if is_main():
            print(message, file=sys.stderr, flush=True)

    def __str__(self) -> str:
        return self.message


class StopSources:
    """Why a run stops early: SIGTERM/SIGINT (`flag`), or its job's end time coming nearer than
    the measured lead (`deadline`, dinosae.chains.Deadline: a wall-time chain's job stops itself
    before Slurm's limit). `.stop` is either; the loops read it as they read a StopFlag."""

    def __init__(self, deadline: Deadline | None = None) -> None:
        self.flag = StopFlag()
        self.deadline = Deadline(job_end_time()) if deadline is None else deadline

    @property
    def stop(self) -> bool:
        return self.flag.stop or self.deadline.near()

    def reason(self) -> str:
        if self.flag.stop or not self.deadline.near():
            return "signal"
        return (f"the job's time limit ({self.deadline.left_s():.0f} s left, under the "
                f"{self.deadline.lead_s():.0f} s lead)")

    def restore(self) -> None:
        self.flag.restore()


class RunCheckpoints:
    """The checkpoint files of one training run in `out`:

    * `last.pt`, the full state (optimizer included) every `every` steps and when a signal
      stops the run; a rerun resumes from it (`resume()`);
    * `checkpoint.pt`, written once at the end (`finish()`), after which last.pt is removed;
    * `stops.log`, a line for each time the run stopped early (when, the Slurm job, why, at
      which step): a wall-time chain's jobs.

    `after_step(done, state)` is called by every rank after each step: it saves last.pt when
    due, and when SIGTERM/SIGINT reached any rank, or the job's end time is nearer than the lead
    (`StopSources`), saves and exits every rank with status CONTINUE_EXIT and
    "<name>: stopped by signal after step N; rerun to resume from <out>/last.pt" (or "by the
    job's time limit (...)").
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
        self.signal = StopSources()

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
        self.signal.deadline.stepped()
        if stop is None:  # not yet agreed over the ranks by the caller
            stop = any_rank(self.signal.stop, self.device)
        elif not torch.distributed.is_initialized():  # alone: a signal since then counts too
            stop = stop or self.signal.stop
        stopping = stop and done < self.steps
        if (done % self.every == 0 and done < self.steps) or stopping:
            t = time.perf_counter()
            if is_main():
                save_checkpoint(self.last, self._stamped(state()))
            barrier()
            self.signal.deadline.saved(time.perf_counter() - t)
        if stopping:
            message = (f"{self.name}: stopped by {self.signal.reason()} after step {done}; "
                       f"rerun to resume from {self.last}")
            if is_main():  # one line per stop of the run's jobs (the job log is rewritten)
                with open(self.last.parent / "stops.log", "a") as f:
                    f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} job "
                            f"{os.environ.get('SLURM_JOB_ID', '-')}: {message}\n")
            raise StoppedToContinue(message)

    def finish(self, state: Callable[[], dict]) -> Path:
        if is_main():
            save_checkpoint(self.final, self._stamped(state()))
            self.last.unlink(missing_ok=True)
            log.info("%s: wrote %s", self.name, self.final)
        barrier()
        return self.final

    def close(self) -> None:
        self.signal.restore()


# settings a resumed run may change (train.ae.run_identity, train.dit.run_identity): the
# micro-batch (the same update, accumulated; another GPU kind in a chain) and the recovery policy
NOT_TRAJECTORY = ("micro_batch", "rollbacks", "rollback_lr_factor")


class Diverged(NumericsError):
    """`max_bad_steps` non-finite steps in a row: the loop stops; `Recovery` may roll back."""


class Recovery:
    """Recovery from divergence. When a loop raises Diverged, `roll_back` lets the caller run
    the loop again from last.pt (the last checkpoint, of finite weights: non-finite steps are
    never applied) with the learning rate scaled by `rollback_lr_factor`, at most `rollbacks`
    times per run; each rollback is a warning in the log and a row in metrics.csv (the row
    written by the loop when it starts again: `log_pending`). The count and the scale travel in
    last.pt (`state`, `adopt`), so a resumed job keeps the reduced learning rate.

    Config keys (ae_train, dit): rollbacks (default 0: stop as before), rollback_lr_factor
    (default 0.5)."""

    def __init__(self, section: dict, name: str) -> None:
        self.allowed = int(section.get("rollbacks", 0))
        self.factor = float(section.get("rollback_lr_factor", 0.5))
        self.name, self.rollbacks, self.lr_scale = name, 0, 1.0
        self.pending: dict | None = None

    def state(self) -> dict:
        return {"rollbacks": self.rollbacks, "lr_scale": self.lr_scale}

    def adopt(self, saved: dict | None) -> None:
        """Take a resumed checkpoint's count and scale unless this process has rolled back
        since it was written (then its own are newer)."""
        if saved and int(saved["rollbacks"]) > self.rollbacks:
            self.rollbacks, self.lr_scale = int(saved["rollbacks"]), float(saved["lr_scale"])

    def roll_back(self, error: Diverged, last: Path) -> None:
        """Prepare the next attempt, or re-raise `error` when no rollback is left or there
        is no checkpoint to go back to."""
        if self.rollbacks >= self.allowed:
            if self.allowed:
                raise Diverged(f"{error} (after {self.rollbacks} rollback(s), the most allowed)"
                               ) from None
            raise error
        if not last.is_file():
            raise Diverged(f"{error} (no checkpoint to roll back to yet)") from None
        ck = load_checkpoint(last, map_location="cpu", mmap=True)
        bad = [k for k, v in ck.get("model", {}).items()
               if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise Diverged(f"{error} ({last} holds non-finite weights: {bad[0]}; nothing to "
                           "roll back to)") from None
        self.rollbacks += 1
        self.lr_scale *= self.factor
        self.pending = {"step": int(ck["step"]), "rollbacks": self.rollbacks,
                        "lr_scale": self.lr_scale}
        if is_main():
            log.warning("%s: %s; rolling back to step %d (%s), learning rate x%g (rollback %d "
                        "of %d)", self.name, error, ck["step"], last, self.lr_scale,
                        self.rollbacks, self.allowed)

    def log_pending(self, metrics: RunLog | None) -> None:
        """The rollback's row, once metrics.csv has been cut back to the resumed step."""
        if self.pending is not None and metrics is not None:
            metrics.log(self.pending["step"], self.pending)
        self.pending = None
