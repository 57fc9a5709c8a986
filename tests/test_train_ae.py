"""Autoencoder training stages on CPU with tiny networks and an in-memory dataset:
what trains and what stays frozen, the stage chain, resume after a kill, non-finite steps,
init checks, and DDP (two gloo processes) against one process on the combined batch."""

from __future__ import annotations

import csv
import faulthandler
import json
import os
import signal
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import ae_stages, tiny_config

from dinosae.checkpoint import load_checkpoint, tensors_fingerprint
from dinosae.errors import ConfigError, NumericsError
from dinosae.models.autoencoder import build_autoencoder
from dinosae.models.discriminator import Discriminator
from dinosae.models.encoder import create_teacher
from dinosae.train.ae import noise_tau, train_stage

N_IMAGES = 12


pytestmark = pytest.mark.usefixtures("one_thread")


def small_config() -> dict:
    cfg = tiny_config()
    cfg["device"] = "cpu"
    cfg["autoencoder"]["lpips"]["net"] = "alex"  # the cheapest backbone for 32 px tests
    cfg["ae_train"].update(stages=ae_stages([4, 4, 3, 3], 4, 2e-4), disc_warmup_steps=1,
                           noise_tau=[0.8, 1.2], log_every=1, image_every=2, ckpt_every=2,
                           max_bad_steps=3)
    return cfg


