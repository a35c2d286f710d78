"""Sliding-window prediction with Gaussian importance weighting, as nnU-Net, for 2D and 3D.

Why streamed: a whole volume rarely fits the network, and holding every tile's prediction would cost
``num_tiles x K x patch`` memory. Tiles are generated lazily, predicted ``batch_size`` at a time and added into
one accumulator (``K x shape`` logits plus one weight map), so memory is bounded by the output itself. The
accumulator lives on the device when it fits and falls back to the CPU when it does not.

Why Gaussian: predictions near a patch border see less context and are less reliable; weighting each tile by a
Gaussian centred on the patch lets the tile that sees a voxel best dominate, which removes stitching seams.
"""
from __future__ import annotations

import itertools
from functools import lru_cache
from typing import Callable, Iterator, List, Sequence, Tuple, Union

import numpy as np
import torch
from acvl_utils.cropping_and_padding.padding import pad_nd_image
from scipy.ndimage import gaussian_filter
from tqdm import tqdm

PredictFn = Callable[[torch.Tensor], torch.Tensor]
DeviceLike = Union[str, torch.device, None]


def compute_steps(image_shape: Sequence[int], patch_size: Sequence[int], step_size: float = 0.5
                  ) -> List[List[int]]:
    """Tile start indices per axis, exactly as nnU-Net's ``compute_steps_for_sliding_window``.

    The number of steps is the smallest that keeps neighbouring tiles at most ``step_size * patch`` apart; the
    steps are then spread evenly so the first tile starts at 0 and the last ends at the image border.
    """
    if len(image_shape) != len(patch_size):
        raise ValueError(f"image shape {tuple(image_shape)} and patch size {tuple(patch_size)} differ in length")
    if any(i < p for i, p in zip(image_shape, patch_size)):
        raise ValueError(f"image {tuple(image_shape)} is smaller than the patch {tuple(patch_size)}; pad it first")
    if not 0 < step_size <= 1:
        raise ValueError(f"step_size must be in (0, 1], got {step_size}")
    steps = []
    for size, patch in zip(image_shape, patch_size):
        target = patch * step_size
        num = int(np.ceil((size - patch) / target)) + 1
        max_start = size - patch
        actual = max_start / (num - 1) if num > 1 else 99999999999
        steps.append([int(np.round(actual * i)) for i in range(num)])
    return steps


