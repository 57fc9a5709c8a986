"""What `dinosae plan` measures: every computing rule's work on one image, on fake tensors.

For every rule that computes, the real networks are built from the config (random weights, on
the meta device) and one call of the rule's work is run on *fake* tensors (FakeTensorMode:
shapes and dtypes only, no arithmetic, no memory), so that the paper-size models cost seconds
on a CPU and the batch size costs nothing:

* FLOPs per image: `torch.utils.flop_counter.FlopCounterMode` at batch 1 (forward, and for the
  training rules backward too, including the recomputation of activation-checkpointed blocks),
  with two formulas torch lacks or gets wrong (see `flop_counter`);
* GPU memory: the peak of the bytes of live tensors made during the call (activations,
  gradients, temporaries, autocast's weight copies; not the weights) at a given batch
  (`Part.peak_live`, one fake-tensor trace per batch size, cached); the parameter counts for
  weights, AdamW moments, EMA and DDP gradient buckets. The training calls run under CPU bf16
  autocast, which casts the same kinds of ops as CUDA's.

Measuring only: what the measurements cost on a GPU, and what fits, is dinosae.plan's (the
deciding and printing). The training calls below mirror the loops in dinosae.train.ae and
dinosae.train.dit (same networks, losses and backward passes); keep them in step when those
change.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import weakref
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import (
    FlopCounterMode,
    conv_flop_count,
    sdpa_backward_flop_count,
    sdpa_flop_count,
)

CONV_OPS = ("convolution",)  # FlopCounterMode op names run by cuDNN (TF32 in fp32 rules)
SECTIONS = ("data", "autoencoder", "ae_train", "latents", "dit", "sample", "eval")  # measured


# ---------------------------------------------------------------- measuring on fake tensors

class LiveBytes(TorchDispatchMode):
    """Bytes of tensor storage alive and their peak, over the ops run inside the mode. Only
    storages made by those ops count (weights and other earlier tensors do not); one is freed
    when its last tensor goes."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._seen: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage._cdata
                if key not in self._seen:
                    self._seen.add(key)
                    self.live += storage.nbytes()
                    weakref.finalize(storage, self._free, key, storage.nbytes())
        self.peak = max(self.peak, self.live)
        return out

    def _free(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self._seen.discard(key)


class FakeWorld:
    """Networks built on the meta device, then given fake CPU tensors (FakeTensorMode): ops
    run on shapes only, and CPU autocast and kernel choices apply as they would to real ones."""

    def __init__(self) -> None:
        from torch._subclasses.fake_tensor import FakeTensorMode

        self.mode = FakeTensorMode()
        self._memo: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _fake(self, t: torch.Tensor) -> torch.Tensor:
        if t.device.type == "meta":
            conv = self.mode.fake_tensor_converter
            return conv.from_meta_and_device(self.mode, t, torch.device("cpu"))
        return self.mode.from_tensor(t)  # a real CPU tensor (e.g. a constant made at init)

    def module(self, module: nn.Module) -> nn.Module:
        """`module` (built under `torch.device("meta")`) with fake parameters and buffers, in
        place; a tensor shared by several modules stays one tensor."""
        for m in module.modules():
            for name, p in list(m._parameters.items()):
                if p is not None:
                    m._parameters[name] = self._swap(p, lambda t: nn.Parameter(
                        self._fake(t.data), t.requires_grad))
            for name, b in list(m._buffers.items()):
                if b is not None:
                    m._buffers[name] = self._swap(b, self._fake)
        return module

    def _swap(self, t: torch.Tensor, make: Callable[[torch.Tensor], torch.Tensor]
              ) -> torch.Tensor:
        if id(t) not in self._memo:  # the original is kept, so that its id is not reused
            self._memo[id(t)] = (t, make(t))
        return self._memo[id(t)][1]


def conv_backward_flops(grad_out_shape: list[int], x_shape: list[int], w_shape: list[int],
                        bias: Any, stride: Any, padding: Any, dilation: Any, transposed: bool,
                        output_padding: Any, groups: int, output_mask: list[bool],
                        out_shape: Any = None) -> int:
    """FLOPs of aten.convolution_backward: each of the input and the weight gradient costs as
    many multiply-adds as the forward. (torch's own formula counts the weight gradient of a
    grouped convolution as if it were dense, `groups` times too many: for the decoder's
    depthwise convolutions that is thousands of times.)"""
    forward = conv_flop_count(list(x_shape), list(w_shape), list(grad_out_shape), transposed)
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def cpu_attention_flops(query: list[int], key: list[int], value: list[int], *args: Any,
                        out_shape: Any = None, **kwargs: Any) -> int:
    """FLOPs of CPU flash attention, which torch's counter does not know (it counts the CUDA
    kernels only): the same as any scaled-dot-product attention."""
    return sdpa_flop_count(query, key, value)


def cpu_attention_backward_flops(grad_out: list[int], query: list[int], key: list[int],
                                 value: list[int], *args: Any, out_shape: Any = None,
                                 **kwargs: Any) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


def flop_counter() -> FlopCounterMode:
    """torch's FLOP counter with the formulas above added (convolution backward, CPU
    attention), so that fake CPU tensors count what the CUDA kernels would."""
    aten = torch.ops.aten
    return FlopCounterMode(display=False, custom_mapping={
        aten.convolution_backward: conv_backward_flops,
        aten._scaled_dot_product_flash_attention_for_cpu: cpu_attention_flops,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: cpu_attention_backward_flops,
    })


Step = Callable[[int, Callable[[], Any]], None]  # step(batch, amp): one call of the work


def _amp(precision: str) -> Callable[[], Any]:
    if precision == "bf16":
        return lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    return nullcontext


@dataclass
class Part:
    """A piece of a rule's work, `step(batch, amp)`, run on fake tensors: `runs` times per image,
    with `batch_factor` samples per call per image of the configured batch (CFG doubles it).
    `amp()` is the autocast the step puts around its forward: bf16 for precision "bf16"."""

    name: str
    world: FakeWorld
    step: Step
    precision: str  # bf16 | fp32
    runs: float = 1.0
    batch_factor: int = 1
    flops: dict[str, float] = field(default_factory=dict)  # one call at batch 1, by class
    _peaks: dict[int, float] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        counter = flop_counter()
        live = LiveBytes()
        with self.world.mode, counter, live:
            self.step(1, _amp(self.precision))
        self._peaks[1] = float(live.peak)
        counts = counter.get_flop_counts().get("Global", {})
        total = float(sum(counts.values()))
        if self.precision == "bf16":
            self.flops = {"bf16": total}
        else:
            conv = float(sum(v for op, v in counts.items()
                             if any(c in str(op) for c in CONV_OPS)))
            self.flops = {"tf32": conv, "fp32": total - conv}

    def peak_live(self, batch: int) -> float:
        """Peak bytes of the tensors the step makes (activations, gradients, temporaries; not
        the weights) at `batch` images, i.e. `batch * batch_factor` samples per call."""
        n = batch * self.batch_factor
        if n not in self._peaks:
            live = LiveBytes()
            with self.world.mode, live:
                self.step(n, _amp(self.precision))
            self._peaks[n] = float(live.peak)
        return self._peaks[n]

    def act_per_image(self, batch: int) -> float:
        """Activation bytes per image: the growth of the peak from 1 image to `batch` (to 2
        when `batch` is 1)."""
        b = max(2, batch)
        return max(0.0, (self.peak_live(b) - self.peak_live(1)) / (b - 1))


def _runs(part: Part, runs: float) -> Part:
    """The same measured part, run `runs` times per image."""
    other = copy.copy(part)
    other.runs = runs
    return other


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())  # parameters() lists a shared one once


