"""Store dtypes (latents.dtype: float16 | bfloat16 | int8; dinosae/latents/store.py).

The encoder's own tokens (float64, one batch) are the truth; each store is read with plain zarr
and compared with an independent numpy quantization of those tokens (bfloat16: integer
rounding of the float32 bits; int8: absmax scale per token), and every reader (rows, fast
batches, LatentDataset, the HDF5 export) is compared with an independent numpy dequantization
of the stored values. The stated error: a served token is within asin(bound) of the encoder's
direction, bound = 2^-8 (bfloat16's rounding) or ½·s·√C (int8, s its scale), plus float16's
rounding of what is served."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import zarr
from helpers import tiny_config, write_shards

from dinosae import latents
from dinosae.checkpoint import save_checkpoint, tensors_fingerprint
from dinosae.cli import main
from dinosae.files import sha256_file
from dinosae.latents import shared
from dinosae.latents.store import bytes_per_image
from dinosae.models.autoencoder import DinoSAE, ae_config, build_autoencoder

SIZE, N = 32, 10


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dtype")
    cfg = tiny_config(tmp)
    cfg["device"] = "cpu"
    cfg["latents"].update(parts=2, flip=True, chunk_rows=2, shard_chunks=2, batch_size=3,
                          compression="none")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (N, SIZE, SIZE, 3), dtype=np.uint8)
    write_shards(tmp / "shards", images, np.arange(N) % 3, (6, 4))
    torch.manual_seed(0)
    sd = build_autoencoder(cfg).state_dict()
    save_checkpoint(tmp / "ae.pt", {"kind": "dinosae-ae", "stage": 4, "step": 1,
                                    "config": ae_config(cfg), "model": sd, "ema": sd})
    model = DinoSAE.load(tmp / "ae.pt")
    ref = {}
    with torch.no_grad():
        for name, im in (("tokens", images), ("tokens_flip", images[:, :, ::-1].copy())):
            raw = model.encode(torch.from_numpy(im).permute(0, 3, 1, 2).float() / 255).double()
            ref[name] = (raw / raw.norm(dim=-1, keepdim=True)).numpy()
    stores = {}
    for dtype in ("float16", "bfloat16", "int8"):
        out = tmp / f"{dtype}.zarr"
        c = json.loads(json.dumps(cfg))
        c["latents"]["dtype"] = dtype
        latents.encode_init(c, tmp / "shards", tmp / "ae.pt", out)
        for k in range(2):
            latents.encode_part(c, out, tmp / "shards", tmp / "ae.pt", k, 2, tmp / f"{dtype}{k}")
        latents.encode_gather(c, out, tmp / f"{dtype}.json")
        stores[dtype] = out
    return {"tmp": tmp, "cfg": cfg, "ref": ref, "stores": stores}


def np_quantize(z: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Independent of store.quantize: numpy only, bfloat16 by integer rounding of the bits."""
    z = z.astype(np.float32)
    if dtype == "bfloat16":
        u = z.view(np.uint32).astype(np.uint64)
        return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16), None
    s = (np.abs(z).max(-1) / 127).astype(np.float16)
    return np.clip(np.round(z / s[..., None].astype(np.float32)), -127, 127).astype(np.int8), s


