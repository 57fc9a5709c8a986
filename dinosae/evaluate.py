"""Evaluation: Frechet distance (FID or FD in another extractor), Inception Score, precision/recall,
and reconstruction metrics (PSNR, SSIM, LPIPS, rFID).

The numbers are torch-fidelity's: features come from a torch-fidelity feature extractor
(`inception-v3-compat`, the TF-compatible Inception-v3 of the FID protocol, or `dinosae-teacher`,
the DINOv3 teacher registered here as a torch-fidelity extractor), and statistics, FD, IS and
precision/recall are torch-fidelity's own functions, i.e. what `calculate_metrics` computes.

A number is called FID only when it comes from Inception-v3; in the teacher's features it is
`FD_teacher` (and `rFD_teacher` for reconstructions), and IS is "n/a".

    fid_reference(cfg, shards, out)      real images -> reference npz (mu, sigma, extractor, count)
    fid(cfg, samples, reference, out)    samples.h5 vs reference -> results/gfid.txt
    eval_recon(cfg, checkpoint, shards, out)  AE reconstructions -> results/recon.txt (+ .png)
"""

from __future__ import annotations

import logging
import os
import zipfile
from collections import defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch_fidelity import FeatureExtractorBase, register_feature_extractor
from torch_fidelity.feature_extractor_inceptionv3 import (
    URL_INCEPTION_V3,
    FeatureExtractorInceptionV3,
)
from torch_fidelity.metric_fid import (
    KEY_METRIC_FID,
    fid_features_to_statistics,
    fid_statistics_to_metric,
)
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from torch_fidelity.utils import create_feature_extractor

from dinosae.checkpoint import tensors_fingerprint
from dinosae.dist import pick_device
from dinosae.errors import ConfigError, DataError, NumericsError
from dinosae.files import check_regular, sha256_file, write_kv
from dinosae.images import save_grid
from dinosae.outputs import claim_file, kv_ours, mark_zip, png_ours, zip_ours
from dinosae.progress import Progress

log = logging.getLogger("dinosae.evaluate")

INCEPTION = "inception-v3-compat"  # torch-fidelity's TF-compatible Inception-v3 (the FID one)
TEACHER = "dinosae-teacher"  # the DINOv3 teacher, registered below
INCEPTION_ADM = "dinosae-inception-v3-adm"  # the same network + ADM's spatial features, below
SPATIAL = "mixed_6/conv"  # ADM's sFID features (FID_SPATIAL_NAME), first 7 channels
LAYER = {  # torch-fidelity feature layers per metric
    INCEPTION: {"fd": "2048", "is": "logits_unbiased", "sfid": SPATIAL},
    TEACHER: {"fd": "pooled"},
}
IS_SPLITS = 10  # torch-fidelity's default (and the usual IS protocol)
PRC_NEIGHBORHOOD = 3  # torch-fidelity's default k for precision/recall


# ---------------------------------------------------------------- Frechet distance maths

