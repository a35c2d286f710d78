"""What ``ortho_predict`` writes per case, under which names, atomically.

Names (all in OUT):

* ``{CASE}_{segmentation_view}.nii.gz`` (nnU-Net datasets: ``{CASE}.nii.gz``): the label map on the segmentation
  view's exact original grid;
* with ``--save-probabilities``: ``{CASE}_{segmentation_view}.npz`` (``probabilities``: float32 (K, z, y, x) softmax
  on the same grid, numpy order) and ``{CASE}_{segmentation_view}.json`` (its geometry and class names), as nnU-Net
  writes ``.npz`` + ``.pkl``;
* with ``--explain``: ``{CASE}_{VIEW}_saliency_{DIAGNOSIS}.nii.gz`` (float32, 0..1) on each view's original grid,
  and for whole-exam models ``{CASE}_{VIEW}_attention_{DIAGNOSIS}.nii.gz`` (the attention-MIL map, same grid);
* ``{CASE}_overview.png`` (see :mod:`orthonet.inference.overview`).

A rerun first removes every name a case *may* produce, so a case that now fails leaves no stale result behind.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from orthonet.dataset import DatasetSpec
from orthonet.fileio import atomic_path, save_json
from orthonet.imageio import Geometry, write_image

OUTPUT_ENDING = ".nii.gz"


def segmentation_stem(case_id: str, spec: DatasetSpec) -> str:
    return case_id if spec.nnunet_format else f"{case_id}_{spec.segmentation_view}"


def segmentation_file_name(case_id: str, spec: DatasetSpec) -> str:
    return segmentation_stem(case_id, spec) + OUTPUT_ENDING


def saliency_file_name(case_id: str, view: str, diagnosis: str) -> str:
    return f"{case_id}_{view}_saliency_{diagnosis}{OUTPUT_ENDING}"


def attention_file_name(case_id: str, view: str, diagnosis: str) -> str:
    return f"{case_id}_{view}_attention_{diagnosis}{OUTPUT_ENDING}"


def overview_file_name(case_id: str) -> str:
    return f"{case_id}_overview.png"


def case_output_names(case_id: str, spec: DatasetSpec) -> List[str]:
    """Every file name a case can produce (used to clear stale results before a rerun writes)."""
    names = [overview_file_name(case_id)]
    if spec.segmentation_view:
        stem = segmentation_stem(case_id, spec)
        names += [stem + OUTPUT_ENDING, stem + ".npz", stem + ".json"]
    names += [saliency_file_name(case_id, v, d) for v in spec.views for d in spec.diagnoses]
    names += [attention_file_name(case_id, v, d) for v in spec.views for d in spec.diagnoses]
    return names


def clear_case_outputs(out_dir: Path, case_id: str, spec: DatasetSpec) -> None:
    for name in case_output_names(case_id, spec):
        path = out_dir / name
        if path.is_file():
            path.unlink()


def write_probabilities(out_dir: Path, stem: str, probabilities: np.ndarray, geometry: Geometry,
                        class_names: Sequence[str]) -> List[str]:
    """``{stem}.npz`` (key ``probabilities``, (K, z, y, x) float32) and ``{stem}.json`` (geometry, classes)."""
    npz = out_dir / f"{stem}.npz"
    with atomic_path(npz, suffix=".npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, probabilities=np.asarray(probabilities, np.float32))
    save_json({"geometry": geometry.to_dict(), "array_order": "(class, z, y, x) = numpy order of the image",
               "class_names": list(class_names), "shape": list(np.asarray(probabilities).shape)},
              out_dir / f"{stem}.json")
    return [npz.name, f"{stem}.json"]


def write_case_outputs(out_dir: Path, prediction, spec: DatasetSpec) -> Dict[str, List[str]]:
    """Write a :class:`orthonet.inference.predictor.CasePrediction`'s images; returns ``{kind: [file names]}``."""
    files: Dict[str, List[str]] = {}
    if prediction.segmentation is not None:
        name = segmentation_file_name(prediction.case_id, spec)
        write_image(prediction.segmentation, out_dir / name)
        files["segmentation"] = [name]
        if prediction.probabilities is not None:
            files["probabilities"] = write_probabilities(out_dir, segmentation_stem(prediction.case_id, spec),
                                                         prediction.probabilities,
                                                         Geometry.of(prediction.segmentation), spec.class_names)
    for view, maps in prediction.saliency.items():
        for diagnosis, image in maps.items():
            name = saliency_file_name(prediction.case_id, view, diagnosis)
            write_image(image, out_dir / name)
            files.setdefault("saliency", []).append(name)
    for view, maps in getattr(prediction, "attention", {}).items():
        for diagnosis, image in maps.items():
            name = attention_file_name(prediction.case_id, view, diagnosis)
            write_image(image, out_dir / name)
            files.setdefault("attention", []).append(name)
    return files


def first_file(files: Dict[str, List[str]], kind: str) -> Optional[str]:
    return (files.get(kind) or [None])[0]
