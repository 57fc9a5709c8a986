"""Checkpoints across layouts: the lean AE layout (teacher referenced by sha256), the layout
main wrote before it (teacher inside `model`/`ema`; built here, and as files that code wrote:
tests/fixtures/main_1447c9f), and DiT checkpoints of the network before it became the
reference LightningDiT (refused by name, never loaded half-way)."""

from pathlib import Path

import pytest
import torch
from helpers import tiny_config
from safetensors.torch import load_file

from dinosae.checkpoint import save_checkpoint, tensors_fingerprint
from dinosae.errors import CheckpointError, WeightsMismatchError
from dinosae.models.autoencoder import DinoSAE, ae_config, build_autoencoder
from dinosae.models.dit import build_dit, load_dit


@pytest.fixture(scope="module")
def cfg() -> dict:
    c = tiny_config()
    c["data"]["image_size"] = 32
    return c


def _lean(ae: DinoSAE, cfg: dict, sha: str) -> dict:
    state = ae.trainable_state()
    return {"kind": "dinosae-ae", "stage": 1, "step": 1, "config": ae_config(cfg),
            "teacher": {"weights": "random", "sha256": sha}, "model": state, "ema": state}


def test_lean_and_old_layouts_load_the_same_network(cfg, tmp_path):
    torch.manual_seed(1)
    ae = build_autoencoder(cfg)
    lean = _lean(ae, cfg, tensors_fingerprint(ae.teacher))
    assert not any(k.startswith("encoder.vit.") for k in lean["ema"])  # the teacher is not in it
    old = {**lean, "model": ae.state_dict(), "ema": ae.state_dict()}  # main's layout until now
    del old["teacher"]
    save_checkpoint(tmp_path / "lean.pt", lean)
    save_checkpoint(tmp_path / "old.pt", old)
    assert (tmp_path / "lean.pt").stat().st_size < (tmp_path / "old.pt").stat().st_size
    a, b = DinoSAE.load(tmp_path / "lean.pt"), DinoSAE.load(tmp_path / "old.pt")
    want = ae.state_dict()
    for m in (a, b):
        assert m.state_dict().keys() == want.keys()
        assert all(torch.equal(v, want[k]) for k, v in m.state_dict().items())


def test_lean_checkpoint_refuses_another_teacher(cfg, tmp_path):
    ae = build_autoencoder(cfg)
    save_checkpoint(tmp_path / "c.pt", _lean(ae, cfg, "0" * 64))
    with pytest.raises(CheckpointError, match="not the one this checkpoint was trained with"):
        DinoSAE.load(tmp_path / "c.pt")


def test_dit_of_the_earlier_network_is_refused_by_name(cfg, tmp_path):
    from helpers import save_dit_checkpoint

    dit = build_dit("tiny", 4, 192, 3, (2, 2))
    save_dit_checkpoint(tmp_path / "new.pt", cfg, dit, [2, 2], 3, 10.0, tmp_path / "ae.pt", 1)
    model, meta = load_dit(tmp_path / "new.pt")
    assert meta["tokens"] == 4 and sum(p.numel() for p in model.parameters()) == \
        sum(p.numel() for p in dit.parameters())
    # the network before issue 15: no absolute position embedding, norms without weights
    old = {k: v for k, v in dit.state_dict().items()
           if k != "pos_embed" and not (".norm" in k and k.endswith(".weight"))}
    assert len(old) < len(dit.state_dict())
    ck = torch.load(tmp_path / "new.pt", weights_only=True)
    save_checkpoint(tmp_path / "old.pt", {**ck, "model": old, "ema": old})
    with pytest.raises(WeightsMismatchError, match="missing .*pos_embed"):
        load_dit(tmp_path / "old.pt")


OLD_MAIN = Path(__file__).parent / "fixtures" / "main_1447c9f"


@pytest.mark.parametrize("name", ["checkpoint", "export"])
def test_files_written_by_main_before_the_redesign_load_and_compute_the_same(name, tmp_path):
    # tests/fixtures/main_1447c9f: a stage checkpoint and an export written by main's code
    # before issue 14 (teacher and AdamW moments inside), with what that code computed from them
    import dinosae
    from dinosae.export import export_model

    ref = load_file(str(OLD_MAIN / "outputs.safetensors"))
    path = OLD_MAIN / ("ae_stage1.pt" if name == "checkpoint" else "export_ae")
    paths = [path]
    if name == "checkpoint":  # today's export of the old checkpoint, too
        paths.append(export_model({}, path, tmp_path / "export"))
    for p in paths:
        ae = dinosae.load_autoencoder(p, device="cpu")
        enc = ae.encode(ref["x"])
        for key, got in (("tokens", enc.tokens), ("norms", enc.norms),
                         ("decoded", ae.decode(enc.tokens, radius=enc.norms))):
            torch.testing.assert_close(got, ref[f"{name}/{key}"], rtol=0, atol=1e-6)
