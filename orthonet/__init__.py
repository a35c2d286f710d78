"""orthonet: self-configuring, diffusion-pretrained segmentation and diagnosis for multi-view MSK MRI."""

__version__ = "0.1.0"
