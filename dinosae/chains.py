"""Wall-time chains: a training rule longer than the site's `max_runtime` runs as a chain of
Slurm jobs of at most that length.

Each job gets SIGTERM `signal_lead_s` before its time limit (`sbatch --signal=TERM@lead`): long
enough to finish the step it is on and write last.pt at the measured write rate. The training
loop then writes last.pt and exits with CONTINUE_EXIT ("continue": train.loop.RunCheckpoints);
Snakemake resubmits the rule (its retries are sized from the planned time: `jobs_in_chain`) and
the next job resumes from last.pt, so the chain ends with the checkpoint an uninterrupted run
writes (bit-identical on CPU: data order and noise are functions of the step). The glue to
Snakemake is `chain_rule` (called from the Snakefile for the training rules).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

CONTINUE_EXIT = 75  # EX_TEMPFAIL: stopped by the wall-time signal, last.pt written; rerun
SLURM_SIGNAL_RESOLUTION_S = 60  # Slurm may send --signal up to a minute early
STARTUP_S = 120  # a job's start before its first step: imports, loading last.pt, data workers
MIN_LEAD_S = 90


def signal_lead_s(checkpoint_gb: float, write_mb_s: float, step_s: float = 60.0,
                  margin: float = 2.0) -> int:
    """Seconds before the time limit at which the job must be told to stop: the step in
    flight plus writing a `checkpoint_gb` last.pt at `write_mb_s`, times `margin`, and at least
    MIN_LEAD_S (Slurm's own signal resolution is a minute)."""
    if write_mb_s <= 0:
        raise ValueError(f"write rate must be positive, got {write_mb_s} MB/s")
    write_s = checkpoint_gb * 1024 / write_mb_s
    return max(MIN_LEAD_S, math.ceil(margin * (step_s + write_s)))


def jobs_in_chain(planned_min: float, max_runtime_min: float | None, lead_s: int) -> int:
    """Jobs a rule of `planned_min` minutes of work needs under a `max_runtime_min` limit: each
    job works for its limit less the start-up and the signal lead (1 when there is no limit
    or the work fits one job)."""
    if not max_runtime_min or planned_min <= max_runtime_min:
        return 1
    work_s = max_runtime_min * 60 - STARTUP_S - lead_s
    if work_s < 60:
        raise ValueError(f"max_runtime {max_runtime_min} min leaves under a minute of work per "
                         f"job after {STARTUP_S} s of start-up and a {lead_s} s signal lead")
    return math.ceil(planned_min * 60 / work_s)


def measure_write_mb_s(folder: str | Path, mb: int = 64) -> float:
    """The write rate into `folder` (MB/s): `mb` MB written, fsync'd and removed."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f".write-rate-{os.getpid()}.tmp"
    block = os.urandom(1 << 20)
    t = time.perf_counter()
    try:
        with open(path, "wb") as f:
            for _ in range(mb):
                f.write(block)
            f.flush()
            os.fsync(f.fileno())
        return mb / max(time.perf_counter() - t, 1e-6)
    finally:
        path.unlink(missing_ok=True)


def chain_settings(planned_min: float, max_runtime_min: float | None, checkpoint_gb: float,
                   write_mb_s: float) -> dict[str, Any]:
    """{runtime (minutes per job), jobs, lead_s, signal (the sbatch flag)} of one rule."""
    lead = signal_lead_s(checkpoint_gb, write_mb_s)
    jobs = jobs_in_chain(planned_min, max_runtime_min, lead)
    runtime = planned_min if jobs == 1 else max_runtime_min
    return {"runtime": int(math.ceil(runtime)), "jobs": jobs, "lead_s": lead,
            "signal": f"--signal=TERM@{lead}"}


def chain_rule(rule: Any, write_mb_s: Callable[[], float], spare: int = 1
               ) -> dict[str, Any] | None:
    """Make a Snakemake rule (`workflow.get_rule(name)`) a chain when its planned `runtime`
    resource exceeds the site's `max_runtime` resource: runtime capped at max_runtime, the
    SIGTERM lead added to slurm_extra, retries = jobs - 1 + `spare`; `write_mb_s()` (measured
    once, by the caller's cache) only when needed. Returns the settings, or
    None when the rule's resources are not plain numbers (nothing to plan with) or no
    max_runtime is set."""
    res = rule.resources
    values = {}
    for key, default in (("runtime", None), ("max_runtime", None), ("checkpoint_gb", 1.0)):
        r = res.get(key) if hasattr(res, "get") else None
        v = getattr(r, "value", None) if r is not None else None  # a missing one: value None
        v = default if v is None else v
        if v is not None and not isinstance(v, (int, float)):
            return None
        values[key] = v
    if values["runtime"] is None or not values["max_runtime"]:
        return None
    s = chain_settings(float(values["runtime"]), float(values["max_runtime"]),
                       float(values["checkpoint_gb"]), write_mb_s())
    if s["jobs"] == 1:
        return s
    res["runtime"] = s["runtime"]
    extra = res.get("slurm_extra")
    extra = getattr(extra, "value", None) if extra is not None else None
    flags = " ".join(filter(None, [str(extra).strip("'\"") if extra else "", s["signal"]]))
    res["slurm_extra"] = f"'{flags}'"
    rule.restart_times = s["jobs"] - 1 + spare
    return s


PLAN_WRITE_MB_S = 500.0  # `dinosae plan`'s write rate for the lead (the rules measure theirs)
CHECKPOINT_OF = {"ae_stage": "ae last.pt while training", "train_dit": "dit last.pt while training"}


def format_chains(rules: list[tuple[str, float]], disk: dict[str, float],
                  max_runtime_min: float, write_mb_s: float = PLAN_WRITE_MB_S) -> str:
    """`dinosae plan --max-runtime`'s lines: each training rule's jobs per chain, from its
    planned wall hours per job (`rules`: (rule, hours)) and its last.pt size (`disk`)."""
    lines = [f"wall-time chains under max_runtime {max_runtime_min:g} min (SIGTERM lead for "
             f"last.pt at {write_mb_s:g} MB/s):"]
    for rule, hours in rules:
        key = next((v for k, v in CHECKPOINT_OF.items() if rule.startswith(k)), None)
        if key is None:
            if hours * 60 > max_runtime_min:
                lines.append(f"  {rule:<14} {hours:8.1f} h  ! longer than max_runtime and not "
                             "resumable: give it a longer partition")
            continue
        s = chain_settings(hours * 60, max_runtime_min, disk.get(key, 0.0) / 2**30, write_mb_s)
        lines.append(f"  {rule:<14} {hours:8.1f} h  {s['jobs']:4d} job(s) of {s['runtime']} min, "
                     f"SIGTERM {s['lead_s']} s before each limit")
    return "\n".join(lines)
