"""A wall-time chain through the real local Slurm (dinosae/chains.py, train.loop.StopSources).

The tiny workflow's `ae_stage1`, with enough steps for about WORK_S of work on this machine (the
step count from a short local run's sec_per_step: a fixed count ran as one job on a faster
machine, and would need more jobs than allowed on a slower one), is submitted by
`snakemake --profile` (tests/slurm-profile plus the site setting `max_runtime: 1` minute) to
the single-node Slurm of scripts/slurm-local.sh. Each job reads its end time from squeue, stops
itself ahead of it (the lead measured in the job; its floor lowered to 5 s by
DINOSAE_CHAIN_MIN_LEAD_S), writes last.pt and exits "continue"; Snakemake resubmits it and the
next job resumes. Checked: several Slurm jobs ran for the rule, each but the last
stopped itself ahead of its limit after more steps than the one before (the run's stops.log),
the final checkpoint's tensors equal an uninterrupted local run's (torch.equal, CPU), and
metrics.csv holds each step once. The data shards are made locally first, and the uninterrupted
run goes alongside the chain, so the test takes about as long as the chain.
Skips when no Slurm answers, except in CI (CI=true), where it fails.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import ROOT, run_snakemake, tiny_config, workflow_copy
from test_slurm import our_jobs, require_slurm

SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
BIN = str(Path(sys.executable).parent)
# the chain's work in seconds: a 1-minute job does about 40 s of it on idle cores (it starts in
# ~15 s), so two or three jobs; ~10 s on a machine at load 7 (~50 s to start), where the chain
# needs many more jobs: up to 18 are allowed
WORK_S = 80.0
CAL_STEPS = 12  # the calibration run's steps (the first two, which build and warm up, not timed)
TARGET = "results/ae/stage1/checkpoint.pt"


def chain_profile(folder: Path) -> Path:
    """tests/slurm-profile with a max_runtime of 1 minute for ae_stage1 (the site setting, here
    for this rule alone: the others' planned 30 min would need a lead of their own), planned at
    10 minutes: a chain of jobs_in_chain(10, 1, 5) = 18 jobs at most (retries to spare on a
    loaded machine; the chain ends when the work is done)."""
    prof = yaml.safe_load((ROOT / "tests/slurm-profile/config.yaml").read_text())
    prof["set-resources"] = {"ae_stage1": {"max_runtime": 1, "runtime": 10, "checkpoint_gb": 0,
                                           "step_s": 1}}
    prof["slurm-init-seconds-before-status-checks"] = 2  # then +10 s a check: see a stop soon
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(prof))
    return folder


def steps_for(work: Path, cal: Path, env: dict) -> int:
    """The steps for WORK_S of ae_stage1 work here: a run of CAL_STEPS in `cal`, a copy of `work`
    (its data made), timed by its metrics.csv (the median sec_per_step after the first two)."""
    set_steps(cal, CAL_STEPS)
    run_snakemake(cal, TARGET, env=env, timeout=300)
    with open(cal / "results/ae/stage1/metrics.csv") as f:
        took = sorted(float(row["sec_per_step"]) for row in csv.DictReader(f)
                      if int(float(row["step"])) > 2)
    step_s = took[len(took) // 2]
    steps = int(min(max(WORK_S / step_s, 60), 2000))
    print(f"calibration: {step_s:.3f} s a step here, {steps} steps")
    return steps


def set_steps(work: Path, steps: int) -> None:
    cfg = yaml.safe_load((work / "config.yaml").read_text())
    cfg["ae_train"]["stages"][0]["steps"] = steps
    cfg["ae_train"].update(log_every=1, image_every=steps, ckpt_every=50)
    (work / "config.yaml").write_text(yaml.safe_dump(cfg))


def tensors(ck: dict, prefix: str = "") -> dict:
    import torch

    out = {}
    for k, v in ck.items():
        if isinstance(v, dict):
            out.update(tensors(v, f"{prefix}{k}."))
        elif torch.is_tensor(v):
            out[prefix + k] = v
    return out


@pytest.mark.slurm
@pytest.mark.integration
@pytest.mark.timeout(900)
def test_a_rule_longer_than_the_limit_runs_as_a_chain_of_slurm_jobs(tmp_path: Path):
    require_slurm()
    import torch

    from dinosae.checkpoint import load_checkpoint

    cfg = tiny_config()
    cfg["device"] = "cpu"
    work = workflow_copy(tmp_path / "work", cfg)
    env = {"OMP_NUM_THREADS": "1", "DINOSAE_CHAIN_MIN_LEAD_S": "5",
           "DINOSAE_CHAIN_STARTUP_S": "20"}
    run_snakemake(work, "data/shards/train/manifest.json", env=env, timeout=300)
    steps = steps_for(work, shutil.copytree(work, tmp_path / "cal", symlinks=True), env)
    set_steps(work, steps)
    ref = shutil.copytree(work, tmp_path / "ref", symlinks=True)

    # the uninterrupted run, locally, alongside the chain
    env = {**os.environ, **env, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    alone = subprocess.Popen([SNAKEMAKE, "--cores", "1", TARGET], cwd=ref, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    profile = chain_profile(tmp_path / "profile")
    t0 = time.time()
    try:
        r = subprocess.run([SNAKEMAKE, TARGET, "--profile", str(profile), "--workflow-profile",
                            "none", "--allowed-rules", "ae_stage1"], cwd=work,
                           capture_output=True, text=True, timeout=720, env=env)
    except BaseException:
        os.killpg(alone.pid, signal.SIGKILL)
        for line in our_jobs(work):
            subprocess.run(["scancel", line.split()[0].split("=")[1]], timeout=30)
        raise
    alone_out = alone.communicate(timeout=600)[0]
    took = time.time() - t0
    logs = sorted((work / ".snakemake/slurm_logs/rule_ae_stage1").glob("**/*.log"))
    shown = "".join(f"\n--- {p}\n{p.read_text()[-1500:]}" for p in logs)
    assert r.returncode == 0, f"the chain failed:\n{r.stderr[-6000:]}{shown}"
    assert alone.returncode == 0, alone_out[-3000:]
    print(f"chain through Slurm: {took:.0f} s, {len(logs)} job(s)")

    # (a) a chain: the rule was planned as one, and ran as several Slurm jobs, each but the
    # last stopping itself ahead of the minute with the "continue" status
    assert "ae_stage1: a chain of up to 18 jobs of 1 min" in r.stderr, r.stderr[-3000:]
    ids = re.findall(r"submitted with SLURM jobid (\d+)", r.stderr)
    assert len(logs) >= 2 and sorted(ids) == sorted(p.stem for p in logs), (ids, logs)
    assert r.stderr.count("Trying to restart job") == len(logs) - 1
    stops = (work / "results/ae/stage1/stops.log").read_text().splitlines()
    print("\n".join(stops))
    assert len(stops) == len(logs) - 1, stops
    at = []
    for line, job in zip(stops, ids, strict=False):  # each job but the last, in order
        assert f" job {job}: ae stage 1: stopped by the job's time limit (" in line, (line, ids)
        at.append(int(re.search(r"after step (\d+);", line).group(1)))
    assert at == sorted(set(at)) and 0 < at[0] and at[-1] < steps, at  # each made progress
    # (b) the chain's final checkpoint is the uninterrupted run's
    got = tensors(load_checkpoint(work / TARGET, map_location="cpu"))
    want = tensors(load_checkpoint(ref / TARGET, map_location="cpu"))
    assert got.keys() == want.keys() and len(got) > 10
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert not (work / "results/ae/stage1/last.pt").exists()
    # (c) each step logged once, in order
    with open(work / "results/ae/stage1/metrics.csv") as f:
        logged = [int(float(row["step"])) for row in csv.DictReader(f)]
    assert logged == list(range(1, steps + 1))
