"""`dinosae plan --gpu`: the largest micro-batch that fits, against a scan of every size."""

from __future__ import annotations

import pytest
from helpers import tiny_config

from dinosae import plan as P
from dinosae.microbatch import format_fits, largest_fitting


@pytest.mark.parametrize("budget", [0.5, 1.0, 7.5, 40.0, 1e9])
def test_largest_fitting_equals_a_scan(budget):
    def peak(b):
        return 1.0 + 0.75 * b + (b // 5)  # grows, not linearly

    scan = [b for b in range(1, 33) if peak(b) <= budget]
    assert largest_fitting(peak, 32, budget) == (max(scan) if scan else None)


@pytest.mark.integration
def test_plan_prints_the_micro_batch_that_fits_a_small_gpu(monkeypatch, capsys, tmp_path):
    cfg = tiny_config(tmp_path)
    cfg["dit"]["batch_size"] = 64
    small = {"name": "a tiny GPU", "bf16": 1.0, "tf32": 1.0, "fp32": 1.0}
    m = P.measure_work(cfg, P.dataset_counts(cfg).classes)
    full = P.make_plan(cfg, "h100", gpus=1)
    dit = next(r for r in full.rules if r.rule == "train_dit")
    assert dit.batch == 64
    # a GPU on which 20 of the 64 DiT samples fit: the scan finds the largest size that does
    target = dit.state_bytes + m.rules["train_dit"].peak_live(20)
    small["memory_gb"] = target / P.FIT_FRACTION / 1e9 * (1 + 1e-9)
    monkeypatch.setattr(P, "load_gpus", lambda path=None: {"tiny": small})
    p = P.plan(cfg, "tiny", gpus=1)
    out = capsys.readouterr().out
    budget = P.FIT_FRACTION * small["memory_gb"] * 1e9
    def fits(b):
        return dit.state_bytes + m.rules["train_dit"].peak_live(b) <= budget

    chosen = int(out.split("dit.micro_batch=")[1].split()[0])
    assert chosen >= 20 and fits(chosen) and not fits(chosen + 1)  # the peak grows with b
    assert "micro-batches on a tiny GPU" in out and p.gpu is small
    text = format_fits([("ae_stage1", 8, None, 0.0), ("ae_stage2", 8, 8, 2e9)], "X")
    assert "not even one image" in text and "per-GPU batch 8 fits (2.0 GB)" in text
