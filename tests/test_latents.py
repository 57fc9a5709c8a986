"""Latent cache: scatter/gather encoding, validation, reader, HDF5 export.

Shards are written here with `tarfile` (PNG members, so pixels are exact); expected tokens come
from running the autoencoder's encoder directly on those pixels; the cache is read back with
plain zarr in a subprocess that never imports dinosae, and the export with plain h5py.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import zarr
from helpers import tiny_config, write_shards

from dinosae import latents
from dinosae.checkpoint import save_checkpoint, tensors_fingerprint
from dinosae.cli import main as cli
from dinosae.models.autoencoder import DinoSAE, ae_config, build_autoencoder

COUNTS = (5, 7, 3, 6, 4)  # images per tar: arbitrary, so part boundaries fall inside units
CLASSES = ["n01", "n02", "n03"]
SIZE = 32


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_shards(out: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """Tars (COUNTS images each) + manifest.json in the data contract's format, by hand."""
    write_shards(out, images, labels, COUNTS, classes=CLASSES)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Shards of 25 random images, a tiny AE checkpoint, and the encoder's own outputs."""
    torch.manual_seed(0)
    tmp = tmp_path_factory.mktemp("latents")
    rng = np.random.default_rng(0)
    n = sum(COUNTS)
    images = rng.integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)
    labels = rng.integers(0, len(CLASSES), n)
    _write_shards(tmp / "shards", images, labels)
    cfg = tiny_config(tmp)
    ae = build_autoencoder(cfg)
    state = ae.state_dict()
    save_checkpoint(tmp / "ae.pt", {"kind": "dinosae-ae", "stage": 4, "step": 1,
                                    "config": ae_config(cfg), "model": state, "ema": state})
    model = DinoSAE.load(tmp / "ae.pt")
    with torch.no_grad():  # the reference: one batch of all images, straight through the encoder
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
        raw = model.encode(x).double()
        raw_flip = model.encode(torch.from_numpy(images[:, :, ::-1].copy())
                                .permute(0, 3, 1, 2).float() / 255).double()
    cfg["device"] = "cpu"
    cfg["latents"].update(batch_size=3, chunk_rows=2, shard_chunks=2, compression="zstd",
                          flip=True)
    ref = {"tokens": (raw / raw.norm(dim=-1, keepdim=True)).numpy(),
           "norms": raw.norm(dim=-1).numpy(),
           "tokens_flip": (raw_flip / raw_flip.norm(dim=-1, keepdim=True)).numpy(),
           "norms_flip": raw_flip.norm(dim=-1).numpy(), "labels": labels}
    return {"tmp": tmp, "cfg": cfg, "shards": tmp / "shards", "ckpt": tmp / "ae.pt", "ref": ref,
            "n": n}


def _cfg(world, **latents_cfg):
    cfg = json.loads(json.dumps(world["cfg"]))
    cfg["latents"].update(latents_cfg)
    return cfg


def _encode(world, out: Path, parts: int, only=None, **latents_cfg) -> Path:
    cfg = _cfg(world, parts=parts, **latents_cfg)
    latents.encode_init(cfg, world["shards"], world["ckpt"], out)
    for k in range(parts) if only is None else only:
        latents.encode_part(cfg, out, world["shards"], world["ckpt"], k, parts,
                            out.parent / f"{out.name}.parts" / f"{k}.done")
    return out


@pytest.fixture(scope="module")
def cache3(world):
    """A complete cache, three parts, flipped copies."""
    out = _encode(world, world["tmp"] / "k3.zarr", 3)
    latents.encode_gather(world["cfg"], out, world["tmp"] / "k3.report.json")
    return out


PLAIN_READ = """
import json, sys
import numpy as np, zarr
g = zarr.open_group(sys.argv[1], mode="r")
np.savez(sys.argv[2], **{k: g[k][:] for k in g.array_keys()})
print(json.dumps({"attrs": g.attrs.asdict(), "dinosae": [m for m in sys.modules
                  if m.startswith("dinosae")]}))
"""


