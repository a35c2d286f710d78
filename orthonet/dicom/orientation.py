"""Which view a DICOM (or any) image is, from its slice orientation alone.

Why its own module: reading, stacking and discovery all name views, and a file's header says nothing about
'sagittal' or 'coronal' -- only the slice normal's direction in patient (LPS) space does.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np

#: A slice normal further than this from every patient axis is 'ambiguous' (45 deg is exactly between two axes;
#: real oblique sagittal/coronal knee planes are tilted 10-25 deg, so 40 deg leaves them clearly assigned).
AMBIGUOUS_ANGLE_DEG = 40.0
#: Standard views and the LPS axis their slice normal points along.
VIEW_AXES = {"sagittal": 0, "coronal": 1, "axial": 2}

_AXIS_NAMES = ("x (left-right)", "y (anterior-posterior)", "z (inferior-superior)")
_AXIS_VIEW = {axis: view for view, axis in VIEW_AXES.items()}


def slice_normal(direction: Sequence[float], spacing: Optional[Sequence[float]] = None) -> np.ndarray:
    """Unit slice normal of an image: its through-plane axis.

    For DICOM stacks this is the direction's third column. For files that were reoriented (e.g. a NIfTI whose
    thick-slice axis is not the last one) pass ``spacing``: when one axis is clearly the coarsest (>= 1.5x the
    others) that axis is the slice axis.
    """
    d = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    axis = 2
    if spacing is not None:
        sp = np.asarray(spacing, dtype=np.float64)
        k = int(np.argmax(sp))
        others = np.delete(sp, k)
        if sp[k] >= 1.5 * others.max():
            axis = k
    n = d[:, axis]
    return n / np.linalg.norm(n)


def assign_view(direction: Sequence[float], spacing: Optional[Sequence[float]] = None) -> Tuple[str, float]:
    """('sagittal' | 'coronal' | 'axial' | 'ambiguous', confidence) from the slice normal's dominant LPS axis.

    ``confidence`` is the cosine between the normal and the chosen patient axis (1.0: a perfectly straight plane).
    'ambiguous' is returned when the normal is more than :data:`AMBIGUOUS_ANGLE_DEG` from every axis (i.e. close
    to 45 deg between two of them); the confidence then still names how close the nearest axis is.
    """
    n = np.abs(slice_normal(direction, spacing))
    axis = int(np.argmax(n))
    confidence = float(n[axis])
    if confidence < np.cos(np.deg2rad(AMBIGUOUS_ANGLE_DEG)):
        return "ambiguous", confidence
    return _AXIS_VIEW[axis], confidence


def describe_normal(direction: Sequence[float], spacing: Optional[Sequence[float]] = None) -> str:
    """'normal (0.71, 0.70, 0.05): 44.6 deg from x (left-right), 45.4 deg from y (...)' for messages."""
    n = slice_normal(direction, spacing)
    angles = np.rad2deg(np.arccos(np.clip(np.abs(n), 0, 1)))
    order = np.argsort(angles)[:2]
    parts = [f"{angles[i]:.1f} deg from {_AXIS_NAMES[i]}" for i in order]
    return f"normal ({n[0]:.2f}, {n[1]:.2f}, {n[2]:.2f}): " + ", ".join(parts)
