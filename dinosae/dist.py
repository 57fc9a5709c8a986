"""Device choice and DDP: one process per GPU under torchrun, gloo on CPU."""

from __future__ import annotations

import os
import re

import torch
import torch.distributed as dist

from dinosae.errors import ConfigError


def check_device(name: str, what: str = "--device") -> str:
    """`name` if it is auto, cpu, cuda or cuda:N of a device that exists; else a ConfigError
    naming `what` and the devices there are."""
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    have = "no CUDA device" if n == 0 else f"CUDA devices 0..{n - 1}"
    m = re.fullmatch(r"cuda(?::(\d{1,4}))?", str(name))
    if name in ("auto", "cpu") or (m and n and (m[1] is None or int(m[1]) < n)):
        return str(name)
    if m:
        raise ConfigError(f"{what} {name!r}: this machine has {have}")
    raise ConfigError(f"{what} {str(name)[:60]!r}: expected auto, cpu, cuda or cuda:N ({have} "
                      "here)")


def pick_device(name: str = "auto") -> torch.device:
    check_device(name, "config: 'device'")
    if name.startswith("cuda:"):
        return torch.device(name)
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def setup_ddp(device_name: str = "auto") -> tuple[int, int, torch.device]:
    """(rank, world_size, device). Initialises the process group when launched by torchrun
    (WORLD_SIZE > 1): NCCL on GPUs, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    device = pick_device(device_name)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return rank, world, device


def cleanup_ddp() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True when `flag` is true on any rank (every rank gets the same answer)."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def all_ranks(flag: bool, device: torch.device) -> bool:
    """True when `flag` is true on every rank (every rank takes the same branch)."""
    return not any_rank(not flag, device)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP / torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)
