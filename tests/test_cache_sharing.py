"""Caches shared by content (dinosae/latents/shared.py) and `dinosae cache list | verify | path`.

Identities are compared across independently made inputs (the same weights re-saved in another
file, another autoencoder, another setting); publishing is checked on the file system (one
store in the root, links in the experiments), also for two processes publishing at once; verify
is run on caches damaged by hand (a deleted chunk file, a NaN row, a lying attribute, a flipped
byte)."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import zarr
from helpers import tiny_config, write_shards

from dinosae import latents
from dinosae.checkpoint import save_checkpoint
from dinosae.cli import main
from dinosae.latents import shared
from dinosae.models.autoencoder import ae_config, build_autoencoder

SIZE = 32


def _ae(path: Path, cfg: dict, seed: int, step: int = 1) -> Path:
    torch.manual_seed(seed)
    sd = build_autoencoder(cfg).state_dict()
    save_checkpoint(path, {"kind": "dinosae-ae", "stage": 4, "step": step,
                           "config": ae_config(cfg), "model": sd, "ema": sd})
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sharing")
    cfg = tiny_config(tmp)
    cfg["device"] = "cpu"
    cfg["latents"].update(parts=1, flip=False, chunk_rows=2, shard_chunks=2, batch_size=4)
    rng = np.random.default_rng(0)
    write_shards(tmp / "shards", rng.integers(0, 256, (10, SIZE, SIZE, 3), dtype=np.uint8),
                 np.arange(10) % 3, (6, 4))
    ae = _ae(tmp / "ae.pt", cfg, 0)
    # the same tensors in another file (another step recorded): what an import makes
    ck = torch.load(ae, weights_only=True)
    ck["step"], ck["imported"] = 7, {"source": "elsewhere"}
    save_checkpoint(tmp / "ae_copy.pt", ck)
    _ae(tmp / "ae_other.pt", cfg, 1)
    return {"tmp": tmp, "cfg": cfg, "shards": tmp / "shards", "ae": ae,
            "ae_copy": tmp / "ae_copy.pt", "ae_other": tmp / "ae_other.pt"}


def build(world, out: Path, ae: Path | None = None, root: Path | None = None, **lcfg) -> dict:
    cfg = json.loads(json.dumps(world["cfg"]))
    cfg["latents"].update(lcfg, root=str(root) if root else None)
    ae = ae or world["ae"]
    latents.encode_init(cfg, world["shards"], ae, out)
    latents.encode_part(cfg, out, world["shards"], ae, 0, 1, out.with_name(out.name + ".done"))
    return latents.encode_gather(cfg, out, out.with_name(out.name + ".report.json"))


def test_identity_follows_the_tensors_manifest_and_settings(world):
    manifest, lcfg = world["shards"] / "manifest.json", world["cfg"]["latents"]
    base = shared.identity_for(world["ae"], manifest, lcfg)
    assert world["ae"].read_bytes() != world["ae_copy"].read_bytes()
    assert shared.identity_for(world["ae_copy"], manifest, lcfg) == base  # same weights
    assert shared.identity_for(world["ae_other"], manifest, lcfg) != base
    assert shared.identity_for(world["ae"], manifest, {**lcfg, "parts": 5}) == base
    for key, value in (("flip", True), ("compression", "zstd"), ("chunk_rows", 1)):
        assert shared.identity_for(world["ae"], manifest, {**lcfg, key: value}) != base, key
    other = world["tmp"] / "shards2"
    shutil.copytree(world["shards"], other)
    m = json.loads((other / "manifest.json").read_text())
    assert shared.identity_for(world["ae"], other / "manifest.json", lcfg) == base  # a copy
    m["classes"] = list(reversed(m["classes"]))
    (other / "manifest.json").write_text(json.dumps(m))
    assert shared.identity_for(world["ae"], other / "manifest.json", lcfg) != base


def test_publish_moves_into_the_root_and_a_second_build_links_to_it(world, tmp_path):
    root = tmp_path / "root"
    exp1, exp2 = tmp_path / "exp1" / "train.zarr", tmp_path / "exp2" / "train.zarr"
    exp1.parent.mkdir()
    exp2.parent.mkdir()
    r1 = build(world, exp1, root=root)
    ident = zarr.open_group(exp1, mode="r").attrs["identity"]
    store = root / f"{ident[:24]}.zarr"
    assert r1["shared"] == str(store) and r1["identity"] == ident
    assert exp1.is_symlink() and exp1.resolve() == store.resolve()
    assert shared.find(root, ident) == store
    assert shared.find_for({**world["cfg"]["latents"], "root": str(root)}, world["ae_copy"],
                           world["shards"] / "manifest.json") == store
    # a second experiment that built the same cache: its copy is dropped, one store remains
    r2 = build(world, exp2, ae=world["ae_copy"], root=root)
    assert r2["shared"] == str(store) and exp2.is_symlink()
    assert sorted(p.name for p in root.iterdir()) == [store.name, f"{store.name}.used"]
    # the second experiment reads it with its own (imported) checkpoint; another AE is refused
    lc = latents.open_cache(exp2, expect_encoder=world["ae_copy"])
    assert len(lc) == 10
    with pytest.raises(latents.CacheError, match="stale"):
        latents.open_cache(store, expect_encoder=world["ae_other"])
    # another autoencoder makes another cache beside it
    exp3 = tmp_path / "exp3.zarr"
    build(world, exp3, ae=world["ae_other"], root=root)
    assert len(list(root.glob("*.zarr"))) == 2 and exp3.resolve() != store.resolve()


def _publish_in_process(args):
    world_cfg, shards, ae, out, root = args
    torch.set_num_threads(1)
    build({"cfg": world_cfg, "shards": Path(shards), "ae": Path(ae)}, Path(out), root=Path(root))
    return str(Path(out).resolve())


def test_two_concurrent_first_builds_make_one_cache(world, tmp_path):
    root = tmp_path / "root"
    outs = [tmp_path / f"e{i}" / "train.zarr" for i in (0, 1)]
    for o in outs:
        o.parent.mkdir()
    ctx = multiprocessing.get_context("fork")  # two processes: the lock is per process
    with ctx.Pool(2) as pool:
        got = pool.map(_publish_in_process, [(world["cfg"], str(world["shards"]),
                                              str(world["ae"]), str(o), str(root))
                                             for o in outs])
    stores = list(root.glob("*.zarr"))
    assert len(stores) == 1 and got == [str(stores[0].resolve())] * 2
    assert all(o.is_symlink() for o in outs)
    assert latents.open_cache(outs[1]).attrs["complete"] is True
    assert not list(root.glob(".*tmp*"))


def _build_timed(args):
    """encode_init, (after `delay` s) encode_part, encode_gather; their end times and summary."""
    import time

    world_cfg, shards, ae, out, root, delay = args
    torch.set_num_threads(1)
    cfg = json.loads(json.dumps(world_cfg))
    cfg["latents"]["root"] = root
    latents.encode_init(cfg, shards, ae, out)
    t_init = time.time()
    time.sleep(delay)  # the first builder is slow: the second must wait, not build
    part = latents.encode_part(cfg, out, shards, ae, 0, 1, out + ".done")
    latents.encode_gather(cfg, out, out + ".report.json")
    return {"init": t_init, "end": time.time(), "encoded": part["encoded_units"]}


def test_a_second_concurrent_build_waits_and_encodes_nothing(world, tmp_path):
    import time

    root = tmp_path / "root"
    outs = [tmp_path / f"e{i}" / "train.zarr" for i in (0, 1)]
    for o in outs:
        o.parent.mkdir()
    args = [(world["cfg"], str(world["shards"]), str(world["ae"]), str(o), str(root), d)
            for o, d in zip(outs, (3.0, 0.0), strict=True)]
    ctx = multiprocessing.get_context("fork")  # two processes: the lock is per process
    with ctx.Pool(2) as pool:
        first = pool.apply_async(_build_timed, (args[0],))
        while not list(root.glob("*.building")):  # the first has claimed the build
            time.sleep(0.05)
        second = pool.apply_async(_build_timed, (args[1],))
        a, b = first.get(timeout=300), second.get(timeout=300)
    assert a["encoded"] > 0 and b["encoded"] == 0  # only the first encoded
    assert b["init"] >= a["end"] - 1.0  # the second's init returned once the first had finished
    stores = list(root.glob("*.zarr"))
    assert len(stores) == 1 and all(o.resolve() == stores[0].resolve() for o in outs)
    assert not list(root.glob("*.building"))  # released by the publisher
    assert latents.open_cache(outs[1]).attrs["complete"] is True


def test_an_abandoned_claim_is_taken_over(world, tmp_path):
    root, ident = tmp_path / "root", "ab" * 32
    claim = shared.claim_path(root, ident)
    root.mkdir()
    claim.write_text(json.dumps({"owner": "/elsewhere/train.zarr"}))
    mine = tmp_path / "train.zarr"  # (a fresh foreign claim makes it wait: the test above)
    os.utime(claim, (0, 0))  # not renewed since 1970
    assert shared.claim_or_wait(root, ident, mine, stale_s=3600) is None
    assert json.loads(claim.read_text())["owner"] == str(mine)
    beat = shared.heartbeat(root, ident, mine, every_s=0)
    os.utime(claim, (0, 0))
    beat()
    assert claim.stat().st_mtime > 1e9  # renewed by its owner
    shared.release(root, ident, tmp_path / "other.zarr")
    assert claim.exists()  # not someone else's to drop
    shared.release(root, ident, mine)
    assert not claim.exists()


# ---------------------------------------------------------------- dinosae cache ...

def cache(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(["cache", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture(scope="module")
def healthy(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("healthy") / "c.zarr"
    build(world, out)
    return out


def damaged(healthy: Path, tmp_path: Path, plant) -> Path:
    bad = tmp_path / "bad.zarr"
    shutil.copytree(healthy, bad)
    plant(bad)
    return bad


def _edit_attrs(store: Path, **changes) -> None:
    doc = json.loads((store / "zarr.json").read_text())
    doc["attributes"].update(changes)
    (store / "zarr.json").write_text(json.dumps(doc))


def _flip_byte(store: Path) -> None:
    f = store / "tokens" / "c" / "1" / "0" / "0"
    raw = bytearray(f.read_bytes())
    raw[10] ^= 0xFF  # inside the first inner chunk's compressed bytes
    f.write_bytes(bytes(raw))


def test_verify_passes_a_healthy_cache(healthy, capsys):
    rc, out, err = cache(capsys, "verify", str(healthy))
    assert rc == 0 and f"{healthy}: ok" in out and "crc32c of every chunk" in out, out + err


@pytest.mark.parametrize("plant, needle", [
    (lambda s: (s / "tokens" / "c" / "1" / "0" / "0").unlink(),
     "chunk file tokens/c/1/0/0 is missing (rows 4..7)"),
    (lambda s: zarr.open_group(s, mode="r+")["tokens"].__setitem__(9, np.nan),
     "tokens rows [9]: not finite unit vectors"),
    (lambda s: zarr.open_group(s, mode="r+")["norms"].__setitem__((2, 1), -1.0),
     "norms rows [2]: not finite and positive"),
    (lambda s: _edit_attrs(s, count=9, rows=9), "attribute 'count'"),
    (lambda s: _edit_attrs(s, mean_norm=3.5), "attribute 'mean_norm'"),
    (_flip_byte, "tokens rows 4..7: unreadable chunk (Stored and computed checksum"),
])
def test_verify_reports_damage_and_exits_2(healthy, tmp_path, capsys, plant, needle):
    bad = damaged(healthy, tmp_path, plant)
    rc, out, err = cache(capsys, "verify", str(bad))
    assert rc == 2 and "Traceback" not in err
    assert needle in out, out
    lines = [ln for ln in err.splitlines() if ln.startswith("dinosae")]
    assert len(lines) == 1 and str(bad) in lines[0] and "damaged" in lines[0], err


def test_list_and_path(world, tmp_path, capsys, monkeypatch):
    root = tmp_path / "root"
    exp = tmp_path / "exp"
    (exp / "results" / "ae" / "stage4").mkdir(parents=True)
    shutil.copy(world["ae_copy"], exp / "results" / "ae" / "stage4" / "checkpoint.pt")
    cfg = json.loads(json.dumps(world["cfg"]))
    cfg["data"]["shards"] = str(tmp_path / "shards")
    shutil.copytree(world["shards"], tmp_path / "shards" / "train")
    cfg["latents"]["root"] = str(root)
    (exp / "config.yaml").write_text(yaml.safe_dump(cfg))
    monkeypatch.chdir(exp)
    rc, out, _ = cache(capsys, "path", "--config", "config.yaml")
    ident = shared.identity_for(world["ae"], world["shards"] / "manifest.json", cfg["latents"])
    assert rc == 0 and out.strip() == f"{root / ident[:24]}.zarr (not built yet)"
    build(world, tmp_path / "first.zarr", root=root)
    rc, out, _ = cache(capsys, "path", "--config", "config.yaml")
    assert rc == 0 and out.strip() == f"{root / ident[:24]}.zarr"
    rc, out, _ = cache(capsys, "list", "--config", "config.yaml")
    row = out.splitlines()[1].split()
    assert rc == 0 and row[:5] == [ident[:16], "true", "train", "10", "float16"], out
    assert "1 cache(s)" in out and str(world["ae"]) in out


# ---------------------------------------------------------------- the workflow (integration)

def _dry_jobs(cwd: Path, *args: str) -> set[str]:
    import re

    from helpers import run_snakemake

    r = run_snakemake(cwd, "-n", *args)
    if "Job stats:" not in r.stdout:
        return set()
    table = r.stdout.split("Job stats:")[1]
    return {m.group(1) for m in re.finditer(r"^(\w+)\s+\d+$", table, re.M)} - {"total"}


@pytest.mark.integration
def test_second_experiment_uses_the_shared_cache_without_encoding(pipeline_run, tmp_path):
    """The session's pipeline run made a cache; published to a root, a second experiment in
    another folder with the same autoencoder (imported from the first's checkpoint) and shards
    plans no encode job and runs to gfid.txt on the shared cache, read-only."""
    from helpers import run_snakemake, workflow_copy

    root = tmp_path / "root"
    shutil.copytree(pipeline_run / "results/latents/train.zarr", tmp_path / "copy.zarr")
    store = shared.publish(tmp_path / "copy.zarr", root)
    before = {p: p.stat().st_mtime_ns for p in store.rglob("*")}
    cfg = tiny_config()
    cfg["data"].update(root=str(pipeline_run / cfg["data"]["root"]),
                       shards=str(pipeline_run / cfg["data"]["shards"]))
    cfg["autoencoder"]["pretrained"] = str(pipeline_run / "results/ae/stage4/checkpoint.pt")
    cfg["latents"]["root"] = str(root)
    exp = workflow_copy(tmp_path / "exp2", cfg)
    jobs = _dry_jobs(exp, "results/gfid.txt")
    assert {"import_autoencoder", "train_dit", "sample", "fid"} <= jobs, jobs
    assert not jobs & {"encode_init", "encode_part", "encode", "shard", "mini_dataset"}, jobs
    run_snakemake(exp, "results/gfid.txt")
    assert (exp / "results/gfid.txt").is_file() and not (exp / "results/latents").exists()
    dit = torch.load(exp / "results/dit/checkpoint.pt", weights_only=True)
    assert dit.get("cache") == str(store) or \
        str(store) in (exp / "results/logs/train_dit.log").read_text()
    assert {p: p.stat().st_mtime_ns for p in store.rglob("*")} == before  # read-only
    # another autoencoder: the identity differs, so this experiment would encode its own
    cfg["autoencoder"]["pretrained"] = str(pipeline_run / "results/ae/stage3/checkpoint.pt")
    (exp / "config.yaml").write_text(yaml.safe_dump(cfg))
    (exp / "results/ae/stage4/checkpoint.pt").unlink()
    assert {"encode_init", "encode_part", "encode"} <= _dry_jobs(exp, "results/gfid.txt")


@pytest.mark.integration
def test_example_trains_on_the_default_pipeline_cache(pipeline_run, tmp_path):
    """examples/train_flow_on_cache.py on the cache the session's (default, tiny) run made."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "examples" / "train_flow_on_cache.py"
    r = subprocess.run([sys.executable, str(script),
                        str(pipeline_run / "results/latents/train.zarr"), "--steps", "5",
                        "--batch-size", "8", "--workers", "0", "--out", str(tmp_path / "f.pt")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    losses = [float(ln.split()[-1]) for ln in r.stdout.splitlines() if ln.startswith("step ")]
    assert len(losses) == 2 and all(np.isfinite(losses)), r.stdout  # steps 0 and 4