# ---------------------------------------------------------------- the rules' work

@dataclass
class RuleWork:
    """What a rule does to one image and what it holds in GPU memory besides activations."""

    parts: list[Part]
    weights: int  # parameters resident on the GPU (fp32)
    trainable: int = 0  # parameters with AdamW state and, under DDP, gradient buckets
    ema: int = 0  # parameters with an fp32 EMA copy

    def flops(self) -> dict[str, float]:
        """FLOPs per image by precision class."""
        out: dict[str, float] = {}
        for p in self.parts:
            for k, v in p.flops.items():
                out[k] = out.get(k, 0.0) + v * p.runs
        return out

    def peak_live(self, batch: int) -> float:
        return max(p.peak_live(batch) for p in self.parts)

    def act_per_image(self, batch: int) -> float:
        return max(p.act_per_image(batch) for p in self.parts)


def _plan_config(cfg: dict) -> dict:
    """The config with every weight source replaced by random weights: nothing is downloaded
    or read, and the shapes are the configured ones."""
    cfg = copy.deepcopy(cfg)
    ae = cfg["autoencoder"]
    ae["teacher"]["weights"] = "random"
    ae["lpips"]["weights"] = "random"
    ae.pop("pretrained", None)
    return cfg


def _inception() -> nn.Module:
    """Inception-v3 as torchvision builds it: the same convolutions as torch-fidelity's
    TF-compatible FID network (whose weights are not needed to count its FLOPs)."""
    import torchvision

    return torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False)


