"""Sampling to HDF5: readable with plain h5py, class balanced, each sample a function of its own
seed (checked against a direct rfm.sample + decode), resumable after a kill with the same bytes
as an uninterrupted run, optional ADM npz export."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from helpers import kill_sampler_at, stub_latent_cache, tiny_config, write_generator
from PIL import Image

from dinosae import generate, rfm, sphere
from dinosae.errors import ConfigError
from dinosae.models.autoencoder import DinoSAE
from dinosae.models.dit import load_dit

NUM_CLASSES = 3
MEAN_NORM = 7.5


@pytest.fixture
def setup(tmp_path, monkeypatch):
    """Tiny AE and DiT checkpoints written per the contracts, and a latent cache."""
    cfg = tiny_config(tmp_path)
    cfg["sample"].update(num_samples=12, batch_size=5, steps=3, cfg_scale=1.5, s_vae=None)
    dit_path, ae_path, grid, C = write_generator(tmp_path, cfg, NUM_CLASSES, MEAN_NORM)
    stub_latent_cache(monkeypatch, NUM_CLASSES, MEAN_NORM, grid, C)
    cache_path = tmp_path / "cache.zarr"
    return cfg, str(dit_path), str(ae_path), str(cache_path)


def run(cfg, dit, ae, cache, out):
    generate.sample_to_h5(cfg, dit, ae, cache, str(out))


def test_samples_file_is_plain_hdf5_class_balanced_and_seeded(setup, tmp_path):
    cfg, dit, ae, cache = setup
    cfg["sample"]["export_npz"] = True
    out = tmp_path / "samples" / "samples.h5"
    run(cfg, dit, ae, cache, out)

    assert not out.with_name("samples.h5.partial").exists()
    with h5py.File(out, "r") as f:
        images, labels, seeds = f["images"][:], f["labels"][:], f["seeds"][:]
        attrs = dict(f.attrs)
    assert images.dtype == np.uint8 and images.shape == (12, 32, 32, 3)
    assert np.bincount(labels, minlength=NUM_CLASSES).tolist() == [4, 4, 4]
    assert len(set(seeds.tolist())) == 12
    assert attrs["done"] == 12 and attrs["dit_checkpoint"] == dit and attrs["ae_checkpoint"] == ae
    assert attrs["steps"] == 3 and attrs["cfg_scale"] == 1.5
    assert attrs["s_vae"] == pytest.approx(MEAN_NORM)  # s_vae: null -> the cache's mean_norm
    assert attrs["precision"] == "fp32" and attrs["label_scheme"] == generate.LABEL_SCHEME
    assert images.std() > 1.0  # not a constant image

    # sample i, recomputed directly from its own seed, alone in its batch
    model, meta = load_dit(dit)
    autoencoder = DinoSAE.load(ae)
    T, C, r = meta["tokens"], meta["channels"], meta["radius"]
    for i in (0, 7):
        g = torch.Generator().manual_seed(int(seeds[i]))
        z1 = sphere.project(torch.randn(1, T, C, generator=g), r)
        z = rfm.sample(model, torch.tensor([int(labels[i])]), 3, 1.5, r, meta["alpha"],
                       shape=(T, C), z1=z1)
        with torch.no_grad():
            x = autoencoder.decode(z * (MEAN_NORM / r)).clamp(0, 1)
        expect = (x[0] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        assert np.abs(expect.astype(int) - images[i].astype(int)).max() <= 1

    # PNG grid: one row per class, 4 samples each, 2 px padding (torchvision save_image)
    with Image.open(out.with_suffix(".png")) as im:
        assert im.size == (4 * 34 + 2, NUM_CLASSES * 34 + 2)
    with np.load(out.with_suffix(".npz")) as z:
        np.testing.assert_array_equal(z["arr_0"], images)
        np.testing.assert_array_equal(z["arr_1"], labels)


def test_killed_job_resumes_to_identical_output(setup, tmp_path, monkeypatch):
    cfg, dit, ae, cache = setup
    run(cfg, dit, ae, cache, tmp_path / "full.h5")

    real_sample = rfm.sample
    calls = kill_sampler_at(monkeypatch, 3)
    out = tmp_path / "resumed.h5"
    with pytest.raises(RuntimeError, match="killed"):
        run(cfg, dit, ae, cache, out)
    partial = Path(str(out) + ".partial")
    assert not out.exists() and partial.exists()
    with h5py.File(partial, "r") as f:
        assert int(f.attrs["done"]) == 10  # two batches of 5 written, the third lost

    calls.clear()
    monkeypatch.setattr(rfm, "sample", lambda *a, **k: (calls.append(len(a[1])),
                                                          real_sample(*a, **k))[1])
    run(cfg, dit, ae, cache, out)
    assert calls == [2]  # only the missing last batch (samples 10, 11) was generated
    with h5py.File(tmp_path / "full.h5", "r") as a, h5py.File(out, "r") as b:
        for key in ("images", "labels", "seeds"):
            np.testing.assert_array_equal(a[key][:], b[key][:])
        assert int(b.attrs["done"]) == 12


def test_changed_settings_start_again(setup, tmp_path, monkeypatch):
    cfg, dit, ae, cache = setup
    out = tmp_path / "s.h5"
    real_sample = rfm.sample
    calls = []

    def dying_sample(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("killed")
        return real_sample(*args, **kwargs)

    monkeypatch.setattr(rfm, "sample", dying_sample)
    with pytest.raises(RuntimeError):
        run(cfg, dit, ae, cache, out)
    monkeypatch.setattr(rfm, "sample", lambda *a, **k: (calls.append(1), real_sample(*a, **k))[1])
    calls.clear()
    cfg["sample"]["cfg_scale"] = 2.0  # other settings: the partial file must not be continued
    run(cfg, dit, ae, cache, out)
    assert len(calls) == 3
    with h5py.File(out, "r") as f:
        assert f.attrs["cfg_scale"] == 2.0 and int(f.attrs["done"]) == 12


def test_without_a_cache_the_generator_gives_classes_and_s_vae_is_needed(setup, tmp_path):
    """An imported generator has no latent cache: classes from the generator, s_vae from the
    config (no mean norm to fall back on)."""
    cfg, dit, ae, _ = setup
    with pytest.raises(generate.ConfigError, match=r"sample\.s_vae"):
        run(cfg, dit, ae, None, tmp_path / "a.h5")
    cfg["sample"]["s_vae"] = MEAN_NORM
    run(cfg, dit, ae, None, tmp_path / "b.h5")
    with h5py.File(tmp_path / "b.h5", "r") as f:
        assert f.attrs["cache"] == "" and f.attrs["num_classes"] == NUM_CLASSES
        assert f.attrs["integrator"] == "euler_project" and f.attrs["convention"] == "dinosae"
        assert np.bincount(f["labels"][:]).tolist() == [4, 4, 4]


def test_generate_command_grid_and_npz(setup, tmp_path, capsys):
    import dinosae
    from dinosae import cli, export

    _, dit, ae, _ = setup
    args = ["--classes", "0,2", "--seeds", "3-5", "--steps", "2", "--cfg-scale", "1.5"]
    png, npz = tmp_path / "grid.png", tmp_path / "samples.npz"
    # a checkpoint: its recorded autoencoder; decode radius given
    assert cli.main(["generate", "--model", dit, "--out", str(png), "--s-vae", "7.5", *args]) == 0
    with Image.open(png) as im:
        assert im.size == (3 * 34 + 2, 2 * 34 + 2)  # a row per class, a column per seed
    assert cli.main(["generate", "--model", dit, "--out", str(npz), "--s-vae", "7.5", *args]) == 0
    with np.load(npz) as z:
        images, labels, seeds = z["arr_0"], z["arr_1"], z["arr_2"]
    assert images.shape == (6, 32, 32, 3) and images.dtype == np.uint8
    assert labels.tolist() == [0, 0, 0, 2, 2, 2] and seeds.tolist() == [3, 4, 5, 3, 4, 5]
    want = dinosae.load_generator(dit, device="cpu").sample([2], steps=2, cfg_scale=1.5,
                                                           seeds=[4], radius=7.5)
    assert np.abs(generate.to_uint8(want)[0].astype(int) - images[4].astype(int)).max() <= 1
    assert not np.array_equal(images[0], images[1])  # seeds differ
    # an export folder: its bundled autoencoder and recorded decode radius (the cache's mean)
    folder = export.export_model({}, dit, tmp_path / "export")
    out2 = tmp_path / "export.npz"
    assert cli.main(["generate", "--model", str(folder), "--out", str(out2), *args]) == 0
    with np.load(out2) as z:
        assert np.abs(z["arr_0"].astype(int) - images.astype(int)).max() <= 1
    capsys.readouterr()
    # one line and exit 2 for bad input; an existing --out that generate did not write is kept
    # unless --force (its own npz, marked, is replaced: tests/test_untrusted_input.py, 10)
    foreign = tmp_path / "mine.npz"
    np.savez(foreign, arr_0=np.zeros(3))
    for extra, why in ((["--out", str(foreign)], "was not written by `dinosae generate`"),
                       (["--out", str(tmp_path / "x.png"), "--classes", "0,9"], "--classes [9]"),
                       (["--out", str(tmp_path / "x.jpg")], ".png"),
                       (["--out", str(tmp_path / "x.png"), "--seeds", "5-1"], "--seeds")):
        assert cli.main(["generate", "--model", dit, "--s-vae", "7.5", *args, *extra]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and why in err, err
    before = foreign.read_bytes()
    assert cli.main(["generate", "--model", dit, "--out", str(foreign), "--s-vae", "7.5",
                     "--force", "--classes", "1", "--seeds", "0", "--steps", "2"]) == 0
    assert foreign.read_bytes() != before


def test_sampling_precision_switch():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert generate.sampling_bf16("bf16", cuda) and not generate.sampling_bf16("fp32", cuda)
    assert not generate.sampling_bf16("bf16", cpu)  # no autocast off CUDA: recorded as fp32
    with pytest.raises(ConfigError, match="sample.precision"):
        generate.sampling_bf16("fp16", cuda)


def test_config_seed_reaches_the_sampling_noise():
    # torch's CPU generator keeps only a seed's low 32 bits: seed * 2^32 + i must still give
    # another noise for another config seed, the same for the same one
    shape, r = (4, 8), 2.0
    a = generate.start_noise(generate.sample_seeds(3, 0), shape, r, "rfm")
    b = generate.start_noise(generate.sample_seeds(3, 1), shape, r, "rfm")
    again = generate.start_noise(generate.sample_seeds(3, 1), shape, r, "rfm")
    assert torch.equal(b, again)
    assert not torch.allclose(a, b)
    assert len({tuple(z.flatten().tolist()) for z in b}) == 3  # samples differ within a seed
    # below 2^32 a seed is used as it is (the API's --seeds, config seed 0)
    assert generate.generator_seed(12345) == 12345
    assert generate.generator_seed((7 << 32) + 5) != 5
