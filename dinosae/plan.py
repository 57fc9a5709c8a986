"""`dinosae plan`: what a configuration costs before anyone books GPUs.

What each rule does to one image, its FLOPs and its peak GPU memory at a batch, is measured
on fake tensors by dinosae.plan_measure (see there). This module decides and prints: from
those and the configured data and steps, GPU-hours and wall time on N GPUs of a GPU in
`gpus.yaml` at a stated model-FLOPs utilisation (MFU, overridable), peak GPU memory per GPU
(one micro-batch's step when `micro_batch` is configured: gradient accumulation makes up the
per-GPU batch) flagged when above FIT_FRACTION of the GPU, the largest micro-batch that fits
the GPU (dinosae.microbatch), wall-time chains (dinosae.chains), and disk for shards, the
latent cache and checkpoints. Precision follows the code: AE and DiT training run under bf16
autocast (bf16 tensor-core peak), and so does the DiT in sampling with `sample.precision:
bf16`; encoding, decoding, the evaluation networks and fp32 sampling run in fp32, where
convolutions use TF32 tensor cores (cuDNN's default) and matmuls the fp32 CUDA cores (PyTorch
leaves TF32 off for matmuls). The gFID proxy samples at `dit.eval_precision`. Not counted: data
loading, optimizer steps, EMA updates, communication (the MFU absorbs them); stage 2's
discriminator warm-up steps count as full steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from dinosae.errors import ConfigError
from dinosae.latents.store import bytes_per_image
from dinosae.microbatch import CONFIG_KEY, Fit, format_fits, largest_fitting
from dinosae.plan_measure import (  # noqa: F401 (the measuring names, importable from here)
    SECTIONS,
    FakeWorld,
    LiveBytes,
    Measured,
    Part,
    RuleWork,
    _plan_config,
    flop_counter,
    measure_work,
)

GPUS_FILE = Path(__file__).with_name("gpus.yaml")
DEFAULT_MFU = 0.05  # calibrated on published DiT-XL training throughputs: README "Planning a run"
FIT_FRACTION = 0.9  # of a GPU's memory: the rest is for the CUDA context and allocator slack
IMAGENET = {"train": 1_281_167, "val": 50_000, "classes": 1000}  # ILSVRC2012
TAR_BLOCK = 512  # a tar member: one header block + data padded to whole blocks
ADM_REFERENCE_IMAGES = 10_000  # arr_0 of ADM's reference batch (dinosae.evaluate streams it)


# ---------------------------------------------------------------- GPUs

def load_gpus(path: str | Path = GPUS_FILE) -> dict[str, dict]:
    """The GPU table: name -> {name, bf16, tf32, fp32 (dense TFLOPS), memory_gb, source}."""
    table = yaml.safe_load(Path(path).read_text())
    for key, spec in table.items():
        missing = {"name", "bf16", "tf32", "fp32", "memory_gb", "source"} - set(spec)
        if missing:
            raise ConfigError(f"{path}: GPU {key!r} lacks {sorted(missing)}")
    return table


# ---------------------------------------------------------------- data and disk

@dataclass
class Dataset:
    train: int
    val: int
    classes: int
    source: str  # where the counts come from
    shard_bytes: int | None = None  # both splits' tars, when shards exist


def dataset_counts(cfg: dict, train_images: int | None = None,
                   val_images: int | None = None) -> Dataset:
    """Images per split: existing shard manifests (data.shards, at the configured image size)
    win, then the embedded dataset's configured size, then ImageNet-1k's counts for an ImageNet
    folder (the config names no count). Explicit counts override a split."""
    from dinosae.data.shard import read_manifest

    d = cfg["data"]
    manifests = {}
    for split in ("train", "val"):
        try:
            m = read_manifest(Path(d["shards"]) / split)
        except (OSError, ValueError):
            continue
        if m["preprocess"].get("image_size") == d["image_size"]:
            manifests[split] = m
    if len(manifests) == 2:
        data = Dataset(manifests["train"]["count"], manifests["val"]["count"],
                       len(manifests["train"]["classes"]), f"shard manifests in {d['shards']}",
                       sum(int(s["bytes"]) for m in manifests.values() for s in m["shards"]))
    elif d["source"] == "mini":
        from dinosae.data.mini import PHOTOS

        k = len(PHOTOS)
        data = Dataset(k * d["mini"]["train_per_class"], k * d["mini"]["val_per_class"], k,
                       "the embedded dataset: data.mini's images per class x photographs")
    else:
        data = Dataset(IMAGENET["train"], IMAGENET["val"], IMAGENET["classes"],
                       "ImageNet-1k (ILSVRC2012): data.source is a folder and no shards exist "
                       "yet; --train-images/--val-images override")
    if train_images is not None or val_images is not None:
        data = Dataset(data.train if train_images is None else train_images,
                       data.val if val_images is None else val_images, data.classes,
                       data.source + "; counts given on the command line")
    return data


def image_bytes(cfg: dict, photos: int = 4) -> float:
    """Mean bytes of one sample in a shard tar (image member + .cls member, tar blocks
    included), measured by preparing scikit-image's photographs as `dinosae shard` does."""
    import numpy as np

    from dinosae.data.mini import load_photos
    from dinosae.data.shard import center_crop_adm, encode, to_rgb

    d = cfg["data"]
    sizes = []
    for _, photo in load_photos()[:photos]:
        arr = center_crop_adm(to_rgb(photo), d["image_size"])
        n = len(encode(np.ascontiguousarray(arr), d["format"], d["quality"]))
        sizes.append(TAR_BLOCK + -(-n // TAR_BLOCK) * TAR_BLOCK + 2 * TAR_BLOCK)  # + .cls
    return sum(sizes) / len(sizes)


def checkpoint_bytes(m: Measured) -> dict[str, float]:
    """Checkpoints in fp32. An AE stage's checkpoint.pt: stem + decoder, weights and EMA, and
    from stage 2 the discriminator (the frozen teacher is referenced, not stored); its last.pt
    adds the AdamW moments while the stage trains. The DiT's checkpoint.pt: weights and EMA;
    its last.pt adds AdamW."""
    ae = 4 * 2 * (m.n_stem + m.n_dec)
    stages = [ae + (4 * m.n_disc if k >= 2 else 0) for k in (1, 2, 3, 4)]
    return {"ae checkpoints (4 stages)": sum(stages),
            "ae last.pt while training": stages[1] + 8 * (m.n_stem + m.n_dec + m.n_disc),
            "dit checkpoint": 8 * m.n_dit, "dit last.pt while training": 16 * m.n_dit}


# ---------------------------------------------------------------- the plan

@dataclass
class Load:
    """How much work a rule does: `images` through its work in `steps` steps (training) or
    batches of `batch` (global); data-parallel over a job's GPUs (`ddp`) or one GPU per job,
    `jobs` jobs."""

    images: int
    steps: int
    batch: int
    ddp: bool = False
    jobs: int = 1
    micro: int | None = None  # configured micro-batch per GPU (training: accumulation)


def rule_loads(cfg: dict, data: Dataset) -> dict[str, Load]:
    tc, dc, sc, ev, lc = cfg["ae_train"], cfg["dit"], cfg["sample"], cfg["eval"], cfg["latents"]
    count = {"train": data.train, "val": data.val}

    def batches(n: int, b: int) -> Load:
        return Load(n, math.ceil(n / b), b)

    loads = {f"ae_stage{k}": Load(s["steps"] * s["batch_size"], s["steps"], s["batch_size"],
                                  ddp=True, micro=tc.get("micro_batch"))
             for k, s in enumerate(tc["stages"], start=1)}
    loads["eval_recon"] = batches(min(ev["recon_samples"], data.val), ev["batch_size"])
    n = count[lc["split"]]
    loads["encode_part"] = Load(n, math.ceil(n / lc["batch_size"]), lc["batch_size"],
                                jobs=int(lc["parts"]))
    loads["train_dit"] = Load(dc["steps"] * dc["batch_size"], dc["steps"], dc["batch_size"],
                              ddp=True, micro=dc.get("micro_batch"))
    loads["sample"] = batches(sc["num_samples"], sc["batch_size"])
    loads["sample"].jobs = int(sc.get("parts", 1))  # sample.parts: one-GPU jobs (sample_part)
    # ADM's reference batch: its 10k images (arr_0) through the extractor; else the whole
    # split eval.reference names, streamed (the field's: ImageNet-train, 1.28M images)
    loads["fid_reference"] = batches(ADM_REFERENCE_IMAGES if ev.get("adm_reference")
                                     else count[ev["reference"]], ev["batch_size"])
    loads["fid"] = batches(sc["num_samples"], ev["batch_size"])
    return loads


def seconds_per_image(work: RuleWork, gpu: dict, mfu: float) -> float:
    """GPU-seconds for one image's work: each precision class at its peak times the MFU."""
    return sum(f / (gpu[k] * 1e12 * mfu) for k, f in work.flops().items())


@dataclass
class RulePlan:
    rule: str
    gpus: int  # per job
    jobs: int
    images: int
    steps: int
    batch: int  # per GPU
    micro: int  # per GPU and forward/backward: the memory column's batch
    accum: int  # micro-batches per step (gradient accumulation; 1: none)
    flops_per_image: float
    flops_per_step: float  # per GPU
    act_bytes: float  # activations per image, at the micro-batch
    state_bytes: float  # weights, AdamW, EMA, DDP buckets
    peak_bytes: float
    fits: bool
    gpu_hours: float
    job_hours: float  # one job's wall time
    wall_hours: float  # all of the rule's jobs on the plan's GPUs


def rule_plan(rule: str, work: RuleWork, load: Load, gpus: int, gpu: dict, mfu: float,
              memory: bool = True) -> RulePlan:
    """One rule's row with `gpus` GPUs (a DDP job uses them all, other jobs one each)."""
    per_job = gpus if load.ddp else 1
    per_gpu = max(1, math.ceil(load.batch / per_job))
    micro = min(per_gpu, load.micro or per_gpu)  # one micro-batch's step holds the memory
    flops = sum(work.flops().values())
    gpu_h = load.images * seconds_per_image(work, gpu, mfu) / 3600
    job_h = gpu_h / per_job / load.jobs
    wall_h = job_h * math.ceil(load.jobs / max(1, gpus // per_job))
    state = 4 * work.weights + 8 * work.trainable + 4 * work.ema
    if per_job > 1:
        state += 4 * work.trainable  # DDP's gradient buckets
    act = work.act_per_image(micro) if memory else math.nan
    peak = state + work.peak_live(micro) if memory else math.nan
    return RulePlan(rule, per_job, load.jobs, load.images, load.steps, per_gpu, micro,
                    math.ceil(per_gpu / micro), flops,
                    flops * per_gpu, act, state, peak,
                    not peak > FIT_FRACTION * gpu["memory_gb"] * 1e9, gpu_h, job_h, wall_h)


@dataclass
class Plan:
    model: str  # what is planned, in a line
    gpu: dict
    gpus: int
    mfu: float
    data: Dataset
    rules: list[RulePlan]
    disk: dict[str, float]
    notes: list[str]


def _check_args(gpu: str, gpus: int, mfu: float) -> dict:
    table = load_gpus()
    if gpu not in table:
        raise ConfigError(f"unknown GPU {gpu!r}; {GPUS_FILE.name} lists "
                          f"{', '.join(sorted(table))}")
    if gpus < 1:
        raise ConfigError(f"--gpus must be at least 1, got {gpus}")
    if not 0 < mfu <= 1:
        raise ConfigError(f"--mfu must be in (0, 1], got {mfu}")
    return table[gpu]


def job_hours(cfg: dict, gpu: str, gpus: dict[str, int], mfu: float = DEFAULT_MFU
              ) -> dict[str, float]:
    """Each rule's wall hours per job when a job of rule r gets gpus[r] GPUs (FLOPs only),
    keyed by the Snakemake rule whose jobs they are (`sample_part` when sample.parts > 1)."""
    spec = _check_args(gpu, max(gpus.values()), mfu)
    data = dataset_counts(cfg)
    m = measure_work(cfg, data.classes)
    out = {}
    for rule, load in rule_loads(cfg, data).items():
        job = "sample_part" if rule == "sample" and load.jobs > 1 else rule
        out[job] = rule_plan(rule, m.rules[rule], load, gpus.get(job, 1), spec, mfu,
                             memory=False).job_hours
    return out


def proxy_note(cfg: dict, m: Measured, spec: dict, mfu: float) -> str:
    """The gFID proxy's cost (dit.eval_every, dit.eval_samples; dinosae/train/proxy.py): per
    evaluation, `sample`'s work at dit.eval_precision and `fid`'s on eval_samples images, on
    rank 0's one GPU."""
    dc = cfg["dit"]
    n, every = int(dc.get("eval_samples", 1000)), int(dc.get("eval_every") or 0)
    sec = n * sum(seconds_per_image(m.rules[r], spec, mfu) for r in ("gfid_proxy", "fid"))
    line = (f"gFID proxy: {n:,} samples ({dc.get('eval_precision', 'bf16')} sampling) cost "
            f"{_hours(sec / 3600)} per evaluation on rank 0's "
            "GPU (the other ranks wait)")
    if not every:
        return line + " (off: dit.eval_every 0)"
    evals = dc["steps"] // every + (dc["steps"] % every != 0)  # and one at the last step
    return (f"{line}; every {every:,} steps: {evals} evaluations, {_hours(evals * sec / 3600)} "
            "of train_dit's wall time (not in its row above)")


def make_plan(cfg: dict, gpu: str = "h100", gpus: int = 8, mfu: float = DEFAULT_MFU,
              train_images: int | None = None, val_images: int | None = None) -> Plan:
    """The plan of `cfg` on `gpus` GPUs of kind `gpu` (a key of gpus.yaml)."""
    spec = _check_args(gpu, gpus, mfu)
    data = dataset_counts(cfg, train_images, val_images)
    m = measure_work(cfg, data.classes)
    rows = [rule_plan(rule, m.rules[rule], load, gpus, spec, mfu)
            for rule, load in rule_loads(cfg, data).items()]
    d, lc, sc = cfg["data"], cfg["latents"], cfg["sample"]
    hw = d["image_size"]
    per_image = image_bytes(cfg) if data.shard_bytes is None else None
    n_enc = {"train": data.train, "val": data.val}[lc["split"]]
    disk = {
        "shards": data.shard_bytes or (data.train + data.val) * per_image,
        "latent cache": n_enc * bytes_per_image(m.tokens, m.channels, lc.get("dtype"), lc["flip"]),
        **checkpoint_bytes(m),
        "samples": sc["num_samples"] * hw * hw * 3 * (2 if sc.get("export_npz") else 1),
    }
    a, dc = cfg["autoencoder"], cfg["dit"]
    teacher = a["teacher"]["arch"] + (" (overrides)" if a["teacher"].get("overrides") else "")
    dit = dc["model"] + (" + DDT head" if dc.get("head") else "")
    model = (f"{teacher} at {hw} px -> {m.grid[0]}x{m.grid[1]}x{m.channels} latents; decoder "
             f"widths {a['decoder']['widths']}; DiT {dit}")
    shards = ("from the manifests" if per_image is None else
              f"{per_image / 1e3:.1f} kB per image, measured on scikit-image photographs")
    notes = [
        f"data: train {data.train:,} / val {data.val:,} images, {data.classes} classes "
        f"({data.source})",
        f"shards: {d['format']} q{d['quality']} at {hw} px, {shards}; latent cache: tokens "
        f"{lc.get('dtype') or 'float16'} + norms fp32"
        f"{' + flipped copies' if lc.get('flip') else ''}, uncompressed",
        "checkpoints (fp32): an AE stage's checkpoint.pt holds stem + decoder (weights and "
        "EMA) and the discriminator, the frozen teacher referenced; the DiT's weights and EMA; "
        "each last.pt adds AdamW",
        proxy_note(cfg, m, spec, mfu),
    ]
    return Plan(model, spec, gpus, mfu, data, rows, disk, notes)


# ---------------------------------------------------------------- printing

def _si(x: float, unit: str = "") -> str:
    """3 significant digits with k/M/G/T/P."""
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}".rstrip()


def _num(x: float) -> str:
    if x >= 100:
        return f"{x:,.0f}"
    return f"{x:.3g}" if x >= 0.001 else "< 0.001"


def _hours(h: float) -> str:
    if h < 1 / 3600:
        return "< 1 s"
    if h < 1 / 60:
        return f"{h * 3600:.0f} s"
    if h < 1:
        return f"{h * 60:.0f} min"
    if h < 48:
        return f"{h:.1f} h"
    return f"{h / 24:.1f} d"


def format_plan(plan: Plan) -> str:
    """The plan as one table with a few lines of context."""
    g = plan.gpu
    head = [
        f"dinosae plan: {plan.model}",
        f"on {plan.gpus} x {g['name']} (dense bf16 {g['bf16']:g} / tf32 {g['tf32']:g} / fp32 "
        f"{g['fp32']:g} TFLOPS, {g['memory_gb']:g} GB) at MFU {plan.mfu:g}",
        *plan.notes,
        "",
    ]
    cols = ["rule", "GPUs", "jobs", "images", "steps", "FLOP/img", "FLOP/step", "act/img",
            "batch/GPU", "micro x acc", "state", "peak mem", "GPU-h", "wall"]
    rows = [[r.rule, str(r.gpus), str(r.jobs), _si(r.images), _si(r.steps),
             _si(r.flops_per_image), _si(r.flops_per_step), _si(r.act_bytes, "B"),
             str(r.batch), f"{r.micro} x {r.accum}", _si(r.state_bytes, "B"),
             _si(r.peak_bytes, "B") + ("" if r.fits else " !"),
             _num(r.gpu_hours), _hours(r.wall_hours)] for r in plan.rules]
    total = ["total", *[""] * 11, _num(sum(r.gpu_hours for r in plan.rules)),
             _hours(sum(r.wall_hours for r in plan.rules))]
    widths = [max(len(c), *(len(row[i]) for row in [*rows, total])) for i, c in enumerate(cols)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True)))

    rule = line(["-" * w for w in widths])
    foot = [""]
    misfits = [r.rule for r in plan.rules if not r.fits]
    if misfits:
        foot.append(f"! peak memory above {FIT_FRACTION:.0%} of {g['memory_gb']:g} GB: "
                    f"{', '.join(misfits)}: a micro-batch (plan --gpu chooses one), more GPUs "
                    "or activation checkpointing")
    foot += [
        "disk: " + ", ".join(f"{k} {_si(v, 'B')}" for k, v in plan.disk.items()),
        "FLOP/img: torch.utils.flop_counter on the configured networks (training: forward + "
        "backward + recomputation); FLOP/step: per GPU; act/img: activation memory per image; "
        "micro x acc: the micro-batch per GPU (ae_train/dit.micro_batch) and the micro-batches per "
        "step (gradient accumulation); state: weights, AdamW, EMA, DDP buckets; peak mem: per "
        "GPU, one micro-batch's step; GPU-h at the "
        "MFU; wall: "
        "training rules data-parallel over the GPUs, encode parts side by side, the rest on "
        "one GPU each, one rule after another",
    ]
    return "\n".join([*head, line(cols), rule, *map(line, rows), rule, line(total), *foot])


def plan(cfg: dict, gpu: str = "h100", gpus: int = 8, mfu: float | None = None,
         train_images: int | None = None, val_images: int | None = None,
         max_runtime: float | None = None) -> Plan:
    """`dinosae plan`: print the plan's table for `cfg` (a whole config); return the plan."""
    missing = [s for s in SECTIONS if s not in cfg]
    if missing:
        raise ConfigError(f"the config lacks section(s) {', '.join(missing)}; give a "
                          "whole config file (--configfile)")
    p = make_plan(cfg, gpu, gpus, DEFAULT_MFU if mfu is None else mfu, train_images, val_images)
    print(format_plan(p))
    print(format_fits(micro_batch_fits(cfg, p), p.gpu["name"],
                      FIT_FRACTION * p.gpu["memory_gb"]))
    if max_runtime:  # jobs per wall-time chain (dinosae.chains)
        from dinosae.chains import format_chains

        print(format_chains([(r.rule, r.job_hours) for r in p.rules], p.disk, max_runtime))
    return p


def micro_batch_fits(cfg: dict, p: Plan) -> list[Fit]:
    """Each rule's largest batch per GPU per forward/backward that fits the plan's GPU
    (dinosae.microbatch): the training rules' micro-batch, the others' batch."""
    m = measure_work(cfg, p.data.classes)  # measured once (cached)
    budget = FIT_FRACTION * p.gpu["memory_gb"] * 1e9
    fits = []
    for row in p.rules:
        if row.rule not in CONFIG_KEY or not row.images:
            continue
        work = m.rules[row.rule]
        micro = largest_fitting(lambda b, w=work, r=row: r.state_bytes + w.peak_live(b),
                                row.batch, budget)
        peak = row.state_bytes + work.peak_live(micro) if micro else math.nan
        fits.append(Fit(row.rule, row.batch, micro, peak, row.micro))
    return fits
