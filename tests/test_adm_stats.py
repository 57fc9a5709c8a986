"""Our FID, sFID, IS and k-NN precision/recall against ADM's evaluator itself
(openai/guided-diffusion evaluations/evaluator.py, run outside the repository on the saved
random features of tests/fixtures/adm_stats; see its README): within 1e-4 relative."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dinosae import evaluate

FIXTURE = Path(__file__).parent / "fixtures" / "adm_stats" / "adm_stats.npz"


@pytest.fixture(scope="module")
def adm() -> dict[str, np.ndarray]:
    with np.load(FIXTURE) as z:
        return {k: z[k] for k in z.files}


@pytest.mark.parametrize("kind", ["pool", "spatial"])
def test_frechet_distance_equals_adm(adm, kind):
    mu_r, sigma_r = evaluate.feature_statistics(adm[f"{kind}_ref"])
    mu_s, sigma_s = evaluate.feature_statistics(adm[f"{kind}_sample"])
    np.testing.assert_allclose(mu_r, adm[f"{kind}_ref_mu"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(sigma_r, adm[f"{kind}_ref_sigma"], rtol=1e-5, atol=1e-9)
    fd = evaluate.frechet_distance(mu_s, sigma_s, mu_r, sigma_r)
    assert fd == pytest.approx(float(adm[f"{kind}_fd"]), rel=1e-4)


def test_inception_score_equals_adm(adm):
    logits = torch.from_numpy(adm["is_acts"]).float() @ torch.from_numpy(adm["is_w"])
    assert evaluate.inception_score(logits) == pytest.approx(float(adm["is"]), rel=1e-4)
    # ADM splits into consecutive 5000s (11000 samples: 5000, 5000, 1000), not 10 equal splits
    assert evaluate.inception_score(logits, split_size=1100) != pytest.approx(
        float(adm["is"]), rel=1e-4)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["pr", "pr_wide", "pr_big", "pr_2048"])
def test_precision_recall_equal_adm(adm, case, device):
    ref = (adm["pool_ref"] if case == "pr" else adm[f"{case}_ref"]).astype(np.float32)
    sample = (adm["pool_sample"] if case == "pr" else adm[f"{case}_sample"]).astype(np.float32)
    # fp16 distances round alike (equal); the fp32 fallback (pr_big) differs in fp32 round-off
    check = (np.testing.assert_array_equal if case != "pr_big" else
             lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4))
    check(evaluate.manifold_radii(torch.from_numpy(ref).to(device)).numpy(),
          adm[f"{case}_ref_radii"][:, 0])
    check(evaluate.manifold_radii(torch.from_numpy(sample).to(device)).numpy(),
          adm[f"{case}_sample_radii"][:, 0])
    precision, recall = evaluate.precision_recall(ref, sample, device)
    # 256-d: TensorFlow's fp32 accumulation order inside its fp16 matmul is not torch's; 14 of
    # 90,000 products round to another fp16 (measured), which flips one sample here
    tol = {"abs": 1.0 / len(sample)} if case == "pr_wide" else {"rel": 1e-4}
    assert precision == pytest.approx(float(adm[f"{case}_precision"]), **tol)
    assert recall == pytest.approx(float(adm[f"{case}_recall"]), **tol)
