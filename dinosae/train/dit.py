"""Train the flow-matching DiT on the latent cache (rule `train_dit` → results/dit/checkpoint.pt).

One loop, nanoGPT style: read a batch of data tokens at radius R = √C, draw each sample's noise /
time / label dropout from a generator seeded by (seed, step, its row in the global batch), so a
run's result does not depend on the number of processes (train.draws), run the network (bf16
autocast on CUDA),
compute the flow loss in fp32, clip, AdamW step, EMA. Every `ckpt_every` steps (and on SIGTERM)
the full state goes to out/last.pt, from which a rerun resumes exactly (the data position and
the per-step seeds make a killed-and-resumed run equal to an uninterrupted one on CPU). The final
checkpoint, out/checkpoint.pt, is written only at the end. DDP under torchrun: dit.batch_size is
the global batch, split evenly over the ranks (rank r holds its contiguous rows of each global
batch: LatentCache.batches), each accumulating over dit.micro_batch rows at a time.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from dinosae import rfm, sphere
from dinosae.checkpoint import DIT_KIND, expect_kind
from dinosae.dist import cleanup_ddp, is_main, setup_ddp, unwrap
from dinosae.errors import CheckpointError, ConfigError
from dinosae.faults import nan_fault
from dinosae.images import save_grid
from dinosae.models.dit import SWITCHES, dit_from_config, switches_of
from dinosae.outputs import names_only, writing
from dinosae.progress import Progress
from dinosae.train.draws import my_rows, row_generators, seed_of
from dinosae.train.logs import EVENTS, WANDB_NAMES, RunLog
from dinosae.train.loop import (
    NOT_TRAJECTORY,
    Diverged,
    Recovery,
    RunCheckpoints,
    ema_update,
    endless,
    lr_at,
    set_lr,
)

log = logging.getLogger("dinosae.dit")

GRID_SAMPLES = 16  # images in the periodic sample grid
MAX_BAD_STEPS = 5  # default for dit.max_bad_steps
# what a DiT run folder holds (and temporaries): anything else there is not ours to replace
RUN_FOLDER = names_only(r"checkpoint\.pt", r"last\.pt", r"metrics\.csv", r"samples_\d+\.png",
                        r"stops\.log", EVENTS, *WANDB_NAMES)


# ---------------------------------------------------------------- one training step

def sample_seed(seed: int, step: int, row: int) -> int:
    """The seed of the draws of one sample: row `row` of step `step`'s global batch."""
    return seed_of(seed, step, row)


def draw_rows(z0: torch.Tensor, y: torch.Tensor, seed: int, step: int, rows: range, *,
              r: float, alpha: float, path: str, label_dropout: float,
              null_class: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`draw_inputs` for the rows `rows` of step `step`'s global batch (z0, y: this process's
    rows, in that order), each row from its own generator seeded by `sample_seed`: a sample
    gets the same noise, time and dropout whatever the number of processes and micro-batches."""
    parts = [draw_inputs(z0[i:i + 1], y[i:i + 1], g, r=r, alpha=alpha, path=path,
                         label_dropout=label_dropout, null_class=null_class)
             for i, g in enumerate(row_generators((seed, step), rows, z0.device))]
    z1, t, y_out = (torch.cat(p) for p in zip(*parts, strict=True))
    return z1, t, y_out


def draw_inputs(z0: torch.Tensor, y: torch.Tensor, generator: torch.Generator, *, r: float,
                alpha: float, path: str, label_dropout: float,
                null_class: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(z1 noise, t, y with label dropout to the null class) for a batch of data tokens z0."""
    b = z0.shape[0]
    z1 = rfm.noise(z0.shape, r, path, generator, device=z0.device)
    t = rfm.sample_time(b, alpha, generator, device=z0.device)
    drop = torch.rand(b, generator=generator, device=generator.device).to(z0.device)
    y = torch.where(drop < label_dropout, torch.full_like(y, null_class), y)
    return z1, t, y


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, z0: torch.Tensor,
               z1: torch.Tensor, t: torch.Tensor, y: torch.Tensor, *, r: float, path: str,
               lambda_rad: float, grad_clip: float, amp: bool = False, stop: bool = False,
               micro_batch: int | None = None) -> dict[str, Any]:
    """Forward (network under bf16 autocast when `amp`), fp32 flow loss, backward, clip and
    AdamW step. Under DDP the reported losses are averages over ranks, and a non-finite loss or
    gradient norm skips the update on every rank alike. `stop` (this rank was signalled) rides
    along in the same reduction, so the ranks agree on stopping without a second host sync.
    Returns loss parts, grad_norm, ok, stop (True when any rank was signalled). With
    `micro_batch` smaller than this rank's batch, the gradient is accumulated over micro-batches
    (`accumulate_flow_grads`)."""
    if micro_batch is not None and micro_batch < z0.shape[0]:
        loss, parts = accumulate_flow_grads(model, z0, z1, t, y, micro_batch, r=r, path=path,
                                            lambda_rad=lambda_rad, amp=amp)
    else:
        zt, u = rfm.point_and_target(z0, z1, t, r, path)  # the path computed once
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            out = model(zt, t, y)
        loss, parts = rfm.flow_loss_at(out, zt, u, path, lambda_rad)
        loss.backward()
    world = dist.get_world_size() if dist.is_initialized() else 1
    stats = torch.cat([torch.stack([loss.detach(), *parts.values()]).float() / world,
                       loss.new_full((1,), float(stop), dtype=torch.float32)])
    if world > 1:
        dist.all_reduce(stats)  # sum: the mean losses, and how many ranks were signalled
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip, foreach=True)
    values = torch.cat([stats, grad_norm.detach().float().reshape(1)]).tolist()  # the one sync
    ok = all(math.isfinite(v) for v in values)
    if ok:
        opt.step()
    opt.zero_grad(set_to_none=True)
    result = {"loss": values[0], "grad_norm": values[-1], "ok": ok, "stop": values[-2] > 0}
    result.update(zip(parts.keys(), values[1:-2], strict=True))
    return result


