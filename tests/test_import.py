"""Importing weights made elsewhere: the authors' DINO-SAE autoencoder (official parameter names,
built here by hand from their model code at a small width), DINOv3 in Meta's original format,
the hub path (with a stand-in Hugging Face cache), and generators."""

from __future__ import annotations

import math
import re

import pytest
import timm
import torch
import torch.nn.functional as F
from helpers import tiny_config

from dinosae import importers
from dinosae.errors import TeacherWeightsError, WeightsMismatchError
from dinosae.models.autoencoder import DinoSAE, build_autoencoder
from dinosae.models.encoder import create_teacher

pytestmark = pytest.mark.usefixtures("one_thread")

WIDTHS, DEPTHS = [8, 16, 16, 32, 64], [1, 2, 1, 1, 2]  # highest resolution first
BLOCKS = ["res", "res", "res", "evit", "evit"]


@pytest.fixture
def cfg(tmp_path):
    """tiny_config with the released decoder's flavour (official norms, no aggregation, no EViT
    norms) at a small width."""
    c = tiny_config(tmp_path)
    c["autoencoder"]["decoder"] = {"widths": WIDTHS, "depths": DEPTHS, "blocks": BLOCKS,
                                   "norm": "sample", "attn_scales": [], "evit_norm": False,
                                   "upsample": "interpolate"}
    return c


# ------------------------------------------------------------------ the official names, by hand

