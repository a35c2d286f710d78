"""Scanner-like view grids in LPS patient coordinates (x: right->left, y: anterior->posterior, z: inferior->superior).

Why: every synthetic exam is a phantom defined in millimetres and *sampled* through each view's grid, exactly as a
scanner acquires sagittal, coronal and axial stacks, so the three views agree only through their headers
(origin, spacing, direction) — the situation orthonet must handle with real exams.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from orthonet.imageio import Geometry

# Column vectors (i = image column axis, j = image row axis, k = slice normal) for each standard view.
_VIEW_AXES: Dict[str, Tuple[Sequence[float], Sequence[float]]] = {
    "axial": ((1, 0, 0), (0, 1, 0)),        # columns R->L, rows A->P, slices I->S
    "coronal": ((1, 0, 0), (0, 0, -1)),     # columns R->L, rows S->I, slices A->P
    "sagittal": ((0, 1, 0), (0, 0, -1)),    # columns A->P, rows S->I, slices L->R
}


def rotation_matrix(angles_deg: Sequence[float]) -> np.ndarray:
    """Rotation about x, then y, then z (degrees)."""
    ax, ay, az = np.deg2rad(np.asarray(angles_deg, dtype=np.float64))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def view_direction(view: str, oblique_deg: Optional[Sequence[float]] = None) -> np.ndarray:
    """3x3 direction matrix (columns = index axes i, j, k) of a standard view, optionally tilted (oblique)."""
    if view not in _VIEW_AXES:
        raise ValueError(f"unknown view '{view}'; known: {sorted(_VIEW_AXES)}")
    i, j = (np.asarray(a, dtype=np.float64) for a in _VIEW_AXES[view])
    d = np.stack([i, j, np.cross(i, j)], axis=1)
    if oblique_deg is not None:
        d = rotation_matrix(oblique_deg) @ d
    return d


@dataclass(frozen=True)
class ViewGrid:
    """A view's acquisition: field of view centre (mm), in-plane spacing, slice spacing and matrix size."""

    view: str
    center_mm: Tuple[float, float, float]
    in_plane_mm: float
    slice_mm: float
    matrix: Tuple[int, int]          # (columns, rows)
    n_slices: int
    direction: Tuple[float, ...]

    @classmethod
    def make(cls, view: str, center_mm: Sequence[float], fov_mm: Tuple[float, float], coverage_mm: float,
             in_plane_mm: float, slice_mm: float, oblique_deg: Optional[Sequence[float]] = None) -> "ViewGrid":
        matrix = (max(2, int(round(fov_mm[0] / in_plane_mm))), max(2, int(round(fov_mm[1] / in_plane_mm))))
        n_slices = max(1, int(round(coverage_mm / slice_mm)))
        d = view_direction(view, oblique_deg)
        return cls(view, tuple(float(c) for c in center_mm), float(in_plane_mm), float(slice_mm), matrix,
                   n_slices, tuple(d.reshape(-1).tolist()))

    @property
    def geometry(self) -> Geometry:
        size = (self.matrix[0], self.matrix[1], self.n_slices)
        spacing = np.array([self.in_plane_mm, self.in_plane_mm, self.slice_mm])
        d = np.asarray(self.direction).reshape(3, 3)
        origin = np.asarray(self.center_mm) - d @ (spacing * (np.asarray(size) - 1) / 2.0)
        return Geometry(size, tuple(spacing.tolist()), tuple(origin.tolist()), self.direction)

    def physical_points(self, slice_offsets_mm: Sequence[float] = (0.0,)) -> np.ndarray:
        """Physical coordinates (len(offsets), z, y, x, 3) of voxel centres, shifted along the slice normal by
        each offset (used to average thin sub-slices into one thick, partial-volume slice)."""
        g = self.geometry
        affine = g.index_to_physical()
        zz, yy, xx = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in g.array_shape), indexing="ij")
        idx = np.stack([zz, yy, xx, np.ones_like(zz)], -1)
        pts = idx @ affine.T
        normal = np.asarray(self.direction).reshape(3, 3)[:, 2]
        return np.stack([pts[..., :3] + o * normal for o in slice_offsets_mm], 0)
