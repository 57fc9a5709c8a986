"""Wall-time chains: a training rule longer than the site's `max_runtime` runs as a chain of
Slurm jobs of at most that length.

Each job stops itself ahead of its time limit: at start it reads the job's end time
(`job_end_time`: SLURM_JOB_END_TIME, else `squeue -o %e`), and after each step the training loop
(train.loop.RunCheckpoints) compares the time left with a lead measured in the job (`Deadline`:
twice the longest step plus the longest last.pt write, at least `min_lead_s()`). When less is
left it writes last.pt and exits with CONTINUE_EXIT ("continue"). Slurm's own SIGTERM
(`sbatch --signal=TERM@lead`, lead from the rule's checkpoint size and the write rate measured
into results/) stays as the backstop, and stops the job the same way. Snakemake resubmits the
rule (its retries are sized from the planned time: `jobs_in_chain`) and the next job resumes
from last.pt, so the chain ends with the checkpoint an uninterrupted run writes (bit-identical
on CPU: data order and noise are functions of the step). Every job does at least one step; one
that cannot finish a step before Slurm kills it makes no progress, and the chain then ends,
failed, when the rule's retries run out (last.pt kept). The glue to Snakemake is `chain_rule`
(called from the Snakefile for the training rules).

Settings for tests and unusual sites (environment, read where they are used, also inside jobs):
DINOSAE_CHAIN_MIN_LEAD_S (the lead's floor, default 90 s: Slurm delivers --signal with a
resolution of a minute), DINOSAE_CHAIN_STARTUP_S (a job's start before its first step, default
120 s, for the jobs per chain), DINOSAE_JOB_END (the job's end, epoch seconds, for schedulers
other than Slurm).
"""

from __future__ import annotations

import math
import os
import subprocess
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

CONTINUE_EXIT = 75  # EX_TEMPFAIL: stopped by the wall-time signal, last.pt written; rerun
SLURM_SIGNAL_RESOLUTION_S = 60  # Slurm may send --signal up to a minute early
STARTUP_S = 120  # a job's start before its first step: imports, loading last.pt, data workers
MIN_LEAD_S = 90  # the lead's floor (Slurm's signal resolution is a minute)
MIN_LEAD_ENV, STARTUP_ENV, JOB_END_ENV = ("DINOSAE_CHAIN_MIN_LEAD_S", "DINOSAE_CHAIN_STARTUP_S",
                                          "DINOSAE_JOB_END")


def _seconds_from_env(name: str, default: float) -> float:
    text = os.environ.get(name, "").strip()
    if not text:
        return float(default)
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0 or math.isinf(value):
        from dinosae.errors import ConfigError

        raise ConfigError(f"{name}={text!r}: expected a number of seconds >= 0")
    return value


def min_lead_s() -> float:
    """The lead's floor: DINOSAE_CHAIN_MIN_LEAD_S, else MIN_LEAD_S (90 s)."""
    return _seconds_from_env(MIN_LEAD_ENV, MIN_LEAD_S)


def startup_s() -> float:
    """A job's start before its first step: DINOSAE_CHAIN_STARTUP_S, else STARTUP_S (120 s)."""
    return _seconds_from_env(STARTUP_ENV, STARTUP_S)


def signal_lead_s(checkpoint_gb: float, write_mb_s: float, step_s: float = 60.0,
                  margin: float = 2.0) -> int:
    """Seconds before the time limit at which the job must be told to stop: the step in
    flight plus writing a `checkpoint_gb` last.pt at `write_mb_s`, times `margin`, and at least
    `min_lead_s()` (90 s: Slurm's own signal resolution is a minute)."""
    if write_mb_s <= 0:
        raise ValueError(f"write rate must be positive, got {write_mb_s} MB/s")
    write_s = checkpoint_gb * 1024 / write_mb_s
    return max(math.ceil(min_lead_s()), math.ceil(margin * (step_s + write_s)))


