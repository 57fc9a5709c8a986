"""Bad input through the `dinosae` command line, as the rules call it: each case ends with one
line naming what is wrong (exit 2, or 1 for a full disk), no traceback, before the expensive
work where that is possible, and without an output that a later rule would take as complete.
Also: checkpoints never unpickle code, and tar members never name paths outside their tar.

The artifacts come from the session's tiny pipeline run (conftest.pipeline_run); commands run
in that folder (the cache records its encoder by a relative path) and write only under tmp."""

import ast
import io
import json
import resource
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from helpers import ROOT, tiny_config

from dinosae.checkpoint import load_checkpoint
from dinosae.data.loader import make_loader
from dinosae.data.shard import iter_shard, read_manifest
from dinosae.errors import CheckpointError, DataError

pytestmark = pytest.mark.integration
DINOSAE = str(Path(sys.executable).with_name("dinosae"))


def dinosae(cwd: Path, *args: str, cfg: dict | None = None, fsize: int | None = None
            ) -> subprocess.CompletedProcess:
    """`dinosae ARGS --cfg JSON` in `cwd`; `fsize` caps the size of any file it writes (as a
    full disk does: writes fail with EFBIG)."""
    limit = None if fsize is None else (
        lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize)))
    return subprocess.run([DINOSAE, *args, "--cfg", json.dumps(cfg or tiny_config())], cwd=cwd,
                          capture_output=True, text=True, timeout=600, preexec_fn=limit)


def one_line_error(r: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    """The run failed with `code` and a single `dinosae ...:` line holding every needle."""
    assert r.returncode == code, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("dinosae ")]
    assert len(lines) == 1, r.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def shards(pipeline_run, tmp_path) -> Path:
    """A private copy of the run's train shards, to damage."""
    return Path(shutil.copytree(pipeline_run / "data/shards/train", tmp_path / "shards"))


# ------------------------------------------------------------------------ shards

