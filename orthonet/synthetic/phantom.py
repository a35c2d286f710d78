"""A continuous phantom: structures (shape + signal + label) painted in order, each in its own anatomical frame.

Why frames: a knee flexes, a patella dislocates, a shoulder rotates. Each bone carries a rigid frame relative to
the joint's root frame and every structure is defined in the frame of the bone it belongs to, so anatomy stays
readable (millimetres from a landmark) while the case varies. The root frame maps to patient (LPS) space through
one similarity transform (size, mirror for left/right, rotation, position).

Painting order is the occlusion rule: later structures overwrite earlier ones. Fluid is painted before ligaments,
menisci, bones and cartilage, so an effusion fills exactly the space those leave free.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Union

import numpy as np

from orthonet.synthetic.intensities import Signal, Tissue
from orthonet.synthetic.shapes import Shape
from orthonet.synthetic.views import rotation_matrix


def rigid(rotation: Optional[np.ndarray] = None, translation: Sequence[float] = (0.0, 0.0, 0.0),
          pivot: Optional[Sequence[float]] = None) -> np.ndarray:
    """4x4 rigid transform ``p -> R (p - pivot) + pivot + t``."""
    r = np.eye(3) if rotation is None else np.asarray(rotation, dtype=np.float64)
    pv = np.zeros(3) if pivot is None else np.asarray(pivot, dtype=np.float64)
    m = np.eye(4)
    m[:3, :3] = r
    m[:3, 3] = pv - r @ pv + np.asarray(translation, dtype=np.float64)
    return m


def rot_x(deg: float) -> np.ndarray:
    return rotation_matrix((deg, 0.0, 0.0))


def rot_y(deg: float) -> np.ndarray:
    return rotation_matrix((0.0, deg, 0.0))


def rot_z(deg: float) -> np.ndarray:
    return rotation_matrix((0.0, 0.0, deg))


def apply(m: np.ndarray, p: Sequence[float]) -> np.ndarray:
    """Apply a 4x4 transform to a point."""
    return m[:3, :3] @ np.asarray(p, dtype=np.float64) + m[:3, 3]


@dataclass
class Structure:
    """One painted element. ``label`` None leaves the label map untouched (lesion signal inside a structure);
    0 clears it (fluid replacing torn fibres). ``soft_mm`` feathers the edge (edema clouds)."""

    name: str
    shape: Shape
    signal: Union[str, Signal]
    label: Optional[int] = None
    frame: str = "root"
    soft_mm: float = 0.0
    opacity: float = 1.0

    def signal_fn(self) -> Signal:
        return Tissue(self.signal) if isinstance(self.signal, str) else self.signal


@dataclass
class Phantom:
    """Everything needed to render one exam of one joint."""

    joint: str
    structures: List[Structure]
    frames: Dict[str, np.ndarray]            # frame name -> 4x4 (frame coords -> root coords)
    to_patient: np.ndarray                   # 4x4 (root coords -> LPS mm)
    scale: float                             # isotropic size factor inside ``to_patient``
    diagnosis: Dict[str, bool]
    lesion_sites: Dict[str, np.ndarray] = field(default_factory=dict)   # root coords of each lesion's centre
    params: Dict = field(default_factory=dict)

    def frame_to_patient(self, frame: str) -> np.ndarray:
        return self.to_patient @ self.frames.get(frame, np.eye(4))

    def patient_point(self, root_point: Sequence[float]) -> np.ndarray:
        return apply(self.to_patient, root_point)

    @property
    def center_mm(self) -> np.ndarray:
        """Patient-space position of the root origin (where the technologist centres the views)."""
        return self.to_patient[:3, 3].copy()


def case_transform(scale: float, mirror: bool, angles_deg: Sequence[float], position: Sequence[float]) -> np.ndarray:
    """Root -> patient: scale, optional mirror of patient x (left/right limb), rotation, translation."""
    m = np.eye(4)
    s = np.diag([-scale if mirror else scale, scale, scale])
    m[:3, :3] = rotation_matrix(angles_deg) @ s
    m[:3, 3] = np.asarray(position, dtype=np.float64)
    return m