def images() -> torch.Tensor:
    return torch.rand(N_IMAGES, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def make_batches(data: torch.Tensor, batch: int, shuffle: bool = True, rank: int = 0,
                 world: int = 1, hooks: dict | None = None):
    """epoch -> batches of `batch` images (this rank's share), order a function of epoch only.
    hooks: {global batch count: callable} run before that batch is handed out."""
    count = {"n": 0}

    def epoch_fn(epoch: int):
        g = torch.Generator().manual_seed(epoch)
        order = torch.randperm(len(data), generator=g) if shuffle else torch.arange(len(data))
        for i in range(0, len(data) - batch + 1, batch):
            idx = order[i:i + batch]
            share = batch // world
            idx = idx[rank * share:(rank + 1) * share]
            count["n"] += 1
            if hooks and count["n"] in hooks:
                hooks[count["n"]]()
            yield data[idx], torch.zeros(len(idx), dtype=torch.long)

    return epoch_fn


def rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    """One stage-1 run shared by the tests: (out dir, returned model, initial state dict)."""
    cfg = small_config()
    out = tmp_path_factory.mktemp("stage1")
    torch.manual_seed(cfg["seed"])  # the loop builds the same initial network from the seed
    init_state = {k: v.clone() for k, v in build_autoencoder(cfg).state_dict().items()}
    ae = train_stage(cfg, 1, None, out=str(out), batches=make_batches(images(), 4))
    return out, ae, init_state


def _stem_decoder(sd: dict) -> dict:
    return {k: v for k, v in sd.items() if k.startswith(("encoder.stem.", "decoder."))}


def _encoder(sd: dict) -> dict:
    return {k: v for k, v in sd.items() if k.startswith("encoder.")}


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_stage1_trains_stem_and_decoder_only(stage1):
    out, ae, init_state = stage1
    ck = torch.load(out / "checkpoint.pt", weights_only=True)  # plain tensors and containers
    assert ck["kind"] == "dinosae-ae" and ck["stage"] == 1 and ck["step"] == 4
    assert set(ck["config"]) == {"autoencoder", "data"} and ck["config"]["data"]["image_size"] == 32
    assert not (out / "last.pt").exists()
    # the frozen ViT: never a gradient, values bit-identical to the seeded teacher
    for name, p in ae.teacher.named_parameters():
        assert p.grad is None and not p.requires_grad, name
    vit = {k: v for k, v in ae.state_dict().items() if k.startswith("encoder.vit.")}
    assert vit and all(torch.equal(v, init_state[k]) for k, v in vit.items())
    # lean checkpoint: the teacher is referenced by source and sha256, not stored
    assert not any(k.startswith("encoder.vit.") for k in [*ck["model"], *ck["ema"]])
    assert "optimizer" not in ck
    assert ck["teacher"] == {"weights": "random", "sha256": tensors_fingerprint(ae.teacher)}
    teacher = create_teacher(ck["config"]["autoencoder"]["teacher"], 32)
    assert tensors_fingerprint(teacher) == ck["teacher"]["sha256"]  # rebuilt the same
    # every stem and decoder tensor moved; the EMA lags behind the model
    for k, v in _stem_decoder(ck["model"]).items():
        if not k.endswith(("_u", "_v")):
            assert not torch.equal(v, init_state[k]), k
    assert not _equal(_stem_decoder(ck["model"]), _stem_decoder(ck["ema"]))
    log = rows(out / "metrics.csv")
    assert [int(r["step"]) for r in log] == [1, 2, 3, 4]
    assert all(float(r["align"]) > 0 and r["g_gan"] == "nan" for r in log)
    assert (out / "grid_000002.png").exists() and (out / "grid_000004.png").exists()


def test_stage2_warmup_trains_only_the_discriminator(stage1, tmp_path):
    out1, _, _ = stage1
    cfg = small_config()
    cfg["ae_train"].update(stages=ae_stages([4, 2, 3, 3], 4, 2e-4), disc_warmup_steps=2)
    train_stage(cfg, 2, None, init=str(out1 / "checkpoint.pt"), out=str(tmp_path),
                batches=make_batches(images(), 4))
    prev = load_checkpoint(out1 / "checkpoint.pt")
    ck = load_checkpoint(tmp_path / "checkpoint.pt")
    assert _equal(ck["model"], prev["model"]) and _equal(ck["ema"], prev["ema"])
    log = rows(tmp_path / "metrics.csv")
    assert all(float(r["d_loss"]) > 0 and r["g_gan"] == "nan" for r in log)
    assert "disc" in ck and "disc_optimizer" not in ck  # the final checkpoint: no optimizers
    torch.manual_seed(cfg["seed"])  # the discriminator's initialisation (seeded by the config)
    dcfg = cfg["autoencoder"]["discriminator"]
    fresh = Discriminator(stage1[1].channels, dcfg["layers"], dcfg["channels"]).state_dict()
    moved = [k for k in fresh
             if k.endswith(".original") and not torch.equal(fresh[k], ck["disc"][k])]
    assert moved, "the warm-up did not train the discriminator"


def test_stages_2_3_4_chain(stage1, tmp_path):
    out1, _, _ = stage1
    cfg = small_config()
    outs = {1: out1}
    for k in (2, 3, 4):
        outs[k] = tmp_path / f"stage{k}"
        train_stage(cfg, k, None, init=str(outs[k - 1] / "checkpoint.pt"), out=str(outs[k]),
                    batches=make_batches(images(), 4))
    ck = {k: load_checkpoint(outs[k] / "checkpoint.pt") for k in (1, 2, 3, 4)}
    # stage 2 trains the stem further and uses the GAN term after its one warm-up step
    assert not _equal(_encoder(ck[2]["model"]), _encoder(ck[1]["model"]))
    log2 = rows(outs[2] / "metrics.csv")
    assert log2[0]["g_gan"] == "nan" and all(float(r["lambda"]) >= 0 for r in log2[1:])
    # stages 3 and 4: the encoder is stage 2's EMA encoder, bit for bit, in model and EMA
    final_encoder = _encoder(ck[2]["ema"])
    for k in (3, 4):
        assert _equal(_encoder(ck[k]["model"]), final_encoder)
        assert _equal(_encoder(ck[k]["ema"]), final_encoder)
        dec = {n: v for n, v in ck[k]["model"].items() if n.startswith("decoder.")}
        prev = {n: v for n, v in ck[k - 1]["model"].items() if n.startswith("decoder.")}
        assert not _equal(dec, prev)
        assert not _equal(ck[k]["disc"], ck[k - 1]["disc"])
        assert all(r["align"] == "nan" for r in rows(outs[k] / "metrics.csv"))
    # stage 4's tau ramps over the stage as configured
    taus = [float(r["tau"]) for r in rows(outs[4] / "metrics.csv")]
    lo, hi = cfg["ae_train"]["noise_tau"]
    assert taus == pytest.approx([lo, (lo + hi) / 2, hi])
    assert noise_tau(0, 3, [lo, hi]) == lo


def test_resume_after_kill_matches_uninterrupted_run(stage1, tmp_path):
    """Stage 2 (discriminator, DiffAug, warm-up, EMA) over 6 steps crossing epochs: killed by
    SIGTERM after step 3 and by a crash during step 5, then rerun: identical weights."""
    out1, _, _ = stage1
    cfg = small_config()
    cfg["ae_train"]["stages"] = ae_stages([4, 6, 3, 3], 4, 2e-4)
    init = str(out1 / "checkpoint.pt")
    data = images()
    ref = tmp_path / "ref"
    train_stage(cfg, 2, None, init=init, out=str(ref), batches=make_batches(data, 4))

    run = tmp_path / "run"

    def sigterm():
        os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(SystemExit, match="stopped by signal after step 3"):
        train_stage(cfg, 2, None, init=init, out=str(run),
                    batches=make_batches(data, 4, hooks={3: sigterm}))
    last = torch.load(run / "last.pt", weights_only=True)
    assert last["step"] == 3 and not (run / "checkpoint.pt").exists()

    class Crash(Exception):
        pass

    def crash():
        raise Crash()

    # resumed at step 3 (= all 3 batches of epoch 0, generated again and skipped): batch 5 is
    # step 5's; last.pt (step 4) survives the crash
    with pytest.raises(Crash):
        train_stage(cfg, 2, None, init=init, out=str(run),
                    batches=make_batches(data, 4, hooks={5: crash}))
    assert torch.load(run / "last.pt", weights_only=True)["step"] == 4
    train_stage(cfg, 2, None, init=init, out=str(run), batches=make_batches(data, 4))

    a = torch.load(ref / "checkpoint.pt", weights_only=True)
    b = torch.load(run / "checkpoint.pt", weights_only=True)
    assert not (run / "last.pt").exists()
    for key in ("model", "ema", "disc"):
        assert _equal(a[key], b[key]), key
    # (the final checkpoint holds no optimizer state; equal weights two steps after the
    # resume need the restored Adam moments)
    assert a["data_position"] == b["data_position"]
    assert [r["step"] for r in rows(run / "metrics.csv")] == [str(s) for s in range(1, 7)]


def test_nonfinite_steps_are_skipped_counted_and_stop(tmp_path):
    cfg = small_config()
    data = images()
    bad = data.clone()
    bad[4:8] = float("nan")  # the second batch of every (unshuffled) epoch
    train_stage(cfg, 1, None, out=str(tmp_path / "a"), batches=make_batches(bad, 4, False))
    ck = load_checkpoint(tmp_path / "a" / "checkpoint.pt")
    assert ck["skipped"] == 1 and ck["step"] == 4
    log = rows(tmp_path / "a" / "metrics.csv")
    assert [r["skipped"] for r in log] == ["0", "1", "1", "1"]
    assert log[1]["loss"] == "nan" and log[2]["loss"] != "nan"

    with pytest.raises(NumericsError, match="3 non-finite steps in a row"):
        train_stage(cfg, 1, None, out=str(tmp_path / "b"),
                    batches=make_batches(torch.full_like(data, float("nan")), 4))
    assert not (tmp_path / "b" / "checkpoint.pt").exists()


def test_init_checks(stage1, tmp_path):
    out1, _, _ = stage1
    cfg = small_config()
    init = str(out1 / "checkpoint.pt")
    batches = make_batches(images(), 4)
    with pytest.raises(ConfigError, match="needs --init"):
        train_stage(cfg, 2, None, out=str(tmp_path / "x"), batches=batches)
    with pytest.raises(ConfigError, match="stage 3 starts from a stage 2 checkpoint"):
        train_stage(cfg, 3, None, init=init, out=str(tmp_path / "x"), batches=batches)
    other = small_config()
    other["autoencoder"]["decoder"]["widths"] = [8, 16, 16, 32, 64]
    with pytest.raises(ConfigError, match="different autoencoder architecture.*decoder"):
        train_stage(other, 2, None, init=init, out=str(tmp_path / "x"), batches=batches)
    with pytest.raises(ConfigError, match="not an autoencoder checkpoint"):
        torch.save({"kind": "dinosae-dit"}, tmp_path / "dit.pt")
        train_stage(cfg, 2, None, init=str(tmp_path / "dit.pt"), out=str(tmp_path / "x"),
                    batches=batches)


# ---------------------------------------------------------------------------------- DDP

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, cfg: dict, data: torch.Tensor,
                out: str) -> None:
    faulthandler.dump_traceback_later(150, exit=True)  # a hang fails the test, not the suite
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    # one process group for both stages (torchrun would start a fresh process per stage)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    batch = cfg["ae_train"]["stages"][0]["batch_size"]
    train_stage(cfg, 1, None, out=f"{out}/s1",
                batches=make_batches(data, batch, rank=rank, world=world))
    # stage 2 under DDP too (discriminator DDP, all-reduced adaptive weight): it must run
    train_stage(cfg, 2, None, init=f"{out}/s1/checkpoint.pt", out=f"{out}/s2",
                batches=make_batches(data, batch, rank=rank, world=world))
    dist.destroy_process_group()


