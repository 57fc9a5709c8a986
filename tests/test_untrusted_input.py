"""Every input is untrusted (issue 16): one test per failure found by trying the CLI as a hostile
or careless user. Each builds the bad input, runs the command (in-process through
dinosae.cli.main, or as a subprocess where it could hang or eat memory: under a memory limit and
a timeout), and checks the exit status, that stderr is one line naming the problem with no
traceback, that no file outside the output changed (a hash of the whole tree before and after),
and that nothing half-written looks complete.

    1 existing outputs           4 export metadata     7 one line, not a traceback
    2 YAML alias bomb            5 image size cap      8 every skipped file listed
    3 cache metadata             6 two writers         9 leftovers and file modes
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import resource
import shutil
import signal
import stat
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ROOT, ae_stages, save_dit_checkpoint, tiny_config, write_shards
from PIL import Image

import dinosae
from dinosae import export, latents
from dinosae.checkpoint import save_checkpoint
from dinosae.cli import main
from dinosae.config import validate
from dinosae.errors import ConfigError
from dinosae.models.autoencoder import ae_config, build_autoencoder
from dinosae.models.dit import build_dit

pytestmark = pytest.mark.usefixtures("one_thread")

NUM_CLASSES, SIZE = 3, 32


# ---------------------------------------------------------------- helpers

def tree(root: Path, skip: Path | None = None) -> dict[str, str]:
    """relative path -> sha256 (files), link target, 'dir' or the file type: the whole tree."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            if skip is not None and (p == skip or skip in p.parents):
                continue
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            elif p.is_file():
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                out[rel] = f"special {stat.S_IFMT(p.lstat().st_mode)}"
    return out


def cli(capsys, *args: str, cfg: dict | None = None) -> tuple[int, str]:
    """dinosae.cli.main(args [--cfg JSON]) in this process: (exit status, stderr)."""
    capsys.readouterr()
    argv = [*args, *(["--cfg", json.dumps(cfg)] if cfg is not None else [])]
    rc = main(argv)  # a traceback would propagate here and fail the test
    return rc, capsys.readouterr().err


def one_line(rc: int, err: str, *needles: str, code: int = 2) -> str:
    """Exit `code` and exactly one `dinosae ...:` line on stderr holding every needle."""
    assert rc == code, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("dinosae")]
    assert len(lines) == 1, err[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def limited(data_bytes: int):
    """preexec_fn: cap the child's heap and anonymous memory (RLIMIT_DATA), so a regression
    fails with MemoryError instead of eating the machine."""
    return lambda: resource.setrlimit(resource.RLIMIT_DATA, (data_bytes, data_bytes))


def run(*args: str, cwd: Path, memory: int = 3 << 30, timeout: int = 180
        ) -> subprocess.CompletedProcess:
    """`python -m dinosae ARGS` as a subprocess under a memory limit and a timeout."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "dinosae", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout,
                          preexec_fn=limited(memory))


def image_folder(root: Path, per_class: int = 3) -> Path:
    """train/ and val/ in the ImageNet layout, two classes of small flat-colour JPEGs."""
    for split in ("train", "val"):
        for c, wnid in enumerate(("n01", "n02")):
            d = root / split / wnid
            d.mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (40 + i, 36), (40 * c + 20, 10 * i, 90)).save(d / f"{i}.JPEG")
    return root


def folder_config(root: Path, **data) -> dict:
    cfg = tiny_config()
    cfg["data"].update({"source": "folder", "root": str(root), "workers": 1} | data)
    return {"data": cfg["data"]}


def edit_json(path: Path, **changes) -> None:
    doc = json.loads(path.read_text())
    doc.update(changes)
    path.write_text(json.dumps(doc))


def edit_attrs(store: Path, **changes) -> None:
    doc = json.loads((store / "zarr.json").read_text())
    doc["attributes"].update(changes)
    (store / "zarr.json").write_text(json.dumps(doc))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Shards of 12 random 32 px images, a tiny AE checkpoint, a complete latent cache made from
    them, a DiT checkpoint, and the exports of both (the DiT's bundles the AE)."""
    tmp = tmp_path_factory.mktemp("untrusted")
    cfg = tiny_config(tmp)
    cfg["device"] = "cpu"
    cfg["latents"].update(parts=1, flip=False)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (12, SIZE, SIZE, 3), dtype=np.uint8)
    labels = np.arange(12) % NUM_CLASSES
    write_shards(tmp / "shards", images, labels, (6, 6))
    torch.manual_seed(0)
    ae = build_autoencoder(cfg)
    sd = ae.state_dict()
    save_checkpoint(tmp / "ae.pt", {"kind": "dinosae-ae", "stage": 4, "step": 1,
                                    "config": ae_config(cfg), "model": sd, "ema": sd})
    cache = tmp / "cache.zarr"
    latents.encode_init(cfg, tmp / "shards", tmp / "ae.pt", cache)
    latents.encode_part(cfg, cache, tmp / "shards", tmp / "ae.pt", 0, 1, tmp / "0.done")
    report = latents.encode_gather({}, cache, tmp / "cache.report.json")
    grid, C = list(ae.grid), ae.channels
    dit = build_dit(cfg["dit"]["model"], grid[0] * grid[1], C, NUM_CLASSES, grid,
                    cfg["dit"]["head"])
    save_dit_checkpoint(tmp / "dit.pt", cfg, dit, grid, NUM_CLASSES, report["mean_norm"],
                        tmp / "ae.pt", step=3)
    export.export_model({}, tmp / "ae.pt", tmp / "exports" / "ae")
    export.export_model({}, tmp / "dit.pt", tmp / "exports" / "dit")
    return {"tmp": tmp, "cfg": cfg, "shards": tmp / "shards", "ae": tmp / "ae.pt",
            "dit": tmp / "dit.pt", "cache": cache, "exports": tmp / "exports"}


@pytest.fixture
def work(tmp_path, world) -> Path:
    """A workspace holding private copies of the world's inputs."""
    for name in ("shards", "cache.zarr", "exports"):
        shutil.copytree(world["tmp"] / name, tmp_path / name)
    for name in ("ae.pt", "dit.pt"):
        shutil.copy(world["tmp"] / name, tmp_path / name)
    return tmp_path


def sections(world, *names: str) -> dict:
    return {n: world["cfg"][n] for n in names}


# ---------------------------------------------------------------- 1. existing outputs

def _writers(world, work: Path) -> dict[str, tuple[list[str], dict | None]]:
    """command -> (arguments without --out, --cfg sections) for every command writing a folder."""
    image_folder(work / "images")
    return {
        "export-model": (["export-model", "--checkpoint", str(work / "ae.pt")], None),
        "encode-init": (["encode-init", "--shards", str(work / "shards"), "--checkpoint",
                         str(work / "ae.pt")], sections(world, "latents")),
        "mini-dataset": (["mini-dataset"], sections(world, "seed", "data")),
        "shard": (["shard", "--split", "train"], folder_config(work / "images")),
        "ae-train": (["ae-train", "--stage", "1", "--shards", str(work / "shards")],
                     sections(world, "seed", "device", "data", "autoencoder", "ae_train")),
        "train-dit": (["train-dit", "--cache", str(work / "cache.zarr"), "--ae",
                       str(work / "ae.pt")], sections(world, "seed", "device", "dit", "sample")),
    }


@pytest.mark.parametrize("command", ["export-model", "encode-init", "mini-dataset", "shard",
                                     "ae-train", "train-dit"])
def test_1_a_foreign_existing_out_is_refused_not_replaced(world, work, capsys, command):
    args, cfg = _writers(world, work)[command]
    out = work / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    before = tree(work)
    rc, err = cli(capsys, *args, "--out", str(out), cfg=cfg)
    one_line(rc, err, str(out), "'thesis.tex'", "--force")
    assert tree(work) == before  # the folder and everything else untouched, no lock file left


