"""Wall-time chains (dinosae/chains.py): the SIGTERM lead and the jobs of a chain against a
step-by-step count (and with the test settings of the environment); the job's end time from
the environment or squeue; the deadline's lead against a fake clock; a DiT run stopped by
SIGTERM, or by its job's end time, in every job of a chain exits with the "continue" status each
time and ends bit-identical to an uninterrupted run (CPU); the Snakemake
glue caps a long rule at the site's max_runtime, adds the --signal lead and sizes the retries
(through a fake sbatch, as tests/test_slurm.py's submission tests)."""

from __future__ import annotations

import math
import os
import signal

import pytest
from helpers import tiny_config
from test_dit import FakeCache, _assert_same_state
from test_slurm import flag, sbatch_calls

from dinosae.chains import (
    CONTINUE_EXIT,
    MIN_LEAD_S,
    STARTUP_S,
    Deadline,
    chain_settings,
    format_chains,
    job_end_time,
    jobs_in_chain,
    signal_lead_s,
)
from dinosae.checkpoint import load_checkpoint
from dinosae.train import dit as TD


def simulated_jobs(planned_min: float, limit_min: float, lead_s: int) -> int:
    """Jobs until the work is done, one second of work at a time."""
    left, jobs = planned_min * 60, 0
    while left > 0:
        jobs += 1
        left -= limit_min * 60 - STARTUP_S - lead_s
    return jobs


def test_lead_and_jobs_per_chain():
    # the paper's DiT last.pt (10.8 GB) at 200 MB/s: 55 s to write, a minute's step in flight
    assert signal_lead_s(10.8, 200.0) == math.ceil(2 * (60 + 10.8 * 1024 / 200))
    assert signal_lead_s(0.01, 5000.0, step_s=1) == MIN_LEAD_S  # never under Slurm's resolution
    for planned, limit, lead in [(24480, 2880, 223), (13680, 1440, 90), (100, 60, 90),
                                 (2880, 2880, 90), (3, 1, 0)]:
        if limit * 60 - STARTUP_S - lead < limit * 60 / 4:
            with pytest.raises(ValueError, match="under a quarter of each job"):
                jobs_in_chain(planned, limit, lead)
            continue
        want = 1 if planned <= limit else simulated_jobs(planned, limit, lead)
        assert jobs_in_chain(planned, limit, lead) == want, (planned, limit)
    assert jobs_in_chain(24480, None, 90) == 1
    s = chain_settings(24480, 2880, 10.8, 200.0)
    assert s["runtime"] == 2880 and s["jobs"] == 9 and s["signal"] == f"--signal=TERM@{s['lead_s']}"
    text = format_chains([("ae_stage1", 408.0), ("sample", 4.5), ("train_dit", 52.0)],
                         {"ae last.pt while training": 3e9, "dit last.pt while training": 1.1e10},
                         2880)
    assert "ae_stage1" in text and " 9 job(s) of 2880 min" in text
    assert "train_dit" in text and " 2 job(s) of 2880 min" in text and "sample" not in text


def dit_run_and_reference(tmp_path, steps: int, log_every: int) -> tuple[dict, dict]:
    """A tiny DiT run's config and the checkpoint of its uninterrupted run (in tmp_path/ref)."""
    cfg = tiny_config(tmp_path)
    cfg["device"] = "cpu"
    cfg["dit"].update(steps=steps, batch_size=8, ckpt_every=100, log_every=log_every,
                      image_every=100, warmup_steps=2)
    cfg = {k: cfg[k] for k in ("seed", "device", "dit", "sample")}
    return cfg, load_checkpoint(TD.train_dit(cfg, FakeCache(), None, tmp_path / "ref"))