def accumulate_flow_grads(model: torch.nn.Module, z0: torch.Tensor, z1: torch.Tensor,
                          t: torch.Tensor, y: torch.Tensor, micro_batch: int, *, r: float,
                          path: str, lambda_rad: float, amp: bool
                          ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward and backward in micro-batches of `micro_batch` rows: each part's mean loss
    weighted by its share of the rows, so the summed gradients are the whole batch's (the loss
    is a mean over rows). Under DDP only the last backward all-reduces (`no_sync` before).
    Returns the whole batch's (loss, parts), detached."""
    b = z0.shape[0]
    starts = range(0, b, micro_batch)
    loss_sum, parts_sum = z0.new_zeros(()), {}
    for i in starts:
        rows = slice(i, min(i + micro_batch, b))
        share = (rows.stop - rows.start) / b
        last = i == starts[-1]
        sync = nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            zt, u = rfm.point_and_target(z0[rows], z1[rows], t[rows], r, path)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                out = model(zt, t[rows], y[rows])
            loss, parts = rfm.flow_loss_at(out, zt, u, path, lambda_rad)
            (loss * share).backward()
        loss_sum = loss_sum + loss.detach() * share
        for k, v in parts.items():
            parts_sum[k] = parts_sum.get(k, 0.0) + v.detach() * share
    return loss_sum, parts_sum


# ---------------------------------------------------------------- data

def _attrs_meta(cache: Any) -> dict:
    a = dict(cache.attrs)
    missing = [k for k in ("grid", "channels", "num_classes") if k not in a]
    if missing:
        raise ValueError(f"latent cache attributes lack {missing}")
    grid = [int(v) for v in a["grid"]]
    return {"grid": grid, "tokens": grid[0] * grid[1], "channels": int(a["channels"]),
            "num_classes": int(a["num_classes"]),
            "mean_norm": float(a["mean_norm"]) if a.get("mean_norm") is not None else None}


# ---------------------------------------------------------------- sample grid

