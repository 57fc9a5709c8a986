"""LightningDiT and DiTDH on the latent token grid (patch size 1: one token = one position), built
as the reference code builds them, so that their weights load here and give the same outputs:

* LightningDiT = hustvl/LightningDiT `models/lightningdit.py` = RAE's
  `src/stage2/models/lightningDiT.py`: DiT with SwiGLU MLPs, RMSNorms with learnable weights,
  qkv bias, 2-D RoPE *and* an absolute 2-D sin-cos position embedding added to the input tokens,
  adaLN-zero conditioning on time + class (the class table has one extra row, index
  `num_classes`, the null class for classifier-free guidance). The two references differ only in
  the time embedding: RAE's Gaussian-Fourier features (`time_embed: fourier`, the default) or
  DiT's sinusoids of t (`time_embed: sinusoidal`, hustvl's).
* DiTDH = RAE's `DiTwDDTHead` (`src/stage2/models/DDT.py`): a LightningDiT trunk conditioned on
  silu(t + y) whose output s becomes s_projector(silu(s + t_emb)), the per-token condition of a
  wide, shallow head that reads the noisy tokens again.

Switches (config `dit.*`, defaults = the references' released settings): `qk_norm` (RMSNorm of q
and k per head; off in every released config), `pos_embed` (the absolute sin-cos embedding; on),
`time_embed` (fourier | sinusoidal). The references only build square grids; a (h, w) grid here
gives the same tables for h = w.

Shapes: x (B, T, C) tokens, t (B,) in [0, 1], y (B,) int64 in [0, num_classes] -> (B, T, C).
Time convention: the networks read t as given. dinosae trains with t = 1 noise and predicts
v = dz/dt (dinosae/rfm.py), which is RAE's convention too; a network trained with SiT's
(t = 0 noise, hustvl/LightningDiT) is presented in ours by `FlippedTime` (see CONVENTIONS).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
HEAD_DIM_DH = 128  # DiTDH head: attention head width by default (RAE: 2048 wide, 16 heads)
SWITCHES: dict[str, Any] = {"qk_norm": False, "pos_embed": True, "time_embed": "fourier"}
TIME_EMBEDS = ("fourier", "sinusoidal")


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return torch.addcmul(shift, x, 1 + scale)  # x·(1 + scale) + shift in one kernel


# ---------------------------------------------------------------- position tables

def sincos_pos_embed(grid: tuple[int, int], dim: int) -> Tensor:
    """The absolute 2-D sin-cos embedding (T, dim), float32, row-major tokens: the first half of
    the channels encodes the column index, the second half the row index (the reference's
    meshgrid puts w first), each half as [sin(p·ω_k), cos(p·ω_k)], ω_k = 10000^(-k/(dim/4))."""
    if dim % 4:
        raise ValueError(f"the sin-cos position embedding needs a width divisible by 4, got {dim}")
    h, w = grid
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float64),
                                torch.arange(w, dtype=torch.float64), indexing="ij")

    def half(pos: Tensor) -> Tensor:
        angles = pos.reshape(-1, 1) * omega  # (T, dim/4)
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)

    return torch.cat([half(cols), half(rows)], dim=1).float()  # (T, dim)


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


def apply_rope(x: Tensor, rope: Tensor) -> Tensor:
    """Rotate consecutive pairs (x[2i], x[2i+1]) of x (..., T, head_dim) by the angles of
    rope = stack([cos, sin], -1) (T, head_dim/2, 2): the pair as the complex number
    x[2i] + i·x[2i+1] times e^{iθ}, written out in real arithmetic (a·cos − b·sin,
    a·sin + b·cos) so that inductor compiles it (it has no complex kernels), in fp32; returned in
    x's dtype."""
    a, b = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = rope.float().unbind(-1)  # (T, head_dim/2); fp32 also in a bf16 model
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2).type_as(x)


# ---------------------------------------------------------------- embedders

