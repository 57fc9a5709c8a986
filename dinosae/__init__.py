"""dinosae: DINO-SAE (DINO Spherical Autoencoder) with Riemannian flow matching, as a pipeline.

`dinosae.load_autoencoder(path)` and `dinosae.load_generator(path)` (dinosae.api) load a trained
model for use from Python; they are imported on first use, so `import dinosae` stays light.
"""

from typing import Any

__version__ = "0.1.0"

_API = ("Autoencoder", "Encoded", "Generator", "load_autoencoder", "load_generator")


def __getattr__(name: str) -> Any:
    if name in _API:
        from dinosae import api

        return getattr(api, name)
    raise AttributeError(f"module 'dinosae' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
