"""Use a trained DINO-SAE outside the pipeline: encode images, decode latents, sample a DiT.

    import dinosae, torch
    ae = dinosae.load_autoencoder("exports/ae", device="cuda", dtype=torch.bfloat16)
    enc = ae.encode(images)             # (B, 3, H, W) floats in [0, 1], or uint8 (B, H, W, 3)
    enc.tokens, enc.norms               # (B, T, C) unit-norm tokens, (B, T) their raw norms
    x = ae.decode(enc.tokens, radius=14.0)      # (B, 3, H, W) in [0, 1]; radius=enc.norms: exact
    gen = dinosae.load_generator("exports/dit")
    x = gen.sample([207, 360], steps=50, cfg_scale=1.5,
                   generator=torch.Generator().manual_seed(0))

A path is an export folder (`dinosae export-model`), a dinosae checkpoint (.pt, loaded with
weights_only=True), or `hf-hub:<owner>/<name>[/<folder>]` holding an export. Models load in eval
mode, without gradients, on the device and in the dtype asked for; inputs may live on any device
and are processed in batches; outputs are float32 on the input's device (CPU for numpy input).
Encoding and decoding are the autoencoder's own `encode_unit` and `decode_at`, the very calls
the latent cache, the sampler and the DiT's grids make: tokens are rescaled to `radius` along
C, then decoded.

    dinosae generate --model EXPORT_OR_CHECKPOINT --classes 207,360 --seeds 0-7 --out grid.png
                     [--out samples.npz] [--steps 50 --cfg-scale 1.5 --s-vae 14 --ae AE ...]

(`generate_images`, at the end) is this API from the shell: one row per class, one column per
seed (sample (class, seed) starts from the noise of torch.Generator().manual_seed(seed), as
Generator.sample(seeds=...) draws it), or an ADM-style npz (arr_0 uint8 NHWC, arr_1 labels,
arr_2 seeds).
"""

from __future__ import annotations

import logging
import math
import re
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from dinosae.errors import ConfigError

__all__ = ["Autoencoder", "Encoded", "Generator", "load_autoencoder", "load_generator"]

log = logging.getLogger("dinosae.generate")  # `dinosae generate` logs under its old name


class Encoded(NamedTuple):
    tokens: Tensor  # (B, T, C) float32, unit norm along C
    norms: Tensor  # (B, T) float32, the encoder's raw token norms


def _device(device: str | torch.device | None) -> torch.device:
    from dinosae.dist import pick_device

    return torch.device(device) if device is not None else pick_device("auto")


def _dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).replace("torch.", ""), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r} (e.g. torch.float32, 'bfloat16')")
    return value


def _out_device(x: Any) -> torch.device:
    return x.device if isinstance(x, Tensor) else torch.device("cpu")


def _resolve(path: str | Path, kind: str) -> Path:
    from dinosae.importers import resolve_source

    return resolve_source(path, kind)


# ---------------------------------------------------------------- autoencoder

