"""Whole-exam encoding for diagnosis: every voxel of every view reaches the decision.

Why: an exam-level label is often about tissue at the edge of a stack (collateral ligaments, meniscal horns, a
posteromedial cyst); a centre crop never sees it. The view encoder therefore runs over the whole preprocessed
volume:

* :func:`pad_to_stride` zero-pads each volume at its far end to a multiple of the encoder's total stride (and a
  batch to its largest exam); :func:`feature_masks` marks, per encoder level, the positions that cover real voxels,
  so the pooling (:mod:`orthonet.networks.mil`) ignores the padding.
* :func:`run_encoder` runs a DNA encoder stage by stage, optionally with gradient checkpointing per stage: training
  on whole exams keeps only the stage outputs in memory, not every convolution's activations.
* :func:`encode_tiled` bounds inference memory on large volumes (e.g. 40 x 512 x 512): the encoder runs on
  overlapping tiles (the sliding-window idea of :mod:`orthonet.inference.sliding_window`) and each tile contributes
  the part of the chosen levels' feature maps it "owns" (its centre, away from tile borders), stitched into the whole map.
  Tiles start at multiples of the total stride, so every level's feature grid lines up exactly; the only
  difference from a whole-volume pass is the context each tile sees (and its instance-norm statistics), which
  tests/test_whole_exam.py measures.
* :func:`diffusion_noise` applies OrthoDiffusion's feature recipe: the encoder sees the input noised to timestep
  ``t`` of the denoiser's schedule (the paper: t = 50-200, one timestep per view).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from orthonet.networks.build import cumulative_strides

Shape = Sequence[int]


def total_stride(spec: Dict) -> List[int]:
    """Downsampling of the deepest encoder level per axis: whole volumes are padded to a multiple of it."""
    return [int(s) for s in cumulative_strides(spec)[-1]]


def padded_shape(shape: Shape, stride: Shape) -> List[int]:
    return [int(n) + (-int(n)) % int(s) for n, s in zip(shape, stride)]


def pad_to_stride(x: torch.Tensor, stride: Shape, target: Optional[Shape] = None) -> torch.Tensor:
    """Zero-pad (B, C, *spatial) at the far end of each axis to ``target`` (default: the next multiple of
    ``stride``); ``target`` must itself be a multiple of ``stride`` and not smaller than the input."""
    spatial = list(x.shape[2:])
    target = padded_shape(spatial, stride) if target is None else [int(t) for t in target]
    if any(t < n or t % int(s) for t, n, s in zip(target, spatial, stride)):
        raise ValueError(f"cannot pad {spatial} to {target} with stride {list(stride)}")
    pad: List[int] = []
    for n, t in zip(reversed(spatial), reversed(target)):
        pad += [0, t - n]
    return torch.nn.functional.pad(x, pad) if any(pad) else x


def feature_masks(shapes: torch.Tensor, level_strides: Sequence[Shape], feature_shapes: Sequence[Shape]
                  ) -> List[torch.Tensor]:
    """Per level, (B, *feature_shape) bool: position j covers real voxels iff ``j * stride < original size`` on
    every axis. ``shapes``: (B, ndim) original (unpadded) sizes of each sample."""
    shapes = torch.as_tensor(shapes).long()
    out = []
    for stride, fshape in zip(level_strides, feature_shapes):
        m = None
        for axis, (s, n) in enumerate(zip(stride, fshape)):
            idx = torch.arange(int(n), device=shapes.device) * int(s)                   # (n,)
            ok = idx[None, :] < shapes[:, axis:axis + 1]                                 # (B, n)
            view = [shapes.shape[0]] + [1] * len(fshape)
            view[axis + 1] = int(n)
            ok = ok.reshape(view)
            m = ok if m is None else m & ok
        out.append(m.expand(shapes.shape[0], *[int(n) for n in fshape]))
    return out


def coarsen_level(feature: torch.Tensor, mask: torch.Tensor, kernel: Shape) -> Tuple[torch.Tensor, torch.Tensor]:
    """Max-pool a level's map (B, C, *spatial) and its validity mask (B, *spatial) by ``kernel`` (e.g. onto the
    next coarser encoder level's grid): each coarse cell keeps the strongest response of the fine positions it
    covers that lie on real voxels (padding never wins), and is valid if any of them is.

    Why: a lesion a few voxels wide (a meniscal cleft) lights up fine-level detectors at a handful of positions;
    the max keeps that signal while the attention pooling then sees ``prod(kernel)`` times fewer positions, which
    is what makes a fine level affordable for the head.
    """
    kernel = [int(k) for k in kernel]
    if all(k == 1 for k in kernel):
        return feature, mask
    if feature.ndim - 2 != len(kernel) or any(n % k for n, k in zip(feature.shape[2:], kernel)):
        raise ValueError(f"cannot max-pool a feature map of size {list(feature.shape[2:])} by {kernel}: "
                         "the size must be a multiple of the kernel (stride-padded volumes give that)")
    pool = torch.nn.functional.max_pool3d if len(kernel) == 3 else torch.nn.functional.max_pool2d
    low = torch.finfo(feature.dtype).min
    pooled = pool(feature.masked_fill(~mask[:, None], low), kernel, kernel)
    valid = pool(mask[:, None].to(feature.dtype), kernel, kernel)[:, 0] > 0
    return pooled.masked_fill(~valid[:, None], 0), valid


def coarsen_kernel(spec: Dict, level: int) -> List[int]:
    """Stride ratio of encoder level ``level`` (non-negative) to the next coarser level: the max-pool kernel that
    puts ``level``'s map on the next level's grid."""
    strides = cumulative_strides(spec)
    if not 0 <= level < len(strides) - 1:
        raise ValueError(f"level {level} has no coarser encoder level to be pooled onto (levels 0..{len(strides) - 1})")
    return [int(b) // int(a) for a, b in zip(strides[level], strides[level + 1])]


def run_encoder(encoder: nn.Module, x: torch.Tensor, use_checkpoint: bool = False) -> List[torch.Tensor]:
    """All skips of a DNA encoder (PlainConvEncoder / ResidualEncoder), each stage optionally checkpointed."""
    stem = getattr(encoder, "stem", None)
    if stem is not None:
        x = checkpoint(stem, x, use_reentrant=False) if use_checkpoint else stem(x)
    skips = []
    for stage in encoder.stages:
        x = checkpoint(stage, x, use_reentrant=False) if use_checkpoint else stage(x)
        skips.append(x)
    return skips


def diffusion_noise(x: torch.Tensor, t: int, shapes: Optional[torch.Tensor] = None,
                    generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``x`` noised to timestep ``t`` of the denoiser's schedule (zero padding stays zero). ``generator=None``
    draws fresh noise (training); inference passes a seeded generator so an exam always gives the same logits."""
    from orthonet.diffusion.schedule import NoiseSchedule
    schedule = NoiseSchedule()
    noise = torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.device, x.dtype)
    if shapes is not None:
        voxel = feature_masks(shapes.to(x.device), [[1] * (x.ndim - 2)], [x.shape[2:]])[0]
        noise = noise * voxel[:, None].to(noise.dtype)
    steps = torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)
    return schedule.q_sample(x, steps, noise)


