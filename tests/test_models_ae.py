"""Autoencoder networks: stem, encoder, decoder, discriminator pieces, LPIPS, checkpoints.

Every check compares with an independent computation: plain loops or functional ops, timm's own
forward, the lpips/torchvision weights, or a hand-derived gradient."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from helpers import tiny_config

from dinosae.checkpoint import save_checkpoint
from dinosae.errors import LPIPSWeightsError, TeacherWeightsError
from dinosae.models.autoencoder import DinoSAE, build_autoencoder
from dinosae.models.decoder import Decoder, LiteMLA, UpSample, resize_channels
from dinosae.models.discriminator import (
    Discriminator,
    adaptive_weight,
    aug_color,
    aug_cutout,
    aug_translation,
    d_hinge_loss,
    g_hinge_loss,
    teacher_features,
)
from dinosae.models.encoder import create_teacher
from dinosae.models.perceptual import backbone_cache_file, build_lpips
from dinosae.models.stem import CNNStem, RMSNorm2d
from dinosae.train.ae import alignment_loss

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture()
def cfg():
    return tiny_config()


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------ stem

def test_rms_norm_2d_matches_formula():
    torch.manual_seed(0)
    norm = RMSNorm2d(5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(5))
    x = torch.randn(3, 5, 4, 6) * torch.tensor([0.1, 1.0, 30.0]).view(3, 1, 1, 1)
    got = norm(x).detach().double().numpy()
    xn, w = x.double().numpy(), norm.weight.detach().double().numpy()
    for b in range(3):
        rms = np.sqrt((xn[b] ** 2).mean() + norm.eps)  # one number per sample over C, H, W
        np.testing.assert_allclose(got[b], xn[b] / rms * w[:, None, None], rtol=1e-5, atol=1e-6)


def test_stem_layout_shape_and_manual_forward():
    torch.manual_seed(0)
    stem = CNNStem([8, 16, 24], embed_dim=40)
    convs = [layer.conv for layer in stem.layers]
    assert [c.kernel_size[0] for c in convs] == [7, 3, 3, 3]
    assert [c.stride[0] for c in convs] == [2, 2, 2, 2]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(3, 8), (8, 16), (16, 24), (24, 40)]
    assert all(c.bias is None for c in convs)
    with torch.no_grad():
        for layer in stem.layers[:3]:
            layer.norm.weight.copy_(torch.rand_like(layer.norm.weight) + 0.5)
    x = torch.randn(2, 3, 64, 48)
    y = stem(x)
    assert y.shape == (2, 4, 3, 40)  # NHWC, 16x downsampling, like timm's NHWC patch_embed

    h = x  # functional re-computation: same-padded stride-2 convs, RMS norm over (C,H,W), SiLU
    for i, layer in enumerate(stem.layers):
        k = layer.conv.kernel_size[0]
        h = F.conv2d(h, layer.conv.weight, stride=2, padding=k // 2)
        if i < 3:
            rms = h.pow(2).mean(dim=(1, 2, 3), keepdim=True).add(1e-6).sqrt()
            h = F.silu(h / rms * layer.norm.weight.view(1, -1, 1, 1))
    torch.testing.assert_close(y, h.permute(0, 2, 3, 1), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------- encoder

def test_encoder_and_teacher_match_timm_forward(cfg):
    torch.manual_seed(0)
    ae = build_autoencoder(cfg)
    x = _images(2, 32)
    xn = (x - torch.tensor(timm.data.IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)) / torch.tensor(
        timm.data.IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    vit = ae.teacher
    assert vit.num_prefix_tokens == 5  # CLS + 4 registers
    # teacher: timm's own forward_features, prefix tokens dropped
    ref_t = vit.forward_features(xn)[:, 5:]
    torch.testing.assert_close(ae.teacher_tokens(x), ref_t)
    # encoder: timm's forward_features with the stem plugged in as its patch_embed
    other = copy.deepcopy(vit)
    other.patch_embed = ae.encoder.stem
    z = ae.encode(x)
    assert z.shape == (2, 4, 64) and ae.grid == (2, 2) and ae.channels == 64
    torch.testing.assert_close(z, other.forward_features(xn)[:, 5:])
    # final norm: LayerNorm output per token has mean ~0 (before its affine, which is 1/0 here)
    assert z.mean(-1).abs().max() < 1e-4


def test_random_teacher_is_reproducible_and_frozen(cfg):
    torch.manual_seed(1)
    a = create_teacher(cfg["autoencoder"]["teacher"], 32)
    torch.manual_seed(2)
    b = create_teacher(cfg["autoencoder"]["teacher"], 32)
    for (k, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), k
    assert not any(p.requires_grad for p in a.parameters()) and not a.training


def test_gradients_reach_stem_and_decoder_never_vit(cfg):
    torch.manual_seed(0)
    ae = build_autoencoder(cfg).train()
    assert not ae.teacher.training  # the frozen ViT stays in eval mode
    vit_before = {k: v.clone() for k, v in ae.teacher.state_dict().items()}
    x = _images(2, 32)
    z, rec = ae(x)
    loss = (rec - x).abs().mean() + alignment_loss(z, ae.teacher_tokens(x))
    loss.backward()
    for name, p in list(ae.encoder.stem.named_parameters()) + list(ae.decoder.named_parameters()):
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    for name, p in ae.teacher.named_parameters():
        assert p.grad is None, name
    opt = torch.optim.AdamW([p for p in ae.parameters() if p.requires_grad], lr=1e-2)
    opt.step()
    for k, v in ae.teacher.state_dict().items():
        assert torch.equal(v, vit_before[k]), k


def test_alignment_loss_matches_per_token_cosine():
    g = torch.Generator().manual_seed(0)
    z, zt = torch.randn(3, 5, 7, generator=g), torch.randn(3, 5, 7, generator=g)
    a, b = z.double().numpy(), zt.double().numpy()
    total = 0.0
    for i in range(3):
        for t in range(5):
            cos = a[i, t] @ b[i, t] / (np.linalg.norm(a[i, t]) * np.linalg.norm(b[i, t]))
            total += 1.0 - cos
    assert alignment_loss(z, zt).item() == pytest.approx(total / 15, rel=1e-5)
    assert alignment_loss(z, 3.0 * z).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_teacher_loads_local_file(tmp_path, cfg, suffix):
    tcfg = cfg["autoencoder"]["teacher"]
    src = timm.create_model(tcfg["arch"], pretrained=False, num_classes=0, **tcfg["overrides"])
    sd = {k: v.contiguous() for k, v in src.state_dict().items()}
    path = tmp_path / f"teacher{suffix}"
    if suffix == ".pth":
        torch.save({"model": sd}, path)
    else:
        from safetensors.torch import save_file

        save_file(sd, str(path))
    teacher = create_teacher({**tcfg, "weights": str(path)}, 32)
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, sd[k]), k
    random_teacher = create_teacher(tcfg, 32)
    qkv = teacher.blocks[0].attn.qkv.weight
    assert not torch.equal(random_teacher.blocks[0].attn.qkv.weight, qkv)


def test_teacher_weight_errors(tmp_path, cfg, monkeypatch):
    tcfg = cfg["autoencoder"]["teacher"]
    with pytest.raises(TeacherWeightsError, match="does not exist"):
        create_teacher({**tcfg, "weights": str(tmp_path / "missing.pth")}, 32)
    wrong = timm.create_model(tcfg["arch"], pretrained=False, num_classes=0, embed_dim=32,
                              depth=2, num_heads=2)
    torch.save(wrong.state_dict(), tmp_path / "wrong.pth")
    with pytest.raises(Exception, match="wrong.pth"):
        create_teacher({**tcfg, "weights": str(tmp_path / "wrong.pth")}, 32)
    # the hub, offline and with an empty cache: a clear message saying how to supply a file
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(TeacherWeightsError, match="local file"):
        create_teacher({**tcfg, "weights": "hf-hub:timm/vit_small_patch16_dinov3.lvd1689m"}, 32)


# ------------------------------------------------------------------------------- decoder

def test_resize_channels_duplicates_and_averages():
    x = torch.randn(2, 3, 4, 5)
    torch.testing.assert_close(resize_channels(x, 6), torch.cat([x[:, [c]] for c in
                                                                 (0, 0, 1, 1, 2, 2)], 1))
    y = torch.randn(2, 6, 4, 5)
    torch.testing.assert_close(resize_channels(y, 3),
                               torch.stack([(y[:, 0] + y[:, 1]) / 2, (y[:, 2] + y[:, 3]) / 2,
                                            (y[:, 4] + y[:, 5]) / 2], 1))
    # 3 -> 2 channels: duplicate to 6 = [a a b b c c], average pairs of three
    a, b, c = x[:, 0], x[:, 1], x[:, 2]
    torch.testing.assert_close(resize_channels(x, 2),
                               torch.stack([(2 * a + b) / 3, (b + 2 * c) / 3], 1))


def test_upsample_shortcut_is_channel_duplicating_pixel_shuffle():
    torch.manual_seed(0)
    up = UpSample(8, 4)  # 4 * 4 output channels from 8: each channel duplicated twice
    with torch.no_grad():
        up.conv.weight.zero_()
        up.conv.bias.zero_()
    x = torch.randn(1, 8, 3, 2)
    y = up(x)
    assert y.shape == (1, 4, 6, 4)
    r = 4 * 4 // 8
    for c in range(4):
        for i in range(3):
            for j in range(2):
                for di in range(2):
                    for dj in range(2):
                        src = (4 * c + 2 * di + dj) // r
                        assert y[0, c, 2 * i + di, 2 * j + dj] == x[0, src, i, j]


def test_lite_mla_matches_explicit_relu_linear_attention():
    torch.manual_seed(0)
    mla = LiteMLA(8, head_dim=4, scales=())  # 2 heads, no multi-scale branch
    with torch.no_grad():
        mla.norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 8, 3, 3)
    qkv = mla.qkv(x).double().reshape(2, 2, 12, 9)  # per head: 4 q, 4 k, 4 v channels
    out = torch.zeros(2, 2, 4, 9, dtype=torch.float64)
    for b in range(2):
        for h in range(2):
            q, k, v = F.relu(qkv[b, h, :4]), F.relu(qkv[b, h, 4:8]), qkv[b, h, 8:]
            for n in range(9):
                w = torch.stack([k[:, m] @ q[:, n] for m in range(9)])  # similarity to each m
                out[b, h, :, n] = (v * w).sum(1) / (w.sum() + mla.eps)
    ref = x + mla.norm(mla.proj(out.reshape(2, 8, 3, 3).float()))
    torch.testing.assert_close(mla(x), ref, rtol=1e-4, atol=1e-5)


def test_decoder_shapes_and_checkpointing():
    torch.manual_seed(0)
    dec = Decoder(24, (2, 3), widths=[8, 16, 16, 32, 32], depths=[1, 0, 1, 1, 2],
                  blocks=["res", "res", "res", "evit", "evit"])
    z = torch.randn(2, 6, 24, requires_grad=True)
    y = dec(z)
    assert y.shape == (2, 3, 32, 48)
    assert dec.last_layer is dec.conv_out.weight
    y.square().mean().backward()
    g = z.grad.clone()
    z.grad = None
    dec.grad_checkpointing = True
    y2 = dec(z)
    y2.square().mean().backward()
    torch.testing.assert_close(y2, y)
    torch.testing.assert_close(z.grad, g)
    with pytest.raises(ValueError, match="tokens"):
        dec(torch.randn(1, 4, 24))


# -------------------------------------------------------------------------- discriminator

def test_hinge_losses():
    real, fake = torch.tensor([[2.0, 0.5, -1.0]]), torch.tensor([[-3.0, 0.0, 0.5]])
    assert d_hinge_loss(real, fake).item() == pytest.approx(
        (0 + 0.5 + 2.0) / 3 + (0 + 1.0 + 1.5) / 3)
    assert g_hinge_loss(fake).item() == pytest.approx(-(-3.0 + 0.0 + 0.5) / 3)


def test_adaptive_weight_matches_hand_computation_on_two_layer_toy():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, generator=g)
    target, s = torch.randn(5, 2, generator=g), torch.randn(5, 2, generator=g)
    w1 = torch.randn(4, 3, generator=g, requires_grad=True)
    w2 = torch.randn(2, 4, generator=g, requires_grad=True)  # the "last layer"
    h = x @ w1.T
    y = h @ w2.T
    rec = ((y - target) ** 2).mean()
    gan = -(y * s).mean()
    # by hand: d rec/d W2 = 2/N (y - t)^T h,  d gan/d W2 = -1/N s^T h,  N = 10 elements
    hd, yd = h.detach().double(), y.detach().double()
    g_rec = 2.0 / 10 * (yd - target.double()).T @ hd
    g_gan = -1.0 / 10 * s.double().T @ hd
    expect = g_rec.norm() / (g_gan.norm() + 1e-6)
    lam = adaptive_weight(rec, gan, w2, max_value=1e4)
    assert lam.item() == pytest.approx(expect.item(), rel=1e-5)
    assert not lam.requires_grad
    assert adaptive_weight(rec, gan, w2, max_value=0.01).item() == pytest.approx(0.01)


def test_teacher_features_match_manual_block_run(cfg):
    torch.manual_seed(0)
    vit = create_teacher(cfg["autoencoder"]["teacher"], 32)
    x = _images(2, 32)
    feats = teacher_features(vit, x, [0, 1])
    mean = torch.tensor(timm.data.IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(timm.data.IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    h, rope = vit._pos_embed(vit.patch_embed((x - mean) / std))
    for i, block in enumerate(vit.blocks):
        h = block(h, rope=rope)
        ref = h[:, 5:].reshape(2, 2, 2, -1).permute(0, 3, 1, 2)
        torch.testing.assert_close(feats[i], ref)


def test_discriminator_heads_are_spectrally_normalised():
    torch.manual_seed(0)
    disc = Discriminator(16, [0, 1], channels=8).train()
    feats = [torch.randn(2, 16, 3, 3), torch.randn(2, 16, 3, 3)]
    for _ in range(30):  # power iterations run in training-mode forwards
        logits = disc(feats)
    assert logits.shape == (2, 18)
    convs = [m for m in disc.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 6
    for conv in convs:
        sigma = torch.linalg.matrix_norm(conv.weight.detach().flatten(1), ord=2)
        assert sigma.item() == pytest.approx(1.0, abs=0.02)


def test_diffaug_colour_translation_cutout():
    g = torch.Generator().manual_seed(0)
    # colour on a grey image: saturation and contrast leave it constant, brightness shifts it
    grey = torch.full((6, 3, 8, 8), 0.4)
    out = aug_color(grey, g)
    for b in range(6):
        v = out[b].flatten()
        assert torch.allclose(v, v[0].expand_as(v), atol=1e-6)
        assert -0.1 - 1e-6 <= v[0] <= 0.9 + 1e-6
    # translation: every sample is the input moved by one integer (dy, dx) with zero fill
    H = W = 16
    ramp = (torch.arange(H).view(H, 1) * 100 + torch.arange(W).view(1, W) + 1).float()
    x = ramp.expand(8, 3, H, W).clone()
    out = aug_translation(x, g=g)
    for b in range(8):
        nz = out[b, 0][out[b, 0] > 0]
        ys, xs = (nz.long() - 1) // 100, (nz.long() - 1) % 100
        pos = (out[b, 0] > 0).nonzero()
        dy, dx = (ys - pos[:, 0]).unique(), (xs - pos[:, 1]).unique()
        assert len(dy) == 1 and len(dx) == 1 and abs(dy.item()) <= 2 and abs(dx.item()) <= 2
        expect_count = (H - abs(dy.item())) * (W - abs(dx.item()))
        assert len(pos) == expect_count
        assert torch.equal(out[b, 1], out[b, 0])
    # cutout: one rectangle of zeros, at most half the height and width, the rest untouched
    ones = torch.ones(16, 3, H, W)
    out = aug_cutout(ones, g=g)
    for b in range(16):
        zero = (out[b, 0] == 0).nonzero()
        assert len(zero) > 0
        h_ = zero[:, 0].max() - zero[:, 0].min() + 1
        w_ = zero[:, 1].max() - zero[:, 1].min() + 1
        assert h_ <= H // 2 and w_ <= W // 2 and len(zero) == h_ * w_
        assert ((out[b] == 0) | (out[b] == 1)).all()
    # reproducible from the generator
    a = aug_cutout(ones, g=torch.Generator().manual_seed(3))
    assert torch.equal(a, aug_cutout(ones, g=torch.Generator().manual_seed(3)))


# ---------------------------------------------------------------------------------- LPIPS

def _no_download(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("tried to download")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fail)
    monkeypatch.setattr(torch.hub, "download_url_to_file", fail)


def test_lpips_random_and_missing_imagenet_weights(tmp_path, monkeypatch):
    _no_download(monkeypatch)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    m1, m2 = build_lpips("alex", "random"), build_lpips("alex", "random")
    for p, q in zip(m1.parameters(), m2.parameters(), strict=True):
        assert torch.equal(p, q) and not p.requires_grad
    x, y = _images(2, 32, 1), _images(2, 32, 2)
    assert (m1(x, x, normalize=True).abs() < 1e-6).all()
    assert (m1(x, y, normalize=True) > 0).all()
    with pytest.raises(LPIPSWeightsError, match="alexnet-owt-7be5be79.pth"):
        build_lpips("alex", "imagenet")


def test_lpips_backbone_from_cache_or_file(tmp_path, monkeypatch):
    import torchvision

    _no_download(monkeypatch)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    torch.manual_seed(5)
    sd = torchvision.models.alexnet(weights=None).state_dict()
    cache = backbone_cache_file("alex")
    assert cache == tmp_path / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth"
    cache.parent.mkdir(parents=True)
    torch.save(sd, cache)
    torch.save(sd, tmp_path / "alex.pth")
    for weights in ("imagenet", str(tmp_path / "alex.pth")):
        model = build_lpips("alex", weights)
        convs = [m for m in model.net.modules() if isinstance(m, torch.nn.Conv2d)]
        assert len(convs) == 5
        for conv, idx in zip(convs, (0, 3, 6, 8, 10), strict=True):
            assert torch.equal(conv.weight, sd[f"features.{idx}.weight"])
    with pytest.raises(LPIPSWeightsError, match="do not fit"):
        build_lpips("vgg", str(tmp_path / "alex.pth"))


# ------------------------------------------------------------------------- autoencoder I/O

def test_load_autoencoder_returns_frozen_ema(tmp_path, cfg):
    torch.manual_seed(0)
    ae = build_autoencoder(cfg)
    ema = copy.deepcopy(ae)
    with torch.no_grad():
        for p in ema.decoder.parameters():
            p.add_(0.01)
    ckpt = {"kind": "dinosae-ae", "stage": 4, "step": 3,
            "config": {"autoencoder": cfg["autoencoder"], "data": {"image_size": 32}},
            "model": ae.state_dict(), "ema": ema.state_dict()}
    save_checkpoint(tmp_path / "c.pt", ckpt)
    raw = torch.load(tmp_path / "c.pt", weights_only=True)
    assert set(raw) == set(ckpt)
    loaded = DinoSAE.load(tmp_path / "c.pt")
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, ema.state_dict()[k]), k
    x = _images(2, 32)
    torch.testing.assert_close(loaded.decode(loaded.encode(x)), ema.decode(ema.encode(x)))
    save_checkpoint(tmp_path / "bad.pt", {**ckpt, "kind": "dinosae-dit"})
    with pytest.raises(ValueError, match="not an autoencoder checkpoint"):
        DinoSAE.load(tmp_path / "bad.pt")


def test_linear_stem_starts_as_the_teacher(cfg):
    cfg["autoencoder"]["stem"] = "linear"
    ae = build_autoencoder(cfg)
    x = _images(2, 32)
    torch.testing.assert_close(ae.encode(x), ae.teacher_tokens(x))


def test_an_autoencoder_rebuilt_from_a_lean_checkpoint_computes_as_the_saved_one(cfg):
    """DinoSAE.from_checkpoint builds the stem and decoder on the meta device and takes the
    file's tensors; the teacher is rebuilt from its source and checked: the network encodes and
    decodes exactly as the one saved."""
    from dinosae.checkpoint import tensors_fingerprint
    from dinosae.models.autoencoder import ae_config

    torch.manual_seed(0)
    ae = build_autoencoder(cfg).eval()
    with torch.no_grad():  # away from the init
        for p in [*ae.encoder.stem.parameters(), *ae.decoder.parameters()]:
            p.add_(0.05 * torch.randn_like(p))
    ck = {"config": ae_config(cfg), "ema": {k: v.clone() for k, v in ae.trainable_state().items()},
          "teacher": {"weights": "random", "sha256": tensors_fingerprint(ae.teacher)}}
    loaded = DinoSAE.from_checkpoint(ck, "ck").eval()
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    x = torch.rand(2, 3, cfg["data"]["image_size"], cfg["data"]["image_size"])
    with torch.no_grad():
        z = ae.encode(x)
        assert torch.equal(loaded.encode(x), z) and torch.equal(loaded.decode(z), ae.decode(z))