class Autoencoder:
    """A trained DINO-SAE: `encode` images to unit-norm tokens, `decode` tokens to images."""

    def __init__(self, model: torch.nn.Module, config: dict, device: torch.device,
                 dtype: torch.dtype) -> None:
        self.model, self.config, self.device, self.dtype = model, config, device, dtype
        self.grid: tuple[int, int] = tuple(model.grid)
        self.channels: int = int(model.channels)
        self.image_size: int = int(config["data"]["image_size"])

    @property
    def tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    def __repr__(self) -> str:
        return (f"Autoencoder({self.image_size}px -> {self.grid[0]}x{self.grid[1]} tokens x "
                f"{self.channels}, {self.device}, {self.dtype})")

    def _images(self, images: Any) -> Tensor:
        """(B, 3, H, W) floats in [0, 1] (or uint8 0..255), or uint8/float (B, H, W, 3)."""
        x = torch.as_tensor(images) if not isinstance(images, Tensor) else images
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4:
            raise ValueError(f"images: expected (B, 3, H, W) or (B, H, W, 3), got {tuple(x.shape)}")
        if x.shape[1] != 3 and x.shape[-1] == 3:
            x = x.permute(0, 3, 1, 2)
        if x.shape[1] != 3:
            raise ValueError(f"images: no RGB channel axis in shape {tuple(x.shape)}")
        if x.shape[-1] % 16 or x.shape[-2] % 16:
            raise ValueError(f"images: height and width must be multiples of 16 (the stem's "
                             f"patch), got {tuple(x.shape[-2:])}")
        return x

    @torch.no_grad()
    def encode(self, images: Any, batch_size: int = 64) -> Encoded:
        """Images -> Encoded(tokens (B, T, C) unit-norm, norms (B, T)), row-major token grid."""
        x = self._images(images)
        out = _out_device(images)
        tokens, norms = [], []
        for i in range(0, len(x), batch_size):
            b = x[i:i + batch_size].to(self.device)
            b = b.float().div_(255.0) if b.dtype == torch.uint8 else b.float()
            z, n = self.model.encode_unit(b.to(self.dtype))  # (B, T, C), (B, T)
            tokens.append(z.to(out))
            norms.append(n.to(out))
        return Encoded(torch.cat(tokens), torch.cat(norms))

    @torch.no_grad()
    def decode(self, tokens: Any, radius: float | Tensor | None, batch_size: int = 64,
               clamp: bool = True) -> Tensor:
        """Tokens (B, T, C) or (B, h, w, C) -> images (B, 3, H, W) float32, in [0, 1] with
        `clamp`. `radius`: each token is rescaled to this norm first -- a number (the decode
        radius s_vae, paper: 14), per-token norms (B, T) (e.g. Encoded.norms: the exact
        encoder output), or None to decode the tokens as they are."""
        z = torch.as_tensor(tokens) if not isinstance(tokens, Tensor) else tokens
        out = _out_device(tokens)
        if z.ndim == 4:
            z = z.flatten(1, 2)
        if z.ndim != 3 or z.shape[1:] != (self.tokens, self.channels):
            raise ValueError(f"tokens: expected (B, {self.tokens}, {self.channels}) (a "
                             f"{self.grid[0]}x{self.grid[1]} grid), got {tuple(z.shape)}")
        r = radius
        if isinstance(r, (Tensor, np.ndarray)):
            r = torch.as_tensor(r, dtype=torch.float32)
            if r.ndim == 2:
                r = r.unsqueeze(-1)  # (B, T, 1)
        images = []
        for i in range(0, len(z), batch_size):
            b = z[i:i + batch_size].to(self.device)
            rb = r
            if isinstance(r, Tensor) and r.ndim:
                rb = r[i:i + batch_size].to(self.device)
            elif r is not None:
                rb = float(r)
            x = self.model.decode_at(b, rb)
            images.append((x.clamp(0, 1) if clamp else x).to(out))
        return torch.cat(images)


def load_autoencoder(path: str | Path, device: str | torch.device | None = None,
                     dtype: torch.dtype | str = torch.float32) -> Autoencoder:
    """A trained autoencoder from an export folder, a dinosae AE checkpoint or an hf-hub export,
    in eval mode without gradients, on `device` (default: CUDA if available) in `dtype`."""
    from dinosae.checkpoint import AE_KIND, read_checkpoint
    from dinosae.export import is_export, read_export
    from dinosae.models.autoencoder import DinoSAE

    path = _resolve(path, "ae")
    doc: dict = {}
    if is_export(path):
        doc, state = read_export(path)
        if doc["kind"] != AE_KIND:
            raise ConfigError(f"{path}: an exported {doc['kind']}, not an autoencoder")
        ck = {"config": doc["config"], "ema": state}
    else:
        ck = read_checkpoint(path, AE_KIND, hint="; released weights go through `dinosae "
                             "import-ae` first")
    config = ck["config"]
    device, dtype = _device(device), _dtype(dtype)
    model = DinoSAE.from_checkpoint(ck, str(path))
    if is_export(path):
        for key, have in (("grid", list(model.grid)), ("channels", int(model.channels))):
            if key in doc and doc[key] != have:  # config.json's summary must be the model's
                raise ConfigError(f"{path}/config.json: '{key}' is {doc[key]!r:.40}, but its "
                                  f"weights and config give {have}")
    model.requires_grad_(False).eval().to(device=device, dtype=dtype)
    return Autoencoder(model, config, device, dtype)


# ---------------------------------------------------------------- generator

