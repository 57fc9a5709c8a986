"""The real Snakemake DAG, run for real on a tiny config: every artifact exists and parses, read
back with plain tools (tarfile, torch.load(weights_only=True), zarr, h5py), and rerunning one
stage reruns only that stage."""

import base64
import csv
import html
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml
import zarr
from helpers import html_table, run_snakemake, tiny_config
from PIL import Image

pytestmark = pytest.mark.integration
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
# the rules call the `dinosae` console script of this environment
ENV = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


def snakemake(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return run_snakemake(cwd, *args)


@pytest.fixture(scope="module")
def run_dir(pipeline_run: Path) -> Path:
    """The session's tiny pipeline run (conftest.pipeline_run)."""
    return pipeline_run


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
        assert ck["step"] == cfg["ae_train"]["stages"][k - 1]["steps"]
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


def test_cache_store_holds_only_zarr_files(run_dir: Path):
    # Snakemake's bookkeeping sits beside the store (the encode rules output flag files), so
    # plain zarr reads the whole hierarchy without a single warning
    store = run_dir / "results/latents/train.zarr"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g = zarr.open_group(store, mode="r")
        arrays = {name: a[:] for name, a in g.members(max_depth=None)}
        attrs = g.attrs.asdict()
    assert attrs["complete"] is True
    assert set(arrays) == {"tokens", "norms", "labels", "written"}
    files = sorted(p.relative_to(store).as_posix() for p in store.rglob("*") if p.is_file())
    zarr_own = re.compile(r"(zarr\.json|(tokens|norms|labels|written)/(zarr\.json|c(/\d+)+))")
    assert files and [f for f in files if not zarr_own.fullmatch(f)] == []
    assert "tokens/c/0/0/0" in files  # chunk files are there (v3 default chunk key encoding)
    assert {p.name for p in (run_dir / "results/latents").iterdir()} == {
        "train.zarr", "train.zarr.init", "train.parts", "train.report.json"}


def kv_file(path: Path) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in path.read_text().splitlines())


def report_data(page: str, script_id: str):
    """One of the JSON values a Snakemake report page holds: <script id=..>var x = JSON;"""
    m = re.search(rf'<script id="{script_id}">\s*var \w+ = (.*?);\s*</script>', page, re.S)
    assert m, f"no {script_id} data in the report"
    return json.loads(m.group(1))


def embedded(result: dict) -> bytes:
    return base64.b64decode(result["data_uri"].split("base64,", 1)[1])


def test_report_page_holds_every_plot_and_table(run_dir: Path):
    snakemake(run_dir, "--report", "results/report.html")
    page = (run_dir / "results/report.html").read_text()
    results, categories = report_data(page, "results"), report_data(page, "categories")
    # loss curves and the last reconstruction grid of each AE stage, the DiT's loss curves and
    # one sample grid per class: PNGs embedded byte for byte (the page is self-contained)
    stages = {k: {f"results/report/ae_stage{k}_{fig}.png" for fig in ("loss", "recon")}
              for k in (1, 2, 3, 4)}
    classes = {f"results/report/samples/class_{j}.png" for j in range(8)}
    for path in set().union(*stages.values(), classes, {"results/report/dit_loss.png"}):
        data = embedded(results[path])
        assert data == (run_dir / path).read_bytes(), path
        assert Image.open(io.BytesIO(data)).format == "PNG"
    assert {sub: set(paths) for sub, paths in categories["1. Autoencoder"].items()} == {
        f"Stage {k}": paths for k, paths in stages.items()}
    assert set().union(*map(set, categories["3. Samples"].values())) == classes
    # the results files as tables, every key and value
    for name in ("recon", "gfid"):
        table = html_table(embedded(results[f"results/report/{name}.html"]).decode())
        assert table == kv_file(run_dir / f"results/{name}.txt")
    # the config used, and runtimes per rule (Snakemake's statistics)
    config_page = embedded(results["results/report/config.html"]).decode()
    pre = re.search(r"<pre>(.*)</pre>", config_page, re.S).group(1)
    assert yaml.safe_load(html.unescape(pre)) == yaml.safe_load((run_dir / "config.yaml")
                                                                .read_text())
    runtimes = report_data(page, "runtimes")["data"]["values"]
    assert {r["rule"] for r in runtimes} >= {
        "shard", "ae_stage1", "ae_stage2", "ae_stage3", "ae_stage4", "eval_recon", "encode_part",
        "train_dit", "sample", "fid_reference", "fid", "report_ae_stage", "report_samples"}
    assert all(r["runtime"] > 0 for r in runtimes)
    assert "DINO-SAE" in report_data(page, "workflow-desc")