def jobs_in_chain(planned_min: float, max_runtime_min: float | None, lead_s: int) -> int:
    """Jobs a rule of `planned_min` minutes of work needs under a `max_runtime_min` limit: each
    job works for its limit less the start-up (`startup_s()`) and the signal lead (1 when there
    is no limit or the work fits one job). A limit that leaves under a quarter of itself for
    work is refused."""
    if not max_runtime_min or planned_min <= max_runtime_min:
        return 1
    start = startup_s()
    work_s = max_runtime_min * 60 - start - lead_s
    if work_s < max_runtime_min * 60 / 4:
        raise ValueError(f"max_runtime {max_runtime_min:g} min leaves under a quarter of each job "
                         f"for work after {start:g} s of start-up and a {lead_s} s signal lead")
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
                   write_mb_s: float, step_s: float = 60.0) -> dict[str, Any]:
    """{runtime (minutes per job), jobs, lead_s, signal (the sbatch flag)} of one rule."""
    lead = signal_lead_s(checkpoint_gb, write_mb_s, step_s)
    jobs = jobs_in_chain(planned_min, max_runtime_min, lead)
    runtime = planned_min if jobs == 1 else max_runtime_min
    # Slurm may deliver --signal up to a minute early: under limits so short that this could
    # cost half the job, the job's own stop (Deadline) and Slurm's SIGTERM at the limit (then
    # KillWait, 30 s by default, to write last.pt) are the only stops
    early = lead + SLURM_SIGNAL_RESOLUTION_S >= runtime * 60 / 2
    return {"runtime": int(math.ceil(runtime)), "jobs": jobs, "lead_s": lead,
            "signal": "" if early else f"--signal=TERM@{lead}"}


def _plain(resource: Any) -> Any:
    """A Snakemake resource's value when it is a constant (a number Snakemake keeps as an
    expression, such as 0.5, from its text), else None (missing) or the resource itself."""
    if resource is None:
        return None
    if getattr(resource, "is_evaluable", lambda: False)():
        try:
            return float(str(getattr(resource, "raw", "")).strip("'\""))
        except ValueError:
            return resource  # a function of the job: not a plain number
    return getattr(resource, "value", None)


def chain_rule(rule: Any, write_mb_s: Callable[[], float], spare: int = 1
               ) -> dict[str, Any] | None:
    """Make a Snakemake rule (`workflow.get_rule(name)`) a chain when its planned `runtime`
    resource exceeds the site's `max_runtime` resource: runtime capped at max_runtime, the
    SIGTERM lead (from the optional resources checkpoint_gb, default 1, and step_s, a step's
    seconds, default 60) added to slurm_extra, retries = jobs - 1 + `spare`; `write_mb_s()`
    (measured once, by the caller's cache) only when needed. Returns the settings, or
    None when the rule's resources are not plain numbers (nothing to plan with) or no
    max_runtime is set."""
    res = rule.resources
    values = {}
    for key, default in (("runtime", None), ("max_runtime", None), ("checkpoint_gb", 1.0),
                         ("step_s", 60.0)):
        v = _plain(res.get(key) if hasattr(res, "get") else None)
        v = default if v is None else v
        if v is not None and not isinstance(v, (int, float)):
            return None
        values[key] = v
    if values["runtime"] is None or not values["max_runtime"]:
        return None
    s = chain_settings(float(values["runtime"]), float(values["max_runtime"]),
                       float(values["checkpoint_gb"]), write_mb_s(), float(values["step_s"]))
    if s["jobs"] == 1:
        return s
    res["runtime"] = s["runtime"]
    extra = res.get("slurm_extra")
    extra = getattr(extra, "value", None) if extra is not None else None
    flags = " ".join(filter(None, [str(extra).strip("'\"") if extra else "", s["signal"]]))
    if flags:
        res["slurm_extra"] = f"'{flags}'"
    rule.restart_times = s["jobs"] - 1 + spare
    return s