def _guided_fraction(steps: int, alpha: float, cfg_scale: float,
                     interval: list[float]) -> float:
    """Share of the sampler's steps that run the conditional and the null class (CFG)."""
    from dinosae.rfm import time_grid

    if cfg_scale == 1.0:
        return 0.0
    lo, hi = interval
    grid = time_grid(steps, alpha).tolist()[:-1]
    return sum(lo <= t <= hi for t in grid) / max(1, len(grid))


@dataclass
class Measured:
    """The rules' work and the sizes the disk estimates need."""

    rules: dict[str, RuleWork]
    grid: tuple[int, int]
    channels: int
    n_stem: int
    n_dec: int
    n_disc: int
    n_dit: int

    @property
    def tokens(self) -> int:
        return self.grid[0] * self.grid[1]


def measure_work(cfg: dict, num_classes: int) -> Measured:
    """Each computing rule's RuleWork at the configured sizes (see the module doc); measured
    once per model configuration and process."""
    key = json.dumps({s: cfg.get(s) for s in SECTIONS}, sort_keys=True)
    return _measure_work(key, num_classes)


@lru_cache(maxsize=4)
def _measure_work(key: str, num_classes: int) -> Measured:
    cfg = _plan_config(json.loads(key))
    nets = _AENets.build(cfg)
    work = _ae_stage_work(nets)
    inference, dec = _inference_work(nets)
    work.update(inference)
    dit_work, n_dit = _dit_work(nets, num_classes, dec)
    work.update(dit_work)
    return Measured(work, tuple(nets.ae.grid), nets.channels, nets.n_stem, nets.n_dec,
                    nets.n_disc, n_dit)


@dataclass
class _AENets:
    """The autoencoder rules' networks as they build them, on fake tensors, and their sizes."""

    cfg: dict
    world: FakeWorld
    ae: nn.Module
    lpips: nn.Module
    disc: nn.Module

    @classmethod
    def build(cls, cfg: dict) -> _AENets:
        from dinosae.models.autoencoder import build_autoencoder
        from dinosae.models.discriminator import build_discriminator
        from dinosae.models.perceptual import build_lpips

        acfg, world = cfg["autoencoder"], FakeWorld()
        with torch.device("meta"):
            ae = build_autoencoder(cfg)
            lpips = build_lpips(acfg["lpips"]["net"], "random")
            disc = build_discriminator({**acfg["discriminator"], "weights": "random"},
                                       ae.channels)
        return cls(cfg, world, world.module(ae), world.module(lpips), world.module(disc))

    def __post_init__(self) -> None:
        self.size = self.cfg["data"]["image_size"]
        self.tokens, self.channels = self.ae.grid[0] * self.ae.grid[1], self.ae.channels
        self.vit, self.stem, self.decoder = (self.ae.encoder.vit, self.ae.encoder.stem,
                                             self.ae.decoder)
        self.n_vit, self.n_stem, self.n_dec = (n_params(self.vit), n_params(self.stem),
                                               n_params(self.decoder))
        # n_disc: the discriminator's trained heads; n_disc_frozen: its own frozen backbone
        self.n_lpips, self.n_disc = n_params(self.lpips), n_params(self.disc.heads)
        self.n_disc_frozen = n_params(self.disc) - self.n_disc
        self.n_ae = self.n_vit + self.n_stem + self.n_dec

    def for_inference(self) -> None:
        """The AE as the inference rules load it: eval, frozen, no activation checkpointing."""
        self.ae.set_grad_checkpointing(False)
        self.ae.eval().requires_grad_(False)


