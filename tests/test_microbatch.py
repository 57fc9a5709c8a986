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


def test_a_profiles_micro_batch_resource_reaches_the_rules_config(tmp_path):
    # the resource a workflow profile sets per rule becomes `--set KEY=N` on its shell line
    # (not a param that Snakemake compares: a finished rule does not rerun for it)
    import subprocess
    import sys
    from pathlib import Path

    from helpers import workflow_copy

    workflow_copy(tmp_path)
    snakemake = str(Path(sys.executable).with_name("snakemake"))
    r = subprocess.run([snakemake, "-n", "-p", "--cores", "2", "--set-resources",
                        "ae_stage2:micro_batch=2", "train_dit:micro_batch=3",
                        "sample:micro_batch=5", "eval_recon:micro_batch=4"],
                       cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lines = [x for x in r.stdout.splitlines() if "--cfg" in x]
    stage = {x for x in lines if "ae-train" in x}
    assert sum("--set ae_train.micro_batch=2 " in x for x in stage) == 1  # stage 2 only
    assert sum("--set dit.micro_batch=3 " in x for x in lines if "train-dit" in x) == 1
    assert sum("--set sample.batch_size=5 " in x for x in lines if " sample " in x) == 1
    assert sum("--set eval.batch_size=4 " in x for x in lines if "eval-recon" in x) == 1
    assert sum("--set " in x for x in lines) == 4  # no other rule gets one
