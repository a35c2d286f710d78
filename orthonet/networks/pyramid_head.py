"""Feature-pyramid segmentation head: a per-voxel classifier on every encoder level, upsampled to full resolution.

Why: with few labels and a short schedule, a freshly initialised U-Net decoder learns slowly, and whatever the
pretrained encoder knows has to be rediscovered through it (docs/benchmarks.md, "Label efficiency": in 1000
iterations a U-Net learns femur and tibia only, whatever its initialisation; this head learns most structures).
Diffusion features are good *pixel-level* features as they are: Baranchuk et al. (ICLR 2022) segment with a small
per-pixel MLP on the denoiser's upsampled multi-level activations and beat other self-supervised features with
20-40 labelled images; our dense probe reproduces this (a linear classifier on the upsampled levels of the knee
denoiser's encoder: mean Dice 0.46, vs 0.31 for the same network at random initialisation). This head is that
classifier, trained end to end with Dice + CE like any orthonet segmentation output.

Shape of the computation (levels l = 0..L-1 with C_l channels, highest resolution first): a ``1x1 conv C_l -> H``
per level at the level's own resolution, summed top-down as in a feature pyramid (upsample the running sum to the
next finer level, add that level's projection: still a linear map of all levels, like one linear layer on the
concatenated upsampled levels, at the cost of about one full-resolution upsampling), then norm -> LeakyReLU ->
``1x1 conv H -> H`` -> LeakyReLU -> ``1x1 conv H -> classes``. Output: logits at the requested resolution, one
tensor (no deep supervision).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn


class PyramidSegmentationHead(nn.Module):
    """Per-voxel MLP on all encoder levels. ``forward(skips, size) -> (B, num_classes, *size)``.

    ``level_channels``: channels of each encoder level (skips, highest resolution first). ``dims``: 2 or 3.
    ``hidden``: H units of the MLP's hidden layers.
    """

    def __init__(self, level_channels: Sequence[int], num_classes: int, dims: int = 3, hidden: int = 64):
        super().__init__()
        if dims not in (2, 3):
            raise ValueError(f"dims must be 2 or 3, got {dims}")
        conv = nn.Conv3d if dims == 3 else nn.Conv2d
        norm = nn.InstanceNorm3d if dims == 3 else nn.InstanceNorm2d
        self.dims = dims
        self.level_channels = [int(c) for c in level_channels]
        # no biases: the InstanceNorm right after the sum would remove them (its affine bias is the one that counts)
        self.projections = nn.ModuleList([conv(c, hidden, kernel_size=1, bias=False) for c in self.level_channels])
        self.norm = norm(hidden, affine=True, eps=1e-5)
        self.hidden = conv(hidden, hidden, kernel_size=1)
        self.out = conv(hidden, num_classes, kernel_size=1)
        self._mode = "trilinear" if dims == 3 else "bilinear"

    def _resize(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        if list(x.shape[2:]) == [int(s) for s in size]:
            return x
        return F.interpolate(x, size=[int(s) for s in size], mode=self._mode, align_corners=False)

    def forward(self, skips: Sequence[torch.Tensor], size: Optional[Sequence[int]] = None) -> torch.Tensor:
        if len(skips) != len(self.projections):
            raise ValueError(f"expected {len(self.projections)} encoder levels, got {len(skips)}")
        size = list(size) if size is not None else list(skips[0].shape[2:])
        total: Optional[torch.Tensor] = None
        for proj, feature in zip(reversed(self.projections), reversed(list(skips))):   # coarse to fine
            p = proj(feature)
            total = p if total is None else self._resize(total, p.shape[2:]) + p
        h = F.leaky_relu(self.norm(self._resize(total, size)), 0.01)
        return self.out(F.leaky_relu(self.hidden(h), 0.01))
