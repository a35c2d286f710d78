"""Resampling of images and label maps to a target spacing, one axis at a time.

Why our own resampler: nnU-Net resamples images with a 3D cubic spline (skimage/scipy ``zoom``), which evaluates
4x4x4 = 64 coefficients per output voxel. The cubic B-spline is a tensor product, so the same interpolation can be
applied along one axis after the other (4 + 4 + 4 coefficients per voxel) with the same result up to float rounding,
which is several times faster. Label maps are resampled like nnU-Net's ``order=1`` segmentation resampling (linear
interpolation of each class's one-hot mask, then the most likely class), but each class only inside its bounding
box. As in nnU-Net, an anisotropic (thick-slice) axis is resampled separately with ``order_z`` (nearest by default)
so that thick slices are not smeared into each other.

Coordinates follow the ``align_corners=False`` convention of skimage/scipy ``grid_mode``: output voxel ``i`` of
``n_out`` samples the input at ``(i + 0.5) * n_in / n_out - 0.5``. Outside the volume the signal is mirrored
(images) or its edge value repeated (labels, nearest).
"""
from __future__ import annotations

from functools import lru_cache
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy.ndimage import spline_filter1d

#: Largest / smallest spacing ratio from which an axis counts as out-of-plane (thick-slice), as in nnU-Net.
ANISOTROPY_THRESHOLD = 3.0
_TIE_TOL = 1e-6


# ------------------------------------------------------------------------------------------------------------
# shapes and policy
# ------------------------------------------------------------------------------------------------------------
def compute_new_shape(old_shape: Sequence[int], old_spacing: Sequence[float],
                      new_spacing: Sequence[float]) -> Tuple[int, ...]:
    """Shape after resampling from ``old_spacing`` to ``new_spacing`` (physical extent kept, at least 1 voxel)."""
    if not (len(old_shape) == len(old_spacing) == len(new_spacing)):
        raise ValueError(f"shape {old_shape}, spacing {old_spacing} and target {new_spacing} differ in length")
    return tuple(max(1, int(round(float(n) * float(o) / float(t))))
                 for n, o, t in zip(old_shape, old_spacing, new_spacing))


def lowres_axis(spacing: Sequence[float], threshold: float = ANISOTROPY_THRESHOLD) -> Optional[int]:
    """The single axis whose spacing is ``threshold`` times coarser than the finest one, else None.

    None also when two axes share the largest spacing (e.g. (0.3, 1.2, 1.2)): there is no single slice axis then.
    """
    spacing = np.asarray(spacing, dtype=np.float64)
    if spacing.max() / spacing.min() <= threshold:
        return None
    largest = np.flatnonzero(np.isclose(spacing, spacing.max()))
    return int(largest[0]) if len(largest) == 1 else None


def separate_axis(current_spacing: Sequence[float], target_spacing: Sequence[float],
                  separate_z: Optional[bool], anisotropy_axis: Optional[int] = None,
                  threshold: float = ANISOTROPY_THRESHOLD) -> Optional[int]:
    """Axis to resample with ``order_z`` instead of ``order`` (None: resample all axes alike).

    ``separate_z`` True forces it on ``anisotropy_axis`` (or the coarsest axis), False forces it off and None
    decides per case as nnU-Net does: the current spacing's thick axis if the case is anisotropic, else the target
    spacing's thick axis if the target is.
    """
    if separate_z is False:
        return None
    if separate_z is True:
        if anisotropy_axis is not None:
            return int(anisotropy_axis)
        axis = lowres_axis(current_spacing, 1.0) if lowres_axis(current_spacing, 1.0) is not None \
            else lowres_axis(target_spacing, 1.0)
        return axis
    axis = lowres_axis(current_spacing, threshold)
    if axis is None:
        axis = lowres_axis(target_spacing, threshold)
    return axis


# ------------------------------------------------------------------------------------------------------------
# one-axis interpolation weights
# ------------------------------------------------------------------------------------------------------------
def _mirror(idx: np.ndarray, n: int) -> np.ndarray:
    """Mirror indices into [0, n) reflecting about the edge samples (scipy's 'mirror' mode)."""
    if n == 1:
        return np.zeros_like(idx)
    period = 2 * n - 2
    idx = np.mod(idx, period)
    return np.where(idx > n - 1, period - idx, idx)


