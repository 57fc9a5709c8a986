"""GAN pieces: discriminators on frozen DINO features, DiffAugment, hinge losses and the
adaptive weight of the generator's GAN term. Two backbones (`autoencoder.discriminator.backbone`):

* `dino_vits8` -- RAE's DINO discriminator (github bytetriper/RAE src/disc/dinodisc.py, as
  configs/stage1/training/*.yaml builds it), which the paper adopts: a frozen DINO ViT-S/8 (timm's
  `vit_small_patch8_224.dino`) at 224 px, features of blocks 2, 5, 8, 11 and of the last block,
  one head each (conv1d k1 + norm + LeakyReLU, a residual circular conv1d k9 + norm + LeakyReLU,
  conv1d to a logit; spectral norm on every conv). `DinoDiscriminator`; its DiffAugment is
  `rae_diffaug` (translation, then colour, p = 1, no cutout) on images in [-1, 1], its loss
  `0.5 * d_hinge_loss`, its fakes quantised to 8-bit levels (`quantize`).
* `teacher` -- ours before: small conv heads with spectral norm on the frozen teacher ViT's patch
  tokens after a few blocks (`Discriminator`; the ViT is shared with the autoencoder and passed
  in through `teacher_features`), `diffaug` (colour, translation, cutout) on images in [0, 1].

In both, the logits of all heads and positions are concatenated.
"""

from __future__ import annotations

import math

import timm
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import spectral_norm

from dinosae.models.encoder import IMAGENET_MEAN, IMAGENET_STD

BACKBONES = ("teacher", "dino_vits8")


def teacher_features(vit: nn.Module, x: torch.Tensor, layers: list[int]) -> list[torch.Tensor]:
    """Patch tokens of the frozen ViT after each block in `layers`, as (B, C, h, w) maps.
    x: images in [0, 1]. Gradients flow to x (for the generator), never into the ViT."""
    mean = x.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = x.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return vit.forward_intermediates((x - mean) / std, indices=list(layers), output_fmt="NCHW",
                                     intermediates_only=True, stop_early=True)


class DiscHead(nn.Module):
    """(B, C, h, w) features -> (B, h*w) logits: 1x1 -> 3x3 -> 1x1 convs, LeakyReLU, SN."""

    def __init__(self, c_in: int, channels: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            spectral_norm(nn.Conv2d(c_in, channels, 1)),
            nn.LeakyReLU(0.2),
            spectral_norm(nn.Conv2d(channels, channels, 3, padding=1)),
            nn.LeakyReLU(0.2),
            spectral_norm(nn.Conv2d(channels, 1, 1)),
        )

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.net(f).flatten(1)


class Discriminator(nn.Module):
    """One head per teacher layer; forward(features) -> (B, sum of h*w) logits."""

    def __init__(self, feature_dim: int, layers: list[int], channels: int) -> None:
        super().__init__()
        self.layers = list(layers)
        self.heads = nn.ModuleList([DiscHead(feature_dim, channels) for _ in self.layers])

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([head(f.float()) for head, f in zip(self.heads, features, strict=True)],
                         dim=1)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return self.state_dict()

    def load_trainable(self, state: dict[str, torch.Tensor]) -> None:
        self.load_state_dict(state)


def build_discriminator(dcfg: dict, feature_dim: int) -> nn.Module:
    """The discriminator `autoencoder.discriminator` describes (backbone teacher or dino_vits8);
    its trainable weights random from torch's generator, a dino_vits8 backbone from `weights`."""
    if dcfg.get("backbone", "teacher") == "dino_vits8":
        return DinoDiscriminator(dcfg.get("weights", "random"))
    return Discriminator(feature_dim, dcfg["layers"], dcfg["channels"])


# ---------------------------------------------------------------- RAE's DINO discriminator

DINO_ARCH = "vit_small_patch8_224.dino"
DINO_SEED = 0  # "random" weights: always the same network


