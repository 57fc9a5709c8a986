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


def test_released_config_imports_both_models_and_trains_nothing(tmp_path):
    # workflow/configs/imagenet256_released.yaml: the authors' autoencoder and DDT-XL, imported;
    # val shards -> import_autoencoder, import_dit -> sample -> fid (+ eval_recon on val)
    workflow_copy(tmp_path / "wf")
    (tmp_path / "imagenet" / "val").mkdir(parents=True)
    ae, dit = tmp_path / "dino_sae_ae.pth", tmp_path / "ddt_xl.pt"  # stand-in local files
    ae.write_bytes(b"")
    dit.write_bytes(b"")
    released = ["--configfile", "workflow/configs/imagenet256_released.yaml", "--config",
                f"data={{root: {tmp_path / 'imagenet'}}}"]
    for pretrained in ([f"autoencoder={{pretrained: {ae}}}", f"dit={{pretrained: {dit}}}"], []):
        r = dry_run("-p", *released, *pretrained, cwd=tmp_path / "wf")
        assert r.returncode == 0, r.stderr
        counts = job_counts(r.stdout)
        assert not [j for j in counts if j.startswith(("ae_stage", "encode", "train_dit"))]
        assert counts.get("report_ae_stage", 0) == 0 and "report_dit" not in counts
        counts = {j: n for j, n in counts.items() if not j.startswith("report_")}
        assert counts == {"shard": 1, "import_autoencoder": 1, "import_dit": 1,
                          "eval_recon": 1, "sample": 1, "fid_reference": 1, "fid": 1, "all": 1}
        assert "shards/train" not in r.stdout and "shards/val/manifest.json" in r.stdout
        cmd = [ln for ln in r.stdout.splitlines() if "dinosae sample " in ln][0]
        assert "--cache" not in cmd
    # the hub defaults (no stand-in files): the specs go to the import commands as given
    for name in ("import-ae", "import-dit"):
        cmd = [ln for ln in r.stdout.splitlines() if f"dinosae {name}" in ln][0]
        assert "--source hf-hub:wkdgnsgo/dino-sae --out" in cmd


def test_released_autoencoder_with_a_trained_generator(tmp_path):
    # dit.pretrained: null: the DiT is trained on the encoded train split (no AE stage)
    workflow_copy(tmp_path / "wf")
    for split in ("train", "val"):  # both are sharded: the config check wants both folders
        (tmp_path / "imagenet" / split).mkdir(parents=True)
    (tmp_path / "train_dit.yaml").write_text("dit:\n  pretrained: null\n")
    r = dry_run("-p", "--configfile", "workflow/configs/imagenet256_released.yaml",
                str(tmp_path / "train_dit.yaml"), "--config",
                f"data={{root: {tmp_path / 'imagenet'}}}", cwd=tmp_path / "wf")
    assert r.returncode == 0, r.stderr
    counts = {j: n for j, n in job_counts(r.stdout).items() if not j.startswith("report_")}
    assert counts == {"shard": 2, "import_autoencoder": 1, "eval_recon": 1, "encode_init": 1,
                      "encode_part": 16, "encode": 1, "train_dit": 1, "sample": 1,
                      "fid_reference": 1, "fid": 1, "all": 1}
    cmd = [ln for ln in r.stdout.splitlines() if "dinosae sample " in ln][0]
    assert "--cache results/latents/train.zarr" in cmd


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


def test_paper_reference_is_train_statistics_or_adm_batch(tmp_path):
    # workflow/configs/imagenet256.yaml: gFID against ImageNet-train statistics made by rule
    # fid_reference from the train shards, or ADM's reference batch when eval.adm_reference
    # names it (then no shards are read for the reference)
    workflow_copy(tmp_path / "wf")
    for split in ("train", "val"):
        (tmp_path / "imagenet" / split).mkdir(parents=True)
    adm = tmp_path / "VIRTUAL_imagenet256_labeled.npz"
    adm.write_bytes(b"")  # a stand-in: the dry run reads nothing
    paper = ["-p", "--configfile", "workflow/configs/imagenet256.yaml", "--config",
             f"data={{root: {tmp_path / 'imagenet'}}}"]  # one --config: a second replaces it

    def reference_job(stdout: str) -> str:
        return stdout.split("rule fid_reference:")[1].split("\n\n")[0]

    r = dry_run(*paper, cwd=tmp_path / "wf")
    assert r.returncode == 0, r.stderr
    job = reference_job(r.stdout)
    assert "input: data/shards/train/manifest.json" in job
    assert "output: results/fid/reference_train.npz" in job
    cmd = [ln for ln in r.stdout.splitlines() if "dinosae fid-reference" in ln][0]
    assert "--shards data/shards/train " in cmd

    r = dry_run(*paper, f"eval={{adm_reference: {adm}}}", cwd=tmp_path / "wf")
    assert r.returncode == 0, r.stderr
    job = reference_job(r.stdout)
    assert str(adm) in job and "shards/" not in job.split("output:")[0]
    assert "output: results/fid/reference_adm.npz" in job
    cmd = [ln for ln in r.stdout.splitlines() if "dinosae fid-reference" in ln][0]
    assert "--shards" not in cmd
    fid = r.stdout.split("rule fid:")[1].split("\n\n")[0]
    assert "results/fid/reference_adm.npz" in fid
def test_gfid_proxy_reaches_train_dit_and_logging_stays_out_of_the_params(tmp_path):
    # dit.eval_every: train_dit waits for the reference statistics and gets them and the eval
    # section; logging.backends reach the jobs in their environment (common.smk sets
    # DINOSAE_LOGGING), not as a param: another backend does not rerun a finished training
    (tmp_path / "proxy.yaml").write_text(
        "dit:\n  eval_every: 50\nlogging:\n  backends: [csv, tensorboard]\n")
    r = dry_run("-p", "--configfile", str(tmp_path / "proxy.yaml"))
    assert r.returncode == 0, r.stderr
    cmds = [line for line in r.stdout.splitlines() if "dinosae" in line and "--cfg" in line]
    (dit,) = [c for c in cmds if "train-dit" in c]
    assert "--reference results/fid/reference_val.npz" in dit and '"eval": {' in dit
    training = [c for c in cmds if "train-dit" in c or "ae-train" in c]
    assert len(training) == 5 and not [c for c in training if "logging" in c or "tensorb" in c]
    block = r.stdout.split("rule train_dit:")[1].split("\n\n")[0]
    assert "results/fid/reference_val.npz" in block.split("output:")[0]  # an input
    # off (the default): no reference input, no eval section
    r = dry_run("-p")
    (dit,) = [line for line in r.stdout.splitlines() if "train-dit" in line and "--cfg" in line]
    assert "--reference" not in dit and '"eval"' not in dit
