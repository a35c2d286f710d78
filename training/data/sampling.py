"""Where to cut a patch: random, foreground-centred, centre (+ jitter).

Why nnU-Net's scheme: most patches of a large MRI contain little or no foreground, so a fixed share of every batch
(``oversample_foreground=0.33``, the last third of the batch) is centred on a voxel of a randomly chosen
foreground class, taken from the ``class_locations`` that preprocessing sampled. Patches are cut at the *initial*
(enlarged) patch size so that the spatial transform (rotation, scaling) can crop the final patch from the middle
without empty corners; ``need_to_pad`` lets patches hang over the volume border by half that enlargement, so border
regions are seen as often as the middle. Volumes smaller than the patch are padded (image 0, label -1).

All functions take an explicit ``np.random.Generator``: sampling is reproducible from a seed.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np

Bbox = List[List[int]]


def parse_class_locations(properties: Dict, ndim: int = 3, exclude: Sequence[int] = ()) -> Dict[int, np.ndarray]:
    """``properties['class_locations']`` as {label: (n, ndim) int array}, empty classes and ``exclude`` dropped.

    Accepts coordinates with or without a leading channel index (nnU-Net stores (c, z, y, x); we store (z, y, x)).
    """
    raw = properties.get("class_locations") or {}
    out: Dict[int, np.ndarray] = {}
    for key, coords in raw.items():
        try:
            label = int(key)
        except (TypeError, ValueError):
            continue
        if label in exclude or label < 0 or coords is None or len(coords) == 0:
            continue
        arr = np.asarray(coords, dtype=np.int64).reshape(len(coords), -1)
        out[label] = arr[:, -ndim:]
    return out


def need_to_pad(initial_patch_size: Sequence[int], final_patch_size: Sequence[int]) -> np.ndarray:
    """How far a sampled (initial) patch may hang over the border: initial - final, per axis."""
    return np.maximum(0, np.asarray(initial_patch_size, int) - np.asarray(final_patch_size, int))


def _bounds(shape: Sequence[int], patch_size: Sequence[int], pad: Sequence[int]):
    shape = np.asarray(shape, int)
    patch = np.asarray(patch_size, int)
    pad = np.asarray(pad, int).copy()
    small = shape + pad < patch
    pad[small] = (patch - shape)[small]  # volume smaller than the patch: pad on both sides
    lbs = -(pad // 2)
    ubs = shape + pad // 2 + pad % 2 - patch
    return lbs, ubs


def _to_bbox(lbs: Sequence[int], patch_size: Sequence[int]) -> Bbox:
    return [[int(lo), int(lo) + int(p)] for lo, p in zip(lbs, patch_size)]


def random_bbox(shape: Sequence[int], patch_size: Sequence[int], pad: Sequence[int],
                rng: np.random.Generator) -> Bbox:
    """A uniformly random patch position (half-open [lo, hi) per axis)."""
    lbs, ubs = _bounds(shape, patch_size, pad)
    return _to_bbox([rng.integers(lo, hi + 1) for lo, hi in zip(lbs, ubs)], patch_size)


def foreground_bbox(shape: Sequence[int], patch_size: Sequence[int], pad: Sequence[int],
                    locations: Dict[int, np.ndarray], rng: np.random.Generator,
                    label: Optional[int] = None) -> Optional[Bbox]:
    """A patch centred (as far as the bounds allow) on a random voxel of a random foreground class.

    ``label`` forces the class when present. Returns None when the case has no foreground locations.
    """
    eligible = sorted(k for k, v in locations.items() if len(v))
    if not eligible:
        return None
    cls = label if label in eligible else eligible[int(rng.integers(len(eligible)))]
    voxels = locations[cls]
    voxel = voxels[int(rng.integers(len(voxels)))]
    lbs, ubs = _bounds(shape, patch_size, pad)
    patch = np.asarray(patch_size, int)
    lo = np.clip(voxel - patch // 2, lbs, np.maximum(lbs, ubs))
    return _to_bbox(lo, patch_size)


def center_bbox(shape: Sequence[int], patch_size: Sequence[int], jitter: float = 0.0,
                rng: Optional[np.random.Generator] = None) -> Bbox:
    """The centred patch; with ``jitter`` > 0 its centre moves by up to ``jitter`` x patch size per axis.

    Diagnosis views use the jittered version in training (the abnormality can be anywhere, but the joint is near
    the centre of the field of view) and the deterministic version in validation/inference.
    """
    shape = np.asarray(shape, int)
    patch = np.asarray(patch_size, int)
    lo = (shape - patch) // 2
    if jitter > 0:
        if rng is None:
            raise ValueError("center_bbox with jitter needs an rng")
        amp = np.floor(jitter * patch).astype(int)
        lo = lo + np.array([rng.integers(-a, a + 1) for a in amp])
    return _to_bbox(lo, patch_size)


def oversample_this_sample(sample_index: int, batch_size: int, fraction: float,
                           rng: Optional[np.random.Generator] = None) -> bool:
    """Whether sample ``sample_index`` of a batch must be foreground-centred.

    nnU-Net's rule: the last ``batch_size - round(batch_size * (1 - fraction))`` samples are (batch 2 at 0.33 ->
    one). When that rounds to none (batch size 1), each sample is foreground-centred with probability
    ``fraction`` instead, so small batches still see foreground.
    """
    if fraction <= 0:
        return False
    n_random = round(batch_size * (1.0 - fraction))
    if n_random < batch_size:
        return sample_index >= n_random
    if rng is None:
        raise ValueError("probabilistic oversampling needs an rng")
    return bool(rng.random() < fraction)


def patch_center_physical(array_affine: np.ndarray, bbox: Bbox) -> np.ndarray:
    """Physical position (x, y, z) of the centre of ``bbox`` in an array whose index->physical affine is given."""
    center = [(b[0] + b[1] - 1) / 2.0 for b in bbox]
    return (np.asarray(array_affine, dtype=np.float64) @ np.array(center + [1.0]))[:3]


def aligned_bbox(array_affine: np.ndarray, center_physical: Sequence[float], patch_size: Sequence[int]) -> Bbox:
    """The ``patch_size`` box of an array (index->physical ``array_affine``) centred on a physical point.

    Why: with ``--fuse-views`` another view's crop must cover the same anatomy as the segmentation view's patch;
    the two arrays share nothing but physical space, so the centre is mapped through both affines.
    """
    idx = np.linalg.solve(np.asarray(array_affine, dtype=np.float64), np.append(np.asarray(center_physical), 1.0))
    lo = np.round(idx[:3] - (np.asarray(patch_size) - 1) / 2.0).astype(int)
    return _to_bbox(lo, patch_size)
