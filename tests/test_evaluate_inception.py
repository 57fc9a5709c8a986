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
from dinosae.files import read_kv


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



def test_fid_is_prc_equal_torch_fidelity_with_inception(tmp_path, inception_weights, no_network):
    cfg = tiny_config(tmp_path)
    cfg["eval"].update(extractor="inception", inception_weights=inception_weights, batch_size=6)
    real = images(5, seed=3)  # few: Inception on CPU and 2048-d FD are slow
    write_shards(tmp_path / "val", real, [i % 2 for i in range(5)])
    fake = images(10, seed=4)
    write_samples(tmp_path / "samples.h5", fake, np.arange(10) % 2)

    evaluate.fid_reference(cfg, str(tmp_path / "val"), str(tmp_path / "ref.npz"))
    evaluate.fid(cfg, str(tmp_path / "samples.h5"), str(tmp_path / "ref.npz"),
                 str(tmp_path / "gfid.txt"))
    kv = read_kv(tmp_path / "gfid.txt")
    assert kv["metric"] == "FID" and kv["extractor"] == "inception-v3-compat"

    direct = torch_fidelity.calculate_metrics(
        input1=U8(fake), input2=U8(real), fid=True, isc=True, prc=True,
        feature_extractor="inception-v3-compat", feature_layer_prc="2048",
        feature_extractor_weights_path=inception_weights, cuda=False, batch_size=10,
        save_cpu_ram=True, cache=False, verbose=False)
    assert direct[torch_fidelity.KEY_METRIC_FID] > 1e-4
    assert float(kv["FID"]) == pytest.approx(direct[torch_fidelity.KEY_METRIC_FID], rel=1e-4)
    assert float(kv["IS"]) == pytest.approx(direct[torch_fidelity.KEY_METRIC_ISC_MEAN], rel=1e-5)
    assert float(kv["IS_std"]) == pytest.approx(direct[torch_fidelity.KEY_METRIC_ISC_STD],
                                                rel=1e-4, abs=1e-6)
    assert float(kv["precision"]) == pytest.approx(direct[torch_fidelity.KEY_METRIC_PRECISION])
    assert float(kv["recall"]) == pytest.approx(direct[torch_fidelity.KEY_METRIC_RECALL])


