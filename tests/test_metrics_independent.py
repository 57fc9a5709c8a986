"""The metrics and the samples file against computations that share nothing with the code
under test:

* the teacher feature extractor against timm's forward on input normalised here by hand
  (ImageNet mean/std written out; pooled = mean of the patch tokens, cls = token 0);
* SSIM against a direct implementation (7×7 uniform windows, sample covariances, K1 = 0.01,
  K2 = 0.03, mean over valid windows and channels: skimage's defaults written out), per image and
  paired with its own reconstruction; rFD from features extracted here, with the Fréchet
  distance computed by eigen-decomposition (not scipy's sqrtm, which torch-fidelity uses);
* the samples file recomputed with rfm.sample from a DiT whose weights are all non-zero (so its
  output depends on labels, time and guidance), with a guidance scale and a guidance interval
  that leaves one step unguided."""

from __future__ import annotations

import math

import h5py
import numpy as np
import pytest
import torch
from evalhelpers import images, make_teacher, write_shards
from helpers import stub_latent_cache, tiny_config, write_generator
from numpy.lib.stride_tricks import sliding_window_view

from dinosae import evaluate, generate, rfm
from dinosae.checkpoint import save_checkpoint
from dinosae.files import read_kv
from dinosae.models.autoencoder import DinoSAE, ae_config, build_autoencoder
from dinosae.models.dit import load_dit

pytestmark = pytest.mark.usefixtures("one_thread")
MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


# ---------------------------------------------------------------- independent computations

def hand_features(teacher: torch.nn.Module, u8_nhwc: np.ndarray) -> dict[str, np.ndarray]:
    """uint8 NHWC -> /255 -> (x − mean)/std per channel -> timm forward_features; pooled = mean
    of the patch tokens (after the CLS token and registers), cls = the first token."""
    x = (u8_nhwc.astype(np.float64) / 255.0 - MEAN) / STD
    x = torch.from_numpy(x).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        tokens = teacher.forward_features(x)
    return {"pooled": tokens[:, teacher.num_prefix_tokens:].mean(1).double().numpy(),
            "cls": tokens[:, 0].double().numpy()}


def ssim_direct(a: np.ndarray, b: np.ndarray, win: int = 7, data_range: float = 255.0) -> float:
    """Mean SSIM of two HWC images over every full win×win window, per channel then averaged
    (uniform window, unbiased variances: Wang et al. with skimage's defaults)."""
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    n = win * win
    vals = []
    for ch in range(a.shape[-1]):
        x = sliding_window_view(a[..., ch].astype(np.float64), (win, win)).reshape(-1, n)
        y = sliding_window_view(b[..., ch].astype(np.float64), (win, win)).reshape(-1, n)
        mx, my = x.mean(1), y.mean(1)
        vx, vy = x.var(1, ddof=1), y.var(1, ddof=1)
        cxy = ((x - mx[:, None]) * (y - my[:, None])).sum(1) / (n - 1)
        s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
        vals.append(s.mean())
    return float(np.mean(vals))


