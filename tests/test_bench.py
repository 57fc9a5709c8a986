"""bench/gpu_check.py --cpu-smoke: every row of the GPU session's table runs (tiny models, CPU)
and reports finite numbers, and bf16 autocast stays within the tolerance of fp32."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROWS = ["AE stage-1 step", "AE stage-2 step", "encode_unit fp32", "encode_unit bf16",
        "DiT-tiny train step", "sampling"]


@pytest.mark.integration  # 75 s on 2 free cores: every row of the GPU table at tiny size
@pytest.mark.timeout(1000)  # > 300 s beside the paper-size smoke DAG (the suite's two workers)
def test_gpu_check_cpu_smoke() -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, str(ROOT / "bench/gpu_check.py"), "--cpu-smoke"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    for name in ROWS:
        row = [ln for ln in lines if ln.startswith(name)]
        assert len(row) == 1, f"row {name!r} missing:\n{out.stdout}"
        # batch, ms/call, img/s, peak GiB, TFLOP/call, MFU, [bf16 err], check
        cells = row[0][38:].split()
        numbers = [float(c.rstrip("%")) for c in cells[:6]]
        assert all(math.isfinite(v) and v > 0 for v in numbers), row[0]
        assert cells[-1] in ("ok", "-"), row[0]
        if cells[-1] == "ok":  # the error against fp32 is measured, not zero (a vacuous check)
            assert 0 < float(cells[6]) <= 0.05, row[0]
    # the loop's own time, measured around the real train_dit: a finite share of the step
    row = [ln for ln in lines if ln.startswith("DiT loop overhead: ")]
    assert len(row) == 1, out.stdout
    share = float(row[0].split()[3].rstrip("%"))
    assert math.isfinite(share) and -5 < share < 100, row[0]


def test_ablate_rfm_synthetic_runs_both_paths_and_integrators(tmp_path) -> None:
    # the ablation drives the real train_dit through a stand-in cache: it must keep its contract
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, str(ROOT / "bench/ablate_rfm.py"), "--synthetic",
                          "--steps", "4", "--batch", "8", "--samples", "16", "--n-train", "64",
                          "--sample-steps", "2", "--threads", "1", "--out", str(tmp_path)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    rows = {ln.split(" @")[0].strip(): ln for ln in out.stdout.splitlines() if " @2 " in ln}
    assert set(rows) == {"rfm expmap", "rfm euler_project", "euclidean"}, out.stdout
    for line in rows.values():
        fds = [float(c) for c in line.split()[-2:]]  # FD_flat, FD_token
        assert all(math.isfinite(v) and v > 0 for v in fds), line
    assert "expmap vs euler_project" in out.stdout
