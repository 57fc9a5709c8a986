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
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.metric_fid import (
    KEY_METRIC_FID,
    fid_features_to_statistics,
    fid_statistics_to_metric,
)
from torch_fidelity.metric_isc import (
    KEY_METRIC_ISC_MEAN,
    KEY_METRIC_ISC_STD,
    isc_features_to_metric,
)
from torch_fidelity.metric_prc import (
    KEY_METRIC_PRECISION,
    KEY_METRIC_RECALL,
    prc_features_to_metric,
)
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from torch_fidelity.utils import create_feature_extractor

from dinosae.checkpoint import tensors_fingerprint
from dinosae.dist import pick_device
from dinosae.errors import ConfigError
from dinosae.files import sha256_file, write_kv
from dinosae.images import save_grid
from dinosae.progress import Progress

log = logging.getLogger("dinosae.evaluate")

INCEPTION = "inception-v3-compat"  # torch-fidelity's TF-compatible Inception-v3 (the FID one)
TEACHER = "dinosae-teacher"  # the DINOv3 teacher, registered below
LAYER = {  # torch-fidelity feature layers per metric
    INCEPTION: {"fd": "2048", "is": "logits_unbiased"},
    TEACHER: {"fd": "pooled"},
}
IS_SPLITS = 10  # torch-fidelity's default (and the usual IS protocol)
PRC_NEIGHBORHOOD = 3  # torch-fidelity's default k for precision/recall
MAX_REFERENCE_FEATURES = 10_000  # real features kept in the reference npz for precision/recall


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
        fe = create_feature_extractor(INCEPTION, layers, cuda=cuda, verbose=False,
                                      feature_extractor_weights_path=weights)
        info = {"extractor": INCEPTION, "metric": "FID",
                "extractor_id": f"{INCEPTION}:{sha256_file(weights)[:16]}", "weights": weights}
    else:
        if teacher is None:
            raise ValueError("the teacher extractor needs the teacher module")
        fe = create_feature_extractor(TEACHER, layers, cuda=cuda, verbose=False,
                                      dinosae_teacher=teacher)
        info = {"extractor": "teacher", "metric": "FD_teacher",
                "extractor_id": f"teacher:{tensors_fingerprint(teacher)[:16]}"}
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
    """Reference statistics: our npz (mu, sigma, extractor, extractor_id, count, source[,
    features]) or ADM's reference batch (VIRTUAL_imagenet256_labeled.npz: mu, sigma are
    Inception-v3 pool features)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference statistics {str(path)!r} do not exist")
    with np.load(path, allow_pickle=False) as z:
        keys = set(z.files)
        if not {"mu", "sigma"} <= keys:
            raise ValueError(f"{path}: not reference statistics (needs arrays 'mu' and 'sigma'; "
                             f"has {sorted(keys)})")
        ref = {"mu": z["mu"].astype(np.float64), "sigma": z["sigma"].astype(np.float64)}
        if "extractor" in keys:  # ours
            ref.update(extractor=str(z["extractor"]), extractor_id=str(z["extractor_id"]),
                       count=int(z["count"]), source=str(z["source"]))
            if "features" in keys:
                ref["features"] = z["features"]
            return ref
    shape = _npz_member_shape(path, "arr_0")
    ref.update(extractor=INCEPTION, extractor_id="adm-reference",
               count=int(shape[0]) if shape else -1, source=f"adm:{path}")
    if ref["mu"].shape != (2048,) or ref["sigma"].shape != (2048, 2048):
        raise ValueError(f"{path}: ADM reference statistics must be 2048-d Inception features")
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


def _save_npz(path: str | Path, **arrays: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


def fid_reference(cfg: dict, shards: str, out: str, ae: str | None = None) -> None:
    """Feature statistics of the real images in `shards` (or of ADM's reference batch when
    cfg eval.adm_reference is set) -> npz with mu, sigma, extractor, extractor_id, count, source
    (and, with Inception, up to 10k features for precision/recall).

    Sections: device, eval, autoencoder (+ data when no `ae` checkpoint is given). All features
    are held in memory (50k Inception features: 400 MB; for ImageNet-train statistics use ADM's
    reference batch or a machine with the memory).
    """
    ev = cfg["eval"]
    if ev.get("adm_reference"):
        if ev["extractor"] != "inception":
            raise ConfigError("config: 'eval.adm_reference' holds Inception-v3 statistics; it "
                              f"needs 'eval.extractor: inception' (got {ev['extractor']!r})")
        ref = load_reference(ev["adm_reference"])
        _save_npz(out, mu=ref["mu"], sigma=ref["sigma"], extractor=ref["extractor"],
                  extractor_id=ref["extractor_id"], count=ref["count"], source=ref["source"])
        log.info("reference: ADM statistics from %s", ev["adm_reference"])
        return
    from dinosae.data.shard import read_manifest

    count = int(read_manifest(shards)["count"])  # a bad shard stops here, before models load
    device = pick_device(cfg.get("device", "auto"))
    teacher = load_teacher(cfg, ae, device) if ev["extractor"] == "teacher" else None
    layers = _layers(cfg, inception_extras=False)
    extractor, info = build_extractor(cfg, sorted(set(layers.values())), device, teacher)
    images = (image for _, image, _ in iter_shard_images(shards))
    batches = (_nchw(b) for b in batched(images, ev["batch_size"]))
    progress = Progress(count, desc="fid reference", unit="img")
    feats = extract_features(extractor, batches, device, progress)[layers["fd"]]
    progress.close()
    mu, sigma = feature_statistics(feats)
    extra = {}
    if ev["extractor"] == "inception":  # a strided subset of real features for precision/recall
        keep = np.unique(np.linspace(0, len(feats) - 1, min(len(feats), MAX_REFERENCE_FEATURES))
                         .round().astype(np.int64))
        extra["features"] = feats[keep].numpy()
    _save_npz(out, mu=mu, sigma=sigma, extractor=info["extractor"],
              extractor_id=info["extractor_id"], count=len(feats),
              source=f"shards:{shards}", **extra)
    log.info("reference: %d images of %s, %s features -> %s", len(feats), shards,
             info["extractor"], out)


# ---------------------------------------------------------------- generation metrics

def fid(cfg: dict, samples: str, reference: str, out: str, ae: str | None = None) -> None:
    """FD of the samples in `samples` (HDF5 from generate.sample_to_h5) against `reference`
    -> `out` (results/gfid.txt). With Inception: FID, IS, and precision/recall when the
    reference carries real features. Sections: device, eval, autoencoder (+ data without `ae`)."""
    import h5py

    ev = cfg["eval"]
    ref = load_reference(reference)
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
    if "is" in layers:
        isc = isc_features_to_metric(feats[layers["is"]], splits=IS_SPLITS)
        result["IS"] = f"{isc[KEY_METRIC_ISC_MEAN]:.6f}"
        result["IS_std"] = f"{isc[KEY_METRIC_ISC_STD]:.6f}"
    else:
        result["IS"] = "n/a (needs the inception extractor)"
    if "is" in layers and "features" in ref:
        prc = prc_features_to_metric(feats[layers["fd"]], torch.from_numpy(ref["features"]),
                                     prc_neighborhood=PRC_NEIGHBORHOOD, verbose=False)
        result["precision"] = f"{prc[KEY_METRIC_PRECISION]:.6f}"
        result["recall"] = f"{prc[KEY_METRIC_RECALL]:.6f}"
    else:
        result["precision"] = result["recall"] = "n/a"
    result.update({
        "num_samples": len(feats[layers["fd"]]),
        "extractor": info["extractor"],
        "extractor_id": info["extractor_id"],
        "reference": str(reference),
        "reference_source": ref["source"],
        "reference_count": ref["count"],
        "samples": str(samples),
    })
    for key in ("dit_checkpoint", "ae_checkpoint", "steps", "cfg_scale", "guidance_interval",
                "s_vae", "flow_path"):
        if key in attrs:
            v = attrs[key]
            result[key] = v.tolist() if isinstance(v, np.ndarray | np.generic) else v
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
def eval_recon(cfg: dict, checkpoint: str, shards: str, out: str) -> None:
    """Reconstruct cfg eval.recon_samples images of `shards` (spread over the split) with the AE
    `checkpoint` (encode -> decode), then PSNR, SSIM, LPIPS and rFID (rFD_teacher offline) ->
    `out` (key: value) and a PNG grid (input rows over reconstruction rows) beside it.
    Sections: device, eval, autoencoder."""
    from dinosae.data.shard import check_image_size, read_manifest
    from dinosae.models.autoencoder import DinoSAE
    from dinosae.models.perceptual import lpips_distance

    ev = cfg["eval"]
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
        rec = ae.decode(ae.encode(x.float() / 255.0)).float().clamp(0, 1)
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
        "lpips_net": cfg["autoencoder"]["lpips"]["net"],
        "checkpoint": str(checkpoint),
        "shards": str(shards),
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