def _plain_read(path: Path, tmp: Path) -> tuple[dict, dict]:
    """Arrays and attributes of a store, read in a fresh interpreter with zarr and numpy only."""
    r = subprocess.run([sys.executable, "-c", PLAIN_READ, str(path), str(tmp / "plain.npz")],
                       capture_output=True, text=True, check=True)
    info = json.loads(r.stdout)
    assert info["dinosae"] == []
    with np.load(tmp / "plain.npz") as z:
        return {k: z[k] for k in z.files}, info["attrs"]


def test_plain_zarr_read_matches_the_encoder_in_manifest_order(world, cache3, tmp_path):
    arrays, attrs = _plain_read(cache3, tmp_path)
    ref, n = world["ref"], world["n"]
    assert arrays["tokens"].dtype == np.float16 and arrays["tokens"].shape == (n, 4, 64)
    for name in ("tokens", "tokens_flip"):
        np.testing.assert_allclose(arrays[name].astype(np.float64), ref[name], atol=1e-3, rtol=0)
        norms = np.linalg.norm(arrays[name].astype(np.float64), axis=-1)
        assert np.abs(norms - 1).max() < 1e-3
    for name in ("norms", "norms_flip"):
        np.testing.assert_allclose(arrays[name], ref[name], rtol=1e-4)
    np.testing.assert_array_equal(arrays["labels"], ref["labels"])
    # the flipped copy really is a different image (the random images are not symmetric)
    assert np.abs(arrays["tokens"].astype(float) - arrays["tokens_flip"]).max() > 0.05
    assert attrs["complete"] is True and attrs["format"] == "dinosae-latents"
    assert attrs["count"] == n and attrs["rows"] == 2 * n and attrs["flip"] is True
    assert attrs["grid"] == [2, 2] and attrs["channels"] == 64 and attrs["radius"] == 1.0
    assert attrs["image_size"] == SIZE and attrs["classes"] == CLASSES
    assert attrs["num_classes"] == 3
    assert attrs["encoder"] == {"path": str(world["ckpt"]), "sha256": _sha(world["ckpt"]),
                                "tensors": tensors_fingerprint(DinoSAE.load(world["ckpt"]))}
    manifest = world["shards"] / "manifest.json"
    assert attrs["source"]["path"] == str(manifest) and attrs["source"]["sha256"] == _sha(manifest)
    assert attrs["mean_norm"] == pytest.approx(ref["norms"].mean(), rel=1e-5)
    report = json.loads((world["tmp"] / "k3.report.json").read_text())
    assert report["complete"] and report["count"] == n
    # units of 4 rows are single zarr shards: 7 shard objects per token array, none shared
    g = zarr.open_group(cache3, mode="r")
    assert g["tokens"].shards == (4, 4, 64) and g["tokens"].chunks == (2, 4, 64)
    assert len(list((cache3 / "tokens" / "c").iterdir())) == 7


def test_regions_partition_the_units_and_follow_the_tars(world):
    manifest = json.loads((world["shards"] / "manifest.json").read_text())
    firsts = [s["first_index"] for s in manifest["shards"]]
    for parts in (1, 2, 3, 5, 8):
        regions = latents.plan_regions(manifest, 4, parts)
        units = [u for r in regions for u in range(*r["units"])]
        assert units == list(range(7))  # every unit exactly once, in order
        for r in regions:  # a region's units begin inside its own tars
            lo, hi = r["shards"]
            start = firsts[lo] if lo < len(firsts) else 25
            end = firsts[hi] if hi < len(firsts) else 25
            assert all(start <= 4 * u < end for u in range(*r["units"]))


def test_k1_and_k3_give_identical_arrays_whatever_the_codec(world, cache3, tmp_path):
    k1 = _encode(world, tmp_path / "k1.zarr", 1, compression="none")  # k3: zstd
    latents.encode_gather(world["cfg"], k1, tmp_path / "k1.json")
    a, b = zarr.open_group(k1, mode="r"), zarr.open_group(cache3, mode="r")
    for name in ("tokens", "tokens_flip", "norms", "norms_flip", "labels"):
        np.testing.assert_array_equal(a[name][:], b[name][:], err_msg=name)


