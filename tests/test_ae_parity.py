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
