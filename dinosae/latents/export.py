"""A complete cache to one HDF5 file (`dinosae export-latents`)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from dinosae.errors import CacheError
from dinosae.latents.reader import open_cache

log = logging.getLogger(__name__)



def _h5_attr(value: Any) -> Any:
    """Attribute value HDF5 can hold: scalars and flat lists as they are, the rest as JSON."""
    if isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, list) and value and all(isinstance(v, (int, float)) and
                                                 not isinstance(v, bool) for v in value):
        return np.asarray(value)
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return value
    return json.dumps(value)


def export_hdf5(cfg: dict, cache: str | Path, out: str | Path) -> Path:
    """Write a complete cache's arrays (tokens, labels, norms, and the flipped ones) and
    attributes to one HDF5 file; `attrs_json` holds all the store's attributes exactly. The
    tokens are float16 unit vectors whatever the store's dtype (read through the reader:
    store.dequantize), so the file's attribute `dtype` is float16 and `store_dtype` the
    store's. Config: none."""
    import h5py

    lc, out = open_cache(cache), Path(out)
    group, unit = lc.group, lc.attrs["unit_rows"]
    names = [k for k in ("tokens", "labels", "norms", "tokens_flip", "norms_flip") if k in group]
    attrs = {**lc.attrs, "dtype": "float16", "store_dtype": lc.dtype}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:  # a damaged row stops the export: no file at `out`, no temporary left
        with h5py.File(tmp, "w") as f:
            for name in names:
                src = group[name]
                chunks = (min(lc.chunk_rows if name.startswith("tokens") else unit, lc.count),
                          *src.shape[1:])
                dtype = np.float16 if name.startswith("tokens") else src.dtype
                dst = f.create_dataset(name, shape=src.shape, dtype=dtype, chunks=chunks)
                for a in range(0, lc.count, unit):
                    if name.startswith("tokens"):  # checked by the reader (rows_error)
                        rows = np.arange(a, min(a + unit, lc.count))
                        values = lc.read_rows(rows + (lc.count if name.endswith("_flip")
                                                      else 0))[0]
                    else:
                        values = src[a:a + unit]
                    if name.startswith("norms") and not (np.isfinite(values) & (values > 0)).all():
                        rows = np.flatnonzero(~(np.isfinite(values) & (values > 0)).all(axis=1))
                        raise CacheError(f"{cache}: {name} rows {(a + rows[:8]).tolist()} are not "
                                         "finite and positive: the cache is damaged")
                    dst[a:a + unit] = values
            for key, value in attrs.items():
                if value is not None:
                    f.attrs[key] = _h5_attr(value)
            f.attrs["attrs_json"] = json.dumps(lc.attrs)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("exported %s -> %s", cache, out)
    return out
