"""Ablation: Riemannian flow matching vs Euclidean (rectified) flow matching, same data, steps,
seed and network (the paper: 15.95 Euclidean vs 2.65 RFM gFID at full scale); and, for the RFM
model, its two sphere integrators (the exponential map vs an Euler step projected back to the
sphere, which a summary of the paper reports generating better) from the same noise.

    .venv/bin/python bench/ablate_rfm.py --synthetic                  # no pipeline needed
    .venv/bin/python bench/ablate_rfm.py --cache results/latents/train.zarr \\
        [--ae results/ae/stage4/checkpoint.pt]

Both runs go through the real training loop (dinosae.train.dit.train_dit) and sampler. The
distance to the data is a Fréchet distance (torch-fidelity's formula) on token directions:
  FD_flat  — each sample's T·C directions flattened (skipped above --flat-max dimensions),
  FD_token — every token a C-dim point (token marginal; blind to token arrangement),
and with --ae, FD_teacher — the autoencoder's teacher patch tokens, mean-pooled, of decoded
samples vs decoded data tokens. `--synthetic` uses a clustered-on-the-sphere dataset (classes ×
modes of per-token directions with angular spread) and also prints the floor: a second draw of
the same distribution against the reference.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

from dinosae import rfm, sphere
from dinosae.config import load_config
from dinosae.models.dit import load_dit
from dinosae.train.dit import train_dit


class SyntheticCache:
    """A latent-cache stand-in (attrs, len, batches) holding unit-norm tokens drawn from a
    mixture: class k has `modes` centres of per-token directions; a sample is a centre plus
    Gaussian noise of norm ≈ `spread`, projected back to the sphere."""

    def __init__(self, n: int, grid=(2, 2), channels=32, classes=4, modes=3, spread=0.6,
                 seed=0) -> None:
        g = torch.Generator().manual_seed(seed)
        T = grid[0] * grid[1]
        self.centres = sphere.project(torch.randn(classes, modes, T, channels, generator=g))
        self.spread, self.classes, self.modes = spread, classes, modes
        self.attrs = {"grid": list(grid), "channels": channels, "num_classes": classes,
                      "mean_norm": 1.0}
        self.tokens, self.labels = self.draw(n, seed + 1)

    def draw(self, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        labels = torch.arange(n) % self.classes
        mode = torch.randint(0, self.modes, (n,), generator=g)
        c = self.centres[labels, mode]  # (n, T, C)
        eps = torch.randn(c.shape, generator=g) * (self.spread / math.sqrt(c.shape[-1]))
        return sphere.project(c + eps), labels

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, batch_size, *, shuffle=True, seed=0, epoch=0, rank=0, world_size=1,
                radius=1.0, drop_last=True, window=None, raw=False):
        """As LatentCache.batches: `raw` gives the tokens as a cache stores them (fp16, unit)."""
        order = np.random.default_rng([seed, epoch]).permutation(len(self))
        order = order[rank::world_size]
        for i in range(0, len(order) - batch_size + 1, batch_size):
            idx = torch.as_tensor(order[i:i + batch_size])
            z = self.tokens[idx].half() if raw else self.tokens[idx] * radius
            yield z, self.labels[idx]


def frechet(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between two feature sets (N, D), torch-fidelity's formula (float64)."""
    sa = fid_features_to_statistics(a.double().cpu())
    sb = fid_features_to_statistics(b.double().cpu())
    return fid_statistics_to_metric(sa, sb, verbose=False)["frechet_inception_distance"]


def token_fds(x: torch.Tensor, ref: torch.Tensor, flat_max: int) -> dict[str, float]:
    """FD_token and FD_flat (when T·C ≤ flat_max, else nan) on unit directions; (N, T, C)."""
    x, ref = sphere.project(x), sphere.project(ref)
    out = {"FD_token": frechet(x.reshape(-1, x.shape[-1]), ref.reshape(-1, ref.shape[-1]))}
    dims = x.shape[1] * x.shape[2]
    out["FD_flat"] = frechet(x.flatten(1), ref.flatten(1)) if dims <= flat_max else math.nan
    return out