def feature_statistics(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of (N, D) features, float64: torch-fidelity's fid_features_to_statistics."""
    stats = fid_features_to_statistics(torch.as_tensor(features))
    return stats["mu"].astype(np.float64), stats["sigma"].astype(np.float64)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                     sigma2: np.ndarray) -> float:
    """‖mu1 − mu2‖² + tr(sigma1 + sigma2 − 2 (sigma1 sigma2)^½): torch-fidelity's
    fid_statistics_to_metric, after casting both sides to float64."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1 = np.atleast_2d(sigma1).astype(np.float64)
    sigma2 = np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"feature statistics differ in shape: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape} (different extractors?)")
    out = fid_statistics_to_metric({"mu": mu1, "sigma": sigma1}, {"mu": mu2, "sigma": sigma2},
                                   verbose=False)
    return out[KEY_METRIC_FID]


# ---------------------------------------------------------------- ADM evaluator statistics
#
# IS, sFID and the k-NN precision/recall exactly as ADM's evaluator computes them
# (openai/guided-diffusion evaluations/evaluator.py, which RAE, LightningDiT and REPA-E report
# with); FID/sFID use frechet_distance above (the same formula, eigenvalues for the trace of the
# matrix square root). tests/test_adm_stats.py holds these to that evaluator's own outputs on
# saved features (tests/fixtures/adm_stats).

ADM_IS_SPLIT = 5000  # Evaluator.compute_inception_score: consecutive splits of 5000 samples
ADM_NHOOD = 3  # ManifoldEstimator nhood_sizes=(3,): the radius is the 3rd neighbour's distance
ADM_BLOCK = 10_000  # its row/column batch: distances are computed (and fall back) per block
ADM_SPATIAL_CHANNELS = 7  # _create_feature_graph: mixed_6/conv[..., :7]
ADM_REFERENCE_IMAGES = 10_000  # real features kept for precision/recall (ADM's arr_0 holds 10k)


def inception_score(logits: torch.Tensor | np.ndarray, split_size: int = ADM_IS_SPLIT) -> float:
    """ADM's Inception Score: p = softmax(logits) (logits = pool_3 features times the softmax
    weight, no bias: torch-fidelity's `logits_unbiased`); for consecutive splits of `split_size`
    samples (the last may be shorter; no shuffling) exp(mean KL(p || mean p)); the mean over
    splits. In float64 (ADM's float32 gives NaN where a probability underflows to 0)."""
    logits = torch.as_tensor(logits).double()
    if logits.dim() != 2 or len(logits) == 0:
        raise ValueError(f"expecting (N, classes) logits, got {tuple(logits.shape)}")
    scores = []
    for s in range(0, len(logits), split_size):
        log_p = torch.log_softmax(logits[s:s + split_size], dim=1)
        p = log_p.exp()
        kl = (p * (log_p - p.mean(0, keepdim=True).log())).sum(1).mean()
        scores.append(float(kl.exp()))
    return float(np.mean(scores))


def _sq_norms_fp16(x16: torch.Tensor) -> torch.Tensor:
    """Row sums of squares of fp16 `x16`, rounded as TensorFlow's reduce_sum(square(x)) in fp16
    rounds them on a CPU (Eigen's inner-most reduction, measured against TensorFlow at 32, 256
    and 2048 features): rows longer than 1024 split in halves recursively, the halves' sums
    added in fp16; a leaf runs 8 fp16 lanes x 4 fp16 accumulators, the accumulators added in
    turn, the 8 lanes summed in fp32 and rounded once."""
    return _sum_fp16((x16.float() ** 2).half())


def _sum_fp16(sq: torch.Tensor) -> torch.Tensor:
    n, d = sq.shape
    if d > 1024:
        h = d // 2
        return (_sum_fp16(sq[:, :h]).float() + _sum_fp16(sq[:, h:]).float()).half()
    pad = (-d) % 32  # fp16 zeros change no partial sum (Eigen sums a ragged tail its own way:
    if pad:          # not reproduced; Inception's 2048 and the tests' widths are multiples of 32)
        sq = torch.cat([sq, sq.new_zeros(n, pad)], dim=1)
    blocks = sq.reshape(n, -1, 4, 8)  # element j: block j//32, accumulator (j//8) % 4, lane j % 8
    acc = blocks[:, 0]
    for m in range(1, blocks.shape[1]):
        acc = (acc.float() + blocks[:, m].float()).half()
    lanes = acc[:, 0]
    for a in range(1, 4):
        lanes = (lanes.float() + acc[:, a].float()).half()
    return lanes.float().sum(1).half()


def adm_sq_distances(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """ADM's DistanceBlock: squared Euclidean distances (len(u), len(v)) computed in fp16 --
    max(|u|^2 - 2 u.v + |v|^2, 0), each step rounded to fp16, the product accumulated in fp32 --
    and, when any is not finite (fp16 overflows at 65504), the whole block again in fp32.
    Returned as fp32 (as ADM compares them). These fp16 roundings decide ties: precision and
    recall differ by percents from an fp32 computation on the same features."""
    u16, v16 = u.half(), v.half()
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # the product must accumulate in true fp32
    try:
        mm = (u16.float() @ v16.float().T).half()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    d = (_sq_norms_fp16(u16)[:, None].float() - 2 * mm.float()).half()
    d = (d.float() + _sq_norms_fp16(v16)[None, :].float()).half().clamp_min(0)
    if torch.isfinite(d).all():
        return d.float()
    u, v = u.float(), v.float()
    return ((u * u).sum(1)[:, None] - 2 * (u @ v.T) + (v * v).sum(1)[None, :]).clamp_min(0)


def _blocks(n: int) -> Iterator[tuple[int, int]]:
    for s in range(0, n, ADM_BLOCK):
        yield s, min(s + ADM_BLOCK, n)


def manifold_radii(features: torch.Tensor, k: int = ADM_NHOOD) -> torch.Tensor:
    """ADM's ManifoldEstimator.manifold_radii: each feature's squared distance (adm_sq_distances,
    in ADM's blocks) to its k-th nearest neighbour, itself counted as the 0-th."""
    out = []
    for r0, r1 in _blocks(len(features)):
        row = torch.cat([adm_sq_distances(features[r0:r1], features[c0:c1])
                         for c0, c1 in _blocks(len(features))], dim=1)
        out.append(torch.kthvalue(row, k + 1, dim=1).values.cpu())
    return torch.cat(out)


def precision_recall(real: torch.Tensor | np.ndarray, fake: torch.Tensor | np.ndarray,
                     device: torch.device | str = "cpu", k: int = ADM_NHOOD
                     ) -> tuple[float, float]:
    """ADM's k-NN precision and recall (Evaluator.compute_prec_recall(ref, sample)): precision =
    fraction of fake features inside some real feature's k-NN ball (distance <= its radius),
    recall = fraction of real features inside some fake feature's ball."""
    real = torch.as_tensor(real, dtype=torch.float32).to(device)
    fake = torch.as_tensor(fake, dtype=torch.float32).to(device)
    if real.dim() != 2 or fake.dim() != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"features differ in shape: real {tuple(real.shape)}, "
                         f"fake {tuple(fake.shape)}")
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision/recall need more than {k} real and fake features "
                         f"(got {len(real)} and {len(fake)})")
    r_real = manifold_radii(real, k).to(device)
    r_fake = manifold_radii(fake, k).to(device)
    real_in = torch.zeros(len(real), dtype=torch.bool, device=device)
    fake_in = torch.zeros(len(fake), dtype=torch.bool, device=device)
    for a0, a1 in _blocks(len(real)):
        for b0, b1 in _blocks(len(fake)):
            d = adm_sq_distances(real[a0:a1], fake[b0:b1])
            real_in[a0:a1] |= (d <= r_fake[None, b0:b1]).any(1)
            fake_in[b0:b1] |= (d <= r_real[a0:a1, None]).any(0)
    return float(fake_in.double().mean()), float(real_in.double().mean())


# ---------------------------------------------------- Inception with ADM's spatial features

