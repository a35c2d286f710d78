"""Python API: predict from images in memory and get the same outputs ``ortho_predict`` writes, as objects.

    from orthonet.inference import predict_images, Predictor

    result = predict_images({"sagittal": sag_img, "coronal": cor_img, "axial": ax_img}, dataset=101)
    result.segmentation            # SimpleITK image on the sagittal input's exact grid
    result.diagnoses.probabilities # {diagnosis: probability}; .decisions, .std, .review
    result.saliency                # with explain=True: {view: {diagnosis: SimpleITK image}}

    predictor = Predictor.from_dataset(101, folds=[0, 1], tta=False)   # load once, predict many
    for case_id, views in my_cases.items():
        r = predictor.predict_images(views, case_id)

Images are SimpleITK images (one per view, or a list of channel images) or numpy arrays with their geometry:
``(array, Geometry)`` or ``(array, {"spacing": ..., "origin": ..., "direction": ...})`` with the array in numpy
(z, y, x) order (or (C, z, y, x) for several channels) and the geometry in ITK (x, y, z) order, as SimpleITK
reports it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk
import torch

from orthonet.inference.predictor import CasePrediction, Predictor
from orthonet.errors import OrthoError
from orthonet.imageio import Geometry, array_to_image

GeometryLike = Union[Geometry, Mapping]
ImageLike = Union[sitk.Image, Sequence[sitk.Image], Tuple[np.ndarray, GeometryLike]]


def _geometry(geometry: GeometryLike, array_shape: Sequence[int]) -> Geometry:
    if isinstance(geometry, Geometry):
        return geometry
    if not isinstance(geometry, Mapping) or "spacing" not in geometry:
        raise OrthoError("an array needs its geometry: (array, Geometry) or (array, {'spacing': (x, y, z), "
                         "'origin': (x, y, z), 'direction': 9 numbers})")
    size = tuple(int(s) for s in array_shape[::-1])
    return Geometry(size, tuple(float(v) for v in geometry["spacing"]),
                    tuple(float(v) for v in geometry.get("origin", (0.0, 0.0, 0.0))),
                    tuple(float(v) for v in geometry.get("direction", (1, 0, 0, 0, 1, 0, 0, 0, 1))))


def to_images(value: ImageLike) -> List[sitk.Image]:
    """One view's channel images from a SimpleITK image, a list of them, or ``(array, geometry)``."""
    if isinstance(value, sitk.Image):
        return [value]
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], np.ndarray):
        array = np.asarray(value[0], dtype=np.float32)
        if array.ndim == 3:
            array = array[None]
        if array.ndim != 4:
            raise OrthoError(f"image array must be (z, y, x) or (C, z, y, x), got shape {array.shape}")
        geometry = _geometry(value[1], array.shape[1:])
        return [array_to_image(np.ascontiguousarray(a), geometry) for a in array]
    if isinstance(value, (list, tuple)) and all(isinstance(v, sitk.Image) for v in value):
        return list(value)
    raise OrthoError(f"cannot use {type(value).__name__} as an image: pass a SimpleITK image, a list of channel "
                     "images, or (numpy array, geometry)")


def predict_images(images: Mapping[str, ImageLike], dataset: Union[int, str, None] = None, *,
                   case_id: str = "case", predictor: Optional[Predictor] = None,
                   configuration: Optional[str] = None, trainer: Optional[str] = None,
                   folds: Optional[Sequence[Union[int, str]]] = None, plans_name: Optional[str] = None,
                   checkpoint: str = "checkpoint_final.pt", model_folder: Optional[Union[str, Path]] = None,
                   device: Union[str, torch.device, None] = None, tta: bool = True, explain: bool = False,
                   return_probabilities: bool = False, step_size: float = 0.5) -> CasePrediction:
    """Predict one case given as ``{view: image}`` (see the module docstring) and return a
    :class:`~orthonet.inference.predictor.CasePrediction`. Pass a ready ``predictor`` to avoid reloading the models."""
    if predictor is None:
        predictor = Predictor.from_dataset(dataset, configuration, trainer, folds, plans_name, checkpoint,
                                           model_folder, device, tta=tta, explain=explain,
                                           save_probabilities=return_probabilities, step_size=step_size,
                                           num_processes=0, progress=False)
    views: Dict[str, List[sitk.Image]] = {view: to_images(value) for view, value in images.items()}
    return predictor.predict_images(views, case_id)