def test_missing_region_is_refused_and_named(world, tmp_path):
    out = tmp_path / "c.zarr"
    cfg_json = json.dumps(_cfg(world, parts=3))
    base = ["--cfg", cfg_json]
    assert cli(["encode-init", *base, "--shards", str(world["shards"]),
                "--checkpoint", str(world["ckpt"]), "--out", str(out)]) == 0
    for k in (0, 2):  # part 1 never runs
        assert cli(["encode-part", *base, "--cache", str(out), "--shards", str(world["shards"]),
                    "--checkpoint", str(world["ckpt"]), "--index", str(k), "--parts", "3",
                    "--done", str(tmp_path / f"{k}.done")]) == 0
    mtime = out.stat().st_mtime_ns
    with pytest.raises(latents.CacheError, match=r"region 1 .* not written"):
        latents.encode_gather({}, out, tmp_path / "report.json")
    assert out.stat().st_mtime_ns == mtime  # Snakemake's date of the store is left alone
    assert not (tmp_path / "report.json").exists()
    assert zarr.open_group(out, mode="r").attrs["complete"] is False
    with pytest.raises(latents.CacheError, match="incomplete"):
        latents.open_cache(out)


@pytest.mark.parametrize("row, plant, message", [
    (21, lambda g: g["tokens"].__setitem__((21, 1, 5), np.nan), r"region 2 .*row 21 has NaN"),
    (9, lambda g: g["tokens_flip"].__setitem__(9, g["tokens_flip"][9] * 1.01),
     r"region 1 .*tokens_flip row 9: a token norm is off 1"),
    (2, lambda g: g["labels"].__setitem__(2, 3), r"region 0 .*label 3 at row 2"),
    (13, lambda g: g["norms"].__setitem__((13, 0), np.inf), r"region 1 .*norms row 13"),
])
def test_a_bad_value_fails_validation_naming_its_region(world, cache3, tmp_path, row, plant,
                                                        message):
    bad = tmp_path / "bad.zarr"
    shutil.copytree(cache3, bad)
    plant(zarr.open_group(bad, mode="r+"))  # complete is still true here
    with pytest.raises(latents.CacheError, match=message):
        latents.encode_gather({}, bad, tmp_path / "report.json")
    assert zarr.open_group(bad, mode="r").attrs["complete"] is False


def test_hdf5_export_round_trips(world, cache3, tmp_path):
    out = tmp_path / "latents.h5"
    latents.export_hdf5({}, cache3, out)
    g = zarr.open_group(cache3, mode="r")
    with h5py.File(out, "r") as f:
        assert set(f.keys()) == {"tokens", "tokens_flip", "labels", "norms", "norms_flip"}
        for name in f:
            assert f[name].dtype == g[name].dtype
            np.testing.assert_array_equal(f[name][:], g[name][:], err_msg=name)
        assert json.loads(f.attrs["attrs_json"]) == g.attrs.asdict()
        assert list(f.attrs["grid"]) == [2, 2] and f.attrs["complete"]
        assert f.attrs["encoder"] == json.dumps(g.attrs["encoder"])
    assert [p.name for p in tmp_path.iterdir()] == ["latents.h5"]  # no temporary left


def test_reader_refuses_incomplete_or_stale_and_serves_rows(world, cache3, tmp_path):
    incomplete = _encode(world, tmp_path / "inc.zarr", 2, only=[0, 1])  # not gathered
    with pytest.raises(latents.CacheError, match="incomplete"):
        latents.open_cache(incomplete)
    with pytest.raises(latents.CacheError, match="stale"):
        latents.open_cache(cache3, expect_encoder_sha="0" * 64)
    with pytest.raises(latents.CacheError, match="no latent cache"):
        latents.open_cache(tmp_path / "nothing.zarr")
    lc = latents.open_cache(cache3, expect_encoder_sha=_sha(world["ckpt"]))
    ref, n = world["ref"], world["n"]
    assert len(lc) == 2 * n and lc.attrs["flip"] is True
    for i in (0, 3, 7, n - 1, n, n + 11, 2 * n - 1, -1):
        z, y = lc[i]
        name, r = ("tokens_flip", (i % (2 * n)) - n) if i % (2 * n) >= n else ("tokens", i)
        assert z.dtype == torch.float32 and z.shape == (4, 64)
        np.testing.assert_allclose(z.numpy(), ref[name][r], atol=1e-3)
        assert y == ref["labels"][r]
    with pytest.raises(IndexError):
        lc[2 * n]


