"""Fault injection through the real Snakemake DAG: each long rule is killed partway, the workflow
is rerun with `--rerun-incomplete`, and the rerun must continue from the last durable point (a
finished tar, a checkpoint, a written cache unit, a written batch of samples) rather than start
over, and end with exactly the artifacts of the uninterrupted session run (conftest's
`pipeline_run`, same config).

Jobs are killed with DINOSAE_FAULT (dinosae/faults.py): the job sends itself SIGKILL (no handler,
no cleanup: a node failure or the OOM killer) or SIGTERM (Slurm at the time limit) when it
reaches the step the test chose.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import zarr
from helpers import run_snakemake, tiny_config, workflow_copy

pytestmark = pytest.mark.integration
TARGET = "results/samples/samples.h5"


def killed_run(work: Path, fault: str) -> str:
    """Run the workflow with one fault; the run must fail. Returns Snakemake's output."""
    r = run_snakemake(work, TARGET, "--rerun-incomplete", env={"DINOSAE_FAULT": fault},
                      check=False)
    assert r.returncode != 0, f"the fault {fault} did not stop the run:\n{r.stderr[-3000:]}"
    return r.stderr + r.stdout


def log(work: Path, rule: str) -> str:
    return (work / "results/logs" / f"{rule}.log").read_text()


def ckpt_step(path: Path) -> int:
    return int(torch.load(path, weights_only=True)["step"])


def same_tensors(a: dict, b: dict, where: str) -> None:
    assert a.keys() == b.keys(), where
    for k in a:
        assert torch.equal(a[k], b[k]), f"{where}: {k} differs"


def test_killed_jobs_resume_where_they_stopped_and_end_identical(pipeline_run, tmp_path):
    ref = pipeline_run
    work = workflow_copy(tmp_path / "faulty", tiny_config())
    train = work / "data/shards/train"

    # shard: SIGKILL after the 3rd finished tar of the train split
    out = killed_run(work, "shard-train@3")
    assert "Error in rule shard" in out
    assert not (train / "manifest.json").exists()
    journal = json.loads((train / ".progress.json").read_text())
    assert len(journal["shards"]) == 3
    kept = {s["name"]: (train / s["name"]).stat().st_mtime_ns for s in journal["shards"]}

    # ae_stage1: SIGKILL after step 5; checkpoints every 2 steps, so last.pt is at step 4
    killed_run(work, "ae-stage1@5")
    assert "resuming after 3 finished tars" in log(work, "shard_train")
    assert {n: (train / n).stat().st_mtime_ns for n in kept} == kept  # not written again
    stage1 = work / "results/ae/stage1"
    assert ckpt_step(stage1 / "last.pt") == 4 and not (stage1 / "checkpoint.pt").exists()

    # ae_stage1 again, now SIGTERM after step 5: the job checkpoints step 5, then exits
    killed_run(work, "ae-stage1@5:TERM")
    assert "resuming from results/ae/stage1/last.pt at step 4" in log(work, "ae_stage1")
    assert "stopped by signal after step 5" in log(work, "ae_stage1")
    assert ckpt_step(stage1 / "last.pt") == 5 and not (stage1 / "checkpoint.pt").exists()

    # ae_stage2..4: SIGKILL after step 3 (each checkpointed step 2); each rerun resumes the
    # previous stage at its last checkpoint
    for k, resumed in ((2, 5), (3, 2), (4, 2)):
        killed_run(work, f"ae-stage{k}@3")
        assert (f"resuming from results/ae/stage{k - 1}/last.pt at step {resumed}"
                in log(work, f"ae_stage{k - 1}"))
        assert ckpt_step(work / f"results/ae/stage{k}/last.pt") == 2

    # encode_part 0: SIGKILL after its 2nd written unit of the cache
    killed_run(work, "encode-part0@2")
    assert "resuming from results/ae/stage4/last.pt at step 2" in log(work, "ae_stage4")
    written = zarr.open_group(work / "results/latents/train.zarr", mode="r")["written"][:]
    assert written.sum() >= 2

    # train_dit: SIGKILL after step 5 (last.pt at 3), then SIGTERM after step 4
    killed_run(work, "train-dit@5")
    part0 = log(work, "encode_part_train_0")
    todo, total = map(int, re.search(r"(\d+) of (\d+) units to encode", part0).groups())
    assert todo == total - 2 and todo > 0  # the two written units are not encoded again
    dit = work / "results/dit"
    assert ckpt_step(dit / "last.pt") == 3 and not (dit / "checkpoint.pt").exists()
    killed_run(work, "train-dit@4:TERM")
    assert "resuming from results/dit/last.pt at step 3" in log(work, "train_dit")
    assert ckpt_step(dit / "last.pt") == 4

    # sample: SIGKILL after the first batch of 6 samples is written
    killed_run(work, "sample@6")
    assert "resuming from results/dit/last.pt at step 4" in log(work, "train_dit")
    with h5py.File(work / "results/samples/samples.h5.partial", "r") as f:
        assert int(f.attrs["done"]) == 6
    assert not (work / TARGET).exists()

    # no fault: everything finishes, the sampler continuing at sample 6 of 12
    run_snakemake(work, TARGET, "--rerun-incomplete")
    assert re.search(r"resuming \S+samples.h5.partial at 6/12 samples", log(work, "sample"))

    # ... and every artifact equals the uninterrupted run's
    a, b = ref / "data/shards/train", work / "data/shards/train"  # (val: not on the way)
    assert sorted(p.name for p in b.iterdir()) == sorted(p.name for p in a.iterdir())
    for p in a.iterdir():
        assert (b / p.name).read_bytes() == p.read_bytes(), p
    for k in (1, 2, 3, 4):
        a = torch.load(ref / f"results/ae/stage{k}/checkpoint.pt", weights_only=True)
        b = torch.load(work / f"results/ae/stage{k}/checkpoint.pt", weights_only=True)
        assert a["step"] == b["step"] and a["skipped"] == b["skipped"]
        for part in ("model", "ema") + (("disc",) if k > 1 else ()):
            same_tensors(a[part], b[part], f"stage {k} {part}")
        assert not (work / f"results/ae/stage{k}/last.pt").exists()
    za = zarr.open_group(ref / "results/latents/train.zarr", mode="r")
    zb = zarr.open_group(work / "results/latents/train.zarr", mode="r")
    assert zb.attrs["complete"] is True
    for name in ("tokens", "norms", "labels", "written"):
        np.testing.assert_array_equal(zb[name][:], za[name][:], err_msg=name)
    a = torch.load(ref / "results/dit/checkpoint.pt", weights_only=True)
    b = torch.load(work / "results/dit/checkpoint.pt", weights_only=True)
    same_tensors(a["ema"], b["ema"], "dit ema")
    same_tensors(a["model"], b["model"], "dit model")
    with h5py.File(ref / TARGET, "r") as fa, h5py.File(work / TARGET, "r") as fb:
        np.testing.assert_array_equal(fb["images"][:], fa["images"][:])
        np.testing.assert_array_equal(fb["labels"][:], fa["labels"][:])
    assert not (work / "results/samples/samples.h5.partial").exists()


