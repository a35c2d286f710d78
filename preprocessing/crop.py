"""Crop a volume to the bounding box of its nonzero region, and put a crop back.

Why: MRI volumes often carry empty borders (zero-filled k-space, padding, masks); removing them makes every later
step cheaper. The crop box is stored with each case so export can put the prediction back into the full grid.
Bounding boxes are half-open ``[[start, end), ...]`` as in acvl_utils / nnU-Net.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np
from acvl_utils.cropping_and_padding.bounding_boxes import bounding_box_to_slice, get_bbox_from_mask
from scipy.ndimage import binary_fill_holes

#: Label value written into the stored segmentation outside the (hole-filled) nonzero mask, as nnU-Net does.
OUTSIDE_LABEL = -1

BBox = List[List[int]]


def nonzero_bbox(data: np.ndarray) -> BBox:
    """Bounding box of the voxels that are nonzero in any channel of ``data`` (C, z, y, x).

    An all-zero volume keeps its full extent (there is nothing to crop to, and an empty box would break every later
    step).
    """
    nonzero = data[0] != 0
    for c in range(1, data.shape[0]):
        nonzero |= data[c] != 0
    if not nonzero.any():
        return [[0, int(s)] for s in nonzero.shape]
    # acvl_utils' slice-scanning version: fast when the box is close to the image size (the usual case)
    return [[int(a), int(b)] for a, b in get_bbox_from_mask(nonzero)]


def nonzero_mask_in_bbox(data_cropped: np.ndarray) -> np.ndarray:
    """Hole-filled nonzero mask of an already cropped (C, z, y, x) volume.

    Filling holes after cropping gives the same mask as filling before: the crop box is the mask's own bounding box,
    so a background region touches the box border exactly when it touches the image border. Doing it on the crop is
    cheaper, and it is skipped entirely when nothing is zero (the usual case for MRI).
    """
    mask = data_cropped[0] != 0
    for c in range(1, data_cropped.shape[0]):
        mask |= data_cropped[c] != 0
    if mask.all():
        return mask
    return binary_fill_holes(mask)


def crop_to_nonzero(data: np.ndarray, seg: Optional[np.ndarray] = None
                    ) -> Tuple[np.ndarray, Optional[np.ndarray], BBox, np.ndarray]:
    """Crop (C, z, y, x) ``data`` (and a (1, z, y, x) ``seg``) to the nonzero bounding box.

    Returns (data, seg, bbox, mask) where ``mask`` is the hole-filled nonzero mask inside the box. In ``seg`` the
    background outside the mask becomes :data:`OUTSIDE_LABEL`, so the trainer can tell 'outside the body' apart.
    """
    bbox = nonzero_bbox(data)
    slicer = bounding_box_to_slice(bbox)
    data = data[(slice(None),) + slicer]
    mask = nonzero_mask_in_bbox(data)
    if seg is not None:
        seg = np.array(seg[(slice(None),) + slicer], copy=True)
        seg[(seg == 0) & ~mask[None]] = OUTSIDE_LABEL
    return data, seg, bbox, mask


def uncrop(cropped: np.ndarray, bbox: Sequence[Sequence[int]], full_shape: Sequence[int],
           fill_value: float = 0) -> np.ndarray:
    """Place ``cropped`` (..., z, y, x) back into an array of spatial shape ``full_shape`` filled with ``fill_value``.

    Leading (channel) axes are kept. The inverse of the slicing done by :func:`crop_to_nonzero`.
    """
    lead = cropped.shape[:cropped.ndim - len(full_shape)]
    out = np.full(tuple(lead) + tuple(int(s) for s in full_shape), fill_value, dtype=cropped.dtype)
    expected = tuple(int(b) - int(a) for a, b in bbox)
    if tuple(cropped.shape[len(lead):]) != expected:
        raise ValueError(f"crop of shape {cropped.shape[len(lead):]} does not fit the box {list(bbox)}")
    out[(Ellipsis,) + bounding_box_to_slice([list(map(int, b)) for b in bbox])] = cropped
    return out
