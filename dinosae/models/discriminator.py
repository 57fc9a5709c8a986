"""GAN pieces: a discriminator on frozen DINO features, DiffAugment, hinge losses and the
adaptive weight of the generator's GAN term.

The discriminator (StyleGAN-T / RAE style) reads the frozen teacher ViT's patch tokens after a
few blocks and puts one small trainable conv head with spectral norm on each; the logits of all
heads and positions are concatenated. Only the heads are parameters of `Discriminator`; the
frozen ViT is shared with the autoencoder and passed in through `teacher_features`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import spectral_norm

from dinosae.models.encoder import IMAGENET_MEAN, IMAGENET_STD


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


# ---------------------------------------------------------------- DiffAugment (Zhao et al. 2020)

def _uniform(n: int, x: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
    return torch.rand(n, 1, 1, 1, generator=g, device=x.device, dtype=x.dtype)


def aug_color(x: torch.Tensor, g: torch.Generator | None = None) -> torch.Tensor:
    """Random brightness (+-0.5), saturation (x0..2) and contrast (x0.5..1.5) per sample."""
    B = x.shape[0]
    x = x + (_uniform(B, x, g) - 0.5)
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (_uniform(B, x, g) * 2) + mean
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (_uniform(B, x, g) + 0.5) + mean


def aug_translation(x: torch.Tensor, ratio: float = 0.125,
                    g: torch.Generator | None = None) -> torch.Tensor:
    """Shift each sample by up to ratio*size pixels in x and y; uncovered pixels become 0."""
    B, _, H, W = x.shape
    sy, sx = int(H * ratio + 0.5), int(W * ratio + 0.5)
    dy = torch.randint(-sy, sy + 1, (B, 1, 1), generator=g, device=x.device)
    dx = torch.randint(-sx, sx + 1, (B, 1, 1), generator=g, device=x.device)
    ys = torch.arange(H, device=x.device).view(1, H, 1) + dy  # source row of each output row
    xs = torch.arange(W, device=x.device).view(1, 1, W) + dx
    valid = ((ys >= 0) & (ys < H) & (xs >= 0) & (xs < W)).unsqueeze(1)  # (B, 1, H, W)
    b = torch.arange(B, device=x.device).view(B, 1, 1)
    out = x.permute(0, 2, 3, 1)[b, ys.clamp(0, H - 1), xs.clamp(0, W - 1)].permute(0, 3, 1, 2)
    return out * valid


def aug_cutout(x: torch.Tensor, ratio: float = 0.5,
               g: torch.Generator | None = None) -> torch.Tensor:
    """Zero one (ratio*H) x (ratio*W) rectangle per sample, centred anywhere in the image."""
    B, _, H, W = x.shape
    ch, cw = int(H * ratio + 0.5), int(W * ratio + 0.5)
    cy = torch.randint(0, H + (1 - ch % 2), (B, 1, 1), generator=g, device=x.device)
    cx = torch.randint(0, W + (1 - cw % 2), (B, 1, 1), generator=g, device=x.device)
    ys = torch.arange(H, device=x.device).view(1, H, 1)
    xs = torch.arange(W, device=x.device).view(1, 1, W)
    inside = ((ys >= cy - ch // 2) & (ys < cy - ch // 2 + ch)
              & (xs >= cx - cw // 2) & (xs < cx - cw // 2 + cw))
    return x * (~inside).unsqueeze(1).to(x.dtype)


def diffaug(x: torch.Tensor, g: torch.Generator | None = None) -> torch.Tensor:
    """colour, translation, cutout: applied alike (with fresh randomness) to real and fake."""
    return aug_cutout(aug_translation(aug_color(x, g), g=g), g=g)


# ---------------------------------------------------------------- losses and adaptive weight

def d_hinge_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean()


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
