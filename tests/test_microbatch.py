"""`dinosae plan --gpu`: the largest micro-batch that fits, against a scan of every size."""

from __future__ import annotations

import pytest
from helpers import tiny_config

from dinosae import plan as P
from dinosae.microbatch import Fit, format_fits, largest_fitting


@pytest.mark.parametrize("budget", [0.5, 1.0, 7.5, 40.0, 1e9])
def test_largest_fitting_equals_a_scan(budget):
    def peak(b):
        return 1.0 + 0.75 * b + (b // 5)  # grows, not linearly

    scan = [b for b in range(1, 33) if peak(b) <= budget]
    assert largest_fitting(peak, 32, budget) == (max(scan) if scan else None)


@pytest.mark.parametrize("most", [2, 7, 64, 1000])
@pytest.mark.parametrize("shape", ["affine", "convex", "steps", "concave"])
def test_largest_fitting_equals_a_scan_for_every_budget(shape, most):
    peak = {"affine": lambda b: 3.0 + 1.25 * b, "convex": lambda b: 1.0 + b + 0.02 * b * b,
            "steps": lambda b: 10.0 * (1 + b // 16), "concave": lambda b: 5.0 * b ** 0.5}[shape]
    budgets = sorted({peak(b) + d for b in range(1, most + 1) for d in (-1e-9, 0.0)})
    for budget in [peak(1) - 1, *budgets[:: max(1, len(budgets) // 60)], peak(most) + 1]:
        scan = [b for b in range(1, most + 1) if peak(b) <= budget]
        assert largest_fitting(peak, most, budget) == (max(scan) if scan else None), budget


def test_largest_fitting_probes_few_sizes_when_memory_grows_linearly():
    # each probe is a fake-tensor trace of ViT-L or DiT-XL (seconds): a binary search over
    # 1..128 takes 7 after the two ends; the line through the ends lands within one
    probed = []

    def peak(b):
        probed.append(b)
        return 0.4e9 + 1.17e9 * b + (0.05e9 if b % 3 else 0.0)  # nearly affine

    for budget in (36e9, 65e9, 71.9e9, 100e9):
        probed.clear()
        got = largest_fitting(peak, 128, budget)
        assert peak(got) <= budget < peak(got + 1)
        assert len(probed) - 2 <= 2 + 2, probed  # the two ends, a guess, its neighbour (+1 round)


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

    chosen = int(out.split("dit.micro_batch=")[1].split(")")[0])
    assert chosen >= 20 and fits(chosen) and not fits(chosen + 1)  # the peak grows with b
    assert "micro-batches on a tiny GPU" in out and p.gpu is small
    text = format_fits([Fit("ae_stage1", 8, None, 0.0, 8), Fit("ae_stage2", 8, 3, 2e9, 8),
                        Fit("sample", 250, 250, 7e9, 250), Fit("fid", 250, 99, 7e9, 250)],
                       "X", 72)
    assert "not even one image" in text and "micro-batch    3 x   3 steps,   2.0 GB" in text
    assert "fits,   7.0 GB" in text and "eval.batch_size=99" in text
