"""Weights made elsewhere -> the dinosae checkpoints the pipeline and the Python API read.

    dinosae import-ae  --config C --source SRC --out results/ae/stage4/checkpoint.pt
    dinosae import-dit --config C --source SRC --out results/dit/checkpoint.pt

(rules `import_autoencoder` / `import_dit`, used when `autoencoder.pretrained` / `dit.pretrained`
is set). SRC is a local file or folder, or `hf-hub:<owner>/<name>[/<path in the repo>]`: taken
from the Hugging Face cache, or downloaded into it when the hub is reachable. Files are read
with safetensors or `torch.load(weights_only=True)`; nothing is unpickled. An import whose keys or
shapes do not fit the configured modules lists every mismatch and stops (WeightsMismatchError,
a ConfigError: one line and exit status 2 from the CLI).

Autoencoder sources
-------------------
* The authors' release (https://huggingface.co/wkdgnsgo/dino-sae): a state dict of their
  `DINOSphericalAutoencoder`, mapped onto our DinoSAE through the explicit tables below.
  The ViT part (`dino_model.*`, Meta's DINOv3 names) goes through timm's DINOv3 converter
  (dinosae.models.keymap); when the file has no ViT weights, the teacher comes from
  `autoencoder.teacher.weights`. Our teacher keeps its own linear patch embedding, which the
  release replaced by the CNN stem: it always comes from `autoencoder.teacher.weights`.
* A dinosae AE checkpoint or a `dinosae export-model` folder: the same names, checked as well.

Where the official names come from. Verified in the public code of the official repository
(github.com/wkdgnsgo/dino-sae, stored copies of src/model.py and
src/efficientvit/models/nn/ops.py, read Feb 2026):
* `DINOSphericalAutoencoder` (earlier `DinoAutoencoderV3_EarlyFusion`) holds `dino_model` (Meta's
  DinoVisionTransformer from torch.hub, patch_embed replaced) and `decoder` (DCAE_Decoder).
* stem: `dino_model.patch_embed.cnn.{0..3}` = ConvLayer(conv, norm, act); `.conv.weight` without
  bias; `.norm.weight` of shape (1, C, 1, 1) on the first three (their RMSNorm2d: RMS over
  (C, H, W) per sample, eps 1e-6 -- our RMSNorm2d, weight (C,)).
* decoder: `project_in` = ResidualBlock(main=ConvLayer 3x3 with bias, shortcut=channel
  duplication) -> `decoder.project_in.main.conv.{weight,bias}`; `stages.{k}.op_list.{j}` with
  stages ordered lowest resolution first and, in every stage but the first, op 0 the upsampling
  ResidualBlock(main=InterpolateConv or ConvPixelShuffle layer, shortcut=duplication) ->
  `.main.conv.conv.{weight,bias}`; ResBlock = ResidualBlock(main=ResBlock) ->
  `.main.conv1.conv.{weight,bias}` (SiLU), `.main.conv2.conv.weight` (no bias),
  `.main.conv2.norm.weight`; EfficientViT block -> `.context_module.main.qkv.conv.weight`,
  `.context_module.main.aggreg.{s}.{0,1}.weight` (only with scales; the release builds none),
  `.context_module.main.proj.conv.weight` [+ `.proj.norm.weight`],
  `.local_module.main.inverted_conv.conv.{weight,bias}`,
  `.local_module.main.depth_conv.conv.{weight,bias}`, `.local_module.main.point_conv.conv.weight`
  [+ `.point_conv.norm.weight`]; head dim 32, expand ratio 4; `project_out.op_list.0.weight`
  (norm, (1, C, 1, 1)), `.op_list.1` ReLU, `project_out.op_list.2.conv.{weight,bias}`.
Assumed, not verifiable from the released code (their configs and training code are not
published): the widths/depths/block kinds and upsampling type of the released decoder (taken from
the paper: widths 256..1024, depths 5,5,3,3,3, nearest-interpolation upsampling); whether their
EfficientViT blocks have norms (`evit_norm`; upstream efficientvit's build_norm returns None
for the module instance their code passes, so: none); the checkpoint's container and file names
on the hub; their image convention (assumed: encoder input normalised with ImageNet mean/std,
decoder output in [-1, 1], which is what our Encoder and Decoder do); their LiteMLA switches to
quadratic attention at <= 32 positions per map, ours does not (never reached at 256 px); a
decoder stage of depth 0 has no upsampling in their code but one in ours (not the paper's
decoder). A wrong guess shows up as a listed mismatch, with a hint naming the config key to
change.

Generator sources
-----------------
A dinosae DiT checkpoint or export folder. The authors' DiTDH/"DDT-XL" release follows RAE's
`DiTwDDTHead` (s_embedder, s_projector, Gaussian-Fourier time embedding, absolute sin-cos
positions, one `blocks` list for trunk and head); dinosae's DiTDH is a different network (no
s_embedder/absolute positions, a sinusoidal time embedding, the head conditioned through
cond_proj/c_proj), so no key map exists: such a file is refused with every key it holds.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from dinosae.checkpoint import AE_KIND, DIT_KIND
from dinosae.errors import ConfigError, WeightsSourceError
from dinosae.models.keymap import check, dinov3_to_timm, mismatches

log = logging.getLogger("dinosae.importers")

HUB = "hf-hub:"
OFFICIAL_REPO = "wkdgnsgo/dino-sae"
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
# containers of training checkpoints, the EMA weights first
CONTAINERS = ("ema", "model_ema", "ema_model", "state_dict_ema", "ema_state_dict", "model",
              "state_dict", "model_state_dict", "module", "net", "autoencoder", "ae")


# ---------------------------------------------------------------- finding and reading files

def _hub_error(spec: str, e: Exception) -> WeightsSourceError:
    return WeightsSourceError(
        f"could not get {spec!r} from the Hugging Face hub ({type(e).__name__}: {e}). On a "
        "machine with network access run `huggingface-cli download <owner>/<name> <file>` (or "
        "copy the file) and give its local path instead, or populate the Hugging Face cache.")


def _repo_files(repo: str) -> tuple[list[str], Path | None]:
    """(files of a hub repo, the cached snapshot folder when offline)."""
    from huggingface_hub import HfApi, constants, snapshot_download

    if not constants.HF_HUB_OFFLINE:
        try:
            return HfApi().list_repo_files(repo), None
        except Exception as e:  # unreachable: fall back to the cache
            log.warning("listing %s on the hub failed (%s): looking in the cache", repo, e)
    snap = Path(snapshot_download(repo, local_files_only=True))
    return [p.relative_to(snap).as_posix() for p in snap.rglob("*") if p.is_file()], snap


def _pick(files: list[str], kind: str, where: str) -> str:
    """The one weights file (or export folder) of a repo for `kind` ("ae" | "dit")."""
    exports = sorted({f.rsplit("/", 1)[0] if "/" in f else "" for f in files
                      if f.endswith("config.json") and f.replace("config.json", "model.safetensors")
                      in files})
    weights = [f for f in files if f.endswith(WEIGHT_SUFFIXES)]
    want = (re.compile(r"dit|ddt|generator", re.I) if kind == "dit"
            else re.compile(r"sae|(^|[^a-z])ae|autoencoder|stage.?4|decoder|tokenizer", re.I))
    other = re.compile(r"dit|ddt", re.I) if kind == "ae" else None
    cands = [f for f in weights if want.search(f.rsplit("/", 1)[-1])
             and not (other and other.search(f.rsplit("/", 1)[-1]))]
    if len(cands) == 1:
        return cands[0]
    if not cands and "" in exports:  # the folder is an export (a DiT's may hold autoencoder/)
        return ""
    if not cands and len(exports) == 1:
        return exports[0]
    what = "generator" if kind == "dit" else "autoencoder"
    raise WeightsSourceError(
        f"{where}: cannot tell which file holds the {what} ({len(cands)} candidates among "
        f"{sorted(weights) or 'no weight files'}); name it: hf-hub:<owner>/<name>/<file>")


def resolve_source(spec: str | Path, kind: str = "ae") -> Path:
    """A local file/folder, or `hf-hub:<owner>/<name>[/<path>]` fetched through the HF cache."""
    spec = str(spec)
    if not spec.startswith(HUB):
        path = Path(spec).expanduser()
        if not path.exists():
            raise WeightsSourceError(f"weights {spec!r} do not exist")
        return path
    parts = spec[len(HUB):].strip("/").split("/")
    if len(parts) < 2:
        raise ConfigError(f"{spec!r}: expected hf-hub:<owner>/<name>[/<path in the repo>]")
    repo, sub = "/".join(parts[:2]), "/".join(parts[2:])
    from huggingface_hub import hf_hub_download, snapshot_download

    try:
        if sub.endswith(WEIGHT_SUFFIXES):
            return Path(hf_hub_download(repo, sub))
        files, snap = _repo_files(repo)
        if sub:  # a folder of the repo (an export)
            files = [f[len(sub) + 1:] for f in files if f.startswith(sub + "/")]
        chosen = _pick(files, kind, spec)
        full = f"{sub}/{chosen}".strip("/")
        if chosen.endswith(WEIGHT_SUFFIXES):
            return Path(hf_hub_download(repo, full))
        pattern = f"{full}/*" if full else "*"
        root = Path(snap) if snap else Path(snapshot_download(repo, allow_patterns=[pattern]))
        return root / full
    except WeightsSourceError:
        raise
    except Exception as e:  # offline with an empty cache, unknown repo or file, ...
        raise _hub_error(spec, e) from e


def _tensors_only(d: Mapping) -> bool:
    return bool(d) and all(isinstance(v, torch.Tensor) for v in d.values())


def _strip(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DDP's `module.` and torch.compile's `_orig_mod.` prefixes removed."""
    sd = {k.replace("_orig_mod.", ""): v for k, v in sd.items()}
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, info) of a weights file or export folder. info: `kind` (a dinosae kind or
    None), `config` (dinosae sources), `container` (where in the file the weights were),
    `step`."""
    from dinosae import export

    path = Path(path)
    if path.is_dir():
        config, sd = export.read_export(path)
        return sd, {"kind": config["kind"], "config": config["config"], "container": "export",
                    "step": config.get("source", {}).get("step")}
    if path.suffix == ".safetensors":
        from dinosae.files import read_safetensors

        return _strip(read_safetensors(path)), {"kind": None, "container": None}
    from dinosae.checkpoint import load_checkpoint
    from dinosae.errors import CheckpointError

    try:
        obj: Any = load_checkpoint(path)  # weights_only=True
    except CheckpointError as e:
        raise CheckpointError(f"{e}. Nothing is unpickled here: if you trust the file, save "
                              "just its state dict (a dict of tensors) with torch.save, or as "
                              ".safetensors, and import that") from None
    if obj.get("kind") in (AE_KIND, DIT_KIND) and (
            not isinstance(obj.get("ema"), dict) or not isinstance(obj.get("config"), dict)):
        raise CheckpointError(f"{path}: a {obj['kind']} checkpoint without its 'ema' weights "
                              "or 'config'")
    if obj.get("kind") == AE_KIND:  # whole, with its teacher (stage checkpoints reference it)
        from dinosae.models.autoencoder import DinoSAE

        ema = DinoSAE.from_checkpoint(obj, str(path)).state_dict()
        return ema, {"kind": obj["kind"], "config": obj["config"], "container": "ema",
                     "step": obj.get("step"), "stage": obj.get("stage")}
    if obj.get("kind") == DIT_KIND:
        return obj["ema"], {"kind": obj["kind"], "config": obj["config"], "container": "ema",
                            "step": obj.get("step"), "stage": obj.get("stage")}
    trail = []
    while isinstance(obj, dict) and not _tensors_only(obj):
        key = next((k for k in CONTAINERS if isinstance(obj.get(k), dict)), None)
        if key is None:
            break
        obj, trail = obj[key], trail + [key]
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise ConfigError(f"{path}: no tensors found (looked in {trail or 'the top level'})")
    return _strip(sd), {"kind": None, "container": ".".join(trail) or None}


def _grouped(keys: Iterable[str], limit: int = 400) -> str:
    """Keys with their block numbers folded: `blocks.{0..27}.attn.qkv.weight`."""
    groups: dict[str, list[int]] = {}
    for k in sorted(keys):
        nums = re.findall(r"(?<=\.)\d+(?=\.)", k)
        pat = re.sub(r"(?<=\.)\d+(?=\.)", "{n}", k, count=1) if len(nums) == 1 else k
        groups.setdefault(pat, []).extend(int(n) for n in nums[:1] if len(nums) == 1)
    out = []
    for pat, ns in groups.items():
        if "{n}" in pat:
            lo, hi = min(ns), max(ns)
            pat = pat.replace("{n}", f"{{{lo}..{hi}}}" if hi > lo else str(lo))
        out.append(pat)
    more = f" ... (+{len(out) - limit})" if len(out) > limit else ""
    return ", ".join(out[:limit]) + more


# ---------------------------------------------------------------- the official key map

_FLAT = "flat"  # their norm weights are (1, C, 1, 1); ours are (C,)

# ours (inside one decoder layer) -> theirs (inside `stages.{k}.op_list.{j}`), per layer type
_UPSAMPLE_NAMES = [(r"conv\.(weight|bias)", r"main.conv.conv.\1", None)]
_RES_NAMES = [
    (r"conv1\.(weight|bias)", r"main.conv1.conv.\1", None),
    (r"conv2\.weight", "main.conv2.conv.weight", None),
    (r"norm\.(weight|bias)", r"main.conv2.norm.\1", _FLAT),
]
_EVIT_NAMES = [
    (r"attn\.qkv\.weight", "context_module.main.qkv.conv.weight", None),
    (r"attn\.aggregate\.(\d+)\.([01])\.weight", r"context_module.main.aggreg.\1.\2.weight", None),
    (r"attn\.proj\.weight", "context_module.main.proj.conv.weight", None),
    (r"attn\.norm\.(weight|bias)", r"context_module.main.proj.norm.\1", _FLAT),
    (r"mlp\.inverted\.(weight|bias)", r"local_module.main.inverted_conv.conv.\1", None),
    (r"mlp\.depthwise\.(weight|bias)", r"local_module.main.depth_conv.conv.\1", None),
    (r"mlp\.point\.weight", "local_module.main.point_conv.conv.weight", None),
    (r"mlp\.norm\.(weight|bias)", r"local_module.main.point_conv.norm.\1", _FLAT),
]
_TOP_NAMES = [
    (r"conv_in\.(weight|bias)", r"project_in.main.conv.\1", None),
    (r"norm_out\.(weight|bias)", r"project_out.op_list.0.\1", _FLAT),
    (r"conv_out\.(weight|bias)", r"project_out.op_list.2.conv.\1", None),
]
_STEM_NAMES = [
    (r"layers\.(\d)\.conv\.weight", r"cnn.\1.conv.weight", None),
    (r"layers\.(\d)\.norm\.weight", r"cnn.\1.norm.weight", _FLAT),
]


def _map(local: str, table: list[tuple[str, str, str | None]]) -> tuple[str, str | None] | None:
    for pattern, repl, how in table:
        if re.fullmatch(pattern, local):
            return re.sub(pattern, repl, local), how
    return None


def _prefix(sd: Mapping[str, Any], suffix: str) -> str | None:
    """The prefix under which the file holds `suffix` (e.g. `dino_model.patch_embed.`)."""
    hits = sorted(k[: -len(suffix)] for k in sd if k.endswith(suffix))
    return hits[0] if hits else None


def official_ae_names(ae: torch.nn.Module, stem_prefix: str = "dino_model.patch_embed.",
                      decoder_prefix: str = "decoder.") -> dict[str, tuple[str, str | None]]:
    """Our stem and decoder keys -> (the official name, how to reshape) for this DinoSAE.
    Our keys without an official counterpart (e.g. ChannelRMSNorm biases) map to the name the
    official code would use, so that they show up as missing."""
    from dinosae.models.decoder import EfficientViTBlock, ResBlock, UpSample
    from dinosae.models.stem import CNNStem

    stem, dec = ae.encoder.stem, ae.decoder
    if not isinstance(stem, CNNStem):
        raise ConfigError("config: 'autoencoder.stem': the released DINO-SAE uses the CNN stem "
                          "(stem: cnn); a linear stem has no counterpart in it")
    names: dict[str, tuple[str, str | None]] = {}
    for local in stem.state_dict():
        hit = _map(local, _STEM_NAMES)
        names[f"encoder.stem.{local}"] = ((stem_prefix + hit[0], hit[1]) if hit
                                          else (stem_prefix + local, None))
    tables = {UpSample: _UPSAMPLE_NAMES, ResBlock: _RES_NAMES, EfficientViTBlock: _EVIT_NAMES}
    for key in dec.state_dict():
        m = re.fullmatch(r"stages\.(\d+)\.(\d+)\.(.+)", key)
        if m:
            k, j, local = int(m[1]), int(m[2]), m[3]
            hit = _map(local, tables[type(dec.stages[k][j])])
            theirs = f"stages.{k}.op_list.{j}."
        else:
            hit, theirs, local = _map(key, _TOP_NAMES), "", key
        names[f"decoder.{key}"] = ((decoder_prefix + theirs + hit[0], hit[1]) if hit
                                   else (decoder_prefix + theirs + local, None))
    return names


def _fit(t: torch.Tensor, how: str | None) -> torch.Tensor:
    if how == _FLAT and t.ndim == 4 and t.shape[0] == 1 and t.shape[2:] == (1, 1):
        return t.reshape(-1)
    return t


def _official_hints(problems: list[str], given: Mapping[str, torch.Tensor],
                    ae: torch.nn.Module) -> list[str]:
    text = " ".join(problems)
    hints = []
    if re.search(r"unexpected \S*(proj|point_conv)\.norm\.weight", text):
        hints.append("the file's EfficientViT blocks have norms: set "
                     "autoencoder.decoder.evit_norm: true.")
    if re.search(r"missing \S*(attn|mlp)\.norm\.weight", text):
        hints.append("the file's EfficientViT blocks have no norms: set "
                     "autoencoder.decoder.evit_norm: false.")
    if re.search(r"missing \S*norm(_out)?\.bias", text):
        hints.append("the file's norms have no bias: set autoencoder.decoder.norm: sample.")
    if "aggreg." in text:
        hints.append("the multi-scale aggregation of the EfficientViT blocks differs: set "
                     "autoencoder.decoder.attn_scales ([] in the release).")
    own = ae.state_dict()
    for key, t in given.items():
        m = re.fullmatch(r"decoder\.stages\.(\d+)\.0\.conv\.weight", key)
        mine = own.get(key)
        if m and mine is not None and t.shape[0] == 4 * mine.shape[0]:
            hints.append("the file upsamples by pixel shuffle: set "
                         "autoencoder.decoder.upsample: pixel_shuffle.")
            break
    if re.search(r"wrong shape|missing decoder\.stages|unexpected \S*stages", text):
        hints.append("compare autoencoder.decoder.widths/depths/blocks and "
                     "autoencoder.stem_widths with the file (shapes above).")
    return hints


def map_official_ae(sd: Mapping[str, torch.Tensor], ae: torch.nn.Module
                    ) -> tuple[dict, dict, dict, list[str], str]:
    """The authors' DINO-SAE state dict -> (our key -> tensor, our key -> their name, our
    expected keys -> shapes, problems, where the teacher ViT comes from)."""
    stem_prefix = _prefix(sd, "cnn.0.conv.weight") or "dino_model.patch_embed."
    decoder_prefix = _prefix(sd, "project_in.main.conv.weight") or "decoder."
    names = official_ae_names(ae, stem_prefix, decoder_prefix)
    own = ae.state_dict()
    expected = {k: own[k] for k in names}
    given, file_names, used = {}, {}, set()
    for ours, (theirs, how) in names.items():
        file_names[ours] = theirs
        if theirs in sd:
            given[ours] = _fit(sd[theirs], how)
            used.add(theirs)
    # the ViT: what the stem's owner (`dino_model.`) holds besides its patch embedding
    vit_sd = {}
    if stem_prefix.endswith("patch_embed."):
        vit_prefix = stem_prefix[: -len("patch_embed.")]
        skip = (stem_prefix, decoder_prefix) if decoder_prefix else (stem_prefix,)
        if vit_prefix + "cls_token" in sd or vit_prefix + "blocks.0.norm1.weight" in sd:
            vit_sd = {k[len(vit_prefix):]: v for k, v in sd.items()
                      if k.startswith(vit_prefix) and k not in used
                      and not k.startswith(skip)}
    if vit_sd:
        vit = ae.encoder.vit
        for k, v in dinov3_to_timm(vit_sd, vit).items():
            given[f"encoder.vit.{k}"] = v
        expected.update({f"encoder.vit.{k}": v for k, v in vit.state_dict().items()
                         if not k.startswith("patch_embed.")})
        used.update(vit_prefix + k for k in vit_sd)
        teacher = "the file (dino_model.*; patch embedding from autoencoder.teacher.weights)"
    else:
        teacher = "autoencoder.teacher.weights (the file has no ViT weights)"
    problems = mismatches(expected, given, file_names)
    problems += [f"unexpected {k} {list(sd[k].shape)} (no counterpart in dinosae's modules)"
                 for k in sorted(set(sd) - used)]
    return given, file_names, expected, problems, teacher


def is_official_ae(sd: Mapping[str, Any]) -> bool:
    return any(k.endswith(("patch_embed.cnn.0.conv.weight", "project_in.main.conv.weight"))
               for k in sd)


def is_ddt(sd: Mapping[str, Any]) -> bool:
    """RAE's DiTwDDTHead naming (the authors' DDT-XL generator follows it)."""
    return any(k.startswith(("s_embedder.", "s_projector.", "enc_feat_rope.", "dec_feat_rope."))
               for k in sd)


# ---------------------------------------------------------------- autoencoder

def import_autoencoder(cfg: dict, source: str, out: str | Path) -> Path:
    """Released or exported autoencoder weights -> a stage-4 dinosae checkpoint at `out`.
    Config sections: autoencoder (its teacher gives what the file does not hold), data
    (image_size). `source` defaults to autoencoder.pretrained."""
    from dinosae.checkpoint import save_checkpoint
    from dinosae.files import sha256_file
    from dinosae.models.autoencoder import ae_config, build_autoencoder

    spec = source or cfg["autoencoder"].get("pretrained")
    if not spec:
        raise ConfigError("config: 'autoencoder.pretrained' is not set and no --source given")
    path = resolve_source(spec, "ae")
    sd, info = read_weights(path)
    ae = build_autoencoder(cfg)
    if info["kind"] == AE_KIND:
        fmt, teacher = "dinosae", "the file"
        own = ae.state_dict()
        given, problems = sd, mismatches(own, sd)
        hints = ["the file was made with another autoencoder config: its config is "
                 f"{json.dumps(info['config'].get('autoencoder', {}), sort_keys=True)}"]
    elif info["kind"] is not None:
        raise ConfigError(f"{spec}: a {info['kind']} checkpoint, not an autoencoder")
    elif is_official_ae(sd):
        fmt = "dino-sae-official"
        given, _, _, problems, teacher = map_official_ae(sd, ae)
        hints = _official_hints(problems, given, ae)
    else:
        raise ConfigError(
            f"{spec}: not a DINO-SAE autoencoder: none of the official names "
            f"(*patch_embed.cnn.*, *decoder.project_in.*) nor a dinosae checkpoint; the file "
            f"holds {len(sd)} tensors: {_grouped(sd, limit=40)}")
    check(f"autoencoder weights {spec} do not fit the configured autoencoder", problems, hints)
    state = ae.state_dict()
    state.update({k: v.to(state[k].dtype) for k, v in given.items()})
    ae.load_state_dict(state)  # strict: the names are now exactly ours
    state = {k: v.detach().clone() for k, v in ae.state_dict().items()}
    out = Path(out)
    save_checkpoint(out, {
        "kind": AE_KIND, "stage": 4, "step": int(info.get("step") or 0),
        "config": ae_config(cfg), "model": state, "ema": state,
        "imported": {"source": str(spec), "file": str(path),
                     "sha256": sha256_file(path) if path.is_file() else None,
                     "format": fmt, "container": info.get("container"), "teacher": teacher}})
    log.info("imported %s (%s, %d tensors; teacher from %s) -> %s", spec, fmt, len(given),
             teacher, out)
    return out


# ---------------------------------------------------------------- generator

def import_generator(cfg: dict, source: str, out: str | Path) -> Path:
    """An exported or dinosae DiT -> a dinosae DiT checkpoint at `out` (config section dit:
    model/head/path must match the file's). `source` defaults to dit.pretrained."""
    from dinosae.checkpoint import save_checkpoint
    from dinosae.files import sha256_file
    from dinosae.models.dit import build_dit

    spec = source or cfg.get("dit", {}).get("pretrained")
    if not spec:
        raise ConfigError("config: 'dit.pretrained' is not set and no --source given")
    path = resolve_source(spec, "dit")
    sd, info = read_weights(path)
    if info["kind"] != DIT_KIND:
        if is_ddt(sd):
            raise ConfigError(
                f"{spec}: a DiTDH in RAE's DiTwDDTHead format (the authors' DDT-XL release): "
                "dinosae's DiTDH is a different network (sinusoidal time embedding, no absolute "
                "positions, head conditioned through cond_proj/c_proj), so these weights cannot "
                f"be mapped onto it. Keys without a counterpart: {_grouped(sd)}. Train the DiT "
                "instead (dit.pretrained: null).")
        what = f"a {info['kind']} checkpoint" if info["kind"] else \
            f"{len(sd)} tensors: {_grouped(sd, limit=40)}"
        raise ConfigError(f"{spec}: not a dinosae DiT checkpoint or export ({what})")
    config = info["config"]
    for key in ("model", "head", "path"):
        want = cfg.get("dit", {}).get(key, config["dit"][key])
        if want != config["dit"][key]:
            raise ConfigError(f"config: 'dit.{key}' ({want!r}) differs from the imported "
                              f"generator's ({config['dit'][key]!r}): set it to match")
    model = build_dit(config["dit"]["model"], config["tokens"], config["channels"],
                      config["num_classes"], config["grid"], config["dit"]["head"])
    check(f"generator weights {spec} do not fit its own config", mismatches(model.state_dict(), sd))
    model.load_state_dict(sd)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out = Path(out)
    save_checkpoint(out, {
        "kind": DIT_KIND, "step": int(info.get("step") or 0), "config": config, "model": state,
        "ema": state, "ae": None, "cache": None,
        "imported": {"source": str(spec), "file": str(path),
                     "sha256": sha256_file(path) if path.is_file() else None}})
    log.info("imported generator %s (%s, step %s) -> %s", spec, config["dit"]["model"],
             info.get("step"), out)
    return out