def timm_to_meta(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A timm DINOv3 state dict written in Meta's original format (facebookresearch/dinov3):
    storage_tokens, ls1/ls2.gamma, qkv.bias (+ bias_mask, k third masked), rope_embed.periods,
    mask_token. Written independently of timm's converter (which goes the other way)."""
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k.endswith(("attn.q_bias", "attn.v_bias")):
            continue
        k = k.replace("reg_token", "storage_tokens")
        k = re.sub(r"\.gamma_([12])$", r".ls\1.gamma", k)
        out[k] = v.clone()
    dim = sd["cls_token"].shape[-1]
    for k in [k for k in sd if k.endswith("attn.qkv.weight")]:
        blk = k[: -len("qkv.weight")]
        q = sd.get(blk + "q_bias", torch.zeros(dim))
        v = sd.get(blk + "v_bias", torch.zeros(dim))
        out[blk + "qkv.bias"] = torch.cat([q, torch.randn(dim), v])  # k part: masked out
        out[blk + "qkv.bias_mask"] = torch.cat([torch.ones(dim), torch.zeros(dim), torch.ones(dim)])
    head_dim = dim // 2
    out["rope_embed.periods"] = 100.0 ** (2 * torch.arange(head_dim // 4) / (head_dim // 2))
    out["mask_token"] = torch.zeros(1, dim)
    return out


def official_ae_state_dict(cfg: dict, vit_sd: dict | None, seed: int = 0,
                           evit_norm: bool = False, pixel_shuffle: bool = False
                           ) -> dict[str, torch.Tensor]:
    """A DINOSphericalAutoencoder state dict as the official code (wkdgnsgo/dino-sae
    src/model.py, src/efficientvit/models/nn/ops.py) names and shapes it, random values."""
    g = torch.Generator().manual_seed(seed)
    shapes: dict[str, tuple] = {}
    C = cfg["autoencoder"]["teacher"]["overrides"]["embed_dim"]
    w0, w1, w2 = cfg["autoencoder"]["stem_widths"]
    for i, (ci, co, k) in enumerate([(3, w0, 7), (w0, w1, 3), (w1, w2, 3), (w2, C, 3)]):
        shapes[f"dino_model.patch_embed.cnn.{i}.conv.weight"] = (co, ci, k, k)  # no bias
        if i < 3:
            shapes[f"dino_model.patch_embed.cnn.{i}.norm.weight"] = (1, co, 1, 1)
    d = "decoder."
    widths, depths = WIDTHS, DEPTHS
    n = len(widths)
    shapes[d + "project_in.main.conv.weight"] = (widths[-1], C, 3, 3)
    shapes[d + "project_in.main.conv.bias"] = (widths[-1],)
    for k, sid in enumerate(reversed(range(n))):  # stages: lowest resolution first
        w, ops = widths[sid], []
        if sid < n - 1 and depths[sid] > 0:
            f = 4 if pixel_shuffle else 1  # ConvPixelShuffle: conv to 4w, then shuffle
            ops.append({"main.conv.conv.weight": (f * w, widths[sid + 1], 3, 3),
                        "main.conv.conv.bias": (f * w,)})
        for _ in range(depths[sid]):
            if BLOCKS[sid] == "res":
                ops.append({"main.conv1.conv.weight": (w, w, 3, 3), "main.conv1.conv.bias": (w,),
                            "main.conv2.conv.weight": (w, w, 3, 3),
                            "main.conv2.norm.weight": (1, w, 1, 1)})
            else:  # EViT_GLU: head dim 32, expand 4, scales ()
                total, mid = (w // 32) * 32, 4 * w
                op = {"context_module.main.qkv.conv.weight": (3 * total, w, 1, 1),
                      "context_module.main.proj.conv.weight": (w, total, 1, 1),
                      "local_module.main.inverted_conv.conv.weight": (2 * mid, w, 1, 1),
                      "local_module.main.inverted_conv.conv.bias": (2 * mid,),
                      "local_module.main.depth_conv.conv.weight": (2 * mid, 1, 3, 3),
                      "local_module.main.depth_conv.conv.bias": (2 * mid,),
                      "local_module.main.point_conv.conv.weight": (w, mid, 1, 1)}
                if evit_norm:
                    op["context_module.main.proj.norm.weight"] = (1, w, 1, 1)
                    op["local_module.main.point_conv.norm.weight"] = (1, w, 1, 1)
                ops.append(op)
        for j, op in enumerate(ops):
            for name, shape in op.items():
                shapes[f"{d}stages.{k}.op_list.{j}.{name}"] = shape
    shapes[d + "project_out.op_list.0.weight"] = (1, widths[0], 1, 1)
    shapes[d + "project_out.op_list.2.conv.weight"] = (3, widths[0], 3, 3)
    shapes[d + "project_out.op_list.2.conv.bias"] = (3,)
    sd = {}
    for name, shape in shapes.items():
        t = torch.randn(shape, generator=g)
        fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
        sd[name] = 1.0 + 0.1 * t if "norm" in name else t / math.sqrt(fan_in)
    for k, v in (vit_sd or {}).items():  # their ViT, its patch embedding replaced by the stem
        if not k.startswith("patch_embed."):
            sd[f"dino_model.{k}"] = v
    return sd


def _rms(x, w):  # their RMSNorm2d
    return w * (x * torch.rsqrt(x.pow(2).mean(dim=(1, 2, 3), keepdim=True) + 1e-6))


def _conv(sd, name, x, stride=1, groups=1):
    w = sd[name + ".weight"]
    return F.conv2d(x, w, sd.get(name + ".bias"), stride=stride, padding=w.shape[-1] // 2,
                    groups=groups)


def official_stem(sd, x):
    """Their CnnPatchEmbed forward, written from their code with plain functionals."""
    for i in range(4):
        x = _conv(sd, f"dino_model.patch_embed.cnn.{i}.conv", x, stride=2)
        if i < 3:
            x = F.silu(_rms(x, sd[f"dino_model.patch_embed.cnn.{i}.norm.weight"]))
    return x.permute(0, 2, 3, 1)


def official_decoder(sd, z, pixel_shuffle=False):
    """Their DCAE_Decoder forward on (B, C, h, w) (linear attention; their LiteMLA would switch
    to quadratic attention on maps of <= 32 positions, which paper-scale decoders never have)."""
    d = "decoder."
    x = _conv(sd, d + "project_in.main.conv", z) + z.repeat_interleave(WIDTHS[-1] // z.shape[1], 1)
    n = len(WIDTHS)
    for k, sid in enumerate(reversed(range(n))):
        w, j = WIDTHS[sid], 0
        if sid < n - 1:
            pre = f"{d}stages.{k}.op_list.0."
            if pixel_shuffle:
                y = F.pixel_shuffle(_conv(sd, pre + "main.conv.conv", x), 2)
            else:
                y = _conv(sd, pre + "main.conv.conv", F.interpolate(x, scale_factor=2.0))
            x = y + F.pixel_shuffle(x.repeat_interleave(4 * w // x.shape[1], 1), 2)
            j = 1
        for b in range(DEPTHS[sid]):
            pre = f"{d}stages.{k}.op_list.{j + b}."
            if BLOCKS[sid] == "res":
                h = F.silu(_conv(sd, pre + "main.conv1.conv", x))
                x = x + _rms(_conv(sd, pre + "main.conv2.conv", h),
                             sd[pre + "main.conv2.norm.weight"])
                continue
            qkv = _conv(sd, pre + "context_module.main.qkv.conv", x)
            B, _, H, W = qkv.shape
            qkv = qkv.reshape(B, -1, 3 * 32, H * W)
            q, kk, v = F.relu(qkv[:, :, :32]), F.relu(qkv[:, :, 32:64]), qkv[:, :, 64:]
            v = F.pad(v, (0, 0, 0, 1), value=1.0)
            att = (v @ kk.transpose(-1, -2)) @ q
            att = (att[:, :, :-1] / (att[:, :, -1:] + 1e-15)).reshape(B, -1, H, W)
            x = x + _conv(sd, pre + "context_module.main.proj.conv", att)
            h = F.silu(_conv(sd, pre + "local_module.main.inverted_conv.conv", x))
            h = _conv(sd, pre + "local_module.main.depth_conv.conv", h, groups=h.shape[1])
            a, gate = h.chunk(2, dim=1)
            x = x + _conv(sd, pre + "local_module.main.point_conv.conv", a * F.silu(gate))
    x = F.relu(_rms(x, sd[d + "project_out.op_list.0.weight"]))
    return _conv(sd, d + "project_out.op_list.2.conv", x)


def random_vit_sd(cfg: dict, arch: str | None = None) -> tuple[torch.nn.Module, dict]:
    """A tiny timm DINOv3 with every parameter random (layer scales and norms too)."""
    t = cfg["autoencoder"]["teacher"]
    m = timm.create_model(arch or t["arch"], pretrained=False, num_classes=0,
                          img_size=cfg["data"]["image_size"], **t["overrides"])
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            scale = 0.5 if ("gamma" in name or "norm" in name) else 0.05
            base = 1.0 if ("gamma" in name or name.endswith("norm1.weight")
                           or name.endswith("norm2.weight") or name == "norm.weight") else 0.0
            p.copy_(base + scale * torch.randn(p.shape, generator=g))
    return m.eval(), {k: v.clone() for k, v in m.state_dict().items()}


# ------------------------------------------------------------------ autoencoder


def test_official_names_map_onto_our_modules_and_compute_the_same(cfg, tmp_path):
    _, vit_sd = random_vit_sd(cfg)
    sd = official_ae_state_dict(cfg, timm_to_meta(vit_sd))
    ae = build_autoencoder(cfg)
    given, names, expected, problems, teacher = importers.map_official_ae(sd, ae)
    assert problems == []  # nothing missing, unexpected or wrongly shaped
    own = set(ae.state_dict())
    assert set(given) == own - {k for k in own if k.startswith("encoder.vit.patch_embed.")}
    assert "file" in teacher

    path = tmp_path / "dino_sae.pth"
    torch.save({"epoch": 3, "ema": sd, "model": {k: v * 0 for k, v in sd.items()}}, path)
    out = importers.import_autoencoder(cfg, str(path), tmp_path / "stage4" / "checkpoint.pt")
    model = DinoSAE.load(out)
    # the teacher ViT: the file's (Meta names), except its patch embedding (the config's)
    for k, v in vit_sd.items():
        if not k.startswith("patch_embed."):
            assert torch.equal(model.encoder.vit.state_dict()[k], v), k
    # the imported modules compute what the official forward computes from the official tensors
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        xn = model.encoder.normalize(x)
        torch.testing.assert_close(model.encoder.stem(xn), official_stem(sd, xn))
        z = torch.randn(2, 4, 64)
        ref = official_decoder(sd, z.transpose(1, 2).reshape(2, 64, 2, 2))
        torch.testing.assert_close(model.decode(z), 0.5 * ref + 0.5, rtol=1e-4, atol=1e-5)


def test_stem_and_decoder_only_release_takes_the_configured_teacher(cfg, tmp_path):
    sd = official_ae_state_dict(cfg, None)
    ae = build_autoencoder(cfg)
    _, _, _, problems, teacher = importers.map_official_ae(sd, ae)
    assert problems == [] and "autoencoder.teacher.weights" in teacher


def test_every_mismatch_is_listed_by_name(cfg, tmp_path):
    _, vit_sd = random_vit_sd(cfg)
    sd = official_ae_state_dict(cfg, timm_to_meta(vit_sd))
    wrong = "decoder.stages.2.op_list.1.main.conv1.conv.weight"
    sd[wrong] = torch.zeros(5, 16, 3, 3)
    del sd["dino_model.patch_embed.cnn.1.norm.weight"]
    sd["decoder.stages.0.op_list.0.extra.weight"] = torch.zeros(3)
    sd["dino_model.blocks.1.mlp.fc1.weight"] = torch.zeros(7, 64)
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    with pytest.raises(WeightsMismatchError) as e:
        importers.import_autoencoder(cfg, str(path), tmp_path / "out.pt")
    msg = str(e.value)
    assert "4 mismatches" in msg
    assert f"wrong shape decoder.stages.2.1.conv1.weight (in the file: {wrong}): [5, 16, 3, 3]" \
        in msg
    assert "missing encoder.stem.layers.1.norm.weight (in the file: " \
           "dino_model.patch_embed.cnn.1.norm.weight)" in msg
    assert "unexpected decoder.stages.0.op_list.0.extra.weight" in msg
    assert "wrong shape encoder.vit.blocks.1.mlp.fc1.weight: [7, 64] in the file" in msg
    assert not (tmp_path / "out.pt").exists()


def test_wrong_decoder_flavour_is_named_with_a_hint(cfg, tmp_path):
    sd = official_ae_state_dict(cfg, None, evit_norm=True)  # their EViT blocks with norms
    path = tmp_path / "norms.pth"
    torch.save(sd, path)
    with pytest.raises(WeightsMismatchError, match=r"evit_norm: true") as e:
        importers.import_autoencoder(cfg, str(path), tmp_path / "out.pt")
    assert "unexpected decoder.stages.0.op_list.0.context_module.main.proj.norm.weight" \
        in str(e.value)
    cfg["autoencoder"]["decoder"]["evit_norm"] = True
    importers.import_autoencoder(cfg, str(path), tmp_path / "out.pt")
    cfg["autoencoder"]["decoder"]["norm"] = "channel"  # our default: norms with a bias
    with pytest.raises(WeightsMismatchError, match=r"norm: sample"):
        importers.import_autoencoder(cfg, str(path), tmp_path / "out2.pt")


def test_pixel_shuffle_upsampling(cfg, tmp_path):
    sd = official_ae_state_dict(cfg, None, pixel_shuffle=True)  # DC-AE's ConvPixelShuffle
    path = tmp_path / "ps.pth"
    torch.save(sd, path)
    with pytest.raises(WeightsMismatchError, match=r"upsample: pixel_shuffle"):
        importers.import_autoencoder(cfg, str(path), tmp_path / "out.pt")
    cfg["autoencoder"]["decoder"]["upsample"] = "pixel_shuffle"
    model = DinoSAE.load(importers.import_autoencoder(cfg, str(path), tmp_path / "out.pt"))
    z = torch.randn(2, 4, 64)
    with torch.no_grad():
        ref = official_decoder(sd, z.transpose(1, 2).reshape(2, 64, 2, 2), pixel_shuffle=True)
        torch.testing.assert_close(model.decode(z), 0.5 * ref + 0.5, rtol=1e-4, atol=1e-5)


def _stand_in_hub(tmp_path, monkeypatch, files: dict[str, bytes]) -> None:
    """A Hugging Face cache holding wkdgnsgo/dino-sae at one revision; the hub offline."""
    import huggingface_hub.constants as hf_constants

    cache = tmp_path / "hub"
    repo = cache / "models--wkdgnsgo--dino-sae"
    rev = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(rev)
    for name, data in files.items():
        f = repo / "snapshots" / rev / name
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(data)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))


def test_hub_source_from_a_stand_in_cache(cfg, tmp_path, monkeypatch):
    sd = official_ae_state_dict(cfg, None)
    local = tmp_path / "local.pth"
    torch.save(sd, local)
    _stand_in_hub(tmp_path, monkeypatch, {"dino_sae_ae.pth": local.read_bytes(),
                                          "ddt_xl_80ep.pth": b"not read", "README.md": b"hi"})
    a = importers.import_autoencoder(cfg, str(local), tmp_path / "a.pt")
    for spec in ("hf-hub:wkdgnsgo/dino-sae/dino_sae_ae.pth", "hf-hub:wkdgnsgo/dino-sae"):
        b = importers.import_autoencoder(cfg, spec, tmp_path / "b.pt")
        ea, eb = torch.load(a, weights_only=True)["ema"], torch.load(b, weights_only=True)["ema"]
        assert all(torch.equal(ea[k], eb[k]) for k in ea)
    # the hub, offline, without the file: one clear message
    with pytest.raises(importers.WeightsSourceError, match="local path"):
        importers.import_autoencoder(cfg, "hf-hub:wkdgnsgo/dino-sae/missing.pth",
                                     tmp_path / "c.pt")


def test_unknown_files_are_refused(cfg, tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"state_dict": {"encoder.conv.weight": torch.zeros(2)}}, path)
    with pytest.raises(Exception, match="not a DINO-SAE autoencoder"):
        importers.import_autoencoder(cfg, str(path), tmp_path / "out.pt")


# ------------------------------------------------------------------ DINOv3 in Meta's format


@pytest.mark.parametrize("arch", ["vit_small_patch16_dinov3", "vit_small_patch16_dinov3_qkvb"])
def test_meta_format_dinov3_gives_the_same_features_as_timm_format(cfg, tmp_path, arch):
    from safetensors.torch import save_file

    tcfg = {**cfg["autoencoder"]["teacher"], "arch": arch}
    src, sd = random_vit_sd(cfg, arch)
    save_file(sd, str(tmp_path / "timm.safetensors"))
    meta = timm_to_meta(sd)
    assert "storage_tokens" in meta and "blocks.0.ls1.gamma" in meta
    torch.save(meta, tmp_path / "dinov3_meta.pth")
    via_timm = create_teacher({**tcfg, "weights": str(tmp_path / "timm.safetensors")}, 32)
    via_meta = create_teacher({**tcfg, "weights": str(tmp_path / "dinov3_meta.pth")}, 32)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        f_timm, f_meta, f_src = (m.forward_features(x) for m in (via_timm, via_meta, src))
    assert torch.equal(f_meta, f_timm)
    assert torch.equal(f_meta, f_src)
    random = create_teacher(tcfg, 32)
    with torch.no_grad():
        assert not torch.allclose(random.forward_features(x), f_src)


def test_meta_format_mismatches_are_listed(cfg, tmp_path):
    tcfg = cfg["autoencoder"]["teacher"]
    _, sd = random_vit_sd(cfg)
    meta = timm_to_meta(sd)
    meta["blocks.1.mlp.fc2.weight"] = torch.zeros(64, 100)
    del meta["blocks.0.norm2.bias"]
    torch.save(meta, tmp_path / "bad.pth")
    with pytest.raises(TeacherWeightsError) as e:
        create_teacher({**tcfg, "weights": str(tmp_path / "bad.pth")}, 32)
    assert "missing blocks.0.norm2.bias" in str(e.value)
    assert "wrong shape blocks.1.mlp.fc2.weight: [64, 100] in the file, [64, 256]" in str(e.value)
    # a real q/v bias cannot go into an architecture without one
    meta = timm_to_meta(sd)
    meta["blocks.0.attn.qkv.bias"][0] = 1.0
    torch.save(meta, tmp_path / "bias.pth")
    with pytest.raises(TeacherWeightsError, match=r"blocks\.0\.attn\.qkv\.bias: a nonzero.*qkvb"):
        create_teacher({**tcfg, "weights": str(tmp_path / "bias.pth")}, 32)


# ------------------------------------------------------------------ generators


def test_malformed_reference_generator_is_one_error(cfg, tmp_path):
    """Reference names with shapes no reference network has: one message listing the file's
    keys, not a traceback (the real layouts are tested in test_dit_parity.py)."""
    sd = {"s_embedder.proj.weight": torch.zeros(2), "s_projector.weight": torch.zeros(2),
          "t_embedder.mlp.0.weight": torch.zeros(2), "pos_embed": torch.zeros(2)}
    sd.update({f"blocks.{i}.attn.qkv.weight": torch.zeros(2) for i in range(30)})
    torch.save({"ema": sd}, tmp_path / "ddt.pth")
    with pytest.raises(importers.ConfigError, match=r"not shaped as the reference's") as e:
        importers.import_generator(cfg, str(tmp_path / "ddt.pth"), tmp_path / "dit.pt")
    assert "blocks.{0..29}.attn.qkv.weight" in str(e.value)
    assert "s_projector.weight" in str(e.value)
    torch.save({"model": {"encoder.weight": torch.zeros(2)}}, tmp_path / "other.pth")
    with pytest.raises(importers.ConfigError, match=r"not a generator dinosae can import"):
        importers.import_generator(cfg, str(tmp_path / "other.pth"), tmp_path / "dit.pt")
    assert not (tmp_path / "dit.pt").exists()
