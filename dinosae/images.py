"""Image tensors to files: PNG grids a person can look at, uint8 arrays for storage."""

from __future__ import annotations

from pathlib import Path

import torch

from dinosae.files import atomic_path
from dinosae.outputs import PNG_MARK


def save_grid(images: torch.Tensor, path: str | Path, nrow: int = 8) -> None:
    """Save images in [0, 1] (B, 3, H, W) as one PNG grid (atomic), marked as dinosae's (its
    tEXt Software chunk: outputs.png_ours recognises it)."""
    from PIL import Image, PngImagePlugin
    from torchvision.utils import make_grid

    grid = make_grid(images.detach().float().clamp(0, 1).cpu(), nrow=nrow, padding=2)
    array = grid.mul(255).add_(0.5).clamp_(0, 255).permute(1, 2, 0).to(torch.uint8).numpy()
    info = PngImagePlugin.PngInfo()
    info.add_text("Software", PNG_MARK)
    with atomic_path(path, suffix=".png") as tmp:
        Image.fromarray(array).save(tmp, format="png", pnginfo=info)
