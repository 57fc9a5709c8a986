"""Wall-time chains (dinosae/chains.py): the SIGTERM lead and the jobs of a chain against a
step-by-step count; a DiT run stopped by SIGTERM in every job of a chain exits with the
"continue" status each time and ends bit-identical to an uninterrupted run (CPU); the Snakemake
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
    chain_settings,
    format_chains,
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
        if limit * 60 - STARTUP_S - lead < 60:
            with pytest.raises(ValueError, match="under a minute of work"):
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


def test_a_chain_of_sigterm_stopped_jobs_ends_as_an_uninterrupted_run(tmp_path):
    cfg = tiny_config(tmp_path)
    cfg["device"] = "cpu"
    cfg["dit"].update(steps=7, batch_size=8, ckpt_every=100, log_every=2, image_every=100,
                      warmup_steps=2)
    cfg = {k: cfg[k] for k in ("seed", "device", "dit", "sample")}
    ref = load_checkpoint(TD.train_dit(cfg, FakeCache(), None, tmp_path / "ref"))

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