class FourierTimeEmbedder(nn.Module):
    """t -> [sin(2π·t·W), cos(2π·t·W)] with fixed W ~ N(0, 1) (256 features), then a 2-layer MLP
    (RAE's GaussianFourierEmbedding)."""

    def __init__(self, hidden: int, features: int = 256) -> None:
        super().__init__()
        self.register_buffer("W", torch.randn(features))  # fixed: drawn once, saved, never trained
        self.mlp = nn.Sequential(nn.Linear(2 * features, hidden), nn.SiLU(),
                                 nn.Linear(hidden, hidden))

    def forward(self, t: Tensor) -> Tensor:
        args = t.float()[:, None] * self.W.float()[None, :] * 2 * math.pi  # (B, features)
        feats = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
        return self.mlp(feats.to(self.mlp[0].weight.dtype))  # (B, D)


class SinusoidalTimeEmbedder(nn.Module):
    """t -> [cos(t·f_k), sin(t·f_k)], f_k = 10000^(-k/128), then a 2-layer MLP (DiT's
    TimestepEmbedder, as hustvl/LightningDiT calls it: on t itself, no 1000x)."""

    def __init__(self, hidden: int, features: int = 256) -> None:
        super().__init__()
        self.features = features
        self.mlp = nn.Sequential(nn.Linear(features, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: Tensor) -> Tensor:
        half = self.features // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32,
                                                          device=t.device) / half)
        args = t.float()[:, None] * freqs[None]  # (B, half)
        feats = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(feats.to(self.mlp[0].weight.dtype))  # (B, D)


def time_embedder(kind: str, hidden: int) -> nn.Module:
    if kind not in TIME_EMBEDS:
        raise ValueError(f"unknown time embedding {kind!r}; expected one of {TIME_EMBEDS}")
    return FourierTimeEmbedder(hidden) if kind == "fourier" else SinusoidalTimeEmbedder(hidden)


class LabelEmbedder(nn.Module):
    """Class index -> vector; row `num_classes` is the null class (label dropout / CFG). Label
    dropout itself happens in the training loop."""

    def __init__(self, num_classes: int, hidden: int) -> None:
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden)

    def forward(self, y: Tensor) -> Tensor:
        return self.embedding_table(y)  # (B, D)


# ---------------------------------------------------------------- blocks

class Attention(nn.Module):
    """Multi-head self-attention with qkv bias, optional qk RMSNorm and 2-D RoPE, through SDPA."""

    def __init__(self, dim: int, heads: int, qk_norm: bool = False) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads, self.head_dim, self.qk_norm = heads, dim // heads, qk_norm
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, rope: Tensor) -> Tensor:
        B, T, D = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, H, T, Dh) each
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        else:  # q and k rotated together: one RoPE kernel
            q, k = apply_rope(qkv[:2], rope).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, H, T, Dh)
        return self.proj(x.transpose(1, 2).reshape(B, T, D))


class SwiGLU(nn.Module):
    """SwiGLU MLP, hidden width int(2/3 · int(mlp_ratio · dim)) (the references' rounding)."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        hidden = int(2 / 3 * int(dim * mlp_ratio))
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


class DiTBlock(nn.Module):
    """Pre-norm attention + SwiGLU, each with adaLN-zero shift/scale/gate from a condition of the
    block's width: one per sample (B, D) or one per token (B, T, D)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0,
                 qk_norm: bool = False) -> None:
        super().__init__()
        self.norm1 = nn.RMSNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads, qk_norm)
        self.norm2 = nn.RMSNorm(dim, eps=1e-6)
        self.mlp = SwiGLU(dim, mlp_ratio)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: Tensor, c: Tensor, rope: Tensor) -> Tensor:
        mod = self.adaLN_modulation(c)
        if mod.ndim == 2:
            mod = mod.unsqueeze(1)  # (B, 1, 6D): the same for every token
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mod.chunk(6, dim=-1)
        # x + gate·f(...) as one addcmul kernel each
        x = torch.addcmul(x, gate_a, self.attn(modulate(self.norm1(x), shift_a, scale_a), rope))
        x = torch.addcmul(x, gate_m, self.mlp(modulate(self.norm2(x), shift_m, scale_m)))
        return x  # (B, T, D)


class FinalLayer(nn.Module):
    """RMSNorm, adaLN (shift, scale), then a linear map to the token channels."""

    def __init__(self, dim: int, out: int) -> None:
        super().__init__()
        self.norm_final = nn.RMSNorm(dim, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, out)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        mod = self.adaLN_modulation(c)
        if mod.ndim == 2:
            mod = mod.unsqueeze(1)
        shift, scale = mod.chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (B, T, out)


