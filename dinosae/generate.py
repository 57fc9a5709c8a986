"""Samples from a generator, decoded by the AE decoder, class-balanced into one HDF5 file (rule
`sample`); `dinosae generate` (a few chosen classes and seeds into a PNG grid or an npz) is the
public API's `generate_images`, in `api.py`.

    samples.h5   images uint8 (N, H, W, 3), labels int64 (N,), seeds int64 (N,); attributes:
                 checkpoints used (with sha256), steps, cfg_scale, guidance_interval, s_vae, ...
    samples.png  a grid: a few classes (rows) x a few samples
    samples.npz  optional ADM-style export (arr_0 uint8 NHWC, arr_1 labels), sample.export_npz

Sample i is label i mod K (K = the generator's classes, so every prefix is balanced) and starts from
noise drawn with its own generator, torch.Generator().manual_seed(seeds[i]) on the CPU: its image
depends only on its seed, whatever else shares its batch. The file is written one batch at a
time under a temporary name (`<out>.partial`) with a `done` counter; a killed job rerun with the
same settings continues after the last finished batch, and the file is renamed when complete.
With sample.parts = K > 1 the work is K jobs (`dinosae sample --part i/K`, rule sample_part):
part i draws whole batches of the one-job run (part_ranges) into a part file of its own (same
settings, plus `part` and `part_range`; resumable as above), and `dinosae sample-gather`
(gather_parts, rule sample_gather) checks every part and joins them into the samples.h5 one
job writes, datasets and attributes equal: nothing in it records K.
The latent cache, when given, is checked to be the one the generator was trained on and gives
the class names and, with sample.s_vae null, the decode radius; an imported generator needs none.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dinosae.dist import pick_device
from dinosae.errors import CheckpointError, ConfigError, DataError, NumericsError
from dinosae.faults import fault_point
from dinosae.files import sha256_file
from dinosae.images import save_grid
from dinosae.outputs import mark_zip
from dinosae.progress import Progress
from dinosae.signals import StopFlag

log = logging.getLogger("dinosae.generate")

FORMAT = "dinosae-samples"
PART_FORMAT = "dinosae-samples-part"  # one part of a samples.h5 (dinosae sample --part i/K)
PART_KEYS = ("part", "part_range")  # the attributes a part adds to samples.h5's
VERSION = 1
SEED_STRIDE = 1 << 32  # seeds[i] = seed * 2^32 + i: distinct across config seeds and samples
LABEL_SCHEME = "class-balanced: label i = i mod K"


def part_ranges(n: int, batch_size: int, parts: int) -> list[tuple[int, int]]:
    """Part i's samples [lo, hi) of `parts`: whole batches of `batch_size` (the batches one job
    draws, so a part computes exactly what that job computes), as even as batches go."""
    batches = -(-n // batch_size)
    if not 1 <= parts <= batches:
        raise ConfigError(f"config: 'sample.parts' (--part i/K) is {parts}: at least 1 and at "
                          f"most the {batches} batches of sample.batch_size {batch_size} in "
                          f"sample.num_samples {n}")
    edges = [min(batches * i // parts * batch_size, n) for i in range(parts + 1)]
    return list(zip(edges[:-1], edges[1:], strict=True))


def sampling_bf16(precision: str, device: torch.device) -> bool:
    """sample.precision: "fp32" (RAE's README recommends fp32 sampling "when model FID is low")
    or "bf16" (the DiT under bf16 autocast, LightningDiT's inference default; CUDA only:
    elsewhere fp32)."""
    if precision not in ("fp32", "bf16"):
        raise ConfigError(f"config: 'sample.precision' must be fp32 or bf16, not {precision!r}")
    return precision == "bf16" and device.type == "cuda"


def balanced_labels(n: int, num_classes: int) -> np.ndarray:
    """Label i = i mod K: class counts differ by at most one, in every prefix too."""
    return (np.arange(n, dtype=np.int64) % num_classes).astype(np.int64)


def sample_seeds(n: int, seed: int) -> np.ndarray:
    return np.int64(seed) * np.int64(SEED_STRIDE) + np.arange(n, dtype=np.int64)


def generator_seed(seed: int) -> int:
    """A 64-bit sample seed as the 32 bits torch's CPU generator keeps (it drops the high ones,
    so seed * 2^32 + i would be i whatever the config seed): the high half, mixed, XORed into
    the low one. Seeds below 2^32 are unchanged; for one config seed, distinct i stay distinct."""
    return (seed ^ ((seed >> 32) * 0x9E3779B1)) & 0xFFFFFFFF


def start_noise(seeds: np.ndarray, shape: tuple[int, int], r: float, path: str) -> torch.Tensor:
    """z1 for a batch: sample i's noise from its own CPU generator seeded with seeds[i]
    (generator_seed)."""
    from dinosae import rfm

    out = []
    for s in seeds.tolist():
        g = torch.Generator().manual_seed(generator_seed(int(s)))
        out.append(rfm.noise((1, *shape), r, path, generator=g))
    return torch.cat(out)


def sampler_settings(meta: dict, steps: int, integrator: str = "euler_project") -> dict:
    """rfm.sample's keyword arguments (steps, path, t_end, cfg_channels, integrator) that make
    this generator sample as its own code does: `steps` counted as that code counts them (RAE's
    and SiT's num_steps are grid points, one more than the Euler steps)."""
    from dinosae.models.dit import convention_of

    conv = convention_of(meta)
    n = int(steps) - 1 if conv["grid_points"] else int(steps)
    if n < 1:
        raise ConfigError(f"sample.steps: {steps} is too few for a generator of the "
                          f"{conv['name']!r} convention (its steps count grid points: >= 2)")
    return {"steps": n, "path": meta["dit"]["path"], "t_end": conv["t_end"],
            "cfg_channels": conv["cfg_channels"], "integrator": integrator}


def decoded_samples(model: torch.nn.Module, autoencoder: Any, meta: dict, sc: dict,
                    labels: np.ndarray, seeds: np.ndarray, s_vae: float, device: torch.device,
                    what: str = "samples") -> np.ndarray:
    """One batch of samples as uint8 (B, H, W, 3): sample i starts from seeds[i]'s noise
    (start_noise) with class labels[i], runs the sampler of the `sample` section `sc` (steps,
    cfg_scale, guidance_interval, integrator) in the generator's convention (meta), and is
    decoded at radius s_vae. Non-finite images stop with NumericsError naming `what`. The one
    path from seeds to images: `dinosae sample` and the DiT's gFID proxy both call it."""
    from dinosae.rfm import sample

    kw = sampler_settings(meta, int(sc["steps"]), sc.get("integrator", "euler_project"))
    shape = (int(meta["tokens"]), int(meta["channels"]))
    z1 = start_noise(seeds, shape, float(meta["radius"]), kw["path"])
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64)).to(device)
    z = sample(model, y, cfg_scale=float(sc["cfg_scale"]), r=float(meta["radius"]),
               alpha=float(meta["alpha"]), shape=shape,
               guidance_interval=tuple(sc["guidance_interval"]), z1=z1,
               amp=sampling_bf16(sc.get("precision", "fp32"), device), **kw)
    images = autoencoder.decode_at(z, s_vae)  # rescaled to the decode radius s_vae
    if not torch.isfinite(images).all():
        raise NumericsError(f"{what}: not finite; nothing of them was written")
    return to_uint8(images)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) ≈[0, 1] -> uint8 (B, H, W, 3)."""
    x = (images.float().clamp(0, 1) * 255.0).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def decode_radius(cfg_s_vae: float | None, cache_attrs: dict | None) -> float:
    if cfg_s_vae is not None:
        return float(cfg_s_vae)
    if cache_attrs is None:
        raise ConfigError("config: 'sample.s_vae' is null and there is no latent cache to take "
                          "the mean token norm from: set it (paper: 14)")
    if "mean_norm" not in cache_attrs:
        raise ValueError("sample.s_vae is null and the latent cache has no 'mean_norm' attribute")
    return float(cache_attrs["mean_norm"])


def _check_generator_fits(meta: dict, have: dict, dit: str, what: str) -> None:
    """The DiT must have been trained on latents shaped like these (same classes)."""
    wrong = [f"{k} {meta[k]} vs {v}" for k, v in have.items() if int(meta[k]) != v]
    if wrong:
        raise CheckpointError(f"DiT {dit} does not fit {what} ({', '.join(wrong)}): it was "
                              "trained on other latents")


def _open_partial(tmp: Path, settings: dict[str, Any], n: int, hw: tuple[int, int],
                  labels: np.ndarray, seeds: np.ndarray) -> Any:
    """The temporary h5py.File, continued when its settings match, else started anew."""
    import h5py

    if tmp.exists():
        try:
            f = h5py.File(tmp, "r+")
            same = all(_attr_equal(f.attrs.get(k), v) for k, v in settings.items())
            if same and f["images"].shape == (n, *hw, 3):
                log.info("resuming %s at %d/%d samples", tmp, int(f.attrs["done"]), n)
                return f
            f.close()
            log.warning("%s was written with other settings: starting again", tmp)
        except (OSError, KeyError) as e:  # a kill during a write can leave it unreadable
            log.warning("cannot continue %s (%s): starting again", tmp, e)
        tmp.unlink()
    return _new_file(tmp, n, hw, labels, seeds, lambda attrs: attrs.update(settings))


def _new_file(path: Path, n: int, hw: tuple[int, int], labels: np.ndarray, seeds: np.ndarray,
              set_attrs: Any) -> Any:
    """A new samples file (the layout every samples.h5 and part has): images uint8 (n, H, W, 3)
    in one chunk per image, labels, seeds; `set_attrs(f.attrs)` writes the settings; done 0."""
    import h5py

    f = h5py.File(path, "w")
    f.create_dataset("images", shape=(n, *hw, 3), dtype=np.uint8, chunks=(1, *hw, 3))
    f.create_dataset("labels", data=labels)
    f.create_dataset("seeds", data=seeds)
    set_attrs(f.attrs)
    f.attrs["done"] = 0
    f.flush()
    return f


def _attr_equal(a: Any, b: Any) -> bool:
    if a is None:
        return False
    if isinstance(a, bytes):
        a = a.decode()
    return bool(np.array_equal(np.asarray(a), np.asarray(b)))


def _cache_attrs(cache: str, ae: str, meta: dict, dit: str) -> dict:
    """The attributes of the latent cache the generator was trained on, after checking that
    `ae` encoded it and that the generator fits its tokens and classes."""
    from dinosae.latents import open_cache

    attrs = dict(open_cache(cache, expect_encoder=ae).attrs)
    have = {"tokens": int(attrs["grid"][0]) * int(attrs["grid"][1]),
            "channels": int(attrs["channels"]), "num_classes": int(attrs["num_classes"])}
    _check_generator_fits(meta, have, dit, f"the latent cache {cache}")
    return attrs


def claim_outputs(out: Path, export_npz: bool, force: bool, inputs: list) -> None:
    """The single-file rule (dinosae.outputs.claim_file) for samples.h5 and the grid and npz
    beside it; `out` must end in .h5 or .hdf5 so that they are three files."""
    from dinosae.outputs import claim_file, h5_ours, png_ours, zip_ours

    if out.suffix not in (".h5", ".hdf5"):
        raise ConfigError(f"--out {out}: give a .h5 file name (the PNG grid and the npz are "
                          "written beside it under the same name)")
    files = {out: h5_ours(format=FORMAT), out.with_suffix(".png"): png_ours}
    if export_npz:
        files[out.with_suffix(".npz")] = zip_ours
    claim_file(files, "sample", force=force, inputs=inputs)


def claim_part(out: Path, force: bool, inputs: list) -> None:
    """The single-file rule for a part file (an .h5 of its own, nothing beside it)."""
    from dinosae.outputs import claim_file, h5_ours

    if out.suffix not in (".h5", ".hdf5"):
        raise ConfigError(f"--out {out}: give a .h5 file name for the part")
    claim_file({out: h5_ours(format=PART_FORMAT)}, "sample --part", force=force, inputs=inputs)


def sample_to_h5(cfg: dict, dit: str, ae: str, cache: str | None, out: str,
                 force: bool = False, part: tuple[int, int] | None = None) -> None:
    """cfg sample.num_samples class-balanced samples -> `out` (HDF5), `out`.png grid and, with
    sample.export_npz, `out`.npz (ADM format). Sections: seed, device, sample. `cache`: the
    latent cache the generator was trained on, or None (an imported generator).

    `part` = (i, K): only part i of K (part_ranges: whole batches, the ones the one-job run
    makes) into the part file `out`, which `gather_parts` joins with the others into the very
    samples.h5 one job writes; no grid, no npz."""
    from dinosae.models.autoencoder import DinoSAE
    from dinosae.models.dit import load_dit

    sc = cfg["sample"]
    out = Path(out)
    n, bs = int(sc["num_samples"]), int(sc["batch_size"])
    lo, hi = 0, n
    if part is None:
        claim_outputs(out, bool(sc.get("export_npz", False)), force, [dit, ae, cache])
    else:
        lo, hi = part_ranges(n, bs, part[1])[part[0]]
        claim_part(out, force, [dit, ae, cache])
    device = pick_device(cfg.get("device", "auto"))
    model, meta = load_dit(dit, device=str(device))
    autoencoder = DinoSAE.load(ae, device=str(device))
    _check_generator_fits(meta, {"tokens": autoencoder.grid[0] * autoencoder.grid[1],
                                 "channels": autoencoder.channels}, dit, f"the autoencoder {ae}")
    cache_attrs = _cache_attrs(cache, ae, meta, dit) if cache else None
    num_classes = int(meta["num_classes"])
    classes = [str(c) for c in (cache_attrs or {}).get("classes", range(num_classes))]
    s_vae = decode_radius(sc.get("s_vae"), cache_attrs)
    integrator = sc.get("integrator", "euler_project")
    bf16 = sampling_bf16(sc.get("precision", "fp32"), device)
    settings_kw = sampler_settings(meta, int(sc["steps"]), integrator)
    if n % num_classes and (part is None or part[0] == 0):
        log.warning("sample.num_samples=%d is not a multiple of %d classes: counts differ by one",
                    n, num_classes)
    labels = balanced_labels(n, num_classes)
    seeds = sample_seeds(n, int(cfg.get("seed", 0)))
    r, alpha, path = float(meta["radius"]), float(meta["alpha"]), settings_kw["path"]
    settings = {
        "format": FORMAT, "version": VERSION, "num_samples": n, "num_classes": num_classes,
        "classes": classes, "batch_size": bs, "seed": int(cfg.get("seed", 0)),
        "steps": int(sc["steps"]), "cfg_scale": float(sc["cfg_scale"]),
        "guidance_interval": [float(v) for v in sc["guidance_interval"]],
        "s_vae": s_vae, "radius": r, "alpha": alpha, "flow_path": path,
        "dit_checkpoint": str(dit), "dit_sha256": sha256_file(dit),
        "ae_checkpoint": str(ae), "ae_sha256": sha256_file(ae),
        "cache": str(cache or ""), "device_type": device.type, "integrator": integrator,
        "convention": str(meta.get("convention") or "dinosae"),
        "seeding": "sample i: rfm.noise from torch.Generator().manual_seed(seeds[i]) (cpu)",
        "label_scheme": LABEL_SCHEME,
        "precision": "bf16 autocast" if bf16 else "fp32",
    }
    if part is not None:  # what a part adds; gather_parts writes the rest unchanged
        settings.update(format=PART_FORMAT, part=[part[0], part[1]], part_range=[lo, hi])

    def generate(a: int, b: int) -> np.ndarray:
        return decoded_samples(model, autoencoder, meta, sc, labels[a:b], seeds[a:b], s_vae,
                               device, f"samples {a}..{b - 1} (DiT {dit}, decoder {ae})")

    hw = autoencoder.image_hw
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    f = _open_partial(tmp, settings, hi - lo, hw, labels[lo:hi], seeds[lo:hi])
    stop = StopFlag()
    try:
        done = lo + int(f.attrs["done"])  # sample numbers; the file holds lo..hi-1
        progress = Progress(hi - lo, start=done - lo, desc="sample", unit="img")
        while done < hi:
            end = min(done + bs, hi)  # the one-job run's batch: parts start on a batch
            f["images"][done - lo:end - lo] = generate(done, end)
            f.attrs["done"] = end - lo
            f.flush()
            fault_point("sample", end)
            progress.update(end - done)
            done = end
            if stop.stop and done < hi:
                raise SystemExit(f"stopped by signal at {done - lo}/{hi - lo} samples; rerun to "
                                 "continue")
        progress.close()
        f.attrs["complete"] = True
    finally:
        f.close()
        stop.restore()
    os.replace(tmp, out)
    if part is not None:
        log.info("part %d/%d: samples %d..%d -> %s", part[0], part[1], lo, hi - 1, out)
        return
    finish(out, bool(sc.get("export_npz", False)))
    log.info("%d samples (%d classes, %d steps, cfg %.2f, s_vae %.3f) -> %s", n, num_classes,
             sc["steps"], sc["cfg_scale"], s_vae, out)


def finish(out: Path, npz: bool) -> None:
    """The grid and (with sample.export_npz) the npz beside a complete samples.h5."""
    write_grid(out, out.with_suffix(".png"))
    if npz:
        export_npz(out, out.with_suffix(".npz"))


# ---------------------------------------------------------------- parts -> samples.h5

# what a part must agree on with the config and the checkpoints it was given (the rest of its
# settings it must share with the other parts)
CONFIG_KEYS = ("num_samples", "batch_size", "seed", "steps", "cfg_scale", "guidance_interval",
               "integrator")


def gather_parts(cfg: dict, parts: list[str], dit: str, ae: str, out: str,
                 force: bool = False) -> None:
    """The K part files of `dinosae sample --part i/K` (given in part order) -> `out`, the
    samples.h5 one job writes (datasets and attributes equal), its grid and npz. Every part is
    checked first: complete, part i of K where K is the number given, from one run (equal
    settings), of this config's sampling settings and these checkpoints (sha256), covering
    exactly its range with the labels and seeds of its samples; the first that is not gets
    one line (DataError). Sections: seed, sample."""
    import contextlib

    sc, out = cfg["sample"], Path(out)
    npz = bool(sc.get("export_npz", False))
    claim_outputs(out, npz, force, [*parts, dit, ae])
    want = _config_settings(cfg)
    want.update(dit_sha256=sha256_file(dit), ae_sha256=sha256_file(ae))
    if "parts" in sc and int(sc["parts"]) != len(parts):
        raise ConfigError(f"sample-gather: {len(parts)} parts given, the config's sample.parts "
                          f"is {sc['parts']}")
    ranges = part_ranges(int(sc["num_samples"]), int(sc["batch_size"]), len(parts))
    with contextlib.ExitStack() as stack:
        files = [stack.enter_context(_open_part(p)) for p in parts]
        first = files[0]
        for i, (p, f) in enumerate(zip(parts, files, strict=True)):
            _check_part(p, f, i, len(parts), ranges[i], want, first if i else None, parts[0])
        n, hw = int(first.attrs["num_samples"]), first["images"].shape[1:3]
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".partial")
        tmp.unlink(missing_ok=True)  # a gather starts afresh (copying is quick)

        def same_attrs(attrs: Any) -> None:  # each attribute as the part stores it (dtype too)
            for k in first.attrs:
                if k not in (*PART_KEYS, "format", "done", "complete"):
                    attrs.create(k, first.attrs[k], dtype=first.attrs.get_id(k).dtype)
            attrs["format"] = FORMAT

        g = _new_file(tmp, n, hw, balanced_labels(n, int(first.attrs["num_classes"])),
                      sample_seeds(n, int(first.attrs["seed"])), same_attrs)
        try:
            step = max(1, int(sc["batch_size"]))
            for f, (lo, hi) in zip(files, ranges, strict=True):
                for a in range(lo, hi, step):
                    b = min(a + step, hi)
                    g["images"][a:b] = f["images"][a - lo:b - lo]
            g.attrs["done"] = n
            g.attrs["complete"] = True
        finally:
            g.close()
    os.replace(tmp, out)
    finish(out, npz)
    log.info("%d parts -> %d samples in %s", len(parts), n, out)


def _config_settings(cfg: dict) -> dict[str, Any]:
    """The attributes of a samples file that the config alone decides."""
    sc = cfg["sample"]
    got = {"num_samples": int(sc["num_samples"]), "batch_size": int(sc["batch_size"]),
           "seed": int(cfg.get("seed", 0)), "steps": int(sc["steps"]),
           "cfg_scale": float(sc["cfg_scale"]),
           "guidance_interval": [float(v) for v in sc["guidance_interval"]],
           "integrator": sc.get("integrator", "euler_project")}
    if sc.get("s_vae") is not None:
        got["s_vae"] = float(sc["s_vae"])
    return got


def _open_part(path: str) -> Any:
    """A part file, opened read-only (a missing one, or one that is not a regular file or not
    HDF5, is one line)."""
    import h5py

    from dinosae.files import check_regular

    if not os.path.lexists(path):
        raise DataError(f"sample part {path}: missing; run its `dinosae sample --part` job")
    if os.path.islink(path):
        raise DataError(f"sample part {path}: is a symbolic link; not read")
    check_regular(path)
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise DataError(f"sample part {path}: not an HDF5 file ({e}); rerun its part") from None


def _check_part(path: str, f: Any, i: int, k: int, rng: tuple[int, int], want: dict,
                first: Any | None, first_path: str) -> None:
    """One part file against what the gather expects of part i of k (see gather_parts)."""
    def bad(why: str) -> DataError:
        return DataError(f"sample part {path}: {why}; rerun `dinosae sample --part {i}/{k}`")

    a = f.attrs
    if _text(a.get("format")) != PART_FORMAT:
        raise bad(f"not a part of `dinosae sample --part` (format {_text(a.get('format'))!r})")
    try:
        got_part, got_range = [int(v) for v in a["part"]], [int(v) for v in a["part_range"]]
        done, rows = int(a["done"]), f["images"].shape[0]
        complete = bool(a.get("complete", False))
        if len(got_part) != 2 or len(got_range) != 2:
            raise ValueError(f"part {got_part}, part_range {got_range}")
    except (KeyError, TypeError, ValueError) as e:
        raise bad(f"lacks its part attributes or images ({e})") from None
    if got_part != [i, k]:
        raise bad(f"is part {got_part[0]}/{got_part[1]}, given as part {i}/{k}")
    if not complete or done != rows:
        raise bad(f"incomplete ({done}/{rows} samples written)")
    if first is not None:
        skip = (*PART_KEYS, "done", "complete")
        keys = (set(a) | set(first.attrs)) - set(skip)
        diff = sorted(key for key in keys if not _attr_equal(a.get(key), first.attrs.get(key)))
        if diff:
            raise bad(f"is from another run than {first_path} (differs in {', '.join(diff)})")
    diff = sorted(key for key, v in want.items() if not _attr_equal(a.get(key), v))
    if diff:
        raise bad(f"was sampled with other settings or checkpoints than these "
                  f"(differs in {', '.join(diff)})")
    lo, hi = rng
    if got_range != [lo, hi] or rows != hi - lo:
        raise bad(f"holds samples {got_range[0]}..{got_range[1] - 1}, part {i}/{k} is samples "
                  f"{lo}..{hi - 1}")
    n, classes = int(a["num_samples"]), int(a["num_classes"])
    labels, seeds = balanced_labels(n, classes)[lo:hi], sample_seeds(n, int(a["seed"]))[lo:hi]
    if not (np.array_equal(f["labels"][:], labels) and np.array_equal(f["seeds"][:], seeds)):
        raise bad("its labels or seeds are not those of its samples")
    shape, like = f["images"].shape, (f if first is None else first)["images"].shape
    if f["images"].dtype != np.uint8 or len(shape) != 4 or shape[3] != 3 or shape[1:] != like[1:]:
        raise bad(f"images {f['images'].dtype} {shape[1:]}, not uint8 (H, W, 3) as the first "
                  "part's")


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def write_grid(samples: str | Path, png: str | Path, classes: int = 8, per_class: int = 8) -> None:
    """PNG grid: one row per class (the first `classes` classes), its first `per_class` samples."""
    import h5py

    with h5py.File(samples, "r") as f:
        labels = f["labels"][:]
        rows = []
        for c in np.unique(labels)[:classes]:
            idx = np.flatnonzero(labels == c)[:per_class]
            rows.append(f["images"][np.sort(idx)])
    ncol = min(len(r) for r in rows)
    grid = np.concatenate([r[:ncol] for r in rows])
    save_grid(torch.from_numpy(grid).permute(0, 3, 1, 2).float() / 255.0, png, nrow=ncol)


def export_npz(samples: str | Path, npz: str | Path) -> None:
    """ADM-style sample batch: arr_0 uint8 (N, H, W, 3), arr_1 int64 labels (atomic)."""
    import h5py

    npz = Path(npz)
    with h5py.File(samples, "r") as f:
        images, labels = f["images"][:], f["labels"][:]
    tmp = npz.with_name(f".{npz.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        np.savez(fh, arr_0=images, arr_1=labels)
    mark_zip(tmp)
    os.replace(tmp, npz)