def _rows_of(z: torch.Tensor, stored: np.ndarray) -> np.ndarray:
    """Identify batch rows by the nearest stored row (tokens of random images are distinct)."""
    flat = stored.reshape(len(stored), -1)
    flat = flat / np.linalg.norm(flat, axis=1, keepdims=True)
    q = z.reshape(len(z), -1).double().numpy()
    cos = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ flat.T
    assert np.allclose(cos.max(axis=1), 1.0, atol=1e-6)
    return cos.argmax(axis=1)


def test_batches_ddp_ranks_disjoint_at_radius(world, cache3):
    lc = latents.open_cache(cache3)
    ref, n = world["ref"], world["n"]
    stored = np.concatenate([ref["tokens"], ref["tokens_flip"]])  # row r of the reader
    labels = np.concatenate([ref["labels"], ref["labels"]])
    seen, units_in_batch = [], []
    for rank in (0, 1):
        rows = []
        for z, y in lc.batches(4, seed=3, epoch=1, rank=rank, world_size=2, radius=8.0):
            assert z.shape == (4, 4, 64) and z.dtype == torch.float32 and y.dtype == torch.int64
            torch.testing.assert_close(z.norm(dim=-1), torch.full((4, 4), 8.0))
            r = _rows_of(z, stored)
            np.testing.assert_array_equal(y.numpy(), labels[r])
            rows.extend(r)
            units_in_batch.append(len({(int(i) // n, int(i) % n // 4) for i in r}))
        per_rank = (2 * n // 2) // 4 * 4  # 50 rows / 2 ranks = 25 each: 6 whole batches of 4
        assert len(rows) == per_rank
        seen.append(set(rows))
        assert len(seen[-1]) == per_rank
    assert not seen[0] & seen[1]
    assert max(units_in_batch) > 1  # rows are shuffled across the units of a window
    # deterministic per (seed, epoch); another epoch is another order
    again = [y for _, y in lc.batches(4, seed=3, epoch=1, rank=0, world_size=2)]
    other = [y for _, y in lc.batches(4, seed=3, epoch=2, rank=0, world_size=2)]
    first = [y for _, y in lc.batches(4, seed=3, epoch=1, rank=0, world_size=2)]
    assert all(torch.equal(a, b) for a, b in zip(again, first, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(other, first, strict=True))
    # contiguous, one rank, keep the last partial batch: every row in order
    zs = [z for z, _ in lc.batches(8, shuffle=False, drop_last=False, radius=1.0)]
    assert [len(z) for z in zs] == [8] * 6 + [2]
    np.testing.assert_allclose(torch.cat(zs).numpy(), stored, atol=1e-3)


def _plain_rows(cache: Path) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, labels) of reader rows 0..2N-1 by a plain zarr read: images, then flipped."""
    g = zarr.open_group(cache, mode="r")
    return (np.concatenate([g["tokens"][:], g["tokens_flip"][:]]),
            np.concatenate([g["labels"][:], g["labels"][:]]))


def test_read_rows_equals_a_plain_zarr_read(cache3):
    lc = latents.open_cache(cache3)
    stored, labels = _plain_rows(cache3)
    n, rng = len(stored), np.random.default_rng(0)
    cases = [np.arange(n), np.arange(3, 30), rng.permutation(n), rng.permutation(n)[:17],
             rng.integers(0, n, 40),  # repeats
             np.r_[np.arange(20, 30), np.arange(5, 12)],  # runs in order, across the flip boundary
             np.r_[np.arange(8, 20)[::-1], [49, 0, 24, 25]], np.array([7])]
    for rows in cases:
        tokens, y = lc.read_rows(rows)
        assert tokens.dtype == np.float16
        np.testing.assert_array_equal(tokens, stored[rows])
        np.testing.assert_array_equal(y, labels[rows])
    out = np.full((len(cases[2]), *stored.shape[1:]), np.nan, dtype=np.float16)
    assert lc.read_rows(cases[2], out=out)[0] is out
    np.testing.assert_array_equal(out, stored[cases[2]])


@pytest.mark.parametrize("raw", [True, False])
@pytest.mark.parametrize("shuffle", [True, False])
def test_batches_equal_a_plain_zarr_read_in_the_promised_order(cache3, raw, shuffle):
    """Each rank's batches are its rows of each global batch (2 ranks x 3 rows) of order() (the
    one process's order, whole global batches), each window of `window` global rows permuted
    by default_rng([seed, epoch, 0, 1]) in turn when shuffled (the same on every rank)."""
    lc = latents.open_cache(cache3)
    stored, labels = _plain_rows(cache3)
    batch, window, seed, epoch = 3, 7, 5, 2  # window: 12 rows, whole global batches of 6
    rows = lc.order(shuffle=shuffle, seed=seed, epoch=epoch)
    rows = rows[:len(rows) // 6 * 6]
    rng = np.random.default_rng([seed, epoch, 0, 1])
    everyone = np.concatenate([rng.permutation(rows[w:w + 12]) if shuffle else rows[w:w + 12]
                               for w in range(0, len(rows), 12)]).reshape(-1, 2, batch)
    for rank in (0, 1):
        want = everyone[:, rank].reshape(-1)
        got = list(lc.batches(batch, shuffle=shuffle, seed=seed, epoch=epoch, rank=rank,
                              world_size=2, radius=8.0, window=window, raw=raw))
        assert [len(y) for _, y in got] == [batch] * (len(want) // batch)
        z, y = torch.cat([z for z, _ in got]), torch.cat([y for _, y in got])
        np.testing.assert_array_equal(y.numpy(), labels[want])
        if raw:
            assert z.dtype == torch.float16
            np.testing.assert_array_equal(z.numpy(), stored[want])
        else:
            x = stored[want].astype(np.float64)
            x *= 8.0 / np.linalg.norm(x, axis=-1, keepdims=True)
            assert z.dtype == torch.float32
            np.testing.assert_allclose(z.numpy(), x, rtol=1e-6, atol=1e-6)


def test_killed_part_reruns_only_its_own_unfinished_units(world, cache3, tmp_path, monkeypatch):
    cfg = _cfg(world, parts=2)
    out = tmp_path / "r.zarr"
    latents.encode_init(cfg, world["shards"], world["ckpt"], out)
    # part 0 = tars 0-1 = images 0..11 = units 0, 1, 2 (rows 0..11); part 1 = units 3..6
    real, calls = latents.encode_images, []

    def crashing(model, images, *a, **k):
        if len(calls) == 4:  # unit 2 (two calls per unit: plain and flipped)
            raise KeyboardInterrupt("killed")
        calls.append(len(images))
        return real(model, images, *a, **k)

    monkeypatch.setattr(latents.encode, "encode_images", crashing)
    done0 = tmp_path / "0.done"
    with pytest.raises(KeyboardInterrupt):
        latents.encode_part(cfg, out, world["shards"], world["ckpt"], 0, 2, done0)
    written = zarr.open_group(out, mode="r")["written"][:]
    np.testing.assert_array_equal(written, [1, 1, 0, 0, 0, 0, 0])
    assert not done0.exists()

    calls.clear()
    monkeypatch.setattr(latents.encode, "encode_images", lambda m, im, *a, **k: (
        calls.append(len(im)), real(m, im, *a, **k))[1])
    summary = latents.encode_part(cfg, out, world["shards"], world["ckpt"], 0, 2, done0)
    assert calls == [4, 4]  # unit 2 only (rows 8..11), plain and flipped
    assert summary["encoded_units"] == 1 and json.loads(done0.read_text())["part"] == 0
    np.testing.assert_array_equal(zarr.open_group(out, mode="r")["written"][:],
                                  [1, 1, 1, 0, 0, 0, 0])  # part 1's units untouched
    calls.clear()
    latents.encode_part(cfg, out, world["shards"], world["ckpt"], 0, 2, done0)
    assert calls == []  # a finished part is not recomputed
    latents.encode_part(cfg, out, world["shards"], world["ckpt"], 1, 2, tmp_path / "1.done")
    assert calls == [4, 4, 4, 4, 4, 4, 1, 1]  # units 3, 4, 5 and the last, 1-row unit 6
    latents.encode_gather({}, out, tmp_path / "r.json")
    a, b = zarr.open_group(out, mode="r"), zarr.open_group(cache3, mode="r")
    for name in ("tokens", "tokens_flip", "norms", "labels"):
        np.testing.assert_array_equal(a[name][:], b[name][:], err_msg=name)


def test_part_refuses_another_encoder(world, cache3, tmp_path):
    other = tmp_path / "other.pt"
    ck = torch.load(world["ckpt"], weights_only=True)
    ck["step"] = 2
    save_checkpoint(other, ck)
    with pytest.raises(latents.CacheError, match="not the checkpoint"):
        latents.encode_part(world["cfg"], cache3, world["shards"], other, 0, 3,
                            tmp_path / "x.done")


@pytest.mark.parametrize("workers", [0, 3])
def test_iter_units_with_decoding_threads_gives_the_tars_samples_in_order(world, workers):
    from dinosae.data.shard import iter_shard

    manifest = json.loads((world["shards"] / "manifest.json").read_text())
    every = [s for sh in manifest["shards"] for s in iter_shard(world["shards"] / sh["name"])]
    assert [s[0] for s in every] == list(range(world["n"]))
    units = [0, 2, 3, 6]  # runs that start and stop inside tars
    got = list(latents.iter_units(world["shards"], manifest, units, 4, workers))
    assert [u for u, _, _ in got] == units
    for u, images, labels in got:
        rows = every[4 * u:4 * u + 4]
        np.testing.assert_array_equal(images, np.stack([s[1] for s in rows]))
        np.testing.assert_array_equal(labels, [s[2] for s in rows])


# ---------------------------------------------------------------- damaged caches (issue 22)

def _damaged(cache3: Path, tmp_path: Path, plant) -> Path:
    """A copy of the complete cache with damage planted after gathering (complete stays true)."""
    bad = tmp_path / "damaged.zarr"
    shutil.copytree(cache3, bad)
    plant(bad)
    assert zarr.open_group(bad, mode="r").attrs["complete"] is True
    return bad


def _one_line(rc: int, err: str, *needles: str) -> None:
    assert rc == 2 and "Traceback" not in err, err[-2000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("dinosae")]
    assert len(lines) == 1 and all(n in lines[0] for n in needles), err[-2000:]


def _nan_row(store: Path, name: str = "tokens", row: int = 9) -> None:
    zarr.open_group(store, mode="r+")[name][row] = np.nan


def test_bad_rows_finds_nan_inf_zero_and_off_norm_rows():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 4, 64))
    x = (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float16)
    assert len(latents.checks.bad_rows(x)) == 0  # fp16 rounding of unit vectors passes
    x[3, 2, 7], x[17, 0, 0], x[33] = np.nan, np.inf, 0
    x[21, 1] *= np.float16(1.01)  # one token 1 % long
    x[25, 3] *= np.float16(1.0004)  # within NORM_TOL: not damage
    np.testing.assert_array_equal(latents.checks.bad_rows(x, block=16), [3, 17, 21, 33])


def test_deleted_chunk_stops_open_export_and_training(world, cache3, tmp_path, capsys):
    bad = _damaged(cache3, tmp_path, lambda s: (s / "tokens" / "c" / "1" / "0" / "0").unlink())
    assert np.isnan(zarr.open_group(bad, mode="r")["tokens"][4:8]).all()  # what plain zarr sees
    with pytest.raises(latents.CacheError, match=r"tokens/c/1/0/0 is missing \(rows 4\.\.7"):
        latents.open_cache(bad)
    out = tmp_path / "x.h5"
    capsys.readouterr()
    _one_line(cli(["export-latents", "--cache", str(bad), "--out", str(out), "--cfg", "{}"]),
              capsys.readouterr().err, str(bad), "rows 4..7")
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["damaged.zarr"]
    rc = cli(["train-dit", "--cache", str(bad), "--ae", str(world["ckpt"]), "--out",
              str(tmp_path / "dit"), "--cfg", json.dumps(world["cfg"])])
    _one_line(rc, capsys.readouterr().err, "rows 4..7")


@pytest.mark.parametrize("name, row, reader_row", [("tokens", 9, 9), ("tokens_flip", 2, 27)])
def test_nan_row_stops_every_read_naming_store_and_row(world, cache3, tmp_path, capsys, name, row,
                                                       reader_row):
    bad = _damaged(cache3, tmp_path, lambda s: _nan_row(s, name, row))
    lc = latents.open_cache(bad)  # chunk files and attributes are intact
    message = rf"{bad}: {name} row {row} \(1 in all\) are not finite unit vectors"
    with pytest.raises(latents.CacheError, match=message):
        lc[reader_row]
    lc[reader_row + 2]  # another chunk reads
    with pytest.raises(latents.CacheError, match=message):
        lc.read_rows(np.array([0, reader_row, 30, 5]))
    lc.read_rows(np.array([0, reader_row + 2, 30]))
    for raw in (True, False):
        with pytest.raises(latents.CacheError, match=message):
            list(lc.batches(4, raw=raw, seed=1))
    lc.check = False  # what the check costs is measured against this (bench/latents.py)
    assert np.isnan(lc.read_rows(np.array([reader_row]))[0]).all()
    out = tmp_path / "x.h5"
    capsys.readouterr()
    _one_line(cli(["export-latents", "--cache", str(bad), "--out", str(out), "--cfg", "{}"]),
              capsys.readouterr().err, f"{name} row {row}")
    assert not out.exists()


def test_all_zero_cache_does_not_train(world, cache3, tmp_path, capsys):
    def zero(store: Path) -> None:
        g = zarr.open_group(store, mode="r+")
        for name in ("tokens", "tokens_flip"):
            g[name][:] = 0

    bad = _damaged(cache3, tmp_path, zero)
    out = tmp_path / "dit"
    capsys.readouterr()
    rc = cli(["train-dit", "--cache", str(bad), "--ae", str(world["ckpt"]), "--out", str(out),
              "--cfg", json.dumps(world["cfg"])])
    _one_line(rc, capsys.readouterr().err, str(bad), "are not finite unit vectors")
    assert not (out / "checkpoint.pt").exists()


# ---------------------------------------------------------------- any training code (issue 26)

@pytest.mark.parametrize("flip", [True, False])
def test_latent_dataset_with_distributed_sampler_serves_every_row_once(cache3, flip):
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler

    stored, labels = _plain_rows(cache3)  # rows 0..N-1 images, N..2N-1 flipped
    n = len(stored) // 2
    if not flip:
        stored, labels = stored[:n], labels[:n]
    ds = latents.LatentDataset(cache3, flip=flip, radius=8.0)
    assert len(ds) == len(stored) and (ds.tokens, ds.channels, ds.num_classes) == (4, 64, 3)
    seen = []
    for rank in (0, 1):
        sampler = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=4)
        sampler.set_epoch(1)
        for z, y in DataLoader(ds, batch_size=4, sampler=sampler):
            assert z.dtype == torch.float32 and y.dtype == torch.int64
            r = _rows_of(z, stored.astype(np.float64))
            want = stored[r].astype(np.float64)
            np.testing.assert_allclose(z.numpy(), 8.0 * want / np.linalg.norm(
                want, axis=-1, keepdims=True), rtol=1e-5, atol=1e-5)
            np.testing.assert_array_equal(y.numpy(), labels[r])
            seen.extend(r.tolist())
    # the two ranks split every row, once (an odd count: the sampler repeats one to even out)
    assert set(seen) == set(range(len(ds))) and len(seen) == len(ds) + len(ds) % 2
    z, y = ds[len(ds) - 1]  # indexing: the last item is the last row (flipped when flip)
    np.testing.assert_allclose(z.numpy() / 8.0, stored[-1], atol=1e-3)
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_latent_dataset_pickles_without_the_store_and_reopens(cache3):
    import pickle

    ds = latents.LatentDataset(cache3)
    again = pickle.loads(pickle.dumps(ds))  # what a spawned DataLoader worker receives
    assert again._cache is None
    torch.testing.assert_close(again[5][0], ds[5][0])


def test_example_trains_a_flow_model_on_the_cache(cache3, tmp_path):
    script = Path(__file__).resolve().parents[1] / "examples" / "train_flow_on_cache.py"
    out = tmp_path / "flow.pt"
    r = subprocess.run([sys.executable, str(script), str(cache3), "--steps", "12",
                        "--batch-size", "8", "--workers", "1", "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    losses = [float(ln.split()[-1]) for ln in r.stdout.splitlines() if ln.startswith("step ")]
    assert len(losses) == 3 and all(np.isfinite(losses))  # steps 0, 10, 11
    assert "50 items of 4x64 tokens, 3 classes" in r.stdout
    state = torch.load(out, weights_only=True)
    assert state["out.weight"].shape == (64, 128)
    assert all(torch.isfinite(v).all() for v in state.values())
