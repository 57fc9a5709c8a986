"""LightningDiT and DiTDH on the latent token grid (patch size 1: one token = one position).

LightningDiT = DiT with SwiGLU MLPs, RMSNorm, qk-norm, 2-D rotary position embeddings on the
(h, w) token grid, adaLN-zero conditioning on timestep + class (the class table has one extra
row, index `num_classes`, the null class used for classifier-free guidance).
DiTDH (RAE's DiT^DH) = a LightningDiT trunk followed by a wide, shallow head whose blocks are
conditioned per token on the trunk output (plus the timestep/class embedding) through adaLN.

Shapes: x (B, T, C) tokens, t (B,) in [0, 1], y (B,) int64 in [0, num_classes] → (B, T, C).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

# name -> (hidden size, depth, heads); S/B/L/XL are DiT's.
SIZES: dict[str, tuple[int, int, int]] = {
    "tiny": (192, 4, 3),
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "XL": (1152, 28, 16),
}
HEAD_DIM_DH = 128  # DiTDH head: attention head width (a head narrower than this uses one head)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


# ---------------------------------------------------------------- embedders

class TimestepEmbedder(nn.Module):
    """t ∈ [0, 1] → vector: sinusoids of 1000·t (DiT's range), then a 2-layer MLP."""

    def __init__(self, hidden: int, freq_dim: int = 256) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    @staticmethod
    def sinusoids(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]  # (B, half)
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, dim)

    def forward(self, t: Tensor) -> Tensor:
        t_freq = self.sinusoids(1000.0 * t, self.freq_dim)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))  # (B, D)


class LabelEmbedder(nn.Module):
    """Class index → vector; row `num_classes` is the null class (label dropout / CFG)."""

    def __init__(self, num_classes: int, hidden: int) -> None:
        super().__init__()
        self.table = nn.Embedding(num_classes + 1, hidden)

    def forward(self, y: Tensor) -> Tensor:
        return self.table(y)  # (B, D)


# ---------------------------------------------------------------- 2-D RoPE

def rope_tables(grid: tuple[int, int], head_dim: int,
                base: float = 10000.0) -> tuple[Tensor, Tensor]:
    """cos, sin of shape (T, head_dim/2) for a row-major (h, w) grid: the first half of the
    rotated pairs turns with the row index, the second half with the column index."""
    if head_dim % 4:
        raise ValueError(f"2-D RoPE needs a head dimension divisible by 4, got {head_dim}")
    h, w = grid
    quarter = head_dim // 4
    freqs = base ** (-torch.arange(quarter, dtype=torch.float64) / quarter)  # (quarter,)
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    angles = torch.cat([rows.reshape(-1, 1) * freqs, cols.reshape(-1, 1) * freqs], dim=-1)
    return torch.cos(angles).float(), torch.sin(angles).float()  # (T, head_dim/2) each


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate consecutive pairs (x[2i], x[2i+1]) of x (..., T, head_dim) by the table angles."""
    xf = x.float().unflatten(-1, (-1, 2))  # (..., T, head_dim/2, 2)
    a, b = xf[..., 0], xf[..., 1]
    out = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1)
    return out.flatten(-2).type_as(x)


# ---------------------------------------------------------------- blocks

class Attention(nn.Module):
    """Multi-head self-attention with qk RMSNorm and 2-D RoPE, through SDPA."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6)
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
        B, T, D = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, H, T, Dh) each
        # qk-norm and RoPE in fp32 (also under autocast), then back to v's dtype for SDPA
        q = apply_rope(self.q_norm(q.float()), *rope).to(v.dtype)
        k = apply_rope(self.k_norm(k.float()), *rope).to(v.dtype)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, H, T, Dh)
        return self.proj(x.transpose(1, 2).reshape(B, T, D))


class SwiGLU(nn.Module):
    """SwiGLU MLP with hidden width 2/3·mlp_ratio·dim (same parameter count as a GELU MLP)."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        hidden = int(2 * mlp_ratio * dim / 3)
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


class DiTBlock(nn.Module):
    """Pre-norm attention + SwiGLU, each with adaLN-zero shift/scale/gate from the condition
    c (B, Dc) or per token (B, T, Dc)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0,
                 cond_dim: int | None = None) -> None:
        super().__init__()
        self.norm1 = nn.RMSNorm(dim, eps=1e-6, elementwise_affine=False)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.RMSNorm(dim, eps=1e-6, elementwise_affine=False)
        self.mlp = SwiGLU(dim, mlp_ratio)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim or dim, 6 * dim))

    def forward(self, x: Tensor, c: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
        mod = self.adaLN_modulation(c)
        if mod.ndim == 2:
            mod = mod.unsqueeze(1)  # (B, 1, 6D): same for every token
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mod.chunk(6, dim=-1)
        x = x + gate_a * self.attn(modulate(self.norm1(x), shift_a, scale_a), rope)
        x = x + gate_m * self.mlp(modulate(self.norm2(x), shift_m, scale_m))
        return x  # (B, T, D)


class FinalLayer(nn.Module):
    """adaLN (shift, scale) then a linear map to the token channels."""

    def __init__(self, dim: int, out: int, cond_dim: int | None = None) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(dim, eps=1e-6, elementwise_affine=False)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim or dim, 2 * dim))
        self.linear = nn.Linear(dim, out)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        mod = self.adaLN_modulation(c)
        if mod.ndim == 2:
            mod = mod.unsqueeze(1)
        shift, scale = mod.chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))  # (B, T, out)