class InceptionADM(FeatureExtractorInceptionV3):
    """torch-fidelity's TF-compatible Inception-v3 (same weights file, same forward) that also
    gives ADM's sFID features, `mixed_6/conv` (evaluator.py FID_SPATIAL_NAME), first 7 channels.

    `mixed_6/conv:0` is the ReLU output of the 1x1 branch of the graph's mixed_6 block; mixed_6
    is torch-fidelity's `Mixed_6d` and its 1x1 branch `Mixed_6d.branch1x1` (BasicConv2d: conv, BN,
    ReLU): torch-fidelity's own weight converter (utils/util_convert_inception_weights.py) maps
    "mixed_6/conv/conv2d_params" -> "Mixed_6d.branch1x1.conv" and "mixed_6/conv/batchnorm" ->
    "Mixed_6d.branch1x1.bn"; the graph's blocks run mixed, mixed_1, mixed_2 (35x35: Mixed_5b-d),
    mixed_3 (the 35->17 reduction, Mixed_6a), mixed_4..mixed_7 (17x17: Mixed_6b-e), so mixed_6 is
    the third 17x17 block. Its output is (N, 192, 17, 17); ADM slices [..., :7] of the NHWC
    tensor and flattens it in (h, w, c) order: 17 * 17 * 7 = 2023 features, the size of mu_s in
    ADM's reference batches. Taken with a forward hook, so the network stays torch-fidelity's.
    """

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return (*FeatureExtractorInceptionV3.get_provided_features_list(), SPATIAL)

    def __init__(self, name: str, features_list: list[str], **kwargs: Any) -> None:
        wanted = list(features_list)
        base = [f for f in wanted if f != SPATIAL] or ["2048"]
        super().__init__(name, base, **kwargs)
        self.base_features, self.features_list = base, wanted
        self._spatial: list[torch.Tensor] = []
        self.Mixed_6d.branch1x1.register_forward_hook(
            lambda module, inputs, output: self._spatial.append(output))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        wanted, self.features_list = self.features_list, self.base_features
        self._spatial.clear()
        try:
            feats = dict(zip(self.base_features, super().forward(x), strict=True))
        finally:
            self.features_list = wanted
        if SPATIAL in wanted:  # the hook ran: Mixed_6d comes before every feature but 64, 192
            feats[SPATIAL] = adm_spatial(self._spatial.pop())
        return tuple(feats[name] for name in wanted)


def adm_spatial(mixed_6_conv: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) mixed_6/conv activations -> ADM's (N, H * W * 7) sFID features (first 7
    channels, flattened in NHWC order as the TensorFlow graph lays them out)."""
    x = mixed_6_conv[:, :ADM_SPATIAL_CHANNELS].permute(0, 2, 3, 1)
    return x.reshape(len(x), -1).to(torch.float32)


if INCEPTION_ADM not in FEATURE_EXTRACTORS_REGISTRY:
    register_feature_extractor(INCEPTION_ADM, InceptionADM)


class RunningStats:
    """Mean and covariance (np.cov's, unbiased) of features streamed in batches, in float64 on
    the features' device (batches merged as Chan et al.: stable, no N x D matrix held)."""

    def __init__(self) -> None:
        self.n = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        x = x.double()
        nb, mb = len(x), x.mean(0)
        xc = x - mb
        m2b = xc.T @ xc
        if self.mean is None:
            self.n, self.mean, self.m2 = nb, mb, m2b
            return
        delta = mb - self.mean
        n = self.n + nb
        self.mean = self.mean + delta * (nb / n)
        self.m2 = self.m2 + m2b + torch.outer(delta, delta) * (self.n * nb / n)
        self.n = n

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        if self.mean is None or self.m2 is None or self.n < 2:
            raise DataError("feature statistics need at least 2 images")
        return self.mean.cpu().numpy(), (self.m2 / (self.n - 1)).cpu().numpy()


# ---------------------------------------------------------------- teacher feature extractor

class TeacherFeatures(FeatureExtractorBase):
    """A torch-fidelity feature extractor around a timm DINOv3 ViT (the AE teacher).

    Input: uint8 (B, 3, H, W) like every torch-fidelity extractor; resized to the teacher's input
    size if needed, normalised with the teacher's mean/std. Features: `pooled` (timm's pooled
    pre-logits feature, forward_head(pre_logits=True): for DINOv3 the mean of the final-norm
    patch tokens; the default for FD) and `cls` (the final-norm CLS token; with a randomly
    initialised teacher it hardly depends on the image, so FD on it says nothing).
    The teacher module is passed as `dinosae_teacher=` (a calculate_metrics keyword).
    """

    def __init__(self, name: str, features_list: list[str],
                 dinosae_teacher: torch.nn.Module | None = None, **kwargs: Any) -> None:
        super().__init__(name, features_list)
        if dinosae_teacher is None:
            raise ValueError(f"extractor {name!r} needs the teacher: dinosae_teacher=<module>")
        if not hasattr(dinosae_teacher, "forward_features"):
            raise TypeError("the teacher must be a timm ViT (with forward_features)")
        self.teacher = dinosae_teacher.eval().requires_grad_(False)
        pcfg = getattr(dinosae_teacher, "pretrained_cfg", None) or {}
        mean = pcfg.get("mean", (0.485, 0.456, 0.406))
        std = pcfg.get("std", (0.229, 0.224, 0.225))
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        size = getattr(getattr(dinosae_teacher, "patch_embed", None), "img_size", None)
        self.size = tuple(size) if size is not None else None

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return ("pooled", "cls")

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        if metric in ("fid", "kid", "prc"):
            return "pooled"
        raise ValueError(f"metric {metric!r} needs class logits: use the Inception-v3 extractor")

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    @staticmethod
    def get_dummy_input_for_compile() -> torch.Tensor:
        return torch.zeros(1, 3, 224, 224, dtype=torch.uint8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expecting uint8 images (B, 3, H, W), got {x.dtype} {tuple(x.shape)}")
        x = x.float() / 255.0
        if self.size is not None and tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bicubic", align_corners=False,
                              antialias=True).clamp(0, 1)
        x = (x - self.mean) / self.std
        tokens = self.teacher.forward_features(x)  # (B, prefix + N, C), final norm applied
        feats = {"cls": tokens[:, 0]}
        if "pooled" in self.features_list:
            feats["pooled"] = self.teacher.forward_head(tokens, pre_logits=True)  # (B, C)
        return tuple(feats[name].float() for name in self.features_list)


if TEACHER not in FEATURE_EXTRACTORS_REGISTRY:
    register_feature_extractor(TEACHER, TeacherFeatures)


# ---------------------------------------------------------------- choosing the extractor

def inception_weights_path(local: str | None) -> str:
    """The Inception-v3 weights file: `local` (eval.inception_weights) or torch-fidelity's cache.
    Never downloads; stops with instructions when neither exists."""
    name = os.path.basename(URL_INCEPTION_V3)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / name
    if local:
        if not Path(local).is_file():
            raise ConfigError(f"config: 'eval.inception_weights': file {local!r} does not exist")
        return str(local)
    if cached.is_file():
        return str(cached)
    raise ConfigError(
        "FID needs torch-fidelity's Inception-v3 weights and they are not here (nothing is "
        f"downloaded). Fetch {URL_INCEPTION_V3} on a machine with network, then either set "
        f"'eval.inception_weights: /path/to/{name}' or copy it to {cached} (torch-fidelity's "
        "cache). Offline, set 'eval.extractor: teacher' instead (an FD in the teacher's features, "
        "reported as FD_teacher, not FID)."
    )



def load_teacher(cfg: dict, ae: str | None, device: torch.device) -> torch.nn.Module:
    """The AE teacher (timm DINOv3): from the AE checkpoint `ae` when given, else built from cfg
    `autoencoder.teacher` at `data.image_size` (random weights are seeded: the same every time)."""
    if ae is not None:
        from dinosae.models.autoencoder import DinoSAE

        return DinoSAE.load(ae, device=device).teacher
    if "data" not in cfg or "autoencoder" not in cfg:
        raise ConfigError("config: the teacher extractor needs an AE checkpoint (--ae) or the "
                          "'autoencoder' and 'data' sections to build the teacher")
    from dinosae.models.encoder import create_teacher

    teacher = create_teacher(cfg["autoencoder"]["teacher"], cfg["data"]["image_size"])
    return teacher.to(device)


def build_extractor(cfg: dict, layers: list[str], device: torch.device,
                    teacher: torch.nn.Module | None = None) -> tuple[FeatureExtractorBase, dict]:
    """A torch-fidelity feature extractor for cfg eval.extractor, giving `layers`, plus a
    description: name (inception-v3-compat | teacher), metric name (FID | FD_teacher) and an
    id that pins the weights (compared between reference and samples)."""
    cuda = device.type == "cuda"
    if cfg["eval"]["extractor"] == "inception":
        weights = inception_weights_path(cfg["eval"].get("inception_weights"))
        fe = create_feature_extractor(INCEPTION_ADM, layers, cuda=cuda, verbose=False,
                                      feature_extractor_weights_path=weights)
        sha = sha256_file(weights)
        info = {"extractor": INCEPTION, "metric": "FID", "extractor_id": f"{INCEPTION}:{sha[:16]}",
                "weights": weights, "weights_sha256": sha}
    else:
        if teacher is None:
            raise ValueError("the teacher extractor needs the teacher module")
        fe = create_feature_extractor(TEACHER, layers, cuda=cuda, verbose=False,
                                      dinosae_teacher=teacher)
        fingerprint = tensors_fingerprint(teacher)
        info = {"extractor": "teacher", "metric": "FD_teacher",
                "extractor_id": f"teacher:{fingerprint[:16]}",
                "weights_sha256": f"{fingerprint} (tensors fingerprint of the teacher)"}
    return fe, info


def _layers(cfg: dict, *, inception_extras: bool) -> dict[str, str]:
    """metric -> feature layer for the configured extractor."""
    if cfg["eval"]["extractor"] == "inception":
        return dict(LAYER[INCEPTION]) if inception_extras else {"fd": LAYER[INCEPTION]["fd"]}
    return dict(LAYER[TEACHER])


@torch.no_grad()
def extract_features(extractor: FeatureExtractorBase, batches: Iterable[torch.Tensor],
                     device: torch.device, progress: Progress | None = None
                     ) -> dict[str, torch.Tensor]:
    """Run uint8 (B, 3, H, W) batches through a torch-fidelity extractor; features on the CPU
    (the loop of torch_fidelity.utils.get_featuresdict_from_dataset). `progress` counts images."""
    out: dict[str, list[torch.Tensor]] = defaultdict(list)
    for x in batches:
        feats = extractor.convert_features_tuple_to_dict(extractor(x.to(device)))
        for k, v in feats.items():
            out[k].append(v.cpu())
        if progress is not None:
            progress.update(len(x))
    if not out:
        raise ValueError("no images to extract features from")
    return {k: torch.cat(v) for k, v in out.items()}


# ---------------------------------------------------------------- image sources

def _nchw(images_nhwc: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images_nhwc)).permute(0, 3, 1, 2).contiguous()


