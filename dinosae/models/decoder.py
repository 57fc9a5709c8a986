"""DC-AE-style convolutional decoder: token grid -> image.

Following DC-AE (Chen et al., 2024, "Deep Compression Autoencoder"): a 3x3 conv-in with a
channel-duplicating shortcut, then five stages from the lowest resolution to the highest. Each
stage but the first starts with a x2 nearest-interpolation upsampling (conv after interpolation)
whose shortcut duplicates channels and pixel-shuffles them; then `depth` blocks: EfficientViT
blocks (lite multi-scale ReLU linear attention + GLU MBConv) or ResBlocks. Channel RMS norm
(per pixel over C, with weight and bias) and SiLU throughout; final norm, ReLU, 3x3 conv to RGB.

Widths / depths / block kinds are listed highest resolution first, like DC-AE's configs:
widths[4] runs at the token grid, widths[0] at full image resolution.

Options that reproduce the authors' released decoder (github wkdgnsgo/HAE, formerly
wkdgnsgo/dino-sae: src/model.py's DCAE_Decoder, whose weights dinosae.importers maps onto this
module; workflow/configs/imagenet256.yaml sets them all, tests/test_ae_parity.py checks the
outputs against that code's) where it departs from the defaults:
norm="sample" (their "trms2d" is an RMS norm of each sample over (C, H, W) with a per-channel
weight and no bias, the stem's RMSNorm2d), attn_scales=() (their EViT blocks are built with
scales=(): no multi-scale aggregation), evit_norm=False (the norm they hand to EfficientViTBlock
is a module instance, which upstream efficientvit's build_norm turns into None), and
upsample="pixel_shuffle" for DC-AE's ConvPixelShuffle upsampling (conv to 4x channels, then
pixel shuffle; their DecoderConfig's default) instead of nearest interpolation + conv. Their
LiteMLA switches to quadratic attention on maps of <= 32 positions; ours is always the linear
form, the same sum in another order (equal within float rounding; the parity test covers a 4x4
map). A stage of depth 0 has no upsampling in their code, one in ours.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from dinosae.models.stem import RMSNorm2d

NORMS = ("channel", "sample")
UPSAMPLES = ("interpolate", "pixel_shuffle")

class ChannelRMSNorm(nn.Module):
    """RMS norm over channels at every pixel of (B, C, H, W), with weight and bias."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ms = x.float().pow(2).mean(dim=1, keepdim=True)
        x = (x.float() * torch.rsqrt(ms + self.eps)).to(x.dtype)
        return x * self.weight.to(x.dtype)[:, None, None] + self.bias.to(x.dtype)[:, None, None]


def make_norm(kind: str, channels: int) -> nn.Module:
    """"channel": ChannelRMSNorm (per pixel over C, weight and bias); "sample": RMSNorm2d (per
    sample over C, H, W, weight only)."""
    if kind == "channel":
        return ChannelRMSNorm(channels)
    if kind == "sample":
        return RMSNorm2d(channels)
    raise ValueError(f"decoder norm {kind!r}: expected one of {NORMS}")


