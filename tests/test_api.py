"""The public Python API (dinosae.load_autoencoder / load_generator) and `dinosae export-model`:
exports load back to identical outputs, and the API encodes, decodes and samples exactly as the
pipeline's own code does."""

from __future__ import annotations

import json
import subprocess
import sys
import types

import h5py
import numpy as np
import pytest
import torch
from helpers import save_dit_checkpoint, tiny_config

import dinosae
from dinosae import export, generate, importers, sphere
from dinosae.checkpoint import save_checkpoint
from dinosae.errors import ConfigError
from dinosae.latents import encode_images
from dinosae.models.autoencoder import DinoSAE, ae_config, build_autoencoder
from dinosae.models.dit import build_dit, load_dit

pytestmark = pytest.mark.usefixtures("one_thread")

NUM_CLASSES, MEAN_NORM = 3, 7.5


@pytest.fixture
def ckpts(tmp_path):
    """A tiny stage-4 AE checkpoint and a DiT checkpoint trained 'with' it (random weights, the
    DiT's made non-trivial)."""
    cfg = tiny_config(tmp_path)
    torch.manual_seed(0)
    ae = build_autoencoder(cfg)
    sd = ae.state_dict()
    ae_path = tmp_path / "ae.pt"
    save_checkpoint(ae_path, {"kind": "dinosae-ae", "stage": 4, "step": 40,
                              "config": ae_config(cfg), "model": sd, "ema": sd,
                              "optimizer": {"state": {}}})
    grid, C = list(ae.grid), ae.channels
    T = grid[0] * grid[1]
    dit = build_dit(cfg["dit"]["model"], T, C, NUM_CLASSES, grid, cfg["dit"]["head"])
    with torch.no_grad():
        for p in dit.parameters():
            p.normal_(0, 0.05)
    dit_path = tmp_path / "dit.pt"
    save_dit_checkpoint(dit_path, cfg, dit, grid, NUM_CLASSES, MEAN_NORM, ae_path, step=6)
    return cfg, ae_path, dit_path