def test_ddp_two_processes_match_one_process(tmp_path):
    cfg = small_config()
    cfg["ae_train"].update(stages=ae_stages([2, 2, 1, 1], 8, 2e-4), ckpt_every=100)
    data = images()
    mp.spawn(_ddp_worker, args=(2, _free_port(), cfg, data, str(tmp_path / "ddp")), nprocs=2,
             join=True)
    train_stage(cfg, 1, None, out=str(tmp_path / "one"), batches=make_batches(data, 8))
    a = load_checkpoint(tmp_path / "one" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "ddp" / "s1" / "checkpoint.pt")
    assert b["world_size"] == 2 and a["world_size"] == 1
    torch.manual_seed(cfg["seed"])
    init = build_autoencoder(cfg).state_dict()
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=0, atol=2e-6, msg=k)
        torch.testing.assert_close(b["ema"][k], a["ema"][k], rtol=0, atol=2e-6, msg=k)
    moved = [k for k in _stem_decoder(a["model"]) if not torch.equal(a["model"][k], init[k])]
    assert len(moved) > 10  # the comparison is about real updates
    s2 = load_checkpoint(tmp_path / "ddp" / "s2" / "checkpoint.pt")
    assert s2["stage"] == 2 and s2["step"] == 2 and "disc" in s2


