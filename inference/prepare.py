"""Read one discovered case and preprocess each of its views exactly as in training (plans.json).

Why separate from prediction: this is the part that runs in a background thread while the previous case is being
predicted, and the part where a corrupt file shows up (pixels are read here). A view that fails is dropped with a
per-case problem; the case goes on with the views it has.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Sequence

import numpy as np
import SimpleITK as sitk

from orthonet.inference.input_discovery import InputCase
from orthonet.errors import OrthoError
from orthonet.imageio import Geometry
from orthonet.preprocessing.preprocessor import preprocess_case


@dataclass
class PreparedView:
    """A view ready for the network, plus what the overview picture and the export need."""

    data: np.ndarray          # (C, z, y, x) float32, preprocessed
    properties: Dict          # preprocessing properties (original geometry, crop box, transpose, resampling)
    image: np.ndarray         # channel 0 on the original grid (z, y, x), for the overview
    geometry: Geometry        # the original grid


@dataclass
class PreparedCase:
    case: InputCase
    views: Dict[str, PreparedView] = field(default_factory=dict)
    problems: List[str] = field(default_factory=list)

    @property
    def case_id(self) -> str:
        return self.case.case_id

    def data_by_view(self) -> Dict[str, np.ndarray]:
        return {v: p.data for v, p in self.views.items()}

    def properties_by_view(self) -> Dict[str, Dict]:
        return {v: p.properties for v, p in self.views.items()}


def _one_line(error: Exception) -> str:
    return str(error).replace("\n  fix: ", "; fix: ").replace("\n", " ")


def images_to_array(images: Sequence[sitk.Image]) -> np.ndarray:
    """(C, z, y, x) float32 from a view's channel images (already checked to share one grid)."""
    return np.stack([sitk.GetArrayFromImage(img).astype(np.float32, copy=False) for img in images], 0)


def prepare_view(case: InputCase, view: str, plans: Dict, configuration: str) -> PreparedView:
    """Read a view's pixels and preprocess them; raises OrthoError (naming the file) when it cannot."""
    images = case.load_view(view)
    geometry = Geometry.of(images[0])
    array = images_to_array(images)
    if not np.all(np.isfinite(array)):
        raise OrthoError(f"case {case.case_id}, view {view}: the image holds NaN or infinite values",
                         fix="re-export the image; NaN/Inf voxels cannot be normalised")
    data, properties = preprocess_case((array, geometry), plans, view, configuration, case.case_id, "Ts")
    return PreparedView(data, properties, array[0], geometry)


def prepare_case(case: InputCase, plans: Dict, configuration: str, views: Sequence[str]) -> PreparedCase:
    """Every usable view of ``case`` that the models need (``views``), preprocessed; failures become problems."""
    prepared = PreparedCase(case)
    for view in [v for v in views if v in case.views]:
        try:
            prepared.views[view] = prepare_view(case, view, plans, configuration)
        except OrthoError as e:
            prepared.problems.append(f"view {view}: {_one_line(e)}; view not used")
    return prepared
