"""Regenerate tests/fixtures/dit_*.safetensors: the reference generators run for real.

    PYTHONPATH=/tmp/refdeps python bench/make_dit_fixtures.py \\
        --lightningdit /path/to/hustvl/LightningDiT --rae /path/to/bytetriper/RAE

Runs, OUTSIDE this package (nothing of dinosae is imported), at a tiny size (4x4 token grid, 32
channels, widths 32-40, two blocks):
  * hustvl/LightningDiT `models/lightningdit.py` LightningDiT (sinusoidal time embedding),
  * RAE `src/stage2/models/lightningDiT.py` LightningDiT (Gaussian-Fourier time embedding),
  * RAE `src/stage2/models/DDT.py` DiTwDDTHead,
each with random weights (norm weights, adaLN and final layers not zero), and writes per model
one safetensors file: the reference state dict under `weights/` (its own key names, as
`torch.save(model.state_dict())` would hold it), inputs `x` (B, T, C) (the reference's (B, C, H,
W) flattened row-major), `t`, `y`, the reference output `out` (B, T, C), and the model's
constructor arguments as JSON metadata. Two files also hold a 4-step run of the reference's own
ODE sampler (torchdiffeq Euler, as its sample.py / inference.py call it): RAE's Transport on the
DiTwDDTHead with interval CFG, and hustvl's on its LightningDiT with its timestep shift and CFG
interval: `noise`, `labels`, `sample`, the settings in the metadata.

Trained parameters are rounded to float16 values (stored as float16, so the files stay small;
the reference ran with exactly those values in float32); fixed tensors (position tables, RoPE
tables) are stored unrounded in float32.

The reference code needs `einops` and `torchdiffeq` (pip install --target /tmp/refdeps einops
torchdiffeq); modules it imports but never uses here (transformers, regex, fairscale) are
stubbed when absent. `torch.compile` decorators in hustvl's code are disabled.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # hustvl decorates methods with torch.compile

import torch  # noqa: E402
from reference_stubs import stub_missing  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

GRID, C, K, B = 4, 32, 10, 3  # 4x4 tokens of 32 channels, 10 classes, batch 3


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Every trained parameter random (weights ~ N(0, 1/fan_in), norm weights 1 + N(0, 0.2²),
    biases and the class table N(0, 0.1²) / N(0, 1)), rounded to float16 values; fixed tensors
    (pos_embed, W, RoPE tables) left as the reference built them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            if "embedding_table" in name:
                v = torch.randn(p.shape, generator=g)
            elif p.ndim >= 2:
                fan_in = math.prod(p.shape[1:])
                v = torch.randn(p.shape, generator=g) / math.sqrt(fan_in)
            elif "norm" in name:
                v = 1 + 0.2 * torch.randn(p.shape, generator=g)
            else:
                v = 0.1 * torch.randn(p.shape, generator=g)
            p.copy_(v.half().float())


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    return {f"weights/{k}": (v.half() if k in trained else v.float()).contiguous()
            for k, v in model.state_dict().items()}


def inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, GRID, GRID, generator=g)
    t = torch.tensor([0.05, 0.5, 0.93])
    y = torch.tensor([3, K, 7])  # one null-class row
    return x, t, y


def tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, T, C), row-major tokens."""
    return x.flatten(2).transpose(1, 2).contiguous()


def write(path: Path, tensors: dict, meta: dict) -> None:
    save_file(tensors, str(path), metadata={"json": json.dumps(meta, sort_keys=True)})
    print(f"{path}: {path.stat().st_size / 1024:.0f} KiB")


def hustvl(root: Path, out: Path) -> None:
    sys.path.insert(0, str(root))
    from models.lightningdit import LightningDiT
    from transport import Sampler, create_transport

    kw = dict(input_size=GRID, patch_size=1, in_channels=C, hidden_size=32, depth=2,
              num_heads=2, mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=K,
              use_qknorm=False, use_swiglu=True, use_rope=True, use_rmsnorm=True)
    torch.manual_seed(0)
    model = LightningDiT(**kw).eval()
    randomize(model, 1)
    x, t, y = inputs(2)
    with torch.no_grad():
        o = model(x, t, y)
    tensors = {**state(model), "x": tokens(x), "t": t, "y": y, "out": tokens(o)}

    # inference.py: z and y doubled with the null class, forward_with_cfg, Euler ODE on
    # linspace(0, 1, num_steps) shifted by timestep_shift, cfg only at t >= cfg_interval_start
    steps, shift, cfg, start = 5, 0.3, 3.0, 0.11
    sampler = Sampler(create_transport("Linear", "velocity", None, None, None))
    sample_fn = sampler.sample_ode(sampling_method="euler", num_steps=steps, atol=1e-6,
                                   rtol=1e-3, reverse=False, timestep_shift=shift)
    g = torch.Generator().manual_seed(3)
    z = torch.randn(B, C, GRID, GRID, generator=g)
    labels = torch.tensor([1, 4, 9])
    with torch.no_grad():
        s = sample_fn(torch.cat([z, z]), model.forward_with_cfg,
                      y=torch.cat([labels, torch.full_like(labels, K)]), cfg_scale=cfg,
                      cfg_interval=True, cfg_interval_start=start)[-1]
    tensors.update({"noise": tokens(z), "labels": labels, "sample": tokens(s.chunk(2)[0])})
    meta = {"reference": "hustvl/LightningDiT models/lightningdit.py LightningDiT",
            "kwargs": kw, "grid": [GRID, GRID],
            "sampler": {"code": "transport.Sampler.sample_ode(euler) + forward_with_cfg",
                        "num_steps": steps, "timestep_shift": shift, "cfg_scale": cfg,
                        "cfg_interval_start": start}}
    write(out / "dit_lightningdit_hustvl.safetensors", tensors, meta)
    sys.path.remove(str(root))


