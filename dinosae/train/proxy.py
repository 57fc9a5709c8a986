"""The gFID proxy of DiT training: every `dit.eval_every` steps, `dit.eval_samples`
class-balanced samples from fixed seeds, drawn from the EMA network with the configured sampler
(the `sample` section, at `dit.eval_precision`), decoded and scored by the FD of the configured
extractor against the reference statistics of rule `fid_reference`.

Nothing here is new maths: the labels, seeds and images are `dinosae sample`'s
(generate.balanced_labels, sample_seeds, decoded_samples), the score is `dinosae fid`'s
(evaluate.FDScorer). So the proxy at step k equals `dinosae fid` on `dinosae sample`'s output
for that step's EMA weights with sample.num_samples = dit.eval_samples and sample.precision =
dit.eval_precision. Rank 0 evaluates.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch

from dinosae.errors import ConfigError


class GFIDProxy:
    """`proxy(ema)` -> {"<metric>_proxy": FD, "proxy_sec": seconds it took}, where <metric> is
    FID with Inception-v3, FD_teacher in the teacher's features. `meta` is the DiT's checkpoint
    config (tokens, channels, num_classes, radius, alpha, mean_norm, dit)."""

    def __init__(self, cfg: dict, autoencoder: Any, meta: dict, reference: str | Path | None,
                 device: torch.device) -> None:
        from dinosae.evaluate import FDScorer
        from dinosae.generate import balanced_labels, decode_radius, sample_seeds

        if reference is None or autoencoder is None or "eval" not in cfg:
            raise ConfigError("config: 'dit.eval_every' (the gFID proxy) needs the reference "
                              "statistics (--reference), the autoencoder (--ae) and the 'eval' "
                              "section")
        self.n = int(cfg["dit"].get("eval_samples", 1000))
        # the sample section's sampler, at dit.eval_precision (bf16 by default: on a GPU fp32
        # sampling costs about ten times as much, and a proxy is compared with proxies)
        self.sc = {**cfg["sample"], "precision": cfg["dit"].get("eval_precision", "bf16")}
        self.meta, self.ae, self.device = meta, autoencoder, device
        self.labels = balanced_labels(self.n, int(meta["num_classes"]))
        self.seeds = sample_seeds(self.n, int(cfg.get("seed", 0)))
        mean_norm = meta.get("mean_norm")
        self.s_vae = decode_radius(self.sc.get("s_vae"),
                                    None if mean_norm is None else {"mean_norm": mean_norm})
        teacher = autoencoder.teacher if cfg["eval"]["extractor"] == "teacher" else None
        self.score = FDScorer(cfg, reference, device, teacher)
        self.key = f"{self.score.info['metric']}_proxy"

    def empty(self) -> dict[str, float]:
        """The row cells at a step without an evaluation."""
        return {self.key: math.nan, "proxy_sec": math.nan}

    @torch.no_grad()
    def __call__(self, ema: torch.nn.Module) -> dict[str, float]:
        from dinosae.generate import decoded_samples

        start, bs = time.time(), int(self.sc["batch_size"])
        batches = (decoded_samples(ema, self.ae, self.meta, self.sc, self.labels[lo:lo + bs],
                                   self.seeds[lo:lo + bs], self.s_vae, self.device,
                                   f"gFID proxy samples {lo}..{min(lo + bs, self.n) - 1}")
                   for lo in range(0, self.n, bs))
        fd = self.score(batches)
        return {self.key: fd, "proxy_sec": time.time() - start}
