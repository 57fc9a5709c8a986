"""Several nodes per job: the exact srun + torchrun line of a multi-node rule, and what the
Snakefile's `launch` makes of a rule's resources."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from helpers import ROOT

from dinosae.multinode import gpus_per_node, torchrun_command


def test_the_srun_torchrun_line():
    assert torchrun_command(4, 8) == (
        "srun --nodes=4 --ntasks=4 --ntasks-per-node=1 --kill-on-bad-exit=1 "
        "torchrun --nnodes=4 --nproc_per_node=8 --rdzv_backend=c10d "
        '--rdzv_endpoint=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1):'
        "$(( 29500 + SLURM_JOB_ID % 20000 )) "
        '--rdzv_id="$SLURM_JOB_ID" -m dinosae')
    with pytest.raises(ValueError):
        torchrun_command(1, 8)
    assert gpus_per_node({"gres": "gpu:8"}) == 8
    assert gpus_per_node({"gres": "gpu:h100:4"}) == 4
    assert gpus_per_node({"gpu": 2}) == 2


def test_the_line_expands_in_a_shell_to_the_first_node_and_the_job_port(tmp_path):
    """The job shell expands the rendezvous: a fake scontrol lists two nodes."""
    import os
    import shlex
    import subprocess

    (tmp_path / "scontrol").write_text("#!/bin/sh\nprintf 'gpu-a17\\ngpu-a18\\n'\n")
    (tmp_path / "srun").write_text('#!/bin/sh\nfor a in "$@"; do echo "$a"; done\n')
    for f in ("scontrol", "srun"):
        (tmp_path / f).chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "SLURM_JOB_ID": "123456",
           "SLURM_JOB_NODELIST": "gpu-a[17-18]"}
    out = subprocess.run(["bash", "-c", torchrun_command(2, 4) + " ae-train --stage 1"],
                         env=env, capture_output=True, text=True, check=True).stdout.split("\n")
    assert "--rdzv_endpoint=gpu-a17:" + str(29500 + 123456 % 20000) in out
    assert "--rdzv_id=123456" in out and "--nnodes=2" in out and "--nproc_per_node=4" in out
    assert out[-3:-1] == ["--stage", "1"] and shlex.join(out[:4]).startswith("--nodes=2")


def test_the_four_node_profile_launches_the_training_rules_on_four_nodes():
    prof = yaml.safe_load((ROOT / "workflow/profiles/imagenet256_4nodes/config.yaml").read_text())
    one = yaml.safe_load((ROOT / "workflow/profiles/imagenet256/config.yaml").read_text())
    for rule in ("ae_stage1", "ae_stage2", "ae_stage3", "ae_stage4", "train_dit"):
        r = prof["set-resources"][rule]
        assert r["nodes"] == r["tasks"] == 4 and r["mpi"] == "srun"
        assert gpus_per_node(r) == one["set-resources"][rule]["gpu"] == 8
        # a quarter of the one-node job's time, the same global batch on 4x the GPUs
        assert r["runtime"] == one["set-resources"][rule]["runtime"] // 4
        assert re.fullmatch(r"gpu:\d+", r["gres"])


# ---------------------------------------------------------------- two torchrun agents

def _torchrun_two_nodes(tmp_path, *args: str) -> None:
    """Two torchrun agents, as two nodes would start them (--nnodes=2, one rank each, c10d
    rendezvous on localhost), each running tests/torchrun_worker.py ARGS."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    cmd, n = [torchrun, "--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d",
              f"--rdzv_endpoint=127.0.0.1:{port}", f"--rdzv_id=test{port}"], 2
    cmd += [str(ROOT / "tests" / "torchrun_worker.py"), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    agents = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True) for _ in range(n)]
    for a in agents:
        out, _ = a.communicate(timeout=600)
        assert a.returncode == 0, out[-3000:]


def _rel(a: dict, b: dict) -> float:
    """||a - b|| / ||b|| over all the weights as one vector (per tensor, AdamW turns rounding
    into 1e-6 on near-zero gradients: see test_accumulation)."""
    from test_accumulation import max_rel_diff

    return max_rel_diff(a, b)


@pytest.mark.integration
def test_two_torchrun_nodes_train_as_one_process(tmp_path):
    """Two torchrun agents with --nnodes=2 (c10d rendezvous on localhost), one rank each holding
    4 rows of the global batch of 8 and accumulating over micro-batches of 3 + 1 rows, against
    ONE process on the global batch of 8 without accumulation: the DiT (noise, times, label
    dropout per sample), AE stage 1 and AE stage 2 (DiffAugment per sample, the adaptive
    weight from all-reduced gradients, the discriminator) end with the same weights, to fp32
    rounding: rel < 1e-6 on the weights and their EMA (measured: see the note printed with
    -s), < 1e-4 on stage 2's discriminator (dead channels: see test_accumulation)."""
    import sys

    from dinosae.checkpoint import load_checkpoint

    sys.path.insert(0, str(ROOT / "tests"))
    import torchrun_worker as W
    from test_dit import FakeCache

    from dinosae.train import dit as TD
    from dinosae.train.ae import train_stage

    measured = {}
    _torchrun_two_nodes(tmp_path, "dit", str(tmp_path / "dit2"), "3")
    TD.train_dit(W.dit_config(None), FakeCache(), None, tmp_path / "dit1")
    one = load_checkpoint(tmp_path / "dit1" / "checkpoint.pt")
    two = load_checkpoint(tmp_path / "dit2" / "checkpoint.pt")
    assert two["world_size"] == 2 and one["world_size"] == 1
    for key in ("model", "ema"):
        measured[f"dit {key}"] = _rel(two[key], one[key])

    _torchrun_two_nodes(tmp_path, "ae1", str(tmp_path / "s1n"), "3")
    s1 = tmp_path / "s1"
    train_stage(W.ae_config(None), 1, None, out=str(s1), batches=W.make_batches(W.images(), 8))
    one = load_checkpoint(s1 / "checkpoint.pt")
    two = load_checkpoint(tmp_path / "s1n" / "checkpoint.pt")
    assert two["world_size"] == 2 and one["world_size"] == 1
    for key in ("model", "ema"):
        measured[f"ae1 {key}"] = _rel(two[key], one[key])

    init = str(s1 / "checkpoint.pt")
    _torchrun_two_nodes(tmp_path, "ae2", str(tmp_path / "s2n"), "3", init)
    s2 = tmp_path / "s2"
    train_stage(W.ae_config(None), 2, None, init=init, out=str(s2),
                batches=W.make_batches(W.images(), 8))
    one = load_checkpoint(s2 / "checkpoint.pt")
    two = load_checkpoint(tmp_path / "s2n" / "checkpoint.pt")
    for key in ("model", "ema", "disc"):
        measured[f"ae2 {key}"] = _rel(two[key], one[key])
    moved = _rel(one["model"], load_checkpoint(init)["model"])
    print("two nodes vs one process, ||a - b|| / ||b||:",
          ", ".join(f"{k} {v:.1e}" for k, v in measured.items()), f"(stage 2 moved {moved:.1e})")
    assert moved > 1e-4  # stage 2 changed the weights: a real comparison
    for key, rel in measured.items():
        assert rel < (1e-4 if key == "ae2 disc" else 1e-6), (key, rel)
