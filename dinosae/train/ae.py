"""Autoencoder training: one DINO-SAE stage per call.

    stage 1  alignment      stem + decoder   0.5*(1-cos) + L1 + LPIPS
    stage 2  adversarial    stem + decoder   stage 1 + adv*lambda*GAN (D warm-up first: D only)
    stage 3  refinement     decoder only     L1 + LPIPS + adv*lambda*GAN   (encoder frozen)
    stage 4  noise aug.     decoder only     as stage 3 on z + sigma*rms(z)*eps, sigma = tau*U(0,1)

lambda = ||grad_W L_rec|| / ||grad_W L_GAN|| at the decoder's last conv W, clamped. The GAN is
the configured discriminator's (models.discriminator): with backbone dino_vits8, RAE's recipe --
its DiffAug on [-1, 1] images, fakes quantised to 8 bits for the discriminator step, half the
hinge loss, the discriminator in eval mode (no spectral-norm power iteration) for the generator
step. Each stage's steps, global batch and lr are ae_train.stages[k-1]. Stage k > 1
starts from stage k-1's checkpoint. Periodic checkpoints go to `out/last.pt` (full state: a
rerun after a kill resumes from it); the finished stage writes `out/checkpoint.pt` with what the
next stage needs (trained weights and their EMA, the discriminator from stage 2 on, no optimizer
state) and removes last.pt. Neither holds the frozen teacher: it is referenced by source and
sha256 (models.autoencoder). Data order, augmentation and noise are pure functions of (seed,
stage, step, row of the global batch), never of the process (train.draws), so a resumed run
ends with exactly the weights of an uninterrupted one (on CPU), and a run on W processes, each
accumulating over ae_train.micro_batch rows, with those of one process on the global batch (up
to float rounding).

Reading order: build_stage (networks, optimisers), generator_step, discriminator_step, then
train_stage, the loop.
"""

from __future__ import annotations

import copy
import functools
import logging
import os
import time
from collections.abc import Callable, Iterable
from contextlib import ExitStack, closing, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.nn.utils import parametrize

from dinosae.checkpoint import AE_KIND, read_checkpoint, tensors_fingerprint
from dinosae.dist import all_ranks, cleanup_ddp, setup_ddp
from dinosae.errors import ConfigError
from dinosae.faults import nan_fault
from dinosae.images import save_grid
from dinosae.models.autoencoder import AutoencoderArgs, DinoSAE, build_autoencoder
from dinosae.models.discriminator import (
    D_LOSS_FACTOR,
    adaptive_weight,
    build_discriminator,
    d_hinge_loss,
    disc_logits,
    draw_aug,
    g_hinge_loss,
    quantize,
    take_rows,
    weight_of_grads,
)
from dinosae.models.encoder import Encoder
from dinosae.models.perceptual import build_lpips
from dinosae.outputs import names_only, writing
from dinosae.progress import Progress
from dinosae.train.draws import key_generator, my_rows, row_generators
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

log = logging.getLogger("dinosae")

FIELDS = ["step", "lr", "loss", "align", "l1", "lpips", "g_gan", "lambda", "d_loss", "d_real",
          "d_fake", "grad_norm", "d_grad_norm", "tau", "skipped", "sec_per_step", "images_per_sec",
          "rollbacks", "lr_scale"]
# what a stage folder holds (and temporaries): anything else there is not ours to replace
STAGE_FOLDER = names_only(r"checkpoint\.pt", r"last\.pt", r"metrics\.csv", r"grid_\d+\.png",
                          r"stops\.log", EVENTS, *WANDB_NAMES)
# ae_train keys that only change logging / checkpoint cadence: a resume ignores them
_CADENCE_KEYS = ("log_every", "image_every", "ckpt_every")


EpochFn = Callable[[int], Iterable]  # epoch -> that epoch's batches (images, labels)


