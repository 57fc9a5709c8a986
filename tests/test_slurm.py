"""Snakemake through Slurm.

* `test_gpu_rule_submission_*`: the user profile (`slurm/`) with the workflow profile's per-rule
  resources, against a fake `sbatch` that records its arguments: a GPU rule asks Slurm for the
  GPUs, CPUs, time and memory its resources say. Needs no Slurm and no GPU; never skips.
* `test_pipeline_through_real_slurm`: the tiny pipeline (data, the four AE stages, encode)
  submitted by `snakemake --profile tests/slurm-profile` to the real single-node Slurm that
  `scripts/slurm-local.sh start` brings up (`.ci/run` does); skips when no Slurm answers,
  except in CI (CI=true), where it fails.
"""

import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import ROOT, skip_or_fail, tiny_config, workflow_copy

SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
BIN = str(Path(sys.executable).parent)
PROFILE = ROOT / "tests" / "slurm-profile"


def workdir(tmp: Path) -> Path:
    """A copy of the workflow on the tiny config, laid out as the repo root is."""
    return workflow_copy(tmp, tiny_config())


# ---------------------------------------------------------------- fake sbatch: the submission

FAKE_SBATCH = """#!/bin/sh
# records one submission per line (shell-quoted args) and refuses it, so Snakemake stops
python3 -c 'import shlex, sys; print(shlex.join(sys.argv[1:]))' "$@" >> "{log}"
echo "fake sbatch: submission recorded" >&2
exit 1
"""


def fake_slurm_bin(folder: Path, log: Path) -> Path:
    folder.mkdir()
    (folder / "sbatch").write_text(FAKE_SBATCH.format(log=log))
    # queries answer nothing: no accounting, no default partition, no MinJobAge
    for tool in ("sinfo", "squeue", "sacct", "scontrol", "sacctmgr", "sshare", "scancel"):
        (folder / tool).write_text("#!/bin/sh\nexit 0\n")
    for f in folder.iterdir():
        f.chmod(0o755)
    return folder


def sbatch_calls(tmp: Path, rule: str, *extra: str) -> list[list[str]]:
    work = workdir(tmp / "work")
    log = tmp / "sbatch.log"
    fake = fake_slurm_bin(tmp / "fakebin", log)
    # the rule's inputs exist; only this rule may run, so nothing upstream is submitted
    # (the target comes first: --allowed-rules takes several values)
    inputs = {
        "train_dit": ["results/latents/train.zarr/zarr.json", "results/latents/train.report.json",
                      "results/ae/stage4/checkpoint.pt"],
        "ae_stage1": ["data/shards/train/manifest.json"],
    }[rule]
    output = {"train_dit": "results/dit/checkpoint.pt",
              "ae_stage1": "results/ae/stage1/checkpoint.pt"}[rule]
    for f in inputs:
        (work / f).parent.mkdir(parents=True, exist_ok=True)
        (work / f).write_text("{}")
    env = {**os.environ, "PATH": f"{fake}{os.pathsep}{BIN}{os.pathsep}{os.environ['PATH']}"}
    r = subprocess.run([SNAKEMAKE, output, "--profile", "slurm", "--retries", "0",
                        "--slurm-init-seconds-before-status-checks", "1",
                        "--allowed-rules", rule, *extra],
                       cwd=work, capture_output=True, text=True, timeout=300, env=env)
    assert log.is_file(), f"sbatch was never called:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return [shlex.split(line) for line in log.read_text().splitlines()]


def flag(args: list[str], *names: str) -> str | None:
    """The value of the first of `names` (`--x v`, `--x=v` or `-t v`) in args."""
    for i, a in enumerate(args):
        for n in names:
            if a == n and i + 1 < len(args):
                return args[i + 1]
            if a.startswith(n + "="):
                return a[len(n) + 1:]
    return None


def profile_resources(rule: str) -> dict:
    prof = yaml.safe_load((ROOT / "workflow/profiles/default/config.yaml").read_text())
    return {**prof["default-resources"], **prof["set-resources"].get(rule, {})}


