"""Dataset fingerprint: what the planner needs to know about each view's training images.

Per view and training case: spacing, shape before and after cropping to the nonzero region, direction matrix; per
view and channel: foreground intensity statistics (mean, median, std, min, max, 0.5/99.5 percentiles) from voxels
sampled in every case. Foreground is the label map's foreground for the segmentation view of labelled cases and
the nonzero region otherwise (views without labels have no better definition).

Why a file: the fingerprint costs one full read of the dataset; planning is cheap and may be repeated (other
planner, other memory target, plans transfer), so the fingerprint is stored and reused unless ``--overwrite``.
Sampling is seeded per case (from the case and view names), so the same dataset gives a byte-identical file.
"""
from __future__ import annotations

import zlib
from concurrent.futures import Executor
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from orthonet.dataset import DatasetSpec
from orthonet.errors import OrthoError
from orthonet.fileio import load_json, save_json_readable
from orthonet.imageio import read_array, read_channels
from orthonet.planners.plans import fingerprint_path
from orthonet.preprocessing.crop import nonzero_bbox
from orthonet.preprocessing.parallel import format_errors, run_parallel

#: Foreground intensities kept per view and channel over the whole dataset (enough for stable percentiles, small
#: enough to never matter for memory; nnU-Net keeps 10^8).
TOTAL_INTENSITY_SAMPLES = 2_000_000
MIN_SAMPLES_PER_CASE = 1000
PERCENTILES = (0.5, 50.0, 99.5)


def case_seed(case: str, view: str) -> int:
    """A stable per-case seed (independent of case order and of Python's hash randomisation)."""
    return zlib.crc32(f"{case}|{view}".encode("utf-8"))


def read_label(path: str, image_geometry, image_path: str) -> np.ndarray:
    """Read a label map and check that it lies on the image's grid."""
    seg, geom = read_array(path, dtype=np.int16)
    diff = image_geometry.differences(geom)
    if diff:
        raise OrthoError(f"label map is not on the grid of its image {Path(image_path).name}: {'; '.join(diff)}",
                         path, fix="resample the label onto the image grid (run `ortho_verify_dataset` for a report)")
    return seg


def analyze_case(image_paths: Sequence[str], label_path: Optional[str], num_samples: int, seed: int) -> Dict:
    """Fingerprint of one case and view (runs in a worker process)."""
    data, geom = read_channels(image_paths)
    shape_before = data.shape[1:]
    bbox = nonzero_bbox(data)
    slicer = tuple(slice(a, b) for a, b in bbox)
    cropped = data[(slice(None),) + slicer]
    if label_path is not None:
        seg = read_label(label_path, geom, image_paths[0])[slicer]
        foreground = seg > 0
    else:
        foreground = np.any(cropped != 0, axis=0)
    rng = np.random.default_rng(seed)
    flat_fg = None if foreground.all() else np.flatnonzero(foreground)
    n_fg = foreground.size if flat_fg is None else flat_fg.size
    samples = []
    for c in range(cropped.shape[0]):
        if n_fg == 0:
            samples.append(np.zeros(0, np.float32))
            continue
        pick = rng.integers(0, n_fg, num_samples)
        idx = pick if flat_fg is None else flat_fg[pick]
        samples.append(cropped[c].reshape(-1)[idx].astype(np.float32))
    return {"spacing": [float(s) for s in geom.array_spacing], "shape_before_crop": [int(s) for s in shape_before],
            "shape_after_crop": [int(b - a) for a, b in bbox], "direction": [float(d) for d in geom.direction],
            "samples": samples}


def _stats(values: np.ndarray) -> Dict[str, float]:
    if values.size == 0:
        return {"mean": float("nan"), "median": float("nan"), "std": float("nan"), "min": float("nan"),
                "max": float("nan"), "percentile_00_5": float("nan"), "percentile_99_5": float("nan")}
    values = values.astype(np.float64)
    p005, med, p995 = np.percentile(values, PERCENTILES)
    return {"mean": _round(values.mean()), "median": _round(med), "std": _round(values.std()),
            "min": _round(values.min()), "max": _round(values.max()), "percentile_00_5": _round(p005),
            "percentile_99_5": _round(p995)}