@lru_cache(maxsize=256)
def axis_taps(n_in: int, n_out: int, order: int) -> Tuple[np.ndarray, np.ndarray]:
    """Input indices (n_out, k) and weights (n_out, k) that interpolate ``n_out`` samples from ``n_in``.

    order 0: nearest; order 1: linear (edge repeated); order 3: cubic B-spline on spline-prefiltered
    coefficients (mirrored). Cached: a dataset has few distinct axis lengths.
    """
    x = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    if order == 0:
        idx = np.clip(np.floor(x + 0.5), 0, n_in - 1).astype(np.int64)[:, None]
        w = np.ones((n_out, 1), np.float32)
    elif order == 1:
        x = np.clip(x, 0, n_in - 1)
        f = np.floor(x)
        t = x - f
        f = f.astype(np.int64)
        idx = np.stack([f, np.minimum(f + 1, n_in - 1)], 1)
        w = np.stack([1 - t, t], 1).astype(np.float32)
    elif order == 3:
        f = np.floor(x)
        t = x - f
        f = f.astype(np.int64)
        idx = _mirror(np.stack([f - 1, f, f + 1, f + 2], 1), n_in)
        w = np.stack([(1 - t) ** 3, 3 * t ** 3 - 6 * t ** 2 + 4, -3 * t ** 3 + 3 * t ** 2 + 3 * t + 1, t ** 3],
                     1) / 6.0
        w = w.astype(np.float32)
    else:
        raise ValueError(f"interpolation order {order} is not supported (use 0, 1 or 3)")
    idx.setflags(write=False)
    w.setflags(write=False)
    return idx, w


def _apply_taps(arr: np.ndarray, axis: int, idx: np.ndarray, w: np.ndarray) -> np.ndarray:
    shape = [1] * arr.ndim
    shape[axis] = idx.shape[0]
    out = np.take(arr, idx[:, 0], axis=axis)
    if w.shape[1] == 1:
        return out
    out *= w[:, 0].reshape(shape)
    for k in range(1, idx.shape[1]):
        term = np.take(arr, idx[:, k], axis=axis)
        term *= w[:, k].reshape(shape)
        out += term
    return out


def resample_axis(arr: np.ndarray, axis: int, n_out: int, order: int) -> np.ndarray:
    """Resample float array ``arr`` along one axis to ``n_out`` samples."""
    n_in = arr.shape[axis]
    if n_in == n_out:
        return arr
    if order == 3 and n_in > 1:
        arr = spline_filter1d(arr, order=3, axis=axis, output=np.float32, mode="mirror")
    idx, w = axis_taps(n_in, n_out, order if n_in > 1 else 0)
    return _apply_taps(arr, axis, idx, w)


def _axis_orders(old_shape: Sequence[int], new_shape: Sequence[int], order: int, order_z: int,
                 z_axis: Optional[int]) -> List[Tuple[int, int]]:
    """(axis, order) pairs for the axes that change, shrinking axes first (less work for the following ones)."""
    axes = [a for a in range(len(old_shape)) if old_shape[a] != new_shape[a]]
    axes.sort(key=lambda a: (new_shape[a] / old_shape[a], a))
    return [(a, order_z if a == z_axis else order) for a in axes]


# ------------------------------------------------------------------------------------------------------------
# public API
# ------------------------------------------------------------------------------------------------------------
def resample_image(data: np.ndarray, new_shape: Sequence[int], order: int = 3, order_z: int = 0,
                   z_axis: Optional[int] = None) -> np.ndarray:
    """Resample an intensity volume (C, z, y, x) to spatial ``new_shape``; returns float32.

    ``z_axis`` (spatial index) is resampled with ``order_z`` instead of ``order``.
    """
    new_shape = tuple(int(s) for s in new_shape)
    if data.ndim != len(new_shape) + 1:
        raise ValueError(f"data of shape {data.shape} needs a channel axis and {len(new_shape)} spatial axes")
    if tuple(data.shape[1:]) == new_shape:
        return data.astype(np.float32, copy=False)
    out = []
    for c in range(data.shape[0]):
        arr = data[c].astype(np.float32, copy=False)
        for axis, o in _axis_orders(arr.shape, new_shape, order, order_z, z_axis):
            arr = resample_axis(arr, axis, new_shape[axis], o)
        out.append(arr)
    return np.stack(out, 0)


def _touched_range(idx: np.ndarray, lo: int, hi: int) -> Tuple[int, int]:
    """Output range [a, b) whose taps read any input index in [lo, hi)."""
    hit = np.any((idx >= lo) & (idx < hi), axis=1)
    where = np.flatnonzero(hit)
    if len(where) == 0:
        return 0, 0
    return int(where[0]), int(where[-1]) + 1