def alignment_loss(z: torch.Tensor, z_teacher: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of 1 - cos(z, z_teacher), both (B, T, C)."""
    return (1.0 - F.cosine_similarity(z.float(), z_teacher.float(), dim=-1)).mean()


def step_generator(seed: int, stage: int, step: int, device: torch.device) -> torch.Generator:
    """The random stream of one step, the same on every process: the DiffAugment parameters of
    the whole global batch (each process applies its rows', `_aug_rows`)."""
    return key_generator(seed, stage, step, 0, device=device)


def _aug_rows(st: Stage, x: torch.Tensor, gen: torch.Generator, rows: range | None,
              total: int | None, fakes_too: bool) -> dict[str, torch.Tensor]:
    """DiffAugment parameters of this process's rows `rows` (default: all of x) of a global batch
    of `total` rows: drawn for the whole global batch (with `fakes_too`, 2 * total: the reals,
    then the fakes, as the discriminator step augments them) from the step's generator, the
    rows of x (and their fakes) taken."""
    rows = range(x.shape[0]) if rows is None else rows
    total = x.shape[0] if total is None else total
    idx = torch.arange(rows.start, rows.stop, device=gen.device)
    if fakes_too:
        idx = torch.cat([idx, idx + total])
    drawn = draw_aug(st.args.discriminator, total * (1 + fakes_too), x.shape[-2:], gen)
    return take_rows(drawn, idx)


def noise_tau(step: int, steps: int, tau: float | list[float]) -> float:
    """Stage 4's tau: a number (RAE's 0.8), or [lo, hi] ramping linearly from lo at the first
    step to hi at the last."""
    if not isinstance(tau, list):
        return float(tau)
    return tau[0] + (tau[1] - tau[0]) * step / max(1, steps - 1)


def make_ema(ae: DinoSAE) -> DinoSAE:
    """EMA copy of the trainable parts (stem, decoder); the frozen ViT is shared, not copied,
    so checkpoints store it once."""
    ema = DinoSAE(Encoder(copy.deepcopy(ae.encoder.stem), ae.encoder.vit),
                      copy.deepcopy(ae.decoder))
    ema.encoder.stem.requires_grad_(False)
    ema.decoder.requires_grad_(False)
    return ema.eval()


def _resume_key(ckpt_or_meta: dict) -> dict:
    """What must be equal for last.pt to continue this very run (cadence keys may change)."""
    train = {k: v for k, v in ckpt_or_meta["train"].items() if k not in _CADENCE_KEYS}
    return {"config": ckpt_or_meta["config"], "train": train, "seed": ckpt_or_meta["seed"],
            "world_size": ckpt_or_meta["world_size"], "stage": ckpt_or_meta["stage"]}


def _check_init(ckpt: dict, path: str, stage: int, cfg: dict) -> None:
    if ckpt.get("stage") != stage - 1:
        raise ConfigError(f"stage {stage} starts from a stage {stage - 1} checkpoint, but "
                          f"--init {path!r} is from stage {ckpt.get('stage')}")
    mine = AutoencoderArgs.from_config(cfg).architecture()
    theirs = AutoencoderArgs.from_dict(ckpt["config"]).architecture()
    if mine != theirs:
        diff = [k for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k)]
        raise ConfigError(f"--init {path!r} was trained with a different autoencoder "
                          f"architecture (differs in: {', '.join(diff)}); rerun the earlier "
                          "stages with this config")
    if stage >= 3 and "disc" not in ckpt:
        raise ConfigError(f"--init {path!r} has no discriminator (stage {stage} needs one)")


# ---------------------------------------------------------------- building a stage

@dataclass
class Stage:
    """The networks and optimisers of one stage (disc and d_opt from stage 2 on)."""

    number: int
    args: AutoencoderArgs
    ae: DinoSAE
    ema: DinoSAE
    params: list[torch.nn.Parameter]  # what the generator step trains
    opt: torch.optim.Optimizer
    lpips: torch.nn.Module
    disc: torch.nn.Module | None = None  # Discriminator or DinoDiscriminator
    d_opt: torch.optim.Optimizer | None = None

    def state(self, step: int, meta: dict, counters: dict, *, optimizers: bool) -> dict:
        """A checkpoint: trained weights and EMA (never the frozen teacher, referenced by
        source and sha256), the discriminator, the loop's counters; with `optimizers` (last.pt)
        the optimiser states too."""
        s = {"kind": AE_KIND, "stage": self.number, "step": step, **meta,
             "teacher": self.ae.teacher_ref(self.args),
             "model": self.ae.trainable_state(), "ema": self.ema.trainable_state()}
        if self.disc is not None:
            s["disc"] = self.disc.trainable_state()
            backbone = getattr(self.disc, "dino", None)
            if backbone is not None:  # frozen: referenced by its source and sha256
                s["disc_backbone"] = {"weights": self.args.discriminator.get("weights", "random"),
                                      "sha256": tensors_fingerprint(backbone)}
        if optimizers:
            s["optimizer"] = self.opt.state_dict()
            if self.d_opt is not None:
                s["disc_optimizer"] = self.d_opt.state_dict()
        return {**s, **counters}


def build_stage(cfg: dict, stage: int, init: str | None, device: torch.device) -> Stage:
    """Stage 1 from the teacher (random stem and decoder); later stages from the previous
    stage's checkpoint (`init`), whose teacher must be the same weights."""
    tcfg, acfg, seed = cfg["ae_train"], cfg["autoencoder"], int(cfg.get("seed", 0))
    torch.manual_seed(seed)
    prev = None
    if stage == 1:
        ae = build_autoencoder(cfg)
        ema = make_ema(ae)
    else:
        prev = read_checkpoint(init, AE_KIND, hint=" (give the previous stage's checkpoint)")
        _check_init(prev, init, stage, cfg)
        ae = DinoSAE.from_checkpoint(prev, repr(init), weights="model")
        ema = make_ema(ae)
        ema.load_trainable(prev["ema"], f"{init!r} (ema)")
        if stage >= 3:  # the encoder is final from here on: its EMA weights, in both copies
            ae.encoder.stem.load_state_dict(ema.encoder.stem.state_dict())
    depth = len(ae.encoder.vit.blocks)
    dcfg = acfg["discriminator"]
    teacher_disc = dcfg.get("backbone", "teacher") == "teacher"
    beyond = [k for k in dcfg["layers"] if not 0 <= k < depth] if teacher_disc else []
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
                            lr=tcfg["stages"][stage - 1]["lr"], betas=tuple(tcfg["betas"]))
    st = Stage(stage, AutoencoderArgs.from_config(cfg), ae, ema, params, opt, lpips)
    if stage >= 2:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            st.disc = build_discriminator(dcfg, ae.channels)
        if stage >= 3:
            _check_disc_backbone(st, prev, init)
            try:
                st.disc.load_trainable(prev["disc"])
            except RuntimeError as e:
                raise ConfigError(f"{init!r}: discriminator does not fit the configured "
                                  f"network: {e}") from e
        st.disc.to(device).train()
        st.d_opt = torch.optim.AdamW([p for p in st.disc.parameters() if p.requires_grad],
                                     lr=tcfg["disc_lr"], betas=tuple(tcfg["betas"]),
                                     weight_decay=0.0)
    return st