def test_stage1_from_shards_through_the_cli(tmp_path):
    """The default data path (dinosae.data.loader on real shards) and the CLI entry point."""
    from dinosae.cli import main
    from dinosae.data.mini import build_mini_dataset
    from dinosae.data.shard import shard_split

    cfg = tiny_config(tmp_path)
    cfg["data"]["mini"].update(train_per_class=2, val_per_class=1)
    build_mini_dataset(cfg, tmp_path / "mini")
    shard_split(cfg, "train", tmp_path / "shards" / "train")
    out = tmp_path / "ae1"
    cfg_json = json.dumps({k: cfg[k] for k in ("seed", "data", "autoencoder", "ae_train")}
                          | {"device": "cpu"})
    rc = main(["ae-train", "--cfg", cfg_json, "--set", "ae_train.stages.0.steps=3",
               "--set", "autoencoder.lpips.net=alex", "--stage", "1",
               "--shards", str(tmp_path / "shards" / "train"), "--out", str(out)])
    assert rc == 0
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ck["step"] == 3 and ck["data_position"][0][1] > 0
    assert [r["step"] for r in rows(out / "metrics.csv")] == ["2", "3"]
    rc = main(["ae-train", "--cfg", cfg_json, "--stage", "3", "--init", str(out / "checkpoint.pt"),
               "--shards", str(tmp_path / "shards" / "train"), "--out", str(tmp_path / "x")])
    assert rc == 2  # a clear ConfigError, not a traceback


def test_each_stage_trains_at_its_configured_lr_and_batch(tmp_path, monkeypatch):
    """ae_train.stages[k-1] is stage k's: the optimiser's lr and the loader's batch, from shards."""
    import numpy as np
    from helpers import write_shards

    import dinosae.train.ae as ae_mod

    rng = np.random.default_rng(0)
    write_shards(tmp_path / "shards", rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8),
                 [0, 1] * 6, [6, 6])
    cfg = small_config()
    lrs, batches = [1e-5, 1e-4, 3e-4, 5.4e-5], [2, 4, 6, 3]
    cfg["ae_train"].update(stages=[{"steps": 1, "batch_size": b, "lr": r}
                                   for b, r in zip(batches, lrs, strict=True)],
                           schedule="constant", warmup_steps=0, disc_warmup_steps=0,
                           disc_lr=7e-5)
    seen = []
    real_step = ae_mod.generator_step

    def spy(st, model, x, *args, **kwargs):
        out = real_step(st, model, x, *args, **kwargs)
        d_lr = None if st.d_opt is None else {g["lr"] for g in st.d_opt.param_groups}
        seen.append((st.number, x.shape[0], {g["lr"] for g in st.opt.param_groups}, d_lr))
        return out

    monkeypatch.setattr(ae_mod, "generator_step", spy)
    init = None
    for k in (1, 2, 3, 4):
        out = tmp_path / f"s{k}"
        train_stage(cfg, k, str(tmp_path / "shards"), init=init, out=str(out))
        init = str(out / "checkpoint.pt")
    want = [(k, b, {r}) for k, b, r in zip((1, 2, 3, 4), batches, lrs, strict=True)]
    assert [s[:3] for s in seen] == want
    assert [s[3] for s in seen] == [None, {7e-5}, {7e-5}, {7e-5}]