@lru_cache(maxsize=8)
def _gaussian_numpy(patch_size: Tuple[int, ...], sigma_scale: float) -> np.ndarray:
    tmp = np.zeros(patch_size, dtype=np.float64)
    tmp[tuple(p // 2 for p in patch_size)] = 1
    g = gaussian_filter(tmp, [p * sigma_scale for p in patch_size], 0, mode="constant", cval=0)
    g /= g.max()
    g[g == 0] = g[g > 0].min()  # never zero: every voxel of a tile keeps a (tiny) weight
    return g.astype(np.float32)


def gaussian_importance_map(patch_size: Sequence[int], sigma_scale: float = 1.0 / 8,
                            device: DeviceLike = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Gaussian weights over a patch (peak 1 at the centre, sigma = patch * sigma_scale), minimum clipped > 0."""
    g = _gaussian_numpy(tuple(int(p) for p in patch_size), float(sigma_scale))
    return torch.from_numpy(g.copy()).to(device=device, dtype=dtype)


def iter_tiles(image_shape: Sequence[int], patch_size: Sequence[int], step_size: float = 0.5
               ) -> Iterator[Tuple[slice, ...]]:
    """Spatial slicers of all tiles, in C order over the step grid (lazily: nothing is materialised)."""
    steps = compute_steps(image_shape, patch_size, step_size)
    for starts in itertools.product(*steps):
        yield tuple(slice(s, s + p) for s, p in zip(starts, patch_size))


def num_tiles(image_shape: Sequence[int], patch_size: Sequence[int], step_size: float = 0.5) -> int:
    return int(np.prod([len(s) for s in compute_steps(image_shape, patch_size, step_size)]))


def _allocate(num_classes: int, shape: Sequence[int], device: torch.device
              ) -> Tuple[torch.Tensor, torch.Tensor, torch.device]:
    """Accumulators on ``device``; on an out-of-memory error, on the CPU instead."""
    try:
        return (torch.zeros((num_classes, *shape), dtype=torch.float32, device=device),
                torch.zeros(tuple(shape), dtype=torch.float32, device=device), device)
    except torch.OutOfMemoryError:
        if device.type == "cpu":
            raise
        torch.cuda.empty_cache()
        cpu = torch.device("cpu")
        return (torch.zeros((num_classes, *shape), dtype=torch.float32, device=cpu),
                torch.zeros(tuple(shape), dtype=torch.float32, device=cpu), cpu)


@torch.no_grad()
def sliding_window_predict(predict_patch: PredictFn, image: torch.Tensor, patch_size: Sequence[int],
                           num_classes: int, step_size: float = 0.5, use_gaussian: bool = True,
                           device: DeviceLike = None, batch_size: int = 1, progress: bool = False,
                           sigma_scale: float = 1.0 / 8, pass_offsets: bool = False) -> torch.Tensor:
    """Predict a whole image tile by tile and return the weighted average of the tiles' outputs, (K, *shape).

    ``image`` is (C, *shape) with 2 or 3 spatial axes. ``predict_patch`` maps a (B, C, *patch) tensor to
    (B, K, *patch) logits or probabilities (whatever it returns is averaged). A 2D ``patch_size`` on a 3D image
    predicts slice by slice along axis 0 (nnU-Net's 2d configuration): the callable then sees (B, C, y, x).
    Images smaller than the patch are padded with zeros and the result is cropped back. The output is float32
    on the CPU. With ``pass_offsets`` the callable is ``predict_patch(x, offsets)`` where ``offsets`` gives each
    tile's first voxel in the (unpadded) image, so it can locate the tile in physical space (``--fuse-views``).
    """
    if image.ndim not in (3, 4):
        raise ValueError(f"image must be (C, y, x) or (C, z, y, x), got shape {tuple(image.shape)}")
    device = torch.device(device) if device is not None else image.device
    spatial = image.ndim - 1
    patch = [int(p) for p in patch_size]
    squeeze_axis = None
    if len(patch) == spatial - 1:          # 2D network over a 3D volume
        patch = [1] + patch
        squeeze_axis = 2
    elif len(patch) != spatial:
        raise ValueError(f"patch size {tuple(patch_size)} does not fit an image with {spatial} spatial axes")

    padded, slicer = pad_nd_image(image, [image.shape[0]] + patch, "constant", {"value": 0}, True)
    shape = tuple(padded.shape[1:])
    weights_patch = gaussian_importance_map(patch, sigma_scale, device) if use_gaussian else \
        torch.ones(patch, device=device)
    logits, weight_sum, acc_device = _allocate(num_classes, shape, device)
    if acc_device != device:
        weights_patch = weights_patch.to(acc_device)

    tiles = iter_tiles(shape, patch, step_size)
    total = num_tiles(shape, patch, step_size)
    bar = tqdm(total=total, desc="sliding window", disable=not progress, leave=False)
    while True:
        batch = list(itertools.islice(tiles, max(1, int(batch_size))))
        if not batch:
            break
        x = torch.stack([padded[(slice(None),) + sl] for sl in batch]).to(device, non_blocking=True)
        if squeeze_axis is not None:
            x = x.squeeze(squeeze_axis)
        if pass_offsets:
            pad_lo = [sl.start for sl in slicer[1:]]
            offsets = [tuple(t.start - p for t, p in zip(sl, pad_lo)) for sl in batch]
            y = predict_patch(x, offsets)
        else:
            y = predict_patch(x)
        if squeeze_axis is not None:
            y = y.unsqueeze(squeeze_axis)
        if y.shape[0] != len(batch) or y.shape[1] != num_classes or tuple(y.shape[2:]) != tuple(patch):
            raise ValueError(f"predict_patch returned shape {tuple(y.shape)}, expected "
                             f"({len(batch)}, {num_classes}, {', '.join(map(str, patch))})")
        y = y.to(acc_device, torch.float32)
        for i, sl in enumerate(batch):
            logits[(slice(None),) + sl] += y[i] * weights_patch
            weight_sum[sl] += weights_patch
        bar.update(len(batch))
    bar.close()
    logits /= weight_sum
    out = logits[(slice(None),) + tuple(slicer[1:])]
    return out.to("cpu")