def job_end_time(env: dict[str, str] | None = None) -> float | None:
    """The time (epoch seconds) at which the scheduler ends this job: DINOSAE_JOB_END, else
    Slurm's SLURM_JOB_END_TIME (Slurm >= 23.02), else `squeue -h -j $SLURM_JOB_ID -o %e` asked
    once (Slurm 22.05 exports no end time). None outside a job, for a job without a time limit,
    or when squeue does not answer (the SIGTERM lead then stops the job alone)."""
    env = os.environ if env is None else env
    for name in (JOB_END_ENV, "SLURM_JOB_END_TIME"):
        text = env.get(name, "").strip()
        if text:
            try:
                return float(text)
            except ValueError:
                from dinosae.errors import ConfigError

                raise ConfigError(f"{name}={text!r}: expected epoch seconds") from None
    job = env.get("SLURM_JOB_ID", "").strip()
    if not job.isdigit():
        return None
    try:
        r = subprocess.run(["squeue", "-h", "-j", job, "-o", "%e"], capture_output=True,
                           text=True, timeout=60)
        return datetime.fromisoformat(r.stdout.strip()).timestamp()  # local time, as printed
    except (OSError, subprocess.SubprocessError, ValueError):  # no squeue, 'N/A', no answer
        return None


class Deadline:
    """When to stop ahead of the job's end time `end` (epoch seconds; None: never).

    The loop calls `stepped()` after each step and `saved(seconds)` after writing last.pt;
    `near()` is True once the time left is under `lead_s()`: `margin` x (the longest step +
    the longest last.pt write seen in this job), at least `floor` (`min_lead_s()`). The first
    step is not timed (it holds the job's start: building the models, loading last.pt, data
    workers, compilation), so the first job's lead until its second step is the floor plus the
    write. `clock` is for tests.
    """

    def __init__(self, end: float | None, margin: float = 2.0, floor: float | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.end, self.margin, self.clock = end, margin, clock
        self.floor = min_lead_s() if floor is None else floor
        self.step_s = self.save_s = 0.0
        self.steps = 0
        self._t = clock()

    def stepped(self) -> None:
        now = self.clock()
        took, self._t = now - self._t, now
        self.steps += 1
        if self.steps > 1:
            self.step_s = max(self.step_s, took)

    def saved(self, seconds: float) -> None:
        self.save_s = max(self.save_s, seconds)
        self._t = self.clock()  # the next step's time starts after the write

    def lead_s(self) -> float:
        return max(self.floor, self.margin * (self.step_s + self.save_s))

    def left_s(self) -> float:
        return math.inf if self.end is None else self.end - self.clock()

    def near(self) -> bool:
        return self.end is not None and self.left_s() < self.lead_s()


PLAN_WRITE_MB_S = 500.0  # `dinosae plan`'s write rate for the lead (the rules measure theirs)
CHECKPOINT_OF = {"ae_stage": "ae last.pt while training", "train_dit": "dit last.pt while training"}


def format_chains(rules: list[tuple[str, float]], disk: dict[str, float],
                  max_runtime_min: float, write_mb_s: float = PLAN_WRITE_MB_S) -> str:
    """`dinosae plan --max-runtime`'s lines: each training rule's jobs per chain, from its
    planned wall hours per job (`rules`: (rule, hours)) and its last.pt size (`disk`)."""
    lines = [f"wall-time chains under max_runtime {max_runtime_min:g} min (each job stops "
             "itself ahead of its end time; Slurm's SIGTERM lead, the backstop, for last.pt at "
             f"{write_mb_s:g} MB/s):"]
    for rule, hours in rules:
        key = next((v for k, v in CHECKPOINT_OF.items() if rule.startswith(k)), None)
        if key is None:
            if hours * 60 > max_runtime_min:
                lines.append(f"  {rule:<14} {hours:8.1f} h  ! longer than max_runtime and not "
                             "resumable: give it a longer partition")
            continue
        s = chain_settings(hours * 60, max_runtime_min, disk.get(key, 0.0) / 2**30, write_mb_s)
        backstop = (f"SIGTERM {s['lead_s']} s before each limit" if s["signal"] else
                    "SIGTERM at the limit (a minute-early --signal could cost half the job)")
        lines.append(f"  {rule:<14} {hours:8.1f} h  {s['jobs']:4d} job(s) of {s['runtime']} min, "
                     f"{backstop}")
    return "\n".join(lines)
