"""Time to rebuild a network from its checkpoint: the random initialisation a checkpoint then
overwrites (the baseline: build, then load_state_dict) against the meta-device build that takes
the file's tensors (dinosae: DinoSAE.from_checkpoint, dit_from_checkpoint). Every job that loads
a trained model pays this once: each sampling part, each encode part, each AE stage after the
first, each link of a wall-time chain.

    .venv/bin/python bench/load_time.py --ae results/ae/stage4/checkpoint.pt \
        --dit results/dit/checkpoint.pt [--threads 1] [--repeat 3]

Paper-size checkpoints come from the paper-size smoke DAG (workflow/configs/imagenet256_smoke.yaml):
DinoSAE with the ViT-L/16 teacher and the 1024-wide decoder, LightningDiT-XL. The file is read
once (torch.load, outside the timing) and each way is timed on the same dict; best of --repeat.
Both ways must give the same tensors, checked.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from dinosae.checkpoint import AE_KIND, DIT_KIND, read_checkpoint
from dinosae.models.autoencoder import AutoencoderArgs, DinoSAE, build_autoencoder
from dinosae.models.dit import dit_from_checkpoint, dit_from_config


def best_of(fn: Callable[[], torch.nn.Module], repeat: int) -> tuple[float, torch.nn.Module]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def ae_baseline(ck: dict) -> torch.nn.Module:
    ae = build_autoencoder(AutoencoderArgs.from_dict(ck["config"]).to_dict())
    ae.load_trainable(ck["ema"], "baseline")
    return ae


def dit_baseline(ck: dict) -> torch.nn.Module:
    model = dit_from_config(ck["config"])
    model.load_state_dict(ck["ema"])
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ae", help="an AE stage checkpoint")
    ap.add_argument("--dit", help="a DiT checkpoint")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rows = []
    if a.ae:
        ck = read_checkpoint(a.ae, AE_KIND)
        base, ref = best_of(lambda: ae_baseline(ck), a.repeat)
        ours, got = best_of(lambda: DinoSAE.from_checkpoint(ck, a.ae), a.repeat)
        assert all(torch.equal(v, got.state_dict()[k]) for k, v in ref.state_dict().items())
        rows.append(("autoencoder (teacher rebuilt + stem/decoder loaded)", base, ours))
    if a.dit:
        ck = read_checkpoint(a.dit, DIT_KIND)
        base, ref = best_of(lambda: dit_baseline(ck), a.repeat)
        ours, got = best_of(lambda: dit_from_checkpoint(ck, a.dit), a.repeat)
        assert all(torch.equal(v, got.state_dict()[k]) for k, v in ref.state_dict().items())
        rows.append((f"DiT ({sum(p.numel() for p in got.parameters()) / 1e6:.0f} M)", base, ours))
    print(f"| network | init + load (s) | meta build + load (s) | ratio | ({a.threads} thread(s))")
    print("|---|---:|---:|---:|")
    for name, base, ours in rows:
        print(f"| {name} | {base:.2f} | {ours:.2f} | {ours / base:.2f}x |")


if __name__ == "__main__":
    main()