def test_1_outputs_inside_outputs_or_holding_inputs_are_refused_even_with_force(
        world, work, capsys, monkeypatch):
    results = work / "results"
    (results / "ae" / "stage4").mkdir(parents=True)
    shutil.copy(work / "ae.pt", results / "ae" / "stage4" / "checkpoint.pt")
    (results / "latents").mkdir()
    before = tree(work)
    for force in ([], ["--force"]):
        rc, err = cli(capsys, "export-model", "--checkpoint",
                      str(results / "ae" / "stage4" / "checkpoint.pt"), "--out", str(results),
                      *force)
        one_line(rc, err, "holds this command's input", "checkpoint.pt")
        rc, err = cli(capsys, "export-model", "--checkpoint", str(work / "ae.pt"), "--out",
                      str(results), *force)  # not its input, but another output's checkpoint
        one_line(rc, err, str(results), "--force" if not force else "another dinosae output")
        monkeypatch.chdir(work)
        rc, err = cli(capsys, "export-model", "--checkpoint", "ae.pt", "--out", ".", *force)
        one_line(rc, err, "current folder")
        rc, err = cli(capsys, "export-model", "--checkpoint", "ae.pt", "--out",
                      "shards/export", *force)
        one_line(rc, err, "inside", "another dinosae output")
        rc, err = cli(capsys, "encode-init", "--shards", "shards", "--checkpoint", "ae.pt",
                      "--out", "shards", *force, cfg=sections(world, "latents"))
        one_line(rc, err, "holds this command's input shards")
    assert tree(work) == before


def test_1_own_outputs_are_replaced_and_force_replaces_a_foreign_one(world, work, capsys):
    out = work / "exp"
    for _ in range(2):  # a rerun over its own export
        assert cli(capsys, "export-model", "--checkpoint", str(work / "ae.pt"), "--out",
                   str(out))[0] == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    (out / "notes.txt").write_text("mine")
    rc, err = cli(capsys, "export-model", "--checkpoint", str(work / "ae.pt"), "--out", str(out))
    one_line(rc, err, "'notes.txt'", "--force")
    assert (out / "notes.txt").exists()
    assert cli(capsys, "export-model", "--checkpoint", str(work / "ae.pt"), "--out", str(out),
               "--force")[0] == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    # a rerun of encode-init over its own store (what Snakemake does) is allowed, also in a
    # results folder that holds the results of a finished run
    cfg = sections(world, "latents")
    (work / "results" / "latents").mkdir(parents=True)
    (work / "results" / "gfid.txt").write_text("FD_teacher: 1.0\n")
    for store in (work / "cache.zarr", work / "results" / "latents" / "train.zarr"):
        for _ in range(2):
            assert cli(capsys, "encode-init", "--shards", str(work / "shards"), "--checkpoint",
                       str(work / "ae.pt"), "--out", str(store), cfg=cfg)[0] == 0


# ---------------------------------------------------------------- 2. YAML alias bomb

def _alias_bomb(levels: int = 9, width: int = 9) -> str:
    lines = ["a0: &a0 [" + ", ".join(["lol"] * width) + "]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]"
              for i in range(1, levels)]
    return "\n".join(lines + [f"seed: *a{levels - 1}"]) + "\n"


