"""Autoencoder training: one DINO-SAE stage per call.

    stage 1  alignment      stem + decoder   0.5*(1-cos) + L1 + LPIPS
    stage 2  adversarial    stem + decoder   stage 1 + adv*lambda*GAN (D warm-up first: D only)
    stage 3  refinement     decoder only     L1 + LPIPS + adv*lambda*GAN   (encoder frozen)
    stage 4  noise aug.     decoder only     as stage 3 on z + sigma*eps, sigma ~ U(0, tau)

lambda = ||grad_W L_rec|| / ||grad_W L_GAN|| at the decoder's last conv W, clamped. Stage k > 1
starts from stage k-1's checkpoint. Periodic checkpoints go to `out/last.pt` (a rerun after a
kill resumes from it); the finished stage writes `out/checkpoint.pt` and removes last.pt. Data
order, augmentation and noise are pure functions of (seed, stage, step, rank), so a resumed run
ends with exactly the weights of an uninterrupted one (on CPU).
"""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, closing, nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from dinosae.config import ConfigError
from dinosae.faults import fault_point
from dinosae.models.autoencoder import AE_KIND, AutoEncoder, ae_config, build_autoencoder
from dinosae.models.discriminator import (
    Discriminator,
    adaptive_weight,
    d_hinge_loss,
    diffaug,
    g_hinge_loss,
    teacher_features,
)
from dinosae.models.encoder import Encoder
from dinosae.models.perceptual import build_lpips
from dinosae.outputs import names_only, writing
from dinosae.train.common import (
    MetricsCSV,
    NumericsError,
    Progress,
    StopFlag,
    barrier,
    cleanup_ddp,
    ema_update,
    load_checkpoint,
    lr_at,
    save_checkpoint,
    save_grid,
    setup_ddp,
)

log = logging.getLogger("dinosae")

FIELDS = ["step", "lr", "loss", "align", "l1", "lpips", "g_gan", "lambda", "d_loss", "d_real",
          "d_fake", "grad_norm", "d_grad_norm", "tau", "skipped", "sec_per_step", "images_per_sec"]
# what a stage folder holds (and temporaries): anything else there is not ours to replace
STAGE_FOLDER = names_only(r"checkpoint\.pt", r"last\.pt", r"metrics\.csv", r"grid_\d+\.png")
# ae_train keys that only change logging / checkpoint cadence: a resume ignores them
_CADENCE_KEYS = ("log_every", "image_every", "ckpt_every")

EpochFn = Callable[[int], Iterable]  # epoch -> that epoch's batches (images, labels)