def create_dino(weights: str) -> nn.Module:
    """The frozen DINO ViT-S/8 of RAE's discriminator: timm's `vit_small_patch8_224.dino`
    architecture with RAE's tanh-approximated GELU (its FrozenDINONoDrop's MLP), eval, frozen.
    weights: "random" (seeded), a local .pth/.safetensors file, or "hf-hub:<id>" (e.g.
    hf-hub:timm/vit_small_patch8_224.dino). As RAE does on loading, the key bias of every
    attention is zeroed (it shifts all of a query's scores alike: softmax ignores it)."""
    from dinosae.errors import TeacherWeightsError

    kwargs = dict(num_classes=0, act_layer="gelu_tanh")
    if weights.startswith("hf-hub:"):
        try:
            model = timm.create_model(DINO_ARCH, pretrained=True, pretrained_cfg_overlay=dict(
                hf_hub_id=weights[len("hf-hub:"):], source="hf-hub"), **kwargs)
        except Exception as e:  # offline, unknown id, wrong shapes: all end the same way
            raise TeacherWeightsError(
                f"could not load discriminator weights {weights!r} ({type(e).__name__}: {e}); "
                "give a local copy of the file (autoencoder.discriminator.weights) or 'random'"
            ) from e
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(DINO_SEED)
            model = timm.create_model(DINO_ARCH, pretrained=False, **kwargs)
        if weights != "random":
            _load_dino_file(model, weights)
    with torch.no_grad():
        for block in model.blocks:
            C = block.attn.qkv.bias.numel() // 3
            block.attn.qkv.bias[C:2 * C].zero_()
    model.requires_grad_(False)
    return model.eval()


def _load_dino_file(model: nn.Module, path: str) -> None:
    """A local DINO ViT-S/8 state dict (timm's keys, or the original DINO release's, which
    timm's ViT converter reads; RAE's x_scale/x_shift buffers ignored); a mismatch lists every
    wrong key."""
    from pathlib import Path

    from timm.models.vision_transformer import checkpoint_filter_fn

    from dinosae.errors import TeacherWeightsError
    from dinosae.models.encoder import read_state_dict
    from dinosae.models.keymap import mismatches

    if not Path(path).is_file():
        raise TeacherWeightsError(f"discriminator weights file {path!r} does not exist")
    sd = {k: v for k, v in read_state_dict(Path(path)).items() if k not in ("x_scale", "x_shift")}
    sd = {k: v for k, v in checkpoint_filter_fn(sd, model).items()
          if not k.startswith(("head.", "fc_norm."))}
    problems = mismatches(model.state_dict(), sd)
    if problems:
        raise TeacherWeightsError(f"discriminator weights {path!r} do not fit {DINO_ARCH}: "
                                  + "; ".join(problems))
    model.load_state_dict(sd)


class DinoHead(nn.Module):
    """RAE's head on one feature map (B, C, L) -> (B, L) logits: conv1d k1 + norm + LeakyReLU,
    then (h + LeakyReLU(norm(circular conv1d k(h)))) / sqrt(2), then conv1d k1 to one channel;
    spectral norm (one power iteration per training forward) on every conv. The norm is RAE's
    BatchNormLocal with virtual batch 1: each sample and channel over positions, eps 1e-6, i.e.
    an affine instance norm."""

    def __init__(self, channels: int, kernel: int = 9) -> None:
        super().__init__()
        self.conv_in = spectral_norm(nn.Conv1d(channels, channels, 1), eps=1e-12)
        self.norm_in = nn.InstanceNorm1d(channels, eps=1e-6, affine=True)
        self.conv_mid = spectral_norm(nn.Conv1d(channels, channels, kernel, padding=kernel // 2,
                                                padding_mode="circular"), eps=1e-12)
        self.norm_mid = nn.InstanceNorm1d(channels, eps=1e-6, affine=True)
        self.conv_out = spectral_norm(nn.Conv1d(channels, 1, 1), eps=1e-12)
        self.act = nn.LeakyReLU(0.2)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        h = self.act(self.norm_in(self.conv_in(f)))
        h = (self.act(self.norm_mid(self.conv_mid(h))) + h) * (1 / math.sqrt(2))
        return self.conv_out(h).flatten(1)


