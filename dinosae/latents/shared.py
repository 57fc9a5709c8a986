"""Caches shared by content. A cache's identity is a hash of what determines its bytes: the
encoder's tensors (checkpoint.tensors_fingerprint of the autoencoder, whatever file holds it),
the shard manifest (sha256 of manifest.json: which images, in which order, preprocessed how) and
the latents settings that change the stored values or their layout (IDENTITY_SETTINGS; not
`parts`, which only splits the work). encode_init records it as the attribute `identity`.

`latents.root` (for example a lab-wide folder) holds caches by identity, `<root>/<id>.zarr`
(STORE_CHARS hex digits of it). The workflow looks there before it plans any encoding
(`find_for`, called from workflow/rules/common.smk): a complete cache of the same identity is
used read-only and no encode job is planned. Otherwise the experiment builds its own cache and
`encode-gather` publishes it (`publish`): moved (or copied, across file systems) into the root
under the lock of its final name, the local path left as a link to it; a cache published first
by another experiment wins, and the local copy is dropped for a link to that one.

Two experiments that would build the same cache at once do not both build it: `encode-init`
(the autoencoder exists by then, so the identity is known) claims the build,
`<root>/<id>.zarr.building` (claim_or_wait), and the builder renews the claim for every unit
it encodes (encode-part) or validates (encode-gather); publishing drops it. A second
experiment's encode-init finds the claim held and waits for the finished cache, links it, and
its encode-part and encode-gather do nothing. A claim not renewed for STALE_S (the builder
died, or its parts waited that long in a queue) is taken over: at worst both build, and
publishing still keeps one.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from dinosae.errors import CacheError, OutputLocked
from dinosae.files import atomic_write_text
from dinosae.latents.store import FORMAT, VERSION
from dinosae.outputs import output_lock

log = logging.getLogger(__name__)

IDENTITY_SETTINGS = ("flip", "batch_size", "compression", "chunk_rows", "shard_chunks", "dtype")
STORE_CHARS = 24  # hex digits of the identity in a shared store's name (96 bits)
USED = ".used"  # `<store>.used` beside a shared store: touched by every open (its last use)
BUILDING = ".building"  # `<store>.building`: the experiment building it (claim_or_wait)
STALE_S = 2 * 3600.0  # a claim not renewed for this long is abandoned (renewed per unit encoded
# or validated; so a build whose parts wait longer than this in a queue may be built twice)


def identity(encoder_tensors: str, manifest_sha256: str, lcfg: dict) -> str:
    """sha256 hex of what determines a cache's bytes. dtype float16 counts as absent (None),
    as it was before dtypes existed: a float16 cache keeps its identity."""
    settings = {k: lcfg.get(k) for k in IDENTITY_SETTINGS}
    if settings["dtype"] == "float16":
        settings["dtype"] = None
    doc = {"format": FORMAT, "version": VERSION, "encoder_tensors": encoder_tensors,
           "manifest_sha256": manifest_sha256, "latents": settings}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def encoder_tensors(checkpoint: str | Path) -> str:
    """The tensors fingerprint of an AE checkpoint's (EMA) autoencoder, as encode_init records."""
    from dinosae.checkpoint import tensors_fingerprint
    from dinosae.models.autoencoder import DinoSAE

    return tensors_fingerprint(DinoSAE.load(checkpoint))


def identity_for(checkpoint: str | Path, manifest: str | Path, lcfg: dict) -> str:
    from dinosae.files import sha256_file

    return identity(encoder_tensors(checkpoint), sha256_file(manifest), lcfg)


def store_in(root: str | Path, ident: str) -> Path:
    return Path(root) / f"{ident[:STORE_CHARS]}.zarr"


def read_attrs(store: Path) -> dict | None:
    """A store's attributes from its zarr.json (plain JSON, no zarr), or None: not a dinosae
    cache, unreadable, or a link (a shared root holds real folders only)."""
    try:
        if store.is_symlink() or not store.is_dir() or (store / "zarr.json").is_symlink():
            return None
        with open(store / "zarr.json", "rb") as f:
            attrs = json.loads(f.read(1 << 24)).get("attributes") or {}
    except (OSError, ValueError, AttributeError):
        return None
    return attrs if isinstance(attrs, dict) and attrs.get("format") == FORMAT else None


