"""The paper-size DAG on the CPU: workflow/configs/imagenet256.yaml with every network at full
size (DINOv3 ViT-L/16 teacher at 256 px, the paper's stem, decoder and discriminator,
LightningDiT-XL on 16x16x1024 latents) and random weights, one step per loop, through
workflow/configs/imagenet256_smoke.yaml. Every artifact is checked at full size, so a shrunk model
fails here."""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml
import zarr
from helpers import ROOT, default_config, run_snakemake, workflow_copy

from dinosae import latents
from dinosae.config import validate

CONFIGS = ("workflow/configs/imagenet256.yaml", "workflow/configs/imagenet256_smoke.yaml")
TARGETS = ("results/gfid.txt", "results/recon.txt")
TIMEOUT = 2400  # seconds, for the run and its checks
# every network-running job gets both cores (Snakemake sets OMP_NUM_THREADS to a job's
# threads): the jobs run one after the other, each as fast as it can
HEAVY = ("ae_stage1", "ae_stage2", "ae_stage3", "ae_stage4", "fid_reference", "eval_recon",
         "encode_init", "encode_part", "train_dit", "sample", "fid")
# model sizes: the smoke overlay must not touch any of these
MODEL_KEYS = [("data", "image_size"), ("autoencoder", "teacher", "arch"),
              ("autoencoder", "teacher", "overrides"), ("autoencoder", "stem"),
              ("autoencoder", "stem_widths"), ("autoencoder", "decoder"),
              ("autoencoder", "discriminator", "backbone"),
              ("autoencoder", "discriminator", "layers"),
              ("autoencoder", "discriminator", "channels"), ("autoencoder", "lpips", "net"),
              ("dit", "model"), ("dit", "head")]
# the paper's networks (DESIGN.md, Method): what the checkpoints must hold
PAPER_AE = {"teacher": {"arch": "vit_large_patch16_dinov3", "overrides": None},
            "stem_widths": [64, 128, 256],
            "decoder": {"widths": [256, 512, 512, 1024, 1024], "depths": [5, 5, 3, 3, 3]},
            "discriminator": {"backbone": "dino_vits8"}}  # RAE's: its weights random here
LIGHTNINGDIT_XL = (670e6, 680e6)  # about 675-677 M parameters (LightningDiT / RAE)


def _merge(base: dict, over: dict) -> dict:
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = copy.deepcopy(v)
    return base


def _get(cfg: dict, keys: tuple[str, ...]):
    for k in keys:
        cfg = cfg.get(k) if isinstance(cfg, dict) else None
    return cfg


def smoke_config() -> dict:
    """What Snakemake runs: config.yaml, then each --configfile on top."""
    cfg = default_config()
    for f in CONFIGS:
        _merge(cfg, yaml.safe_load((ROOT / f).read_text()))
    return validate(cfg, check_paths=False)


def test_smoke_config_is_the_paper_config_in_every_model_size():
    paper = _merge(default_config(), yaml.safe_load((ROOT / CONFIGS[0]).read_text()))
    overlay = yaml.safe_load((ROOT / CONFIGS[1]).read_text())
    smoke = smoke_config()
    for keys in MODEL_KEYS:
        assert _get(overlay, keys) is None, f"the smoke overlay sets {'.'.join(keys)}"
        assert _get(smoke, keys) == _get(paper, keys), keys
    assert smoke["dit"]["model"] == "XL" and smoke["data"]["image_size"] == 256
    assert smoke["autoencoder"]["teacher"]["weights"] == "random"
    assert smoke["data"]["source"] == "mini" and smoke["device"] == "cpu"


# ---------------------------------------------------------------- the run

@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> Path:
    work = workflow_copy(tmp_path_factory.mktemp("smoke"))
    t0 = time.monotonic()
    run_snakemake(work, *TARGETS, "--configfile", *CONFIGS,
                  "--set-threads", *(f"{rule}=2" for rule in HEAVY), timeout=TIMEOUT - 60)
    print(f"\npaper-size smoke DAG: {time.monotonic() - t0:.0f} s")
    return work


def _shapes(state: dict) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in state.items()}


def _bytes(state: dict) -> int:
    return sum(v.numel() * v.element_size() for v in state.values())


