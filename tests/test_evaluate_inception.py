"""Inception-v3 path of the evaluation, offline: torch-fidelity's Inception architecture with
random weights saved as a local weights file (eval.inception_weights). Our FID, IS and
precision/recall must equal torch-fidelity's calculate_metrics on the same images. Slow on CPU
(Inception at 299 px, a 2048-d matrix square root), so kept to a few images and its own file."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch_fidelity
import torch_fidelity.feature_extractor_inceptionv3 as tf_inception
from evalhelpers import U8, block_network, images, write_samples, write_shards
from helpers import tiny_config

from dinosae import evaluate
from dinosae.files import read_kv, sha256_file


@pytest.fixture
def no_network(monkeypatch):
    block_network(monkeypatch)


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory) -> str:
    """torch-fidelity's Inception-v3 architecture with random (variance-preserving) weights,
    saved like the real weights file: exercises the Inception path with no download."""
    cls = tf_inception.FeatureExtractorInceptionV3
    mp = pytest.MonkeyPatch()
    mp.setattr(cls, "load_state_dict", lambda self, *a, **k: None)
    mp.setattr(tf_inception, "load_state_dict_from_url", lambda *a, **k: {})
    torch.manual_seed(0)
    net = cls("inception-v3-compat", ["2048"])
    mp.undo()
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    torch.nn.init.normal_(net.fc.weight, std=0.05)
    path = tmp_path_factory.mktemp("inception") / "weights-inception-random.pth"
    torch.save(net.state_dict(), path)
    return str(path)



def torch_fidelity_features(weights: str, nhwc: np.ndarray) -> dict[str, torch.Tensor]:
    """pool (2048), logits_unbiased and ADM's spatial features straight from torch-fidelity's
    FeatureExtractorInceptionV3, the spatial ones by running its blocks one by one up to
    Mixed_6d's 1x1 branch (no hook, no dinosae code)."""
    net = tf_inception.FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=weights)
    x = torch.from_numpy(nhwc).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
        pool, logits = net(x)
        h = tf_inception.interpolate_bilinear_2d_like_tensorflow1x(
            x.float(), size=(299, 299), align_corners=False)
        h = (h - 128) / 128
        for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1",
                     "Conv2d_3b_1x1", "Conv2d_4a_3x3", "MaxPool_2", "Mixed_5b", "Mixed_5c",
                     "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c"):
            h = getattr(net, name)(h)
        conv = net.Mixed_6d.branch1x1(h)  # TF mixed_6/conv: (N, 192, 17, 17)
    assert conv.shape[1:] == (192, 17, 17)
    nhwc7 = conv.permute(0, 2, 3, 1)[..., :7].numpy()  # TF's layout, then ADM's [..., :7]
    spatial = torch.from_numpy(nhwc7.reshape(len(x), -1).copy())
    return {"pool": pool, "logits": logits, "spatial": spatial}