def test_2_alias_bomb_is_refused_quickly_within_a_memory_limit(tmp_path):
    bomb, small = tmp_path / "bomb.yaml", tmp_path / "small.yaml"
    bomb.write_text(_alias_bomb())
    small.write_text(_alias_bomb(levels=6, width=10))
    before = tree(tmp_path)
    r = run("validate-config", "--config", str(bomb), cwd=tmp_path, memory=1 << 30, timeout=60)
    one_line(r.returncode, r.stderr, "bomb.yaml", "YAML aliases")
    # under the alias budget but expanding to 10^6 values: refused by size
    r = run("validate-config", "--config", str(small), cwd=tmp_path, memory=1 << 30, timeout=60)
    one_line(r.returncode, r.stderr, "expands to more than")
    # Snakemake parses the file itself and hands the Snakefile the aliased structure
    code = ("import sys, yaml; from dinosae.config import ConfigError, validate\n"
            "try:\n    validate(yaml.safe_load(open(sys.argv[1])))\n"
            "except ConfigError as e:\n    print(e)\n")
    r = subprocess.run([sys.executable, "-c", code, str(bomb)], capture_output=True, text=True,
                       timeout=60, preexec_fn=limited(1 << 30),
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0 and "expands to more than" in r.stdout, r.stderr[-2000:]
    assert tree(tmp_path) == before


def test_2_messages_quote_only_the_start_of_a_value():
    for value in ("x" * 5000, list(range(2000)), {"k" * 300: 1}):
        with pytest.raises(ConfigError) as e:
            validate({"seed": value})
        assert len(str(e.value)) < 300 and "'seed'" in str(e.value), str(e.value)[:500]
    with pytest.raises(ConfigError, match="a string of 20000 characters"):
        validate({"data": {"root": "r" * 20000}})


# ---------------------------------------------------------------- 3. cache metadata

@pytest.mark.parametrize("changes, attribute", [
    ({"grid": [1, 2]}, "grid"),  # fewer tokens than the arrays hold
    ({"grid": [4, 1]}, "grid"),  # the same count of tokens, the wrong layout
    ({"tokens": 5, "grid": [5, 1]}, "grid"),
    ({"count": 11, "rows": 11}, "count"),
    ({"mean_norm": -3.0}, "mean_norm"),
    ({"mean_norm": 1e9}, "mean_norm"),
    ({"num_classes": 2, "classes": ["n0", "n1"]}, "num_classes"),
    ({"channels": 32}, "channels"),
    ({"flip": True, "rows": 24}, "flip"),
    ({"radius": -1.0}, "radius"),
    ({"unit_rows": "8"}, "unit_rows"),
])
def test_3_cache_attributes_are_checked_against_the_arrays(world, work, capsys, changes,
                                                           attribute):
    edit_attrs(work / "cache.zarr", **changes)
    before = tree(work)
    out = work / "dit_run"
    rc, err = cli(capsys, "train-dit", "--cache", str(work / "cache.zarr"), "--ae",
                  str(work / "ae.pt"), "--out", str(out),
                  cfg=sections(world, "seed", "device", "dit", "sample"))
    one_line(rc, err, f"attribute '{attribute}'", "cache.zarr")
    assert tree(work) == before and not out.exists()
    with pytest.raises(latents.CacheError, match=f"attribute '{attribute}'"):
        latents.open_cache(work / "cache.zarr")


def test_3_the_untouched_cache_opens(world):
    lc = latents.open_cache(world["cache"])
    assert len(lc) == 12 and lc.attrs["grid"] == [2, 2]


# ---------------------------------------------------------------- 4. export metadata

@pytest.mark.parametrize("which, changes, needle", [
    ("dit", {"config": {"grid": [1, 4]}}, "config.grid"),  # the bundled AE's is [2, 2]
    ("dit", {"config": {"grid": [2, 3]}}, "config.grid"),
    ("dit", {"config": {"radius": -8.0}}, "config.radius"),
    ("dit", {"decode_radius": -1.0}, "decode_radius"),
    ("dit", {"autoencoder": "ABSOLUTE"}, "'autoencoder'"),
    ("dit", {"autoencoder": "../ae"}, "'autoencoder'"),
    ("ae", {"grid": [3, 3]}, "'grid'"),
    ("ae", {"tensors": 3}, "'tensors'"),
])
def test_4_export_config_is_checked_against_its_tensors(world, work, capsys, which, changes,
                                                        needle):
    folder = work / "exports" / which
    doc = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value == "ABSOLUTE":
            value = str(work / "exports" / "ae")
        if isinstance(value, dict):
            doc[key].update(value)
        else:
            doc[key] = value
    (folder / "config.json").write_text(json.dumps(doc))
    before = tree(work)
    out = work / "imported.pt"
    if which == "dit":
        rc, err = cli(capsys, "import-dit", "--source", str(folder), "--out", str(out),
                      cfg=sections(world, "dit"))
        loader = dinosae.load_generator
    else:
        rc, err = cli(capsys, "import-ae", "--source", str(folder), "--out", str(out),
                      cfg=sections(world, "data", "autoencoder"))
        loader = dinosae.load_autoencoder
    one_line(rc, err, needle, "config.json")
    assert tree(work) == before and not out.exists()
    with pytest.raises(ConfigError, match=needle.strip("'").replace(".", r"\.")):
        loader(folder, device="cpu")


def test_4_the_untouched_exports_load(world):
    gen = dinosae.load_generator(world["exports"] / "dit", device="cpu")
    assert gen.autoencoder is not None and gen.grid == (2, 2)


# ---------------------------------------------------------------- 5. image size

def _png(path: Path, width: int, height: int) -> None:
    """A valid 1-bit PNG of width x height black pixels, written row by row (a few KB)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    z = zlib.compressobj(9)
    row = b"\0" * (1 + -(-width // 8))
    idat = b"".join(z.compress(row * 100) for _ in range(height // 100))
    idat += z.compress(row * (height % 100)) + z.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height,
                                                                      1, 0, 0, 0, 0))
                     + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def test_5_images_over_the_pixel_cap_are_skipped_from_their_header(tmp_path):
    root = image_folder(tmp_path / "images")
    big = root / "train" / "n01" / "big.png"
    _png(big, 13000, 13000)  # 169 MP: 507 MB decoded as RGB
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        assert struct.unpack(">II", big.read_bytes()[16:24]) == (13000, 13000)  # PNG IHDR
    cfg = folder_config(root, max_bad_fraction=0.5)
    before = tree(tmp_path)
    out = tmp_path / "shards"
    r = run("shard", "--cfg", json.dumps(cfg), "--split", "train", "--out", str(out),
            cwd=tmp_path, memory=1536 << 20, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((out / "manifest.json").read_text())
    assert m["count"] == 6
    [skip] = m["skipped"]
    assert skip["path"] == "train/n01/big.png" and "data.max_pixels (50000000)" in skip["reason"]
    assert tree(tmp_path, skip=out) == before
    # just over a lower cap, the reason gives the size read from the header
    cfg["data"]["max_pixels"] = 13000 * 13000 - 1
    r = run("shard", "--cfg", json.dumps(cfg), "--split", "train", "--out", str(out),
            cwd=tmp_path, memory=1536 << 20, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    [skip] = json.loads((out / "manifest.json").read_text())["skipped"]
    assert skip["reason"].startswith("13000x13000 = 169000000 pixels, over data.max_pixels")


def test_5_large_jpegs_decode_in_draft_mode_close_to_a_full_decode(tmp_path, monkeypatch):
    from dinosae.data import shard

    rng = np.random.default_rng(0)
    small = Image.fromarray(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8))
    path = tmp_path / "big.JPEG"
    small.resize((1280, 1024), Image.BICUBIC).save(path, quality=95)  # short side 32 x 32 px
    with Image.open(path) as im:
        full = shard.center_crop_adm(shard.to_rgb(im), 32)  # decoded in full
    data, reason = shard.prepare(str(path), 32, "png", 95)  # 1.3 MP: decoded in full too
    assert reason is None and np.array_equal(np.asarray(Image.open(io.BytesIO(data))), full)
    monkeypatch.setattr(shard, "DRAFT_ABOVE_PIXELS", 1_000_000)  # now it is "large"
    data, reason = shard.prepare(str(path), 32, "png", 95)
    assert reason is None
    with Image.open(path) as im:
        im.draft(im.mode, (160, 128))  # what prepare asks for: >= 4 x 32 px on the short side
        assert im.size == (160, 128)  # 1/8 scale: 64x fewer pixels decoded
    diff = np.asarray(Image.open(io.BytesIO(data))).astype(int) - full.astype(int)
    assert np.abs(diff).mean() < 1.5 and np.abs(diff).max() <= 4  # measured: 1.4 and 3


# ---------------------------------------------------------------- 6. two writers

def test_6_a_second_writer_is_refused_and_a_dead_ones_lock_is_taken_over(tmp_path, capsys,
                                                                         caplog):
    caplog.set_level(logging.INFO, logger="dinosae.outputs")
    root = image_folder(tmp_path / "images")
    out = tmp_path / "shards"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom dinosae.outputs import output_lock\n"
         "with output_lock(sys.argv[1], 'shard'):\n    print('held', flush=True)\n"
         "    time.sleep(300)\n", str(out)],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "held"
        before = tree(tmp_path)
        rc, err = cli(capsys, "shard", "--split", "train", "--out", str(out),
                      cfg=folder_config(root))
        one_line(rc, err, str(out), "being written by `dinosae shard`", f"pid {holder.pid}")
        assert tree(tmp_path) == before and not out.exists()
    finally:
        holder.send_signal(signal.SIGKILL)  # dies holding it: the lock file stays behind
        holder.wait()
    lock = tmp_path / ".shards.lock"
    assert json.loads(lock.read_text())["pid"] == holder.pid
    rc, err = cli(capsys, "shard", "--split", "train", "--out", str(out), cfg=folder_config(root))
    assert rc == 0, err
    assert f"taking over the lock of `dinosae shard` (pid {holder.pid}" in caplog.text
    assert (out / "manifest.json").is_file() and not lock.exists()


# ---------------------------------------------------------------- 7. one line, not a traceback

def _bad_safetensors(path: Path, kind: str) -> Path:
    header = {"huge": struct.pack("<Q", 2 ** 62) + b"{}",
              "json": struct.pack("<Q", 6) + b"{abc}x", "empty": b""}[kind]
    path.write_bytes(header)
    return path


def _cases(world, work: Path) -> dict[str, tuple[list[str], dict | None, tuple[str, ...]]]:
    """name -> (arguments, --cfg sections, needles of the one error line)."""
    tab = work / "tab.yaml"
    tab.write_text("seed: 0\ndata:\n\troot: x\n")
    binary = work / "binary.yaml"
    binary.write_bytes(bytes(range(256)) * 4)
    train_cfg = sections(world, "seed", "device", "data", "autoencoder", "ae_train")
    wide = json.loads(json.dumps(train_cfg))
    wide["data"]["image_size"] = 64
    deep = json.loads(json.dumps(train_cfg))
    deep["autoencoder"]["discriminator"]["layers"] = [0, 5]  # the tiny teacher has 2 blocks
    teacher = json.loads(json.dumps(train_cfg))
    teacher["autoencoder"]["teacher"]["weights"] = str(
        _bad_safetensors(work / "teacher.safetensors", "huge"))
    no_val = work / "no_val"
    (no_val / "train" / "n01").mkdir(parents=True)
    broken = work / "broken.zarr"
    shutil.copytree(work / "cache.zarr", broken)
    (broken / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group", "attributes": 5')
    ae_sections = sections(world, "data", "autoencoder")
    out = str(work / "out")
    return {
        "set-yaml": (["validate-config", "--set", "seed=[1, 2"], None,
                     ("--set seed", "not valid YAML")),
        "set-section": (["validate-config", "--config", str(ROOT / "config.yaml"), "--set",
                         "seed.x=1"], None, ("'seed' is not a section",)),
        "cfg-json": (["validate-config", "--cfg", "{bad"], None, ("--cfg is not valid JSON",)),
        "tab-yaml": (["validate-config", "--config", str(tab)], None,
                     ("tab.yaml", "not valid YAML", "line 3")),
        "binary-yaml": (["validate-config", "--config", str(binary)], None,
                        ("binary.yaml", "not UTF-8")),
        **{f"safetensors-{kind}": (
            ["import-ae", "--source", str(_bad_safetensors(work / f"{kind}.safetensors", kind)),
             "--out", out], ae_sections, (f"{kind}.safetensors", "not a readable .safetensors"))
           for kind in ("huge", "json", "empty")},
        "teacher-weights": (["ae-train", "--stage", "1", "--shards", str(work / "shards"),
                             "--out", out], teacher, ("teacher.safetensors", "header too large")),
        "missing-val": (["shard", "--split", "val", "--out", out], folder_config(no_val),
                        ("no_val", "no 'val' folder")),
        "image-size": (["ae-train", "--stage", "1", "--shards", str(work / "shards"), "--out",
                        out], wide, ("manifest.json", "images of 32 px", "expects 64 px")),
        "disc-layers": (["ae-train", "--stage", "1", "--shards", str(work / "shards"), "--out",
                         out], deep, ("discriminator.layers", "[5]", "2 blocks")),
        "zarr-json": (["train-dit", "--cache", str(broken), "--ae", str(work / "ae.pt"),
                       "--out", out], sections(world, "seed", "device", "dit", "sample"),
                      ("broken.zarr", "unreadable zarr store")),
        "no-results": (["status", "--results", str(work / "nothing")], None,
                       ("nothing", "no such folder")),
    }


CASES = ["set-yaml", "set-section", "cfg-json", "tab-yaml", "binary-yaml", "safetensors-huge",
         "safetensors-json", "safetensors-empty", "teacher-weights", "missing-val", "image-size",
         "disc-layers", "zarr-json", "no-results"]


@pytest.mark.parametrize("case", CASES)
def test_7_bad_input_is_one_line_with_exit_2(world, work, capsys, case):
    args, cfg, needles = _cases(world, work)[case]
    before = tree(work)
    rc, err = cli(capsys, *args, cfg=cfg)
    one_line(rc, err, *needles)
    assert "trainable parameters" not in err  # stopped before any training started
    assert tree(work) == before  # nothing written, not even a partial --out


def test_7_status_reports_an_unreadable_file_on_its_line_and_goes_on(work, capsys):
    results = work / "results"
    (results / "ae" / "stage1").mkdir(parents=True)
    (results / "ae" / "stage1" / "checkpoint.pt").write_bytes(b"\x00garbage" * 10)
    (results / "recon.txt").mkdir()  # a folder where a file should be
    (results / "gfid.txt").write_bytes(bytes(range(256)))
    (results / "latents").mkdir()
    (results / "latents" / "train.report.json").write_text("{not json")
    before = tree(work)
    capsys.readouterr()
    rc = main(["status", "--results", str(results)])
    printed = capsys.readouterr().out
    assert rc == 0 and "Traceback" not in printed
    rows = {ln.split("  ")[0]: ln for ln in printed.splitlines()[2:]}
    assert set(rows) == {"ae stage1", "ae stage2", "ae stage3", "ae stage4", "recon", "latents",
                         "dit", "samples", "gfid"}
    for stage, name in (("ae stage1", "checkpoint.pt"), ("recon", "recon.txt"),
                        ("gfid", "gfid.txt"), ("latents", "train.report.json")):
        assert "unreadable" in rows[stage] and name in rows[stage], rows[stage]
    assert "missing" in rows["dit"] and "missing" in rows["ae stage2"]
    assert tree(work) == before


# ---------------------------------------------------------------- 8. every skipped file listed

def test_8_special_files_and_dangling_links_are_listed_as_skipped(tmp_path):
    root = image_folder(tmp_path / "images")
    cls = root / "train" / "n01"
    (cls / "zero.JPEG").symlink_to("/dev/zero")
    os.mkfifo(cls / "fifo.JPEG")  # read by a careless job, it would block forever
    (cls / "dangling.JPEG").symlink_to(tmp_path / "gone.JPEG")
    (cls / ".hidden.JPEG").write_bytes(b"x")
    (cls / "sub").mkdir()
    (root / "train" / "README").write_text("not a class")
    before = tree(tmp_path)
    out = tmp_path / "shards"
    r = run("shard", "--cfg", json.dumps(folder_config(root, max_bad_fraction=0.9)), "--split",
            "train", "--out", str(out), cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((out / "manifest.json").read_text())
    reasons = {s["path"]: s["reason"] for s in m["skipped"]}
    assert reasons == {
        "train/README": "not an image file extension",
        "train/n01/.hidden.JPEG": "hidden file",
        "train/n01/dangling.JPEG": "dangling symbolic link",
        "train/n01/fifo.JPEG": "not a regular file (a FIFO)",
        "train/n01/sub": "a folder inside a class folder (not scanned)",
        "train/n01/zero.JPEG": "not a regular file (a character device)",
    }
    assert m["count"] == 6
    assert tree(tmp_path, skip=out) == before


# ---------------------------------------------------------------- 9. leftovers, file modes

def test_9_temporaries_of_killed_runs_are_removed_and_modes_follow_the_umask(world, work,
                                                                             capsys):
    out = work / "exp"
    killed = [work / ".exp.tmp999999", work / ".exp.old999998", work / ".cache.zarr.tmp999997"]
    for k in killed:
        (k / "autoencoder").mkdir(parents=True)
        (k / "config.json").write_text("{}")
    old = os.umask(0o027)
    try:
        assert cli(capsys, "export-model", "--checkpoint", str(work / "dit.pt"), "--out",
                   str(out))[0] == 0
        assert cli(capsys, "encode-init", "--shards", str(work / "shards"), "--checkpoint",
                   str(work / "ae.pt"), "--out", str(work / "cache.zarr"),
                   cfg=sections(world, "latents"))[0] == 0
    finally:
        os.umask(old)
    assert not any(k.exists() for k in killed)
    assert not list(work.glob(".*.lock"))
    files = [p for p in out.rglob("*") if p.is_file()]
    assert sorted(p.name for p in files) == ["config.json", "config.json", "model.safetensors",
                                             "model.safetensors"]
    assert {oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {oct(0o640)}
    assert stat.S_IMODE((work / "cache.zarr" / "zarr.json").stat().st_mode) == 0o640


# ================================================================ issue 22: round two
#
#   10 single-file outputs      13 weights and evaluation inputs   16 tracebacks -> one line
#   11 lock links               14 resume identity                 17 the CLI boundary (table)
#   12 shell quoting, numbers   15 results-folder readers

def _samples_h5(path: Path, n: int = 4, size: int = SIZE, **attrs) -> Path:
    """A samples.h5 as generate.sample_to_h5 writes it (random uint8 images)."""
    import h5py

    rng = np.random.default_rng(1)
    with h5py.File(path, "w") as f:
        f["images"] = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
        f["labels"] = np.arange(n) % NUM_CLASSES
        f["seeds"] = np.arange(n)
        f.attrs.update({"format": "dinosae-samples", "num_samples": n, "done": n,
                        "complete": True, "classes": ["a", "b", "c"]} | attrs)
    return path


def _file_writers(world, work: Path) -> dict[str, tuple[list[str], dict | None, str]]:
    """command -> (arguments without --out, --cfg sections, a good --out name) for every
    command that writes a single file."""
    (work / "recon.txt").write_text("PSNR: 1.0\nnum_samples: 2\n")
    samples = _samples_h5(work / "in_samples.h5")
    (work / "run").mkdir(exist_ok=True)
    (work / "run" / "metrics.csv").write_text("step,loss\n1,0.5\n2,0.4\n")
    ev = sections(world, "device", "eval", "autoencoder", "data")
    return {
        "sample": (["sample", "--dit", str(work / "dit.pt"), "--ae", str(work / "ae.pt")],
                   sections(world, "seed", "device", "sample"), "samples.h5"),
        "import-ae": (["import-ae", "--source", str(work / "ae.pt")],
                      sections(world, "data", "autoencoder"), "imported.pt"),
        "import-dit": (["import-dit", "--source", str(work / "dit.pt")],
                       sections(world, "dit"), "imported.pt"),
        "export-latents": (["export-latents", "--cache", str(work / "cache.zarr")], {},
                           "latents.h5"),
        "encode-gather": (["encode-gather", "--cache", str(work / "cache.zarr")], {},
                          "train.report.json"),
        "generate": (["generate", "--model", str(work / "exports" / "dit"), "--classes", "0",
                      "--seeds", "0", "--steps", "2", "--device", "cpu"], None, "grid.png"),
        "eval-recon": (["eval-recon", "--checkpoint", str(work / "ae.pt"), "--shards",
                        str(work / "shards")], ev, "recon_out.txt"),
        "fid-reference": (["fid-reference", "--shards", str(work / "shards")], ev, "ref.npz"),
        "fid": (["fid", "--samples", str(samples), "--reference", str(work / "ref.npz")], ev,
                "gfid.txt"),
        "metrics-table": (["metrics-table", "--results", str(work / "recon.txt"), "--title",
                           "recon"], None, "table.html"),
        "config-page": (["config-page"], {"seed": 0}, "config.html"),
        "stage-figures": (["stage-figures", "--checkpoint", str(work / "run" / "checkpoint.pt"),
                           "--title", "run", "--loss"], None, "loss.png"),
        "sample-grids": (["sample-grids", "--samples", str(samples), "--out"], None,
                         "class0.png"),
    }


def _out_args(args: list[str], out: Path) -> list[str]:
    """The arguments with the output path: after a trailing --loss/--out, else --out OUT."""
    return [*args, str(out)] if args[-1] in ("--loss", "--out") else [*args, "--out", str(out)]


FILE_WRITERS = ["sample", "import-ae", "import-dit", "export-latents", "encode-gather",
                "generate", "eval-recon", "fid-reference", "fid", "metrics-table", "config-page",
                "stage-figures", "sample-grids"]


@pytest.mark.parametrize("command", FILE_WRITERS)
def test_10_a_foreign_file_at_out_is_refused_not_replaced(world, work, capsys, command):
    args, cfg, name = _file_writers(world, work)[command]
    out = work / name
    out.write_text("years of work")
    before = tree(work)
    rc, err = cli(capsys, *_out_args(args, out), cfg=cfg)
    one_line(rc, err, str(out), f"was not written by `dinosae {command}`", "--force")
    assert tree(work) == before


@pytest.mark.parametrize("command, args, needle", [
    ("import-dit", ["--source", "{dit}", "--out", "{dit}"], "is this command's input"),
    ("import-ae", ["--source", "{exports}/ae", "--out", "{exports}/ae/model.safetensors"],
     "is this command's input"),
    ("export-latents", ["--cache", "{cache}", "--out", "{cache}/x.h5"], "is this command's input"),
    ("encode-gather", ["--cache", "{cache}", "--out", "{cache}/r.json"], "is this command's input"),
    ("sample", ["--dit", "{dit}", "--ae", "{ae}", "--out", "{dit}"], "give a .h5 file name"),
    ("sample", ["--dit", "{dit}", "--ae", "{ae}", "--out", "{work}/x.png"], "give a .h5"),
    ("sample", ["--dit", "{dit}", "--ae", "{ae}", "--out", "{work}/dit.h5"], "dit.png"),
    ("generate", ["--model", "{dit}", "--classes", "0", "--out", "{work}/dit.pt"], ".png"),
    ("eval-recon", ["--checkpoint", "{ae}", "--shards", "{shards}", "--out", "{work}/r.png"],
     "give a .txt name"),
    ("metrics-table", ["--results", "{work}/recon.txt", "--title", "t", "--out",
                       "{work}/recon.txt"], "is this command's input"),
])
def test_10_never_an_input_or_a_file_beside_it_even_with_force(world, work, capsys, command,
                                                               args, needle):
    (work / "recon.txt").write_text("PSNR: 1\n")
    (work / "dit.png").write_bytes(b"\x89PNG\r\n\x1a\nnot ours")  # beside dit.h5
    cfg = {"sample": sections(world, "seed", "device", "sample"), "import-dit": sections(
        world, "dit"), "import-ae": sections(world, "data", "autoencoder"), "eval-recon": sections(
        world, "device", "eval", "autoencoder"), "export-latents": {},
        "encode-gather": {}}.get(command)
    paths = {"dit": work / "dit.pt", "ae": work / "ae.pt", "cache": work / "cache.zarr",
             "exports": work / "exports", "work": work, "shards": work / "shards"}
    argv = [command, *(a.format(**paths) for a in args)]
    before = tree(work)
    for force in ([], ["--force"]):
        if force and needle == "dit.png":
            continue  # --force may replace a file beside that is not an input
        rc, err = cli(capsys, *argv, *force, cfg=cfg)
        one_line(rc, err, needle)
    assert tree(work) == before


def test_10_own_files_are_replaced_force_replaces_a_foreign_one_and_a_link_not_its_target(
        world, work, capsys):
    cfg = sections(world, "data", "autoencoder")
    out = work / "imported.pt"
    for _ in range(2):  # a rerun over its own import
        assert cli(capsys, "import-ae", "--source", str(work / "ae.pt"), "--out", str(out),
                   cfg=cfg)[0] == 0
    # a checkpoint the importer did not make (a trained stage) is foreign
    victim = work / "victim.txt"
    victim.write_text("keep me")
    for foreign in (work / "ae.pt", victim):
        out.unlink()
        out.symlink_to(foreign)
        rc, err = cli(capsys, "import-ae", "--source", str(work / "dit.pt"), "--out", str(out),
                      cfg=cfg)
        one_line(rc, err, "is a symbolic link", "--force")
    digest = hashlib.sha256(victim.read_bytes()).hexdigest()
    rc, err = cli(capsys, "import-ae", "--source", str(work / "ae.pt"), "--out", str(out),
                  "--force", cfg=cfg)
    assert rc == 0, err
    assert not out.is_symlink() and out.stat().st_size > 1000  # the link replaced ...
    assert hashlib.sha256(victim.read_bytes()).hexdigest() == digest  # ... never its target
    shutil.copy(work / "ae.pt", work / "trained.pt")
    before = tree(work)
    rc, err = cli(capsys, "import-ae", "--source", str(work / "ae.pt"), "--out",
                  str(work / "trained.pt"), cfg=cfg)
    one_line(rc, err, "trained.pt", "was not written by `dinosae import-ae`")
    assert tree(work) == before
    # the report writers recognise their own PNG, HTML and JSON
    args, _, _ = _file_writers(world, work)["encode-gather"]
    for _ in range(2):
        rc, err = cli(capsys, *args, "--out", str(work / "r.json"), cfg={})
        assert rc == 0, err
    assert json.loads((work / "r.json").read_text())["complete"] is True
    args, _, _ = _file_writers(world, work)["metrics-table"]
    for _ in range(2):
        assert cli(capsys, *args, "--out", str(work / "t.html"))[0] == 0
    args, _, _ = _file_writers(world, work)["stage-figures"]
    for _ in range(2):
        assert cli(capsys, *args, str(work / "loss.png"))[0] == 0


def test_10_a_fifo_or_a_folder_at_out_is_refused_even_with_force(world, work, capsys):
    os.mkfifo(work / "pipe.html")
    (work / "folder.html").mkdir()
    (work / "recon.txt").write_text("PSNR: 1\n")
    before = tree(work)
    for name, needle in (("pipe.html", "is a FIFO, not a regular file"),
                         ("folder.html", "is a folder")):
        for force in ([], ["--force"]):
            rc, err = cli(capsys, "metrics-table", "--results", str(work / "recon.txt"),
                          "--title", "t", "--out", str(work / name), *force)
            one_line(rc, err, name, needle)
    assert tree(work) == before


# ---------------------------------------------------------------- 11. lock links

@pytest.mark.parametrize("kind", ["link", "dangling", "folder", "fifo"])
def test_11_a_lock_that_is_not_a_regular_file_is_refused_never_written_through(tmp_path, capsys,
                                                                              kind):
    root = image_folder(tmp_path / "images")
    lock, victim = tmp_path / ".shards.lock", tmp_path / "victim.txt"
    victim.write_text("anything the writer can write")
    if kind == "link":
        lock.symlink_to(victim)
    elif kind == "dangling":
        lock.symlink_to(tmp_path / "created_by_the_lock")
    elif kind == "folder":
        lock.mkdir()
    else:
        os.mkfifo(lock)
    before = tree(tmp_path)
    rc, err = cli(capsys, "shard", "--split", "train", "--out", str(tmp_path / "shards"),
                  cfg=folder_config(root))
    what = {"link": "a symbolic link", "dangling": "a symbolic link", "folder": "a folder",
            "fifo": "a FIFO"}[kind]
    one_line(rc, err, ".shards.lock", f"is {what}", "never written through")
    assert tree(tmp_path) == before
    assert not (tmp_path / "created_by_the_lock").exists()


# ---------------------------------------------------------------- 12. shell quoting, numbers

def test_12_hostile_config_paths_reach_real_rules_quoted_and_a_space_path_works(tmp_path):
    """data.root and data.shards holding $(...), ;, quotes and spaces: the mini_dataset and
    shard rules run (Snakemake, real shell lines), nothing in the paths executes, and the
    shards land in the folder named."""
    from helpers import run_snakemake, workflow_copy

    cfg = tiny_config()
    root = "data/my root $(touch PWNED_1); touch PWNED_2 'q\" `touch PWNED_3`"
    shards = "data/sh ards;touch PWNED_4 && touch PWNED_5"
    cfg["data"].update(source="mini", root=root, shards=shards)
    cfg["data"]["mini"].update(train_per_class=2, val_per_class=1)
    work = workflow_copy(tmp_path / "wf", cfg)
    r = run_snakemake(work, f"{shards}/train/manifest.json", check=False, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    assert not [p for p in work.rglob("PWNED_*")], "a command in a path was executed"
    m = json.loads((work / shards / "train" / "manifest.json").read_text())
    assert m["count"] == 2 * len(list((work / root / "train").iterdir()))


def cli_any(capsys, *args: str, cfg: dict | None = None) -> tuple[int, str]:
    """cli(), also for argparse's refusals (SystemExit): (exit status, stderr)."""
    try:
        return cli(capsys, *args, cfg=cfg)
    except SystemExit as e:
        return int(e.code or 0), capsys.readouterr().err


def _with(world, section: str, **changes) -> dict:
    doc = json.loads(json.dumps(world["cfg"][section]))
    doc.update(changes)
    return {section: doc}


NUMBERS = {  # name -> (arguments, needles)
    "set-nan": (["--set", "dit.ema=.nan"], ("'dit.ema'", "nan is not a finite number")),
    "set-inf": (["--set", "dit.lr=-.inf"], ("'dit.lr'", "-inf is not a finite number")),
    "set-fraction": (["--set", "data.max_bad_fraction=.NaN"],
                     ("'data.max_bad_fraction'", "not a finite number")),
    "set-count": (["--set", "sample.num_samples=1.0e+12"],
                  ("'sample.num_samples'", "maximum of 10000000")),
    "set-newline": (["--set", 'data.root="a\\nb"'], ("'data.root'", "control character")),
    "set-brace": (["--set", "data.shards=x/{split}"], ("'data.shards'", "brace")),
}


@pytest.mark.parametrize("case", sorted(NUMBERS))
def test_12_non_finite_and_unbounded_numbers_are_refused_in_the_config(tmp_path, capsys, case):
    args, needles = NUMBERS[case]
    rc, err = cli_any(capsys, "validate-config", "--config", str(ROOT / "config.yaml"), *args)
    one_line(rc, err, *needles)


def test_12_nan_in_cfg_json_and_yaml_files_is_refused(world, tmp_path, capsys):
    rc, err = cli_any(capsys, "validate-config", cfg=_with(world, "dit", ema=float("nan")))
    one_line(rc, err, "'dit.ema'", "nan is not a finite number")
    (tmp_path / "c.yaml").write_text((ROOT / "config.yaml").read_text() + "\nseed: .inf\n")
    rc, err = cli_any(capsys, "validate-config", "--config", str(tmp_path / "c.yaml"))
    one_line(rc, err, "'seed'")


@pytest.mark.parametrize("flags, needles", [
    (["--cfg-scale", "nan"], ("--cfg-scale", "'nan' is not a finite number")),
    (["--cfg-scale=-inf"], ("--cfg-scale", "not a finite number")),
    (["--s-vae=-1"], ("--s-vae", "out of range")),
    (["--batch-size", "0"], ("--batch-size", "out of range")),
    (["--steps", "inf"], ("--steps", "not an integer")),
    (["--interval", "nan,1"], ("--interval lo nan", "finite")),
    (["--device", "foo"], ("--device 'foo'", "expected auto, cpu, cuda")),
    (["--device", "cuda:7"], ("--device 'cuda:7'",)),
    (["--classes", "0-1000000000"], ("--classes", "more than 100000")),
    (["--seeds", "0-99999", "--classes", "0-1"], ("--classes x --seeds", "more than 100000")),
])
def test_12_generate_flags_are_checked_before_anything_loads(world, work, capsys, flags, needles):
    out = work / "g.png"
    before = tree(work)
    base = {"--classes": "0"}
    argv = ["generate", "--model", str(work / "exports" / "dit"), "--out", str(out)]
    if "--classes" not in flags:
        argv += ["--classes", base["--classes"]]
    rc, err = cli_any(capsys, *argv, *flags)
    one_line(rc, err, *needles)
    assert tree(work) == before


def test_12_a_billion_seeds_are_refused_within_a_small_memory_limit(work):
    before = tree(work)
    r = run("generate", "--model", str(work / "exports" / "dit"), "--classes", "0", "--seeds",
            "0-1000000000", "--out", str(work / "g.png"), cwd=work, memory=1536 << 20,
            timeout=120)
    one_line(r.returncode, r.stderr, "--seeds '0-1000000000'", "more than 100000")
    assert tree(work) == before


@pytest.mark.parametrize("argv, needles", [
    (["plan", "--mfu", "nan"], ("--mfu", "not a finite number")),
    (["plan", "--gpus", "0"], ("--gpus", "out of range")),
    (["plan", "--train-images", "1e3"], ("--train-images", "not an integer")),
    (["encode-part", "--cache", "c", "--shards", "s", "--checkpoint", "a", "--index=-1",
      "--parts", "2", "--done", "d"], ("--index", "out of range")),
])
def test_12_other_number_flags_refuse_nan_and_out_of_range(capsys, argv, needles):
    rc, err = cli_any(capsys, *argv)
    one_line(rc, err, *needles)


# ---------------------------------------------------------------- 13. weights, evaluation inputs

def _poisoned_checkpoint(src: Path, dst: Path, key_part: str, value: float | None = None,
                         dtype: torch.dtype | None = None) -> str:
    """A copy of checkpoint `src` whose first EMA tensor containing `key_part` gets `value` in
    one element, or the integer `dtype`; returns the tensor's name."""
    ck = torch.load(src, weights_only=True)
    key = next(k for k in sorted(ck["ema"]) if key_part in k and ck["ema"][k].is_floating_point())
    t = ck["ema"][key].clone()
    if dtype is not None:
        t = t.to(dtype)
    else:
        t.view(-1)[0] = value
    ck["ema"] = {**ck["ema"], key: t}
    ck["model"] = ck["ema"]
    save_checkpoint(dst, ck)
    return key


@pytest.mark.parametrize("which, value, dtype, needle", [
    ("ae", float("nan"), None, "values are NaN or Inf"),
    ("ae", float("inf"), None, "values are NaN or Inf"),
    ("ae", None, torch.int64, "int64 in the file, float32 in the model"),
    ("dit", float("-inf"), None, "values are NaN or Inf"),
    ("dit", None, torch.int32, "not floating point"),
])
def test_13_weights_are_checked_floating_and_finite_on_every_load_and_import(
        world, work, capsys, which, value, dtype, needle):
    bad = work / f"bad_{which}.pt"
    key = _poisoned_checkpoint(work / f"{which}.pt", bad, "decoder" if which == "ae" else "blocks",
                               value, dtype)
    before = tree(work)
    runs = [["export-model", "--checkpoint", str(bad), "--out", str(work / "exp")]]
    if which == "ae":
        runs.append(["import-ae", "--source", str(bad), "--out", str(work / "imp.pt")])
        cfgs = [None, sections(world, "data", "autoencoder")]
    else:
        runs.append(["import-dit", "--source", str(bad), "--out", str(work / "imp.pt")])
        cfgs = [None, sections(world, "dit")]
    for argv, cfg in zip(runs, cfgs, strict=True):
        rc, err = cli(capsys, *argv, cfg=cfg)
        one_line(rc, err, key, needle)
    assert tree(work) == before


def test_13_non_finite_weights_in_an_export_are_refused_by_the_python_api(world, work):
    from safetensors.torch import load_file, save_file

    st = work / "exports" / "ae" / "model.safetensors"
    sd = load_file(st)
    key = sorted(k for k in sd if "decoder" in k)[0]
    sd[key] = sd[key].clone().fill_(float("nan"))
    save_file(sd, st)
    with pytest.raises(ConfigError, match=f"{re.escape(key)}: .* NaN or Inf"):
        dinosae.load_autoencoder(work / "exports" / "ae", device="cpu")


def test_13_eval_recon_refuses_a_decoder_that_gives_nan(world, work, capsys, monkeypatch):
    from dinosae.models.autoencoder import DinoSAE

    monkeypatch.setattr(DinoSAE, "decode",
                        lambda self, z, *a, **k: torch.full((len(z), 3, SIZE, SIZE), torch.nan))
    out = work / "recon.txt"
    before = tree(work)
    rc, err = cli(capsys, "eval-recon", "--checkpoint", str(work / "ae.pt"), "--shards",
                  str(work / "shards"), "--out", str(out),
                  cfg=sections(world, "device", "eval", "autoencoder"))
    one_line(rc, err, "reconstructions of", "are NaN or Inf; not scoring them")
    assert tree(work) == before


def _reference(path: Path, d: int = 8, resolution: int | None = SIZE, **changes) -> Path:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(64, d))
    arrays = {"mu": a.mean(0), "sigma": np.cov(a, rowvar=False), "extractor": "dinosae-teacher",
              "extractor_id": "x", "count": 64, "source": "test"}
    if resolution is not None:
        arrays["resolution"] = resolution
    arrays.update(changes)
    np.savez(path, **arrays)
    return path