def last_row(metrics: Path) -> dict[str, str]:
    with open(metrics, newline="") as f:
        return list(csv.DictReader(f))[-1]


def test_status_matches_the_results_files(run_dir: Path):
    r = subprocess.run([str(Path(sys.executable).with_name("dinosae")), "status"], cwd=run_dir,
                       capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stderr
    rows = {line.split("  ")[0]: line for line in r.stdout.splitlines()[2:]}
    cfg = tiny_config()
    for k, steps in enumerate((s["steps"] for s in cfg["ae_train"]["stages"]), start=1):
        row, loss = rows[f"ae stage{k}"], float(last_row(run_dir / f"results/ae/stage{k}/"
                                                          "metrics.csv")["loss"])
        assert " done " in row and f"step {steps}/{steps}, loss {loss:.4g}" in row
        assert row.endswith(f"results/ae/stage{k - 1}/checkpoint.pt" if k > 1
                            else "teacher weights: random")
    recon, gfid = kv_file(run_dir / "results/recon.txt"), kv_file(run_dir / "results/gfid.txt")
    assert f"PSNR {recon['PSNR']}, SSIM {recon['SSIM']}" in rows["recon"]
    assert rows["recon"].endswith(recon["checkpoint"])
    assert f"FD_teacher {gfid['FD_teacher']}" in rows["gfid"]
    assert rows["gfid"].endswith(gfid["dit_checkpoint"])
    cache = json.loads((run_dir / "results/latents/train.report.json").read_text())
    assert f"{cache['count']} images" in rows["latents"]
    assert rows["latents"].endswith(cache["encoder"]["path"])
    steps, loss = cfg["dit"]["steps"], float(last_row(run_dir / "results/dit/metrics.csv")["loss"])
    assert f"step {steps}/{steps}, loss {loss:.4g}" in rows["dit"]
    assert "results/ae/stage4/checkpoint.pt (cache results/latents/train.zarr)" in rows["dit"]
    with h5py.File(run_dir / "results/samples/samples.h5", "r") as f:
        assert f"{len(f['images'])} images" in rows["samples"]
    assert all(" done " in row for row in rows.values())


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
    assert dry_jobs(run_dir, "--configfile", "exp2.yaml") == {
        "train_dit", "sample", "fid", "all",
        "report_dit", "report_samples", "report_gfid", "report_config"}  # and their figures
    # a changed evaluation value reruns only the evaluation rules
    (run_dir / "exp3.yaml").write_text(yaml.safe_dump({"eval": {**cfg["eval"],
                                                                "batch_size": 4}}))
    assert dry_jobs(run_dir, "--configfile", "exp3.yaml") == {
        "eval_recon", "fid_reference", "fid", "all", "report_recon", "report_gfid",
        "report_config"}


def test_forcerun_one_stage_reruns_only_it(run_dir: Path):
    ck = {k: run_dir / f"results/ae/stage{k}/checkpoint.pt" for k in (1, 2, 3, 4)}
    before = {k: p.stat().st_mtime_ns for k, p in ck.items()}
    r = snakemake(run_dir, str(ck[3].relative_to(run_dir)), "--forcerun", "ae_stage3")
    assert "ae_stage3" in r.stderr + r.stdout
    after = {k: p.stat().st_mtime_ns for k, p in ck.items()}
    assert after[1] == before[1] and after[2] == before[2] and after[4] == before[4]
    assert after[3] > before[3]
    # nothing else is out of date except what depends on stage 3
    jobs = dry_jobs(run_dir)
    assert "ae_stage4" in jobs and not jobs & {"ae_stage1", "ae_stage2"}