def resize_channels(x: torch.Tensor, c_out: int) -> torch.Tensor:
    """Parameter-free channel shortcut: duplicate each channel (repeat_interleave) and average
    neighbouring groups so that (B, C, ...) becomes (B, c_out, ...). Pure duplication when
    c_out is a multiple of C, pure group averaging when C is a multiple of c_out."""
    c_in = x.shape[1]
    if c_in == c_out:
        return x
    common = math.lcm(c_in, c_out)
    x = x.repeat_interleave(common // c_in, dim=1)
    if common == c_out:
        return x
    return x.unflatten(1, (c_out, common // c_out)).mean(dim=2)


class ResBlock(nn.Module):
    """x + norm(conv3x3(silu(conv3x3(x))))."""

    def __init__(self, channels: int, norm: str = "channel") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.act = nn.SiLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm = make_norm(norm, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.norm(self.conv2(self.act(self.conv1(x))))


class LiteMLA(nn.Module):
    """Lite multi-scale linear attention (EfficientViT): ReLU-kernel attention over all pixels,
    with q/k/v also aggregated by a depthwise 5x5 conv to add a local scale; x + norm(proj(.))."""

    def __init__(self, channels: int, head_dim: int = 32, scales: tuple[int, ...] = (5,),
                 eps: float = 1e-15, norm: str | None = "channel") -> None:
        super().__init__()
        self.head_dim = min(head_dim, channels)
        self.heads = channels // self.head_dim
        self.eps = eps
        inner = self.heads * self.head_dim
        self.qkv = nn.Conv2d(channels, 3 * inner, 1, bias=False)
        self.aggregate = nn.ModuleList([
            nn.Sequential(
                nn.Conv2d(3 * inner, 3 * inner, k, padding=k // 2, groups=3 * inner, bias=False),
                nn.Conv2d(3 * inner, 3 * inner, 1, groups=3 * self.heads, bias=False),
            )
            for k in scales
        ])
        self.proj = nn.Conv2d(inner * (1 + len(scales)), channels, 1, bias=False)
        self.norm = make_norm(norm, channels) if norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        qkv = self.qkv(x)  # (B, 3*inner, H, W)
        qkv = torch.cat([qkv] + [agg(qkv) for agg in self.aggregate], dim=1)
        qkv = qkv.float().reshape(B, -1, 3 * self.head_dim, H * W)  # (B, heads', 3d, N)
        q, k, v = qkv.chunk(3, dim=2)  # each (B, heads', d, N)
        q, k = F.relu(q), F.relu(k)
        v = F.pad(v, (0, 0, 0, 1), value=1.0)  # extra row of ones -> normaliser
        kv = v @ k.transpose(-1, -2)  # (B, heads', d+1, d)
        out = kv @ q  # (B, heads', d+1, N)
        out = out[:, :, :-1] / (out[:, :, -1:] + self.eps)
        out = out.reshape(B, -1, H, W).to(x.dtype)
        return x + self.norm(self.proj(out))


class GLUMBConv(nn.Module):
    """x + norm(pw(value * silu(gate))), [value, gate] = dw3x3(silu(pw_expand(x)))."""

    def __init__(self, channels: int, expand: int = 4, norm: str | None = "channel") -> None:
        super().__init__()
        hidden = expand * channels
        self.inverted = nn.Conv2d(channels, 2 * hidden, 1)
        self.depthwise = nn.Conv2d(2 * hidden, 2 * hidden, 3, padding=1, groups=2 * hidden)
        self.point = nn.Conv2d(hidden, channels, 1, bias=False)
        self.act = nn.SiLU()
        self.norm = make_norm(norm, channels) if norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.depthwise(self.act(self.inverted(x)))
        value, gate = h.chunk(2, dim=1)
        return x + self.norm(self.point(value * self.act(gate)))


class EfficientViTBlock(nn.Module):
    """Context (lite multi-scale linear attention) then local (GLU MBConv) mixing."""

    def __init__(self, channels: int, norm: str | None = "channel",
                 scales: tuple[int, ...] = (5,)) -> None:
        super().__init__()
        self.attn = LiteMLA(channels, scales=tuple(scales), norm=norm)
        self.mlp = GLUMBConv(channels, norm=norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.attn(x))


class UpSample(nn.Module):
    """x2 nearest interpolation + 3x3 conv (or, with mode="pixel_shuffle", a 3x3 conv to 4x the
    channels + pixel shuffle), plus a channel-duplicating pixel-shuffle shortcut."""

    def __init__(self, c_in: int, c_out: int, mode: str = "interpolate") -> None:
        super().__init__()
        if mode not in UPSAMPLES:
            raise ValueError(f"decoder upsample {mode!r}: expected one of {UPSAMPLES}")
        self.c_out, self.mode = c_out, mode
        factor = 4 if mode == "pixel_shuffle" else 1
        self.conv = nn.Conv2d(c_in, factor * c_out, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "pixel_shuffle":
            y = F.pixel_shuffle(self.conv(x), 2)
        else:
            y = self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))
        shortcut = F.pixel_shuffle(resize_channels(x, 4 * self.c_out), 2)
        return y + shortcut


BLOCKS = ("res", "evit")


def make_block(kind: str, channels: int, norm: str, attn_scales: tuple[int, ...],
               evit_norm: bool) -> nn.Module:
    if kind == "res":
        return ResBlock(channels, norm)
    if kind == "evit":
        return EfficientViTBlock(channels, norm if evit_norm else None, attn_scales)
    raise ValueError(f"decoder block {kind!r}: expected one of {BLOCKS}")


class Decoder(nn.Module):
    """(B, T, C) tokens on an (h, w) grid -> (B, 3, 16h, 16w) image in about [0, 1]."""

    def __init__(self, channels: int, grid: tuple[int, int], widths: list[int],
                 depths: list[int], blocks: list[str], norm: str = "channel",
                 attn_scales: tuple[int, ...] | list[int] = (5,), evit_norm: bool = True,
                 upsample: str = "interpolate") -> None:
        super().__init__()
        if not len(widths) == len(depths) == len(blocks) == 5:
            raise ValueError("decoder: widths, depths and blocks need five entries each")
        self.grid = tuple(grid)
        self.grad_checkpointing = False
        self.conv_in = nn.Conv2d(channels, widths[-1], 3, padding=1)
        stages = []
        for i in reversed(range(5)):  # lowest resolution (i = 4) first
            layers = [] if i == 4 else [UpSample(widths[i + 1], widths[i], upsample)]
            layers += [make_block(blocks[i], widths[i], norm, tuple(attn_scales), evit_norm)
                       for _ in range(depths[i])]
            stages.append(nn.ModuleList(layers))
        self.stages = nn.ModuleList(stages)
        self.norm_out = make_norm(norm, widths[0])
        self.act_out = nn.ReLU()
        self.conv_out = nn.Conv2d(widths[0], 3, 3, padding=1)

    @property
    def last_layer(self) -> torch.Tensor:
        """The weight the adaptive GAN weight is measured at."""
        return self.conv_out.weight

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        B, T, C = z.shape
        h, w = self.grid
        if T != h * w:
            raise ValueError(f"decoder expects {h}x{w}={h * w} tokens, got {T}")
        x = z.transpose(1, 2).reshape(B, C, h, w)
        x = self.conv_in(x) + resize_channels(x, self.conv_in.out_channels)
        for stage in self.stages:
            for layer in stage:
                if self.grad_checkpointing and x.requires_grad:
                    x = checkpoint(layer, x, use_reentrant=False)
                else:
                    x = layer(x)
        x = self.conv_out(self.act_out(self.norm_out(x)))  # predicts [-1, 1]
        return 0.5 * x + 0.5