def _bad_samples(work: Path, case: str) -> Path:
    import h5py

    path = work / f"{case}.h5"
    if case == "incomplete":
        return _samples_h5(path, done=2, complete=False)
    if case == "done-short":
        return _samples_h5(path, done=3)
    if case == "one":
        return _samples_h5(path, n=1, done=1)
    if case == "size":
        return _samples_h5(path, size=16)
    with h5py.File(path, "w") as f:
        if case == "float":
            f["images"] = np.zeros((4, SIZE, SIZE, 3), np.float32)
        elif case == "chw":
            f["images"] = np.zeros((4, 3, SIZE, SIZE), np.uint8)
        elif case == "empty":
            f["images"] = np.zeros((0, SIZE, SIZE, 3), np.uint8)
        elif case == "no-images":
            f["labels"] = np.zeros(4)
    return path


@pytest.mark.parametrize("case, needles", [
    ("incomplete", ("incomplete (2/4 samples written, complete: False)",)),
    ("done-short", ("incomplete (3/4",)),
    ("one", ("1 samples; FID needs at least 2",)),
    ("size", ("16x16 images", "32x32")),
    ("float", ("images float32 [4, 32, 32, 3]", "uint8")),
    ("chw", ("[4, 3, 32, 32]", "NHWC")),
    ("empty", ("0 samples",)),
    ("no-images", ("no 'images' array",)),
])
def test_13_fid_checks_its_samples_before_scoring(world, work, capsys, case, needles):
    samples = _bad_samples(work, case)
    ref = _reference(work / "ref.npz")
    before = tree(work)
    rc, err = cli(capsys, "fid", "--samples", str(samples), "--reference", str(ref), "--out",
                  str(work / "gfid.txt"), cfg=sections(world, "device", "eval", "autoencoder",
                                                         "data"))
    one_line(rc, err, str(samples), *needles)
    assert tree(work) == before