def rae(root: Path, out: Path) -> None:
    sys.path.insert(0, str(root / "src"))
    from stage2.models.DDT import DiTwDDTHead
    from stage2.models.lightningDiT import LightningDiT
    from stage2.transport import Sampler, create_transport

    kw = dict(input_size=GRID, patch_size=1, in_channels=C, hidden_size=32, depth=2,
              num_heads=2, mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=K,
              use_qknorm=False, use_swiglu=True, use_rope=True, use_rmsnorm=True)
    torch.manual_seed(0)
    model = LightningDiT(**kw).eval()
    randomize(model, 4)
    x, t, y = inputs(5)
    with torch.no_grad():
        o = model(x, t, y)
    write(out / "dit_lightningdit_rae.safetensors",
          {**state(model), "x": tokens(x), "t": t, "y": y, "out": tokens(o)},
          {"reference": "RAE src/stage2/models/lightningDiT.py LightningDiT", "kwargs": kw,
           "grid": [GRID, GRID]})

    kw = dict(input_size=GRID, patch_size=1, in_channels=C, hidden_size=[32, 40], depth=[2, 1],
              num_heads=[2, 2], mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=K,
              use_qknorm=False, use_swiglu=True, use_rope=True, use_rmsnorm=True,
              use_pos_embed=True)
    torch.manual_seed(0)
    model = DiTwDDTHead(**kw).eval()
    randomize(model, 6)
    x, t, y = inputs(7)
    with torch.no_grad():
        o = model(x, t, y)
    tensors = {**state(model), "x": tokens(x), "t": t, "y": y, "out": tokens(o)}

    # sample.py: Transport(Linear, velocity) with time_dist_shift, ODE Euler with num_steps grid
    # points from t = 1 (noise) to 1e-3, forward_with_cfg on the (t_min, t_max) interval
    steps, shift, cfg, interval = 5, 2.0, 2.5, (0.3, 0.9)
    transport = create_transport("Linear", "velocity", None, time_dist_type="uniform",
                                 time_dist_shift=shift)
    sample_fn = Sampler(transport).sample_ode(sampling_method="euler", num_steps=steps,
                                              atol=1e-6, rtol=1e-3, reverse=False)
    g = torch.Generator().manual_seed(8)
    z = torch.randn(B, C, GRID, GRID, generator=g)
    labels = torch.tensor([0, 5, 8])
    with torch.no_grad():
        s = sample_fn(torch.cat([z, z]), model.forward_with_cfg,
                      y=torch.cat([labels, torch.full_like(labels, K)]), cfg_scale=cfg,
                      cfg_interval=interval)[-1]
    tensors.update({"noise": tokens(z), "labels": labels, "sample": tokens(s.chunk(2)[0])})
    meta = {"reference": "RAE src/stage2/models/DDT.py DiTwDDTHead", "kwargs": kw,
            "grid": [GRID, GRID],
            "sampler": {"code": "stage2.transport.Sampler.sample_ode(euler) + forward_with_cfg",
                        "num_steps": steps, "time_dist_shift": shift, "cfg_scale": cfg,
                        "cfg_interval": list(interval)}}
    write(out / "dit_ddt_rae.safetensors", tensors, meta)
    sys.path.remove(str(root / "src"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lightningdit", type=Path, required=True,
                   help="a checkout of github.com/hustvl/LightningDiT")
    p.add_argument("--rae", type=Path, required=True,
                   help="a checkout of github.com/bytetriper/RAE")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "tests"
                   / "fixtures")
    args = p.parse_args()
    torch.set_num_threads(1)
    stub_missing()
    args.out.mkdir(parents=True, exist_ok=True)
    hustvl(args.lightningdit.resolve(), args.out)
    rae(args.rae.resolve(), args.out)


if __name__ == "__main__":
    main()
