"""Preprocessed space -> original image space: the exact inverse path of :mod:`orthonet.preprocessing.preprocessor`.

Resample back to the cropped shape (labels: linear on one-hot masks with the same separate thick-axis handling used
during preprocessing; probabilities: linear per class, as nnU-Net exports), put the crop back into the transposed
full grid, undo the transpose, and attach the original ITK header (size, spacing, origin, direction) stored in the
case's properties. Works for any direction matrix: the arrays never leave the original index grid.
"""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np
import SimpleITK as sitk

from orthonet.imageio import Geometry, array_to_image
from orthonet.preprocessing.crop import uncrop
from orthonet.preprocessing.resample import resample_labels, resample_probabilities


def _z_axis(properties: Dict) -> Optional[int]:
    used = properties.get("resampling_used", {})
    return used.get("z_axis")


def restore_original_geometry(array: np.ndarray, properties: Dict, is_probabilities: Optional[bool] = None
                              ) -> np.ndarray:
    """Map a preprocessed-space label map (z, y, x) / (1, z, y, x) or class probabilities (C, z, y, x) back to the
    original image's numpy grid (z, y, x) / (C, z, y, x).

    Label maps: negative values (outside the nonzero region) become background. Probabilities: voxels outside the
    crop box get probability 1 for class 0 (background).
    """
    if is_probabilities is None:
        is_probabilities = np.issubdtype(array.dtype, np.floating) and array.ndim == 4 and array.shape[0] > 1
    crop_shape = [int(s) for s in properties["shape_after_crop"]]
    full_shape = [int(s) for s in properties["shape_before_crop"]]
    bbox = properties["bbox_used_for_cropping"]
    backward = [int(a) for a in properties["transpose_backward"]]
    used = properties.get("resampling_used", {})
    order_z = int(used.get("order_z", 0))
    if is_probabilities:
        probs = resample_probabilities(np.asarray(array, dtype=np.float32), crop_shape, order=1, order_z=order_z,
                                       z_axis=_z_axis(properties))
        full = uncrop(probs, bbox, full_shape, fill_value=0.0)
        if full.shape[0] > 0:
            outside = np.ones(full_shape, dtype=bool)
            outside[tuple(slice(a, b) for a, b in bbox)] = False
            full[0][outside] = 1.0
        return np.ascontiguousarray(full.transpose([0] + [a + 1 for a in backward]))
    seg = np.asarray(array)
    if seg.ndim == 4:
        seg = seg[0]
    seg = np.maximum(seg, 0).astype(np.int16, copy=False)
    label_order = int(used.get("label_order", 1))
    seg = resample_labels(seg, crop_shape, order=label_order, order_z=order_z, z_axis=_z_axis(properties))
    full = uncrop(seg, bbox, full_shape, fill_value=0)
    return np.ascontiguousarray(full.transpose(backward))


def original_geometry(properties: Dict) -> Geometry:
    return Geometry.from_dict(properties["original_geometry"])


def segmentation_to_image(seg: np.ndarray, properties: Dict, dtype=np.uint8) -> sitk.Image:
    """A preprocessed-space label map as a SimpleITK image on the case's exact original grid."""
    restored = restore_original_geometry(seg, properties, is_probabilities=False)
    return array_to_image(restored.astype(dtype, copy=False), original_geometry(properties))


def probabilities_to_image(probabilities: np.ndarray, properties: Dict, dtype=np.uint8) -> sitk.Image:
    """Class probabilities (C, z, y, x) in preprocessed space -> argmax label image on the original grid."""
    restored = restore_original_geometry(probabilities, properties, is_probabilities=True)
    return array_to_image(np.argmax(restored, axis=0).astype(dtype), original_geometry(properties))