class Generator:
    """A trained RFM DiT plus the autoencoder that decodes its samples."""

    def __init__(self, model: torch.nn.Module, meta: dict, autoencoder: Autoencoder | None,
                 device: torch.device, dtype: torch.dtype,
                 decode_radius: float | None = None) -> None:
        self.model, self.meta, self.autoencoder = model, meta, autoencoder
        self.device, self.dtype = device, dtype
        self.num_classes: int = int(meta["num_classes"])
        self.tokens: int = int(meta["tokens"])
        self.channels: int = int(meta["channels"])
        self.grid = tuple(meta["grid"])
        self.radius: float = float(meta["radius"])  # where the flow runs (sqrt(C))
        self.alpha: float = float(meta["alpha"])
        self.path: str = meta["dit"]["path"]
        self.decode_radius = decode_radius if decode_radius is not None else meta.get("mean_norm")

    def __repr__(self) -> str:
        return (f"Generator({self.meta['dit']['model']}, {self.num_classes} classes, "
                f"{self.tokens} tokens x {self.channels}, {self.device}, {self.dtype})")

    def _net(self, z: Tensor, t: Tensor, y: Tensor) -> Tensor:
        if self.dtype == torch.float32:
            return self.model(z, t, y).float()
        with warnings.catch_warnings():  # fp32 qk-norm input, low-precision weight: intended
            warnings.filterwarnings("ignore", message="Mismatch dtype between input and weight")
            return self.model(z.to(self.dtype), t, y).float()

    @torch.no_grad()
    def sample_tokens(self, labels: Any, steps: int = 50, cfg_scale: float = 1.0,
                      generator: torch.Generator | None = None, *, seeds: Any = None,
                      guidance_interval: tuple[float, float] = (0.0, 1.0),
                      batch_size: int | None = None,
                      integrator: str = "euler_project") -> Tensor:
        """Class-conditional samples as tokens (B, T, C) float32 on the flow's radius sqrt(C).
        Noise from `generator`, or with `seeds` per sample exactly as `dinosae sample` draws it
        (sample i from torch.Generator().manual_seed(seeds[i])). `steps` as the generator's
        own code counts them (an imported generator: see dinosae.models.dit.CONVENTIONS);
        `integrator`: euler_project | expmap (the sphere path)."""
        from dinosae import rfm
        from dinosae.generate import sampler_settings, start_noise

        y = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            raise ValueError(f"labels must lie in [0, {self.num_classes})")
        shape = (self.tokens, self.channels)
        if seeds is not None:
            seeds = np.asarray(seeds, dtype=np.int64).reshape(-1)
            if len(seeds) != len(y):
                raise ValueError(f"{len(seeds)} seeds for {len(y)} labels")
        bs = batch_size or max(1, len(y))
        out = []
        for i in range(0, len(y), bs):
            yb = y[i:i + bs].to(self.device)
            z1 = None if seeds is None else start_noise(seeds[i:i + bs], shape, self.radius,
                                                       self.path)
            out.append(rfm.sample(_Wrapped(self), yb, cfg_scale=cfg_scale, r=self.radius,
                                  alpha=self.alpha, generator=generator, shape=shape, z1=z1,
                                  guidance_interval=tuple(guidance_interval),
                                  **sampler_settings(self.meta, steps, integrator)))
        return torch.cat(out).cpu() if out else torch.empty(0, *shape)

    @torch.no_grad()
    def sample(self, labels: Any, steps: int = 50, cfg_scale: float = 1.0,
               generator: torch.Generator | None = None, *, seeds: Any = None,
               guidance_interval: tuple[float, float] = (0.0, 1.0), radius: float | None = None,
               batch_size: int | None = None, clamp: bool = True,
               integrator: str = "euler_project") -> Tensor:
        """Class-conditional images (B, 3, H, W) float32 on the CPU, in [0, 1] with `clamp`:
        sample_tokens, then decoded at `radius` (default: the decode radius recorded with the
        generator, i.e. the latent cache's mean token norm, or give s_vae, paper: 14)."""
        if self.autoencoder is None:
            raise ConfigError("this generator has no autoencoder to decode with: pass "
                              "autoencoder= to load_generator, or use sample_tokens()")
        r = radius if radius is not None else self.decode_radius
        if r is None:
            raise ValueError("no decode radius recorded with this generator: give radius=")
        z = self.sample_tokens(labels, steps, cfg_scale, generator, seeds=seeds,
                               guidance_interval=guidance_interval, batch_size=batch_size,
                               integrator=integrator)
        return self.autoencoder.decode(z, radius=float(r), clamp=clamp,
                                       batch_size=batch_size or 64)


class _Wrapped:
    """The DiT as rfm.sample calls it: fp32 tokens in, fp32 velocity out, whatever the model's
    dtype; exposes num_classes (the null class) for guidance."""

    def __init__(self, gen: Generator) -> None:
        self.gen, self.num_classes = gen, gen.num_classes

    def __call__(self, z: Tensor, t: Tensor, y: Tensor) -> Tensor:
        return self.gen._net(z, t, y)