def alignment_loss(z: torch.Tensor, z_teacher: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of 1 - cos(z, z_teacher), both (B, T, C)."""
    return (1.0 - F.cosine_similarity(z.float(), z_teacher.float(), dim=-1)).mean()


def step_generator(seed: int, stage: int, step: int, rank: int,
                   device: torch.device) -> torch.Generator:
    """The random stream of one step on one rank (DiffAug, latent noise)."""
    state = np.random.SeedSequence([seed, stage, step, rank]).generate_state(2, np.uint64)
    return torch.Generator(device=device).manual_seed(int(state[0] >> np.uint64(1)))


def noise_tau(step: int, steps: int, tau: list[float]) -> float:
    """Stage 4's tau, linear from tau[0] at the first step to tau[1] at the last."""
    return tau[0] + (tau[1] - tau[0]) * step / max(1, steps - 1)


def make_ema(ae: AutoEncoder) -> AutoEncoder:
    """EMA copy of the trainable parts (stem, decoder); the frozen ViT is shared, not copied,
    so checkpoints store it once."""
    ema = AutoEncoder(Encoder(copy.deepcopy(ae.encoder.stem), ae.encoder.vit),
                      copy.deepcopy(ae.decoder))
    ema.encoder.stem.requires_grad_(False)
    ema.decoder.requires_grad_(False)
    return ema.eval()


def data_stream(epoch_fn: EpochFn, epoch: int, index: int
                ) -> Iterator[tuple[tuple[int, int], tuple]]:
    """Endless (position after this batch, batch), starting `index` batches into `epoch`."""
    while True:
        n = 0
        for i, batch in enumerate(epoch_fn(epoch)):
            n += 1
            if i >= index:
                yield (epoch, i + 1), batch
        if n == 0:
            raise RuntimeError(f"epoch {epoch} produced no batches: too few training samples for "
                               "the batch size and number of processes")
        epoch, index = epoch + 1, 0


def _resume_key(ckpt_or_cfg: dict) -> dict:
    train = {k: v for k, v in ckpt_or_cfg["train"].items() if k not in _CADENCE_KEYS}
    return {"config": ckpt_or_cfg["config"], "train": train, "seed": ckpt_or_cfg["seed"],
            "world_size": ckpt_or_cfg["world_size"], "stage": ckpt_or_cfg["stage"],
            "init": ckpt_or_cfg["init"]}


def _arch(config: dict) -> dict:
    """The parts of a checkpoint config that fix tensor shapes (teacher weights don't)."""
    a = copy.deepcopy(config["autoencoder"])
    a["teacher"].pop("weights", None)
    a.pop("lpips", None)
    a.setdefault("stem", "cnn")
    return {**a, "image_size": config["data"]["image_size"]}


def _check_init(ckpt: dict, path: str, stage: int, cfg: dict) -> None:
    if ckpt.get("kind") != AE_KIND:
        raise ConfigError(f"--init {path!r} is not an autoencoder checkpoint "
                          f"(kind {ckpt.get('kind')!r})")
    if ckpt.get("stage") != stage - 1:
        raise ConfigError(f"stage {stage} starts from a stage {stage - 1} checkpoint, but "
                          f"--init {path!r} is from stage {ckpt.get('stage')}")
    mine, theirs = _arch(ae_config(cfg)), _arch(ckpt["config"])
    if mine != theirs:
        diff = [k for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k)]
        raise ConfigError(f"--init {path!r} was trained with a different autoencoder "
                          f"architecture (differs in: {', '.join(diff)}); rerun the earlier "
                          "stages with this config")
    if stage >= 3 and "disc" not in ckpt:
        raise ConfigError(f"--init {path!r} has no discriminator (stage {stage} needs one)")


def _load(module: torch.nn.Module, state: dict, what: str, path: str) -> None:
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        raise ConfigError(f"{path!r}: {what} does not fit the configured network: {e}") from e