def _ae_stage_work(n: _AENets) -> dict[str, RuleWork]:
    """The four AE stages (dinosae.train.ae: generator_step, then discriminator_step)."""
    from dinosae.models.discriminator import (
        adaptive_weight,
        d_hinge_loss,
        disc_logits,
        g_hinge_loss,
        quantize,
    )
    from dinosae.train.ae import alignment_loss

    tcfg = n.cfg["ae_train"]
    ae, lpips, disc, stem, decoder = n.ae, n.lpips, n.disc, n.stem, n.decoder
    dcfg, w = n.cfg["autoencoder"]["discriminator"], tcfg["loss"]
    rae = dcfg.get("backbone", "teacher") == "dino_vits8"

    def logits(images: torch.Tensor) -> torch.Tensor:
        return disc_logits(disc, images, dcfg, n.vit)
    T, C, size = n.tokens, n.channels, n.size
    checkpointing = bool(tcfg.get("activation_checkpointing", False))

    def ae_step(b: int, amp: Callable[[], Any], stage: int) -> None:
        ae.set_grad_checkpointing(checkpointing)
        ae.train()
        stem.requires_grad_(stage <= 2)
        decoder.requires_grad_(True)
        for p in (*stem.parameters(), *decoder.parameters(), *disc.heads.parameters()):
            p.grad = None
        x = torch.rand(b, 3, size, size)
        noise = torch.rand(b)[:, None, None] * torch.randn(b, T, C) if stage == 4 else None
        with amp():
            z, rec = ae(x, noise)
            rec_loss = (w["l1"] * (rec.float() - x).abs().mean()
                        + w["lpips"] * lpips(rec.float(), x).mean())
            loss = rec_loss
            if stage <= 2:
                loss = loss + w["align"] * alignment_loss(z, ae.teacher_tokens(x))
            if stage >= 2:
                disc.requires_grad_(False)
                g_gan = g_hinge_loss(logits(rec))
                lam = adaptive_weight(rec_loss, g_gan, decoder.last_layer, w["adaptive_max"])
                loss = loss + w["adv"] * lam * g_gan
        loss.backward()
        del loss, z
        for p in (*stem.parameters(), *decoder.parameters()):
            p.grad = None  # opt.zero_grad(set_to_none=True) before the D step
        if stage >= 2:
            disc.heads.requires_grad_(True)
            fake = quantize(rec.detach()) if rae else rec.detach()
            with amp():
                out = logits(torch.cat([x, fake]))
                d_loss = d_hinge_loss(out[:b], out[b:])
            d_loss.backward()
            disc.requires_grad_(False)
        n.for_inference()

    work = {}
    for stage in (1, 2, 3, 4):
        step = functools.partial(ae_step, stage=stage)
        trainable = n.n_dec + (n.n_stem if stage <= 2 else 0) + (n.n_disc if stage >= 2 else 0)
        work[f"ae_stage{stage}"] = RuleWork(
            [Part("step", n.world, step, "bf16")],
            weights=n.n_ae + n.n_lpips + (n.n_disc + n.n_disc_frozen if stage >= 2 else 0),
            trainable=trainable, ema=n.n_stem + n.n_dec)
    return work


def _inference_work(n: _AENets) -> tuple[dict[str, RuleWork], Part]:
    """encode_part, eval_recon, fid_reference and fid, fp32 (the code runs them without
    autocast); and the decode part, which `sample` shares."""
    ae, size, world = n.ae, n.size, n.world

    def encode(b: int, amp: Callable[[], Any]) -> None:
        with torch.no_grad():
            ae.encode(torch.rand(b, 3, size, size))

    def decode(b: int, amp: Callable[[], Any]) -> None:
        with torch.no_grad():
            ae.decode(torch.randn(b, n.tokens, n.channels))

    def perceptual(b: int, amp: Callable[[], Any]) -> None:
        with torch.no_grad():
            n.lpips(torch.rand(b, 3, size, size), torch.rand(b, 3, size, size))

    if n.cfg["eval"]["extractor"] == "inception":
        with torch.device("meta"):
            inception = world.module(_inception().eval())
        n_ext, ext_own = n_params(inception), True

        def extract(b: int, amp: Callable[[], Any]) -> None:
            with torch.no_grad():  # torch-fidelity resizes every image to 299 px
                inception(torch.rand(b, 3, 299, 299))
    else:  # the teacher's pooled features (dinosae.evaluate.TeacherFeatures)
        n_ext, ext_own = n.n_vit, False

        def extract(b: int, amp: Callable[[], Any]) -> None:
            with torch.no_grad():
                n.vit.forward_head(n.vit.forward_features(torch.rand(b, 3, size, size)),
                                   pre_logits=True)

    n.for_inference()
    flip = 2.0 if n.cfg["latents"].get("flip", False) else 1.0
    enc = Part("encode", world, encode, "fp32", runs=flip)
    dec = Part("decode", world, decode, "fp32")
    ext = Part("extract", world, extract, "fp32")
    work = {
        "encode_part": RuleWork([enc], weights=n.n_ae),
        "eval_recon": RuleWork(
            [_runs(enc, 1.0), dec, Part("lpips", world, perceptual, "fp32"),
             _runs(ext, 2.0)],  # features of the real and the reconstructed images
            weights=n.n_ae + n.n_lpips + (n_ext if ext_own else 0)),
        "fid_reference": RuleWork([ext], weights=n_ext),
        "fid": RuleWork([ext], weights=n_ext),
    }
    return work, dec