def load_generator(path: str | Path, device: str | torch.device | None = None,
                   dtype: torch.dtype | str = torch.float32,
                   autoencoder: Autoencoder | str | Path | None = None) -> Generator:
    """A trained DiT from an export folder, a dinosae DiT checkpoint or an hf-hub export, in
    eval mode without gradients, on `device` in `dtype`. Its decoder: `autoencoder` (a loaded
    Autoencoder or a path), else the export's bundled autoencoder/, else the AE checkpoint the
    DiT was trained with (if that file exists), else none (sample_tokens only)."""
    from dinosae.export import AE_DIR, DIT_KIND, bundled_dir, is_export, read_export
    from dinosae.models.dit import dit_from_checkpoint, for_sampling

    path = _resolve(path, "dit")
    decode_radius = None
    if is_export(path):
        doc, state = read_export(path)
        if doc["kind"] != DIT_KIND:
            raise ConfigError(f"{path}: an exported {doc['kind']}, not a generator")
        meta, decode_radius = doc["config"], doc.get("decode_radius")
        bundled = bundled_dir(path, doc["autoencoder"]) if doc.get("autoencoder") else None
    else:
        from dinosae.checkpoint import read_checkpoint

        ck = read_checkpoint(path, DIT_KIND)
        meta, state = ck["config"], ck["ema"]
        bundled = Path(ck["ae"]) if ck.get("ae") and Path(ck["ae"]).is_file() else None
    if bundled is None and is_export(path) and is_export(path / AE_DIR):
        bundled = path / AE_DIR
    device, dtype = _device(device), _dtype(dtype)
    model = dit_from_checkpoint({"config": meta, "ema": state}, str(path))
    model.requires_grad_(False).eval().to(device=device, dtype=dtype)
    model = for_sampling(model, meta)  # an imported generator in dinosae's time convention
    if autoencoder is None and bundled is not None:
        autoencoder = bundled
    if autoencoder is not None and not isinstance(autoencoder, Autoencoder):
        autoencoder = load_autoencoder(autoencoder, device=device, dtype=dtype)
    if autoencoder is not None and (list(autoencoder.grid) != list(meta["grid"])
                                    or autoencoder.channels != int(meta["channels"])):
        raise ConfigError(f"{path}: a generator of {meta['grid']} x {meta['channels']} tokens, "
                          f"but its autoencoder gives {list(autoencoder.grid)} x "
                          f"{autoencoder.channels}")
    return Generator(model, meta, autoencoder, device, dtype, decode_radius)


# ---------------------------------------------------------------- dinosae generate (the shell's)

MAX_GENERATE = 100_000  # images one `dinosae generate` makes (classes x seeds)


def parse_ints(text: str, what: str, limit: int = MAX_GENERATE) -> list[int]:
    """"207,360" or "0-7" or "0-3,9" -> a list of non-negative ints (ranges inclusive), at most
    `limit` of them: counted from the ranges before any list is built."""
    parts: list[tuple[int, int]] = []
    for part in str(text)[:10_000].split(","):
        m = re.fullmatch(r"(\d{1,18})(?:-(\d{1,18}))?", part.strip())
        if not m or (m[2] is not None and int(m[2]) < int(m[1])):
            raise ConfigError(f"--{what}: {part.strip()[:40]!r} is not a number or a range a-b "
                              "(e.g. 207,360 or 0-7)")
        parts.append((int(m[1]), int(m[2] or m[1])))
    count = sum(hi - lo + 1 for lo, hi in parts)
    if count > limit:
        raise ConfigError(f"--{what} {str(text)[:60]!r}: {count} values, more than {limit}")
    return [i for lo, hi in parts for i in range(lo, hi + 1)]


def _finite(value: float | None, flag: str, low: float | None = None,
            high: float | None = None, above: float | None = None) -> None:
    """Refuse a non-finite or out-of-range number given as `flag`."""
    if value is None:
        return
    if not math.isfinite(value) or (low is not None and value < low) or (
            high is not None and value > high) or (above is not None and value <= above):
        where = " ".join(w for w in (f">= {low}" if low is not None else "",
                                     f"> {above}" if above is not None else "",
                                     f"<= {high}" if high is not None else "") if w)
        raise ConfigError(f"{flag} {value}: expected a finite number {where}".rstrip())