def _round(x: float) -> float:
    """Six significant digits: readable JSON, no change that matters."""
    return float(f"{float(x):.6g}")


def fingerprint_tasks(spec: DatasetSpec, views: Optional[Sequence[str]] = None) -> List:
    cases = spec.cases("Tr")
    if not cases:
        raise OrthoError("the dataset has no training cases in imagesTr", spec.images_dir("Tr"),
                         fix="add training images named {CASE}_{VIEW}_{CHANNEL:04d}" + spec.file_ending)
    per_case = max(MIN_SAMPLES_PER_CASE, TOTAL_INTENSITY_SAMPLES // len(cases))
    tasks = []
    for view in views or spec.views:
        for case in cases:
            label = str(spec.label_path(case)) if (view == spec.segmentation_view and spec.has_label(case)) \
                else None
            paths = [str(p) for p in spec.image_paths(case, view, "Tr")]
            tasks.append(((view, case), (paths, label, per_case, case_seed(case, view))))
    return tasks


def extract_fingerprint(spec: DatasetSpec, pool: Optional[Executor] = None, progress: bool = True) -> Dict:
    """Compute the fingerprint of every view (does not write it)."""
    tasks = fingerprint_tasks(spec)
    results, errors = run_parallel(analyze_case, tasks, pool, desc="fingerprint", progress=progress)
    if errors:
        raise OrthoError(format_errors(errors, "case(s) (view / case)"), spec.root,
                         fix="repair or remove the named images (run `ortho_verify_dataset` for a full report)")
    cases = spec.cases("Tr")
    out: Dict = {"dataset_name": spec.root.name, "views": {}}
    for view in spec.views:
        rs = [results[(view, c)] for c in cases]
        n_channels = spec.num_channels(view)
        props = {}
        for ch in range(n_channels):
            props[str(ch)] = _stats(np.concatenate([r["samples"][ch] for r in rs]))
        rel = [float(np.prod(r["shape_after_crop"]) / np.prod(r["shape_before_crop"])) for r in rs]
        out["views"][view] = {
            "spacings": [r["spacing"] for r in rs],
            "shapes_before_crop": [r["shape_before_crop"] for r in rs],
            "shapes_after_crop": [r["shape_after_crop"] for r in rs],
            "directions": [r["direction"] for r in rs],
            "case_ids": list(cases),
            "foreground_intensity_properties_per_channel": props,
            "intensity_source": "labels" if view == spec.segmentation_view and spec.labelled_cases()
            else "nonzero",
            "median_relative_size_after_cropping": _round(float(np.median(rel))),
            "num_cases": len(cases),
        }
    return out


def load_or_extract_fingerprint(spec: DatasetSpec, preprocessed_dir: Path, overwrite: bool = False,
                                pool: Optional[Executor] = None, progress: bool = True, logger=None) -> Dict:
    """Reuse ``fingerprint.json`` if it exists and matches the dataset's cases and views; else extract and save."""
    path = fingerprint_path(preprocessed_dir)
    if path.is_file() and not overwrite:
        fp = load_json(path, "fingerprint")
        cases = spec.cases("Tr")
        views = fp.get("views", {}) if isinstance(fp, dict) else {}
        if set(views) == set(spec.views) and all(views[v].get("case_ids") == cases for v in spec.views):
            if logger:
                logger.info(f"using the existing fingerprint {path} (pass --overwrite to recompute)")
            return fp
        if logger:
            logger.info(f"{path} does not match the dataset's current cases/views; recomputing it")
    fp = extract_fingerprint(spec, pool, progress)
    save_json_readable(fp, path)
    if logger:
        logger.info(f"fingerprint written to {path}")
    return fp
