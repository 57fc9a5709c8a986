"""Image tensors to files: PNG grids a person can look at, uint8 arrays for storage."""

from __future__ import annotations

from pathlib import Path

import torch

from dinosae.files import atomic_path


def save_grid(images: torch.Tensor, path: str | Path, nrow: int = 8) -> None:
    """Save images in [0, 1] (B, 3, H, W) as one PNG grid (atomic)."""
    from torchvision.utils import save_image

    with atomic_path(path, suffix=".png") as tmp:
        save_image(images.detach().float().clamp(0, 1).cpu(), tmp, nrow=nrow, padding=2)