def generate_images(cfg: dict, model: str, classes: str, out: str, seeds: str = "0-7",
                    steps: int = 50, cfg_scale: float = 1.0, interval: str = "0,1",
                    s_vae: float | None = None, integrator: str = "euler_project",
                    ae: str | None = None, batch_size: int = 16, device: str = "auto",
                    force: bool = False) -> Path:
    """Samples of the given classes x seeds from a generator (an export folder, a DiT checkpoint
    or hf-hub:...), decoded by its bundled or recorded autoencoder (or `ae`) at radius `s_vae`
    (default: the radius recorded with the generator) -> `out`: a .png grid (a row per class,
    a column per seed) or an .npz (arr_0 uint8 NHWC, arr_1 labels, arr_2 seeds). An existing
    `out` is replaced only with `force`. `cfg` is not used."""
    from dinosae.dist import check_device
    from dinosae.errors import NumericsError
    from dinosae.files import atomic_path
    from dinosae.generate import to_uint8
    from dinosae.images import save_grid
    from dinosae.outputs import claim_file, mark_zip, png_ours, zip_ours
    from dinosae.progress import Progress

    out = Path(out)
    if out.suffix not in (".png", ".npz"):
        raise ConfigError(f"--out {out}: give a .png (image grid) or .npz (arrays) file name")
    claim_file({out: png_ours if out.suffix == ".png" else zip_ours}, "generate", force=force,
               inputs=[model, ae])
    labels_, seeds_ = parse_ints(classes, "classes"), parse_ints(seeds, "seeds")
    if len(labels_) * len(seeds_) > MAX_GENERATE:
        raise ConfigError(f"--classes x --seeds: {len(labels_) * len(seeds_)} images, more "
                          f"than {MAX_GENERATE}")
    try:
        lo, hi = (float(v) for v in interval.split(","))
    except ValueError:
        raise ConfigError(f"--interval {interval!r}: expected lo,hi (e.g. 0,1)") from None
    _finite(lo, "--interval lo", low=0.0, high=1.0)
    _finite(hi, "--interval hi", low=lo, high=1.0)
    _finite(cfg_scale, "--cfg-scale", low=0.0)
    _finite(s_vae, "--s-vae", above=0.0)
    _finite(steps, "--steps", low=1, high=100_000)
    _finite(batch_size, "--batch-size", low=1, high=1_000_000)
    check_device(device)
    gen = load_generator(model, device=None if device == "auto" else device, autoencoder=ae)
    bad = [c for c in labels_ if not 0 <= c < gen.num_classes]
    if bad:
        raise ConfigError(f"--classes {bad}: the generator has classes 0..{gen.num_classes - 1}")
    if gen.autoencoder is None:
        raise ConfigError(f"{model}: no autoencoder bundled or recorded with this generator: "
                          "give --ae (a dinosae AE checkpoint or export)")
    radius = s_vae if s_vae is not None else gen.decode_radius
    if radius is None:
        raise ConfigError(f"{model}: no decode radius recorded with this generator: give "
                          "--s-vae (paper: 14)")
    labels = np.repeat(np.asarray(labels_, dtype=np.int64), len(seeds_))  # a row per class
    seeds_all = np.tile(np.asarray(seeds_, dtype=np.int64), len(labels_))
    n, images = len(labels), []
    progress = Progress(n, desc="generate", unit="img")
    for i in range(0, n, batch_size):
        x = gen.sample(labels[i:i + batch_size], steps=steps, cfg_scale=cfg_scale,
                       seeds=seeds_all[i:i + batch_size], guidance_interval=(lo, hi),
                       radius=float(radius), integrator=integrator)
        if not torch.isfinite(x).all():
            raise NumericsError(f"samples {i}..{i + len(x) - 1} are not finite ({model})")
        images.append(x)
        progress.update(len(x))
    progress.close()
    images = torch.cat(images)
    if out.suffix == ".png":
        out.parent.mkdir(parents=True, exist_ok=True)
        save_grid(images, out, nrow=len(seeds_))
    else:
        with atomic_path(out, suffix=".npz") as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, arr_0=to_uint8(images), arr_1=labels, arr_2=seeds_all)
            mark_zip(tmp)
    log.info("%d samples (classes %s, seeds %s, %d steps, cfg %.2f, s_vae %.3f, %s) -> %s",
             n, labels_, seeds_, steps, cfg_scale, float(radius), integrator, out)
    return out
