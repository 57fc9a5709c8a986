"""Recovery from divergence (train.loop.Recovery): NaN losses injected with DINOSAE_FAULT
(dinosae/faults.py) make max_bad_steps non-finite steps in a row; the run rolls back to last.pt
with the learning rate scaled, finishes, and metrics.csv and the log show the rollback; without
rollbacks left it stops as before."""

from __future__ import annotations

import csv
import logging

import pytest
import torch
from helpers import ae_stages, tiny_config
from test_dit import FakeCache

from dinosae import faults
from dinosae.checkpoint import load_checkpoint
from dinosae.errors import NumericsError
from dinosae.train import dit as TD
from dinosae.train.ae import train_stage
from dinosae.train.loop import Recovery, lr_at

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def fault(monkeypatch):
    """Set DINOSAE_FAULT with the per-process call counts started afresh."""
    def set_fault(spec: str) -> None:
        monkeypatch.setattr(faults, "_calls", {})
        monkeypatch.setenv(faults.ENV, spec)
    return set_fault


def rows(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def dit_cfg(tmp_path, **dit) -> dict:
    cfg = tiny_config(tmp_path)
    cfg["device"] = "cpu"
    cfg["dit"].update(steps=8, batch_size=8, ckpt_every=3, log_every=1, image_every=100,
                      warmup_steps=2, max_bad_steps=2, rollbacks=2, rollback_lr_factor=0.5)
    cfg["dit"].update(dit)
    return {k: cfg[k] for k in ("seed", "device", "dit", "sample")}


def test_dit_rolls_back_scales_the_lr_and_finishes(tmp_path, fault, caplog):
    cfg = dit_cfg(tmp_path)
    fault("train-dit-loss@5-6:nan")  # steps 5 and 6: two in a row; last.pt is at step 3
    with caplog.at_level(logging.WARNING):
        out = TD.train_dit(cfg, FakeCache(), None, tmp_path / "run")
    ck = load_checkpoint(out)
    assert ck["step"] == 8 and ck["recovery"] == {"rollbacks": 1, "lr_scale": 0.5}
    assert all(torch.isfinite(p).all() for p in ck["model"].values())
    assert ck["bad_steps"] == 0  # the bad steps were rolled back with the rest
    log = rows(tmp_path / "run" / "metrics.csv")
    # steps 1-3 (a resume keeps the rows up to the step last.pt holds), the rollback row at 3,
    # then 4..8 again at half the lr
    assert [(r["step"], r["rollbacks"]) for r in log] == [
        ("1", "0"), ("2", "0"), ("3", "0"), ("3", "1"), ("4", "1"), ("5", "1"), ("6", "1"),
        ("7", "1"), ("8", "1")]
    assert float(log[3]["lr_scale"]) == 0.5 and log[3]["loss"] == ""
    base = cfg["dit"]["lr"]
    for r in log[:3]:
        assert float(r["lr"]) == pytest.approx(lr_at(int(r["step"]) - 1, base, 2, 8, "constant"))
    for r in log[4:]:
        assert float(r["lr"]) == pytest.approx(0.5 * base)
    assert any("rolling back to step 3" in m and "x0.5" in m for m in caplog.messages)


def test_dit_without_rollbacks_left_stops(tmp_path, fault):
    fault("train-dit-loss@4-100:nan")
    with pytest.raises(NumericsError, match=r"2 non-finite DiT steps in a row .*after 2 "
                                            r"rollback\(s\)"):
        TD.train_dit(dit_cfg(tmp_path), FakeCache(), None, tmp_path / "a")
    fault("train-dit-loss@2-3:nan")  # before the first last.pt (step 3)
    with pytest.raises(NumericsError, match="no checkpoint to roll back to"):
        TD.train_dit(dit_cfg(tmp_path), FakeCache(), None, tmp_path / "b")
    fault("train-dit-loss@5-6:nan")
    with pytest.raises(NumericsError, match="2 non-finite DiT steps in a row"):
        TD.train_dit(dit_cfg(tmp_path, rollbacks=0), FakeCache(), None, tmp_path / "c")


def test_ae_stage_rolls_back_and_finishes(tmp_path, fault, caplog):
    cfg = tiny_config()
    cfg["device"] = "cpu"
    cfg["autoencoder"]["lpips"]["net"] = "alex"
    cfg["ae_train"].update(stages=ae_stages([6, 4, 3, 3], 4, cfg["ae_train"]["stages"][0]["lr"]),
                           log_every=1, image_every=100,
                           ckpt_every=2, max_bad_steps=2, rollbacks=1, rollback_lr_factor=0.25)
    data = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    def batches(epoch):
        for i in (0, 4):
            yield data[i:i + 4], torch.zeros(4, dtype=torch.long)

    fault("ae-stage1-loss@3-4:nan")  # steps 3 and 4; last.pt at step 2
    with caplog.at_level(logging.WARNING):
        train_stage(cfg, 1, None, out=str(tmp_path / "s1"), batches=batches)
    ck = load_checkpoint(tmp_path / "s1" / "checkpoint.pt")
    assert ck["step"] == 6 and ck["skipped"] == 0
    assert ck["recovery"] == {"rollbacks": 1, "lr_scale": 0.25}
    log = rows(tmp_path / "s1" / "metrics.csv")
    assert [(r["step"], r["rollbacks"]) for r in log] == [
        ("1", "0"), ("2", "0"), ("2", "1"), ("3", "1"), ("4", "1"), ("5", "1"), ("6", "1")]
    assert log[2]["loss"] == "" and float(log[2]["lr_scale"]) == 0.25
    t = cfg["ae_train"]
    for r in log[3:]:
        step = int(r["step"]) - 1
        assert float(r["lr"]) == pytest.approx(
            0.25 * lr_at(step, t["stages"][0]["lr"], t["warmup_steps"], 6, t["schedule"]), rel=1e-5)
    assert any("ae stage 1" in m and "rolling back to step 2" in m for m in caplog.messages)


def test_a_resumed_run_keeps_the_reduced_learning_rate():
    r = Recovery({"rollbacks": 3, "rollback_lr_factor": 0.5}, "x")
    r.adopt({"rollbacks": 2, "lr_scale": 0.25})  # a new process resuming last.pt
    assert (r.rollbacks, r.lr_scale) == (2, 0.25)
    r.rollbacks, r.lr_scale = 3, 0.125  # this process rolled back since last.pt was written
    r.adopt({"rollbacks": 2, "lr_scale": 0.25})
    assert (r.rollbacks, r.lr_scale) == (3, 0.125)