@pytest.mark.parametrize("changes, needles", [
    ({"mu": np.array([np.nan] * 8)}, ("mu holds 8 NaN or Inf",)),
    ({"sigma": np.full((8, 8), np.inf)}, ("sigma holds 64 NaN",)),
    ({"sigma": np.eye(7)}, ("mu [8] and sigma [7, 7] do not fit",)),
    ({"count": 1}, ("statistics of 1 images",)),
    ({"features": np.zeros((5, 3))}, ("features [5, 3] do not fit",)),
    ({"mu": None}, ("not reference statistics",)),
])
def test_13_fid_checks_its_reference(world, work, capsys, changes, needles):
    samples = _samples_h5(work / "s.h5")
    if changes.get("mu", 0) is None:
        np.savez(work / "ref.npz", sigma=np.eye(8))
    else:
        _reference(work / "ref.npz", **changes)
    before = tree(work)
    rc, err = cli(capsys, "fid", "--samples", str(samples), "--reference",
                  str(work / "ref.npz"), "--out", str(work / "gfid.txt"),
                  cfg=sections(world, "device", "eval", "autoencoder", "data"))
    one_line(rc, err, "ref.npz", *needles)
    assert tree(work) == before


# ---------------------------------------------------------------- 14. resume identity

def _stopped_run(capsys, monkeypatch, argv: list[str], cfg: dict, point: str) -> None:
    """Run `argv` until SIGTERM after step 2 (via DINOSAE_FAULT): a last.pt at step 2."""
    monkeypatch.setenv("DINOSAE_FAULT", f"{point}@2:TERM")
    with pytest.raises(SystemExit, match="stopped by signal after step 2"):
        cli(capsys, *argv, cfg=cfg)
    monkeypatch.delenv("DINOSAE_FAULT")


