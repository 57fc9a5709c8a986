"""Shared test helpers: a tiny configuration derived from config.yaml."""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

from dinosae.config import validate

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"  # the project's shared folder (CI always has it)


def in_ci() -> bool:
    """CI=true (or 1/yes), as .ci/run and CI services set it."""
    import os

    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def skip_or_fail(reason: str) -> None:
    """Skip on a developer's machine; fail in CI, where a skip would hide a missing part."""
    import pytest

    if in_ci():
        pytest.fail(f"{reason} (CI=true: this test must run, not skip)")
    pytest.skip(reason)


def require_shared(path: Path) -> Path:
    """`path` (under ../shared) when it exists, else skip (or fail in CI)."""
    if not Path(path).exists():
        skip_or_fail(f"{path} is missing (../shared is not next to this checkout)")
    return Path(path)


def default_config() -> dict:
    return yaml.safe_load((ROOT / "config.yaml").read_text())


def tiny_config(tmp: Path | None = None) -> dict:
    """config.yaml shrunk for unit tests: 32 px images (2x2 tokens), a 2-block 64-wide teacher,
    a handful of steps. Paths point under `tmp` when given."""
    cfg = copy.deepcopy(default_config())
    d = cfg["data"]
    d["mini"].update(train_per_class=6, val_per_class=3, crop_size=48)
    d["image_size"] = 32
    d["shard_max_bytes"] = 20000
    d["workers"] = 1
    if tmp is not None:
        d["root"] = str(Path(tmp) / "mini")
        d["shards"] = str(Path(tmp) / "shards")
    ae = cfg["autoencoder"]
    ae["teacher"]["overrides"] = {"embed_dim": 64, "depth": 2, "num_heads": 2}
    ae["stem_widths"] = [8, 16, 32]
    ae["decoder"].update(widths=[8, 16, 16, 32, 32], depths=[1, 1, 1, 1, 1])
    ae["discriminator"].update(layers=[0, 1], channels=16)
    t = cfg["ae_train"]
    t.update(stages=ae_stages([6, 4, 3, 3], 4, t["stages"][0]["lr"]), warmup_steps=2,
             log_every=2, image_every=4, ckpt_every=2, disc_warmup_steps=2)
    cfg["latents"].update(parts=2, batch_size=8, chunk_rows=8, shard_chunks=1)  # 8-row units
    cfg["dit"].update(steps=6, batch_size=8, warmup_steps=2, log_every=2, image_every=4,
                      ckpt_every=3)
    cfg["sample"].update(num_samples=12, batch_size=6, steps=4)
    cfg["eval"].update(recon_samples=12, batch_size=6)
    return validate(cfg, check_paths=False)


def ae_stages(steps: list[int], batch_size: int, lr: float | list[float]) -> list[dict]:
    """ae_train.stages: the given steps per stage, one global batch, one lr (or one per stage)."""
    lrs = lr if isinstance(lr, list) else [lr] * len(steps)
    return [{"steps": s, "batch_size": batch_size, "lr": r}
            for s, r in zip(steps, lrs, strict=True)]


def workflow_copy(dest: Path, config: dict | None = None) -> Path:
    """The workflow (Snakefile, workflow/, envs/, slurm/, the profiles link) copied into `dest`,
    laid out as the repo root is; `config` replaces config.yaml when given."""
    import shutil

    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "Snakefile", dest / "Snakefile")
    for folder in ("workflow", "envs", "slurm"):
        shutil.copytree(ROOT / folder, dest / folder)
    (dest / "profiles").symlink_to("workflow/profiles")
    if config is None:
        shutil.copy(ROOT / "config.yaml", dest / "config.yaml")
    else:
        (dest / "config.yaml").write_text(yaml.safe_dump(config))
    return dest