def test_spatial_features_are_mixed_6d_branch1x1(inception_weights):
    fe = torch_fidelity.utils.create_feature_extractor(
        evaluate.INCEPTION_ADM, ["2048", evaluate.SPATIAL], cuda=False, verbose=False,
        feature_extractor_weights_path=inception_weights)
    x = images(3, seed=9, size=256)
    with torch.no_grad():
        pool, spatial = fe(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous())
    direct = torch_fidelity_features(inception_weights, x)
    assert spatial.shape == (3, 17 * 17 * 7)  # 2023: the size of mu_s in ADM's reference batch
    torch.testing.assert_close(spatial, direct["spatial"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pool, direct["pool"], rtol=1e-5, atol=1e-6)


@pytest.mark.integration  # four 2048-d matrix square roots on CPU: minutes
def test_gfid_with_inception_is_adm_statistics(tmp_path, inception_weights, no_network):
    cfg = tiny_config(tmp_path)
    cfg["eval"].update(extractor="inception", inception_weights=inception_weights, batch_size=6)
    real = images(7, seed=3)  # few: Inception on CPU and 2048-d FD are slow
    write_shards(tmp_path / "val", real, [i % 2 for i in range(7)])
    fake = images(10, seed=4)
    write_samples(tmp_path / "samples.h5", fake, np.arange(10) % 2)

    evaluate.fid_reference(cfg, str(tmp_path / "val"), str(tmp_path / "ref.npz"))
    evaluate.fid(cfg, str(tmp_path / "samples.h5"), str(tmp_path / "ref.npz"),
                 str(tmp_path / "gfid.txt"))
    kv = read_kv(tmp_path / "gfid.txt")
    assert kv["metric"] == "FID" and kv["extractor"] == "inception-v3-compat"
    assert kv["extractor_weights_sha256"] == sha256_file(inception_weights)
    assert kv["reference_source_sha256"] == sha256_file(tmp_path / "val" / "manifest.json")

    direct = torch_fidelity.calculate_metrics(
        input1=U8(fake), input2=U8(real), fid=True, feature_extractor="inception-v3-compat",
        feature_extractor_weights_path=inception_weights, cuda=False, batch_size=10,
        save_cpu_ram=True, cache=False, verbose=False)
    assert direct[torch_fidelity.KEY_METRIC_FID] > 1e-4
    assert float(kv["FID"]) == pytest.approx(direct[torch_fidelity.KEY_METRIC_FID], rel=1e-4)
    # IS, sFID, precision/recall: ADM's statistics (tests/test_adm_stats.py) on features taken
    # from torch-fidelity's network directly
    f, r = torch_fidelity_features(inception_weights, fake), torch_fidelity_features(
        inception_weights, real)
    assert float(kv["IS"]) == pytest.approx(evaluate.inception_score(f["logits"]), rel=1e-5)
    sfid = evaluate.frechet_distance(*evaluate.feature_statistics(f["spatial"]),
                                     *evaluate.feature_statistics(r["spatial"]))
    assert sfid > 1e-4 and float(kv["sFID"]) == pytest.approx(sfid, rel=1e-4)
    prec, rec = evaluate.precision_recall(r["pool"], f["pool"])
    assert float(kv["precision"]) == pytest.approx(prec, abs=1e-6)
    assert float(kv["recall"]) == pytest.approx(rec, abs=1e-6)


@pytest.mark.integration  # four 2048-d matrix square roots on CPU: minutes
def test_adm_reference_batch_gives_fid_sfid_and_prc(tmp_path, inception_weights, no_network):
    """ADM's VIRTUAL_imagenet256_labeled.npz layout: its mu/sigma and mu_s/sigma_s are used as
    they are; its arr_0 images go through the network for precision/recall."""
    rng = np.random.default_rng(5)
    real, fake = images(6, seed=11), images(8, seed=12)
    r = torch_fidelity_features(inception_weights, real)
    a = rng.normal(size=(2048, 16))
    b = rng.normal(size=(2023, 16))
    adm = {"mu": rng.normal(size=2048), "sigma": a @ a.T + np.eye(2048),
           "mu_s": rng.normal(size=2023), "sigma_s": b @ b.T + np.eye(2023)}
    path = tmp_path / "VIRTUAL_imagenet256_labeled.npz"
    np.savez(path, arr_0=real, **adm)
    write_samples(tmp_path / "samples.h5", fake, np.arange(8) % 2)
    cfg = tiny_config(tmp_path)
    cfg["eval"].update(extractor="inception", inception_weights=inception_weights,
                       adm_reference=str(path), batch_size=4)
    evaluate.fid_reference(cfg, None, str(tmp_path / "ref.npz"))
    with np.load(tmp_path / "ref.npz") as z:
        for k, v in adm.items():
            np.testing.assert_array_equal(z[k], v)
        np.testing.assert_allclose(z["features"], r["pool"].numpy(), rtol=1e-5, atol=1e-6)
        assert int(z["count"]) == 6 and str(z["source_sha256"]) == sha256_file(path)
    evaluate.fid(cfg, str(tmp_path / "samples.h5"), str(tmp_path / "ref.npz"),
                 str(tmp_path / "gfid.txt"))
    kv = read_kv(tmp_path / "gfid.txt")
    f = torch_fidelity_features(inception_weights, fake)
    fid = evaluate.frechet_distance(*evaluate.feature_statistics(f["pool"]), adm["mu"],
                                    adm["sigma"])
    sfid = evaluate.frechet_distance(*evaluate.feature_statistics(f["spatial"]), adm["mu_s"],
                                     adm["sigma_s"])
    assert float(kv["FID"]) == pytest.approx(fid, rel=1e-4)
    assert float(kv["sFID"]) == pytest.approx(sfid, rel=1e-4)
    prec, rec = evaluate.precision_recall(r["pool"], f["pool"])
    assert (float(kv["precision"]), float(kv["recall"])) == pytest.approx((prec, rec), abs=1e-6)
    assert kv["reference_source_sha256"] == sha256_file(path)
