"""Train a small class-conditional flow model on a dinosae latent cache with a plain PyTorch
loop: nothing from dinosae but its Dataset, so any training code can start from here.

    python examples/train_flow_on_cache.py results/latents/train.zarr --steps 200
    torchrun --nproc-per-node 2 examples/train_flow_on_cache.py results/latents/train.zarr

Each item is one image's encoder tokens (T, C), unit vectors, and its class (the flipped copies,
when the cache has them, are items N..2N-1). The tokens are scaled to radius sqrt(C) (about
unit variance per coordinate) and the model learns the straight path from Gaussian noise x0 to
the data x1 (rectified flow: velocity x1 - x0), Euclidean; dinosae's own trainer uses the
sphere's path instead (dinosae/rfm.py).
"""

from __future__ import annotations

import argparse
import math
import os

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from dinosae.latents import LatentDataset


class FlowModel(nn.Module):
    """A small transformer over the tokens, conditioned on time and class: -> velocity."""

    def __init__(self, tokens: int, channels: int, num_classes: int, width: int = 128,
                 depth: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.inp = nn.Linear(channels, width)
        self.pos = nn.Parameter(torch.zeros(1, tokens, width))
        self.time = nn.Sequential(nn.Linear(1, width), nn.SiLU(), nn.Linear(width, width))
        self.label = nn.Embedding(num_classes, width)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0,
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.out = nn.Linear(width, channels)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        cond = self.time(t[:, None]) + self.label(y)  # (B, width)
        return self.out(self.blocks(self.inp(x) + self.pos + cond[:, None]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("cache", help="a complete latent cache (a .zarr folder)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=64, help="per process")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="save the trained model's state_dict here")
    args = p.parse_args()

    ddp = "WORLD_SIZE" in os.environ  # started by torchrun
    if ddp:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    device = (torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
              if torch.cuda.is_available() else torch.device("cpu"))
    torch.manual_seed(args.seed + rank)

    data = LatentDataset(args.cache)  # checks the cache; every row read is checked too
    radius = math.sqrt(data.channels)
    sampler = DistributedSampler(data, world, rank, shuffle=True, seed=args.seed) if ddp else None
    loader = DataLoader(data, batch_size=args.batch_size, shuffle=sampler is None,
                        sampler=sampler, num_workers=args.workers, drop_last=True,
                        pin_memory=device.type == "cuda", persistent_workers=args.workers > 0)
    model = FlowModel(data.tokens, data.channels, data.num_classes).to(device)
    if ddp:
        model = DistributedDataParallel(model)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    if rank == 0:
        print(f"{len(data)} items of {data.tokens}x{data.channels} tokens, "
              f"{data.num_classes} classes, {world} process(es)")

    step, epoch = 0, 0
    while step < args.steps:
        if sampler is not None:
            sampler.set_epoch(epoch)  # another shuffle each epoch, the same on every rank
        for x1, y in loader:
            x1, y = x1.to(device) * radius, y.to(device)
            x0 = torch.randn_like(x1)
            t = torch.rand(len(x1), device=device)
            xt = torch.lerp(x0, x1, t[:, None, None])
            loss = F.mse_loss(model(xt, t, y), x1 - x0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
                print(f"step {step} epoch {epoch} loss {loss.item():.4f}", flush=True)
            step += 1
            if step == args.steps:
                break
        epoch += 1

    if rank == 0 and args.out:
        torch.save(getattr(model, "module", model).state_dict(), args.out)
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