@pytest.mark.integration
@pytest.mark.timeout(TIMEOUT)  # the run (module fixture) counts: ~10 min on 2 free cores
def test_smoke_artifacts_have_paper_sizes(smoke_run: Path):
    from dinosae.models.autoencoder import build_autoencoder
    from dinosae.models.discriminator import build_discriminator
    from dinosae.models.dit import build_dit

    cfg, work = smoke_config(), smoke_run
    manifest = json.loads((work / "data/shards/train/manifest.json").read_text())
    assert manifest["preprocess"]["image_size"] == 256
    with torch.device("meta"):  # the paper networks, freshly built, without memory or time
        ae = build_autoencoder(cfg, load_teacher_weights=False)
        disc = build_discriminator({**PAPER_AE["discriminator"], "weights": "random"}, 1024)

    # the four stages: the paper's stem, decoder and discriminator; lean (no teacher, no
    # optimizer state): the file is about the size of the tensors it has to hold
    for k in (1, 2, 3, 4):
        path = work / f"results/ae/stage{k}/checkpoint.pt"
        ck = torch.load(path, weights_only=True, mmap=True)
        arch = ck["config"]["autoencoder"]
        assert ck["config"]["data"]["image_size"] == 256
        assert arch["teacher"]["arch"] == PAPER_AE["teacher"]["arch"]
        assert arch["teacher"]["overrides"] is None
        assert arch["stem_widths"] == PAPER_AE["stem_widths"]
        for key in ("widths", "depths"):
            assert arch["decoder"][key] == PAPER_AE["decoder"][key]
        assert ck["teacher"]["weights"] == "random" and len(ck["teacher"]["sha256"]) == 64
        assert _shapes(ck["model"]) == _shapes(ck["ema"]) == _shapes(ae.trainable_state())
        held = _bytes(ck["model"]) + _bytes(ck["ema"])
        if k > 1:
            assert arch["discriminator"]["backbone"] == PAPER_AE["discriminator"]["backbone"]
            assert _shapes(ck["disc"]) == _shapes(disc.trainable_state())
            held += _bytes(ck["disc"])
        assert "optimizer" not in ck
        size = path.stat().st_size
        assert held <= size < held * 1.01, (k, size, held)
        print(f"stage {k} checkpoint: {size} bytes")

    # the cache: 16x16 tokens of 1024 channels per image (and per flipped image)
    g = zarr.open_group(work / "results/latents/train.zarr", mode="r")
    assert g.attrs["complete"] is True and list(g.attrs["grid"]) == [16, 16]
    n = manifest["count"]
    assert g["tokens"].shape == (n, 256, 1024)
    if cfg["latents"]["flip"]:
        assert g["tokens_flip"].shape == (n, 256, 1024)
    assert g.attrs["dtype"] == cfg["latents"]["dtype"]  # the paper config's int8
    tokens = latents.open_cache(work / "results/latents/train.zarr").read_rows(np.arange(1))[0]
    np.testing.assert_allclose(np.linalg.norm(tokens.astype(np.float32), axis=-1), 1.0,
                               atol=1e-3)

    # the DiT: LightningDiT-XL, parameter for parameter
    path = work / "results/dit/checkpoint.pt"
    ck = torch.load(path, weights_only=True, mmap=True)
    assert ck["config"]["dit"]["model"] == "XL" and ck["config"]["tokens"] == 256
    with torch.device("meta"):
        xl = build_dit("XL", 256, 1024, len(manifest["classes"]), [16, 16], None)
    assert _shapes(ck["ema"]) == _shapes(xl.state_dict())
    # parameters only: the state also holds fixed buffers (the sin-cos position table, ...)
    assert "optimizer" not in ck  # lean: weights and EMA
    held = _bytes(ck["model"]) + _bytes(ck["ema"])
    assert held <= path.stat().st_size < held * 1.01, (path.stat().st_size, held)
    params = sum(ck["ema"][name].numel() for name, _ in xl.named_parameters())
    assert params == sum(p.numel() for p in xl.parameters())
    assert sum(v.numel() for v in ck["ema"].values()) == sum(
        v.numel() for v in xl.state_dict().values())
    assert LIGHTNINGDIT_XL[0] < params < LIGHTNINGDIT_XL[1], params
    print(f"DiT-XL: {params} parameters; checkpoint: {path.stat().st_size} bytes")

    # decoded samples at 256x256, and both results files
    with h5py.File(work / "results/samples/samples.h5", "r") as f:
        assert f["images"].shape == (cfg["sample"]["num_samples"], 256, 256, 3)
    gfid = dict(line.split(": ", 1) for line in
                (work / "results/gfid.txt").read_text().splitlines())
    assert math.isfinite(float(gfid["FD_teacher"])) and "FID" not in gfid
    recon = dict(line.split(": ", 1) for line in
                 (work / "results/recon.txt").read_text().splitlines())
    assert math.isfinite(float(recon["PSNR"]))
