"""LPIPS through the `lpips` package, built without ever downloading anything.

The `lpips` package ships its small linear calibration layers; its backbone (VGG16, AlexNet or
SqueezeNet) needs torchvision's ImageNet weights, which torchvision would download. Here:

* weights "imagenet": torchvision's file must already be in the torch hub cache
  (`<torch.hub.get_dir()>/checkpoints/vgg16-397923af.pth` for VGG); otherwise a clear error;
* weights "random": a randomly initialised, seeded backbone (`pnet_rand=True`). Offline only:
  the numbers it gives are NOT LPIPS, just a fixed random-feature distance;
* anything else: a local file holding the torchvision backbone's state dict.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import lpips
import torch
import torch.nn as nn

from dinosae.errors import LPIPSWeightsError

LPIPS_SEED = 0

# net -> torchvision weights enum name (its URL gives the hub-cache file name)
_TV_WEIGHTS = {"vgg": "VGG16_Weights", "alex": "AlexNet_Weights",
               "squeeze": "SqueezeNet1_1_Weights"}


def backbone_cache_file(net: str) -> Path:
    """Where torchvision keeps the ImageNet weights of the LPIPS backbone `net`."""
    import torchvision.models as tvm

    url = getattr(tvm, _TV_WEIGHTS[net]).IMAGENET1K_V1.url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def _load_backbone(model: lpips.LPIPS, path: Path) -> None:
    """Copy a torchvision backbone state dict (keys features.<i>.*) into lpips' slices."""
    from dinosae.checkpoint import load_checkpoint

    sd = load_checkpoint(path)  # weights_only: a file holding code is refused
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    feats = {k[len("features."):] if k.startswith("features.") else k: v for k, v in sd.items()}
    target = model.net.state_dict()
    new = {}
    for key in target:  # "slice<j>.<i>.weight" -> "<i>.weight"
        src = key.split(".", 1)[1]
        if src not in feats or feats[src].shape != target[key].shape:
            raise LPIPSWeightsError(
                f"LPIPS backbone weights {str(path)!r} do not fit lpips' {model.pnet_type}: "
                f"no tensor 'features.{src}' of shape {tuple(target[key].shape)}")
        new[key] = feats[src]
    model.net.load_state_dict(new)


def build_lpips(net: str = "vgg", weights: str = "random") -> nn.Module:
    """A frozen lpips.LPIPS in eval mode; see the module docstring for `weights`."""
    if net not in _TV_WEIGHTS:
        raise ValueError(f"LPIPS net must be one of {sorted(_TV_WEIGHTS)}, got {net!r}")
    if weights == "imagenet":
        path = backbone_cache_file(net)
        if not path.is_file():
            raise LPIPSWeightsError(
                f"LPIPS ({net}) needs torchvision's ImageNet weights at {str(path)!r}, which are "
                "not there, and this code never downloads. Copy that file there (it is "
                f"{path.name}, from download.pytorch.org/models), or set "
                "autoencoder.lpips.weights to the file's path, or to 'random' for an offline "
                "stand-in that is not real LPIPS.")
    elif weights != "random":
        path = Path(weights)
        if not path.is_file():
            raise LPIPSWeightsError(f"LPIPS backbone weights file {weights!r} does not exist")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(LPIPS_SEED)
        with warnings.catch_warnings():  # lpips uses torchvision's deprecated `pretrained=`
            warnings.simplefilter("ignore", UserWarning)
            model = lpips.LPIPS(net=net, pnet_rand=True, verbose=False)
    if weights != "random":
        _load_backbone(model, path)
    model.requires_grad_(False)
    return model.eval()


def lpips_distance(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample LPIPS (B,) between images in [0, 1]."""
    return model(x, y, normalize=True).flatten()
