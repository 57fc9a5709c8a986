"""The real Snakemake DAG, run for real on a tiny config: every artifact exists and parses, read
back with plain tools (tarfile, torch.load(weights_only=True), zarr, h5py), and rerunning one
stage reruns only that stage."""

import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml
import zarr
from helpers import tiny_config, workflow_copy

pytestmark = pytest.mark.integration
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
# the rules call the `dinosae` console script of this environment
ENV = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


def snakemake(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    r = subprocess.run([SNAKEMAKE, "--cores", "2", *args], cwd=cwd, capture_output=True,
                       text=True, timeout=1500, env=ENV)
    if r.returncode != 0:
        logs = "".join(f"\n--- {p.name}\n{p.read_text()[-3000:]}"
                       for p in sorted((cwd / "results/logs").glob("*.log")))
        raise AssertionError(f"snakemake {args} failed:\n{r.stderr[-5000:]}{logs}")
    return r


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    work = workflow_copy(tmp_path_factory.mktemp("pipeline"), tiny_config())
    snakemake(work)
    return work


def test_every_artifact_exists_and_parses(run_dir: Path):
    cfg = tiny_config()
    # shards: the manifest's counts match what plain tarfile finds
    for split in ("train", "val"):
        folder = run_dir / "data/shards" / split
        manifest = json.loads((folder / "manifest.json").read_text())
        keys = set()
        for shard in manifest["shards"]:
            with tarfile.open(folder / shard["name"]) as tar:
                keys |= {m.name.split(".")[0] for m in tar.getmembers()}
        assert len(keys) == manifest["count"] > 0
    # four AE checkpoints, loadable without unpickling code, one stage each
    for k in (1, 2, 3, 4):
        ck = torch.load(run_dir / f"results/ae/stage{k}/checkpoint.pt", weights_only=True)
        assert ck["kind"] == "dinosae-ae" and ck["stage"] == k
        assert ck["step"] == cfg["ae_train"]["stage_steps"][k - 1]
        assert (run_dir / f"results/ae/stage{k}/metrics.csv").is_file()
    # the latent cache: complete, unit-norm tokens, one row per train image, with plain zarr
    g = zarr.open_group(run_dir / "results/latents/train.zarr", mode="r")
    train = json.loads((run_dir / "data/shards/train/manifest.json").read_text())
    assert g.attrs["complete"] is True
    tokens = g["tokens"][:].astype(np.float32)
    assert tokens.shape[0] == train["count"] and tokens.shape[1] == 4  # 32 px -> 2x2 tokens
    np.testing.assert_allclose(np.linalg.norm(tokens, axis=-1), 1.0, atol=1e-3)
    assert g["labels"][:].max() < len(train["classes"])
    # DiT and samples
    dit = torch.load(run_dir / "results/dit/checkpoint.pt", weights_only=True)
    assert dit["kind"] == "dinosae-dit" and dit["step"] == cfg["dit"]["steps"]
    with h5py.File(run_dir / "results/samples/samples.h5", "r") as f:
        images, labels = f["images"][:], f["labels"][:]
    assert images.shape == (cfg["sample"]["num_samples"], 32, 32, 3)
    assert images.dtype == np.uint8
    counts = np.bincount(labels, minlength=len(train["classes"]))
    assert counts.max() - counts.min() <= 1  # class balanced
    # results files: offline, the metric is never called FID
    gfid = dict(line.split(": ", 1) for line in
                (run_dir / "results/gfid.txt").read_text().splitlines())
    assert "FID" not in gfid and np.isfinite(float(gfid["FD_teacher"]))
    recon = dict(line.split(": ", 1) for line in
                 (run_dir / "results/recon.txt").read_text().splitlines())
    assert 0 < float(recon["PSNR"]) < 100
    assert list(run_dir.glob("results/**/*.png"))


def dry_jobs(run_dir: Path, *args: str) -> set[str]:
    r = subprocess.run([SNAKEMAKE, "-n", "--cores", "2", *args], cwd=run_dir,
                       capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stderr
    if "Job stats:" not in r.stdout:
        return set()
    table = r.stdout.split("Job stats:")[1]
    return {m.group(1) for m in re.finditer(r"^(\w+)\s+\d+$", table, re.M)} - {"total"}


def test_rerun_semantics_and_cache_reuse(run_dir: Path):
    assert dry_jobs(run_dir) == set()  # a finished run is up to date
    # -R reruns a stage and everything downstream of it, nothing upstream
    downstream = dry_jobs(run_dir, "-R", "ae_stage3")
    assert {"ae_stage3", "ae_stage4", "encode_init", "encode_part", "encode", "train_dit",
            "sample", "fid", "eval_recon"} <= downstream
    assert not downstream & {"mini_dataset", "shard", "ae_stage1", "ae_stage2"}
    # a second experiment that changes only the DiT and sampling reuses shards, AE and cache
    cfg = tiny_config()
    cfg["dit"]["lr"] = cfg["dit"]["lr"] / 2
    cfg["sample"]["cfg_scale"] = 2.0
    (run_dir / "exp2.yaml").write_text(yaml.safe_dump({"dit": cfg["dit"],
                                                       "sample": cfg["sample"]}))
    assert dry_jobs(run_dir, "--configfile", "exp2.yaml") == {"train_dit", "sample", "fid",
                                                              "all"}
    # a changed evaluation value reruns only the evaluation rules
    (run_dir / "exp3.yaml").write_text(yaml.safe_dump({"eval": {**cfg["eval"],
                                                                "batch_size": 4}}))
    assert dry_jobs(run_dir, "--configfile", "exp3.yaml") == {"eval_recon", "fid_reference",
                                                              "fid", "all"}


def test_forcerun_one_stage_reruns_only_it(run_dir: Path):
    ck = {k: run_dir / f"results/ae/stage{k}/checkpoint.pt" for k in (1, 2, 3, 4)}
    before = {k: p.stat().st_mtime_ns for k, p in ck.items()}
    r = snakemake(run_dir, str(ck[3].relative_to(run_dir)), "--forcerun", "ae_stage3")
    assert "ae_stage3" in r.stderr + r.stdout
    after = {k: p.stat().st_mtime_ns for k, p in ck.items()}
    assert after[1] == before[1] and after[2] == before[2] and after[4] == before[4]
    assert after[3] > before[3]
    # nothing else is out of date except what depends on stage 3
    r = subprocess.run([SNAKEMAKE, "-n", "--cores", "2"], cwd=run_dir, capture_output=True,
                       text=True, env=ENV)
    assert "ae_stage1" not in r.stdout and "ae_stage2" not in r.stdout
    assert "ae_stage4" in r.stdout