def fd_direct(f1: np.ndarray, f2: np.ndarray) -> float:
    """Fréchet distance of two feature sets: ‖μ1 − μ2‖² + tr Σ1 + tr Σ2 − 2 tr (Σ1^½ Σ2 Σ1^½)^½,
    the matrix roots by symmetric eigen-decomposition."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root1 @ s2 @ root1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


# ---------------------------------------------------------------- the teacher extractor

def test_teacher_extractor_equals_timm_on_hand_normalised_input():
    teacher = make_teacher(0)
    u8 = images(5, seed=3)
    fe = evaluate.TeacherFeatures(evaluate.TEACHER, ["pooled", "cls"], dinosae_teacher=teacher)
    got = fe(torch.from_numpy(u8).permute(0, 3, 1, 2).contiguous())
    want = hand_features(teacher, u8)
    np.testing.assert_allclose(got[0].double().numpy(), want["pooled"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got[1].double().numpy(), want["cls"], rtol=1e-4, atol=1e-5)
    # the features tell the images apart (a constant extractor would pass nothing above)
    assert np.abs(want["pooled"][0] - want["pooled"][1]).max() > 1e-3


def test_ssim_direct_implementation_agrees_with_itself_and_the_metric():
    u8 = images(2, seed=4)
    a, b = u8[0], u8[1]
    assert ssim_direct(a, a) == pytest.approx(1.0)
    assert evaluate.ssim(a, b) == pytest.approx(ssim_direct(a, b), abs=1e-9)
    noisy = np.clip(a.astype(int) + np.random.default_rng(0).integers(-30, 31, a.shape), 0,
                    255).astype(np.uint8)
    assert evaluate.ssim(a, noisy) == pytest.approx(ssim_direct(a, noisy), abs=1e-9)


def test_fd_direct_against_the_package():
    rng = np.random.default_rng(7)
    f1 = rng.normal(size=(200, 6)) @ rng.normal(size=(6, 6))
    f2 = rng.normal(size=(150, 6)) @ rng.normal(size=(6, 6)) + 0.5
    mu1, s1 = evaluate.feature_statistics(torch.from_numpy(f1.astype(np.float32)))
    mu2, s2 = evaluate.feature_statistics(torch.from_numpy(f2.astype(np.float32)))
    assert evaluate.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(fd_direct(f1, f2),
                                                                        rel=1e-4)


# ---------------------------------------------------------------- eval_recon

def test_eval_recon_ssim_and_rfd_recomputed(tmp_path):
    cfg = tiny_config(tmp_path)
    n = 72  # more images than feature dimensions (64): full-rank covariances
    cfg["eval"].update(recon_samples=n, batch_size=24)
    torch.manual_seed(0)
    sd = build_autoencoder(cfg).state_dict()
    ckpt = tmp_path / "ae.pt"
    save_checkpoint(ckpt, {"kind": "dinosae-ae", "stage": 4, "step": 0,
                           "config": ae_config(cfg), "model": sd, "ema": sd})
    real = images(n, seed=12)
    write_shards(tmp_path / "val", real, [i % 4 for i in range(n)], per_shard=24)
    out = tmp_path / "recon.txt"
    evaluate.eval_recon(cfg, str(ckpt), str(tmp_path / "val"), str(out))
    kv = read_kv(out)
    assert kv["extractor"] == "teacher" and int(kv["num_samples"]) == n

    ae = DinoSAE.load(ckpt)
    with torch.no_grad():
        x = torch.from_numpy(real).permute(0, 3, 1, 2).float() / 255
        rec = (ae.decode(ae.encode(x)).clamp(0, 1) * 255).round().to(torch.uint8)
    rec_np = rec.permute(0, 2, 3, 1).numpy()
    per_image = [ssim_direct(a, b) for a, b in zip(real, rec_np, strict=True)]
    assert float(kv["SSIM"]) == pytest.approx(np.mean(per_image), abs=2e-4)
    shifted = [ssim_direct(a, b) for a, b in zip(real, np.roll(rec_np, 1, 0), strict=True)]
    assert abs(np.mean(per_image) - np.mean(shifted)) > 1e-3  # pairing matters here

    fr = hand_features(ae.teacher, real)["pooled"]
    ff = hand_features(ae.teacher, rec_np)["pooled"]
    want = fd_direct(ff, fr)
    assert want > 1e-3
    assert float(kv["rFD_teacher"]) == pytest.approx(want, rel=2e-3)


# ---------------------------------------------------------------- the samples file

NUM_CLASSES = 3
MEAN_NORM = 7.5


@pytest.fixture
def busy_generator(tmp_path, monkeypatch):
    """Tiny AE and a DiT with every weight perturbed (adaLN-zero off), checkpoints written per
    the contracts; the cache stand-in gives classes and mean norm (as in test_generate)."""
    cfg = tiny_config(tmp_path)
    cfg["device"] = "cpu"
    dit_path, ae_path, grid, C = write_generator(tmp_path, cfg, NUM_CLASSES, MEAN_NORM,
                                                 perturb=(5, 0.2))
    stub_latent_cache(monkeypatch, NUM_CLASSES, MEAN_NORM, grid, C)
    return cfg, str(dit_path), str(ae_path), str(tmp_path / "cache.zarr")


def test_samples_file_recomputed_from_a_dit_with_nonzero_output(busy_generator, tmp_path):
    cfg, dit, ae, cache = busy_generator
    steps, scale = 3, 2.5
    model, meta = load_dit(dit)
    T, C, r, alpha = meta["tokens"], meta["channels"], meta["radius"], meta["alpha"]
    grid = rfm.time_grid(steps, alpha).tolist()[:-1]  # the times at which steps are taken
    lo = (grid[-1] + grid[-2]) / 2  # guidance on all steps but the last
    assert sum(lo <= t <= 1.0 for t in grid) == steps - 1
    cfg["sample"].update(num_samples=6, batch_size=4, steps=steps, cfg_scale=scale,
                         guidance_interval=[lo, 1.0], s_vae=None)
    out = tmp_path / "samples.h5"
    generate.sample_to_h5(cfg, dit, ae, cache, str(out))
    with h5py.File(out, "r") as f:
        got, labels, seeds = f["images"][:], f["labels"][:], f["seeds"][:]
    assert labels.tolist() == [0, 1, 2, 0, 1, 2]

    autoencoder = DinoSAE.load(ae)

    def recompute(i, label=None, cfg_scale=scale, interval=(lo, 1.0)):
        g = torch.Generator().manual_seed(int(seeds[i]))
        z1 = torch.randn(1, T, C, generator=g)
        z1 = r * z1 / z1.norm(dim=-1, keepdim=True)
        y = torch.tensor([int(labels[i]) if label is None else label])
        z = rfm.sample(model, y, steps, cfg_scale, r, alpha, shape=(T, C), z1=z1,
                       guidance_interval=interval)
        with torch.no_grad():
            x = autoencoder.decode(z * (MEAN_NORM / r)).clamp(0, 1)
        return (x[0] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy().astype(int)

    def diff(a, b):
        return np.abs(a.astype(int) - b.astype(int)).max()

    for i in (0, 4, 5):
        want = recompute(i)
        assert diff(want, got[i]) <= 1, i
        # and every setting reaches the image: label, scale, interval
        other = (int(labels[i]) + 1) % NUM_CLASSES
        for changed in (recompute(i, label=other), recompute(i, cfg_scale=1.0),
                        recompute(i, interval=(0.0, 1.0))):
            assert diff(changed, want) >= 3, i
    assert diff(got[0], got[3]) >= 3  # same class, other seed


def test_guidance_interval_attr_and_radius(busy_generator, tmp_path):
    cfg, dit, ae, cache = busy_generator
    cfg["sample"].update(num_samples=3, batch_size=3, steps=2, cfg_scale=1.7,
                         guidance_interval=[0.25, 0.75], s_vae=None)
    out = tmp_path / "s.h5"
    generate.sample_to_h5(cfg, dit, ae, cache, str(out))
    with h5py.File(out, "r") as f:
        assert list(f.attrs["guidance_interval"]) == [0.25, 0.75]
        assert f.attrs["cfg_scale"] == pytest.approx(1.7)
        assert f.attrs["radius"] == pytest.approx(math.sqrt(64))
        assert f.attrs["s_vae"] == pytest.approx(MEAN_NORM)