def iter_shard_images(shards: str | Path, indices: set[int] | None = None
                      ) -> Iterator[tuple[int, np.ndarray, int]]:
    """(index, HWC uint8 image, label) of a shard folder in manifest order; only `indices` when
    given."""
    from dinosae.data.shard import iter_shard, read_manifest

    manifest = read_manifest(shards)
    for shard in manifest["shards"]:
        first, count = int(shard["first_index"]), int(shard["count"])
        if indices is not None and not any(first <= i < first + count for i in indices):
            continue
        for index, image, label in iter_shard(Path(shards) / shard["name"]):
            if indices is None or index in indices:
                yield index, image, label


def batched(items: Iterable[np.ndarray], batch_size: int) -> Iterator[np.ndarray]:
    """Stack HWC uint8 images into (B, H, W, 3) arrays."""
    batch: list[np.ndarray] = []
    for image in items:
        batch.append(image)
        if len(batch) == batch_size:
            yield np.stack(batch)
            batch = []
    if batch:
        yield np.stack(batch)


def iter_h5_images(samples: str | Path, batch_size: int) -> Iterator[np.ndarray]:
    """(B, H, W, 3) uint8 batches of a complete samples.h5."""
    import h5py

    with h5py.File(samples, "r") as f:
        images = f["images"]
        n = len(images)
        if int(f.attrs.get("done", n)) != n:
            raise ValueError(f"{samples}: incomplete ({f.attrs.get('done')}/{n} samples written)")
        for s in range(0, n, batch_size):
            yield images[s:s + batch_size]


# ---------------------------------------------------------------- reference statistics

def _npz_member_shape(path: str | Path, key: str) -> tuple[int, ...] | None:
    """Shape of one array inside an .npz, read from its header only (ADM's reference batch
    holds 10k images we do not need to load)."""
    with zipfile.ZipFile(path) as z:
        name = f"{key}.npy"
        if name not in z.namelist():
            return None
        with z.open(name) as f:
            major, _ = np.lib.format.read_magic(f)
            read = (np.lib.format.read_array_header_1_0 if major == 1
                    else np.lib.format.read_array_header_2_0)
            shape, _, _ = read(f)
    return tuple(shape)