def test_14_train_dit_refuses_another_runs_last_pt_and_restart_starts_afresh(
        world, work, capsys, monkeypatch, caplog):
    out = work / "dit_run"
    cfg = sections(world, "seed", "device", "dit", "sample")
    cfg["dit"].update(steps=4, ckpt_every=3, image_every=100, log_every=1)
    argv = ["train-dit", "--cache", str(work / "cache.zarr"), "--ae", str(work / "ae.pt"),
            "--out", str(out)]
    _stopped_run(capsys, monkeypatch, argv, cfg, "train-dit")
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 2
    other = json.loads(json.dumps(cfg))
    other["seed"] = 7
    other["dit"].update(lr=other["dit"]["lr"] * 2, batch_size=4, log_every=2)  # cadence: free
    before = tree(work)
    rc, err = cli(capsys, *argv, cfg=other)
    line = one_line(rc, err, "last.pt", "made by another run", "seed: 0 -> 7", "dit.lr:",
                    "dit.batch_size: 8 -> 4", "--restart")
    assert "log_every" not in line
    assert tree(work) == before
    # the same settings resume; --restart starts afresh
    caplog.set_level(logging.INFO)
    rc, err = cli(capsys, *argv, cfg=cfg)
    assert rc == 0 and "resuming from" in caplog.text, err[-2000:]
    shutil.copy(out / "checkpoint.pt", out / "last.pt")  # a final checkpoint in its place
    before = tree(work)
    rc, err = cli(capsys, *argv, cfg=cfg)
    one_line(rc, err, "last.pt: a final checkpoint (no optimizer state)")
    assert tree(work) == before
    rc, err = cli(capsys, *argv, "--restart", cfg=other)
    assert rc == 0, err[-2000:]
    assert "--restart: starting afresh" in caplog.text and not (out / "last.pt").exists()
    assert torch.load(out / "checkpoint.pt", weights_only=True)["identity"]["seed"] == 7