def run_snakemake(cwd: Path, *args: str, env: dict | None = None, check: bool = True,
                  timeout: float = 1500):
    """`snakemake --cores 2 ARGS` in `cwd` with this environment's `dinosae` on PATH. With
    `check`, a failure raises with the tail of Snakemake's output and of every job log. On a
    timeout (or a test timeout) Snakemake and its running jobs are killed together."""
    import os
    import signal
    import subprocess
    import sys

    bindir = str(Path(sys.executable).parent)
    env = {**os.environ, **(env or {}), "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}"}
    cmd = [str(Path(bindir) / "snakemake"), "--cores", "2", *args]
    # its own process group, which the jobs share: killing Snakemake alone would leave them
    with subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env=env, start_new_session=True) as p:
        try:
            stdout, stderr = p.communicate(timeout=timeout)
        except BaseException:
            os.killpg(p.pid, signal.SIGKILL)
            raise
    r = subprocess.CompletedProcess(cmd, p.returncode, stdout, stderr)
    if check and r.returncode != 0:
        logs = "".join(f"\n--- {p.name}\n{p.read_text()[-3000:]}"
                       for p in sorted((cwd / "results/logs").glob("*.log")))
        raise AssertionError(f"snakemake {args} failed:\n{r.stderr[-5000:]}{logs}")
    return r


def save_dit_checkpoint(path: Path, cfg: dict, dit, grid: list[int], num_classes: int,
                        mean_norm: float, ae_path: Path, step: int) -> None:
    """A DiT checkpoint in the layout dinosae.train.dit writes (model = EMA = `dit`'s weights),
    for tests that need a generator without training one."""
    import math

    from dinosae import rfm
    from dinosae.checkpoint import save_checkpoint

    T, C = dit.tokens, dit.channels
    sd = dit.state_dict()
    save_checkpoint(path, {
        "kind": "dinosae-dit", "step": step, "model": sd, "ema": sd, "optimizer": {},
        "config": {"dit": cfg["dit"], "tokens": T, "channels": C, "num_classes": num_classes,
                   "grid": list(grid), "radius": math.sqrt(C), "alpha": rfm.alpha_for(T, C),
                   "mean_norm": mean_norm, "seed": 0},
        "ae": str(ae_path), "cache": "cache.zarr"})


def write_generator(folder: Path, cfg: dict, num_classes: int, mean_norm: float,
                    perturb: tuple[int, float] | None = None) -> tuple[Path, Path, list[int], int]:
    """A tiny autoencoder (a stage-4 checkpoint, model = EMA, built from `cfg` after
    `torch.manual_seed(0)`) and a DiT for its tokens (`save_dit_checkpoint`), for tests that
    sample without training. `perturb` = (seed, scale) adds scale * N(0, 1) to every DiT weight
    (a fresh DiT's adaLN-zero output is exactly zero: labels, guidance and intervals would never
    reach the samples). Returns (dit path, ae path, grid, channels)."""
    import torch

    from dinosae.checkpoint import save_checkpoint
    from dinosae.models.autoencoder import ae_config, build_autoencoder
    from dinosae.models.dit import build_dit

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    ae = build_autoencoder(cfg)
    sd = ae.state_dict()
    ae_path = folder / "ae.pt"
    save_checkpoint(ae_path, {"kind": "dinosae-ae", "stage": 4, "step": 0,
                              "config": ae_config(cfg), "model": sd, "ema": sd})
    grid, C = list(ae.grid), ae.channels
    dit = build_dit(cfg["dit"]["model"], grid[0] * grid[1], C, num_classes, grid,
                    cfg["dit"]["head"])
    if perturb is not None:
        g = torch.Generator().manual_seed(perturb[0])
        with torch.no_grad():
            for p in dit.parameters():
                p.add_(perturb[1] * torch.randn(p.shape, generator=g))
    dit_path = folder / "dit.pt"
    save_dit_checkpoint(dit_path, cfg, dit, grid, num_classes, mean_norm, ae_path, step=0)
    return dit_path, ae_path, grid, C


def stub_latent_cache(monkeypatch, num_classes: int, mean_norm: float, grid: list[int],
                      channels: int) -> None:
    """The sampler reads only a cache's attributes (num_classes, classes, mean_norm) through
    dinosae.latents.open_cache: a stand-in module with that interface (the real cache is
    exercised by the pipeline's integration tests)."""
    import sys
    import types

    attrs = {"num_classes": num_classes, "classes": [f"n{i:08d}" for i in range(num_classes)],
             "mean_norm": mean_norm, "grid": grid, "channels": channels, "complete": True}
    latents = types.ModuleType("dinosae.latents")
    latents.open_cache = lambda path, **expect: types.SimpleNamespace(attrs=attrs)
    monkeypatch.setitem(sys.modules, "dinosae.latents", latents)


