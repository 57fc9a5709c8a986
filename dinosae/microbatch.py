"""`dinosae plan --gpu`: the largest per-GPU micro-batch of each training rule that fits the
GPU, gradient accumulation making up the per-GPU share of the global batch (ae_train.micro_batch,
dit.micro_batch). Deciding only: the memory comes from plan.py's measurements on fake tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable

TRAINING_RULES = ("ae_stage1", "ae_stage2", "ae_stage3", "ae_stage4", "train_dit")
CONFIG_KEY = {"train_dit": "dit.micro_batch"}  # the AE stages: ae_train.micro_batch


def largest_fitting(peak_at: Callable[[int], float], per_gpu: int, budget: float) -> int | None:
    """The largest micro-batch m in 1..per_gpu with peak_at(m) <= budget (peak_at grows with
    m: a binary search), or None when not even one image fits."""
    if peak_at(per_gpu) <= budget:  # the common case: one evaluation, the plan's own
        return per_gpu
    if peak_at(1) > budget:
        return None
    lo, hi = 1, per_gpu  # peak_at(lo) fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if peak_at(mid) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def format_fits(fits: list[tuple[str, int, int | None, float]], gpu_name: str) -> str:
    """Lines for (rule, per-GPU batch, micro-batch or None, peak bytes at it)."""
    lines = [f"micro-batches on {gpu_name} (the largest that fits; accumulation makes up the "
             "rest):"]
    for rule, per_gpu, micro, peak in fits:
        key = CONFIG_KEY.get(rule, "ae_train.micro_batch")
        if micro is None:
            lines.append(f"  {rule:<14} ! not even one image per GPU fits")
        elif micro >= per_gpu:
            lines.append(f"  {rule:<14} per-GPU batch {per_gpu} fits ({peak / 1e9:.1f} GB)")
        else:
            lines.append(f"  {rule:<14} per-GPU batch {per_gpu}: {key}={micro} "
                         f"({math.ceil(per_gpu / micro)} parts, {peak / 1e9:.1f} GB)")
    return "\n".join(lines)
