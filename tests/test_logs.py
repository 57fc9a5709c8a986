"""Live logging (dinosae/train/logs.py) and the gFID proxy (dinosae/train/proxy.py).

The backends are read back with their own readers, independent of the writer: TensorBoard's
EventAccumulator, and W&B's offline run files decoded record by record (the LevelDB-log framing
W&B uses, parsed here; the records are W&B's own protobuf). The proxy's FD is compared with
`dinosae fid` on `dinosae sample`'s output for the same weights."""

from __future__ import annotations

import csv
import logging
import math
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from evalhelpers import write_shards
from helpers import tiny_config
from test_dit import FakeCache

import dinosae.train.dit as TD
from dinosae import evaluate, generate
from dinosae.checkpoint import save_checkpoint
from dinosae.files import read_kv
from dinosae.models.autoencoder import ae_config, build_autoencoder
from dinosae.models.dit import load_dit
from dinosae.train.logs import RunLog
from dinosae.train.proxy import GFIDProxy

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(tmp_path, backends, steps=7):
    cfg = tiny_config(tmp_path)
    cfg["device"] = "cpu"
    cfg["dit"].update(steps=steps, batch_size=8, ckpt_every=3, log_every=1, image_every=100,
                      warmup_steps=2)
    cfg["logging"] = {"backends": backends}
    return {k: cfg[k] for k in ("seed", "device", "dit", "sample", "logging")}


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _killed_then_resumed(cfg, out):
    """A run killed while fetching its 6th batch (last.pt at step 3, rows up to step 5 logged),
    then rerun to the end."""
    def crash(n):
        if n == 6:
            raise KeyboardInterrupt("simulated kill")

    with pytest.raises(KeyboardInterrupt):
        TD.train_dit(cfg, FakeCache(hook=crash), None, out)
    assert [int(r["step"]) for r in _csv(out / "metrics.csv")] == [1, 2, 3, 4, 5]
    TD.train_dit(cfg, FakeCache(), None, out)


def _assert_same_as_csv(rows, series, timing_from_first_run=()):
    """series: tag -> [(step, value)]. Every finite metrics.csv cell (but step) is there, at its
    step, with its value (metrics.csv keeps 6 significant digits), and nothing else. Columns in
    `timing_from_first_run` are compared by step only (W&B keeps the killed run's points)."""
    expect = {}
    for r in rows:
        for k, v in r.items():
            if k != "step" and math.isfinite(float(v)):
                expect.setdefault(k, []).append((int(r["step"]), float(v)))
    assert all(tag.startswith("metrics/") for tag in series)  # one section: every curve
    series = {tag.removeprefix("metrics/"): v for tag, v in series.items()}
    assert sorted(series) == sorted(expect)
    for tag, points in expect.items():
        got = series[tag]
        assert [s for s, _ in got] == [s for s, _ in points], tag  # same steps, no duplicates
        if tag in timing_from_first_run:
            continue
        for (_, a), (_, b) in zip(got, points, strict=True):
            assert a == pytest.approx(b, rel=1e-5, abs=1e-12), tag


# ---------------------------------------------------------------- tensorboard