def resume(st: Stage, ck: dict, meta: dict) -> bool:
    """Load last.pt into the stage when it belongs to this very run."""
    if ck.get("kind") != AE_KIND or _resume_key(ck) != _resume_key(meta):
        return False
    st.ae.load_trainable(ck["model"], "last.pt (model)")
    st.ema.load_trainable(ck["ema"], "last.pt (ema)")
    st.opt.load_state_dict(ck["optimizer"])
    if st.disc is not None:
        st.disc.load_trainable(ck["disc"])
        st.d_opt.load_state_dict(ck["disc_optimizer"])
    return True


def _check_disc_backbone(st: Stage, prev: dict, init: str) -> None:
    """A frozen discriminator backbone must be the one the previous stage trained against."""
    ref, backbone = prev.get("disc_backbone"), getattr(st.disc, "dino", None)
    if (ref is None) != (backbone is None):
        raise ConfigError(f"--init {init!r} was trained with another discriminator backbone; "
                          "rerun the earlier stages with this config")
    if ref is not None and ref.get("sha256") != tensors_fingerprint(backbone):
        raise ConfigError(f"--init {init!r}: the discriminator's DINO rebuilt from "
                          f"{st.args.discriminator.get('weights')!r} is not the one it was "
                          f"trained with ({ref.get('weights')!r}); restore those weights")


# ---------------------------------------------------------------- one step


def generator_step(st: Stage, model: torch.nn.Module, x: torch.Tensor,
                   noise: torch.Tensor | None, gen: torch.Generator, *, train_g: bool,
                   lr: float, tcfg: dict, autocast: Any, device: torch.device,
                   micro_batch: int | None = None, rows: range | None = None,
                   total: int | None = None) -> tuple[dict, torch.Tensor, bool]:
    """Reconstruction (+ alignment in stages 1-2, + adaptive-weight GAN from stage 2) and, when
    `train_g`, the update of stem + decoder (decoder only from stage 3). Returns (metrics row
    values, reconstruction, ok); ok is False on every rank when any rank's loss or gradient
    is not finite (the update is then skipped). A `micro_batch` below the batch accumulates
    (`accumulated_generator_step`). `rows`: x's rows in the global batch of `total` (default: x
    is the whole batch); `gen`, the step's generator, draws DiffAugment for all of them."""
    if micro_batch is not None and micro_batch < x.shape[0]:
        return accumulated_generator_step(st, model, x, noise, gen, micro_batch,
                                          train_g=train_g, lr=lr, tcfg=tcfg, autocast=autocast,
                                          device=device, rows=rows, total=total)
    weights, stage, ae, disc = tcfg["loss"], st.number, st.ae, st.disc
    rae = st.args.discriminator.get("backbone", "teacher") == "dino_vits8"
    row: dict[str, Any] = {}
    set_lr(st.opt, lr)
    with autocast, (nullcontext() if train_g else torch.no_grad()):
        z, rec = model(x, noise)
        l1 = (rec.float() - x).abs().mean()
        lp = st.lpips(rec.float(), x).mean()
        rec_loss = weights["l1"] * l1 + weights["lpips"] * lp
        loss = rec_loss
        if stage <= 2:
            align = alignment_loss(z, ae.teacher_tokens(x))
            loss = loss + weights["align"] * align
            row["align"] = align
        if stage >= 2 and train_g:
            disc.requires_grad_(False)
            if rae:
                disc.eval()  # RAE's generator step: stored spectral-norm vectors
            aug = _aug_rows(st, x, gen, rows, total, fakes_too=False)
            g_gan = g_hinge_loss(disc_logits(disc, rec, st.args.discriminator, ae.encoder.vit,
                                             aug=aug))
            lam = adaptive_weight(rec_loss, g_gan, ae.decoder.last_layer,
                                  weights["adaptive_max"])
            loss = loss + weights["adv"] * lam * g_gan
            row["g_gan"], row["lambda"] = g_gan, lam
    row.update(lr=lr, loss=loss, l1=l1, lpips=lp)
    if not train_g:  # stage 2's discriminator warm-up
        return row, rec, True
    ok = all_ranks(bool(torch.isfinite(loss)), device)
    st.opt.zero_grad(set_to_none=True)
    if ok:
        loss.backward()
    return row, rec, _update_generator(st, row, ok, tcfg)