def find(root: str | Path, ident: str) -> Path | None:
    """The complete cache of identity `ident` in `root`, or None."""
    store = store_in(root, ident)
    attrs = read_attrs(store)
    if attrs and attrs.get("identity") == ident and attrs.get("complete") is True:
        return store
    return None


def find_for(lcfg: dict, checkpoint: str | Path, manifest: str | Path) -> Path | None:
    """For the workflow, before planning: the shared cache this experiment's autoencoder and
    shards would make, when latents.root holds it complete; None when there is no root, when
    the checkpoint or manifest does not exist yet (the identity is not known before the
    autoencoder is) or when the root has no such cache."""
    root = lcfg.get("root")
    if not root or not Path(checkpoint).is_file() or not Path(manifest).is_file():
        return None
    try:
        ident = identity_for(checkpoint, manifest, lcfg)
    except Exception as e:  # e.g. a released (not dinosae) checkpoint: build, then publish
        log.warning("latents.root: no identity for %s (%s: %s); the cache is built here",
                    checkpoint, type(e).__name__, str(e)[:200])
        return None
    found = find(root, ident)
    if found:
        log.info("latent cache found by content: %s", found)
    return found


def mark_used(store: Path) -> None:
    """Touch `<store>.used` beside a shared store (best effort: the root may be read-only)."""
    marker = store.with_name(store.name + USED)
    if marker.is_file() and not marker.is_symlink():
        try:
            os.utime(marker)
        except OSError:
            pass


@contextmanager
def _waiting_lock(target: Path, wait_s: float = 600.0) -> Iterator[Path]:
    """output_lock on `target`, waiting while another experiment publishes the same identity
    (a rename: seconds) instead of failing; OutputLocked after `wait_s`."""
    deadline = time.monotonic() + wait_s
    with ExitStack() as stack:
        while True:
            try:
                path = stack.enter_context(output_lock(target, "publish-cache"))
                break
            except OutputLocked:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        yield path


def claim_path(root: str | Path, ident: str) -> Path:
    store = store_in(root, ident)
    return store.with_name(store.name + BUILDING)


def _claim_holder(claim: Path) -> tuple[str, float] | None:
    """(owner, seconds since the claim was last renewed), or None: no (readable) claim."""
    try:
        age = time.time() - claim.lstat().st_mtime
        owner = json.loads(claim.read_text()[:4096]).get("owner")
    except (OSError, ValueError, AttributeError):
        return None
    return (str(owner), age)


def claim_or_wait(root: str | Path, ident: str, owner: str | Path, stale_s: float = STALE_S,
                  poll_s: float = 2.0) -> Path | None:
    """Before an experiment builds the cache `ident` at its path `owner`: None when it is to
    build it (the claim `<root>/<id>.zarr.building` is now its own: nobody held it, it held it
    already, or its holder stopped renewing it for `stale_s`), or the complete shared store once
    another experiment's build of it has finished (waiting for that meanwhile). So two
    experiments that would build the same cache at once do not both build it."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    target, claim, me = store_in(root, ident), claim_path(root, ident), os.path.abspath(owner)
    waiting = False
    while True:
        if (found := find(root, ident)) is not None:
            return found
        with _waiting_lock(target):  # publish's lock: a claim is decided by one at a time
            if (found := find(root, ident)) is not None:
                return found
            holder = _claim_holder(claim)
            if holder is None or holder[0] == me or holder[1] > stale_s:
                if holder is not None and holder[0] != me:
                    log.warning("%s: %s stopped building it %.0f s ago; building it here",
                                target, holder[0], holder[1])
                atomic_write_text(claim, json.dumps({"owner": me, "pid": os.getpid(),
                                                     "host": socket.gethostname()}) + "\n")
                return None
        if not waiting:
            log.info("%s is being built by %s: waiting for it", target, holder[0])
            waiting = True
        time.sleep(poll_s)


def heartbeat(root: str | Path | None, ident: str | None, owner: str | Path,
              every_s: float = 10.0) -> Callable[[], None]:
    """A function that renews this experiment's claim on building `ident` (its mtime; at most
    every `every_s`); does nothing without a root or a claim of this experiment's."""
    if not root or not ident:
        return lambda: None
    claim, me, last = claim_path(root, ident), os.path.abspath(owner), [0.0]

    def beat() -> None:
        if time.monotonic() - last[0] < every_s:
            return
        last[0] = time.monotonic()
        holder = _claim_holder(claim)
        if holder is not None and holder[0] == me:
            with contextlib.suppress(OSError):
                os.utime(claim)

    return beat


