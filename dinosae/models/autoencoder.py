"""The DINO-SAE autoencoder: encoder (stem + frozen DINOv3 ViT) and DC-AE decoder.

    x (B,3,H,W) in [0,1] --stem--> (B,h,w,C) --frozen ViT--> z (B,T,C) --decoder--> x' (B,3,H,W)

The frozen ViT with its original patch embedding is the teacher (alignment target,
discriminator features). It is stored once, inside the encoder (`encoder.vit`).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from dinosae.models.decoder import Decoder
from dinosae.models.encoder import Encoder, create_teacher
from dinosae.models.stem import CNNStem, LinearStem

AE_KIND = "dinosae-ae"


class AutoEncoder(nn.Module):
    def __init__(self, encoder: Encoder, decoder: Decoder) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.grid = tuple(decoder.grid)  # (h, w)
        self.channels = encoder.vit.embed_dim  # C

    @property
    def teacher(self) -> nn.Module:
        """The frozen DINOv3 ViT with its own patch embedding."""
        return self.encoder.vit

    def train(self, mode: bool = True) -> AutoEncoder:
        super().train(mode)
        self.encoder.vit.eval()  # frozen: always in inference mode
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.encoder.grad_checkpointing = enable
        self.decoder.grad_checkpointing = enable

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] (B, 3, H, W) -> raw final-norm patch tokens (B, T, C)."""
        return self.encoder(x)

    def teacher_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The original DINOv3's final-norm patch tokens (B, T, C), no gradient."""
        return self.encoder.teacher_tokens(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Tokens (B, T, C) -> images (B, 3, H, W), about [0, 1] (not clamped)."""
        return self.decoder(z)

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(z, reconstruction); `noise` (B, T, C), if given, is added to z before decoding."""
        z = self.encode(x)
        return z, self.decode(z if noise is None else z + noise)


def build_autoencoder(cfg: dict, load_teacher_weights: bool = True) -> AutoEncoder:
    """AutoEncoder from cfg["autoencoder"] and cfg["data"]["image_size"].

    load_teacher_weights=False leaves the teacher random (for loading a checkpoint into it)."""
    acfg, image_size = cfg["autoencoder"], cfg["data"]["image_size"]
    vit = create_teacher(acfg["teacher"], image_size, load_weights=load_teacher_weights)
    patch = vit.patch_embed.patch_size[0]
    if patch != 16 or image_size % 16:
        raise ValueError(f"the stem makes 16x16-pixel tokens: teacher patch size must be 16 "
                         f"(got {patch}) and data.image_size a multiple of 16 (got {image_size})")
    if acfg.get("stem", "cnn") == "linear":
        stem = LinearStem(vit.embed_dim)
        stem.proj.load_state_dict(vit.patch_embed.proj.state_dict())  # start as the teacher's
    else:
        stem = CNNStem(acfg["stem_widths"], vit.embed_dim)
    grid = (image_size // 16, image_size // 16)
    d = acfg["decoder"]
    decoder = Decoder(vit.embed_dim, grid, d["widths"], d["depths"], d["blocks"],
                      norm=d.get("norm", "channel"), attn_scales=d.get("attn_scales", (5,)),
                      evit_norm=d.get("evit_norm", True), upsample=d.get("upsample", "interpolate"))
    return AutoEncoder(Encoder(stem, vit), decoder)


def ae_config(cfg: dict) -> dict:
    """The config a checkpoint carries: enough to rebuild the network."""
    return {"autoencoder": cfg["autoencoder"], "data": {"image_size": cfg["data"]["image_size"]}}


def load_autoencoder(path: str | Path, device: str | torch.device = "cpu") -> AutoEncoder:
    """The EMA autoencoder of a stage checkpoint, in eval mode, with requires_grad False."""
    from dinosae.train.common import CheckpointError, load_checkpoint

    ckpt = load_checkpoint(path)
    if ckpt.get("kind") != AE_KIND:
        raise CheckpointError(f"{str(path)!r} is not an autoencoder checkpoint "
                              f"(kind {ckpt.get('kind')!r}, expected {AE_KIND!r})")
    ae = build_autoencoder(ckpt["config"], load_teacher_weights=False)
    ae.load_state_dict(ckpt["ema"])
    ae.requires_grad_(False)
    return ae.eval().to(device)