def _update_generator(st: Stage, row: dict, ok: bool, tcfg: dict) -> bool:
    """The generator's update once its gradients are in (`ok`: the loss was finite on every
    rank): clip (a non-finite norm skips the update, the same on every rank: gradients are
    all-reduced), step, then the EMA of what trains (stem only in stages 1-2)."""
    if ok:
        gn = torch.nn.utils.clip_grad_norm_(st.params, tcfg["grad_clip"])
        ok = bool(torch.isfinite(gn))
        row["grad_norm"] = gn
    if ok:
        st.opt.step()
        if st.number <= 2:
            ema_update(st.ema.encoder.stem, st.ae.encoder.stem, tcfg["ema"])
        ema_update(st.ema.decoder, st.ae.decoder, tcfg["ema"])
    st.opt.zero_grad(set_to_none=True)
    return ok


def discriminator_step(st: Stage, disc_train: torch.nn.Module, x: torch.Tensor,
                       rec: torch.Tensor, gen: torch.Generator, *, d_lr: float, tcfg: dict,
                       autocast: Any, device: torch.device, micro_batch: int | None = None,
                       rows: range | None = None, total: int | None = None
                       ) -> tuple[dict, bool]:
    """Hinge loss on real vs reconstructed images, both DiffAugmented (with the dino_vits8
    backbone: fakes quantised to 8 bits, half the loss, as RAE); skipped on every rank alike
    when not finite. A `micro_batch` below the batch accumulates
    (`accumulated_discriminator_step`). `rows`, `total`: as generator_step's."""
    if micro_batch is not None and micro_batch < x.shape[0]:
        return accumulated_discriminator_step(st, disc_train, x, rec, gen, micro_batch,
                                              d_lr=d_lr, tcfg=tcfg, autocast=autocast,
                                              device=device, rows=rows, total=total)
    backbone = _start_discriminator_step(st, d_lr)
    B = x.shape[0]
    fake = discriminator_fakes(rec, backbone)
    aug = _aug_rows(st, x, gen, rows, total, fakes_too=True)
    with autocast:
        logits = disc_logits(disc_train, torch.cat([x, fake]), st.args.discriminator,
                             st.ae.encoder.vit, aug=aug)
        d_real, d_fake = logits[:B], logits[B:]
        d_loss = D_LOSS_FACTOR[backbone] * d_hinge_loss(d_real, d_fake)
    row = {"d_loss": d_loss, "d_real": d_real.mean(), "d_fake": d_fake.mean()}
    st.d_opt.zero_grad(set_to_none=True)
    ok = all_ranks(bool(torch.isfinite(d_loss)), device)
    if ok:
        d_loss.backward()
    return row, _update_discriminator(st, row, ok, tcfg)


def discriminator_fakes(rec: torch.Tensor, backbone: str) -> torch.Tensor:
    """The reconstructions the discriminator step sees as fakes, detached: with RAE's
    dino_vits8 backbone quantised to 8-bit levels, as RAE's training does."""
    return quantize(rec.detach()) if backbone == "dino_vits8" else rec.detach()


def _start_discriminator_step(st: Stage, d_lr: float) -> str:
    """Training mode, gradients on (not into a frozen DINO backbone), the lr; returns the
    backbone."""
    backbone = st.args.discriminator.get("backbone", "teacher")
    st.disc.train()
    st.disc.requires_grad_(True)
    if backbone == "dino_vits8":
        st.disc.dino.requires_grad_(False)  # frozen; train() keeps it in eval mode too
    set_lr(st.d_opt, d_lr)
    st.d_opt.zero_grad(set_to_none=True)
    return backbone


def _update_discriminator(st: Stage, row: dict, ok: bool, tcfg: dict) -> bool:
    """The discriminator's update once its gradients are in (`ok`: the loss was finite on
    every rank): clip (a non-finite norm skips the update), step."""
    if ok:
        dgn = torch.nn.utils.clip_grad_norm_(st.disc.parameters(), tcfg["grad_clip"])
        ok = bool(torch.isfinite(dgn))
        row["d_grad_norm"] = dgn
    if ok:
        st.d_opt.step()
    st.d_opt.zero_grad(set_to_none=True)
    return ok