def generate(ckpt: Path, n: int, steps: int, cfg_scale: float, seed: int, device: torch.device,
             batch: int = 256, integrator: str = "euler_project"
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """n class-balanced samples (directions at radius R) from a trained DiT checkpoint; the
    noise depends only on `seed` (the same for every integrator)."""
    model, meta = load_dit(ckpt, device)
    labels = torch.arange(n) % meta["num_classes"]
    gen = torch.Generator(device=device).manual_seed(seed)
    out = []
    for i in range(0, n, batch):
        y = labels[i:i + batch].to(device)
        out.append(rfm.sample(model, y, steps, cfg_scale, meta["radius"], meta["alpha"], gen,
                              shape=(meta["tokens"], meta["channels"]), path=meta["dit"]["path"],
                              amp=device.type == "cuda", integrator=integrator).cpu())
    return torch.cat(out), labels


@torch.no_grad()
def teacher_features(ae, tokens: torch.Tensor, s_vae: float, device: torch.device,
                     batch: int = 64) -> torch.Tensor:
    feats = []
    for i in range(0, len(tokens), batch):
        images = ae.decode(sphere.project(tokens[i:i + batch].to(device), s_vae)).clamp(0, 1)
        feats.append(ae.teacher_tokens(images).float().mean(1).cpu())
    return torch.cat(feats)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--cache", help="latent cache (.zarr) to train and measure on")
    src.add_argument("--synthetic", action="store_true", help="clustered-on-the-sphere data")
    p.add_argument("--config", default=None, help="config YAML (default: config.yaml)")
    p.add_argument("--ae", default=None, help="AE checkpoint: adds FD_teacher (with --cache)")
    p.add_argument("--model", default="tiny")
    p.add_argument("--steps", type=int, default=None, help="training steps (default dit.steps)")
    p.add_argument("--batch", type=int, default=None, help="batch (default dit.batch_size)")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--sample-steps", type=int, nargs="+", default=None,
                   help="sampler steps, one or several (default sample.steps)")
    p.add_argument("--cfg-scale", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="run folder (default: a temporary one)")
    p.add_argument("--flat-max", type=int, default=2048,
                   help="skip FD_flat above this many dimensions (T·C): slow, and rank-deficient "
                        "with few samples")
    p.add_argument("--n-train", type=int, default=4000, help="synthetic: training samples")
    p.add_argument("--grid", type=int, nargs=2, default=[2, 2], help="synthetic: token grid")
    p.add_argument("--channels", type=int, default=32, help="synthetic: channels")
    p.add_argument("--paths", nargs="+", default=["rfm", "euclidean"],
                   choices=["rfm", "euclidean"])
    p.add_argument("--integrators", nargs="+", default=["expmap", "euler_project"],
                   choices=["expmap", "euler_project"], help="the RFM model's samplers")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = load_config(args.config or str(Path(__file__).resolve().parents[1] / "config.yaml"))
    cfg["device"] = cfg.get("device", "auto")
    cfg["seed"] = args.seed
    dc = cfg["dit"]
    dc.update(model=args.model, head=None, ckpt_every=10**9, image_every=10**9)
    for key, value in (("steps", args.steps), ("batch_size", args.batch), ("lr", args.lr)):
        if value is not None:
            dc[key] = value
    step_list = args.sample_steps or [cfg["sample"]["steps"]]
    device = torch.device("cuda" if cfg["device"] != "cpu" and torch.cuda.is_available()
                          else "cpu")

    if args.synthetic:
        data = SyntheticCache(args.n_train, tuple(args.grid), args.channels, seed=args.seed)
        ref, _ = data.draw(args.samples, seed=10_000 + args.seed)
        floor, _ = data.draw(args.samples, seed=20_000 + args.seed)
        cache = data
    else:
        from dinosae.latents import open_cache

        data = open_cache(args.cache)
        idx = np.random.default_rng(args.seed).permutation(len(data))[:args.samples]
        ref = torch.stack([torch.as_tensor(data[int(i)][0]) for i in sorted(idx)])
        floor, cache = None, args.cache
    T, C = ref.shape[1], ref.shape[2]
    print(f"data: {'synthetic' if args.synthetic else args.cache}, {len(data)} samples, "
          f"{T} tokens x {C} ch, alpha {rfm.alpha_for(T, C):.3g}; model {args.model}, "
          f"{dc['steps']} steps x batch {dc['batch_size']}, seed {args.seed}; sampling "
          f"{args.samples} at {step_list} steps, cfg {args.cfg_scale}, device {device}")

    ae = None
    if args.ae:
        from dinosae.models.autoencoder import DinoSAE

        ae = DinoSAE.load(args.ae, device)
        s_vae = cfg["sample"]["s_vae"] or data.attrs.get("mean_norm")
        ref_teacher = teacher_features(ae, ref, s_vae, device)

    out_root = Path(args.out or tempfile.mkdtemp(prefix="ablate_rfm_"))
    rows, by_integrator = [], {}
    for path in args.paths:
        run_cfg = {k: cfg[k] for k in ("seed", "device", "dit", "sample")}
        run_cfg["dit"] = dict(dc, path=path)
        t0 = time.time()
        ckpt = train_dit(run_cfg, cache, None, out_root / path)
        train_s = time.time() - t0
        for steps in step_list:
            for integrator in args.integrators if path == "rfm" else ["euler"]:
                t1 = time.time()
                z, _ = generate(ckpt, args.samples, steps, args.cfg_scale, args.seed, device,
                                integrator="euler_project" if integrator == "euler"
                                else integrator)
                name = path if path == "euclidean" else f"rfm {integrator}"
                row = {"path": f"{name} @{steps}", "train_s": train_s,
                       "sample_s": time.time() - t1, **token_fds(z, ref, args.flat_max)}
                if ae is not None:
                    row["FD_teacher"] = frechet(teacher_features(ae, z, s_vae, device),
                                                ref_teacher)
                rows.append(row)
                by_integrator[(integrator, steps)] = z
    if floor is not None:
        rows.append({"path": "data (floor)", "train_s": math.nan,
                     **token_fds(floor, ref, args.flat_max)})

    keys = [k for k in rows[0] if k not in ("path", "train_s", "sample_s")]
    print(f"{'path @steps':>22} {'train s':>8} {'sample s':>8} "
          + " ".join(f"{k:>11}" for k in keys))
    for r in rows:
        print(f"{r['path']:>22} {r['train_s']:>8.1f} {r.get('sample_s', math.nan):>8.1f} "
              + " ".join(f"{r[k]:>11.4f}" for k in keys))
    for steps in step_list:
        a, b = by_integrator.get(("expmap", steps)), by_integrator.get(("euler_project", steps))
        if a is not None and b is not None:
            angle = torch.rad2deg(sphere.geodesic_distance(sphere.project(a), sphere.project(b)))
            print(f"@{steps} steps, expmap vs euler_project (same model and noise): token "
                  f"angle mean {angle.mean():.3f} deg, max {angle.max():.3f} deg")
    print(f"(runs in {out_root})")


if __name__ == "__main__":
    main()