def _zero_init_modulation(module: nn.Module) -> None:
    """adaLN-zero: every block's and the final layer's modulation, and the final projection."""
    for m in module.modules():
        if isinstance(m, (DiTBlock, FinalLayer)):
            nn.init.zeros_(m.adaLN_modulation[-1].weight)
            nn.init.zeros_(m.adaLN_modulation[-1].bias)
        if isinstance(m, FinalLayer):
            nn.init.zeros_(m.linear.weight)
            nn.init.zeros_(m.linear.bias)


def _xavier(linear: nn.Linear) -> None:
    nn.init.xavier_uniform_(linear.weight)
    nn.init.zeros_(linear.bias)


# ---------------------------------------------------------------- models

class _GridModel(nn.Module):
    """What every generator exposes: tokens, channels, num_classes, grid; RoPE tables."""

    def _setup(self, tokens: int, channels: int, num_classes: int,
               grid: tuple[int, int]) -> None:
        if tokens != grid[0] * grid[1]:
            raise ValueError(f"{tokens} tokens do not fill a {grid[0]}x{grid[1]} grid")
        self.tokens, self.channels, self.num_classes = tokens, channels, num_classes
        self.grid = (int(grid[0]), int(grid[1]))

    def _rope(self, name: str, head_dim: int) -> None:
        with torch.device("cpu"):  # real even in a network built on the meta device to be loaded
            rope = torch.stack(rope_tables(self.grid, head_dim), dim=-1)  # (T, head_dim/2, 2)
        self.register_buffer(name, rope, persistent=False)  # derived from the grid


class LightningDiT(_GridModel):
    """Class-conditional DiT on a (h, w) grid of C-channel tokens, patch size 1."""

    def __init__(self, tokens: int, channels: int, num_classes: int, grid: tuple[int, int],
                 hidden: int, depth: int, heads: int, mlp_ratio: float = 4.0,
                 qk_norm: bool = False, pos_embed: bool = True,
                 time_embed: str = "fourier") -> None:
        super().__init__()
        self._setup(tokens, channels, num_classes, grid)
        self.hidden = hidden
        self.x_embedder = nn.Linear(channels, hidden)  # patch size 1: one linear per token
        self.t_embedder = time_embedder(time_embed, hidden)
        self.y_embedder = LabelEmbedder(num_classes, hidden)
        if pos_embed:  # fixed, saved with the weights as the references do
            self.register_buffer("pos_embed", sincos_pos_embed(self.grid, hidden)[None])
        else:
            self.pos_embed = None
        self.blocks = nn.ModuleList([DiTBlock(hidden, heads, mlp_ratio, qk_norm)
                                     for _ in range(depth)])
        self.final_layer = FinalLayer(hidden, channels)
        self._rope("rope", hidden // heads)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The references': xavier linears with zero bias, N(0, 0.02) class table and time-MLP
        weights, adaLN-zero."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                _xavier(m)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        _zero_init_modulation(self)

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        h = self.x_embedder(x)  # (B, T, D)
        if self.pos_embed is not None:
            h = h + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y)  # (B, D)
        for block in self.blocks:
            h = block(h, c, self.rope)
        return self.final_layer(h, c)  # (B, T, C)