def test_tensorboard_holds_the_csv_scalars_and_a_resume_continues_the_step_axis(tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    _killed_then_resumed(_cfg(tmp_path, ["csv", "tensorboard"]), out)
    rows = _csv(out / "metrics.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, 8))
    assert "gpu_mem_gb" in rows[0] and "img_per_s" in rows[0] and "lr" in rows[0]
    assert len(list(out.glob("events.out.tfevents.*"))) == 2  # the killed run's and the rerun's

    acc = EventAccumulator(str(out), size_guidance={"scalars": 0})
    acc.Reload()
    series = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    _assert_same_as_csv(rows, series)


def test_images_go_to_tensorboard(tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rgb = np.random.default_rng(0).integers(0, 256, (8, 12, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "grid.png")
    runlog = RunLog(tmp_path, {"logging": {"backends": ["tensorboard"]}})
    runlog.image("samples", 5, tmp_path / "grid.png")
    runlog.close()
    acc = EventAccumulator(str(tmp_path), size_guidance={"images": 0})
    acc.Reload()
    (event,) = acc.Images("images/samples")
    assert event.step == 5 and (event.width, event.height) == (12, 8)
    with Image.open(__import__("io").BytesIO(event.encoded_image_string)) as im:
        assert np.array_equal(np.asarray(im.convert("RGB")), rgb)


# ---------------------------------------------------------------- wandb (offline)

def _wandb_records(path: Path) -> list[bytes]:
    """The records of a W&B transaction log (.wandb): a 7-byte header (':W&B', magic, version),
    then LevelDB-log framing: 32 KiB blocks of chunks (crc32c, length, type: 1 full, 2 first,
    3 middle, 4 last), a block's tail under 7 bytes zero-padded."""
    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    records, pending, pos = [], b"", 7
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            records.append(pending)
            pending = b""
    return records


def _wandb_history(run: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] over every offline run folder of `run`/wandb, in order."""
    import json

    from wandb.proto import wandb_internal_pb2 as pb

    series: dict[str, list[tuple[int, float]]] = {}
    folders = sorted((run / "wandb").glob("offline-run-*"))
    for folder in folders:
        (log_file,) = folder.glob("*.wandb")
        for raw in _wandb_records(log_file):
            rec = pb.Record()
            rec.ParseFromString(raw)
            if rec.WhichOneof("record_type") != "history":
                continue
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                     for i in rec.history.item}
            step = int(items.pop("_step"))
            for k, v in items.items():
                if not k.startswith("_") and isinstance(v, (int, float)):
                    series.setdefault(k, []).append((step, float(v)))
    return series


def test_wandb_offline_run_holds_the_csv_scalars_once(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="the wandb extra is not installed")
    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline is the default
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    _killed_then_resumed(_cfg(tmp_path, ["csv", "wandb"]), out)
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and len({p.name.rsplit("-", 1)[1] for p in runs}) == 1  # one run id
    # steps 4 and 5 were sent by the killed run and are not sent again: the same losses (a resume
    # recomputes them exactly on CPU), the killed run's throughput
    _assert_same_as_csv(_csv(out / "metrics.csv"), _wandb_history(out), ["img_per_s"])


def test_a_backend_that_cannot_start_says_so_and_the_run_goes_on(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="dinosae"):
        TD.train_dit(_cfg(tmp_path, ["csv", "wandb"], steps=3), FakeCache(), None, out)
    lines = [r.getMessage() for r in caplog.records if "wandb" in r.getMessage()]
    assert len(lines) == 1 and "did not start" in lines[0] and "\n" not in lines[0]
    assert [int(r["step"]) for r in _csv(out / "metrics.csv")] == [1, 2, 3]
    assert (out / "checkpoint.pt").is_file()


def test_backends_come_from_the_config_else_the_environment(monkeypatch, caplog):
    from dinosae.train.logs import chosen_backends

    monkeypatch.setenv("DINOSAE_LOGGING", "csv,wandb")  # what common.smk hands the rules' jobs
    assert chosen_backends({"logging": {"backends": ["csv", "tensorboard"]}}) == \
        ["csv", "tensorboard"]
    assert chosen_backends({"dit": {}}) == ["csv", "wandb"]
    monkeypatch.setenv("DINOSAE_LOGGING", "tensorbord,csv")
    with caplog.at_level(logging.WARNING, logger="dinosae"):
        assert chosen_backends({}) == ["csv"]
    assert "'tensorbord'" in caplog.text
    monkeypatch.delenv("DINOSAE_LOGGING")
    assert chosen_backends({}) == ["csv"]


# ---------------------------------------------------------------- the gFID proxy

def test_gfid_proxy_equals_dinosae_fid_on_the_same_samples(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path)
    cfg["device"] = "cpu"
    cfg["dit"].update(steps=4, batch_size=8, ckpt_every=10, log_every=3, image_every=100,
                      eval_every=2, eval_samples=7)
    # sampler and extractor batches that do not divide the sample count
    cfg["sample"].update(num_samples=7, batch_size=3, steps=3, cfg_scale=1.5, s_vae=2.5)
    cfg["eval"].update(batch_size=4)
    torch.manual_seed(0)
    ae = build_autoencoder(cfg)
    ae_path = tmp_path / "ae.pt"
    sd = ae.state_dict()
    save_checkpoint(ae_path, {"kind": "dinosae-ae", "stage": 4, "step": 0,
                              "config": ae_config(cfg), "model": sd, "ema": sd})
    real = np.random.default_rng(1).integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
    write_shards(tmp_path / "val", real, [i % 3 for i in range(10)])
    ref = tmp_path / "reference.npz"
    evaluate.fid_reference(cfg, str(tmp_path / "val"), str(ref), ae=str(ae_path))

    out = tmp_path / "dit"
    cache = FakeCache(grid=tuple(ae.grid), C=ae.channels, K=3)
    TD.train_dit(cfg, cache, str(ae_path), out, reference=str(ref))
    rows = _csv(out / "metrics.csv")
    proxy = {int(r["step"]): float(r["FD_teacher_proxy"]) for r in rows}
    assert [s for s, v in proxy.items() if math.isfinite(v)] == [2, 4]  # every 2 steps
    assert [int(r["step"]) for r in rows] == [2, 3, 4]  # eval steps are logged too
    assert float(rows[-1]["proxy_sec"]) > 0

    # `dinosae sample` + `dinosae fid` on the final EMA weights, eval_samples samples
    samples = tmp_path / "samples.h5"
    generate.sample_to_h5(cfg, str(out / "checkpoint.pt"), str(ae_path), None, str(samples))
    evaluate.fid(cfg, str(samples), str(ref), str(tmp_path / "gfid.txt"), ae=str(ae_path))
    fid = float(read_kv(tmp_path / "gfid.txt")["FD_teacher"])
    assert math.isfinite(fid) and fid > 0
    assert proxy[4] == pytest.approx(fid, rel=1e-5)  # metrics.csv keeps 6 digits
    # and at full precision, the proxy on the loaded EMA weights
    from dinosae.models.autoencoder import DinoSAE

    model, meta = load_dit(out / "checkpoint.pt")
    direct = GFIDProxy(cfg, DinoSAE.load(str(ae_path)), meta, ref, torch.device("cpu"))(model)
    assert direct["FD_teacher_proxy"] == pytest.approx(fid, abs=2e-6)  # gfid.txt: 6 decimals
    # the proxy's sampler runs at dit.eval_precision, the samples' own setting left alone
    seen, decoded = [], generate.decoded_samples
    monkeypatch.setattr(generate, "decoded_samples",
                        lambda *a, **k: seen.append(a[3]["precision"]) or decoded(*a, **k))
    cfg["sample"]["precision"], cfg["dit"]["eval_precision"] = "fp32", "bf16"
    GFIDProxy(cfg, DinoSAE.load(str(ae_path)), meta, ref, torch.device("cpu"))(model)
    assert seen == ["bf16"] * 3 and cfg["sample"]["precision"] == "fp32"  # 7 samples, batch 3


def test_gfid_proxy_needs_its_inputs(tmp_path):
    from dinosae.errors import ConfigError

    cfg = tiny_config(tmp_path)
    cfg["device"] = "cpu"
    cfg["dit"].update(eval_every=2)
    with pytest.raises(ConfigError, match="--reference"):
        TD.train_dit(cfg, FakeCache(), None, tmp_path / "dit")