@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_damaged_shards_stop_every_reader_before_its_models(pipeline_run, shards, tmp_path,
                                                             damage):
    tar = sorted(shards.glob("*.tar"))[1]
    if damage == "truncate":
        data = tar.read_bytes()
        tar.write_bytes(data[: len(data) // 2])
        needles = (tar.name, "truncated or replaced", "rerun the shard rule")
    else:
        tar.unlink()
        needles = (tar.name, "missing")
    out = tmp_path / "out"
    ck1 = str(pipeline_run / "results/ae/stage1/checkpoint.pt")
    for args in (["ae-train", "--stage", "1", "--shards", str(shards), "--out", str(out)],
                 ["encode-init", "--shards", str(shards), "--checkpoint", ck1,
                  "--out", str(out / "c.zarr")],
                 ["eval-recon", "--checkpoint", ck1, "--shards", str(shards),
                  "--out", str(out / "recon.txt")]):
        r = dinosae(pipeline_run, *args)
        one_line_error(r, 2, *needles)
        assert "trainable parameters" not in r.stderr  # no model was built
        assert not out.exists() or not any(out.rglob("*")), list(out.rglob("*"))


def test_disk_full_while_sharding_leaves_no_tar_or_manifest(pipeline_run, tmp_path):
    cfg = tiny_config()
    cfg["data"]["root"] = str(pipeline_run / "data/mini")
    out = tmp_path / "shards"
    r = dinosae(tmp_path, "shard", "--split", "val", "--out", str(out), cfg=cfg, fsize=6000)
    one_line_error(r, 1, "no space left", "File too large")
    assert sorted(p.name for p in out.iterdir()) == []  # no tar, no temp file, no manifest


def test_disk_full_while_checkpointing_leaves_no_checkpoint(pipeline_run, tmp_path):
    out = tmp_path / "stage1"
    r = dinosae(pipeline_run, "ae-train", "--stage", "1", "--shards",
                str(pipeline_run / "data/shards/train"), "--out", str(out), fsize=200_000)
    one_line_error(r, 1, "no space left")
    assert not list(out.glob("*.pt")) and not list(out.glob(".*"))  # nor a temp name


# ------------------------------------------------------------------------ checkpoints

def test_checkpoint_of_the_wrong_stage_or_shape_is_refused(pipeline_run, tmp_path):
    train, out = str(pipeline_run / "data/shards/train"), str(tmp_path / "x")
    ck = {k: str(pipeline_run / f"results/ae/stage{k}/checkpoint.pt") for k in (1, 2, 3)}
    r = dinosae(pipeline_run, "ae-train", "--stage", "3", "--shards", train, "--init", ck[1],
                "--out", out)
    one_line_error(r, 2, "stage 3 starts from a stage 2 checkpoint", "is from stage 1")
    wide = tiny_config()
    wide["autoencoder"]["decoder"]["widths"] = [8, 16, 16, 32, 48]
    r = dinosae(pipeline_run, "ae-train", "--stage", "2", "--shards", train, "--init", ck[1],
                "--out", out, cfg=wide)
    one_line_error(r, 2, "different autoencoder architecture", "decoder")
    r = dinosae(pipeline_run, "sample", "--dit", "results/dit/checkpoint.pt",
                "--ae", "results/dit/checkpoint.pt", "--cache", "results/latents/train.zarr",
                "--out", str(tmp_path / "s.h5"))
    one_line_error(r, 2, "not an autoencoder checkpoint", "dinosae-dit")
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob("s.h5*"))


def test_cache_from_another_encoder_is_refused(pipeline_run, tmp_path):
    for args in (["train-dit", "--out", str(tmp_path / "dit")],
                 ["sample", "--dit", "results/dit/checkpoint.pt",
                  "--out", str(tmp_path / "s.h5")]):
        r = dinosae(pipeline_run, *args, "--cache", "results/latents/train.zarr",
                    "--ae", "results/ae/stage3/checkpoint.pt")
        one_line_error(r, 2, "encoded with results/ae/stage4/checkpoint.pt",
                       "not the expected encoder", "re-encode")
    assert not list(tmp_path.rglob("*.pt")) and not list(tmp_path.glob("s.h5*"))


def test_diverging_dit_skips_counts_and_stops(pipeline_run, tmp_path):
    cfg = tiny_config()
    cfg["dit"].update(lr=1e30, steps=40, max_bad_steps=3, log_every=1, ckpt_every=1000)
    out = tmp_path / "dit"
    r = dinosae(pipeline_run, "train-dit", "--cache", "results/latents/train.zarr",
                "--ae", "results/ae/stage4/checkpoint.pt", "--out", str(out), cfg=cfg)
    one_line_error(r, 2, "3 non-finite DiT steps in a row", "dit.max_bad_steps")
    rows = (out / "metrics.csv").read_text().splitlines()
    header, last = rows[0].split(","), rows[-1].split(",")
    assert int(last[header.index("bad_steps")]) == 3  # every skip is counted
    assert int(last[header.index("step")]) < 40
    assert not (out / "checkpoint.pt").exists()


class _Evil:
    """Unpickling this runs code: creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_checkpoint_holding_code_is_refused_and_never_runs(pipeline_run, tmp_path):
    marker = tmp_path / "code-ran"
    good = torch.load(pipeline_run / "results/ae/stage1/checkpoint.pt", weights_only=True)
    evil = tmp_path / "evil.pt"
    torch.save({**good, "step": _Evil(marker)}, evil)
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_checkpoint(evil)
    r = dinosae(pipeline_run, "ae-train", "--stage", "2", "--shards", "data/shards/train",
                "--init", str(evil), "--out", str(tmp_path / "stage2"))
    one_line_error(r, 2, "refusing to load", "evil.pt")
    r = dinosae(pipeline_run, "sample", "--dit", str(evil), "--ae", "results/ae/stage4/"
                "checkpoint.pt", "--cache", "results/latents/train.zarr",
                "--out", str(tmp_path / "s.h5"))
    one_line_error(r, 2, "refusing to load")
    assert not marker.exists()
    # a truncated checkpoint is named as such
    (tmp_path / "cut.pt").write_bytes(evil.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "cut.pt")


def test_every_torch_load_in_the_package_is_weights_only():
    """Static guard: each torch.load call in dinosae/ passes weights_only=True."""
    calls = []
    for path in (ROOT / "dinosae").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "load" and getattr(node.func.value, "id", "") == "torch"):
                kw = {k.arg: k.value for k in node.keywords}
                ok = isinstance(kw.get("weights_only"), ast.Constant) and kw[
                    "weights_only"].value is True
                calls.append((f"{path.name}:{node.lineno}", ok))
    assert calls and all(ok for _, ok in calls), calls


# ------------------------------------------------------------------------ tar members

def _tar_with(path: Path, names: list[str]) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name in names:
            info = tarfile.TarInfo(name)
            info.size = 1
            tar.addfile(info, io.BytesIO(b"0"))


@pytest.mark.parametrize("name", ["../escaped.cls", "/tmp/dinosae-absolute.cls",
                                  "sub/../../escaped.cls", "a" * 90 + "/00000000.cls"])
def test_tar_members_naming_other_paths_are_refused_and_never_written(shards, tmp_path, name):
    tar = sorted(shards.glob("*.tar"))[0]
    _tar_with(tar, [name])
    m = json.loads((shards / "manifest.json").read_text())  # the manifest agrees with the tar
    m["shards"][0]["bytes"] = tar.stat().st_size
    (shards / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match="unexpected member|not written by dinosae"):
        list(iter_shard(tar))
    with pytest.raises(DataError, match="unexpected|not written by dinosae"):
        for _ in make_loader(shards, 2, workers=0, train=False, drop_last=False):
            pass
    assert not (tmp_path / "escaped.cls").exists() and not (shards.parent / "escaped.cls").exists()
    assert not Path("/tmp/dinosae-absolute.cls").exists()


def test_manifest_naming_a_file_outside_its_folder_is_refused(shards):
    m = json.loads((shards / "manifest.json").read_text())
    m["shards"][0]["name"] = "../elsewhere.tar"
    (shards / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match="'../elsewhere.tar' is not shard-NNNNNN.tar"):
        read_manifest(shards)
