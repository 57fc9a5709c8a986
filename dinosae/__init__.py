"""dinosae: DINO-SAE (DINO Spherical Autoencoder) with Riemannian flow matching, as a pipeline."""

__version__ = "0.1.0"
