"""The generators are the reference networks: weights of hustvl/LightningDiT's LightningDiT, RAE's
LightningDiT and RAE's DiTwDDTHead, with the inputs and outputs those codes computed from them
(tests/fixtures/dit_*.safetensors, made by bench/make_dit_fixtures.py running the reference
code), go through the importer into dinosae's networks and give the same outputs (1e-5, fp32);
a 4-step run of dinosae's sampler on the imported generator gives what the reference's own ODE
sampler gave from the same noise (1e-4); each switch (pos_embed, qk_norm) changes the output."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from dinosae import importers, rfm, sphere
from dinosae.errors import WeightsMismatchError
from dinosae.generate import sampler_settings
from dinosae.models import dit as D
from dinosae.models.dit import load_dit

pytestmark = pytest.mark.usefixtures("one_thread")

FIXTURES = Path(__file__).parent / "fixtures"
NAMES = ["lightningdit_hustvl", "lightningdit_rae", "ddt_rae"]


def fixture(name: str) -> tuple[dict, dict, dict]:
    """(reference state dict in fp32, other tensors, metadata) of one fixture file."""
    path = FIXTURES / f"dit_{name}.safetensors"
    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["json"])
    sd = {k[len("weights/"):]: v.float() for k, v in tensors.items() if k.startswith("weights/")}
    rest = {k: v for k, v in tensors.items() if not k.startswith("weights/")}
    return sd, rest, meta


def dit_section(meta: dict, **changes) -> dict:
    """The config's dit section describing the fixture's network ('ref' size: see below)."""
    kw = meta["kwargs"]
    head = None
    if isinstance(kw["hidden_size"], list):
        head = {"depth": kw["depth"][1], "width": kw["hidden_size"][1],
                "heads": kw["num_heads"][1]}
    return {"model": "ref", "head": head, "path": "euclidean", "qk_norm": kw["use_qknorm"],
            "pos_embed": kw.get("use_pos_embed", True),
            "time_embed": "fourier" if "RAE" in meta["reference"] else "sinusoidal", **changes}


@pytest.fixture
def ref_size(monkeypatch):
    """A named size equal to the fixtures' trunk (32 wide, 2 blocks, 2 heads)."""
    monkeypatch.setitem(D.SIZES, "ref", (32, 2, 2))


def import_fixture(name: str, tmp_path: Path, **changes) -> tuple[Path, dict, dict]:
    """The fixture's weights as the reference's training code saves them (EMA and model
    weights; the EMA ones are the reference's), imported with importers.import_generator."""
    sd, rest, meta = fixture(name)
    src = tmp_path / f"{name}.pt"
    torch.save({"step": 7, "model": {k: torch.zeros_like(v) for k, v in sd.items()},
                "ema": sd, "optimizer": {"state": {}, "param_groups": []}}, src)
    cfg = {"dit": dit_section(meta, **changes)}
    out = importers.import_generator(cfg, str(src), tmp_path / f"{name}_dit.pt")
    return out, rest, meta


@pytest.mark.parametrize("name", NAMES)
def test_imported_generator_reproduces_the_reference_outputs(name, tmp_path, ref_size):
    out, rest, meta = import_fixture(name, tmp_path)
    ck = torch.load(out, weights_only=True)
    assert ck["step"] == 7 and ck["imported"]["container"] == "ema"
    assert ck["config"]["convention"] == ("sit" if "hustvl" in name else "rae")
    assert ck["config"]["grid"] == [4, 4] and ck["config"]["num_classes"] == 10
    model, _ = load_dit(out)
    net = getattr(model, "net", model)  # the network itself, in its own time convention
    with torch.no_grad():
        got = net(rest["x"], rest["t"], rest["y"])
    assert got.shape == rest["out"].shape
    assert (got - rest["out"]).abs().max().item() < 1e-5
    assert rest["out"].abs().max() > 1.0  # a non-trivial output (adaLN, final layer not zero)


