"""Shared pieces of the evaluation tests: shard folders and sample files written by hand per
the contracts (tarfile, h5py), uint8 datasets for torch-fidelity, a tiny random teacher."""

from __future__ import annotations

import socket
import tarfile
from pathlib import Path

import h5py
import helpers
import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torch.utils.data import Dataset


def write_shards(folder: Path, images: np.ndarray, labels: list[int], per_shard: int = 4) -> None:
    """A val shard folder per the data contract, `per_shard` images a tar (plain tarfile)."""
    n = len(images)
    counts = [min(per_shard, n - first) for first in range(0, n, per_shard)]
    helpers.write_shards(folder, images, labels, counts, split="val")


def write_samples(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    with h5py.File(path, "w") as f:
        f["images"] = images
        f["labels"] = labels
        f["seeds"] = np.arange(len(images))
        f.attrs["done"] = len(images)
        f.attrs["steps"] = 4
        f.attrs["dit_checkpoint"] = "dit.pt"


class U8(Dataset):
    """uint8 CHW tensors, the input torch-fidelity takes."""

    def __init__(self, nhwc: np.ndarray) -> None:
        self.x = torch.from_numpy(nhwc).permute(0, 3, 1, 2).contiguous()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.x[i]


def images(n: int, seed: int, size: int = 32) -> np.ndarray:
    """Smooth-ish random images (low-resolution noise upsampled) so features vary."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g)
    x = torch.nn.functional.interpolate(low, size=size, mode="bilinear", align_corners=False)
    x = (x + 0.1 * torch.rand(n, 3, size, size, generator=g)).clamp(0, 1)
    return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def read_tar_images(folder: Path) -> np.ndarray:
    """All images of a shard folder, decoded with tarfile + PIL (not through dinosae)."""
    out = []
    for tar_path in sorted(folder.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in sorted(tar.getmembers(), key=lambda m: m.name):
                if m.name.endswith(".png"):
                    out.append(np.asarray(Image.open(tar.extractfile(m)).convert("RGB")))
    return np.stack(out)


def block_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any connection attempt fails the test: nothing may be downloaded."""
    def refuse(*args, **kwargs):
        raise AssertionError("a network connection was attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def make_teacher(seed: int = 0) -> torch.nn.Module:
    """A tiny random timm DINOv3 ViT for 32 px images."""
    torch.manual_seed(seed)
    return timm.create_model("vit_small_patch16_dinov3", pretrained=False, num_classes=0,
                             img_size=32, embed_dim=64, depth=2, num_heads=2).eval()
