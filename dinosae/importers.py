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
(github.com/wkdgnsgo/HAE, formerly wkdgnsgo/dino-sae: src/model.py and
src/efficientvit/models/nn/ops.py; tests/test_ae_parity.py imports a state dict that code made,
at a small width with the paper config's other decoder settings, and matches its outputs):
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
Fixed by the released code (and so the paper config's): RMSNorm2d per sample (`norm: sample`),
no multi-scale attention (`attn_scales: []`), no norms inside EfficientViT blocks (`evit_norm:
false`: efficientvit's build_norm returns None for the module instance their code passes), and
DecoderConfig's default ConvPixelShuffle upsampling (`upsample: pixel_shuffle`). Assumed, not
verifiable from the released code (their configs and training code are not published): the
widths/depths/block kinds of the released decoder (widths 256..1024, depths 5,5,3,3,3); the
upsampling a released file was trained with, if not the default; the checkpoint's container and
file names
on the hub; their image convention (assumed: encoder input normalised with ImageNet mean/std,
decoder output in [-1, 1], which is what our Encoder and Decoder do); their LiteMLA switches to
quadratic attention at <= 32 positions per map, ours does not (never reached at 256 px); a
decoder stage of depth 0 has no upsampling in their code but one in ours (not the paper's
decoder). A wrong guess shows up as a listed mismatch, with a hint naming the config key to
change.

Generator sources
-----------------
A dinosae DiT checkpoint or export folder, or a reference generator: RAE's DiTwDDTHead (the
authors' released DDT-XL follows it) or LightningDiT, hustvl's LightningDiT. See
`import_generator` for the key tables, the conventions (which end of t is noise, the time grid,
EMA weights) and what is known and assumed about the authors' release.
"""

from __future__ import annotations

import json
import logging
import math
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


def _check_dit_config(config: dict, path: str | Path) -> None:
    """A dinosae DiT checkpoint's config holds what rebuilds the network (issue 22: a missing
    `config.dit` was a KeyError)."""
    from dinosae.errors import CheckpointError

    problems = [] if isinstance(config.get("dit"), dict) else ["'dit' (a mapping)"]
    problems += [f"'{k}' (an integer >= 1)" for k in ("tokens", "channels", "num_classes")
                 if not (isinstance(config.get(k), int) and config[k] >= 1)]
    grid = config.get("grid")
    if not (isinstance(grid, list | tuple) and len(grid) == 2
            and all(isinstance(g, int) and g >= 1 for g in grid)):
        problems.append("'grid' (two integers >= 1)")
    if problems:
        raise CheckpointError(f"{path}: a {DIT_KIND} checkpoint whose config lacks "
                              f"{', '.join(problems)}")


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
    if obj.get("kind") == DIT_KIND:
        _check_dit_config(obj["config"], path)
    if obj.get("kind") == AE_KIND:  # whole, with its teacher (stage checkpoints reference it)
        from dinosae.models.autoencoder import DinoSAE

        ema = DinoSAE.from_checkpoint(obj, str(path)).state_dict()
        return ema, {"kind": obj["kind"], "config": obj["config"], "container": "ema",
                     "step": obj.get("step"), "stage": obj.get("stage")}
    if obj.get("kind") == DIT_KIND:
        return obj["ema"], {"kind": obj["kind"], "config": obj["config"], "container": "ema",
                            "step": obj.get("step"), "stage": obj.get("stage")}
    trail, top = [], obj
    while isinstance(obj, dict) and not _tensors_only(obj):
        key = next((k for k in CONTAINERS if isinstance(obj.get(k), dict)), None)
        if key is None:
            break
        obj, trail = obj[key], trail + [key]
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise ConfigError(f"{path}: no tensors found (looked in {trail or 'the top level'})")
    step = top.get("step") if isinstance(top, dict) else None  # RAE's training checkpoints
    return _strip(sd), {"kind": None, "container": ".".join(trail) or None,
                        "step": step if isinstance(step, int) else None}


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


def _imported(kind: str):
    """The recogniser of an import's own output: a `kind` checkpoint that records `imported`."""
    def ours(path: Path) -> bool:
        from dinosae.checkpoint import load_checkpoint

        ck = load_checkpoint(path, mmap=True)
        return ck.get("kind") == kind and isinstance(ck.get("imported"), dict)
    return ours


def _read_source(source: str | None, cfg: dict, section: str, kind: str, out: str | Path,
                 force: bool) -> tuple[str, Path, dict[str, torch.Tensor], dict[str, Any]]:
    """(spec, local path, state dict, info) of --source, or of config `<section>.pretrained`,
    once `out` is known to be a place to write (the single-file rule, dinosae.outputs)."""
    from dinosae.outputs import claim_file

    spec = source or (cfg.get(section) or {}).get("pretrained")
    if not spec:
        raise ConfigError(f"config: '{section}.pretrained' is not set and no --source given")
    command = "import-ae" if kind == "ae" else "import-dit"
    claim_file({out: _imported(AE_KIND if kind == "ae" else DIT_KIND)}, command, force=force,
               inputs=[spec])
    path = resolve_source(spec, kind)
    claim_file({out: _imported(AE_KIND if kind == "ae" else DIT_KIND)}, command, force=force,
               inputs=[path])
    return (spec, path, *read_weights(path))


# ---------------------------------------------------------------- autoencoder

def import_autoencoder(cfg: dict, source: str, out: str | Path, force: bool = False) -> Path:
    """Released or exported autoencoder weights -> a stage-4 dinosae checkpoint at `out`.
    Config sections: autoencoder (its teacher gives what the file does not hold), data
    (image_size). `source` defaults to autoencoder.pretrained."""
    from dinosae.checkpoint import save_checkpoint
    from dinosae.files import sha256_file
    from dinosae.models.autoencoder import ae_config, build_autoencoder

    spec, path, sd, info = _read_source(source, cfg, "autoencoder", "ae", out, force)
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


# ---------------------------------------------------------------- generator key maps

_CONV = "conv"  # their PatchEmbed is a 1x1 Conv2d, weight (D, C, 1, 1); ours a Linear, (D, C)

# ours -> the reference's name. Inside a block the names are the reference's own (norm1, attn.qkv,
# attn.q_norm, attn.k_norm, attn.proj, norm2, mlp.w12, mlp.w3, adaLN_modulation.1).
_LDIT_NAMES: list[tuple[str, Any, str | None]] = [
    (r"x_embedder\.weight", "x_embedder.proj.weight", _CONV),
    (r"x_embedder\.bias", "x_embedder.proj.bias", None),
    (r"pos_embed", "pos_embed", None),
    (r"t_embedder\.(W|mlp\.[02]\.weight|mlp\.[02]\.bias)", r"t_embedder.\1", None),
    (r"y_embedder\.embedding_table\.weight", "y_embedder.embedding_table.weight", None),
    (r"blocks\.(\d+)\.(.+)", r"blocks.\1.\2", None),
    (r"final_layer\.(norm_final\.weight|linear\.\w+|adaLN_modulation\.1\.\w+)",
     r"final_layer.\1", None),
]


def _ddt_names(depth: int) -> list[tuple[str, Any, str | None]]:
    """RAE's DiTwDDTHead keeps trunk and head in one `blocks` list: head block j is
    blocks.{depth + j}."""
    return [
        (r"([sx])_embedder\.weight", r"\1_embedder.proj.weight", _CONV),
        (r"([sx])_embedder\.bias", r"\1_embedder.proj.bias", None),
        (r"s_projector\.(weight|bias)", r"s_projector.\1", None),
        (r"head_blocks\.(\d+)\.(.+)", lambda m: f"blocks.{depth + int(m[1])}.{m[2]}", None),
        *[row for row in _LDIT_NAMES if not row[0].startswith(r"x_embedder")],
    ]


def _derived_tables(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The reference's persistent RoPE buffers (their names -> the values our tables give):
    VisionRotaryEmbeddingFast's freqs_cos / freqs_sin (T, head_dim), each angle twice."""
    from dinosae.models.dit import DiTDH

    pairs = ([("enc_feat_rope", "rope"), ("dec_feat_rope", "head_rope")]
             if isinstance(model, DiTDH) else [("feat_rope", "rope")])
    out = {}
    for theirs, ours in pairs:
        table = getattr(model, ours)  # (T, head_dim/2, 2): cos, sin
        for i, fn in enumerate(("cos", "sin")):
            out[f"{theirs}.freqs_{fn}"] = table[..., i].repeat_interleave(2, -1)
    return out


def map_reference_dit(sd: Mapping[str, torch.Tensor], model: torch.nn.Module
                      ) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str]]:
    """A reference generator's state dict (RAE's LightningDiT or DiTwDDTHead, hustvl's
    LightningDiT) -> (our key -> tensor, our key -> their name, problems) for `model`. The
    reference's RoPE buffers are checked against ours (same grid and head width), not loaded."""
    from dinosae.models.dit import DiTDH

    table = _ddt_names(len(model.blocks)) if isinstance(model, DiTDH) else _LDIT_NAMES
    own = model.state_dict()
    given, names, used, problems = {}, {}, set(), []
    for ours in own:
        theirs, how = _map(ours, table) or (ours, None)
        names[ours] = theirs
        if theirs in sd:
            t = sd[theirs]
            if how == _CONV and t.ndim == 4 and t.shape[2:] == (1, 1):
                t = t.reshape(t.shape[0], -1)
            given[ours] = t
            used.add(theirs)
    for theirs, want in _derived_tables(model).items():
        if theirs not in sd:
            continue
        used.add(theirs)
        got = sd[theirs]
        if list(got.shape) != list(want.shape) or not torch.allclose(got.float(), want,
                                                                     atol=1e-5):
            problems.append(f"wrong values {theirs} {list(got.shape)}: not the RoPE table of "
                            f"this grid and head width {list(want.shape)}")
    problems = mismatches(own, given, names) + problems
    problems += [f"unexpected {k} {list(sd[k].shape)} (no counterpart in dinosae's modules)"
                 for k in sorted(set(sd) - used)]
    return given, names, problems


def reference_dit_kind(sd: Mapping[str, Any]) -> str | None:
    """"ddt" (RAE's DiTwDDTHead), "lightningdit" (RAE's or hustvl's) or None."""
    if "s_embedder.proj.weight" in sd:
        return "ddt"
    if "x_embedder.proj.weight" in sd and "final_layer.linear.weight" in sd:
        return "lightningdit"
    return None


def _dim(sd: Mapping[str, Any], key: str, axis: int, ndim: int | None = None) -> int | None:
    """sd[key].shape[axis], or None when the file has no such tensor or it has another rank."""
    t = sd.get(key)
    shape = getattr(t, "shape", None)
    if shape is None or len(shape) <= axis or (ndim is not None and len(shape) != ndim):
        return None
    return int(shape[axis])


def _file_dit_shape(sd: Mapping[str, torch.Tensor], kind: str) -> dict[str, Any]:
    """What a reference state dict says about its network (None where it cannot tell): trunk
    width/depth/heads, head depth/width/heads, channels, classes, tokens, switches."""
    trunk = "s_embedder" if kind == "ddt" else "x_embedder"
    hidden = _dim(sd, f"{trunk}.proj.weight", 0, 4)
    widths = {int(k.split(".")[1]): _dim(sd, k, 0, 1) for k in sd
              if re.fullmatch(r"blocks\.\d+\.norm1\.weight", k)}
    depth = (sum(1 for w in widths.values() if w == hidden) if kind == "ddt" else len(widths))

    def heads(rope: str, width: int | None) -> int | None:
        hd = _dim(sd, f"{rope}.freqs_cos", 1, 2)
        return width // hd if width and hd else None

    classes = _dim(sd, "y_embedder.embedding_table.weight", 0, 2)
    out: dict[str, Any] = {
        "hidden": hidden, "depth": depth, "channels": _dim(sd, f"{trunk}.proj.weight", 1, 4),
        "heads": heads("enc_feat_rope" if kind == "ddt" else "feat_rope", hidden),
        "num_classes": classes - 1 if classes else None,
        "qk_norm": any(k.endswith("attn.q_norm.weight") for k in sd),
        "pos_embed": "pos_embed" in sd,
        "time_embed": "fourier" if "t_embedder.W" in sd else "sinusoidal",
        "head": None,
    }
    if kind == "ddt":
        width = _dim(sd, "x_embedder.proj.weight", 0, 4)
        out["head"] = {"depth": len(widths) - depth, "width": width,
                       "heads": heads("dec_feat_rope", width)}
    out["tokens"] = (_dim(sd, "pos_embed", 1, 3) or _dim(sd, "feat_rope.freqs_cos", 0, 2)
                     or _dim(sd, "enc_feat_rope.freqs_cos", 0, 2))
    missing = [k for k in ("hidden", "channels", "num_classes") if out[k] is None]
    if missing or (kind == "ddt" and out["head"]["width"] is None):
        raise ConfigError(
            f"the file's {trunk}.proj.weight, x_embedder.proj.weight or "
            "y_embedder.embedding_table.weight are missing or not shaped as the reference's "
            f"(cannot tell its {', '.join(missing) or 'head width'}); it holds "
            f"{len(sd)} tensors: {_grouped(sd, limit=40)}")
    return out


def _reference_hints(file: dict[str, Any], cfg_dit: dict) -> list[str]:
    """Which config keys to change so that the configured network is the file's."""
    from dinosae.models.dit import HEAD_DIM_DH, SIZES, switches_of

    hints: list[str] = []
    size = next((n for n, (h, d, nh) in SIZES.items() if h == file["hidden"]
                 and d == file["depth"] and file["heads"] in (None, nh)), None)
    if size != cfg_dit.get("model"):
        what = (f"a trunk {file['hidden']} wide, {file['depth']} blocks deep"
                + (f", {file['heads']} heads" if file["heads"] else ""))
        hints.append(f"the file holds {what}: set dit.model: {size}." if size else
                     f"the file holds {what}, which is none of dinosae's sizes {SIZES}.")
    head, want = cfg_dit.get("head"), file["head"]
    if want is None and head is not None:
        hints.append("the file is a LightningDiT: set dit.head: null.")
    elif want is not None and want["width"] and want["depth"]:
        norm = dict(want)
        if norm["heads"] in (None, max(1, norm["width"] // HEAD_DIM_DH)):
            norm.pop("heads")
        have = dict(head or {})
        if have.get("heads") in (None, max(1, int(have.get("width", 0)) // HEAD_DIM_DH)):
            have.pop("heads", None)
        if have != norm:
            hints.append(f"the file is a DiTDH (RAE's DiTwDDTHead): set dit.head: "
                         f"{json.dumps(norm)}.")
    for key, value in switches_of(cfg_dit).items():
        if file[key] != value:
            hints.append(f"set dit.{key}: {json.dumps(file[key])}.")
    return hints


# ---------------------------------------------------------------- generator

def import_generator(cfg: dict, source: str, out: str | Path, force: bool = False) -> Path:
    """A generator -> a dinosae DiT checkpoint at `out` (config sections: dit; data, when
    given, to check the token grid). `source` defaults to dit.pretrained. Sources:

    * a dinosae DiT checkpoint or `dinosae export-model` folder (dit.model/head/path and the
      switches must match the file's own config);
    * a reference generator's state dict: RAE's `DiTwDDTHead` (DDT.py) or `LightningDiT`
      (lightningDiT.py), or hustvl/LightningDiT's `LightningDiT`, as a bare state dict or a
      training checkpoint; `ema` is taken before `model`, as both codes' own loaders do. It is
      mapped by explicit key tables onto the network the config describes (dit.model, dit.head,
      dit.qk_norm, dit.pos_embed, dit.time_embed), every mismatch listed with the key to change.
      Variants no released config uses (patch size > 1, wo_shift, GELU MLP, LayerNorm, no RoPE,
      learn_sigma) are not built here: such files show up as mismatches.

    Conventions (recorded as config["convention"], used by the sampler: see
    dinosae.models.dit.CONVENTIONS). RAE (stage2/transport: ICPlan alpha_t = 1 - t, sigma_t = t;
    velocity target x0_noise - x1_data; the network reads t in [0, 1], no 1000x; sampler
    `1 - linspace(0, 1 - 1/1000, num_steps)` shifted by sqrt(T·C/4096), torchdiffeq Euler, CFG
    for t_min <= t <= t_max on all channels): t = 1 is noise and v = dz/dt, dinosae's own
    convention; only the grid differs (stops at t = 1e-3; num_steps points = num_steps - 1
    steps). hustvl/LightningDiT (SiT's transport: alpha_t = t, sigma_t = 1 - t, target data -
    noise; sampler linspace(0, 1, num_steps) shifted with timestep_shift = 0.3 in its released
    config, i.e. alpha = 1/0.3 in dinosae's time; forward_with_cfg guides only the first 3
    channels, for t >= cfg_interval_start): t = 0 is noise, presented as ours by
    dinosae.models.dit.FlippedTime; its flow is Euclidean (dit.path: euclidean). The time
    embedding tells them apart: RAE's networks have Gaussian-Fourier features (`t_embedder.W`),
    hustvl's DiT sinusoids.

    The authors' DINO-SAE generator ("DDT-XL, 80 epochs", announced 2026-02-14 with the
    hub link https://huggingface.co/wkdgnsgo/dino-sae, since commented out of the README of
    github.com/wkdgnsgo/HAE, formerly wkdgnsgo/dino-sae): its training and sampling code is not
    public (the repository holds only the autoencoder, src/model.py). Assumed, from the paper,
    the issue and RAE (whose DiTDH-XL config it reproduces): RAE's DiTwDDTHead state dict
    (widths [1152, 2048], depths [28, 2], 16/16 heads, no qk-norm, pos-embed on), RAE's time
    convention and shift (alpha = 8 at 16x16x1024), Riemannian flow matching on the sphere of
    radius sqrt(C) = 32 (dit.path: rfm), decoded at s_vae 14; file name, container keys (EMA or
    not) unknown: `ema` is preferred when present, the container used is recorded.
    """
    from dinosae import rfm
    from dinosae.checkpoint import save_checkpoint
    from dinosae.files import sha256_file
    from dinosae.models.dit import DiTDH, build_dit, dit_from_config, switches_of

    dc = cfg.get("dit", {})
    spec, path, sd, info = _read_source(source, cfg, "dit", "dit", out, force)
    kind = reference_dit_kind(sd)
    if info["kind"] == DIT_KIND:
        config = info["config"]
        mine = {**config["dit"], **switches_of(config["dit"])}
        for key in ("model", "head", "path", *switches_of({})):
            want = dc.get(key, mine[key])
            if want != mine[key]:
                raise ConfigError(f"config: 'dit.{key}' ({want!r}) differs from the imported "
                                  f"generator's ({mine[key]!r}): set it to match")
        model = dit_from_config(config)
        check(f"generator weights {spec} do not fit its own config",
              mismatches(model.state_dict(), sd))
        given, fmt = sd, "dinosae"
    elif info["kind"] is not None or kind is None:
        what = f"a {info['kind']} checkpoint" if info["kind"] else \
            f"{len(sd)} tensors: {_grouped(sd, limit=40)}"
        raise ConfigError(f"{spec}: not a generator dinosae can import: neither a dinosae DiT "
                          "checkpoint or export nor RAE's DiTwDDTHead / LightningDiT nor "
                          f"hustvl's LightningDiT ({what})")
    else:
        try:
            file = _file_dit_shape(sd, kind)
        except ConfigError as e:
            raise ConfigError(f"{spec}: {e}") from None
        grid = _grid(file, cfg, spec)
        convention = "rae" if file["time_embed"] == "fourier" else "sit"
        if convention == "sit" and dc.get("path") != "euclidean":
            raise ConfigError(f"config: 'dit.path': {spec} is hustvl's LightningDiT, a Euclidean "
                              "(linear) flow: set dit.path: euclidean")
        C, T = file["channels"], grid[0] * grid[1]
        model = build_dit(dc.get("model"), T, C, file["num_classes"], grid, dc.get("head"),
                          **switches_of(dc)) if dc.get("model") else None
        problems = ["config: 'dit.model' is not set"] if model is None else []
        if model is not None:
            given, _, problems = map_reference_dit(sd, model)
        check(f"generator weights {spec} do not fit the configured DiT", problems,
              _reference_hints(file, dc))
        fmt = f"{'rae' if convention == 'rae' else 'hustvl'}-" + \
            ("ddt" if isinstance(model, DiTDH) else "lightningdit")
        config = {"dit": {**dc, **switches_of(dc)}, "tokens": T, "channels": C,
                  "num_classes": file["num_classes"], "grid": list(grid),
                  "radius": math.sqrt(C),
                  "alpha": rfm.alpha_for(T, C) if convention == "rae" else 1 / 0.3,
                  "mean_norm": None, "seed": 0, "convention": convention}
    state = model.state_dict()
    state.update({k: v.to(state[k].dtype) for k, v in given.items()})
    model.load_state_dict(state)  # strict: the names are now exactly ours
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    out = Path(out)
    save_checkpoint(out, {
        "kind": DIT_KIND, "step": int(info.get("step") or 0), "config": config, "model": state,
        "ema": state, "ae": None, "cache": None,
        "imported": {"source": str(spec), "file": str(path),
                     "sha256": sha256_file(path) if path.is_file() else None,
                     "format": fmt, "container": info.get("container")}})
    log.info("imported generator %s (%s, %s, convention %s, container %s) -> %s", spec, fmt,
             config["dit"]["model"], config.get("convention", "dinosae"),
             info.get("container"), out)
    return out


def _grid(file: dict[str, Any], cfg: dict, spec: str) -> tuple[int, int]:
    """The reference networks' square token grid: from the file's position/RoPE tables, checked
    against data.image_size / 16 when the config has a data section."""
    want = None
    if "data" in cfg:
        side = int(cfg["data"]["image_size"]) // 16
        want = (side, side)
    if file["tokens"] is None:
        if want is None:
            raise ConfigError(f"{spec}: the file has no position tables to tell its token grid; "
                              "give the data section (data.image_size)")
        return want
    side = math.isqrt(file["tokens"])
    if side * side != file["tokens"]:
        raise ConfigError(f"{spec}: {file['tokens']} tokens are not a square grid")
    if want is not None and want != (side, side):
        raise ConfigError(f"config: 'data.image_size' ({cfg['data']['image_size']}) gives a "
                          f"{want[0]}x{want[1]} token grid; the generator {spec} was trained "
                          f"on {side}x{side}")
    return side, side