def test_stage4_noise_is_relative_to_each_token_rms():
    """DinoSAE.forward's noise: sigma*eps times ||z_t||/sqrt(C) per token (RAE's ratio)."""
    cfg = small_config()
    torch.manual_seed(0)
    ae = build_autoencoder(cfg).eval()
    with torch.no_grad():  # a trained DINOv3's final-norm affine: components far from unit RMS
        ae.encoder.vit.norm.weight.mul_(3.0)
    x = torch.rand(2, 3, 32, 32)
    noise = 0.5 * torch.randn(2, 4, ae.channels)
    with torch.no_grad():
        z, rec = ae(x, noise)
        rms = z.norm(dim=-1, keepdim=True) / ae.channels ** 0.5
        assert not torch.allclose(rms, torch.ones_like(rms), rtol=0.2)  # the scale matters
        torch.testing.assert_close(rec, ae.decode(z + noise * rms))
        assert noise_tau(5, 10, 0.8) == 0.8 and noise_tau(9, 10, [0.8, 1.2]) == 1.2


@pytest.mark.integration  # ~40 s of CPU: a 22 M-parameter ViT-S/8 at 224 px, built five times
def test_dino_discriminator_stages_train_its_heads_and_reference_its_dino(tmp_path):
    """backbone dino_vits8 (RAE's): stage 2 trains the heads, never the frozen DINO, which the
    checkpoint references by sha256 instead of storing; stage 3 refuses another DINO."""
    from dinosae.models.discriminator import DinoDiscriminator

    cfg = small_config()
    cfg["autoencoder"]["discriminator"] = {"backbone": "dino_vits8", "weights": "random"}
    cfg["ae_train"].update(stages=ae_stages([1, 2, 1, 1], 2, 2e-4), disc_warmup_steps=1)
    data = images()[:4]
    init = None
    for k in (1, 2, 3):
        train_stage(cfg, k, None, init=init, out=str(tmp_path / f"s{k}"),
                    batches=make_batches(data, 2))
        init = str(tmp_path / f"s{k}" / "checkpoint.pt")
    ck2, ck3 = (load_checkpoint(tmp_path / f"s{k}" / "checkpoint.pt") for k in (2, 3))
    torch.manual_seed(cfg["seed"])
    fresh = DinoDiscriminator("random")
    assert not any(k.startswith("dino.") for k in ck2["disc"])
    assert ck2["disc"].keys() == fresh.trainable_state().keys()
    assert ck2["disc_backbone"] == {"weights": "random",
                                    "sha256": tensors_fingerprint(fresh.dino)}
    moved = [k for k, v in fresh.trainable_state().items()
             if k.endswith(".original") and not torch.equal(v, ck2["disc"][k])]
    assert len(moved) == 15  # every conv of the five heads
    assert not _equal(ck3["disc"], ck2["disc"])
    log2 = rows(tmp_path / "s2" / "metrics.csv")
    assert log2[0]["g_gan"] == "nan" and float(log2[1]["lambda"]) > 0
    assert all(float(r["d_loss"]) > 0 for r in log2)
    other = fresh.dino.state_dict()
    other["blocks.0.mlp.fc1.weight"] = other["blocks.0.mlp.fc1.weight"] + 0.01
    torch.save(other, tmp_path / "other_dino.pth")
    cfg["autoencoder"]["discriminator"]["weights"] = str(tmp_path / "other_dino.pth")
    with pytest.raises(ConfigError, match="DINO rebuilt from .* is not the one"):
        train_stage(cfg, 3, None, init=str(tmp_path / "s2" / "checkpoint.pt"),
                    out=str(tmp_path / "x"), batches=make_batches(data, 2))