def _sample_grid(ema: torch.nn.Module, ae: Any, meta: dict, sample_cfg: dict, path: str,
                 device: torch.device, out: Path, step: int) -> Path | None:
    """GRID_SAMPLES class-cycling samples from the EMA model, decoded at radius s_vae."""
    labels = torch.arange(GRID_SAMPLES, device=device) % meta["num_classes"]
    gen = torch.Generator(device=device).manual_seed(0)  # same noise every time: comparable grids
    z = rfm.sample(ema, labels, sample_cfg.get("steps", 20), sample_cfg.get("cfg_scale", 1.0),
                   meta["radius"], meta["alpha"], gen,
                   shape=(meta["tokens"], meta["channels"]),
                   guidance_interval=tuple(sample_cfg.get("guidance_interval", (0.0, 1.0))),
                   path=path, amp=device.type == "cuda",
                   integrator=sample_cfg.get("integrator", "euler_project"))
    if ae is None:
        return None
    s_vae = sample_cfg.get("s_vae") or meta.get("mean_norm")
    if s_vae is None:
        raise ValueError("sample.s_vae is null and the cache records no mean_norm")
    save_grid(ae.decode_at(z, s_vae), out / f"samples_{step:06d}.png", nrow=8)
    return out / f"samples_{step:06d}.png"


# ---------------------------------------------------------------- the loop

def train_dit(cfg: dict, cache: Any, ae: str | None, out: str | Path,
              force: bool = False, restart: bool = False, reference: str | None = None) -> Path:
    """Train the DiT on a latent cache; returns out/checkpoint.pt.

    Config sections: seed, device, dit, sample (grid sampling: steps, cfg_scale,
    guidance_interval, s_vae). `cache` is a cache path (read with dinosae.latents.open_cache)
    or an already open cache-like object (`.attrs`, `len`, `.batches(...)`); `ae` the
    autoencoder checkpoint used to decode the sample grids (None: grids are sampled, not saved).
    `out` is locked by rank 0 while it trains; an existing `out` holding other files than a
    DiT run's is refused (`force`: replaced). A last.pt in `out` from another run is refused
    (`restart`: replaced by a fresh run), see train.loop.RunCheckpoints.resume. `reference`: the
    reference statistics of the gFID proxy (dit.eval_every; train/proxy.py), which also needs
    `ae` and the `eval` section.
    """
    rank0 = int(os.environ.get("RANK", "0")) == 0  # before the process group: rank 0 claims
    inputs = [cache if isinstance(cache, (str, Path)) else None, ae, reference]
    with writing(out, "train-dit", RUN_FOLDER, force=force, inputs=inputs
                 ) if rank0 else nullcontext():
        rank, world, device = setup_ddp(cfg.get("device", "auto"))
        try:
            recovery = Recovery(cfg["dit"], "dit")
            while True:  # again from last.pt after each rollback (train.loop.Recovery)
                try:
                    return _train(cfg, cache, ae, Path(out), rank, world, device,
                                  restart and not recovery.rollbacks, reference, recovery)
                except Diverged as e:
                    recovery.roll_back(e, Path(out) / "last.pt")
        finally:
            cleanup_ddp()


def _open_data(cache: Any, ae: str | None) -> tuple[str, Any, dict]:
    """(cache path, cache reader, meta: grid, tokens, channels, num_classes, mean_norm, radius
    R = √C, alpha) of a cache path or an already open cache-like object."""
    if isinstance(cache, (str, Path)):
        from dinosae.latents import open_cache

        # the decoder that draws the grids must be the encoder the cache was made with
        cache_path = str(cache)
        data = open_cache(cache, expect_encoder=ae)
    else:
        cache_path, data = str(getattr(cache, "path", "<in-memory>")), cache
    meta = _attrs_meta(data)
    meta["radius"] = math.sqrt(meta["channels"])
    meta["alpha"] = rfm.alpha_for(meta["tokens"], meta["channels"])
    return cache_path, data, meta


def _build(dc: dict, meta: dict, seed: int, device: torch.device
           ) -> tuple[torch.nn.Module, torch.nn.Module, torch.optim.Optimizer, dict]:
    """(model, EMA copy, AdamW, the checkpoint's model config) for a fresh run."""
    config = {"dit": dc, "tokens": meta["tokens"], "channels": meta["channels"],
              "num_classes": meta["num_classes"], "grid": meta["grid"],
              "radius": meta["radius"], "alpha": meta["alpha"], "mean_norm": meta["mean_norm"],
              "seed": seed}
    torch.manual_seed(seed)
    model = dit_from_config(config).to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=dc["lr"], betas=tuple(dc["betas"]),
                            weight_decay=dc["weight_decay"], fused=True)  # CPU too
    return model, ema, opt, config