def test_slurm_style_sigterm_to_the_whole_job_checkpoints(pipeline_run, tmp_path):
    """Slurm signals every process of a job at its time limit, DataLoader workers included:
    the workers ignore it, the training loop finishes its step, writes last.pt and exits; a
    rerun resumes from that step."""
    cfg = tiny_config()
    cfg["data"]["workers"] = 1  # one DataLoader worker process in the job's process group
    cfg["ae_train"]["stages"][0]["steps"] = 10000
    cfg["ae_train"].update(ckpt_every=10000, log_every=1)
    out = tmp_path / "stage1"
    cmd = [str(Path(sys.executable).with_name("dinosae")), "ae-train", "--cfg", json.dumps(cfg),
           "--stage", "1", "--shards", str(pipeline_run / "data/shards/train"), "--out", str(out)]
    job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           start_new_session=True)
    metrics = out / "metrics.csv"
    try:
        deadline = time.time() + 300
        while time.time() < deadline and job.poll() is None:  # wait for a few logged steps
            if metrics.exists() and len(metrics.read_text().splitlines()) > 3:
                break
            time.sleep(0.2)
        os.killpg(job.pid, signal.SIGTERM)
        rest, _ = job.communicate(timeout=300)
        code = job.returncode
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert code != 0 and "stopped by signal after step" in rest, rest[-3000:]
    assert "DataLoader worker" not in rest and "Traceback" not in rest, rest[-3000:]
    step = ckpt_step(out / "last.pt")
    assert 3 <= step < 10000 and not (out / "checkpoint.pt").exists()
    assert f"stopped by signal after step {step};" in rest
