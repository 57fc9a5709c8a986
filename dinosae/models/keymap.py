"""Checks and key maps for weights made elsewhere: teacher files, the authors' released
checkpoints, exported models. A check lists *every* problem (missing, unexpected and wrongly
shaped keys) in one error, never just the first few.

DINOv3 in Meta's original format (the `.pth` files of facebookresearch/dinov3, which the official
DINO-SAE code loads) is converted by timm's own converter, `timm.models.eva.checkpoint_filter_fn`,
rather than by a map of our own. The original names, verified in facebookresearch/dinov3
(models/vision_transformer.py, layers/block.py, layers/attention.py, hub/backbones.py):
`cls_token` (1, 1, C), `storage_tokens` (1, 4, C), `mask_token` (1, C), `patch_embed.proj.*`,
`rope_embed.periods` (a persistent buffer), `blocks.N.{norm1, attn.qkv, attn.proj, ls1.gamma,
norm2, mlp.fc1, mlp.fc2, ls2.gamma}`, `attn.qkv.bias` with its `attn.qkv.bias_mask` buffer
(LinearKMaskedBias: the k third masked to zero), `norm.*`, and `cls_norm` / `local_cls_norm`
in some variants. timm renames `storage_tokens` -> `reg_token` and `ls{1,2}.gamma` ->
`gamma_{1,2}`, drops the periods, bias masks and mask token, and splits `qkv.bias` into
`q_bias` / `v_bias` for its `*_qkvb` models or drops it for the others; dropping is only exact
when the unmasked bias is zero, which `dinov3_to_timm` checks.
"""

from __future__ import annotations

import contextlib
import io
import itertools
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from dinosae.errors import WeightsMismatchError


def _shape(x: Any) -> list[int]:
    return list(x.shape) if hasattr(x, "shape") else list(x)


def mismatches(expected: Mapping[str, Any], given: Mapping[str, Any],
               file_names: Mapping[str, str] | None = None) -> list[str]:
    """Every difference between `expected` (the module's keys -> tensors or shapes) and `given`
    (the file's tensors, already under the module's names). `file_names` maps a module key to
    the name it has in the file, shown beside it."""
    names = file_names or {}

    def label(k: str) -> str:
        f = names.get(k)
        return f"{k} (in the file: {f})" if f and f != k else k

    out = [f"missing {label(k)} {_shape(expected[k])}" for k in sorted(set(expected) - set(given))]
    out += [f"unexpected {label(k)} {_shape(given[k])}" for k in sorted(set(given) - set(expected))]
    out += [f"wrong shape {label(k)}: {_shape(given[k])} in the file, {_shape(expected[k])} in "
            "the model" for k in sorted(set(expected) & set(given))
            if _shape(expected[k]) != _shape(given[k])]
    return out + bad_values(expected, given, label)


def bad_values(expected: Mapping[str, Any], given: Mapping[str, Any],
               label: Any = str) -> list[str]:
    """Tensors of `given` that are not floating point where the module's are (an integer or
    bool tensor would be cast silently), and the first tensor holding NaN or Inf (named with
    its count of non-finite values; the rest are counted)."""
    out, bad = [], []
    for k in sorted(set(expected) & set(given)):
        e, g = expected[k], given[k]
        if not isinstance(g, torch.Tensor):
            out.append(f"{label(k)}: a {type(g).__name__}, not a tensor")
        elif isinstance(e, torch.Tensor) and e.is_floating_point() and not (
                g.is_floating_point()):
            out.append(f"{label(k)}: {str(g.dtype).removeprefix('torch.')} in the file, "
                       f"{str(e.dtype).removeprefix('torch.')} in the model (not floating point)")
        elif g.is_floating_point() and g.device.type != "meta" and not bool(
                torch.isfinite(g).all()):
            bad.append(k)
    if bad:
        k = bad[0]
        n = int((~torch.isfinite(given[k])).sum())
        more = f" ({len(bad) - 1} more tensors hold some too)" if len(bad) > 1 else ""
        out.append(f"{label(k)}: {n} of {given[k].numel()} values are NaN or Inf{more}")
    return out


def check(what: str, problems: list[str], hints: Iterable[str] = ()) -> None:
    """Raise WeightsMismatchError listing all `problems` (and `hints`, if any)."""
    if not problems:
        return
    hints = [h for h in hints if h]
    n = len(problems)
    raise WeightsMismatchError(f"{what}: {n} mismatch{'es' if n > 1 else ''}: "
                               + "; ".join(problems)
                               + (f". Hint: {' '.join(hints)}" if hints else ""))


def load_weights(module: torch.nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    """`state` into `module` after `check`ing it (`what`: the error's first words; every
    missing, unexpected, misshapen, non-float or non-finite tensor named). A module built on the
    meta device, as a network whose random initialisation a checkpoint would overwrite is
    (seconds per job at paper size), takes the tensors themselves, cast to its dtypes; what it
    holds outside its state dict (buffers derived at build time) must already be real."""
    expected = module.state_dict()
    check(what, mismatches(expected, state))
    tensors = list(itertools.chain(module.named_parameters(), module.named_buffers()))
    if not any(t.is_meta for _, t in tensors):
        module.load_state_dict(state)
        return
    module.load_state_dict({k: v.to(dtype=expected[k].dtype) for k, v in state.items()},
                           assign=True)
    left = [n for n, t in itertools.chain(module.named_parameters(), module.named_buffers())
            if t.is_meta]
    if left:  # a derived buffer made on the meta device: the network's code, not the file
        raise RuntimeError(f"{what}: {left[:3]} stayed on the meta device after loading")


def is_meta_dinov3(sd: Mapping[str, Any]) -> bool:
    """Meta's original DINOv3 key format (the only one with `storage_tokens`)."""
    return "storage_tokens" in sd


def _dropped_qkv_biases(sd: Mapping[str, torch.Tensor], model: torch.nn.Module) -> list[str]:
    """Meta `attn.qkv.bias` entries that timm would drop (the model has no q/v bias) although
    their unmasked part is not zero."""
    params = dict(model.named_parameters())
    bad = []
    for k, bias in sd.items():
        if not k.endswith("attn.qkv.bias") or k.replace("qkv.bias", "q_bias") in params:
            continue
        mask = sd.get(k + "_mask")
        used = bias if mask is None else bias[mask != 0]
        if used.numel() and float(used.abs().max()) > 0:
            bad.append(k)
    return bad


def dinov3_to_timm(sd: Mapping[str, torch.Tensor], model: torch.nn.Module) -> dict:
    """A DINOv3 state dict in timm's or Meta's original key format -> timm's keys for `model`
    (a timm DINOv3 Eva), converted by timm's checkpoint_filter_fn; head/fc_norm keys dropped."""
    from timm.models.eva import checkpoint_filter_fn

    sd = dict(sd)
    if is_meta_dinov3(sd):
        bad = _dropped_qkv_biases(sd, model)
        check("DINOv3 weights in Meta's format", [
            f"{k}: a nonzero q/v bias, but the configured architecture has no qkv bias"
            for k in bad], ["use the architecture's *_qkvb variant (e.g. "
                            "vit_large_patch16_dinov3_qkvb), which keeps the biases."])
    with contextlib.redirect_stdout(io.StringIO()):  # timm prints a line per dropped bias
        out = checkpoint_filter_fn(sd, model)
    return {k: v for k, v in out.items() if not k.startswith(("head.", "fc_norm."))}
