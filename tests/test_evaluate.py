"""Evaluation: FD maths against closed forms, our FD_teacher against torch-fidelity's own
calculate_metrics on the same images, reference statistics (shards and ADM npz), the offline
behaviour when Inception weights are missing, reconstruction metrics against direct
computation. (Inception FID/IS/PRC against torch-fidelity: test_evaluate_inception.py.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import torch_fidelity
import torch_fidelity.feature_extractor_inceptionv3 as tf_inception
from evalhelpers import (
    U8,
    block_network,
    images,
    make_teacher,
    read_tar_images,
    write_samples,
    write_shards,
)
from helpers import tiny_config
from PIL import Image

from dinosae import evaluate
from dinosae.checkpoint import tensors_fingerprint
from dinosae.errors import ConfigError, DataError
from dinosae.files import read_kv, sha256_file


@pytest.fixture
def no_network(monkeypatch):
    block_network(monkeypatch)


@pytest.fixture
def tiny_teacher():
    return make_teacher(0)


# ---------------------------------------------------------------- Frechet distance maths


def test_fd_of_a_set_against_its_own_statistics_is_zero():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(300, 16)) @ rng.normal(size=(16, 16)) + 3.0
    mu, sigma = evaluate.feature_statistics(torch.from_numpy(feats.astype(np.float32)))
    assert abs(evaluate.frechet_distance(mu, sigma, mu, sigma)) < 1e-6 * np.trace(sigma)
    other = feats + rng.normal(size=feats.shape)  # a different set is clearly not zero
    mu2, sigma2 = evaluate.feature_statistics(torch.from_numpy(other.astype(np.float32)))
    assert evaluate.frechet_distance(mu, sigma, mu2, sigma2) > 0.1


def test_fd_matches_closed_forms():
    rng = np.random.default_rng(1)
    d = 12
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = rng.uniform(0.1, 3.0, size=d), rng.uniform(0.1, 3.0, size=d)
    closed = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    got = evaluate.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
    assert got == pytest.approx(closed, rel=1e-9)
    # full covariances: the matrix square root computed independently with scipy
    a, b = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    c1, c2 = a @ a.T + 0.1 * np.eye(d), b @ b.T + 0.1 * np.eye(d)
    covmean = scipy.linalg.sqrtm(c1 @ c2).real
    closed = np.sum((mu1 - mu2) ** 2) + np.trace(c1) + np.trace(c2) - 2 * np.trace(covmean)
    assert evaluate.frechet_distance(mu1, c1, mu2, c2) == pytest.approx(closed, rel=1e-7)


def test_feature_statistics_are_mean_and_unbiased_covariance():
    feats = np.random.default_rng(2).normal(size=(50, 5)).astype(np.float32)
    mu, sigma = evaluate.feature_statistics(torch.from_numpy(feats))
    x = feats.astype(np.float64)
    centred = x - x.mean(0)
    np.testing.assert_allclose(mu, x.mean(0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(sigma, centred.T @ centred / (len(x) - 1), rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- against torch-fidelity itself


def test_fd_teacher_equals_torch_fidelity(tmp_path, tiny_teacher, monkeypatch, no_network):
    cfg = tiny_config(tmp_path)
    cfg["eval"]["batch_size"] = 5  # batches that do not divide the counts
    real = images(14, seed=1)
    write_shards(tmp_path / "val", real, [i % 3 for i in range(14)])
    fake = images(12, seed=2)
    write_samples(tmp_path / "samples.h5", fake, np.arange(12) % 3)
    monkeypatch.setattr(evaluate, "load_teacher", lambda cfg, ae, device: tiny_teacher)

    evaluate.fid_reference(cfg, str(tmp_path / "val"), str(tmp_path / "ref.npz"))
    evaluate.fid(cfg, str(tmp_path / "samples.h5"), str(tmp_path / "ref.npz"),
                 str(tmp_path / "gfid.txt"))

    kv = read_kv(tmp_path / "gfid.txt")
    assert kv["metric"] == "FD_teacher" and "FID" not in kv
    assert kv["extractor"] == "teacher" and kv["IS"].startswith("n/a")
    assert int(kv["num_samples"]) == 12 and int(kv["reference_count"]) == 14
    assert kv["reference_sha256"] == sha256_file(tmp_path / "ref.npz")
    assert kv["reference_source_sha256"] == sha256_file(tmp_path / "val" / "manifest.json")
    assert kv["extractor_weights_sha256"].startswith(tensors_fingerprint(tiny_teacher))
    assert kv["steps"] == "4" and kv["sampling_precision"] == "unrecorded"
    assert kv["dit_checkpoint"] == "dit.pt"
    with np.load(tmp_path / "ref.npz") as z:
        assert str(z["extractor"]) == "teacher" and int(z["count"]) == 14

    direct = torch_fidelity.calculate_metrics(
        input1=U8(fake), input2=U8(read_tar_images(tmp_path / "val")), fid=True,
        feature_extractor=evaluate.TEACHER, dinosae_teacher=tiny_teacher, cuda=False,
        batch_size=7, save_cpu_ram=True, cache=False, verbose=False)
    value = direct[torch_fidelity.KEY_METRIC_FID]
    assert value > 1e-3
    assert float(kv["FD_teacher"]) == pytest.approx(value, rel=1e-4)


# ---------------------------------------------------------------- reference statistics


def test_running_stats_equal_numpy_mean_and_cov():
    rng = np.random.default_rng(3)
    x = (rng.gamma(0.8, 0.5, size=(103, 6)) + 100.0).astype(np.float32)  # a large mean
    rs = evaluate.RunningStats()
    bounds = (0, 7, 8, 50, 103)  # uneven batches, one of a single row
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        rs.update(torch.from_numpy(x[a:b]))
    mu, sigma = rs.result()
    np.testing.assert_allclose(mu, x.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-9)


def test_adm_reference_npz_is_read(tmp_path):
    rng = np.random.default_rng(5)
    mu = rng.normal(size=2048)
    a = rng.normal(size=(2048, 64)).astype(np.float32)
    sigma = (a @ a.T).astype(np.float64)
    path = tmp_path / "VIRTUAL_imagenet256_labeled.npz"
    np.savez(path, arr_0=np.zeros((7, 8, 8, 3), np.uint8), mu=mu, sigma=sigma,
             mu_s=np.zeros(3), sigma_s=np.eye(3))
    ref = evaluate.load_reference(path)
    np.testing.assert_array_equal(ref["mu"], mu)
    np.testing.assert_array_equal(ref["sigma"], sigma)
    assert ref["extractor"] == "inception-v3-compat" and ref["count"] == 7

    np.testing.assert_array_equal(ref["mu_s"], np.zeros(3))
    cfg = tiny_config(tmp_path)
    cfg["eval"].update(extractor="teacher", adm_reference=str(path))
    with pytest.raises(ConfigError, match="eval.extractor: inception"):
        evaluate.fid_reference(cfg, None, str(tmp_path / "ref2.npz"))
    # without its images (arr_0) there is nothing for precision/recall: one line, before any model
    no_images = tmp_path / "no_images.npz"
    np.savez(no_images, mu=mu, sigma=sigma)
    cfg["eval"].update(extractor="inception", adm_reference=str(no_images))
    with pytest.raises(DataError, match="no reference images"):
        evaluate.fid_reference(cfg, None, str(tmp_path / "ref3.npz"))
    with pytest.raises(DataError, match="no array 'arr_0'"):
        next(evaluate.iter_npz_images(no_images, "arr_0", 2))


def test_reference_from_other_teacher_is_refused(tmp_path, tiny_teacher, monkeypatch):
    cfg = tiny_config(tmp_path)
    write_shards(tmp_path / "val", images(6, seed=6), [0, 1, 0, 1, 0, 1])
    write_samples(tmp_path / "samples.h5", images(6, seed=7), np.arange(6) % 2)
    monkeypatch.setattr(evaluate, "load_teacher", lambda cfg, ae, device: tiny_teacher)
    evaluate.fid_reference(cfg, str(tmp_path / "val"), str(tmp_path / "ref.npz"))
    other = make_teacher(1)
    monkeypatch.setattr(evaluate, "load_teacher", lambda cfg, ae, device: other)
    with pytest.raises(ConfigError, match="other extractor weights"):
        evaluate.fid(cfg, str(tmp_path / "samples.h5"), str(tmp_path / "ref.npz"),
                     str(tmp_path / "gfid.txt"))
    assert not (tmp_path / "gfid.txt").exists()


# ---------------------------------------------------------------- offline Inception


def test_missing_inception_weights_stop_with_instructions(tmp_path, monkeypatch, no_network):
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))  # an empty cache
    cfg = tiny_config(tmp_path)
    cfg["eval"].update(extractor="inception", inception_weights=None)
    write_shards(tmp_path / "val", images(4, seed=8), [0, 1, 0, 1])
    with pytest.raises(ConfigError) as e:
        evaluate.fid_reference(cfg, str(tmp_path / "val"), str(tmp_path / "ref.npz"))
    msg = str(e.value)
    assert "eval.inception_weights" in msg and tf_inception.URL_INCEPTION_V3 in msg
    assert str(tmp_path / "hub" / "checkpoints") in msg and "eval.extractor: teacher" in msg
    cfg["eval"]["inception_weights"] = str(tmp_path / "nope.pth")
    with pytest.raises(ConfigError, match="does not exist"):
        evaluate.fid_reference(cfg, str(tmp_path / "val"), str(tmp_path / "ref.npz"))
    assert not (tmp_path / "ref.npz").exists()


def test_inception_weights_found_in_torch_fidelity_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    cached = tmp_path / "hub" / "checkpoints" / Path(tf_inception.URL_INCEPTION_V3).name
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"x")
    assert evaluate.inception_weights_path(None) == str(cached)


# ---------------------------------------------------------------- reconstruction metrics


def test_psnr_matches_formula():
    rng = np.random.default_rng(9)
    a = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-20, 21, size=a.shape), 0, 255).astype(np.uint8)
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    assert evaluate.psnr(a, b) == pytest.approx(10 * np.log10(255.0**2 / mse), rel=1e-12)
    assert evaluate.ssim(a, a) == pytest.approx(1.0)
    assert evaluate.ssim(a, b) < 0.99


def test_eval_recon_metrics_against_direct_computation(tmp_path, no_network):
    from dinosae.checkpoint import save_checkpoint
    from dinosae.models.autoencoder import DinoSAE, ae_config, build_autoencoder
    from dinosae.models.perceptual import build_lpips, lpips_distance

    cfg = tiny_config(tmp_path)
    cfg["eval"].update(recon_samples=5, batch_size=3)
    torch.manual_seed(0)
    sd = build_autoencoder(cfg).state_dict()
    ckpt = tmp_path / "ae.pt"
    save_checkpoint(ckpt, {"kind": "dinosae-ae", "stage": 4, "step": 0,
                           "config": ae_config(cfg), "model": sd, "ema": sd})
    real = images(9, seed=10)
    write_shards(tmp_path / "val", real, [i // 3 for i in range(9)])
    out = tmp_path / "results" / "recon.txt"
    evaluate.eval_recon(cfg, str(ckpt), str(tmp_path / "val"), str(out))
    kv = read_kv(out)

    # 5 of 9 images spread over the split: indices 0, 2, 4, 6, 8
    x = real[[0, 2, 4, 6, 8]]
    ae = DinoSAE.load(ckpt)
    with torch.no_grad():
        xt = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255
        rec = (ae.decode(ae.encode(xt)).clamp(0, 1) * 255).round()
    rec_np = rec.permute(0, 2, 3, 1).numpy()
    mse = ((x.astype(np.float64) - rec_np) ** 2).reshape(5, -1).mean(1)
    assert float(kv["PSNR"]) == pytest.approx(np.mean(10 * np.log10(255**2 / mse)), abs=1e-4)
    lp = lpips_distance(build_lpips("vgg", "random"), xt, rec / 255).mean().item()
    assert "LPIPS" not in kv and float(kv["LPIPS_randombackbone"]) == pytest.approx(lp, abs=1e-4)
    assert 0.0 < float(kv["SSIM"]) < 1.0
    assert "rFID" not in kv and float(kv["rFD_teacher"]) > 0
    assert kv["extractor"] == "teacher" and int(kv["num_samples"]) == 5
    assert kv["checkpoint"] == str(ckpt)
    # the protocol: what was reconstructed, from which pixels, measured with which weights
    assert kv["checkpoint_sha256"] == sha256_file(ckpt)
    assert kv["shards_manifest_sha256"] == sha256_file(tmp_path / "val" / "manifest.json")
    assert kv["shards_format"] in ("jpeg", "png")
    assert kv["extractor_weights_sha256"].startswith(tensors_fingerprint(ae.teacher))
    with Image.open(out.with_suffix(".png")) as im:  # rows: 5 inputs over 5 reconstructions
        assert im.size == (5 * 34 + 2, 2 * 34 + 2)