class DiTDH(_GridModel):
    """RAE's DiT^DH: a LightningDiT trunk (width `hidden`) and a wide, shallow head (width
    `head_width`) conditioned per token on the trunk's output."""

    def __init__(self, tokens: int, channels: int, num_classes: int, grid: tuple[int, int],
                 hidden: int, depth: int, heads: int, head_depth: int, head_width: int,
                 head_heads: int | None = None, mlp_ratio: float = 4.0, qk_norm: bool = False,
                 pos_embed: bool = True, time_embed: str = "fourier") -> None:
        super().__init__()
        self._setup(tokens, channels, num_classes, grid)
        self.hidden, self.head_width = hidden, head_width
        head_heads = head_heads or max(1, head_width // HEAD_DIM_DH)
        self.s_embedder = nn.Linear(channels, hidden)  # tokens -> trunk
        self.x_embedder = nn.Linear(channels, head_width)  # tokens -> head
        self.s_projector = (nn.Linear(hidden, head_width) if hidden != head_width
                            else nn.Identity())
        self.t_embedder = time_embedder(time_embed, hidden)
        self.y_embedder = LabelEmbedder(num_classes, hidden)
        if pos_embed:  # on the trunk's input only
            self.register_buffer("pos_embed", sincos_pos_embed(self.grid, hidden)[None])
        else:
            self.pos_embed = None
        self.blocks = nn.ModuleList([DiTBlock(hidden, heads, mlp_ratio, qk_norm)
                                     for _ in range(depth)])
        self.head_blocks = nn.ModuleList([DiTBlock(head_width, head_heads, mlp_ratio, qk_norm)
                                          for _ in range(head_depth)])
        self.final_layer = FinalLayer(head_width, channels)
        self._rope("rope", hidden // heads)
        self._rope("head_rope", head_width // head_heads)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """RAE's: PyTorch's default linears, except xavier embedders with zero bias; N(0, 0.02)
        class table and time-MLP weights; adaLN-zero."""
        _xavier(self.x_embedder)
        _xavier(self.s_embedder)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        _zero_init_modulation(self)

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        t_emb = self.t_embedder(t)  # (B, D)
        c = F.silu(t_emb + self.y_embedder(y))  # (B, D)
        s = self.s_embedder(x)  # (B, T, D)
        if self.pos_embed is not None:
            s = s + self.pos_embed
        for block in self.blocks:
            s = block(s, c, self.rope)
        s = self.s_projector(F.silu(s + t_emb.unsqueeze(1)))  # (B, T, W): the head's condition
        h = self.x_embedder(x)  # (B, T, W)
        for block in self.head_blocks:
            h = block(h, s, self.head_rope)
        return self.final_layer(h, s)  # (B, T, C)


def build_dit(size: str, tokens: int, channels: int, num_classes: int, grid: tuple[int, int],
              head: dict | None = None, **switches: Any) -> nn.Module:
    """LightningDiT of a named size, or DiTDH when `head` = {"depth", "width"[, "heads"]} is
    given. `switches`: qk_norm, pos_embed, time_embed (defaults in SWITCHES)."""
    if size not in SIZES:
        raise ValueError(f"unknown DiT size {size!r}; expected one of {list(SIZES)}")
    unknown = set(switches) - set(SWITCHES)
    if unknown:
        raise ValueError(f"unknown DiT switches {sorted(unknown)}; expected {list(SWITCHES)}")
    opts = {**SWITCHES, **switches}
    hidden, depth, heads = SIZES[size]
    grid = (int(grid[0]), int(grid[1]))
    if head is None:
        return LightningDiT(tokens, channels, num_classes, grid, hidden, depth, heads, **opts)
    return DiTDH(tokens, channels, num_classes, grid, hidden, depth, heads,
                 head_depth=int(head["depth"]), head_width=int(head["width"]),
                 head_heads=head.get("heads"), **opts)


def switches_of(dit_cfg: dict) -> dict[str, Any]:
    """The model switches of a `dit` config section (absent keys: the defaults)."""
    return {k: dit_cfg.get(k, v) for k, v in SWITCHES.items()}


@dataclass(frozen=True)
class DiTArgs:
    """What rebuilds a DiT (nanoGPT's `model_args`), read from the `config` every DiT checkpoint
    and export carries: {"dit": {model, head, qk_norm, pos_embed, time_embed, ...training
    settings}, "tokens", "channels", "num_classes", "grid", ...}. The checkpoint keeps that
    whole config (the run's settings, radius, alpha, convention); these fields fix the network."""

    model: str
    head: dict | None
    tokens: int
    channels: int
    num_classes: int
    grid: tuple[int, int]
    qk_norm: bool = SWITCHES["qk_norm"]
    pos_embed: bool = SWITCHES["pos_embed"]
    time_embed: str = SWITCHES["time_embed"]

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> DiTArgs:
        d = config["dit"]
        return cls(model=d["model"], head=d.get("head"), tokens=int(config["tokens"]),
                   channels=int(config["channels"]), num_classes=int(config["num_classes"]),
                   grid=(int(config["grid"][0]), int(config["grid"][1])), **switches_of(d))

    def build(self) -> nn.Module:
        """The network, random weights."""
        return build_dit(self.model, self.tokens, self.channels, self.num_classes, self.grid,
                         self.head, qk_norm=self.qk_norm, pos_embed=self.pos_embed,
                         time_embed=self.time_embed)


def dit_from_config(config: Mapping[str, Any]) -> nn.Module:
    """The network a DiT checkpoint's or export's config describes (random weights)."""
    return DiTArgs.from_config(config).build()


def dit_from_checkpoint(ck: dict, where: str, weights: str = "ema") -> nn.Module:
    """The network of a DiT checkpoint (or export: {"config", "ema"}) with its `weights` loaded,
    every missing, unexpected or misshapen key named: the one place a DiT is rebuilt."""
    from dinosae.models.keymap import load_weights

    try:
        with torch.device("meta"):  # shapes only: the weights come from the checkpoint
            model = dit_from_config(ck["config"])
    except (KeyError, TypeError, AttributeError) as e:
        from dinosae.errors import CheckpointError

        raise CheckpointError(f"{where}: its config cannot rebuild a DiT (missing or malformed "
                              f"{type(e).__name__}: {str(e)[:100]})") from None
    load_weights(model, ck[weights], f"{where} does not fit its own config")
    return model


def load_dit(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """(EMA DiT in eval mode without grads, as the sampler calls it, meta) from a DiT
    checkpoint file. meta = its config (dit, tokens, channels, num_classes, grid, radius, alpha,
    mean_norm, convention of an imported generator) plus step, ae, cache and path."""
    from dinosae.checkpoint import DIT_KIND, read_checkpoint

    ck = read_checkpoint(path, DIT_KIND)
    c = ck["config"]
    model = dit_from_checkpoint(ck, str(path)).to(device).eval().requires_grad_(False)
    meta = dict(c, step=ck["step"], ae=ck.get("ae"), cache=ck.get("cache"), path=str(path))
    return for_sampling(model, c), meta


# ---------------------------------------------------------------- conventions

# How a generator trained elsewhere reads t and walks its own sampler's time grid, recorded by
# the importers as config["convention"] (a dinosae-trained DiT has none: "dinosae").
#   flip:        the network was trained with t = 0 noise and v = d/dt towards the data (SiT's
#                interpolant); FlippedTime presents it with t = 1 noise and v = dz/dt
#   t_end:       the last time of the grid before the shift, in dinosae's time (RAE stops at
#                1 - 1/1000 of its way: t = 1e-3)
#   grid_points: its `num_steps` counts grid points, i.e. steps - 1 Euler steps
#   cfg_channels: guidance on the first k channels only (hustvl's forward_with_cfg: 3)
CONVENTIONS: dict[str, dict[str, Any]] = {
    "dinosae": {"flip": False, "t_end": 0.0, "grid_points": False, "cfg_channels": None},
    "rae": {"flip": False, "t_end": 1e-3, "grid_points": True, "cfg_channels": None},
    "sit": {"flip": True, "t_end": 0.0, "grid_points": True, "cfg_channels": 3},
}


def convention_of(config: dict) -> dict[str, Any]:
    name = config.get("convention") or "dinosae"
    if name not in CONVENTIONS:
        raise ValueError(f"unknown generator convention {name!r}; expected {list(CONVENTIONS)}")
    return {"name": name, **CONVENTIONS[name]}


class FlippedTime(nn.Module):
    """A network trained with t = 0 noise and v = data - noise (SiT, hustvl/LightningDiT),
    presented in dinosae's convention (t = 1 noise, v = dz/dt): t -> 1 - t, v -> -v."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.tokens, self.channels = net.tokens, net.channels
        self.num_classes, self.grid = net.num_classes, net.grid

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        return -self.net(x, 1.0 - t, y)


def for_sampling(model: nn.Module, config: dict) -> nn.Module:
    """`model` (weights loaded) as dinosae's sampler calls it, per config["convention"]."""
    return FlippedTime(model) if convention_of(config)["flip"] else model