def test_a_chain_of_sigterm_stopped_jobs_ends_as_an_uninterrupted_run(tmp_path):
    cfg, ref = dit_run_and_reference(tmp_path, steps=7, log_every=2)

    def term_at(n):
        def hook(served):
            if served == n:
                os.kill(os.getpid(), signal.SIGTERM)
        return hook

    out, steps = tmp_path / "chain", []
    for n in (2, 3, 1):  # each job stops after the step it is on when the signal comes
        with pytest.raises(SystemExit) as stop:
            TD.train_dit(cfg, FakeCache(hook=term_at(n)), None, out)
        assert stop.value.code == CONTINUE_EXIT and "stopped by signal" in str(stop.value)
        steps.append(load_checkpoint(out / "last.pt")["step"])
    assert steps == [2, 3, 4]  # (a resumed job counts the batches it skips as served)
    TD.train_dit(cfg, FakeCache(), None, out)
    _assert_same_state(load_checkpoint(out / "checkpoint.pt"), ref)


def test_the_environment_lowers_the_floor_and_the_start_up(monkeypatch):
    """What tests/test_chain_slurm.py runs with: a 1-minute limit, 20 s of start-up, 5 s lead."""
    monkeypatch.setenv("DINOSAE_CHAIN_MIN_LEAD_S", "5")
    monkeypatch.setenv("DINOSAE_CHAIN_STARTUP_S", "20")
    assert signal_lead_s(0.001, 500.0, step_s=1) == 5  # 2 x (1 s + 2 ms) under the floor
    assert signal_lead_s(0.001, 500.0, step_s=4) == 9
    assert jobs_in_chain(3, 1, 5) == math.ceil(180 / (60 - 20 - 5))  # 6 jobs of 35 s of work
    with pytest.raises(ValueError, match="under a quarter"):
        jobs_in_chain(3, 1, 30)  # 10 s of work in a 60 s job
    # a --signal Slurm may send a minute early could stop a 1-minute job at its start: none
    assert chain_settings(10, 1, 0, 500.0, step_s=1)["signal"] == ""
    assert chain_settings(10, 3, 0, 500.0, step_s=1)["signal"] == "--signal=TERM@5"
    monkeypatch.setenv("DINOSAE_CHAIN_MIN_LEAD_S", "soon")
    from dinosae.errors import ConfigError

    with pytest.raises(ConfigError, match="DINOSAE_CHAIN_MIN_LEAD_S='soon'"):
        signal_lead_s(1, 500.0)


def test_the_job_end_time(tmp_path, monkeypatch):
    from datetime import datetime, timezone

    assert job_end_time({}) is None  # not in a job
    assert job_end_time({"DINOSAE_JOB_END": "1700000000.5", "SLURM_JOB_ID": "7"}) == 1700000000.5
    assert job_end_time({"SLURM_JOB_END_TIME": "1700000060", "SLURM_JOB_ID": "7"}) == 1700000060
    # Slurm 22.05 exports no end time: squeue prints it in local time
    fake = tmp_path / "bin"
    fake.mkdir()
    squeue = fake / "squeue"
    squeue.write_text('#!/bin/sh\necho "$*" > "$(dirname "$0")/args"\necho "$FAKE_END"\n')
    squeue.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_END", "2026-12-03T15:02:00")
    import time

    monkeypatch.setenv("TZ", "America/New_York")  # squeue's local time is not UTC
    time.tzset()
    try:
        assert job_end_time({"SLURM_JOB_ID": "21"}) == datetime(2026, 12, 3, 20, 2,
                                                                 tzinfo=timezone.utc).timestamp()
    finally:
        monkeypatch.undo()
        time.tzset()
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    assert (fake / "args").read_text().split() == ["-h", "-j", "21", "-o", "%e"]
    for answer in ("N/A", "Unknown", ""):  # no time limit, or no answer: no deadline
        monkeypatch.setenv("FAKE_END", answer)
        assert job_end_time({"SLURM_JOB_ID": "21"}) is None
    assert job_end_time({"SLURM_JOB_ID": "21; rm -rf /"}) is None  # never reaches a command