def np_dequantize(values: np.ndarray, scales: np.ndarray | None, dtype: str) -> np.ndarray:
    """Stored values -> float64 unit tokens, numpy only."""
    if dtype == "float16":
        return values.astype(np.float64)
    if dtype == "bfloat16":
        z = (values.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    else:
        z = values.astype(np.float64) * scales[..., None].astype(np.float64)
    return z / np.linalg.norm(z, axis=-1, keepdims=True)


def _angle(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    return np.arccos(np.clip(cos, -1, 1))


@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_store_round_trips_within_the_stated_error(world, dtype):
    g = zarr.open_group(world["stores"][dtype], mode="r")  # plain zarr
    assert g.attrs["dtype"] == dtype and g["tokens"].dtype == {"bfloat16": np.uint16,
                                                               "int8": np.int8}[dtype]
    served = []
    for name in ("tokens", "tokens_flip"):
        ref = world["ref"][name]
        stored = g[name][:]
        scales = g[name.replace("tokens", "scales")][:] if dtype == "int8" else None
        want, want_s = np_quantize(ref, dtype)
        # the store holds the quantization of the encoder's tokens (batched float32 encoding:
        # a value on a rounding boundary may land one step away)
        diff = np.abs(stored.astype(np.int64) - want.astype(np.int64))
        assert diff.max() <= 1 and (diff == 0).mean() > 0.99, name
        if dtype == "int8":
            np.testing.assert_allclose(scales, want_s, rtol=1e-3)
            assert (np.abs(stored).max(-1) == 127).all()  # absmax scaling
            bound = 0.5 * scales.astype(np.float64) * np.sqrt(stored.shape[-1])
        else:
            bound = np.full(stored.shape[:2], 2.0 ** -8)
        back = np_dequantize(stored, scales, dtype)
        assert (_angle(back, ref) <= np.arcsin(bound) + 1e-6).all(), name
        served.append(back)
    served = np.concatenate(served)  # reader row N + i: image i flipped
    lc = latents.open_cache(world["stores"][dtype])
    assert lc.dtype == dtype and len(lc) == 2 * N
    tokens, labels = lc.read_rows(np.array([3, 17, 0, 12, 19, 5]))
    assert tokens.dtype == np.float16
    np.testing.assert_allclose(tokens, served[[3, 17, 0, 12, 19, 5]], atol=1e-3, rtol=0)
    np.testing.assert_array_equal(labels, np.array([3, 7, 0, 2, 9, 5]) % 3)
    assert np.abs(np.linalg.norm(tokens.astype(np.float64), axis=-1) - 1).max() < 1e-3
    np.testing.assert_allclose(lc[13][0].numpy(), served[13], atol=1e-3, rtol=0)
    got = np.zeros_like(served)
    for raw in (True, False):
        for z, _ in lc.batches(4, shuffle=False, raw=raw, radius=1.0, drop_last=False):
            assert z.dtype == (torch.float16 if raw else torch.float32)
            got[:len(z)] = z.numpy()
            got = np.roll(got, -len(z), axis=0)
        np.testing.assert_allclose(got, served, atol=1e-3, rtol=0)
    ds = latents.LatentDataset(world["stores"][dtype], radius=4.0)
    np.testing.assert_allclose(ds[N + 2][0].numpy(), 4 * served[N + 2], atol=5e-3, rtol=0)
    out = latents.export_hdf5({}, world["stores"][dtype], world["tmp"] / f"{dtype}.h5")
    with h5py.File(out, "r") as f:
        assert f["tokens"].dtype == np.float16 and "scales" not in f
        assert f.attrs["dtype"] == "float16" and f.attrs["store_dtype"] == dtype
        np.testing.assert_allclose(f["tokens_flip"][:], served[N:], atol=1e-3, rtol=0)


def test_int8_halves_the_disk_and_bytes_per_image_counts_it(world):
    """bytes_per_image (dinosae plan's cache size) against the arrays' own sizes."""
    T, C = world["ref"]["tokens"].shape[1:]
    for dtype, store in world["stores"].items():
        g = zarr.open_group(store, mode="r")
        have = sum(g[k].nbytes for k in g.array_keys() if k != "written") / N
        assert bytes_per_image(T, C, dtype, flip=True) == have, dtype
    assert bytes_per_image(T, C, None, True) == bytes_per_image(T, C, "float16", True)
    assert bytes_per_image(256, 1024, "int8") / bytes_per_image(256, 1024, "float16") < 0.51


def test_a_float16_store_without_the_attribute_still_reads(world, tmp_path):
    old = tmp_path / "old.zarr"  # a store made before dtypes: no attribute
    shutil.copytree(world["stores"]["float16"], old)
    doc = json.loads((old / "zarr.json").read_text())
    del doc["attributes"]["dtype"]
    (old / "zarr.json").write_text(json.dumps(doc))
    lc = latents.open_cache(old)
    assert lc.dtype == "float16"
    plain = zarr.open_group(old, mode="r")["tokens"][:]
    np.testing.assert_array_equal(lc.read_rows(np.arange(N))[0], plain)
    assert main(["cache", "verify", str(old)]) == 0


def _set_attr(store: Path, **changes) -> None:
    doc = json.loads((store / "zarr.json").read_text())
    doc["attributes"].update(changes)
    (store / "zarr.json").write_text(json.dumps(doc))


@pytest.mark.parametrize("dtype, plant, needle", [
    ("int8", lambda s: _set_attr(s, dtype="float16"), "attribute 'dtype' is float16, but array"),
    ("int8", lambda s: _set_attr(s, dtype="bfloat16"), "attribute 'dtype' is bfloat16"),
    ("bfloat16", lambda s: _set_attr(s, dtype="int8"), "attribute 'dtype' is int8"),
    ("float16", lambda s: _set_attr(s, dtype="int8"), "attribute 'dtype' is int8"),
    ("float16", lambda s: _set_attr(s, dtype="float8"), "attribute 'dtype' is 'float8'"),
    ("int8", lambda s: zarr.open_group(s, mode="r+")["scales"].__setitem__((7, 1), np.nan),
     "tokens rows [7]: not finite unit vectors"),
    ("int8", lambda s: zarr.open_group(s, mode="r+")["scales_flip"].__setitem__(
        (2, 0), zarr.open_group(s)["scales_flip"][2, 0] * 1.5), "tokens_flip rows [2]"),
    ("bfloat16", lambda s: zarr.open_group(s, mode="r+")["tokens"].__setitem__(
        (4, 2), (zarr.open_group(s)["tokens"][4, 2].astype(np.uint32) + 0x80).astype(np.uint16)),
     "tokens rows [4]"),  # every value of a token doubled (exponent + 1)
])
def test_verify_flags_a_lying_dtype_and_damaged_values(world, tmp_path, capsys, dtype, plant,
                                                       needle):
    bad = tmp_path / "bad.zarr"
    shutil.copytree(world["stores"][dtype], bad)
    assert main(["cache", "verify", str(bad)]) == 0  # the copy is healthy
    plant(bad)
    capsys.readouterr()
    assert main(["cache", "verify", str(bad)]) == 2
    out = capsys.readouterr()
    assert needle in out.out, out.out + out.err
    if "rows [7]" in needle:  # a NaN also stops the reader, naming the row (an off norm
        with pytest.raises(latents.CacheError, match="tokens row 7 "):  # it projects away)
            latents.open_cache(bad).read_rows(np.arange(2 * N))
    elif "rows" not in needle:
        with pytest.raises(latents.CacheError, match="attribute 'dtype'"):
            latents.open_cache(bad)


def _old_identity(tensors: str, manifest_sha: str, lcfg: dict) -> str:
    """The identity as computed before dtypes existed (no dtype setting anywhere: None)."""
    keys = ("flip", "batch_size", "compression", "chunk_rows", "shard_chunks", "dtype")
    doc = {"format": "dinosae-latents", "version": 1, "encoder_tensors": tensors,
           "manifest_sha256": manifest_sha, "latents": {k: lcfg.get(k) for k in keys}}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def test_dtype_makes_another_identity_and_float16_keeps_the_old_one(world):
    tmp = world["tmp"]
    tensors = tensors_fingerprint(DinoSAE.load(tmp / "ae.pt"))
    manifest = sha256_file(tmp / "shards" / "manifest.json")
    lcfg = {k: v for k, v in world["cfg"]["latents"].items() if k != "dtype"}
    old = _old_identity(tensors, manifest, lcfg)
    ids = {d: shared.identity(tensors, manifest, {**lcfg, "dtype": d})
           for d in ("float16", "bfloat16", "int8")}
    assert ids["float16"] == old == shared.identity(tensors, manifest, lcfg)
    assert len({old, ids["bfloat16"], ids["int8"]}) == 3
    for dtype, store in world["stores"].items():  # what encode_init recorded
        assert zarr.open_group(store, mode="r").attrs["identity"] == ids[dtype]

