"""The Snakemake DAG: dry runs on the default config (no job executes)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
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
        # figures and tables for `snakemake --report`
        "report_ae_stage": 4, "report_dit": 1, "report_samples": 1, "report_recon": 1,
        "report_gfid": 1, "report_config": 1,
    }
    # the workflow profile gives GPU rules their resources
    block = r.stdout.split("rule train_dit:")[1].split("\n\n")[0]
    assert "gpu=1" in block and "mem_mb=64000" in block
    (tmp_path / "three.yaml").write_text("latents:\n  parts: 3\n")
    r = dry_run("--configfile", "three.yaml", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert job_counts(r.stdout)["encode_part"] == 3


@pytest.mark.parametrize("text, key", [
    ("dit:\n  lr: -0.001\n", "'dit.lr'"),
    ("data:\n  source: folder\n  root: /nonexistent/imagenet\n", "'data.root': folder"),
])
def test_bad_config_stops_before_any_job(tmp_path, text, key):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    r = dry_run("--configfile", str(bad))
    assert r.returncode != 0
    out = r.stderr + r.stdout
    assert key in out and "Job stats" not in out


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


def test_released_weights_config_skips_autoencoder_training(tmp_path):
    # workflow/configs/imagenet256_released.yaml: import the authors' autoencoder, then encode,
    # train the DiT (or import one), sample and FID; no AE stage, not even stage 1 for FD
    workflow_copy(tmp_path / "wf")
    (tmp_path / "imagenet" / "train").mkdir(parents=True)
    released = ["--configfile", "workflow/configs/imagenet256_released.yaml",
                "--config", f"data={{root: {tmp_path / 'imagenet'}}}"]
    r = dry_run("-p", *released, cwd=tmp_path / "wf")
    assert r.returncode == 0, r.stderr
    counts = job_counts(r.stdout)
    assert not [j for j in counts if j.startswith("ae_stage")], counts
    assert counts.get("report_ae_stage", 0) == 0  # no training curves to draw
    counts = {j: n for j, n in counts.items() if not j.startswith("report_")}
    assert counts == {"shard": 2, "import_autoencoder": 1, "eval_recon": 1, "encode_init": 1,
                      "encode_part": 16, "encode": 1, "train_dit": 1, "sample": 1,
                      "fid_reference": 1, "fid": 1, "all": 1}
    cmd = [ln for ln in r.stdout.splitlines() if "dinosae import-ae" in ln][0]
    assert "--source hf-hub:wkdgnsgo/dino-sae --out results/ae/stage4/checkpoint.pt" in cmd
    # a generator to import instead of training: a local file becomes an input
    dit = tmp_path / "dit_export"
    dit.mkdir()
    r = dry_run(*released[:3], f"data={{root: {tmp_path / 'imagenet'}}}",
                f"dit={{pretrained: {dit}}}", cwd=tmp_path / "wf")
    assert r.returncode == 0, r.stderr
    counts = job_counts(r.stdout)
    assert counts["import_dit"] == 1 and "train_dit" not in counts


def test_rules_are_formatted_and_lint_clean():
    bindir = Path(sys.executable).parent
    r = subprocess.run([str(bindir / "snakefmt"), "--check", "Snakefile", "workflow/rules"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run([SNAKEMAKE, "--lint"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and "Lints for" not in r.stdout + r.stderr, r.stdout + r.stderr


def test_each_result_path_is_spelled_once():
    # later rules take earlier outputs through rules.X.output or a name in common.smk: a path
    # literal under results/ appears once in all the rule files together
    files = [ROOT / "Snakefile", *sorted((ROOT / "workflow/rules").glob("*.smk"))]
    literals = [m.group(1) for f in files
                for m in re.finditer(r"""f?["'](results/[^"']*)["']""", f.read_text())]
    assert "results/ae/stage{stage}/checkpoint.pt" in literals  # the pattern is found at all
    repeated = {p for p in literals if literals.count(p) > 1}
    assert not repeated, repeated
    # checkpoints (two producers each for stage 4 and the DiT, chosen by config) are named in
    # common.smk only
    assert [f.name for f in files if "checkpoint.pt" in f.read_text()] == ["common.smk"]
