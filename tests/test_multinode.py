"""Several nodes per job: the exact srun + torchrun line of a multi-node rule, and what the
Snakefile's `launch` makes of a rule's resources."""

from __future__ import annotations

import re

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