def sampling_precision(precision: str | None) -> str:
    """The precision class of the sampler's DiT forwards on a GPU (`sample.precision`,
    `dit.eval_precision`): bf16 autocast for bf16; else fp32 (the paper config's samples, as
    RAE recommends), whose matmuls run on the fp32 CUDA cores (dinosae.generate.sampling_bf16;
    TF32 stays off for matmuls)."""
    return "bf16" if precision == "bf16" else "fp32"


def _dit_work(n: _AENets, num_classes: int, dec: Part) -> tuple[dict[str, RuleWork], int]:
    """train_dit (dinosae.train.dit.train_step), sample (the sampler's forwards at
    `sample.precision`, then the decode) and gfid_proxy (the same at `dit.eval_precision`: not a
    rule, the DiT's gFID proxy); and the DiT's parameter count."""
    from dinosae import rfm, sphere
    from dinosae.models.dit import build_dit, switches_of

    dcfg, sc = n.cfg["dit"], n.cfg["sample"]
    T, C = n.tokens, n.channels
    r, alpha = math.sqrt(C), rfm.alpha_for(T, C)
    path = dcfg["path"]
    with torch.device("meta"):
        dit = build_dit(dcfg["model"], T, C, num_classes, n.ae.grid, dcfg["head"],
                        **switches_of(dcfg))
    dit = n.world.module(dit)
    n_dit = n_params(dit)

    def dit_step(b: int, amp: Callable[[], Any]) -> None:
        dit.train().requires_grad_(True)
        for p in dit.parameters():
            p.grad = None
        z0 = sphere.project(torch.randn(b, T, C), r)
        z1 = rfm.noise((b, T, C), r, path)
        t = rfm.sample_time(b, alpha)
        y = torch.randint(0, num_classes + 1, (b,))
        with amp():
            out = dit(rfm.interpolate(z0, z1, t, r, path), t, y)
        loss, _ = rfm.flow_loss(out, z0, z1, t, r, path, dcfg["lambda_rad"])
        loss.backward()
        dit.eval().requires_grad_(False)

    def dit_forward(b: int, amp: Callable[[], Any]) -> None:
        with torch.no_grad(), amp():
            dit(torch.randn(b, T, C), torch.rand(b), torch.randint(0, num_classes + 1, (b,)))

    guided = _guided_fraction(sc["steps"], alpha, sc["cfg_scale"], sc["guidance_interval"])
    work = {"train_dit": RuleWork([Part("step", n.world, dit_step, "bf16")],
                                  weights=n_dit, trainable=n_dit, ema=n_dit)}
    dit.eval().requires_grad_(False)

    def sampler(precision: str) -> RuleWork:  # the sampler's forwards, then the decode
        return RuleWork([Part("dit", n.world, dit_forward, precision,
                              runs=sc["steps"] * (1.0 + guided), batch_factor=2 if guided else 1),
                         dec], weights=n_dit + n.n_ae)

    work["sample"] = sampler(sampling_precision(sc.get("precision")))
    proxy = sampling_precision(dcfg.get("eval_precision", "bf16"))  # the gFID proxy's sampler
    work["gfid_proxy"] = (work["sample"] if proxy == work["sample"].parts[0].precision
                          else sampler(proxy))
    return work, n_dit