def _all_true(flag: bool, device: torch.device) -> bool:
    """Logical AND over ranks (every rank takes the same branch)."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item() > 0)


def train_stage(cfg: dict, stage: int, shards: str | None, init: str | None = None,
                out: str | None = None, *, batches: EpochFn | None = None,
                force: bool = False) -> AutoEncoder:
    """Train autoencoder stage `stage` (1-4), write `out`/checkpoint.pt, return the model.

    cfg sections: seed, device, autoencoder, data (image_size, workers), ae_train.
    shards: train shard folder (dinosae.data.loader); `batches`, for tests, replaces it with a
    function epoch -> iterable of (images (b,3,H,W) in [0,1], labels) for this rank. `out` is
    locked by rank 0 while it trains; an existing `out` holding other files than a stage's is
    refused (`force`: replaced).
    """
    if out is None:
        raise ConfigError("ae-train: --out is required")
    if stage not in (1, 2, 3, 4):
        raise ConfigError(f"ae-train: stage must be 1-4, got {stage}")
    if stage == 1 and init is not None:
        raise ConfigError("stage 1 starts from the teacher; --init is for stages 2-4")
    if stage > 1 and init is None:
        raise ConfigError(f"stage {stage} needs --init (stage {stage - 1}'s checkpoint)")
    if batches is None:  # a missing or truncated shard stops here, before any model is built
        from dinosae.data.shard import check_image_size, read_manifest

        check_image_size(read_manifest(shards), shards, cfg["data"]["image_size"],
                         "data.image_size")
    rank0 = int(os.environ.get("RANK", "0")) == 0  # before the process group: rank 0 claims
    with writing(out, "ae-train", STAGE_FOLDER, force=force, inputs=[shards, init]
                 ) if rank0 else nullcontext():
        own_group = not dist.is_initialized()
        rank, world, device = setup_ddp(cfg.get("device", "auto"))
        stop = StopFlag()
        try:
            with ExitStack() as loaders:  # closed however _train ends: loader workers stop
                return _train(cfg, stage, shards, init, Path(out), batches, rank, world, device,
                              stop, loaders)
        finally:
            stop.restore()
            if own_group:
                cleanup_ddp()


def _train(cfg: dict, stage: int, shards: str | None, init: str | None, out: Path,
           batches: EpochFn | None, rank: int, world: int, device: torch.device,
           stop: StopFlag, loaders: ExitStack) -> AutoEncoder:
    tcfg, acfg = cfg["ae_train"], cfg["autoencoder"]
    seed = int(cfg.get("seed", 0))
    steps = tcfg["stage_steps"][stage - 1]
    weights = tcfg["loss"]
    main = rank == 0
    if tcfg["batch_size"] % world:
        raise ConfigError(f"ae_train.batch_size {tcfg['batch_size']} is not divisible by the "
                          f"{world} processes")
    local_batch = tcfg["batch_size"] // world
    max_bad = tcfg.get("max_bad_steps", 5)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else nullcontext())

    # ---- networks: stage 1 from the teacher, later stages from the previous checkpoint
    torch.manual_seed(seed)
    if stage == 1:
        ae = build_autoencoder(cfg)
        ema = make_ema(ae)
    else:
        prev = load_checkpoint(init)
        _check_init(prev, init, stage, cfg)
        ae = build_autoencoder(cfg, load_teacher_weights=False)
        _load(ae, prev["model"], "model", init)
        ema = make_ema(ae)
        _load(ema, prev["ema"], "ema", init)
        if stage >= 3:  # the encoder is final from here on: its EMA weights, in both copies
            ae.encoder.stem.load_state_dict(ema.encoder.stem.state_dict())
    depth = len(ae.encoder.vit.blocks)
    beyond = [k for k in acfg["discriminator"]["layers"] if not 0 <= k < depth]
    if beyond:  # checked in every stage: stage 1 must not run for hours towards a stage 2 error
        raise ConfigError(f"config: 'autoencoder.discriminator.layers': {beyond} beyond the "
                          f"teacher's {depth} blocks (0..{depth - 1})")
    if stage >= 3:
        ae.encoder.stem.requires_grad_(False)
    ae.set_grad_checkpointing(bool(tcfg.get("activation_checkpointing", False)))
    ae.to(device).train()
    ema.to(device)
    lpips = build_lpips(acfg["lpips"]["net"], acfg["lpips"]["weights"]).to(device)
    params = [p for p in ae.parameters() if p.requires_grad]
    decay, no_decay = [p for p in params if p.ndim >= 2], [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": tcfg["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=tcfg["lr"], betas=tuple(tcfg["betas"]))

    disc = d_opt = None
    dcfg = acfg["discriminator"]
    if stage >= 2:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            disc = Discriminator(ae.channels, dcfg["layers"], dcfg["channels"])
        if stage >= 3:
            _load(disc, prev["disc"], "discriminator", init)
        disc.to(device).train()
        d_opt = torch.optim.AdamW(disc.parameters(), lr=tcfg["disc_lr"],
                                  betas=tuple(tcfg["betas"]), weight_decay=0.0)

    # ---- resume from out/last.pt when it belongs to this very run
    meta = {"config": ae_config(cfg), "train": tcfg, "seed": seed, "world_size": world,
            "stage": stage, "init": None if init is None else str(init)}
    start, skipped, bad_in_row = 0, 0, 0
    positions = [[0, 0] for _ in range(world)]  # per rank: (epoch, batches consumed in it)
    last = out / "last.pt"
    if last.is_file():
        ck = load_checkpoint(last)
        if ck.get("kind") == AE_KIND and _resume_key(ck) == _resume_key(meta):
            ae.load_state_dict(ck["model"])
            ema.load_state_dict(ck["ema"])
            opt.load_state_dict(ck["optimizer"])
            if disc is not None:
                disc.load_state_dict(ck["disc"])
                d_opt.load_state_dict(ck["disc_optimizer"])
            start, skipped, bad_in_row = ck["step"], ck["skipped"], ck["bad_in_row"]
            positions = ck["data_position"]
            if main:
                log.info("ae stage %d: resuming from %s at step %d", stage, last, start)
        elif main:
            log.warning("ae stage %d: %s is from a different run (config, seed, init or world "
                        "size changed); starting over", stage, last)

    # DDP wrappers for the training forwards; the G step calls the bare discriminator (frozen
    # there). Buffers (spectral-norm vectors, RoPE periods) are the same on every rank.
    model, disc_train = ae, disc
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        model = DDP(ae, device_ids=ids, forward_sync_buffers=False)
        if disc is not None:
            disc_train = DDP(disc, device_ids=ids, forward_sync_buffers=False)

    if batches is None:
        from dinosae.data.loader import make_loader

        workers = cfg.get("data", {}).get("workers", 2)

        def batches(epoch: int) -> Iterable:
            return make_loader(shards, local_batch, train=True, flip=True, workers=workers,
                               rank=rank, world_size=world, seed=seed, epoch=epoch)

    data = loaders.enter_context(closing(data_stream(batches, *positions[rank])))

    def state(step: int) -> dict:
        s = {"kind": AE_KIND, "stage": stage, "step": step, **meta,
             "model": ae.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
             "skipped": skipped, "bad_in_row": bad_in_row, "data_position": positions}
        if disc is not None:
            s["disc"] = disc.state_dict()
            s["disc_optimizer"] = d_opt.state_dict()
        return s

    def gather_positions(pos: tuple[int, int]) -> list[list[int]]:
        if world == 1:
            return [list(pos)]
        t = torch.tensor(pos, dtype=torch.int64, device=device)
        out_ = [torch.zeros_like(t) for _ in range(world)]
        dist.all_gather(out_, t)
        return [o.tolist() for o in out_]

    # rows are labelled with the number of completed steps: keep those up to `start`
    metrics = MetricsCSV(out / "metrics.csv", resume_step=start + 1) if main else None
    progress = Progress(steps, start, desc=f"ae stage {stage}")
    if main:
        n_train = sum(p.numel() for p in params)
        log.info("ae stage %d: %d steps, batch %d on %d process(es), %d trainable parameters, "
                 "device %s", stage, steps, tcfg["batch_size"], world, n_train, device)

    warmup_d = tcfg["disc_warmup_steps"] if stage == 2 else 0
    vit, layers = ae.encoder.vit, dcfg["layers"]
    t_last, logged = time.time(), start
    for step in range(start, steps):
        pos, batch = next(data)
        x = batch[0].to(device, non_blocking=True).float()
        B = x.shape[0]
        gen = step_generator(seed, stage, step, rank, device)
        train_g = step >= warmup_d  # stage 2 starts with discriminator-only steps
        row = {k: float("nan") for k in FIELDS}

        # ---- generator (stem + decoder, or decoder only)
        lr = lr_at(step - warmup_d, tcfg["lr"], tcfg["warmup_steps"], steps - warmup_d,
                   tcfg["schedule"]) if train_g else 0.0
        for group in opt.param_groups:
            group["lr"] = lr
        noise = None
        if stage == 4:
            tau = noise_tau(step, steps, tcfg["noise_tau"])
            sigma = torch.rand(B, generator=gen, device=device) * tau
            eps = torch.randn(B, ae.grid[0] * ae.grid[1], ae.channels, generator=gen, device=device)
            noise = sigma[:, None, None] * eps
            row["tau"] = tau
        with autocast, (nullcontext() if train_g else torch.no_grad()):
            z, rec = model(x, noise)
            l1 = (rec.float() - x).abs().mean()
            lp = lpips(rec.float(), x).mean()
            rec_loss = weights["l1"] * l1 + weights["lpips"] * lp
            loss = rec_loss
            if stage <= 2:
                align = alignment_loss(z, ae.teacher_tokens(x))
                loss = loss + weights["align"] * align
                row["align"] = align
            if stage >= 2 and train_g:
                disc.requires_grad_(False)
                g_gan = g_hinge_loss(disc(teacher_features(vit, diffaug(rec, gen), layers)))
                lam = adaptive_weight(rec_loss, g_gan, ae.decoder.last_layer,
                                      weights["adaptive_max"])
                loss = loss + weights["adv"] * lam * g_gan
                row["g_gan"], row["lambda"] = g_gan, lam
        row.update(lr=lr, loss=loss, l1=l1, lpips=lp)

        ok = True
        if train_g:
            ok = _all_true(bool(torch.isfinite(loss)), device)
            opt.zero_grad(set_to_none=True)
            if ok:
                loss.backward()
                gn = torch.nn.utils.clip_grad_norm_(params, tcfg["grad_clip"])
                ok = bool(torch.isfinite(gn))  # same on every rank: grads are all-reduced
                row["grad_norm"] = gn
            if ok:
                opt.step()
                if stage <= 2:
                    ema_update(ema.encoder.stem, ae.encoder.stem, tcfg["ema"])
                ema_update(ema.decoder, ae.decoder, tcfg["ema"])
            opt.zero_grad(set_to_none=True)

        # ---- discriminator: real vs reconstructed, both DiffAugmented
        if disc is not None and ok:
            disc.requires_grad_(True)
            d_lr = lr_at(step, tcfg["disc_lr"], tcfg["warmup_steps"], steps, tcfg["schedule"])
            for group in d_opt.param_groups:
                group["lr"] = d_lr
            with autocast:
                with torch.no_grad():
                    feats = teacher_features(vit, diffaug(torch.cat([x, rec.detach()]), gen),
                                             layers)
                logits = disc_train(feats)
                d_real, d_fake = logits[:B], logits[B:]
                d_loss = d_hinge_loss(d_real, d_fake)
            row.update(d_loss=d_loss, d_real=d_real.mean(), d_fake=d_fake.mean())
            d_opt.zero_grad(set_to_none=True)
            ok = _all_true(bool(torch.isfinite(d_loss)), device)
            if ok:
                d_loss.backward()
                dgn = torch.nn.utils.clip_grad_norm_(disc.parameters(), tcfg["grad_clip"])
                ok = bool(torch.isfinite(dgn))
                row["d_grad_norm"] = dgn
            if ok:
                d_opt.step()
            d_opt.zero_grad(set_to_none=True)

        # ---- bookkeeping: bad steps, metrics, grids, checkpoints, signals
        done = step + 1
        positions = gather_positions(pos)
        if ok:
            bad_in_row = 0
        else:
            skipped += 1
            bad_in_row += 1
            if main:
                log.warning("ae stage %d step %d: non-finite loss or gradient, step skipped "
                            "(%d in a row)", stage, done, bad_in_row)
            if bad_in_row >= max_bad:
                raise NumericsError(
                    f"ae stage {stage}: {bad_in_row} non-finite steps in a row at step {done}; "
                    "stopping (lower ae_train.lr, check the data, or raise "
                    "ae_train.max_bad_steps)")
        if main and (done % tcfg["log_every"] == 0 or done == steps or not ok):
            now = time.time()
            dt = (now - t_last) / max(1, done - logged)
            t_last, logged = now, done
            row.update(step=done, skipped=skipped, sec_per_step=dt,
                       images_per_sec=tcfg["batch_size"] / max(dt, 1e-9))
            metrics.log({k: float(v.detach()) if torch.is_tensor(v) else v for k, v in row.items()})
        if main and (done % tcfg["image_every"] == 0 or done == steps):
            n = min(8, B)
            pairs = torch.stack([x[:n], rec[:n].detach().float()], dim=1).flatten(0, 1)
            save_grid(pairs, out / f"grid_{done:06d}.png", nrow=8)
        progress.update(1, loss=float(loss.detach()), skipped=skipped)
        fault_point(f"ae-stage{stage}", done)
        stopping = not _all_true(not stop.stop, device)
        if (done % tcfg["ckpt_every"] == 0 and done < steps) or (stopping and done < steps):
            if main:
                save_checkpoint(last, state(done))
            barrier()
        if stopping and done < steps:
            progress.close()
            raise SystemExit(f"ae stage {stage}: stopped by signal after step {done}; "
                             f"rerun to resume from {last}")

    progress.close()
    if main:
        save_checkpoint(out / "checkpoint.pt", state(steps))
        last.unlink(missing_ok=True)
        log.info("ae stage %d: wrote %s", stage, out / "checkpoint.pt")
    barrier()
    return ae