def test_the_deadline_lead_is_measured_in_the_job():
    now = [1000.0]
    d = Deadline(end=1100.0, margin=2.0, floor=5.0, clock=lambda: now[0])
    assert d.lead_s() == 5.0 and not d.near()
    now[0] += 30.0  # the first step, with the job's start-up: not timed
    d.stepped()
    assert d.lead_s() == 5.0 and not d.near()  # 70 s left
    now[0] += 4.0
    d.stepped()
    assert d.lead_s() == 8.0  # 2 x the longest later step
    now[0] += 1.0
    d.saved(3.0)  # a last.pt written in 3 s (the time after it is the next step's)
    now[0] += 2.0
    d.stepped()
    assert d.lead_s() == 2 * (4.0 + 3.0)
    assert d.left_s() == 1100.0 - 1037.0 and not d.near()
    now[0] = 1100.0 - 14.0
    assert not d.near()
    now[0] += 0.5
    assert d.near()
    assert not Deadline(end=None, floor=0.0).near()  # no end time: only a signal stops


def test_a_chain_stopped_by_the_job_end_ends_as_an_uninterrupted_run(tmp_path, monkeypatch):
    """A job whose end is already nearer than the lead does one step, writes last.pt and exits
    "continue": the guard that every job makes progress. Four such jobs and a last one end with
    the uninterrupted run's checkpoint."""
    cfg, ref = dit_run_and_reference(tmp_path, steps=5, log_every=1)
    import time

    out, steps = tmp_path / "chain", []
    monkeypatch.setenv("DINOSAE_CHAIN_MIN_LEAD_S", "60")
    for _ in range(4):
        monkeypatch.setenv("DINOSAE_JOB_END", str(time.time() + 30))  # 30 s left < 60 s lead
        with pytest.raises(SystemExit) as stop:
            TD.train_dit(cfg, FakeCache(), None, out)
        assert stop.value.code == CONTINUE_EXIT, stop.value
        assert "stopped by the job's time limit" in str(stop.value)
        steps.append(load_checkpoint(out / "last.pt")["step"])
    assert steps == [1, 2, 3, 4]
    monkeypatch.setenv("DINOSAE_JOB_END", str(time.time() + 3600))
    TD.train_dit(cfg, FakeCache(), None, out)
    _assert_same_state(load_checkpoint(out / "checkpoint.pt"), ref)
    rows = (out / "metrics.csv").read_text().splitlines()[1:]
    assert [int(float(r.split(",")[0])) for r in rows] == [1, 2, 3, 4, 5]


@pytest.mark.integration
def test_a_long_rule_is_submitted_as_a_chain(tmp_path):
    """ae_stage1 (2880 min in the default workflow profile) under max_runtime 600: every
    submission asks for 600 min and SIGTERM ahead of the limit; Snakemake submits it
    jobs_in_chain + 1 times (the fake sbatch refuses each, as a failed job would be)."""
    calls = sbatch_calls(tmp_path, "ae_stage1", "--default-resources", "max_runtime=600",
                         "mem_mb=8000")
    assert calls
    leads = set()
    for args in calls:
        assert flag(args, "-t", "--time") == "600", args
        sig = [a for a in args if a.startswith("--signal=TERM@")]
        assert len(sig) == 1, args
        leads.add(int(sig[0].split("@")[1]))
    (lead,) = leads
    assert lead >= MIN_LEAD_S
    assert len(calls) == simulated_jobs(2880, 600, lead) + 1  # retries: jobs - 1 + 1 spare


def test_plan_prints_the_jobs_of_each_chain(tmp_path, capsys):
    import yaml

    from dinosae import cli

    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tmp_path)))
    assert cli.main(["plan", "--configfile", str(path), "--max-runtime", "30"]) == 0
    out = capsys.readouterr().out
    assert "wall-time chains under max_runtime 30 min" in out
    for rule in ("ae_stage1", "ae_stage4", "train_dit"):  # the tiny run: one job each
        assert any(line.split()[:1] == [rule] and " 1 job(s) of " in line
                   for line in out.splitlines()), rule
