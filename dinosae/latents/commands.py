"""`dinosae cache list | verify PATH | path`: what a shared root holds, whether a cache keeps
what it promises, and where a config's cache is (or would be)."""

from __future__ import annotations

from pathlib import Path

from dinosae.errors import CacheError, ConfigError
from dinosae.latents.checks import verify_cache
from dinosae.latents.shared import find_for, identity_for, list_caches, store_in
from dinosae.latents.store import open_group

AE_CHECKPOINT = "results/ae/stage4/checkpoint.pt"  # the workflow's (workflow/rules/common.smk)


def local_store(split: str) -> str:
    return f"results/latents/{split}.zarr"  # the workflow's latent_store()


def cache_command(cfg: dict, action: str, path: str | None = None) -> int:
    """list [ROOT] (default latents.root) | verify PATH | path (needs a config)."""
    lcfg = cfg.get("latents") or {}
    if action == "list":
        root = path or lcfg.get("root")
        if not root:
            raise ConfigError("cache list: give a folder, or a config with latents.root")
        if not Path(root).is_dir():
            raise CacheError(f"{root}: no such folder")
        rows = list_caches(root)
        print(f"{'identity':17} {'complete':8} {'split':5} {'images':>8} {'dtype':8} "
              f"{'GB':>8} {'last use':16} encoder")
        for r in rows:
            print(f"{(r['identity'] or '-')[:16]:17} {str(r['complete']).lower():8} "
                  f"{r['split'] or '-':5} {r['count'] or 0:8d} {str(r['dtype']):8.8} "
                  f"{r['bytes'] / 1e9:8.3f} "
                  f"{r['last_use']:16} {r['encoder']} (tensors "
                  f"{(r['encoder_tensors'] or '-')[:12]})")
        print(f"{len(rows)} cache(s) in {root}")
        return 0
    if action == "verify":
        if not path:
            raise ConfigError("cache verify: give the cache's path")
        group, attrs = open_group(path, "r", "not a latent cache")
        report = verify_cache(path, group, attrs)
        for line in report["problems"]:
            print(f"DAMAGED {line}")
        print(f"checked: {report['checked']}")
        if report["problems"]:
            raise CacheError(f"{path}: damaged: {len(report['problems'])} problem(s), first: "
                             f"{report['problems'][0]}")
        print(f"{path}: ok")
        return 0
    if action == "path":
        if "data" not in cfg or not lcfg:
            raise ConfigError("cache path: give the experiment's --config")
        split = lcfg.get("split", "train")
        manifest = Path(cfg["data"]["shards"]) / split / "manifest.json"
        root = lcfg.get("root")
        if not root:
            print(local_store(split))
            return 0
        found = find_for(lcfg, AE_CHECKPOINT, manifest)
        if found:
            print(found)
        elif Path(AE_CHECKPOINT).is_file() and manifest.is_file():
            print(f"{store_in(root, identity_for(AE_CHECKPOINT, manifest, lcfg))} (not built "
                  "yet)")
        else:
            print(f"{local_store(split)} (its identity is known once {AE_CHECKPOINT} and "
                  f"{manifest} exist; built there, then published into {root})")
        return 0
    raise ConfigError(f"cache: unknown action {action!r} (list | verify | path)")