def _init_weights(module: nn.Module) -> None:
    """DiT's init: xavier linears with zero bias, N(0, 0.02) embeddings, adaLN-zero."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)
        elif isinstance(m, TimestepEmbedder):
            nn.init.normal_(m.mlp[0].weight, std=0.02)
            nn.init.normal_(m.mlp[2].weight, std=0.02)
    for m in module.modules():
        if isinstance(m, (DiTBlock, FinalLayer)):
            nn.init.zeros_(m.adaLN_modulation[-1].weight)
            nn.init.zeros_(m.adaLN_modulation[-1].bias)
        if isinstance(m, FinalLayer):
            nn.init.zeros_(m.linear.weight)
            nn.init.zeros_(m.linear.bias)


# ---------------------------------------------------------------- models

class LightningDiT(nn.Module):
    """Class-conditional DiT on a (h, w) grid of C-channel tokens, patch size 1."""

    def __init__(self, tokens: int, channels: int, num_classes: int, grid: tuple[int, int],
                 hidden: int, depth: int, heads: int, mlp_ratio: float = 4.0,
                 final_layer: bool = True) -> None:
        super().__init__()
        if tokens != grid[0] * grid[1]:
            raise ValueError(f"{tokens} tokens do not fill a {grid[0]}x{grid[1]} grid")
        self.tokens, self.channels, self.num_classes = tokens, channels, num_classes
        self.grid, self.hidden = tuple(grid), hidden
        self.x_embedder = nn.Linear(channels, hidden)  # patch size 1: one linear per token
        self.t_embedder = TimestepEmbedder(hidden)
        self.y_embedder = LabelEmbedder(num_classes, hidden)
        self.blocks = nn.ModuleList([DiTBlock(hidden, heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden, channels) if final_layer else None
        cos, sin = rope_tables(self.grid, hidden // heads)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        _init_weights(self)

    def features(self, x: Tensor, t: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """(trunk tokens (B, T, D), condition c (B, D))."""
        h = self.x_embedder(x)  # (B, T, D)
        c = self.t_embedder(t) + self.y_embedder(y)  # (B, D)
        rope = (self.rope_cos, self.rope_sin)
        for block in self.blocks:
            h = block(h, c, rope)
        return h, c

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        h, c = self.features(x, t, y)
        return self.final_layer(h, c)  # (B, T, C)


class DiTDH(nn.Module):
    """A LightningDiT trunk plus a wide, shallow head: the head reads the noisy tokens and is
    conditioned per token on (normalised trunk output + timestep/class embedding)."""

    def __init__(self, tokens: int, channels: int, num_classes: int, grid: tuple[int, int],
                 hidden: int, depth: int, heads: int, head_depth: int, head_width: int,
                 mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.trunk = LightningDiT(tokens, channels, num_classes, grid, hidden, depth, heads,
                                  mlp_ratio, final_layer=False)
        self.tokens, self.channels, self.num_classes = tokens, channels, num_classes
        self.grid = tuple(grid)
        head_heads = max(1, head_width // HEAD_DIM_DH)
        if head_width % head_heads:
            raise ValueError(f"DiTDH head width {head_width} is not a multiple of {HEAD_DIM_DH}")
        self.trunk_norm = nn.RMSNorm(hidden, eps=1e-6, elementwise_affine=False)
        self.cond_proj = nn.Linear(hidden, head_width)  # trunk tokens → head condition
        self.c_proj = nn.Linear(hidden, head_width)  # timestep + class → head condition
        self.x_embedder = nn.Linear(channels, head_width)
        self.blocks = nn.ModuleList([DiTBlock(head_width, head_heads, mlp_ratio)
                                     for _ in range(head_depth)])
        self.final_layer = FinalLayer(head_width, channels)
        cos, sin = rope_tables(self.grid, head_width // head_heads)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        _init_weights(self)

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        s, c = self.trunk.features(x, t, y)  # (B, T, D), (B, D)
        cond = self.cond_proj(self.trunk_norm(s)) + self.c_proj(c).unsqueeze(1)  # (B, T, W)
        h = self.x_embedder(x)  # (B, T, W)
        rope = (self.rope_cos, self.rope_sin)
        for block in self.blocks:
            h = block(h, cond, rope)
        return self.final_layer(h, cond)  # (B, T, C)


def build_dit(size: str, tokens: int, channels: int, num_classes: int, grid: tuple[int, int],
              head: dict | None = None) -> nn.Module:
    """LightningDiT of a named size, or DiTDH when `head` = {"depth", "width"} is given."""
    if size not in SIZES:
        raise ValueError(f"unknown DiT size {size!r}; expected one of {list(SIZES)}")
    hidden, depth, heads = SIZES[size]
    grid = (int(grid[0]), int(grid[1]))
    if head is None:
        return LightningDiT(tokens, channels, num_classes, grid, hidden, depth, heads)
    return DiTDH(tokens, channels, num_classes, grid, hidden, depth, heads,
                 head_depth=int(head["depth"]), head_width=int(head["width"]))