class DinoDiscriminator(nn.Module):
    """RAE's DINO discriminator: images in [-1, 1] (any size; resized to 224 px, bilinear) ->
    (B, 5 * 784) logits. The frozen DINO (`dino`) is part of the module but not of what a stage
    checkpoint stores (`trainable_state`): it is referenced by its source and sha256."""

    def __init__(self, weights: str = "random", key_depths: tuple[int, ...] = (2, 5, 8, 11),
                 kernel: int = 9) -> None:
        super().__init__()
        self.dino = create_dino(weights)
        self.key_depths = list(key_depths)
        self.size = self.dino.patch_embed.img_size[0]
        mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        # x in [-1, 1]: ((x + 1) / 2 - mean) / std = x * (0.5 / std) + (0.5 - mean) / std
        self.register_buffer("x_scale", (0.5 / std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("x_shift", ((0.5 - mean) / std).view(1, 3, 1, 1), persistent=False)
        C = self.dino.embed_dim
        self.heads = nn.ModuleList([DinoHead(C, kernel) for _ in range(len(self.key_depths) + 1)])

    def train(self, mode: bool = True) -> DinoDiscriminator:
        super().train(mode)
        self.dino.eval()  # frozen: always in inference mode
        return self

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The last block's patch tokens, then those of each key depth: (B, C, L) each."""
        x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        x = x * self.x_scale + self.x_shift
        last = len(self.dino.blocks) - 1
        idx = sorted(set(self.key_depths) | {last})
        maps = self.dino.forward_intermediates(x, indices=idx, norm=False, output_fmt="NLC",
                                               intermediates_only=True, stop_early=True)
        by_depth = dict(zip(idx, maps, strict=True))
        return [by_depth[d].transpose(1, 2) for d in [last, *self.key_depths]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([head(f.float()) for head, f in zip(self.heads, self.features(x),
                                                              strict=True)], dim=1)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("dino.")}

    def load_trainable(self, state: dict[str, torch.Tensor]) -> None:
        frozen = {k: v for k, v in self.state_dict().items() if k.startswith("dino.")}
        self.load_state_dict({**state, **frozen})


def quantize(x: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] clamped and rounded to the 256 levels of an 8-bit image (RAE's fakes)."""
    return torch.round(x.clamp(0, 1) * 255) / 255


def rae_diffaug(x: torch.Tensor, g: torch.Generator | None = None) -> torch.Tensor:
    """RAE's DiffAug(prob=1, cutout=0) on images in [-1, 1]: a translation by up to 1/8 of the
    size (uncovered pixels 0), then brightness (+-0.5), saturation (x0..2) and contrast
    (x0.5..1.5), per sample. Draws as RAE does (three policy switches, then a (7, B) block of
    uniforms), so the same seed gives RAE's numbers."""
    return apply_aug(RAE, x, draw_aug(RAE, x.shape[0], x.shape[-2:], g, x.device))


def _rae_apply(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """rae_diffaug with its uniforms `r` (B, 7, 1, 1) given."""
    x = x.float()  # as RAE's
    B, _, H, W = x.shape
    r = r.transpose(0, 1)  # (7, B, 1, 1), RAE's layout
    dh, dw = round(H * 0.125), round(W * 0.125)
    th = (r[0] * (2 * dh + 1)).floor().long() - dh  # (B, 1, 1)
    tw = (r[1] * (2 * dw + 1)).floor().long() - dw
    b = torch.arange(B, device=x.device).view(B, 1, 1)
    ys = (torch.arange(H, device=x.device).view(1, H, 1) + th + 1).clamp(0, H + 1)
    xs = (torch.arange(W, device=x.device).view(1, 1, W) + tw + 1).clamp(0, W + 1)
    x = F.pad(x, [1, 1, 1, 1]).permute(0, 2, 3, 1)[b, ys, xs].permute(0, 3, 1, 2)
    x = x + (r[2].unsqueeze(-1) - 0.5)
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (r[3].unsqueeze(-1) * 2) + mean
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (r[4].unsqueeze(-1) + 0.5) + mean


# ---------------------------------------------------------------- DiffAugment (Zhao et al. 2020)
#
# Each augmentation is a draw of per-image parameters and their application: a training step
# draws the parameters of its whole global batch and each process applies its own rows
# (draw_aug, take_rows, apply_aug), so an image is augmented alike whatever the number of
# processes and micro-batches.

RAE = {"backbone": "dino_vits8"}  # a dcfg naming RAE's augmentation
TEACHER = {"backbone": "teacher"}


def draw_aug(dcfg: dict, n: int, size: tuple[int, int] | torch.Size,
             g: torch.Generator | None, device: torch.device | str | None = None
             ) -> dict[str, torch.Tensor]:
    """The random parameters of `dcfg`'s backbone's DiffAugment for `n` images of `size` (H, W),
    each a tensor of n rows, drawn in the order (and so with the values) of the one-call
    augmentation: dino_vits8 -> rae_diffaug's, teacher -> diffaug's (colour, translation,
    cutout)."""
    H, W = size
    device = g.device if g is not None else device
    if dcfg.get("backbone", "teacher") == "dino_vits8":
        torch.rand(3, generator=g, device=device)  # RAE's switches: with p = 1 all are on
        return {"r": torch.rand(7, n, 1, 1, generator=g, device=device).transpose(0, 1)}
    p = {k: torch.rand(n, 1, 1, 1, generator=g, device=device)
         for k in ("brightness", "saturation", "contrast")}
    sy, sx = int(H * 0.125 + 0.5), int(W * 0.125 + 0.5)
    p["dy"] = torch.randint(-sy, sy + 1, (n, 1, 1), generator=g, device=device)
    p["dx"] = torch.randint(-sx, sx + 1, (n, 1, 1), generator=g, device=device)
    ch, cw = int(H * 0.5 + 0.5), int(W * 0.5 + 0.5)
    p["cy"] = torch.randint(0, H + (1 - ch % 2), (n, 1, 1), generator=g, device=device)
    p["cx"] = torch.randint(0, W + (1 - cw % 2), (n, 1, 1), generator=g, device=device)
    return p


def take_rows(params: dict[str, torch.Tensor], rows: torch.Tensor | slice
              ) -> dict[str, torch.Tensor]:
    """The parameters of some of the images (indices or a slice of the drawn rows)."""
    return {k: v[rows] for k, v in params.items()}


def apply_aug(dcfg: dict, x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """`dcfg`'s backbone's DiffAugment of images x with drawn `params` (one row per image)."""
    if dcfg.get("backbone", "teacher") == "dino_vits8":
        return _rae_apply(x, params["r"].to(x.device))
    p = {k: v.to(x.device) for k, v in params.items()}
    x = _color(x, p["brightness"], p["saturation"], p["contrast"])
    return _cutout(_translate(x, p["dy"], p["dx"]), p["cy"], p["cx"], 0.5)


def _color(x: torch.Tensor, u1: torch.Tensor, u2: torch.Tensor, u3: torch.Tensor
           ) -> torch.Tensor:
    x = x + (u1.to(x.dtype) - 0.5)
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (u2.to(x.dtype) * 2) + mean
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (u3.to(x.dtype) + 0.5) + mean


def _translate(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    B, _, H, W = x.shape
    ys = torch.arange(H, device=x.device).view(1, H, 1) + dy  # source row of each output row
    xs = torch.arange(W, device=x.device).view(1, 1, W) + dx
    valid = ((ys >= 0) & (ys < H) & (xs >= 0) & (xs < W)).unsqueeze(1)  # (B, 1, H, W)
    b = torch.arange(B, device=x.device).view(B, 1, 1)
    out = x.permute(0, 2, 3, 1)[b, ys.clamp(0, H - 1), xs.clamp(0, W - 1)].permute(0, 3, 1, 2)
    return out * valid


def _cutout(x: torch.Tensor, cy: torch.Tensor, cx: torch.Tensor, ratio: float) -> torch.Tensor:
    _, _, H, W = x.shape
    ch, cw = int(H * ratio + 0.5), int(W * ratio + 0.5)
    ys = torch.arange(H, device=x.device).view(1, H, 1)
    xs = torch.arange(W, device=x.device).view(1, 1, W)
    inside = ((ys >= cy - ch // 2) & (ys < cy - ch // 2 + ch)
              & (xs >= cx - cw // 2) & (xs < cx - cw // 2 + cw))
    return x * (~inside).unsqueeze(1).to(x.dtype)


def aug_color(x: torch.Tensor, g: torch.Generator | None = None) -> torch.Tensor:
    """Random brightness (+-0.5), saturation (x0..2) and contrast (x0.5..1.5) per sample."""
    u = [torch.rand(x.shape[0], 1, 1, 1, generator=g, device=x.device) for _ in range(3)]
    return _color(x, *u)


def aug_translation(x: torch.Tensor, ratio: float = 0.125,
                    g: torch.Generator | None = None) -> torch.Tensor:
    """Shift each sample by up to ratio*size pixels in x and y; uncovered pixels become 0."""
    B, _, H, W = x.shape
    sy, sx = int(H * ratio + 0.5), int(W * ratio + 0.5)
    dy = torch.randint(-sy, sy + 1, (B, 1, 1), generator=g, device=x.device)
    dx = torch.randint(-sx, sx + 1, (B, 1, 1), generator=g, device=x.device)
    return _translate(x, dy, dx)


def aug_cutout(x: torch.Tensor, ratio: float = 0.5,
               g: torch.Generator | None = None) -> torch.Tensor:
    """Zero one (ratio*H) x (ratio*W) rectangle per sample, centred anywhere in the image."""
    B, _, H, W = x.shape
    ch, cw = int(H * ratio + 0.5), int(W * ratio + 0.5)
    cy = torch.randint(0, H + (1 - ch % 2), (B, 1, 1), generator=g, device=x.device)
    cx = torch.randint(0, W + (1 - cw % 2), (B, 1, 1), generator=g, device=x.device)
    return _cutout(x, cy, cx, ratio)


def diffaug(x: torch.Tensor, g: torch.Generator | None = None) -> torch.Tensor:
    """colour, translation, cutout: applied alike (with fresh randomness) to real and fake."""
    return apply_aug(TEACHER, x, draw_aug(TEACHER, x.shape[0], x.shape[-2:], g, x.device))


# ---------------------------------------------------------------- losses and adaptive weight

def d_hinge_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean()


def disc_logits(disc: nn.Module, images: torch.Tensor, dcfg: dict, vit: nn.Module,
                g: torch.Generator | None = None,
                aug: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Logits of images in [0, 1], DiffAugmented as `dcfg`'s (autoencoder.discriminator)
    backbone says: dino_vits8 -> rae_diffaug on [-1, 1] images into the DinoDiscriminator;
    teacher -> diffaug, then the frozen teacher `vit`'s features (without a graph unless the
    images need one) into the heads. The augmentation's parameters: `aug` (draw_aug's, one row
    per image) or drawn from `g`. `disc` may be wrapped in DDP."""
    if aug is None:
        aug = draw_aug(dcfg, images.shape[0], images.shape[-2:], g, images.device)
    if dcfg.get("backbone", "teacher") == "dino_vits8":
        return disc(apply_aug(dcfg, 2 * images - 1, aug))
    if torch.is_grad_enabled() and images.requires_grad:
        return disc(teacher_features(vit, apply_aug(dcfg, images, aug), dcfg["layers"]))
    with torch.no_grad():
        feats = teacher_features(vit, apply_aug(dcfg, images, aug), dcfg["layers"])
    return disc(feats)


# the discriminator's hinge loss is multiplied by this (RAE's hinge_d_loss halves the sum)
D_LOSS_FACTOR = {"teacher": 1.0, "dino_vits8": 0.5}


def g_hinge_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    return -logits_fake.mean()


def adaptive_weight(rec_loss: torch.Tensor, gan_loss: torch.Tensor, last_layer: torch.Tensor,
                    max_value: float, eps: float = 1e-6) -> torch.Tensor:
    """lambda = ||d rec / d W|| / (||d gan / d W|| + eps) at the decoder's last layer W, clamped
    to [0, max_value], detached. Under DDP the two gradients are averaged over ranks first, so
    every rank uses the weight one process would compute on the whole batch."""
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0].float()
    g_gan = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0].float()
    if dist.is_initialized() and dist.get_world_size() > 1:
        both = torch.stack([g_rec, g_gan])
        dist.all_reduce(both)
        g_rec, g_gan = both / dist.get_world_size()
    return weight_of_grads(g_rec, g_gan, max_value, eps)


def weight_of_grads(g_rec: torch.Tensor, g_gan: torch.Tensor, max_value: float,
                    eps: float = 1e-6) -> torch.Tensor:
    """adaptive_weight's lambda from the two gradients at W (already averaged over ranks)."""
    lam = g_rec.float().norm() / (g_gan.float().norm() + eps)
    return lam.clamp(0.0, max_value).detach()