def test_14_ae_train_refuses_another_runs_last_pt(world, work, capsys, monkeypatch):
    out = work / "stage1"
    cfg = sections(world, "seed", "device", "data", "autoencoder", "ae_train")
    stages = cfg["ae_train"]["stages"]
    cfg["ae_train"].update(stages=ae_stages([4, 1, 1, 1], stages[0]["batch_size"],
                                            stages[0]["lr"]), ckpt_every=3, image_every=100)
    argv = ["ae-train", "--stage", "1", "--shards", str(work / "shards"), "--out", str(out)]
    _stopped_run(capsys, monkeypatch, argv, cfg, "ae-stage1")
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 2
    edit_json(work / "shards" / "manifest.json", note="other shards")  # another manifest
    other = json.loads(json.dumps(cfg))
    other["ae_train"]["stages"][0]["lr"] *= 3
    other["ae_train"]["stages"][1]["lr"] *= 5  # another stage's setting: not this run's
    before = tree(work)
    rc, err = cli(capsys, *argv, cfg=other)
    assert "ae_train.stages.steps" not in err and "[1]" not in err
    one_line(rc, err, "made by another run", "ae_train.stages.lr:", "shards_manifest_sha256:",
             "--restart")
    assert tree(work) == before


# ---------------------------------------------------------------- 15. results-folder readers

def test_15_status_never_blocks_on_a_fifo_and_survives_any_json(tmp_path):
    results = tmp_path / "results"
    for sub in ("ae/stage1", "ae/stage2", "dit", "samples", "latents"):
        (results / sub).mkdir(parents=True)
    os.mkfifo(results / "recon.txt")
    os.mkfifo(results / "gfid.txt")
    os.mkfifo(results / "samples" / "samples.h5")
    os.mkfifo(results / "ae" / "stage1" / "checkpoint.pt")
    (results / "dit" / "metrics.csv").symlink_to("/dev/zero")
    (results / "latents" / "train.report.json").write_text("[1, 2, 3]")
    before = tree(tmp_path)
    r = run("status", "--results", str(results), cwd=tmp_path, timeout=60)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    rows = {ln.split("  ")[0]: ln for ln in r.stdout.splitlines()[2:]}
    for stage, needle in (("recon", "recon.txt: is a FIFO"), ("gfid", "gfid.txt: is a FIFO"),
                          ("samples", "samples.h5: is a FIFO"),
                          ("latents", "a JSON list, not the report's object")):
        assert "unreadable" in rows[stage] and needle in rows[stage], rows[stage]
    assert "unreadable" in rows["ae stage1"] and "checkpoint.pt" in rows["ae stage1"]
    assert tree(tmp_path) == before


@pytest.mark.parametrize("argv, needle", [
    (["metrics-table", "--results", "{fifo}", "--title", "t", "--out", "{work}/t.html"],
     "is a FIFO, not a regular file"),
    (["stage-figures", "--checkpoint", "{work}/run/checkpoint.pt", "--title", "t", "--loss",
      "{work}/loss.png"], "metrics.csv: is a FIFO"),
    (["sample-grids", "--samples", "{fifo}", "--out", "{work}/c0.png"], "is a FIFO"),
])
def test_15_report_rules_open_only_regular_files(tmp_path, argv, needle):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    (tmp_path / "run").mkdir()
    os.mkfifo(tmp_path / "run" / "metrics.csv")
    before = tree(tmp_path)
    r = run(*(a.format(fifo=fifo, work=tmp_path) for a in argv), cwd=tmp_path, timeout=60)
    one_line(r.returncode, r.stderr, needle)
    assert tree(tmp_path) == before


# ---------------------------------------------------------------- 16. tracebacks -> one line

def _broken_checkpoints(work: Path) -> None:
    (work / "text.pt").write_text("hello, not a checkpoint\n")
    torch.save({"kind": "dinosae-dit", "ema": {"w": torch.zeros(2)}, "model": {},
                "config": {"tokens": 4}}, work / "noconfig_dit.pt")
    torch.save({"kind": "dinosae-ae", "ema": {"w": torch.zeros(2)}, "model": {},
                "config": {"tokens": 4}}, work / "noconfig_ae.pt")