def run_identity(cfg: dict, data: Any, world: int) -> dict:
    """What makes a DiT run this run (last.pt records it; a resume must match it): the cache's
    identity (sha256 of its attributes: encoder, shards, count, ...), seed, world size and
    every dit setting that changes the trajectory (all but cadence, compile, the proxy, and the
    micro-batch and recovery settings, which a chained or rolled-back run may change)."""
    import hashlib
    import json

    attrs = json.dumps(dict(data.attrs), sort_keys=True, default=str)
    return {"cache_sha256": hashlib.sha256(attrs.encode()).hexdigest(), "seed":
            int(cfg.get("seed", 0)), "world_size": world,
            "dit": {k: v for k, v in cfg["dit"].items() if k not in
                    ("log_every", "image_every", "ckpt_every", "compile", "max_bad_steps",
                     "eval_every", "eval_samples", "eval_precision",
                     *NOT_TRAJECTORY)}}


def _train(cfg: dict, cache: Any, ae: str | None, out: Path, rank: int, world: int,
           device: torch.device, restart: bool = False, reference: str | None = None,
           recovery: Recovery | None = None) -> Path:
    """The loop: resume, then step, log, draw grids, checkpoint until done. Long because it is
    the loop, read top to bottom like nanoGPT's train.py."""
    dc, sample_cfg, seed = cfg["dit"], cfg.get("sample", {}), int(cfg.get("seed", 0))
    recovery = recovery or Recovery(dc, "dit")
    cache_path, data, meta = _open_data(cache, ae)
    K, R, alpha, path = meta["num_classes"], meta["radius"], meta["alpha"], dc["path"]
    if dc["batch_size"] % world:
        raise ConfigError(f"config: 'dit.batch_size' ({dc['batch_size']}) is not divisible by "
                          f"the {world} DDP ranks")
    local_batch = dc["batch_size"] // world
    micro_batch = dc.get("micro_batch") or local_batch  # per process; the rest: accumulation
    max_bad = int(dc.get("max_bad_steps", MAX_BAD_STEPS))
    amp = device.type == "cuda"
    model, ema, opt, config = _build(dc, meta, seed, device)

    # resume from out/last.pt
    files = RunCheckpoints(out, dc["ckpt_every"], dc["steps"], "dit", "train-dit", device,
                           run_identity(cfg, data, world), restart)
    step, epoch, skip, bad_total = 0, 0, 0, 0
    ck = files.resume()
    if ck is not None:
        _check_resume(ck, config, files.last)
        model.load_state_dict(ck["model"])
        ema.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["optimizer"])
        step, bad_total = int(ck["step"]), int(ck.get("bad_steps", 0))
        epoch, skip = int(ck["data"]["epoch"]), int(ck["data"]["batch"])
        recovery.adopt(ck.get("recovery"))
        log.info("resuming from %s at step %d", files.last, step)

    def state(optimizer: bool = True) -> dict:
        """The run's state: last.pt holds everything to resume; the final checkpoint has no
        optimizer state (nothing reads it: half the file at XL, 10.8 -> 5.4 GB)."""
        s = {"kind": DIT_KIND, "step": step, "config": config,
             "model": unwrap(model).state_dict(), "ema": ema.state_dict(),
             "ae": str(ae) if ae else None, "cache": cache_path,
             "data": {"epoch": epoch, "batch": skip}, "bad_steps": bad_total, "world_size": world,
             "recovery": recovery.state()}
        if optimizer:
            s["optimizer"] = opt.state_dict()
        return s

    net = torch.compile(model) if dc["compile"] else model
    if world > 1:
        net = DDP(net, device_ids=[device.index] if device.type == "cuda" else None)
    autoencoder = None
    grids_due = bool(dc["image_every"]) and dc["image_every"] <= dc["steps"]
    proxy_due = bool(dc.get("eval_every")) and is_main()
    if ae and is_main() and (grids_due or proxy_due):  # only grids and the proxy decode
        from dinosae.models.autoencoder import DinoSAE

        autoencoder = DinoSAE.load(ae, device)
    if proxy_due:
        from dinosae.train.proxy import GFIDProxy

        proxy = GFIDProxy(cfg, autoencoder, config, reference, device)
    metrics = RunLog(out, cfg, resumed_at=step, device=device, name="dit") if is_main() else None
    recovery.log_pending(metrics)
    progress = Progress(dc["steps"], start=step, desc="dit")

    def epoch_batches(e: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return data.batches(local_batch, shuffle=True, seed=seed, epoch=e, rank=rank,
                            world_size=world, drop_last=True, raw=True)

    batches = endless(epoch_batches, epoch, skip)
    window: list[dict] = []
    loss_keys = ["loss", "grad_norm"] + (["loss_tan", "loss_rad"] if path == "rfm" else [])
    bad_run, n_window, t_window = 0, 0, time.time()
    try:
        while step < dc["steps"]:
            (epoch, skip), (x, y) = next(batches)
            # fp16 (pinned on CUDA) over the bus, fp32 and projected to radius R on the device
            z0 = sphere.project(x.to(device, non_blocking=True).float(), R)
            if nan_fault("train-dit-loss"):
                z0 = z0 * float("nan")
            y = y.to(device, non_blocking=True)
            z1, t, y = draw_rows(z0, y, seed, step, my_rows(rank, local_batch), r=R,
                                 alpha=alpha, path=path, label_dropout=dc["label_dropout"],
                                 null_class=K)
            lr = lr_at(step, dc["lr"], dc["warmup_steps"], dc["steps"], "constant") \
                * recovery.lr_scale
            set_lr(opt, lr)
            res = train_step(net, opt, z0, z1, t, y, r=R, path=path,
                             lambda_rad=dc["lambda_rad"], grad_clip=dc["grad_clip"], amp=amp,
                             stop=files.signal.stop, micro_batch=micro_batch)
            step, n_window = step + 1, n_window + 1
            if res["ok"]:
                ema_update(ema, model, dc["ema"])
                bad_run = 0
                window.append(res)
            else:
                bad_total, bad_run = bad_total + 1, bad_run + 1
                log.warning("step %d: non-finite loss %.4g / grad norm %.4g; update skipped "
                            "(%d in a row)", step, res["loss"], res["grad_norm"], bad_run)
            progress.update(1, loss=res["loss"])
            scores = {}
            if proxy_due and (step % dc["eval_every"] == 0 or step == dc["steps"]):
                scores = proxy(ema)
                t_window += scores["proxy_sec"]  # throughput counts the training only
                log.info("step %d: %s %.4f (%d samples, %.1f s)", step, proxy.key,
                         scores[proxy.key], proxy.n, scores["proxy_sec"])
            if metrics is not None and (step % dc["log_every"] == 0 or step == dc["steps"]
                                        or bad_run >= max_bad or scores):
                now = time.time()
                row = {"step": step, "lr": lr, "bad_steps": bad_total,
                       "rollbacks": recovery.rollbacks, "lr_scale": recovery.lr_scale,
                       "img_per_s": n_window * dc["batch_size"] / max(now - t_window, 1e-9)}
                for key in loss_keys:  # means over the window's good steps
                    row[key] = float(np.mean([w[key] for w in window])) if window else math.nan
                if proxy_due:
                    row.update(proxy.empty(), **scores)
                metrics.log(step, row)
                window, n_window, t_window = [], 0, now
            if bad_run >= max_bad:  # (after the metrics row that counts it)
                raise Diverged(f"{bad_run} non-finite DiT steps in a row (step {step}); "
                                    "lower dit.lr, check the cache, or raise dit.max_bad_steps")
            if is_main() and dc["image_every"] and step % dc["image_every"] == 0:
                grid = _sample_grid(ema, autoencoder, meta, sample_cfg, path, device, out, step)
                if grid is not None:
                    metrics.image("samples", step, grid)
            files.after_step(step, state, stop=res["stop"])
        return files.finish(lambda: state(optimizer=False))
    finally:
        progress.close()
        files.close()
        if metrics is not None:
            metrics.close()


def _check_resume(ck: dict, config: dict, path: Path) -> None:
    expect_kind(ck, DIT_KIND, path)
    old = ck["config"]
    for key in ("tokens", "channels", "num_classes", "grid"):
        if old[key] != config[key]:
            raise CheckpointError(f"{path}: {key} {old[key]} differs from the cache's "
                                  f"{config[key]}; remove it to start over")
    for key in ("model", "head", "path", *SWITCHES):
        was, now = {**old["dit"], **switches_of(old["dit"])}, {**config["dit"],
                                                             **switches_of(config["dit"])}
        if was[key] != now[key]:
            raise ConfigError(f"config: 'dit.{key}' ({now[key]!r}) differs from the "
                              f"one {path} was trained with ({was[key]!r})")
