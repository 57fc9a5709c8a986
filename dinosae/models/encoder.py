"""The DINOv3 teacher and the DINO-SAE encoder (trainable stem + the same frozen ViT).

Teacher = timm's DINOv3 `Eva` with its own linear patch embedding. Encoder = a new stem in
place of that patch embedding, followed by the teacher's (shared, frozen) RoPE, blocks and
final norm. Both return the final-norm patch tokens (B, T, C), CLS and registers dropped.
Images come in as floats in [0, 1] and are normalised with ImageNet mean/std here.
"""

from __future__ import annotations

import logging
from pathlib import Path

import timm
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from dinosae.errors import TeacherWeightsError

log = logging.getLogger("dinosae")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TEACHER_SEED = 0  # "random" teacher weights: always the same network


def _how_to_supply(arch: str) -> str:
    return (f"Supply the weights as a local file instead: download the timm checkpoint of {arch} "
            "(e.g. model.safetensors from https://huggingface.co/timm/"
            f"{arch}.lvd1689m) on a machine with network access and set "
            "autoencoder.teacher.weights to its path (.safetensors or .pth, timm or original "
            "DINOv3 key format); or use 'random' for an untrained teacher.")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from dinosae.files import read_safetensors

        return read_safetensors(path)
    from dinosae.checkpoint import load_checkpoint

    sd = load_checkpoint(path)  # weights_only: a file holding code is refused
    for key in ("model_ema", "model", "state_dict", "module"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise TeacherWeightsError(f"teacher weights {str(path)!r}: expected a state dict")
    return sd


def load_teacher_file(model: nn.Module, path: str | Path) -> None:
    """Load a local .pth/.safetensors state dict (timm or Meta's original DINOv3 keys, converted
    by timm's own converter) into `model`; a mismatch lists every wrong key."""
    from dinosae.errors import WeightsMismatchError
    from dinosae.models.keymap import dinov3_to_timm, mismatches

    path = Path(path)
    if not path.is_file():
        raise TeacherWeightsError(f"teacher weights file {str(path)!r} does not exist")
    what = (f"teacher weights {str(path)!r} do not fit the configured architecture "
            f"({arch_name(model)} with the configured overrides)")
    try:
        sd = dinov3_to_timm(read_state_dict(path), model)
    except WeightsMismatchError as e:
        raise TeacherWeightsError(f"{what}: {e}") from None
    expected = {k: v for k, v in model.state_dict().items()
                if not k.startswith(("head.", "fc_norm."))}
    problems = mismatches(expected, sd)
    if problems:
        raise TeacherWeightsError(f"{what}: {'; '.join(problems)}")
    model.load_state_dict(sd, strict=False)


def arch_name(model: nn.Module) -> str:
    return getattr(model, "pretrained_cfg", {}).get("architecture", type(model).__name__)


def create_teacher(tcfg: dict, image_size: int, load_weights: bool = True) -> nn.Module:
    """timm DINOv3 ViT from `autoencoder.teacher` ({arch, overrides, weights}), frozen, eval.

    weights: "random" (seeded, reproducible), a local file, or "hf-hub:<id>". With
    load_weights=False the weights are left random (they come from a checkpoint next)."""
    arch, weights = tcfg["arch"], tcfg["weights"]
    kwargs = dict(img_size=image_size, num_classes=0, **(tcfg.get("overrides") or {}))
    if load_weights and weights.startswith("hf-hub:"):
        hub_id = weights[len("hf-hub:"):]
        try:
            model = timm.create_model(
                arch, pretrained=True,
                pretrained_cfg_overlay=dict(hf_hub_id=hub_id, source="hf-hub"), **kwargs)
        except Exception as e:  # offline, unknown id, wrong shapes: all end the same way
            raise TeacherWeightsError(
                f"could not load teacher weights {weights!r} ({type(e).__name__}: {e}). "
                + _how_to_supply(arch)) from e
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(TEACHER_SEED)
            model = timm.create_model(arch, pretrained=False, **kwargs)
        if load_weights and weights != "random":
            load_teacher_file(model, weights)
    if getattr(model, "rope_mixed", False):
        raise ValueError(f"{arch}: mixed-mode RoPE is not supported (use a DINOv3 model)")
    model.requires_grad_(False)
    return model.eval()


class Encoder(nn.Module):
    """stem + frozen DINOv3 ViT -> final-norm patch tokens (B, T, C).

    `vit` is the teacher module itself (shared, not copied); its patch_embed is not used here.
    """

    def __init__(self, stem: nn.Module, vit: nn.Module) -> None:
        super().__init__()
        self.stem = stem
        self.vit = vit
        self.grad_checkpointing = False
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 3, H, W) in [0, 1]
        vit = self.vit
        x = self.stem(self.normalize(x))  # (B, h, w, C)
        x, rope = vit._pos_embed(x)  # (B, prefix + h*w, C): CLS + registers prepended
        x = vit.norm_pre(x)
        for block in vit.blocks:
            if self.grad_checkpointing and x.requires_grad:
                x = checkpoint(block, x, rope=rope, use_reentrant=False)
            else:
                x = block(x, rope=rope)
        x = vit.norm(x)
        return x[:, vit.num_prefix_tokens:]  # (B, T, C)

    @torch.no_grad()
    def teacher_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The unmodified teacher (its own patch embedding) on the same images: (B, T, C)."""
        tokens = self.vit.forward_features(self.normalize(x))
        return tokens[:, self.vit.num_prefix_tokens:]