@pytest.mark.parametrize("rule", ["train_dit", "ae_stage1"])
def test_gpu_rule_submission_asks_for_its_resources(tmp_path: Path, rule: str):
    calls = sbatch_calls(tmp_path, rule)
    assert calls
    want = profile_resources(rule)
    for args in calls:  # one per attempt (the profile retries once)
        assert f"rule_{rule}" in (flag(args, "--comment") or "")
        gpus = flag(args, "--gpus")
        gres = flag(args, "--gres")
        assert gpus == str(want["gpu"]) or gres == f"gpu:{want['gpu']}", args
        assert flag(args, "--cpus-per-gpu") == str(want["cpus_per_gpu"]), args
        assert flag(args, "-t", "--time") == str(want["runtime"]), args
        assert flag(args, "--mem") == str(want["mem_mb"]), args


# ---------------------------------------------------------------- real Slurm: the pipeline

def slurm_node_state() -> str | None:
    """The local node's state when a Slurm controller answers, else None."""
    if shutil.which("sinfo") is None:
        return None
    try:
        r = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True,
                           timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.split()[0] if r.returncode == 0 and r.stdout.split() else None


def require_slurm() -> None:
    """Skip (fail under CI=true) unless a Slurm controller answers and its node takes jobs."""
    state = slurm_node_state()
    if state is None:
        skip_or_fail("no Slurm answers (`sinfo`); start one with scripts/slurm-local.sh start")
    if not state.startswith(("idle", "mix", "alloc")):
        skip_or_fail(f"the Slurm node is {state!r}, not idle; see /var/log/slurm/")


def our_jobs(work: Path) -> list[str]:
    """slurmctld's one-line records of the jobs submitted from `work`."""
    q = subprocess.run(["scontrol", "--oneliner", "show", "job"], capture_output=True,
                       text=True, timeout=30)
    return [line for line in q.stdout.splitlines() if f"WorkDir={work} " in line + " "]


@pytest.mark.slurm
@pytest.mark.integration
@pytest.mark.timeout(900)
def test_pipeline_through_real_slurm(tmp_path: Path):
    require_slurm()
    work = workdir(tmp_path)
    target = "results/latents/train.report.json"  # data, ae_stage1..4, encode_init/part/encode
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    t0 = time.time()
    try:
        r = subprocess.run([SNAKEMAKE, "--profile", str(PROFILE), "--workflow-profile", "none",
                            target], cwd=work, capture_output=True, text=True, timeout=600,
                           env=env)
    except subprocess.TimeoutExpired:
        stuck = [line for line in our_jobs(work) if "JobState=PENDING" in line]
        for line in our_jobs(work):
            subprocess.run(["scancel", line.split()[0].split("=")[1]], timeout=30)
        if stuck:  # the local Slurm never ran them: an environment problem, not ours
            skip_or_fail(f"Slurm left jobs pending for 10 min: {stuck[0][:300]}")
        raise
    took = time.time() - t0
    logs = "".join(f"\n--- {p}\n{p.read_text()[-2000:]}"
                   for p in sorted(work.glob(".snakemake/slurm_logs/**/*.log")))
    assert r.returncode == 0, f"snakemake via Slurm failed:\n{r.stderr[-6000:]}{logs}"
    print(f"pipeline through Slurm: {took:.0f} s")
    # the artifacts
    for k in (1, 2, 3, 4):
        assert (work / f"results/ae/stage{k}/checkpoint.pt").stat().st_size > 0
    assert (work / "results/latents/train.zarr/zarr.json").is_file()
    assert (work / "results/latents/train.report.json").is_file()
    # every job went through Slurm: one Slurm log per rule (kept by the profile), and sbatch
    # job ids in Snakemake's log
    rules = {p.name for p in (work / ".snakemake/slurm_logs").iterdir()}
    want = {"rule_mini_dataset", "rule_shard", "rule_encode_init", "rule_encode_part",
            "rule_encode"} | {f"rule_ae_stage{k}" for k in (1, 2, 3, 4)}
    assert want <= rules, rules
    assert "SLURM run ID" in r.stderr or "SLURM job ID" in r.stderr, r.stderr[-3000:]
    # and slurmctld saw them (finished jobs stay visible for MinJobAge, 300 s by default): the
    # latest ones, with the test profile's memory and no GPU request on this CPU node
    mine = our_jobs(work)
    assert any("Comment=rule_encode" in line for line in mine), mine
    for line in mine:
        tres = next(f for f in line.split() if f.startswith("TRES="))
        assert "mem=1000M" in tres and "gpu" not in tres, line