@pytest.mark.parametrize("argv, cfg_sections, needles", [
    (["export-model", "--checkpoint", "{work}/text.pt", "--out", "{work}/e"], None,
     ("text.pt", "is not a readable checkpoint")),
    (["export-model", "--checkpoint", "{work}/noconfig_dit.pt", "--out", "{work}/e"], None,
     ("noconfig_dit.pt", "config cannot rebuild a DiT", "'dit'")),
    (["export-model", "--checkpoint", "{work}/noconfig_ae.pt", "--out", "{work}/e"], None,
     ("noconfig_ae.pt", "config cannot rebuild an autoencoder")),
    (["import-dit", "--source", "{work}/noconfig_dit.pt", "--out", "{work}/i.pt"], ("dit",),
     ("noconfig_dit.pt", "config lacks 'dit' (a mapping)", "'grid'")),
    (["import-ae", "--source", "{work}/noconfig_ae.pt", "--out", "{work}/i.pt"],
     ("data", "autoencoder"), ("noconfig_ae.pt", "config cannot rebuild an autoencoder")),
    (["import-dit", "--source", "{work}/text.pt", "--out", "{work}/i.pt"], ("dit",),
     ("text.pt", "is not a readable checkpoint")),
])
def test_16_damaged_checkpoints_are_one_line(world, work, capsys, argv, cfg_sections, needles):
    _broken_checkpoints(work)
    before = tree(work)
    rc, err = cli(capsys, *(a.format(work=work) for a in argv),
                  cfg=sections(world, *cfg_sections) if cfg_sections else None)
    one_line(rc, err, *needles)
    assert tree(work) == before


def test_16_shard_needs_only_the_split_it_reads(tmp_path, capsys):
    root = tmp_path / "images"
    for c in ("n01", "n02"):
        (root / "train" / c).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (40, 36), (20 + 40 * i, 10, 90)).save(root / "train" / c / f"{i}.JPEG")
    rc, err = cli(capsys, "shard", "--split", "train", "--out", str(tmp_path / "shards"),
                  cfg=folder_config(root))
    assert rc == 0, err
    assert json.loads((tmp_path / "shards" / "manifest.json").read_text())["count"] == 4
    # the whole config (what the Snakefile validates) still asks for both
    cfg = tiny_config()
    cfg["data"].update(source="folder", root=str(root))
    with pytest.raises(ConfigError, match="has no val/ folder"):
        validate(cfg)


# ---------------------------------------------------------------- 17. the CLI boundary

def _boundary(world, work: Path) -> dict[str, list[tuple[list[str], tuple[str, ...] | None]]]:
    """command -> [(arguments, config sections or None), ...]: a missing input and a damaged
    one (a text file where a checkpoint, cache, shard folder, samples or reference belong) for
    every `dinosae` command."""
    text = work / "damaged.txt"
    text.write_text("not what you think\n")
    bad_dir = work / "damaged_dir"
    bad_dir.mkdir()
    (bad_dir / "manifest.json").write_text("[1, 2]")
    (bad_dir / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group", '
                                       '"attributes": []}')
    miss, out = str(work / "missing"), str(work / "out")
    t, d = str(text), str(bad_dir)
    ae, dit, sh, cache = str(work / "ae.pt"), str(work / "dit.pt"), str(work / "shards"), \
        str(work / "cache.zarr")
    ev = ("device", "eval", "autoencoder", "data")
    return {
        "validate-config": [(["--config", miss], None), (["--config", t], None)],
        "mini-dataset": [(["--out", out, "--set", "data.mini.crop_size=8"], ("seed", "data")),
                         (["--out", t], ("seed", "data"))],
        "shard": [(["--split", "val", "--out", out, "--set", f"data.root={miss}",
                    "--set", "data.source=folder"], ("data",)),
                  (["--split", "val", "--out", out, "--set", f"data.root={t}",
                    "--set", "data.source=folder"], ("data",))],
        "ae-train": [(["--stage", "1", "--shards", miss, "--out", out], None),
                     (["--stage", "2", "--shards", sh, "--init", t, "--out", out], None)],
        "eval-recon": [(["--checkpoint", miss, "--shards", sh, "--out", out + ".txt"], ev),
                       (["--checkpoint", t, "--shards", sh, "--out", out + ".txt"], ev),
                       (["--checkpoint", ae, "--shards", d, "--out", out + ".txt"], ev)],
        "encode-init": [(["--shards", miss, "--checkpoint", ae, "--out", out], ("latents",)),
                        (["--shards", sh, "--checkpoint", t, "--out", out], ("latents",))],
        "encode-part": [(["--cache", miss, "--shards", sh, "--checkpoint", ae, "--index", "0",
                          "--parts", "1", "--done", out], ("latents",)),
                        (["--cache", d, "--shards", sh, "--checkpoint", ae, "--index", "0",
                          "--parts", "1", "--done", out], ("latents",))],
        "encode-gather": [(["--cache", miss, "--out", out], ("latents",)),
                          (["--cache", d, "--out", out], ("latents",))],
        "export-latents": [(["--cache", miss, "--out", out + ".h5"], ()),
                           (["--cache", d, "--out", out + ".h5"], ())],
        "cache": [(["verify", miss], None), (["verify", t], None), (["verify", d], None),
                  (["list", t], None), (["list", miss], None), (["bogus"], None)],
        "train-dit": [(["--cache", miss, "--ae", ae, "--out", out], None),
                      (["--cache", cache, "--ae", t, "--out", out], None)],
        "sample": [(["--dit", miss, "--ae", ae, "--out", out + ".h5"], None),
                   (["--dit", t, "--ae", ae, "--out", out + ".h5"], None),
                   (["--dit", dit, "--ae", ae, "--cache", d, "--out", out + ".h5"], None)],
        "sample-gather": [(["--parts", miss, "--dit", dit, "--ae", ae, "--out", out + ".h5"],
                           ("seed", "sample")),
                          (["--parts", t, "--dit", dit, "--ae", ae, "--out", out + ".h5"],
                           ("seed", "sample")),
                          (["--parts", t, "--dit", t, "--ae", ae, "--out", out + ".h5"],
                           ("seed", "sample"))],
        "generate": [(["--model", miss, "--classes", "0", "--out", out + ".png"], None),
                     (["--model", t, "--classes", "0", "--out", out + ".png"], None),
                     (["--model", dit, "--classes", "x", "--out", out + ".png"], None)],
        "fid-reference": [(["--shards", miss, "--out", out + ".npz"], ev),
                          (["--shards", d, "--out", out + ".npz"], ev)],
        "fid": [(["--samples", miss, "--reference", t, "--out", out + ".txt"], ev),
                (["--samples", t, "--reference", t, "--out", out + ".txt"], ev)],
        "export-model": [(["--checkpoint", miss, "--out", out], None),
                         (["--checkpoint", t, "--out", out], None)],
        "import-ae": [(["--source", miss, "--out", out + ".pt"], ("data", "autoencoder")),
                      (["--source", t, "--out", out + ".pt"], ("data", "autoencoder"))],
        "import-dit": [(["--source", miss, "--out", out + ".pt"], ("dit",)),
                       (["--source", t, "--out", out + ".pt"], ("dit",))],
        "plan": [(["--config", miss], None), (["--config", t], None),
                 (["--config", str(ROOT / "config.yaml"), "--gpu", "abacus"], None)],
        "status": [(["--results", miss], None), (["--results", t], None)],
        "stage-figures": [(["--checkpoint", miss, "--title", "x", "--loss", out + ".png"], None),
                          (["--checkpoint", t, "--title", "x", "--loss", out + ".png"], None)],
        "sample-grids": [(["--samples", miss, "--out", out + ".png"], None),
                         (["--samples", t, "--out", out + ".png"], None)],
        "metrics-table": [(["--results", miss, "--title", "x", "--out", out + ".html"], None),
                          (["--results", d, "--title", "x", "--out", out + ".html"], None)],
        "config-page": [(["--out", d], ("seed",)), (["--out", out, "--set", "seed=-1"], None)],
    }


def test_17_every_command_has_boundary_cases(world, tmp_path):
    from dinosae.cli import COMMANDS

    assert set(_boundary(world, tmp_path)) == set(COMMANDS)


@pytest.mark.parametrize("command", sorted(__import__("dinosae.cli").cli.COMMANDS))
def test_17_bad_arguments_and_damaged_files_are_one_line_at_every_command(world, work, capsys,
                                                                          command):
    cases = _boundary(world, work)[command]
    full = {"ae-train": ("seed", "device", "data", "autoencoder", "ae_train"),
            "train-dit": ("seed", "device", "dit", "sample"),
            "sample": ("seed", "device", "sample")}
    before = tree(work)
    for args, names in cases:
        names = full.get(command, names)
        cfg = sections(world, *names) if names is not None else None
        rc, err = cli_any(capsys, command, *args, cfg=cfg)
        one_line(rc, err)
        assert tree(work, skip=work / "out") == before, (command, args)
