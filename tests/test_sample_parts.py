"""Sampling spread over jobs: `dinosae sample --part i/K` draws whole batches of the one-job run,
`dinosae sample-gather` joins the K part files into the very samples.h5 one job writes
(datasets and attributes equal), after checking every part; a bad, missing, incomplete or
stale part is one line (exit 2) and writes nothing. Through the real local Slurm (marked
`slurm`), rules sample_part x 2 + sample_gather give the one-job file too."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from helpers import kill_sampler_at, tiny_config, workflow_copy, write_generator

from dinosae import generate, rfm
from dinosae.cli import main
from dinosae.errors import ConfigError
from dinosae.models.dit import load_dit

NUM_CLASSES = 3
S_VAE = 7.5


def make_checkpoints(folder: Path, cfg: dict, dit_seed: int = 1) -> tuple[str, str]:
    """A tiny AE (stage 4) and a DiT whose weights are all non-zero (random, not the zero
    adaLN init), so that every sample depends on its label as well as its noise."""
    dit_path, ae_path, _, _ = write_generator(folder, cfg, NUM_CLASSES, S_VAE,
                                              perturb=(dit_seed, 0.05))
    return str(dit_path), str(ae_path)


def sample_config(tmp: Path, n: int = 13, batch: int = 2) -> dict:
    cfg = tiny_config(tmp)
    cfg["sample"].update(num_samples=n, batch_size=batch, steps=2, cfg_scale=1.5, s_vae=S_VAE,
                         export_npz=True, parts=3)
    cfg["device"] = "cpu"
    return cfg


def cli(capsys, *args: str, cfg: dict) -> tuple[int, str]:
    capsys.readouterr()
    rc = main([*args, "--cfg", json.dumps(cfg)])
    return rc, capsys.readouterr().err


def one_line(rc: int, err: str, *needles: str) -> None:
    assert rc == 2, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("dinosae")]
    assert "Traceback" not in err and len(lines) == 1, err[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]


def assert_same_file(a: Path, b: Path) -> None:
    """Every dataset (values, dtype, shape, chunks, filters) and every attribute (value, HDF5
    type, shape) of a equal to b's."""
    with h5py.File(a, "r") as x, h5py.File(b, "r") as y:
        assert sorted(x) == sorted(y)
        for k in x:
            dx, dy = x[k], y[k]
            assert (dx.dtype, dx.shape, dx.chunks, dx.compression, dx.fillvalue) == \
                (dy.dtype, dy.shape, dy.chunks, dy.compression, dy.fillvalue), k
            np.testing.assert_array_equal(dx[()], dy[()], err_msg=k)
        assert sorted(x.attrs) == sorted(y.attrs)
        for k in x.attrs:
            ix, iy = x.attrs.get_id(k), y.attrs.get_id(k)
            assert ix.get_type().equal(iy.get_type()) and ix.shape == iy.shape, k
            assert np.array_equal(np.asarray(x.attrs[k]), np.asarray(y.attrs[k])), k


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One job's samples.h5 and the three part files of the same run (13 samples, batches of
    2: parts of 2, 2 and 3 batches), written through the CLI."""
    tmp = tmp_path_factory.mktemp("parts")
    cfg = sample_config(tmp)
    dit, ae = make_checkpoints(tmp / "ckpt", cfg)
    one = tmp / "one" / "samples.h5"
    generate.sample_to_h5(cfg, dit, ae, None, str(one))
    parts = [tmp / "parts" / f"{i}.h5" for i in range(3)]
    for i, p in enumerate(parts):
        assert main(["sample", "--cfg", json.dumps(cfg), "--dit", dit, "--ae", ae,
                     "--part", f"{i}/3", "--out", str(p)]) == 0
    return cfg, dit, ae, one, parts


def test_part_ranges_are_whole_batches_of_the_one_job_run():
    assert generate.part_ranges(13, 2, 3) == [(0, 4), (4, 8), (8, 13)]
    for n in (1, 5, 12, 13, 50):
        for bs in (1, 2, 5, 7):
            batches = [(a, min(a + bs, n)) for a in range(0, n, bs)]  # the one job's
            for k in range(1, len(batches) + 1):
                ranges = generate.part_ranges(n, bs, k)
                assert len(ranges) == k and ranges[0][0] == 0 and ranges[-1][1] == n
                sizes = []
                for (lo, hi), nxt in zip(ranges, [*ranges[1:], (n, n)], strict=True):
                    assert hi == nxt[0]  # contiguous, in order
                    mine = [b for b in batches if lo <= b[0] < hi]
                    assert mine and mine[0][0] == lo and mine[-1][1] == hi  # whole batches
                    sizes.append(len(mine))
                assert max(sizes) - min(sizes) <= 1  # as even as batches go
            with pytest.raises(ConfigError, match="sample.parts"):
                generate.part_ranges(n, bs, len(batches) + 1)


def test_gathered_parts_equal_one_job(run, tmp_path, capsys):
    cfg, dit, ae, one, parts = run
    with h5py.File(parts[2], "r") as f:  # the uneven last part: samples 8..12, 3 batches
        assert list(f.attrs["part"]) == [2, 3] and list(f.attrs["part_range"]) == [8, 13]
        assert f["images"].shape[0] == 5 and f.attrs["format"] == generate.PART_FORMAT
    out = tmp_path / "gathered" / "samples.h5"
    rc, err = cli(capsys, "sample-gather", "--dit", dit, "--ae", ae, "--out", str(out),
                  "--parts", *map(str, parts), cfg=cfg)
    assert rc == 0, err
    assert_same_file(out, one)
    with np.load(out.with_suffix(".npz")) as a, np.load(one.with_suffix(".npz")) as b:
        np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
        np.testing.assert_array_equal(a["arr_1"], b["arr_1"])
    assert out.with_suffix(".png").read_bytes() == one.with_suffix(".png").read_bytes()
    # the output depends on labels, not only on the noise: a sample drawn with another label
    # from the same seed differs (a part that mixed up its labels could not pass above)
    model, meta = load_dit(dit)
    from dinosae.models.autoencoder import DinoSAE

    with h5py.File(one, "r") as f:
        images, seeds = f["images"][:], f["seeds"][:]
    other = generate.decoded_samples(model, DinoSAE.load(ae), meta, cfg["sample"],
                                     np.array([1]), seeds[9:10], S_VAE, torch.device("cpu"))
    same = generate.decoded_samples(model, DinoSAE.load(ae), meta, cfg["sample"],
                                    np.array([0]), seeds[9:10], S_VAE, torch.device("cpu"))
    np.testing.assert_array_equal(same[0], images[9])  # sample 9 is class 9 mod 3 = 0
    assert np.abs(other[0].astype(int) - images[9].astype(int)).max() > 8


def test_bad_missing_incomplete_or_stale_parts_are_one_line(run, tmp_path, capsys,
                                                            monkeypatch):
    cfg, dit, ae, one, parts = run
    p = [str(x) for x in parts]
    out = tmp_path / "g" / "samples.h5"

    def gather(*part_files: str, cfg: dict = cfg, dit: str = dit) -> str:
        rc, err = cli(capsys, "sample-gather", "--dit", dit, "--ae", ae, "--out", str(out),
                      "--parts", *part_files, cfg=cfg)
        assert not out.parent.exists() or not any(out.parent.iterdir())  # nothing written
        return rc, err

    # a missing part
    one_line(*gather(p[0], p[1], str(tmp_path / "nope.h5")), "nope.h5", "missing")
    # not a part: a text file, one job's samples.h5
    text = tmp_path / "text.h5"
    text.write_text("no\n")
    one_line(*gather(p[0], str(text), p[2]), "text.h5", "not an HDF5 file")
    one_line(*gather(p[0], str(one), p[2]), "samples.h5", "not a part")
    # in the wrong order; fewer parts than the run was split into
    one_line(*gather(p[1], p[0], p[2]), "1.h5", "is part 1/3, given as part 0/3")
    two = {**cfg, "sample": {**cfg["sample"], "parts": 2}}
    one_line(*gather(p[0], p[1], cfg=two), "0.h5", "is part 0/3, given as part 0/2")
    # a part of another run (another guidance scale), sampled for real
    stale = tmp_path / "stale" / "1.h5"
    other = {**cfg, "sample": {**cfg["sample"], "cfg_scale": 2.0}}
    rc, err = cli(capsys, "sample", "--dit", dit, "--ae", ae, "--part", "1/3", "--out",
                  str(stale), cfg=other)
    assert rc == 0, err
    one_line(*gather(p[0], str(stale), p[2]), "1.h5", "another run than", "cfg_scale")
    # parts of this run, but the config or the DiT now says otherwise
    reseeded = {**cfg, "seed": 5}
    one_line(*gather(*p, cfg=reseeded), "0.h5", "other settings or checkpoints", "seed")
    dit2, _ = make_checkpoints(tmp_path / "other", sample_config(tmp_path), dit_seed=2)
    one_line(*gather(*p, dit=dit2), "0.h5", "dit_sha256")
    # an incomplete part: the .partial file of a part killed after its first batch
    calls = []
    real = rfm.sample

    def dying(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("killed")
        return real(*a, **k)

    monkeypatch.setattr(rfm, "sample", dying)
    killed = tmp_path / "killed" / "2.h5"
    with pytest.raises(RuntimeError, match="killed"):
        generate.sample_to_h5(cfg, dit, ae, None, str(killed), part=(2, 3))
    partial = killed.with_name("2.h5.partial")
    one_line(*gather(p[0], p[1], str(partial)), "2.h5.partial", "incomplete (2/5 samples")
    # a part whose range was tampered with
    moved = tmp_path / "moved.h5"
    shutil.copy(p[2], moved)
    with h5py.File(moved, "r+") as f:
        f.attrs["part_range"] = [7, 12]
    one_line(*gather(p[0], p[1], str(moved)), "moved.h5", "holds samples 7..11",
             "is samples 8..12")


def test_killed_part_resumes_and_leaves_the_others(run, tmp_path, monkeypatch):
    cfg, dit, ae, _, parts = run
    work = tmp_path / "parts"
    shutil.copytree(parts[0].parent, work)
    before = {f.name: (f.stat().st_mtime_ns, f.read_bytes()) for f in work.iterdir()}
    (work / "1.h5").unlink()
    real = rfm.sample
    calls = kill_sampler_at(monkeypatch, 2)
    with pytest.raises(RuntimeError):
        generate.sample_to_h5(cfg, dit, ae, None, str(work / "1.h5"), part=(1, 3))
    calls.clear()
    monkeypatch.setattr(rfm, "sample", lambda *a, **k: (calls.append(len(a[1])),
                                                          real(*a, **k))[1])
    generate.sample_to_h5(cfg, dit, ae, None, str(work / "1.h5"), part=(1, 3))
    assert calls == [2]  # only the batch the kill lost (samples 6, 7)
    assert_same_file(work / "1.h5", parts[1])
    for name in ("0.h5", "2.h5"):
        f = work / name
        assert (f.stat().st_mtime_ns, f.read_bytes()) == before[name]
    assert sorted(f.name for f in work.iterdir()) == ["0.h5", "1.h5", "2.h5"]


def test_status_counts_the_samples_of_the_parts(run, tmp_path):
    from dinosae import status

    _, _, _, _, parts = run
    folder = tmp_path / "results" / "samples" / "parts"
    folder.mkdir(parents=True)
    shutil.copy(parts[0], folder / "0.h5")  # finished: 4 samples
    shutil.copy(parts[2], folder / "2.h5.partial")  # running: 2 of its 5 so far
    with h5py.File(folder / "2.h5.partial", "r+") as f:
        f.attrs["done"] = 2
    s = status.samples(tmp_path / "results")
    assert (s.state, s.metrics) == ("partial", "6/13 images (1 of 3 parts done)")


def test_paper_dag_samples_in_eight_parts_and_one_gather(tmp_path):
    # workflow/configs/imagenet256.yaml: sample.parts 8 -> sample_part x 8 + sample_gather
    # (rule sample is not planned), each part its own --part i/8; fid reads the gathered file
    from test_workflow import dry_run, job_counts

    workflow_copy(tmp_path / "wf")
    for split in ("train", "val"):
        (tmp_path / "imagenet" / split).mkdir(parents=True)
    r = dry_run("-p", "--configfile", "workflow/configs/imagenet256.yaml", "--config",
                f"data={{root: {tmp_path / 'imagenet'}}}", cwd=tmp_path / "wf")
    assert r.returncode == 0, r.stderr
    counts = job_counts(r.stdout)
    assert counts["sample_part"] == 8 and counts["sample_gather"] == 1 and "sample" not in counts
    parts = sorted(ln for ln in r.stdout.splitlines() if "dinosae sample " in ln)
    assert sorted(ln.split("--part ")[1].split()[0] for ln in parts) == [f"{i}/8"
                                                                         for i in range(8)]
    assert all("--out results/samples/parts/" in ln for ln in parts)
    (gather,) = [ln for ln in r.stdout.splitlines() if "dinosae sample-gather" in ln]
    assert "--parts " + " ".join(f"results/samples/parts/{i}.h5" for i in range(8)) in gather
    fid = r.stdout.split("rule fid:")[1].split("\n\n")[0]
    assert "input: results/samples/samples.h5" in fid


def test_plan_prices_a_sample_part():
    from dinosae import plan

    cfg = tiny_config()
    data = plan.Dataset(train=100, val=50, classes=10, source="test")
    for k in (1, 8):
        cfg["sample"]["parts"] = k
        assert plan.rule_loads(cfg, data)["sample"].jobs == k


# ---------------------------------------------------------------- through the real Slurm

@pytest.mark.slurm
@pytest.mark.integration
@pytest.mark.timeout(600)
def test_two_parts_through_slurm_equal_one_job(tmp_path: Path, monkeypatch):
    """sample_part x 2 and sample_gather submitted to the local Slurm (the DiT and AE are made
    here, upstream rules are not allowed to run) give the samples.h5 of one job."""
    from test_slurm import PROFILE, SNAKEMAKE, our_jobs, require_slurm

    require_slurm()
    cfg = sample_config(tmp_path, n=6, batch=2)
    cfg["sample"].update(parts=2, export_npz=False)
    cfg["device"] = "auto"
    work = tmp_path / "work"
    made = work / "made"
    dit, ae = make_checkpoints(made, cfg)
    cfg["dit"]["pretrained"] = dit  # an imported generator: no latent cache to build
    workflow_copy(work, cfg)
    for src, dst in ((dit, "results/dit/checkpoint.pt"), (ae, "results/ae/stage4/checkpoint.pt")):
        (work / dst).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, work / dst)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    t0 = time.time()
    try:
        # the target first: --allowed-rules takes several values
        r = subprocess.run([SNAKEMAKE, "results/samples/samples.h5", "--profile", str(PROFILE),
                            "--workflow-profile", "none",
                            "--allowed-rules", "sample_part", "sample_gather"], cwd=work,
                           capture_output=True, text=True, timeout=480, env=env)
    except subprocess.TimeoutExpired:
        for line in our_jobs(work):
            subprocess.run(["scancel", line.split()[0].split("=")[1]], timeout=30)
        raise
    logs = "".join(f"\n--- {p}\n{p.read_text()[-2000:]}"
                   for p in sorted(work.glob(".snakemake/slurm_logs/**/*.log")))
    assert r.returncode == 0, f"snakemake via Slurm failed:\n{r.stderr[-5000:]}{logs}"
    print(f"2 sample parts + gather through Slurm: {time.time() - t0:.0f} s")
    rules = {p.name for p in (work / ".snakemake/slurm_logs").iterdir()}
    assert {"rule_sample_part", "rule_sample_gather"} <= rules, rules
    assert len(list((work / ".snakemake/slurm_logs/rule_sample_part").rglob("*.log"))) == 2
    # one job, in this process, with the paths and config sections the rules pass
    monkeypatch.chdir(work)
    one = tmp_path / "one" / "samples.h5"
    generate.sample_to_h5(cfg, "results/dit/checkpoint.pt", "results/ae/stage4/checkpoint.pt",
                          None, str(one))
    assert_same_file(work / "results/samples/samples.h5", one)