def release(root: str | Path, ident: str, owner: str | Path) -> None:
    """Drop this experiment's claim on building `ident` (after publishing it)."""
    claim = claim_path(root, ident)
    holder = _claim_holder(claim)
    if holder is not None and holder[0] == os.path.abspath(owner):
        claim.unlink(missing_ok=True)


def link(cache: Path, target: Path) -> None:
    """`cache` becomes a link to the shared store `target` (a local copy is removed first)."""
    if cache.is_dir() and not cache.is_symlink():
        shutil.rmtree(cache)
    tmp_link = cache.with_name(f".{cache.name}.link{os.getpid()}")
    tmp_link.unlink(missing_ok=True)
    tmp_link.symlink_to(target.resolve())
    os.replace(tmp_link, cache)


def publish(cache: str | Path, root: str | Path) -> Path:
    """Move a complete local cache into `root` by its identity and leave a link in its place;
    if `root` already holds that cache complete, drop the local one for a link to it. Returns
    the shared store."""
    cache, root = Path(cache), Path(root)
    attrs = read_attrs(cache)
    if not attrs or attrs.get("complete") is not True or not attrs.get("identity"):
        raise CacheError(f"{cache}: only a complete cache with an identity can be published")
    root.mkdir(parents=True, exist_ok=True)
    target = store_in(root, attrs["identity"])
    with _waiting_lock(target):  # one publisher of this identity at a time
        if find(root, attrs["identity"]) is None:
            if target.exists() or target.is_symlink():
                raise CacheError(f"{target}: exists but is not the complete cache "
                                 f"{attrs['identity'][:16]}…; remove it (or check it with "
                                 f"`dinosae cache verify {target}`)")
            tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
            try:
                os.rename(cache, tmp)
            except OSError:  # another file system: copy
                shutil.copytree(cache, tmp, symlinks=True)
            os.rename(tmp, target)
            target.with_name(target.name + USED).touch()
            log.info("published %s -> %s", cache, target)
        else:
            log.info("%s already holds this cache (identity %s…): using it", target,
                     attrs["identity"][:16])
        link(cache, target)
    release(root, attrs["identity"], cache)
    return target


def _du(path: Path) -> int:
    return sum(f.lstat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def _when(t: float | None) -> str:
    if t is None:
        return "-"
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")


def list_caches(root: str | Path) -> list[dict[str, Any]]:
    """One entry per cache folder in `root`: identity, what made it, size, complete, last use."""
    out = []
    for store in sorted(Path(root).glob("*.zarr")):
        attrs = read_attrs(store)
        if attrs is None:
            continue
        used = store.with_name(store.name + USED)
        enc, src = attrs.get("encoder") or {}, attrs.get("source") or {}
        out.append({
            "store": str(store), "identity": attrs.get("identity"),
            "complete": attrs.get("complete") is True,
            "encoder": enc.get("path"), "encoder_tensors": enc.get("tensors"),
            "source": src.get("path"), "split": src.get("split"), "count": attrs.get("count"),
            "flip": attrs.get("flip"), "dtype": attrs.get("dtype", "float16"),
            "bytes": _du(store), "created": attrs.get("created"),
            "last_use": _when(used.stat().st_mtime if used.is_file() else None)})
    return out