def resample_labels(seg: np.ndarray, new_shape: Sequence[int], order: int = 1, order_z: int = 0,
                    z_axis: Optional[int] = None) -> np.ndarray:
    """Resample an integer label map (z, y, x) (or (1, z, y, x)) to ``new_shape``.

    order 0 takes the nearest voxel. order 1 interpolates each label's one-hot mask linearly and keeps the most
    likely label (ties go to the higher label value, as nnU-Net's ``resize_segmentation``). Each label is only
    interpolated inside its own bounding box, and the most frequent label is never interpolated at all: its
    probability is one minus the others' (interpolation weights sum to one).
    """
    squeeze = False
    if seg.ndim == len(new_shape) + 1:
        if seg.shape[0] != 1:
            raise ValueError("resample_labels expects a single-channel label map")
        seg, squeeze = seg[0], True
    new_shape = tuple(int(s) for s in new_shape)
    if tuple(seg.shape) == new_shape:
        out = seg.copy()
        return out[None] if squeeze else out
    axes = _axis_orders(seg.shape, new_shape, order, order_z, z_axis)
    taps = {a: axis_taps(seg.shape[a], new_shape[a], o) for a, o in axes}

    if all(o == 0 for _, o in axes):
        out = seg
        for a, _ in axes:
            out = np.take(out, taps[a][0][:, 0], axis=a)
        out = np.ascontiguousarray(out)
        return out[None] if squeeze else out
    if order not in (0, 1) or order_z not in (0, 1):
        raise ValueError("labels are resampled with order 0 (nearest) or 1 (linear on one-hot masks)")

    offset = int(seg.min())
    counts = np.bincount((seg - offset).ravel())
    values = [int(v) + offset for v in np.flatnonzero(counts)]
    implicit = int(np.argmax(counts)) + offset
    best_p = np.zeros(new_shape, np.float32)
    total = np.zeros(new_shape, np.float32)
    best_label = np.full(new_shape, implicit, dtype=seg.dtype)
    for value in values:
        if value == implicit:
            continue
        mask = seg == value
        in_box = [np.flatnonzero(np.any(mask, axis=tuple(b for b in range(seg.ndim) if b != a)))
                  for a in range(seg.ndim)]
        in_lo = [int(ix[0]) for ix in in_box]
        in_hi = [int(ix[-1]) + 1 for ix in in_box]
        out_sl, src_sl, local_taps = [], [], {}
        for a in range(seg.ndim):
            if a in taps:
                idx, w = taps[a]
                o0, o1 = _touched_range(idx, in_lo[a], in_hi[a])
                sub_idx = idx[o0:o1]
                s0, s1 = int(sub_idx.min()), int(sub_idx.max()) + 1
                local_taps[a] = (sub_idx - s0, w[o0:o1])
            else:
                o0, o1, s0, s1 = in_lo[a], in_hi[a], in_lo[a], in_hi[a]
            out_sl.append(slice(o0, o1))
            src_sl.append(slice(s0, s1))
        p = mask[tuple(src_sl)].astype(np.float32)
        for a, _ in axes:
            p = _apply_taps(p, a, *local_taps[a])
        out_sl = tuple(out_sl)
        total[out_sl] += p
        region_best = best_p[out_sl]
        wins = p >= region_best - _TIE_TOL
        wins &= p > 0
        region_best[wins] = p[wins]
        best_label[out_sl][wins] = value
    p_implicit = 1.0 - total
    implicit_wins = (p_implicit > best_p + _TIE_TOL) | ((np.abs(p_implicit - best_p) <= _TIE_TOL) &
                                                          (implicit > best_label))
    best_label[implicit_wins] = implicit
    return best_label[None] if squeeze else best_label


def resample_probabilities(probabilities: np.ndarray, new_shape: Sequence[int], order: int = 1, order_z: int = 0,
                           z_axis: Optional[int] = None) -> np.ndarray:
    """Resample class probabilities (C, z, y, x) for export (nnU-Net exports with order 1, order_z 0)."""
    return resample_image(probabilities, new_shape, order=order, order_z=order_z, z_axis=z_axis)


def policy_from_plan(resampling: Dict, current_spacing: Sequence[float], target_spacing: Sequence[float]
                     ) -> Dict:
    """Concrete orders and separate axis for one case from a plan's ``resampling`` entry."""
    axis = separate_axis(current_spacing, target_spacing, resampling.get("separate_z"),
                         resampling.get("anisotropy_axis"),
                         float(resampling.get("anisotropy_threshold", ANISOTROPY_THRESHOLD)))
    return {"image_order": int(resampling.get("image_order", 3)), "label_order": int(resampling.get("label_order", 1)),
            "order_z": int(resampling.get("order_z", 0)), "z_axis": axis}
