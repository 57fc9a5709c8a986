"""The DINO-SAE autoencoder: encoder (stem + frozen DINOv3 ViT) and DC-AE decoder.

    x (B,3,H,W) in [0,1] --stem--> (B,h,w,C) --frozen ViT--> z (B,T,C) --decoder--> x' (B,3,H,W)

The frozen ViT with its original patch embedding is the teacher (alignment target,
discriminator features). It lives once, inside the encoder (`encoder.vit`). Stage checkpoints
hold only the trained parts and reference the teacher by its source and sha256
(`DinoSAE.from_checkpoint` rebuilds it and checks); exports and imports hold it whole.

Every encode to the latent space goes through `encode_unit` (unit tokens + their norms: the
cache, the API, the teacher-FD probes) and every decode through `decode_at` (tokens rescaled to a
radius: the sampler, the DiT's grids, the API).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from dinosae import sphere
from dinosae.checkpoint import AE_KIND, read_checkpoint, tensors_fingerprint
from dinosae.errors import CheckpointError
from dinosae.models.decoder import Decoder
from dinosae.models.encoder import Encoder, create_teacher
from dinosae.models.stem import CNNStem, LinearStem

TEACHER_PREFIX = "encoder.vit."  # state-dict keys of the frozen teacher


@dataclass(frozen=True)
class AutoencoderArgs:
    """The model config every AE checkpoint and export carries (as `to_dict()`): enough to
    rebuild the network. `teacher` = {arch, overrides, weights}; `decoder` = {widths, depths,
    blocks, ...}; `discriminator` = {backbone, layers, channels | weights}."""

    image_size: int
    teacher: dict
    stem: str
    stem_widths: list
    decoder: dict
    discriminator: dict
    extra: dict  # the rest of the config's autoencoder section (lpips, pretrained), kept as is

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> AutoencoderArgs:
        """From a run config (or a checkpoint's config: the same sections)."""
        a = copy.deepcopy(dict(cfg["autoencoder"]))
        known = {k: a.pop(k) for k in ("teacher", "stem", "stem_widths", "decoder",
                                       "discriminator") if k in a}
        return cls(image_size=int(cfg["data"]["image_size"]), teacher=known["teacher"],
                   stem=known.get("stem", "cnn"), stem_widths=known.get("stem_widths", []),
                   decoder=known["decoder"], discriminator=known.get("discriminator", {}),
                   extra=a)

    from_dict = from_config  # a checkpoint's `config` has the run config's layout

    def to_dict(self) -> dict:
        ae = {"teacher": self.teacher, "stem": self.stem, "stem_widths": self.stem_widths,
              "decoder": self.decoder, "discriminator": self.discriminator, **self.extra}
        return {"autoencoder": copy.deepcopy(ae), "data": {"image_size": self.image_size}}

    def architecture(self) -> dict:
        """What fixes tensor shapes (the teacher's weights and LPIPS do not)."""
        teacher = {k: v for k, v in self.teacher.items() if k != "weights"}
        disc = {k: v for k, v in self.discriminator.items() if k != "weights"}
        return {"image_size": self.image_size, "teacher": teacher, "stem": self.stem,
                "stem_widths": self.stem_widths, "decoder": self.decoder,
                "discriminator": disc}


def _load(module: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    """load_state_dict with every missing, unexpected or misshapen key in one message."""
    from dinosae.models.keymap import load_weights

    load_weights(module, state, f"{what} does not fit the configured network")


class DinoSAE(nn.Module):
    def __init__(self, encoder: Encoder, decoder: Decoder) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.grid = tuple(decoder.grid)  # (h, w)
        self.channels = encoder.vit.embed_dim  # C
        # images are 16x the token grid: the stem's 16-pixel tokens, undone by the decoder's
        # four x2 upsamplings (build_autoencoder enforces the 16)
        self.image_hw = (16 * self.grid[0], 16 * self.grid[1])

    @property
    def teacher(self) -> nn.Module:
        """The frozen DINOv3 ViT with its own patch embedding."""
        return self.encoder.vit

    def train(self, mode: bool = True) -> DinoSAE:
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

    @torch.no_grad()
    def encode_unit(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images in [0, 1] (B, 3, H, W) -> (unit-norm tokens (B, T, C), raw norms (B, T)),
        both float32, normalised in fp32 whatever the model's dtype."""
        z = self.encode(x).float()
        n = z.norm(dim=-1)
        return z / n.clamp_min(1e-12).unsqueeze(-1), n

    @torch.no_grad()
    def decode_at(self, z: torch.Tensor, radius: float | torch.Tensor | None) -> torch.Tensor:
        """Tokens (B, T, C) rescaled to `radius` along C (a number such as s_vae, per-token
        norms (B, T, 1), or None: as they are), then decoded -> images (B, 3, H, W) float32."""
        dtype = next(self.decoder.parameters()).dtype
        z = z.float()
        if radius is not None:
            z = sphere.project(z, radius)
        return self.decode(z.to(dtype)).float()

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The state dict without the frozen teacher (what a stage checkpoint stores)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(TEACHER_PREFIX)}

    def teacher_ref(self, args: AutoencoderArgs) -> dict[str, str]:
        """How a stage checkpoint references the frozen teacher: its source and sha256."""
        return {"weights": args.teacher["weights"], "sha256": tensors_fingerprint(self.teacher)}

    @classmethod
    def from_checkpoint(cls, ck: Mapping[str, Any], where: str, weights: str = "ema"
                        ) -> DinoSAE:
        """The network of an AE checkpoint dict with its `weights` ("ema" or "model") loaded:
        the one place an autoencoder is rebuilt from a checkpoint. The teacher comes from the
        checkpoint itself (imports, checkpoints written before lean checkpoints) or is rebuilt
        from its recorded source and must have the recorded sha256."""
        try:
            args = AutoencoderArgs.from_dict(ck["config"])
        except (KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{where}: its config cannot rebuild an autoencoder (missing "
                                  f"or malformed {type(e).__name__}: {str(e)[:100]})") from None
        state = ck[weights]
        whole = any(k.startswith(TEACHER_PREFIX) for k in state)
        ae = build_autoencoder(args.to_dict(), load_teacher_weights=not whole,
                               init_trainable=False)
        if whole:
            _load(ae, state, f"{where} ({weights})")
            return ae
        ref = ck.get("teacher") or {}
        got = tensors_fingerprint(ae.teacher)
        if ref.get("sha256") != got:
            raise CheckpointError(
                f"{where}: the teacher rebuilt from {ref.get('weights')!r} (sha256 {got[:16]}) is "
                f"not the one this checkpoint was trained with (sha256 "
                f"{str(ref.get('sha256'))[:16]}); restore those teacher weights")
        ae.load_trainable(state, f"{where} ({weights})")
        return ae

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> DinoSAE:
        """The EMA autoencoder of an AE checkpoint file, in eval mode, without gradients."""
        ae = cls.from_checkpoint(read_checkpoint(path, AE_KIND), str(path))
        ae.requires_grad_(False)
        return ae.eval().to(device)

    def load_trainable(self, state: Mapping[str, torch.Tensor], what: str) -> None:
        """Load a state dict that holds everything but the teacher (which stays as it is)."""
        teacher = {k: v for k, v in self.state_dict().items() if k.startswith(TEACHER_PREFIX)}
        _load(self, {**state, **teacher}, what)

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(z, reconstruction). `noise` (B, T, C), if given, is relative (stage 4): scaled by
        each token's RMS over C, ||z_t|| / sqrt(C), and added to z before decoding. Its
        noise-to-signal ratio is then RAE's (RAE noises layer-normalised tokens, whose components
        have unit RMS) whatever the tokens' radius: the encoder's raw norms here, s_vae for
        generated latents, which `decode_at` rescales before this same decoder."""
        z = self.encode(x)
        if noise is None:
            return z, self.decode(z)
        rms = z.detach().float().pow(2).mean(dim=-1, keepdim=True).sqrt()
        return z, self.decode(z + (noise.float() * rms).to(z.dtype))


def build_autoencoder(cfg: dict, load_teacher_weights: bool = True,
                      init_trainable: bool = True) -> DinoSAE:
    """DinoSAE from cfg["autoencoder"] and cfg["data"]["image_size"].

    load_teacher_weights=False leaves the teacher random (for loading a checkpoint into it).
    init_trainable=False builds the stem and decoder on the meta device, shapes without values,
    for a checkpoint's weights to be loaded into (`_load` assigns them): their random
    initialisation would be thrown away, and costs seconds at paper size."""
    acfg, image_size = cfg["autoencoder"], cfg["data"]["image_size"]
    vit = create_teacher(acfg["teacher"], image_size, load_weights=load_teacher_weights)
    patch = vit.patch_embed.patch_size[0]
    if patch != 16 or image_size % 16:
        raise ValueError(f"the stem makes 16x16-pixel tokens: teacher patch size must be 16 "
                         f"(got {patch}) and data.image_size a multiple of 16 (got {image_size})")
    with contextlib.nullcontext() if init_trainable else torch.device("meta"):
        if acfg.get("stem", "cnn") == "linear":
            stem = LinearStem(vit.embed_dim)
            stem.proj.load_state_dict(vit.patch_embed.proj.state_dict())  # start as the teacher's
        else:
            stem = CNNStem(acfg["stem_widths"], vit.embed_dim)
        grid = (image_size // 16, image_size // 16)
        d = acfg["decoder"]
        decoder = Decoder(vit.embed_dim, grid, d["widths"], d["depths"], d["blocks"],
                          norm=d.get("norm", "channel"), attn_scales=d.get("attn_scales", (5,)),
                          evit_norm=d.get("evit_norm", True),
                          upsample=d.get("upsample", "interpolate"))
    return DinoSAE(Encoder(stem, vit), decoder)


def ae_config(cfg: dict) -> dict:
    """The config a checkpoint carries: enough to rebuild the network."""
    return AutoencoderArgs.from_config(cfg).to_dict()
