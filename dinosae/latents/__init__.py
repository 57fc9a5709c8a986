"""The latent cache: every image of a shard folder encoded once into a zarr v3 store of unit-norm
tokens, validated, then read back by training code, or by anyone with plain zarr.

One job per module:

    store.py       the store's format: arrays, attributes, chunking, regions; create and open
    checks.py      what a cache promises, checked: attributes vs arrays, units, rows read
    background.py  iterating in a background thread
    encode.py      encode_init / encode_part / encode_gather (scatter/gather, resumable)
    reader.py      open_cache and LatentCache (rows, fast batches)
    dataset.py     LatentDataset: a torch Dataset for any training code
    shared.py      identity by content, caches shared in latents.root, publishing
    commands.py    `dinosae cache list | verify | path`
    export.py      a complete cache to one HDF5 file

The public names are importable from `dinosae.latents` itself.
"""

from dinosae.errors import CacheError
from dinosae.latents.checks import check_attrs, validate_cache
from dinosae.latents.dataset import LatentDataset
from dinosae.latents.encode import (
    encode_gather,
    encode_images,
    encode_init,
    encode_part,
    iter_images,
    iter_units,
    load_encoder,
    write_units,
)
from dinosae.latents.export import export_hdf5
from dinosae.latents.reader import LatentCache, open_cache
from dinosae.latents.store import (
    ARRAYS,
    DESCRIPTION,
    FORMAT,
    NORM_TOL,
    VERSION,
    chunking,
    compressors,
    describe_region,
    plan_regions,
)

__all__ = ["ARRAYS", "DESCRIPTION", "FORMAT", "NORM_TOL", "VERSION", "CacheError", "LatentCache",
           "LatentDataset", "check_attrs", "chunking", "compressors", "describe_region",
           "encode_gather", "encode_images", "encode_init", "encode_part", "export_hdf5",
           "iter_images", "iter_units", "load_encoder", "open_cache", "plan_regions",
           "validate_cache", "write_units"]
