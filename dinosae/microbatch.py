"""`dinosae plan --gpu`: the largest per-GPU micro-batch of each rule that fits the GPU.

Training rules: gradient accumulation makes up the per-GPU share of the global batch
(ae_train.micro_batch, dit.micro_batch; a workflow profile sets it per rule with the
`micro_batch` resource). The other rules: their batch is only a throughput setting, and one
that does not fit is given the largest that does (latents.batch_size, sample.batch_size,
eval.batch_size). Deciding only: the memory at a batch comes from dinosae.plan_measure's
fake-tensor traces, which cost seconds each at the paper's sizes, so the search probes few:
activation memory grows almost linearly with the batch, and the line through the two ends
of the bracket lands within one of the answer.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

TRAINING_RULES = ("ae_stage1", "ae_stage2", "ae_stage3", "ae_stage4", "train_dit")
CONFIG_KEY = {  # what sets each rule's batch per GPU (per forward/backward)
    **{f"ae_stage{k}": "ae_train.micro_batch" for k in (1, 2, 3, 4)},
    "train_dit": "dit.micro_batch",
    "encode_part": "latents.batch_size",
    "sample": "sample.batch_size",
    "eval_recon": "eval.batch_size",
    "fid_reference": "eval.batch_size",
    "fid": "eval.batch_size",
}


def largest_fitting(peak_at: Callable[[int], float], most: int, budget: float) -> int | None:
    """The largest m in 1..most with peak_at(m) <= budget (peak_at grows with m), or None when
    not even 1 fits. Interpolation search on the bracket [lo fits, hi does not] with the
    neighbour of each guess probed at once (the line is usually right to within one), and
    halving when a round shrinks the bracket by less than half: the answer in 2-4 probes
    for a nearly linear peak_at, never more than about twice a binary search's."""
    hi_peak = peak_at(most)
    if hi_peak <= budget:  # the common case: one evaluation, the plan's own
        return most
    lo, lo_peak = 1, peak_at(1)
    if lo_peak > budget:
        return None
    hi, halve = most, False
    while hi - lo > 1:
        width = hi - lo
        if halve:
            guess = (lo + hi) // 2
        else:
            guess = lo + int((budget - lo_peak) * (hi - lo) / (hi_peak - lo_peak))
            guess = min(max(guess, lo + 1), hi - 1)
        p = peak_at(guess)
        if p <= budget:
            lo, lo_peak, neighbour = guess, p, guess + 1
        else:
            hi, hi_peak, neighbour = guess, p, guess - 1
        if not halve and lo < neighbour < hi:
            p = peak_at(neighbour)
            if p <= budget:
                lo, lo_peak = neighbour, p
            else:
                hi, hi_peak = neighbour, p
        halve = hi - lo > width // 2
    return lo


@dataclass
class Fit:
    """A rule's choice on a GPU: `batch` per GPU per step (the configured one), `micro` the
    largest that fits (None: not even 1), `peak` the bytes at it, `configured` the batch per
    forward/backward the config gives today."""

    rule: str
    batch: int
    micro: int | None
    peak: float
    configured: int

    @property
    def key(self) -> str:
        return CONFIG_KEY.get(self.rule, "?")

    @property
    def accum(self) -> int:
        return math.ceil(self.batch / self.micro) if self.micro else 0


def format_fits(fits: list[Fit], gpu_name: str, budget_gb: float) -> str:
    """`dinosae plan`'s lines: each rule's largest micro-batch on the GPU."""
    lines = [f"micro-batches on {gpu_name} (the largest that fits {budget_gb:.0f} GB; "
             "training: gradient accumulation makes up the per-GPU batch):"]
    for f in fits:
        head = f"  {f.rule:<14} batch/GPU {f.batch:>5}: "
        if f.micro is None:
            lines.append(head + "! not even one image per GPU fits")
        elif f.rule in TRAINING_RULES:
            lines.append(head + f"micro-batch {f.micro:>4} x {f.accum:>3} steps, "
                         f"{f.peak / 1e9:5.1f} GB  ({f.key}={f.micro})")
        elif f.micro >= f.batch:
            lines.append(head + f"fits, {f.peak / 1e9:5.1f} GB")
        else:
            lines.append(head + f"! does not fit: {f.key}={f.micro}, {f.peak / 1e9:5.1f} GB")
    ae = [f.micro for f in fits if f.rule.startswith("ae_stage") and f.micro]
    if ae:
        lines.append(f"  one ae_train.micro_batch for all AE stages: {min(ae)}; or per rule: a "
                     "workflow profile's `micro_batch` resource")
    return "\n".join(lines)
