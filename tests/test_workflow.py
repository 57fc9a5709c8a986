"""The Snakemake DAG: dry runs on the default config (no job executes)."""

import re
import subprocess
import sys
from pathlib import Path

from helpers import ROOT, workflow_copy

SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))


def dry_run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([SNAKEMAKE, "-n", "--cores", "2", *args], cwd=cwd,
                          capture_output=True, text=True)


def job_counts(stdout: str) -> dict[str, int]:
    table = stdout.split("Job stats:")[1]
    return {m.group(1): int(m.group(2))
            for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M) if m.group(1) != "total"}


def test_default_dag_from_nothing_to_gfid(tmp_path):
    # a copy of the workflow in an empty folder: nothing is built yet
    workflow_copy(tmp_path)
    r = dry_run(cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    counts = job_counts(r.stdout)
    parts = 2  # config.yaml latents.parts
    assert counts == {
        "mini_dataset": 1, "shard": 2, "ae_stage1": 1, "ae_stage2": 1, "ae_stage3": 1,
        "ae_stage4": 1, "eval_recon": 1, "encode_init": 1, "encode_part": parts, "encode": 1,
        "train_dit": 1, "sample": 1, "fid_reference": 1, "fid": 1, "all": 1,
    }
    # the workflow profile gives GPU rules their resources
    block = r.stdout.split("rule train_dit:")[1].split("\n\n")[0]
    assert "gpu=1" in block and "mem_mb=64000" in block
    (tmp_path / "three.yaml").write_text("latents:\n  parts: 3\n")
    r = dry_run("--configfile", "three.yaml", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert job_counts(r.stdout)["encode_part"] == 3


def test_bad_config_stops_before_any_job(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("dit:\n  lr: -0.001\n")
    r = dry_run("--configfile", str(bad))
    assert r.returncode != 0
    out = r.stderr + r.stdout
    assert "'dit.lr'" in out and "Job stats" not in out


def test_multi_gpu_training_rules_launch_torchrun():
    r = dry_run("-p", "--set-resources", "train_dit:gpu=4", "ae_stage2:gpu=2")
    assert r.returncode == 0, r.stderr
    cmds = [line for line in r.stdout.splitlines() if "dinosae" in line and "--cfg" in line]
    dit = [c for c in cmds if "train-dit" in c]
    stage2 = [c for c in cmds if "--stage 2" in c]
    stage1 = [c for c in cmds if "--stage 1" in c]
    assert dit and "torchrun --standalone --nproc_per_node=4 -m dinosae train-dit" in dit[0]
    assert stage2 and "torchrun --standalone --nproc_per_node=2 -m dinosae ae-train" in stage2[0]
    assert stage1 and "torchrun" not in stage1[0]  # one GPU: a plain process