# ------------------------------------------------------------------------------------------------------------
# tiled encoding
# ------------------------------------------------------------------------------------------------------------
def _tile_starts(n: int, tile: int, stride: int) -> List[int]:
    """Tile starts along one axis: multiples of ``stride``, step about half a tile, the last tile flush with the
    end (``n`` and ``tile`` are multiples of ``stride``)."""
    if n <= tile:
        return [0]
    step = max(stride, (tile // 2) // stride * stride)
    starts = list(range(0, n - tile + 1, step))
    if starts[-1] != n - tile:
        starts.append(n - tile)
    return starts


def _owned(starts: List[int], tile: int, n: int, stride: int) -> List[Tuple[int, int]]:
    """The interval of the axis each tile contributes: boundaries halfway through each overlap, on the stride."""
    bounds = [0]
    for a, b in zip(starts[:-1], starts[1:]):
        mid = (b + a + tile) // 2
        bounds.append(int(round(mid / stride)) * stride)
    bounds.append(n)
    return list(zip(bounds[:-1], bounds[1:]))


@torch.no_grad()
def encode_tiled(encoder: nn.Module, x: torch.Tensor, spec: Dict, levels: Sequence[int], tile: Shape
                 ) -> List[torch.Tensor]:
    """Feature maps of the chosen ``levels`` for a stride-padded volume ``x`` (1, C, *spatial), computed tile by
    tile so that memory scales with the tile, not the volume. ``tile`` is rounded up to the total stride."""
    if x.shape[0] != 1:
        raise ValueError("encode_tiled works on one exam at a time")
    stride = total_stride(spec)
    level_strides = [cumulative_strides(spec)[i] for i in levels]
    spatial = [int(n) for n in x.shape[2:]]
    if any(n % s for n, s in zip(spatial, stride)):
        raise ValueError(f"pad the volume {spatial} to the total stride {stride} first (pad_to_stride)")
    tile = [min(n, padded_shape([t], [s])[0]) for n, t, s in zip(spatial, tile, stride)]
    axes = [(_tile_starts(n, t, s), t, n, s) for n, t, s in zip(spatial, tile, stride)]
    owned = [_owned(st, t, n, s) for st, t, n, s in axes]
    out: List[Optional[torch.Tensor]] = [None] * len(levels)
    for combo in np.ndindex(*[len(a[0]) for a in axes]):
        start = [axes[d][0][i] for d, i in enumerate(combo)]
        own = [owned[d][i] for d, i in enumerate(combo)]
        crop = x[(slice(None), slice(None)) + tuple(slice(s, s + t) for s, t in zip(start, tile))]
        skips = run_encoder(encoder, crop)
        for k, (lv, ls) in enumerate(zip(levels, level_strides)):
            f = skips[lv]
            if out[k] is None:
                out[k] = torch.zeros((1, f.shape[1], *[n // s for n, s in zip(spatial, ls)]), dtype=f.dtype,
                                     device=f.device)
            dst = tuple(slice(a // s, b // s) for (a, b), s in zip(own, ls))
            src = tuple(slice((a - st) // s, (b - st) // s) for (a, b), st, s in zip(own, start, ls))
            out[k][(slice(None), slice(None)) + dst] = f[(slice(None), slice(None)) + src]
    return out
