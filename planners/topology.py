"""U-Net topology from spacing and patch size: how often to pool each axis and which kernels to use.

The rule (nnU-Net's, restated): pool an axis only while its feature map stays at least twice the minimum edge length
and while its spacing is within a factor two of the finest spacing among the axes that may still be pooled, so
that anisotropic images are first pooled in-plane until the voxels are roughly isotropic. A convolution kernel is 1
along an axis whose spacing is still more than twice the finest (thick slices at high resolution: mixing
neighbouring slices there mostly blurs) and becomes 3 once the axis has caught up. The bottleneck uses 3 on every
axis. The patch size is then rounded up to a multiple of 2**pools per axis.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np


@dataclass(frozen=True)
class Topology:
    """Per-stage strides and kernel sizes (stage 0 first) and the patch size they accept."""

    patch_size: Tuple[int, ...]
    strides: Tuple[Tuple[int, ...], ...]
    kernel_sizes: Tuple[Tuple[int, ...], ...]
    pools_per_axis: Tuple[int, ...]

    @property
    def n_stages(self) -> int:
        return len(self.strides)

    @property
    def divisible_by(self) -> Tuple[int, ...]:
        return tuple(2 ** p for p in self.pools_per_axis)


def round_up_to_multiple(shape: Sequence[int], multiples: Sequence[int]) -> Tuple[int, ...]:
    return tuple(int(-(-int(s) // int(m)) * int(m)) for s, m in zip(shape, multiples))


def plan_topology(spacing: Sequence[float], patch_size: Sequence[int], min_edge: int = 4,
                  max_pools_per_axis: Optional[int] = None) -> Topology:
    """Strides, kernel sizes and the (rounded-up) patch size for a patch at ``spacing``."""
    dim = len(spacing)
    spacing_now = [float(s) for s in spacing]
    size_now = [float(s) for s in patch_size]
    pools = [0] * dim
    kernel = [1] * dim
    strides: List[Tuple[int, ...]] = [tuple([1] * dim)]
    kernels: List[Tuple[int, ...]] = []
    limit = max_pools_per_axis if max_pools_per_axis is not None else 10 ** 6
    while True:
        poolable = [a for a in range(dim) if size_now[a] >= 2 * min_edge]
        if not poolable:
            break
        finest = min(spacing_now[a] for a in poolable)
        poolable = [a for a in poolable if spacing_now[a] / finest < 2 and pools[a] < limit]
        if not poolable:
            break
        # a single remaining axis is pooled only if its feature map stays comfortably large
        if len(poolable) == 1 and size_now[poolable[0]] < 3 * min_edge:
            break
        finest_all = min(spacing_now)
        for a in range(dim):
            if kernel[a] == 1 and spacing_now[a] / finest_all < 2:
                kernel[a] = 3
        kernels.append(tuple(kernel))
        stride = []
        for a in range(dim):
            if a in poolable:
                stride.append(2)
                pools[a] += 1
                spacing_now[a] *= 2
                size_now[a] = float(np.ceil(size_now[a] / 2))
            else:
                stride.append(1)
        strides.append(tuple(stride))
    kernels.append(tuple([3] * dim))
    padded = round_up_to_multiple(patch_size, [2 ** p for p in pools])
    return Topology(padded, tuple(strides), tuple(kernels), tuple(pools))


def next_smaller_patch(spacing: Sequence[float], patch_size: Sequence[int], axis: int, min_edge: int = 4
                       ) -> Tuple[int, ...]:
    """The next smaller patch size along ``axis`` that some topology accepts.

    Subtracting the current step (2**pools) can skip valid sizes (256 - 64 = 192 skips 224, which a network with one
    pool fewer accepts), so the step is taken from the topology of the first smaller candidate.
    """
    current = plan_topology(spacing, patch_size, min_edge)
    candidate = list(patch_size)
    candidate[axis] = max(1, candidate[axis] - current.divisible_by[axis])
    step = plan_topology(spacing, candidate, min_edge).divisible_by[axis]
    out = list(patch_size)
    out[axis] = max(1, out[axis] - step)
    return tuple(out)