def load_reference(path: str | Path) -> dict:
    """Reference statistics: our npz (mu, sigma, extractor, extractor_id, count, source,
    source_sha256[, mu_s, sigma_s, features]) or ADM's reference batch
    (VIRTUAL_imagenet256_labeled.npz: mu, sigma of Inception-v3 pool features, mu_s, sigma_s of
    its spatial features, arr_0 the 10k reference images)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference statistics {str(path)!r} do not exist")
    with np.load(path, allow_pickle=False) as z:
        keys = set(z.files)
        if not {"mu", "sigma"} <= keys:
            raise DataError(f"{path}: not reference statistics (needs arrays 'mu' and 'sigma'; "
                             f"has {sorted(keys)})")
        ref = {k: z[k].astype(np.float64) for k in ("mu", "sigma", "mu_s", "sigma_s") if k in keys}
        if "extractor" in keys:  # ours
            ref.update(extractor=str(z["extractor"]), extractor_id=str(z["extractor_id"]),
                       count=int(z["count"]), source=str(z["source"]),
                       source_sha256=str(z["source_sha256"]) if "source_sha256" in keys else "")
            if "features" in keys:
                ref["features"] = z["features"]
            return ref
    shape = _npz_member_shape(path, "arr_0")
    ref.update(extractor=INCEPTION, extractor_id="adm-reference",
               count=int(shape[0]) if shape else -1, source=f"adm:{path}",
               source_sha256=sha256_file(path))
    if ref["mu"].shape != (2048,) or ref["sigma"].shape != (2048, 2048):
        raise DataError(f"{path}: ADM reference statistics must be 2048-d Inception features")
    if "mu_s" in ref and (ref["mu_s"].ndim != 1 or ref["sigma_s"].shape != (len(ref["mu_s"]),) * 2):
        raise DataError(f"{path}: mu_s/sigma_s are not a mean and its covariance")
    return ref


def _check_reference(ref: dict, info: dict, reference: str | Path) -> None:
    if ref["extractor"] != info["extractor"]:
        raise ConfigError(
            f"reference {str(reference)!r} holds {ref['extractor']} statistics but eval.extractor "
            f"gives {info['extractor']}: recompute the reference with the same extractor")
    if ref["extractor_id"] not in ("adm-reference", info["extractor_id"]):
        raise ConfigError(
            f"reference {str(reference)!r} was computed with other extractor weights "
            f"({ref['extractor_id']} vs {info['extractor_id']}): recompute it with the same "
            "--ae checkpoint / Inception weights")


def finite_or_stop(x: torch.Tensor, what: str) -> None:
    """Refuse to score non-finite images (an all-NaN decoder clamps to black: PSNR 8.19)."""
    if not bool(torch.isfinite(x).all()):
        raise NumericsError(f"{what}: {int((~torch.isfinite(x)).sum())} of {x.numel()} values "
                            "are NaN or Inf; not scoring them")


def load_checked_reference(path: str | Path) -> dict:
    """load_reference, every failure one ConfigError naming the file, then check_reference."""
    check_regular(path)
    try:
        ref = load_reference(path)
    except ConfigError:
        raise
    except (ValueError, OSError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise ConfigError(f"reference {str(path)!r}: {e}") from None
    check_reference(ref, path)
    return ref


def check_reference(ref: dict, path: str | Path) -> None:
    """Reference statistics that can be compared with: mu (d,) and sigma (d, d) finite, from at
    least two images, features (n, d) when present (issue 22: a NaN mean must not score)."""
    mu, sigma = np.asarray(ref["mu"]), np.asarray(ref["sigma"])
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise ConfigError(f"reference {str(path)!r}: mu {list(mu.shape)} and sigma "
                          f"{list(sigma.shape)} do not fit together (expected (d,) and (d, d))")
    for name, arr in (("mu", mu), ("sigma", sigma)):
        if not np.isfinite(arr).all():
            raise ConfigError(f"reference {str(path)!r}: {name} holds "
                              f"{int((~np.isfinite(arr)).sum())} NaN or Inf values")
    if "count" in ref and 0 <= int(ref["count"]) < 2:
        raise ConfigError(f"reference {str(path)!r}: statistics of {ref['count']} images (at "
                          "least 2 are needed for a covariance)")
    feats = ref.get("features")
    if feats is not None and (feats.ndim != 2 or feats.shape[1] != len(mu)):
        raise ConfigError(f"reference {str(path)!r}: features {list(feats.shape)} do not fit mu "
                          f"({len(mu)}-d)")


def _reference_resolution(path: str | Path) -> int | None:
    """The image size a reference was computed at: our npz's `resolution`, ADM's arr_0 (N, H,
    W, 3); None when it does not say."""
    with np.load(path, allow_pickle=False) as z:
        if "resolution" in z.files:
            return int(z["resolution"])
    shape = _npz_member_shape(path, "arr_0")
    return int(shape[1]) if shape and len(shape) == 4 else None


def check_samples(path: str | Path, resolution: int | None = None) -> int:
    """A samples.h5 that can be scored: complete (`complete` true, `done` == N), images uint8
    (N, H, W, 3) NHWC with H == W == `resolution` (the reference's, when known), N >= 2.
    Returns N."""
    import h5py

    where = f"samples {str(path)!r}"
    check_regular(path)
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise ConfigError(f"{where}: not a readable HDF5 file ({e})") from None
    with f:
        images = f.get("images")
        if not isinstance(images, h5py.Dataset):
            raise ConfigError(f"{where}: no 'images' array")
        shape, n = images.shape, (images.shape or (0,))[0]
        if images.dtype != np.uint8 or len(shape) != 4 or shape[3] != 3:
            raise ConfigError(f"{where}: images {images.dtype} {list(shape)}; expected uint8 "
                              "(N, H, W, 3) (NHWC, as `dinosae sample` writes)")
        done, complete = f.attrs.get("done"), f.attrs.get("complete")
        if complete is not None and not bool(complete) or done is not None and int(done) != n:
            raise ConfigError(f"{where}: incomplete ({done}/{n} samples written, complete: "
                              f"{bool(complete)}); rerun `dinosae sample` to finish it")
    if n < 2:
        raise ConfigError(f"{where}: {n} samples; FID needs at least 2")
    if resolution is not None and shape[1:3] != (resolution, resolution):
        raise ConfigError(f"{where}: {shape[1]}x{shape[2]} images, but the reference holds "
                          f"statistics of {resolution}x{resolution} images")
    return int(n)


def _save_npz(path: str | Path, **arrays: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    mark_zip(tmp)
    os.replace(tmp, path)


def iter_npz_images(path: str | Path, key: str, batch_size: int) -> Iterator[np.ndarray]:
    """(B, H, W, 3) uint8 batches of one array of an .npz, read from the zip member in turn
    (ADM's reference batch: 10k images, 2 GB, never loaded whole)."""
    with zipfile.ZipFile(path) as z:
        if f"{key}.npy" not in z.namelist():
            raise DataError(f"{path}: no array {key!r} (ADM's reference images)")
    with zipfile.ZipFile(path) as z, z.open(f"{key}.npy") as f:
        major, _ = np.lib.format.read_magic(f)
        read = (np.lib.format.read_array_header_1_0 if major == 1
                else np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = read(f)
        if fortran or dtype != np.uint8 or len(shape) != 4 or shape[3] != 3:
            raise DataError(f"{path}: {key} is not uint8 NHWC images ({dtype}, {shape})")
        per = int(np.prod(shape[1:]))
        for s in range(0, shape[0], batch_size):
            n = min(batch_size, shape[0] - s)
            data = f.read(n * per)
            if len(data) != n * per:
                raise DataError(f"{path}: {key} is truncated")
            yield np.frombuffer(bytearray(data), np.uint8).reshape(n, *shape[1:])


def _spread(count: int, n: int) -> np.ndarray:
    """n indices spread evenly over range(count) (manifest order is by class)."""
    return np.unique(np.linspace(0, count - 1, min(count, n)).round().astype(np.int64))


def fid_reference(cfg: dict, shards: str | None, out: str, ae: str | None = None,
                  force: bool = False) -> None:
    """Reference statistics -> npz: mu, sigma (and, with Inception, ADM's spatial mu_s, sigma_s
    and up to 10k pool features for precision/recall), extractor, extractor_id, count, source,
    source_sha256.

    With cfg eval.adm_reference: ADM's reference batch (its mu, sigma, mu_s, sigma_s; the
    features of its 10k images arr_0 through the network, as ADM's evaluator computes them).
    Otherwise the real images of `shards` (the split cfg eval.reference names; ADM's statistics
    are ImageNet-train's), streamed: statistics accumulate in float64, only the kept 10k
    features are held. Sections: device, eval, autoencoder (+ data when no `ae` is given)."""
    ev = cfg["eval"]
    adm = ev.get("adm_reference")
    claim_file({out: zip_ours}, "fid-reference", force=force, inputs=[shards, ae, adm])
    if adm:
        if ev["extractor"] != "inception":
            raise ConfigError("config: 'eval.adm_reference' holds Inception-v3 statistics; it "
                              f"needs 'eval.extractor: inception' (got {ev['extractor']!r})")
        ref = load_reference(adm)
        count, keep = ref["count"], None
        if count < 0:
            raise DataError(f"{adm}: no reference images (arr_0) for precision/recall")
        images: Iterable[np.ndarray] = iter_npz_images(adm, "arr_0", ev["batch_size"])
    else:
        if not shards:
            raise ConfigError("fid-reference needs --shards (or eval.adm_reference)")
        from dinosae.data.shard import read_manifest

        count = int(read_manifest(shards)["count"])  # a bad shard stops here, before models load
        keep = set(_spread(count, ADM_REFERENCE_IMAGES).tolist())
        images = batched((image for _, image, _ in iter_shard_images(shards)), ev["batch_size"])
    device = pick_device(cfg.get("device", "auto"))
    teacher = load_teacher(cfg, ae, device) if ev["extractor"] == "teacher" else None
    layers = _layers(cfg, inception_extras=True)
    layers.pop("is", None)
    extractor, info = build_extractor(cfg, sorted(set(layers.values())), device, teacher)
    stats = {m: RunningStats() for m in layers}
    kept: list[torch.Tensor] = []
    progress = Progress(count, desc="fid reference", unit="img")
    seen = 0
    for batch in images:
        feats = extract_features(extractor, [_nchw(batch)], device)
        for m, layer in layers.items():
            stats[m].update(feats[layer].to(device))
        if ev["extractor"] == "inception":  # real features for precision/recall
            idx = [i for i in range(len(batch)) if keep is None or seen + i in keep]
            kept.append(feats[layers["fd"]][idx])
        seen += len(batch)
        resolution = int(batch.shape[1])
        progress.update(len(batch))
    progress.close()
    if adm:
        if seen != count:
            raise DataError(f"{adm}: arr_0 holds {seen} images, its header says {count}")
        arrays = {k: ref[k] for k in ("mu", "sigma", "mu_s", "sigma_s") if k in ref}
        source, source_sha = ref["source"], ref["source_sha256"]
    else:
        mu, sigma = stats["fd"].result()
        arrays = {"mu": mu, "sigma": sigma}
        if "sfid" in stats:
            arrays["mu_s"], arrays["sigma_s"] = stats["sfid"].result()
        source = f"shards:{shards}"
        source_sha = sha256_file(Path(shards) / "manifest.json")
    if kept:
        arrays["features"] = torch.cat(kept).numpy()
    if seen:
        arrays["resolution"] = np.int64(resolution)  # what fid checks the samples against
    _save_npz(out, **arrays, extractor=info["extractor"], extractor_id=info["extractor_id"],
              count=count, source=source, source_sha256=source_sha)
    log.info("reference: %d images of %s, %s features -> %s", count, source, info["extractor"],
             out)


# ---------------------------------------------------------------- generation metrics

def _samples_protocol(attrs: dict) -> dict[str, Any]:
    """What the samples file records about how it was made (generate.sample_to_h5)."""
    out: dict[str, Any] = {}
    for key in ("dit_checkpoint", "dit_sha256", "ae_checkpoint", "ae_sha256", "label_scheme",
                "num_classes", "steps", "cfg_scale", "guidance_interval", "precision", "s_vae",
                "flow_path", "integrator", "convention"):
        if key in attrs:
            v = attrs[key]
            out[key] = v.tolist() if isinstance(v, np.ndarray | np.generic) else v
    out["sampling_precision"] = out.pop("precision", "unrecorded")  # not the k-NN precision
    out.setdefault("label_scheme", "unrecorded")
    return out


def fid(cfg: dict, samples: str, reference: str, out: str, ae: str | None = None,
        force: bool = False) -> None:
    """The samples in `samples` (HDF5 from generate.sample_to_h5) against `reference` -> `out`
    (results/gfid.txt). With Inception, as ADM's evaluator computes them: FID, sFID (when the
    reference has spatial statistics), IS, k-NN precision/recall (when it has real features).
    The file states the protocol: reference and its source's sha256, extractor and its weights'
    sha256, sample count, label scheme, steps, guidance, sampling precision.
    Sections: device, eval, autoencoder (+ data without `ae`)."""
    import h5py

    ev = cfg["eval"]
    claim_file({out: kv_ours("metric", "num_samples")}, "fid", force=force,
               inputs=[samples, reference, ae])
    ref = load_checked_reference(reference)
    check_samples(samples, _reference_resolution(reference))
    device = pick_device(cfg.get("device", "auto"))
    teacher = load_teacher(cfg, ae, device) if ev["extractor"] == "teacher" else None
    layers = _layers(cfg, inception_extras=True)
    extractor, info = build_extractor(cfg, sorted(set(layers.values())), device, teacher)
    _check_reference(ref, info, reference)
    with h5py.File(samples, "r") as f:
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
        progress = Progress(len(f["images"]), desc="fid", unit="img")
    batches = (_nchw(b) for b in iter_h5_images(samples, ev["batch_size"]))
    feats = extract_features(extractor, batches, device, progress)
    progress.close()
    mu, sigma = feature_statistics(feats[layers["fd"]])
    value = frechet_distance(mu, sigma, ref["mu"], ref["sigma"])
    metric = info["metric"]
    result: dict[str, Any] = {"metric": metric, metric: f"{value:.6f}"}
    inception = "is" in layers
    if inception and "mu_s" in ref:
        mu_s, sigma_s = feature_statistics(feats[layers["sfid"]])
        result["sFID"] = f"{frechet_distance(mu_s, sigma_s, ref['mu_s'], ref['sigma_s']):.6f}"
    else:
        result["sFID"] = "n/a" + ("" if inception else " (needs the inception extractor)")
    if inception:
        result["IS"] = f"{inception_score(feats[layers['is']]):.6f}"
    else:
        result["IS"] = "n/a (needs the inception extractor)"
    if inception and "features" in ref:
        prec, rec = precision_recall(ref["features"], feats[layers["fd"]], device)
        result["precision"], result["recall"] = f"{prec:.6f}", f"{rec:.6f}"
    else:
        result["precision"] = result["recall"] = "n/a"
    result.update({
        "statistics": ("ADM evaluator (openai/guided-diffusion evaluations/evaluator.py)"
                       if inception else "Frechet distance in the teacher's pooled features"),
        "num_samples": len(feats[layers["fd"]]),
        "extractor": info["extractor"],
        "extractor_id": info["extractor_id"],
        "extractor_weights_sha256": info["weights_sha256"],
        "reference": str(reference),
        "reference_source": ref["source"],
        "reference_source_sha256": ref.get("source_sha256") or "unrecorded",
        "reference_sha256": sha256_file(reference),
        "reference_count": ref["count"],
        "samples": str(samples),
    })
    result.update(_samples_protocol(attrs))
    write_kv(out, result)
    log.info("%s = %.4f over %d samples -> %s", metric, value, result["num_samples"], out)


# ---------------------------------------------------------------- reconstruction metrics

def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 images (skimage, data range 255)."""
    from skimage.metrics import peak_signal_noise_ratio

    return float(peak_signal_noise_ratio(a, b, data_range=255))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of two uint8 HWC images (skimage, per-channel, data range 255)."""
    from skimage.metrics import structural_similarity

    return float(structural_similarity(a, b, channel_axis=-1, data_range=255))


def lpips_metric(cfg: dict, device: torch.device) -> tuple[torch.nn.Module, str]:
    """(LPIPS module, metric name) from cfg autoencoder.lpips via dinosae.models.perceptual
    (never downloads). weights 'random' is a random backbone, not LPIPS: it is reported as
    LPIPS_randombackbone."""
    from dinosae.models.perceptual import build_lpips

    lp = cfg["autoencoder"]["lpips"]
    name = "LPIPS_randombackbone" if lp["weights"] == "random" else "LPIPS"
    return build_lpips(lp["net"], lp["weights"]).to(device), name


def _recon_indices(count: int, n: int) -> list[int]:
    """n indices spread evenly over the split (manifest order is by class, so this covers the
    classes instead of the first few)."""
    if n >= count:
        return list(range(count))
    return sorted(set(np.linspace(0, count - 1, n).round().astype(np.int64).tolist()))


@torch.no_grad()
def eval_recon(cfg: dict, checkpoint: str, shards: str, out: str, force: bool = False) -> None:
    """Reconstruct cfg eval.recon_samples images of `shards` (spread over the split) with the AE
    `checkpoint` (encode -> decode), then PSNR, SSIM, LPIPS and rFID (rFD_teacher offline) ->
    `out` (key: value) and a PNG grid (input rows over reconstruction rows) beside it.
    Sections: device, eval, autoencoder."""
    from dinosae.data.shard import check_image_size, read_manifest
    from dinosae.models.autoencoder import DinoSAE
    from dinosae.models.perceptual import lpips_distance

    ev = cfg["eval"]
    if Path(out).suffix == ".png":
        raise ConfigError(f"--out {out}: the PNG grid is written beside it as .png; give a "
                          ".txt name")
    claim_file({out: kv_ours("PSNR", "num_samples"), Path(out).with_suffix(".png"): png_ours},
               "eval-recon", force=force, inputs=[checkpoint, shards])
    manifest = read_manifest(shards)  # bad shards stop here, before any model loads
    count = int(manifest["count"])
    device = pick_device(cfg.get("device", "auto"))
    ae = DinoSAE.load(checkpoint, device=str(device))
    check_image_size(manifest, shards, 16 * int(ae.grid[0]), f"the autoencoder {checkpoint}")
    lpips_model, lpips_name = lpips_metric(cfg, device)
    layers = _layers(cfg, inception_extras=False)
    extractor, info = build_extractor(cfg, [layers["fd"]], device,
                                      ae.teacher if ev["extractor"] == "teacher" else None)

    wanted = _recon_indices(count, int(ev["recon_samples"]))
    if len(wanted) < ev["recon_samples"]:
        log.warning("eval.recon_samples=%d but %s holds %d images: using all of them",
                    ev["recon_samples"], shards, count)
    images = (image for _, image, _ in iter_shard_images(shards, set(wanted)))
    psnrs, ssims, lpipss, real_feats, fake_feats = [], [], [], [], []
    grid: list[torch.Tensor] = []
    progress = Progress(len(wanted), desc="eval recon", unit="img")
    for batch in batched(images, ev["batch_size"]):
        x = _nchw(batch).to(device)  # uint8 (B, 3, H, W)
        rec = ae.decode(ae.encode(x.float() / 255.0)).float()
        finite_or_stop(rec, f"reconstructions of {checkpoint}")
        rec = rec.clamp(0, 1)
        rec_u8 = (rec * 255.0).round().to(torch.uint8)  # reconstructions are judged as images
        rec_np = rec_u8.permute(0, 2, 3, 1).cpu().numpy()
        psnrs += [psnr(a, b) for a, b in zip(batch, rec_np, strict=True)]
        ssims += [ssim(a, b) for a, b in zip(batch, rec_np, strict=True)]
        lpipss += lpips_distance(lpips_model, x.float() / 255.0, rec_u8.float() / 255.0).tolist()
        real_feats.append(extract_features(extractor, [x], device)[layers["fd"]])
        fake_feats.append(extract_features(extractor, [rec_u8], device)[layers["fd"]])
        if sum(len(g) for g in grid) < 16:
            grid.append(torch.stack([x.cpu(), rec_u8.cpu()], dim=1))  # (B, 2, 3, H, W)
        progress.update(len(batch))
    progress.close()
    mu_r, sigma_r = feature_statistics(torch.cat(real_feats))
    mu_f, sigma_f = feature_statistics(torch.cat(fake_feats))
    rfd = frechet_distance(mu_f, sigma_f, mu_r, sigma_r)
    rname = "rFID" if info["metric"] == "FID" else "rFD_teacher"
    write_kv(out, {
        "PSNR": f"{np.mean(psnrs):.4f}",
        "SSIM": f"{np.mean(ssims):.4f}",
        lpips_name: f"{np.mean(lpipss):.4f}",
        rname: f"{rfd:.6f}",
        "num_samples": len(psnrs),
        "extractor": info["extractor"],
        "extractor_id": info["extractor_id"],
        "extractor_weights_sha256": info["weights_sha256"],
        "lpips_net": cfg["autoencoder"]["lpips"]["net"],
        "checkpoint": str(checkpoint),
        "checkpoint_sha256": sha256_file(checkpoint),
        "reference": "the reconstructed images themselves (their shards' pixels)",
        "shards": str(shards),
        "shards_manifest_sha256": sha256_file(Path(shards) / "manifest.json"),
        "shards_format": manifest.get("preprocess", {}).get("format", "unrecorded"),
        "selection": "evenly spread over the split in manifest order",
    })
    pairs = torch.cat(grid)[:16]
    ncol = min(8, len(pairs))
    pairs = pairs[: len(pairs) // ncol * ncol]  # rows of inputs over rows of reconstructions
    rows = pairs.view(-1, ncol, *pairs.shape[1:]).transpose(1, 2).reshape(-1, *pairs.shape[2:])
    save_grid(rows.float() / 255.0, Path(out).with_suffix(".png"), nrow=ncol)
    log.info("recon: PSNR %.2f SSIM %.4f %s %.4f %s %.4f (%d images) -> %s", np.mean(psnrs),
             np.mean(ssims), lpips_name, np.mean(lpipss), rname, rfd, len(psnrs), out)


# ---------------------------------------------------------------- FD of images in memory

class FDScorer:
    """The FD that `fid` reports, for images held in memory (the DiT's gFID proxy): the same
    extractor (cfg eval.extractor; `teacher` is the AE teacher module when it is the teacher),
    the same feature layer, batches of eval.batch_size, the same statistics against the same
    reference file. Built once (the extractor and the reference load once), called often."""

    def __init__(self, cfg: dict, reference: str | Path, device: torch.device,
                 teacher: torch.nn.Module | None = None) -> None:
        self.ref = load_reference(reference)
        self.layer = _layers(cfg, inception_extras=False)["fd"]
        self.extractor, self.info = build_extractor(cfg, [self.layer], device, teacher)
        _check_reference(self.ref, self.info, reference)
        self.batch_size, self.device = int(cfg["eval"]["batch_size"]), device

    def __call__(self, images: Iterable[np.ndarray]) -> float:
        """FD of uint8 (B, H, W, 3) batches (any batch sizes) against the reference."""
        rows = (image for batch in images for image in batch)
        batches = (_nchw(b) for b in batched(rows, self.batch_size))
        mu, sigma = feature_statistics(extract_features(self.extractor, batches,
                                                        self.device)[self.layer])
        return frechet_distance(mu, sigma, self.ref["mu"], self.ref["sigma"])