@pytest.mark.parametrize("name", NAMES)
def test_our_position_tables_are_the_references(name):
    """The fixed tables are not just loaded from the file: ours, built from the grid, are equal
    (the absolute sin-cos embedding, and the RoPE buffers the importer checks)."""
    sd, _, meta = fixture(name)
    kw = meta["kwargs"]
    if "ddt" in name:
        model = D.DiTDH(16, 32, 10, (4, 4), 32, 2, 2, head_depth=1, head_width=40, head_heads=2)
    else:
        model = D.LightningDiT(16, 32, 10, (4, 4), kw["hidden_size"], kw["depth"],
                               kw["num_heads"])
    torch.testing.assert_close(model.pos_embed, sd["pos_embed"], rtol=0, atol=1e-6)
    for theirs, ours in importers._derived_tables(model).items():
        torch.testing.assert_close(ours, sd[theirs], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["lightningdit_hustvl", "ddt_rae"])
def test_sampler_reproduces_the_reference_sampler(name, tmp_path, ref_size):
    """4 Euler steps of dinosae's sampler on the imported generator, from the reference's noise,
    with its guidance, time shift and grid: the reference sampler's result (the Euclidean path
    returns tokens on radius sqrt(C); compared after that projection)."""
    out, rest, meta = import_fixture(name, tmp_path)
    model, info = load_dit(out)
    s = meta["sampler"]
    if "hustvl" in name:  # t = 0 noise there: its shift 0.3 is 1/0.3 here, its interval [a, 1]
        alpha, interval = 1 / s["timestep_shift"], (0.0, 1 - s["cfg_interval_start"])
        assert info["alpha"] == pytest.approx(alpha)  # recorded by the importer
    else:
        alpha, interval = s["time_dist_shift"], tuple(s["cfg_interval"])
    kwargs = sampler_settings(info, s["num_steps"])
    assert kwargs["steps"] == 4
    r = info["radius"]
    z = rfm.sample(model, rest["labels"], cfg_scale=s["cfg_scale"], r=r, alpha=alpha,
                   shape=(16, 32), guidance_interval=interval, z1=rest["noise"], **kwargs)
    want = sphere.project(rest["sample"], r)
    assert (z - want).abs().max().item() < 1e-4
    # and the settings matter: dinosae's own grid (or all-channel guidance) is another result
    own = rfm.sample(model, rest["labels"], s["num_steps"] - 1, s["cfg_scale"], r, alpha,
                     shape=(16, 32), guidance_interval=interval, z1=rest["noise"],
                     path="euclidean")
    assert (own - want).abs().max().item() > 1e-2


def _load(model: torch.nn.Module, sd: dict) -> torch.nn.Module:
    given, _, problems = importers.map_reference_dit(sd, model)
    state = model.state_dict()
    state.update(given)
    model.load_state_dict(state)
    return model.eval()


def test_pos_embed_switch_matters():
    sd, rest, _ = fixture("lightningdit_hustvl")
    args = (16, 32, 10, (4, 4), 32, 2, 2)
    on = _load(D.LightningDiT(*args, time_embed="sinusoidal"), sd)
    off = _load(D.LightningDiT(*args, time_embed="sinusoidal", pos_embed=False),
                {k: v for k, v in sd.items() if k != "pos_embed"})
    assert "pos_embed" not in off.state_dict()
    with torch.no_grad():
        a, b = on(rest["x"], rest["t"], rest["y"]), off(rest["x"], rest["t"], rest["y"])
    assert (a - rest["out"]).abs().max() < 1e-5
    assert (a - b).abs().max() > 0.1


def test_qk_norm_switch_matters():
    sd, rest, _ = fixture("ddt_rae")
    args = (16, 32, 10, (4, 4), 32, 2, 2)
    kw = dict(head_depth=1, head_width=40, head_heads=2)
    plain = _load(D.DiTDH(*args, **kw), sd)
    normed = D.DiTDH(*args, **kw, qk_norm=True)
    extra = {k: torch.ones_like(v) for k, v in normed.state_dict().items()
             if "q_norm" in k or "k_norm" in k}
    assert len(extra) == 2 * 3  # q and k in each of the 3 blocks
    normed = _load(normed, {**sd, **{importers._map(k, importers._ddt_names(2))[0]: v
                                     for k, v in extra.items()}})
    with torch.no_grad():
        a = plain(rest["x"], rest["t"], rest["y"])
        b = normed(rest["x"], rest["t"], rest["y"])
    assert (a - rest["out"]).abs().max() < 1e-5
    assert (a - b).abs().max() > 0.1