# ---------------------------------------------------------------- one step in micro-batches
#
# Gradient accumulation: the process's batch in parts of `micro` rows, each part's mean losses
# weighted by its share of the rows, so that the summed gradients are the whole batch's. What
# is not a mean over rows is made whole-batch explicitly: DiffAugment's parameters are drawn
# for the whole global batch and each part takes its rows' (`_aug_rows`), the spectral norms
# make one power iteration per step (`parametrize.cached`), and lambda is computed from the
# summed gradients at W (the GAN gradient is summed apart from the rest, then added with weight
# adv * lambda). Under DDP only the last part's backward all-reduces. Both discriminators
# normalise each image on its own (RAE's BatchNormLocal with virtual batch 1 is a per-sample
# norm: models.discriminator.DinoHead), so no statistic couples the rows of a batch: k parts
# give the update of one batch of k parts' rows, as k processes of one part each do.


def _parts(b: int, micro: int) -> list[tuple[slice, float, bool]]:
    """(rows, share of the batch, is last) of each micro-batch."""
    starts = list(range(0, b, micro))
    return [(slice(i, min(i + micro, b)), (min(i + micro, b) - i) / b, i == starts[-1])
            for i in starts]


def _no_sync(model: torch.nn.Module, last: bool) -> Any:
    return model.no_sync() if not last and hasattr(model, "no_sync") else nullcontext()


def _sum_into(sums: dict, values: dict, share: float) -> None:
    for k, v in values.items():
        sums[k] = sums.get(k, 0.0) + v.detach().float() * share


def accumulated_generator_step(st: Stage, model: torch.nn.Module, x: torch.Tensor,
                               noise: torch.Tensor | None, gen: torch.Generator, micro: int, *,
                               train_g: bool, lr: float, tcfg: dict, autocast: Any,
                               device: torch.device, rows: range | None = None,
                               total: int | None = None) -> tuple[dict, torch.Tensor, bool]:
    """generator_step in micro-batches of `micro` rows: the same update (up to float
    rounding), one part's activations in memory at a time."""
    weights, stage, ae, disc = tcfg["loss"], st.number, st.ae, st.disc
    dcfg = st.args.discriminator
    gan = stage >= 2 and train_g
    set_lr(st.opt, lr)
    st.opt.zero_grad(set_to_none=True)
    gan_grads = [torch.zeros_like(p) for p in st.params] if gan else []
    sums: dict[str, torch.Tensor] = {}
    recs = []
    aug = _aug_rows(st, x, gen, rows, total, fakes_too=False) if gan else {}
    if gan:
        disc.requires_grad_(False)
        if dcfg.get("backbone", "teacher") == "dino_vits8":
            disc.eval()  # RAE's generator step: stored spectral-norm vectors
    with parametrize.cached() if gan else nullcontext():
        for part_rows, share, last in _parts(x.shape[0], micro):
            with _no_sync(model, last):
                with autocast, (nullcontext() if train_g else torch.no_grad()):
                    xp = x[part_rows]
                    z, rec = model(xp, None if noise is None else noise[part_rows])
                    l1 = (rec.float() - xp).abs().mean()
                    lp = st.lpips(rec.float(), xp).mean()
                    part = {"l1": l1, "lpips": lp}
                    loss = weights["l1"] * l1 + weights["lpips"] * lp
                    if stage <= 2:
                        part["align"] = alignment_loss(z, ae.teacher_tokens(xp))
                        loss = loss + weights["align"] * part["align"]
                    if gan:
                        part["g_gan"] = g_hinge_loss(disc_logits(
                            disc, rec, dcfg, ae.encoder.vit, aug=take_rows(aug, part_rows)))
                if gan:  # the GAN gradient apart: lambda needs it alone at W
                    grads = torch.autograd.grad(part["g_gan"] * share, st.params,
                                                retain_graph=True, allow_unused=True)
                    for acc, g in zip(gan_grads, grads, strict=True):
                        if g is not None:
                            acc.add_(g)
                if train_g:
                    (loss * share).backward()
            _sum_into(sums, {**part, "loss": loss}, share)
            recs.append(rec.detach())
    row: dict[str, Any] = {**sums, "lr": lr}
    if not train_g:  # stage 2's discriminator warm-up
        return row, torch.cat(recs), True
    if gan:
        world = dist.get_world_size() if dist.is_initialized() else 1
        if world > 1:  # the other gradients were all-reduced by DDP's last backward
            flat = torch.cat([g.reshape(-1) for g in gan_grads]) / world
            dist.all_reduce(flat)
            for g, f in zip(gan_grads, flat.split([g.numel() for g in gan_grads]), strict=True):
                g.copy_(f.view_as(g))
        w = ae.decoder.last_layer
        at_w = next(i for i, p in enumerate(st.params) if p is w)
        lam = weight_of_grads(w.grad, gan_grads[at_w], weights["adaptive_max"])
        for p, g in zip(st.params, gan_grads, strict=True):
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad.add_(g, alpha=float(weights["adv"] * lam))
        row["loss"] = row["loss"] + weights["adv"] * lam * row["g_gan"]
        row["lambda"] = lam
    ok = all_ranks(bool(torch.isfinite(row["loss"])), device)
    return row, torch.cat(recs), _update_generator(st, row, ok, tcfg)


