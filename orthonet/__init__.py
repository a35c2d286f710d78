"""orthonet: self-configuring, diffusion-pretrained segmentation and diagnosis for multi-view MSK MRI."""

__version__ = "0.1.0"  # the one source of the version: pyproject.toml reads it (dynamic)