def test_mismatches_are_listed_with_the_config_keys_to_change(tmp_path, ref_size):
    with pytest.raises(WeightsMismatchError) as e:
        import_fixture("ddt_rae", tmp_path, qk_norm=True, head={"depth": 2, "width": 64})
    msg = str(e.value)
    assert msg.startswith("generator weights") and len(msg.splitlines()) == 1
    assert "missing blocks.0.attn.q_norm.weight" in msg
    assert "wrong shape head_blocks.0.attn.qkv.weight (in the file: blocks.2.attn.qkv.weight)" \
        in msg
    assert "missing head_blocks.1.norm1.weight (in the file: blocks.3.norm1.weight)" in msg
    assert 'set dit.head: {"depth": 1, "width": 40, "heads": 2}' in msg
    assert "set dit.qk_norm: false" in msg
    # a LightningDiT configured where the file is a DiTDH, and the wrong time embedding
    with pytest.raises(WeightsMismatchError) as e:
        import_fixture("ddt_rae", tmp_path, head=None, time_embed="sinusoidal")
    msg = str(e.value)
    assert "set dit.head:" in msg and "set dit.time_embed: \"fourier\"" in msg
    # hustvl's LightningDiT is a Euclidean flow
    with pytest.raises(importers.ConfigError, match=r"dit\.path.*euclidean"):
        import_fixture("lightningdit_hustvl", tmp_path, path="rfm")


def test_released_ddt_xl_layout_maps_without_mismatch():
    """RAE's DiTDH-XL config (the authors' DDT-XL): every key of the reference layout, built
    here on the meta device with the reference's names and shapes, has its place."""
    with torch.device("meta"):
        model = D.build_dit("XL", 256, 1024, 1000, (16, 16), {"depth": 2, "width": 2048})
    names = importers._ddt_names(28)
    ref = {}
    for ours, t in model.state_dict().items():
        theirs, how = importers._map(ours, names)
        ref[theirs] = torch.empty(*t.shape, 1, 1, device="meta") if how == importers._CONV else t
    assert "blocks.29.adaLN_modulation.1.weight" in ref and "s_projector.weight" in ref
    assert importers.map_reference_dit(ref, model)[2] == []
    assert list(ref["s_embedder.proj.weight"].shape) == [1152, 1024, 1, 1]
    assert list(ref["blocks.28.attn.qkv.weight"].shape) == [3 * 2048, 2048]
    file = importers._file_dit_shape(ref, "ddt")
    assert (file["hidden"], file["depth"], file["head"]["depth"], file["head"]["width"]) == \
        (1152, 28, 2, 2048)
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(839, rel=0.02)
    assert math.isclose(model.head_blocks[0].attn.head_dim, 128)


def test_import_from_the_hub_as_the_released_config_names_it(tmp_path, monkeypatch, ref_size):
    """hf-hub:wkdgnsgo/dino-sae (a stand-in Hugging Face cache, offline): the generator file is
    picked among the repository's files and imported exactly as the local file is."""
    from test_import import _stand_in_hub

    sd, rest, meta = fixture("ddt_rae")
    local = tmp_path / "local.pt"
    torch.save({"ema": sd}, local)
    _stand_in_hub(tmp_path, monkeypatch, {"ddt_xl_80ep.pt": local.read_bytes(),
                                          "dino_sae_ae.pth": b"not read", "README.md": b"hi"})
    cfg = {"dit": dit_section(meta)}
    a = importers.import_generator(cfg, str(local), tmp_path / "a.pt")
    b = importers.import_generator(cfg, "hf-hub:wkdgnsgo/dino-sae", tmp_path / "b.pt")
    ea, eb = (torch.load(p, weights_only=True)["ema"] for p in (a, b))
    assert ea.keys() == eb.keys() and all(torch.equal(ea[k], eb[k]) for k in ea)