def accumulated_discriminator_step(st: Stage, disc_train: torch.nn.Module, x: torch.Tensor,
                                   rec: torch.Tensor, gen: torch.Generator, micro: int, *,
                                   d_lr: float, tcfg: dict, autocast: Any,
                                   device: torch.device, rows: range | None = None,
                                   total: int | None = None) -> tuple[dict, bool]:
    """discriminator_step in micro-batches of `micro` real and `micro` reconstructed images."""
    backbone = _start_discriminator_step(st, d_lr)
    B, dcfg = x.shape[0], st.args.discriminator
    fake = discriminator_fakes(rec, backbone)
    images = torch.cat([x, fake])
    aug = _aug_rows(st, x, gen, rows, total, fakes_too=True)  # rows of `images`
    sums: dict[str, torch.Tensor] = {}
    with parametrize.cached():  # one power iteration per step, as in one forward
        for part_rows, share, last in _parts(B, micro):
            idx = torch.arange(part_rows.start, part_rows.stop, device=x.device)
            idx = torch.cat([idx, idx + B])  # the part's reals, then their fakes
            n = part_rows.stop - part_rows.start
            with _no_sync(disc_train, last):
                with autocast:
                    logits = disc_logits(disc_train, images[idx], dcfg, st.ae.encoder.vit,
                                         aug=take_rows(aug, idx.to(gen.device)))
                    d_loss = D_LOSS_FACTOR[backbone] * d_hinge_loss(logits[:n], logits[n:])
                # the cached spectral-norm weights are shared by the parts' graphs
                (d_loss * share).backward(retain_graph=not last)
            _sum_into(sums, {"d_loss": d_loss, "d_real": logits[:n].mean(),
                             "d_fake": logits[n:].mean()}, share)
    row: dict[str, Any] = dict(sums)
    ok = all_ranks(bool(torch.isfinite(row["d_loss"])), device)
    return row, _update_discriminator(st, row, ok, tcfg)


# ---------------------------------------------------------------- the loop

def _check_args(stage: int, init: str | None, out: str | None) -> None:
    if out is None:
        raise ConfigError("ae-train: --out is required")
    if stage not in (1, 2, 3, 4):
        raise ConfigError(f"ae-train: stage must be 1-4, got {stage}")
    if stage == 1 and init is not None:
        raise ConfigError("stage 1 starts from the teacher; --init is for stages 2-4")
    if stage > 1 and init is None:
        raise ConfigError(f"stage {stage} needs --init (stage {stage - 1}'s checkpoint)")


def _shard_batches(cfg: dict, shards: str, local_batch: int, rank: int, world: int) -> EpochFn:
    """epoch -> that epoch's batches of this rank (its rows of each global batch, the same
    global batches for any world size), from the train shards."""
    from dinosae.data.loader import global_batch_loader

    workers, seed = cfg.get("data", {}).get("workers", 2), int(cfg.get("seed", 0))

    def batches(epoch: int) -> Iterable:
        return global_batch_loader(shards, local_batch, flip=True, workers=workers, rank=rank,
                                   world_size=world, seed=seed, epoch=epoch)

    return batches


def _noise(st: Stage, x: torch.Tensor, step: int, steps: int, tau_cfg: float | list[float],
           key: tuple[int, ...], rows: range) -> tuple[torch.Tensor, float]:
    """Stage 4's relative latent noise sigma * eps, sigma = tau * U(0, 1) per sample (RAE's);
    DinoSAE.forward scales it by each token's RMS. Each sample's from its own generator, seeded
    by (*key, 1, its row in the global batch): x holds the global rows `rows`. Returns (noise,
    tau)."""
    tau = noise_tau(step, steps, tau_cfg)
    shape = (1, st.ae.grid[0] * st.ae.grid[1], st.ae.channels)
    noise = [torch.rand(1, generator=g, device=x.device) * tau
             * torch.randn(shape, generator=g, device=x.device)
             for g in row_generators((*key, 1), rows, x.device)]
    return torch.cat(noise), tau


def train_stage(cfg: dict, stage: int, shards: str | None, init: str | None = None,
                out: str | None = None, *, batches: EpochFn | None = None,
                force: bool = False, restart: bool = False) -> DinoSAE:
    """Train autoencoder stage `stage` (1-4), write `out`/checkpoint.pt, return the model.

    cfg sections: seed, device, autoencoder, data (image_size, workers), ae_train.
    shards: train shard folder (dinosae.data.loader); `batches`, for tests, replaces it with a
    function epoch -> iterable of (images (b,3,H,W) in [0,1], labels) for this rank. `out` is
    locked by rank 0 while it trains; an existing `out` holding other files than a stage's is
    refused (`force`: replaced). A last.pt in `out` from another run is refused (`restart`:
    replaced by a fresh run), see train.loop.RunCheckpoints.resume.
    """
    _check_args(stage, init, out)
    if batches is None:  # a missing or truncated shard stops here, before any model is built
        from dinosae.data.shard import check_image_size, read_manifest

        check_image_size(read_manifest(shards), shards, cfg["data"]["image_size"],
                         "data.image_size")
    rank0 = int(os.environ.get("RANK", "0")) == 0  # before the process group: rank 0 claims
    with writing(out, "ae-train", STAGE_FOLDER, force=force, inputs=[shards, init]
                 ) if rank0 else nullcontext():
        return _train_stage(cfg, stage, shards, init, out, batches, restart)


