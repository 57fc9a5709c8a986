"""Patch embeddings that replace the teacher's linear patchify.

CNNStem is DINO-SAE's hierarchical stem (paper Table 7): four stride-2 convolutions, no bias,
"same" padding, 3 -> w0 (k7) -> w1 (k3) -> w2 (k3) -> embed_dim (k3), a per-sample RMS norm and
SiLU after the first three. 256 px -> 128 -> 64 -> 32 -> 16, i.e. one token per 16x16 patch.

Both modules return NHWC tokens (B, H/16, W/16, embed_dim), which is what timm's DINOv3 `Eva`
(built with dynamic_img_size=True) expects from its `patch_embed`.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class RMSNorm2d(nn.Module):
    """RMS norm of each sample over (C, H, W) together, then a per-channel weight:
    y = x / sqrt(mean_{c,h,w}(x^2) + eps) * weight[c]."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, C, H, W)
        ms = x.float().pow(2).mean(dim=(1, 2, 3), keepdim=True)
        x = (x.float() * torch.rsqrt(ms + self.eps)).to(x.dtype)
        return x * self.weight.to(x.dtype)[None, :, None, None]


class StemConv(nn.Module):
    """Stride-2 convolution without bias, optionally followed by RMSNorm2d + SiLU."""

    def __init__(self, c_in: int, c_out: int, kernel: int, norm_act: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride=2, padding=kernel // 2, bias=False)
        self.norm = RMSNorm2d(c_out) if norm_act else nn.Identity()
        self.act = nn.SiLU() if norm_act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


class CNNStem(nn.Module):
    """(B, 3, H, W) normalised image -> (B, H/16, W/16, embed_dim) tokens (NHWC)."""

    patch_size = 16

    def __init__(self, widths: tuple[int, int, int] | list[int], embed_dim: int) -> None:
        super().__init__()
        w0, w1, w2 = widths
        self.layers = nn.Sequential(
            StemConv(3, w0, 7, norm_act=True),  # H/2
            StemConv(w0, w1, 3, norm_act=True),  # H/4
            StemConv(w1, w2, 3, norm_act=True),  # H/8
            StemConv(w2, embed_dim, 3, norm_act=False),  # H/16
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).permute(0, 2, 3, 1)  # (B, h, w, C)


class LinearStem(nn.Module):
    """The plain ViT patchify (one linear map per 16x16 patch), for the stem ablation."""

    patch_size = 16

    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, 16, stride=16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)  # (B, h, w, C)
