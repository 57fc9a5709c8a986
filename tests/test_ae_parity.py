"""The autoencoder's reference parity: the authors' stem and decoder code (github wkdgnsgo/HAE
src/model.py) and RAE's DINO discriminator (github bytetriper/RAE src/disc/), each run outside
this repository on fixed weights; inputs, weights and outputs saved under tests/fixtures/ by the
make.py beside them. Ours must give the same numbers within 1e-5."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml
from helpers import ROOT, tiny_config
from safetensors.torch import load_file

from dinosae.config import validate
from dinosae.importers import import_autoencoder
from dinosae.models.autoencoder import DinoSAE

FIXTURES = Path(__file__).parent / "fixtures"

pytestmark = pytest.mark.usefixtures("one_thread")


def official_config() -> dict:
    """The paper config's autoencoder at the fixture's small size: only widths, depths, the
    teacher's size and the image size differ from workflow/configs/imagenet256.yaml."""
    paper = yaml.safe_load((ROOT / "workflow/configs/imagenet256.yaml").read_text())
    cfg = tiny_config()
    ae = copy.deepcopy(paper["autoencoder"])
    ae["teacher"].update(arch="vit_small_patch16_dinov3", weights="random",
                         overrides={"embed_dim": 32, "depth": 1, "num_heads": 1})
    ae["decoder"].update(widths=[16, 32, 32, 32, 32], depths=[1, 1, 1, 1, 2])
    ae["lpips"]["weights"] = "random"
    cfg["autoencoder"] = ae
    cfg["data"]["image_size"] = 64
    return validate(cfg, check_paths=False)


def test_official_stem_and_decoder_imported_with_no_override_match_the_authors_code(tmp_path):
    fx = FIXTURES / "official_ae"
    cfg = official_config()
    import_autoencoder(cfg, str(fx / "weights.safetensors"), tmp_path / "ae.pt")
    ae = DinoSAE.load(tmp_path / "ae.pt")
    io = load_file(fx / "io.safetensors")
    with torch.no_grad():
        stem_out = ae.encoder.stem(io["stem_in"])  # NHWC, as their CnnPatchEmbed returns
        z = io["dec_in"].flatten(2).transpose(1, 2)  # their (B, C, h, w) grid as our tokens
        rec = ae.decode(z)
    torch.testing.assert_close(stem_out, io["stem_out"], rtol=0, atol=1e-5)
    # ours maps their [-1, 1] output to [0, 1]
    torch.testing.assert_close(2 * rec - 1, io["dec_out"], rtol=0, atol=1e-5)
    assert io["dec_out"].abs().mean() > 0.1  # a real signal, not a dead network


def _rae_head_name(name: str) -> str:
    """RAE's head keys (nn.Sequential, old-style spectral norm) -> DinoHead's."""
    import re

    for theirs, ours in ((r"\.0\.0\.", ".conv_in."), (r"\.0\.1\.", ".norm_in."),
                         (r"\.1\.fn\.0\.", ".conv_mid."), (r"\.1\.fn\.1\.", ".norm_mid."),
                         (r"\.2\.", ".conv_out.")):
        name = re.sub(r"^(heads\.\d+)" + theirs, r"\1" + ours, name)
    for theirs, ours in (("weight_orig", "original"), ("weight_u", "_u"), ("weight_v", "_v")):
        sub = "" if theirs == "weight_orig" else "0."  # _u, _v live on parametrization 0
        name = name.replace(f".{theirs}", f".parametrizations.weight.{sub}{ours}")
    return name


def test_rae_dino_discriminator_diffaug_and_loss_match_rae_code(tmp_path):
    import json

    from helpers import seeded_weights

    from dinosae.models.discriminator import DinoDiscriminator, d_hinge_loss, rae_diffaug

    fx = load_file(FIXTURES / "rae_disc" / "fixture.safetensors")
    meta = json.loads((FIXTURES / "rae_disc" / "meta.json").read_text())
    w = seeded_weights(meta["shapes"], meta["seed"])
    sums = torch.tensor([w[k].double().sum().item() for k in sorted(w)], dtype=torch.float64)
    torch.testing.assert_close(sums, fx["sums"], rtol=0, atol=1e-9)  # the same stand-in weights
    torch.save({k: v for k, v in w.items() if not k.startswith("heads.")}, tmp_path / "dino.pth")
    disc = DinoDiscriminator(str(tmp_path / "dino.pth"))  # a local file; k's bias zeroed
    disc.load_trainable({_rae_head_name(k): v for k, v in w.items() if k.startswith("heads.")})

    def close(got, want):  # logits reach ~1e2: within 1e-5 of the reference's scale
        scale = max(1.0, float(want.abs().max()))
        assert float((got - want).abs().max()) <= 1e-5 * scale

    x = fx["x"]
    with torch.no_grad():
        disc.eval()
        close(disc(x), fx["logits_eval"])  # the stored spectral-norm vectors
        disc.train()
        logits = disc(x)  # one power iteration, as RAE's training forward
    close(logits, fx["logits_train"])
    close(0.5 * d_hinge_loss(logits[0:1], logits[1:2]), fx["d_loss"][0])
    aug = rae_diffaug(x, torch.Generator().manual_seed(meta["aug_seed"]))
    torch.testing.assert_close(aug, fx["aug"], rtol=0, atol=1e-6)


def test_quantize_is_rae_8bit_fakes():
    from dinosae.models.discriminator import quantize

    x = torch.rand(2, 3, 8, 8) * 1.4 - 0.2  # reconstructions overshoot [0, 1]
    pm1 = (2 * x - 1).clamp(-1, 1)  # RAE: fakes in [-1, 1], clamped, rounded to 8 bits
    rae = torch.round((pm1 + 1) * 127.5) / 127.5 - 1
    torch.testing.assert_close(2 * quantize(x) - 1, rae, rtol=0, atol=1e-6)