def kill_sampler_at(monkeypatch, n: int) -> list[int]:
    """rfm.sample raises RuntimeError("killed") on its n-th call (a job killed mid-sampling);
    returns the list of batch sizes it was called with."""
    from dinosae import rfm

    calls, real = [], rfm.sample

    def dying(*args, **kwargs):
        calls.append(len(args[1]))
        if len(calls) == n:
            raise RuntimeError("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(rfm, "sample", dying)
    return calls


def write_shards(folder: Path, images, labels, counts, classes=None, split: str = "train") -> None:
    """A shard folder in the data contract's format, written by hand with plain tarfile (PNG
    members, lossless): tar k holds the next counts[k] images; manifest.json last."""
    import hashlib
    import io
    import json
    import tarfile

    import numpy as np
    from PIL import Image

    labels = np.asarray(labels)
    classes = classes or [f"n{c:08d}" for c in range(int(labels.max()) + 1)]
    folder.mkdir(parents=True)
    shards, index = [], 0
    for k, count in enumerate(counts):
        name = f"shard-{k:06d}.tar"
        with tarfile.open(folder / name, "w") as tar:
            for i in range(index, index + count):
                buf = io.BytesIO()
                Image.fromarray(images[i]).save(buf, format="PNG")
                for ext, data in (("png", buf.getvalue()), ("cls", str(labels[i]).encode())):
                    info = tarfile.TarInfo(f"{i:08d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        data = (folder / name).read_bytes()
        shards.append({"name": name, "count": count, "first_index": index, "bytes": len(data),
                       "sha256": hashlib.sha256(data).hexdigest()})
        index += count
    manifest = {"format": "dinosae-shards", "version": 1, "split": split, "count": index,
                "classes": list(classes),
                "class_counts": {w: int((labels == c).sum()) for c, w in enumerate(classes)},
                "shards": shards,
                "preprocess": {"image_size": int(images.shape[1]), "format": "png",
                               "quality": 95, "resize": "adm-center-crop"},
                "skipped": [], "source": "test"}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def html_table(page: str) -> dict[str, str]:
    """The two-column rows (<td>key</td><td>value</td>) of an HTML page, as a dict."""
    from html.parser import HTMLParser

    rows: list[list[str]] = []

    class Cells(HTMLParser):
        cell: list[str] | None = None

        def handle_starttag(self, tag, attrs):
            if tag == "tr":
                rows.append([])
            elif tag == "td":
                self.cell = []

        def handle_endtag(self, tag):
            if tag == "td" and self.cell is not None:
                rows[-1].append("".join(self.cell))
                self.cell = None

        def handle_data(self, data):
            if self.cell is not None:
                self.cell.append(data)

    Cells().feed(page)
    return {r[0]: r[1] for r in rows if len(r) == 2}


def seeded_weights(shapes: dict[str, list[int]], seed: int) -> dict:
    """Deterministic stand-in weights for a parity fixture too large to store, made alike by the
    fixture's make.py (for the reference code) and by the test (for ours): one generator, names
    in sorted order, N(0, 1) draws scaled by the kind of tensor -- spectral-norm vectors (`*_u`,
    `*_v`) unit length, 1-D weights (norms) 1 + 0.1 z, 1-D biases 0.1 z, cls_token and
    pos_embed 0.02 z, other weights z / sqrt(fan-in)."""
    import math

    import torch

    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in sorted(shapes):
        shape = list(shapes[name])
        t = torch.randn(shape, generator=g, dtype=torch.float32)
        if name.endswith(("_u", "_v")):
            t = t / t.norm()
        elif len(shape) == 1:
            t = 1 + 0.1 * t if name.endswith("weight") else 0.1 * t
        elif name.endswith(("cls_token", "pos_embed")):
            t = 0.02 * t
        else:
            t = t / math.sqrt(math.prod(shape[1:]))
        out[name] = t
    return out