def images(n=5, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def test_export_round_trip_gives_identical_outputs(ckpts, tmp_path):
    cfg, ae_path, dit_path = ckpts
    ae_dir = export.export_model({}, ae_path, tmp_path / "exp" / "ae")
    dit_dir = export.export_model({}, dit_path, tmp_path / "exp" / "dit")
    assert sorted(p.name for p in ae_dir.iterdir()) == ["config.json", "model.safetensors"]
    doc = json.loads((dit_dir / "config.json").read_text())
    assert doc["kind"] == "dinosae-dit" and doc["autoencoder"] == "autoencoder"
    assert doc["source"]["step"] == 6 and len(doc["source"]["sha256"]) == 64
    assert not list((tmp_path / "exp").glob(".*"))  # no temporary folder left behind

    ref = DinoSAE.load(ae_path)  # the pipeline's loader
    api = dinosae.load_autoencoder(ae_dir, device="cpu")
    assert not api.model.training and not any(p.requires_grad for p in api.model.parameters())
    x = torch.from_numpy(images()).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        z = ref.encode(x)
        assert torch.equal(api.model.encode(x), z)
        assert torch.equal(api.model.decode(z), ref.decode(z))

    model, meta = load_dit(dit_path)
    gen = dinosae.load_generator(dit_dir, device="cpu")
    assert gen.autoencoder is not None and gen.decode_radius == MEAN_NORM
    zt, t, y = torch.randn(4, 4, 64), torch.rand(4), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        assert torch.equal(gen.model(zt, t, y), model(zt, t, y))
    g = dict(steps=3, cfg_scale=1.5)
    a = gen.sample([0, 1, 2], generator=torch.Generator().manual_seed(1), **g)
    b = dinosae.load_generator(dit_path, device="cpu").sample(
        [0, 1, 2], generator=torch.Generator().manual_seed(1), **g)
    assert a.shape == (3, 3, 32, 32) and torch.equal(a, b)

    # an export goes back into the pipeline: import-ae / import-dit accept it
    out = importers.import_autoencoder(cfg, str(ae_dir), tmp_path / "re" / "ae.pt")
    sd = torch.load(out, weights_only=True)["ema"]
    assert all(torch.equal(sd[k], v) for k, v in ref.state_dict().items())
    out = importers.import_generator(cfg, str(dit_dir), tmp_path / "re" / "dit.pt")
    m2, _ = load_dit(out)
    with torch.no_grad():
        assert torch.equal(m2(zt, t, y), model(zt, t, y))
    cfg["dit"]["model"] = "S"  # the config must describe the generator it imports
    with pytest.raises(ConfigError, match=r"'dit\.model' \('S'\) differs"):
        importers.import_generator(cfg, str(dit_dir), tmp_path / "re" / "dit2.pt")


def test_api_encode_decode_equal_the_pipeline(ckpts):
    _, ae_path, _ = ckpts
    imgs = images(7)
    ref = DinoSAE.load(ae_path)
    tokens, norms = encode_images(ref, imgs, torch.device("cpu"), batch_size=4)  # the cache's
    api = dinosae.load_autoencoder(ae_path, device="cpu")
    enc = api.encode(imgs, batch_size=3)  # numpy NHWC uint8 in
    assert enc.tokens.shape == (7, 4, 64) and enc.norms.shape == (7, 4)
    torch.testing.assert_close(enc.tokens.half(), torch.from_numpy(tokens), atol=1e-3, rtol=0)
    torch.testing.assert_close(enc.norms, torch.from_numpy(norms))
    # NCHW floats on the way in give the same
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255
    torch.testing.assert_close(api.encode(x).tokens, enc.tokens)
    # decoding at s_vae is the sampler's decode (generate.py): project to the radius, decode
    z = torch.from_numpy(tokens).float()
    with torch.no_grad():
        want = ref.decode(sphere.project(z, 7.0))
    got = api.decode(z, radius=7.0, clamp=False, batch_size=2)
    torch.testing.assert_close(got, want)
    assert torch.equal(api.decode(z, radius=7.0), want.clamp(0, 1))
    # per-token norms give back the encoder output exactly
    with torch.no_grad():
        raw = ref.decode(ref.encode(x))
    torch.testing.assert_close(api.decode(enc.tokens, radius=enc.norms, clamp=False), raw,
                               atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="multiples of 16"):
        api.encode(torch.rand(1, 3, 20, 20))


def test_generator_samples_equal_the_pipeline_sampler(ckpts, tmp_path, monkeypatch):
    cfg, ae_path, dit_path = ckpts
    cfg["sample"].update(num_samples=6, batch_size=6, steps=3, cfg_scale=1.5, s_vae=None)
    attrs = {"num_classes": NUM_CLASSES, "classes": ["a", "b", "c"], "mean_norm": MEAN_NORM,
             "grid": [2, 2], "channels": 64, "complete": True}
    latents = types.ModuleType("dinosae.latents")  # the sampler reads only these attributes
    latents.open_cache = lambda path, **expect: types.SimpleNamespace(attrs=attrs)
    monkeypatch.setitem(sys.modules, "dinosae.latents", latents)
    out = tmp_path / "samples.h5"
    generate.sample_to_h5(cfg, str(dit_path), str(ae_path), "cache.zarr", str(out))
    with h5py.File(out) as f:
        want, labels, seeds = f["images"][:], f["labels"][:], f["seeds"][:]
    gen = dinosae.load_generator(dit_path, device="cpu")
    got = gen.sample(labels, steps=3, cfg_scale=1.5, seeds=seeds)
    assert np.abs(generate.to_uint8(got).astype(int) - want.astype(int)).max() <= 1
    assert generate.to_uint8(got).std() > 0


def test_dtype_and_device(ckpts):
    _, ae_path, dit_path = ckpts
    api = dinosae.load_autoencoder(ae_path, device="cpu", dtype="bfloat16")
    assert {p.dtype for p in api.model.parameters()} == {torch.bfloat16}
    enc = api.encode(images(2))
    assert enc.tokens.dtype == torch.float32
    ref = dinosae.load_autoencoder(ae_path, device="cpu").encode(images(2))
    assert (enc.tokens - ref.tokens).abs().max() < 0.05
    gen = dinosae.load_generator(dit_path, device="cpu", dtype=torch.bfloat16)
    assert {p.dtype for p in gen.model.parameters()} == {torch.bfloat16}
    x = gen.sample([0, 1], steps=2, generator=torch.Generator().manual_seed(0))
    assert x.dtype == torch.float32 and x.shape == (2, 3, 32, 32)
    if torch.cuda.is_available():
        gpu = dinosae.load_autoencoder(ae_path, device="cuda")
        assert next(gpu.model.parameters()).is_cuda
        assert gpu.encode(torch.from_numpy(images(2))).tokens.device.type == "cpu"


def test_cli_export_and_errors(ckpts, tmp_path, capsys):
    from dinosae import cli

    _, ae_path, _ = ckpts
    # export-model needs no config (the checkpoint carries it)
    assert cli.main(["export-model", "--checkpoint", str(ae_path), "--out",
                     str(tmp_path / "ae")]) == 0
    assert export.is_export(tmp_path / "ae")
    capsys.readouterr()
    for wrong, why in ((tmp_path / "ae", "already an exported model"),
                       (tmp_path / "nope.pt", "does not exist")):
        assert cli.main(["export-model", "--checkpoint", str(wrong), "--out",
                         str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and why in err
    cfg = tiny_config(tmp_path)
    bad = tmp_path / "bad.pth"
    torch.save({"decoder.project_in.main.conv.weight": torch.zeros(1)}, bad)
    sections = json.dumps({"data": cfg["data"], "autoencoder": cfg["autoencoder"]})
    assert cli.main(["import-ae", "--cfg", sections, "--source", str(bad), "--out",
                     str(tmp_path / "o.pt")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "mismatches" in err and "missing decoder.conv_in.bias" in err
    assert not (tmp_path / "o.pt").exists()


def test_import_dinosae_stays_light():
    assert dinosae.load_autoencoder is dinosae.api.load_autoencoder  # lazily imported
    code = ("import sys, dinosae, dinosae.config; assert 'torch' not in sys.modules; "
            "assert 'load_generator' in dir(dinosae)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