def run_identity(cfg: dict, stage: int, shards: str | None, init: str | None,
                 world: int) -> dict:
    """What makes a stage's run this run (last.pt records it; a resume must match it): the
    init checkpoint's and the shards' manifest's sha256, seed, world size and every setting
    that changes the trajectory (ae_train less its cadence keys, the autoencoder config)."""
    from dinosae.files import sha256_file

    manifest = Path(shards) / "manifest.json" if shards else None
    return {"stage": stage, "seed": int(cfg.get("seed", 0)), "world_size": world,
            "init_sha256": sha256_file(init) if init else None,
            "shards_manifest_sha256": sha256_file(manifest) if manifest and manifest.is_file()
            else None,
            "image_size": cfg["data"]["image_size"], "autoencoder": cfg["autoencoder"],
            "ae_train": {k: (v[stage - 1] if k == "stages" else v)  # this stage's settings
                         for k, v in cfg["ae_train"].items()
                         if k not in (*_CADENCE_KEYS, "max_bad_steps", *NOT_TRAJECTORY)}}


def _train_stage(cfg: dict, stage: int, shards: str | None, init: str | None, out: str,
                 batches: EpochFn | None, restart: bool = False) -> DinoSAE:
    own_group = not dist.is_initialized()
    rank, world, device = setup_ddp(cfg.get("device", "auto"))
    tcfg = cfg["ae_train"]
    batch = tcfg["stages"][stage - 1]["batch_size"]
    if batch % world:
        raise ConfigError(f"ae_train.stages[{stage - 1}].batch_size {batch} is not divisible by "
                          f"the {world} processes")
    if batches is None:
        batches = _shard_batches(cfg, shards, batch // world, rank, world)
    files = RunCheckpoints(Path(out), tcfg["ckpt_every"], tcfg["stages"][stage - 1]["steps"],
                           f"ae stage {stage}", f"ae-stage{stage}", device,
                           run_identity(cfg, stage, shards, init, world), restart)
    try:
        st = build_stage(cfg, stage, init, device)
        recovery = Recovery(tcfg, f"ae stage {stage}")
        while True:  # again from last.pt after each rollback (train.loop.Recovery)
            try:
                with ExitStack() as closing_stack:  # loader workers stop however the loop ends
                    _loop(cfg, st, init, Path(out), batches, files, closing_stack, rank, world,
                          device, recovery)
                    return st.ae
            except Diverged as e:
                recovery.roll_back(e, files.last)
                files.restart = False  # --restart replaced the old run once; now resume
    finally:
        files.close()
        if own_group:
            cleanup_ddp()


def _loop(cfg: dict, st: Stage, init: str | None, out: Path, batches: EpochFn,
          files: RunCheckpoints, closing_stack: ExitStack, rank: int, world: int,
          device: torch.device, recovery: Recovery) -> None:
    """The training loop of one stage: resume, then step, log, checkpoint until done. Long
    because it is the loop, read top to bottom like nanoGPT's train.py."""
    tcfg, seed, stage, main = cfg["ae_train"], int(cfg.get("seed", 0)), st.number, rank == 0
    mine = tcfg["stages"][stage - 1]  # this stage's steps, global batch and lr
    steps, global_batch = mine["steps"], mine["batch_size"]
    max_bad = tcfg.get("max_bad_steps", 5)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else nullcontext())

    # ---- resume from out/last.pt when it belongs to this very run
    meta = {"config": st.args.to_dict(), "train": tcfg, "seed": seed, "world_size": world,
            "stage": stage, "init": None if init is None else str(init)}
    start, skipped, bad_in_row = 0, 0, 0
    positions = [[0, 0] for _ in range(world)]  # per rank: (epoch, batches consumed in it)
    ck = files.resume()
    if ck is not None and resume(st, ck, meta):
        start, skipped, bad_in_row = ck["step"], ck["skipped"], ck["bad_in_row"]
        positions = ck["data_position"]
        recovery.adopt(ck.get("recovery"))
        if main:
            log.info("ae stage %d: resuming from %s at step %d", stage, files.last, start)
    elif ck is not None and main:
        log.warning("ae stage %d: %s is from a different run (config, seed, init or world size "
                    "changed); starting over", stage, files.last)

    def state(step: int, optimizers: bool) -> dict:
        counters = {"skipped": skipped, "bad_in_row": bad_in_row, "data_position": positions,
                    "recovery": recovery.state()}
        return st.state(step, meta, counters, optimizers=optimizers)

    # DDP wrappers for the training forwards; the G step calls the bare discriminator (frozen
    # there). Buffers (spectral-norm vectors, RoPE periods) are the same on every rank.
    model, disc_train = st.ae, st.disc
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        model = DDP(st.ae, device_ids=ids, forward_sync_buffers=False)
        if st.disc is not None:
            disc_train = DDP(st.disc, device_ids=ids, forward_sync_buffers=False)
    data = closing_stack.enter_context(closing(endless(batches, *positions[rank])))
    # rows are labelled with the number of completed steps: keep those up to `start`
    metrics = closing_stack.enter_context(closing(RunLog(
        out, cfg, resumed_at=start, device=device, name=f"ae-stage{stage}"))) if main else None
    recovery.log_pending(metrics)
    progress = closing_stack.enter_context(closing(Progress(steps, start, f"ae stage {stage}")))
    if main:
        log.info("ae stage %d: %d steps, batch %d on %d process(es), %d trainable parameters, "
                 "device %s", stage, steps, global_batch, world,
                 sum(p.numel() for p in st.params), device)
    warmup_d = tcfg["disc_warmup_steps"] if stage == 2 else 0
    rows = my_rows(rank, global_batch // world)  # this process's rows of each global batch
    t_last, logged = time.time(), start
    for step in range(start, steps):
        pos, batch = next(data)
        x = batch[0].to(device, non_blocking=True).float()
        if nan_fault(f"ae-stage{stage}-loss"):
            x = x * float("nan")
        gen = step_generator(seed, stage, step, device)
        train_g = step >= warmup_d  # stage 2 starts with discriminator-only steps
        row = {k: float("nan") for k in FIELDS}
        noise = None
        if stage == 4:
            noise, row["tau"] = _noise(st, x, step, steps, tcfg["noise_tau"],
                                       (seed, stage, step), rows)
        lr = lr_at(step - warmup_d, mine["lr"], tcfg["warmup_steps"], steps - warmup_d,
                   tcfg["schedule"]) * recovery.lr_scale if train_g else 0.0
        g_row, rec, ok = generator_step(st, model, x, noise, gen, train_g=train_g, lr=lr,
                                        tcfg=tcfg, autocast=autocast, device=device,
                                        micro_batch=tcfg.get("micro_batch"), rows=rows,
                                        total=global_batch)
        row.update(g_row)
        if st.disc is not None and ok:
            d_lr = lr_at(step, tcfg["disc_lr"], tcfg["warmup_steps"], steps,
                         tcfg["schedule"]) * recovery.lr_scale
            d_row, ok = discriminator_step(st, disc_train, x, rec, gen, d_lr=d_lr, tcfg=tcfg,
                                           autocast=autocast, device=device,
                                           micro_batch=tcfg.get("micro_batch"), rows=rows,
                                           total=global_batch)
            row.update(d_row)

        # ---- bookkeeping: bad steps, metrics, grids, checkpoints, signals
        done = step + 1
        positions = _gather_positions(pos, world, device)
        skipped, bad_in_row = (skipped, 0) if ok else (skipped + 1, bad_in_row + 1)
        if not ok:
            _bad_step(stage, done, bad_in_row, max_bad, main)
        if main and (done % tcfg["log_every"] == 0 or done == steps or not ok):
            now = time.time()
            dt, t_last, logged = (now - t_last) / max(1, done - logged), now, done
            row.update(step=done, skipped=skipped, sec_per_step=dt, rollbacks=recovery.rollbacks,
                       lr_scale=recovery.lr_scale,
                       images_per_sec=global_batch / max(dt, 1e-9))
            metrics.log(done, {k: float(v.detach()) if torch.is_tensor(v) else v
                               for k, v in row.items()})
        if main and (done % tcfg["image_every"] == 0 or done == steps):
            n = min(8, x.shape[0])
            pairs = torch.stack([x[:n], rec[:n].detach().float()], dim=1).flatten(0, 1)
            save_grid(pairs, out / f"grid_{done:06d}.png", nrow=8)
            metrics.image("grid", done, out / f"grid_{done:06d}.png")
        progress.update(1, loss=float(row["loss"].detach()), skipped=skipped)
        files.after_step(done, functools.partial(state, done, optimizers=True))
    files.finish(lambda: state(steps, optimizers=False))


def _bad_step(stage: int, done: int, bad_in_row: int, max_bad: int, main: bool) -> None:
    """A skipped (non-finite) step: warn; stop after `max_bad` in a row."""
    if main:
        log.warning("ae stage %d step %d: non-finite loss or gradient, step skipped (%d in a "
                    "row)", stage, done, bad_in_row)
    if bad_in_row >= max_bad:
        raise Diverged(f"ae stage {stage}: {bad_in_row} non-finite steps in a row at step "
                            f"{done}; stopping (lower ae_train.lr, check the data, or raise "
                            "ae_train.max_bad_steps)")


def _gather_positions(pos: tuple[int, int], world: int, device: torch.device) -> list[list[int]]:
    """Every rank's data position (epoch, batches consumed), for last.pt."""
    if world == 1:
        return [list(pos)]
    t = torch.tensor(pos, dtype=torch.int64, device=device)
    out = [torch.zeros_like(t) for _ in range(world)]
    dist.all_gather(out, t)
    return [o.tolist() for o in out]
