"""What a joint model provides, and the per-case random streams it draws from.

Why named random streams: a case's anatomy, each lesion's size and place, the view placement and the noise each
come from their own generator derived from (case seed, stream name). Turning a lesion on or off, or adding a new
parameter to one lesion, therefore changes nothing else in the exam: a test can render the same knee with and
without an ACL tear and compare.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Callable, Dict, Tuple

import numpy as np

from orthonet.errors import OrthoError
from orthonet.synthetic.phantom import Phantom


class CaseRandom:
    """Independent, reproducible generators per named purpose for one case seed."""

    def __init__(self, seed: int):
        self.seed = int(seed)

    def stream(self, name: str) -> np.random.Generator:
        return np.random.default_rng([self.seed & 0xFFFFFFFF, self.seed >> 32, zlib.crc32(name.encode())])


@dataclass(frozen=True)
class ViewLayout:
    """A view's protocol for one joint: field of view (columns, rows) and through-plane coverage in mm, a
    protocol tilt about the patient axes (degrees; the z tilt is mirrored for a left limb) and the view's
    spacing relative to the size preset (the sagittal reference view uses the preset exactly)."""

    fov_mm: Tuple[float, float]
    coverage_mm: float
    tilt_deg: Tuple[float, float, float] = (0.0, 0.0, 0.0)   # protocol obliquity (e.g. shoulder oblique coronal)
    spacing_scale: Tuple[float, float] = (1.0, 1.0)          # (in-plane, slice) relative to the size preset


@dataclass(frozen=True)
class JointModel:
    """A joint: its label names (values 1..K in this order), abnormalities, prevalences, view protocol and the
    function that builds one case's phantom from random streams and the lesions present."""

    name: str
    dataset_name: str
    labels: Tuple[str, ...]
    diagnoses: Tuple[str, ...]
    prevalence: Dict[str, float]
    views: Dict[str, ViewLayout]
    build: Callable[[CaseRandom, Dict[str, bool]], Phantom]
    description: str
    view_center: Tuple[float, float, float] = (0.0, 0.0, 0.0)   # root-frame point the stacks are centred on

    def label_dict(self) -> Dict[str, int]:
        out = {"background": 0}
        out.update({name: i + 1 for i, name in enumerate(self.labels)})
        return out


_REGISTRY: Dict[str, JointModel] = {}


def register(model: JointModel) -> JointModel:
    _REGISTRY[model.name] = model
    return model


def get_joint(name: str) -> JointModel:
    """The model of a joint by name (knee, ankle, shoulder)."""
    _load_builtin()
    key = str(name).strip().lower()
    if key not in _REGISTRY:
        raise OrthoError(f"unknown joint '{name}'", fix=f"use one of {sorted(_REGISTRY)}")
    return _REGISTRY[key]


def joint_names() -> Tuple[str, ...]:
    _load_builtin()
    return tuple(sorted(_REGISTRY))


def _load_builtin() -> None:
    if not _REGISTRY:
        from orthonet.synthetic import ankle, knee, shoulder  # noqa: F401  (modules register themselves)
