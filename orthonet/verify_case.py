"""Checks of one case's image and label files: readable, complete, finite, on consistent grids.

Why separate from :mod:`orthonet.verify`: this is the part that reads voxels, runs once per case (in parallel
worker processes) and must never raise on bad data — every finding becomes a :class:`~orthonet.verify_report.Problem`.
Each file is read once: the header first (cheap, rejects garbage, 4D and vector images before loading them), then
the voxels (NaN/Inf, label values). Float NIfTI images are the exception that proves the rule: their voxels are
streamed as stored (see :mod:`orthonet.image_integrity`) instead of through ITK, which would hide NaN/Inf.
"""
from __future__ import annotations

import itertools
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple

import numpy as np
import SimpleITK as sitk

from orthonet.dataset import DatasetSpec
from orthonet.image_integrity import nifti_truncation, read_nifti_header, scan_nifti_floats
from orthonet.imageio import Geometry
from orthonet.verify_report import (ERROR, KIND_IMAGE, KIND_IMAGE_GEOMETRY, KIND_LABEL_GEOMETRY, KIND_LABEL_VALUES,
                                    KIND_UNREADABLE, WARNING, Problem)

#: Two views whose physical boxes are further apart than this (mm) do not overlap.
OVERLAP_TOLERANCE_MM = 1e-3

_INTEGER_PIXELS = {sitk.sitkUInt8, sitk.sitkInt8, sitk.sitkUInt16, sitk.sitkInt16, sitk.sitkUInt32, sitk.sitkInt32,
                   sitk.sitkUInt64, sitk.sitkInt64}
_FLOAT_PIXELS = {sitk.sitkFloat32, sitk.sitkFloat64}


@dataclass
class CaseTask:
    """What a worker needs to check one case: the files that exist (missing ones are reported by the caller)."""

    spec: DatasetSpec
    split: str
    case: str
    images: Dict[str, Dict[int, Path]]        # view -> channel -> path
    label: Optional[Path] = None               # on the segmentation view's grid


@dataclass
class CaseResult:
    case: str
    split: str
    problems: List[Problem] = field(default_factory=list)
    label_values: Set[int] = field(default_factory=set)


class _Collector:
    def __init__(self, root: Path, result: CaseResult):
        self.root = root
        self.result = result

    def rel(self, path: Path) -> str:
        try:
            return Path(path).relative_to(self.root).as_posix()
        except ValueError:
            return str(path)

    def add(self, severity: str, kind: str, path: Path, message: str, fix: str) -> None:
        self.result.problems.append(Problem(severity, kind, self.rel(path), message, fix))


# ------------------------------------------------------------------------------------------------------------
# reading
# ------------------------------------------------------------------------------------------------------------
def read_header(path: Path, out: _Collector) -> Optional[sitk.ImageFileReader]:
    """Read one file's header, reporting (not raising) empty, unreadable, 4D and vector files. None if unusable."""
    if path.stat().st_size == 0:
        out.add(ERROR, KIND_UNREADABLE, path, "the file is empty (0 bytes)", _RE_EXPORT)
        return None
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        out.add(ERROR, KIND_UNREADABLE, path, f"not an image SimpleITK can read ({_reason(e)})",
                f"{_RE_EXPORT}; if it is not an image, move it out of the dataset folder")
        return None
    dim = reader.GetDimension()
    if dim > 3:
        out.add(ERROR, KIND_IMAGE, path, f"the image is {dim}D (size {reader.GetSize()}); orthonet needs 3D volumes",
                "split it into one 3D file per channel (_0000, _0001, ...) or per view")
        return None
    if reader.GetNumberOfComponents() != 1:
        out.add(ERROR, KIND_IMAGE, path, f"the image has {reader.GetNumberOfComponents()} components per voxel "
                "(RGB/vector image)", "store each component as its own channel file (_0000, _0001, ...)")
        return None
    return reader


def read_voxels(reader: sitk.ImageFileReader, path: Path, out: _Collector) -> Optional[sitk.Image]:
    """Read the voxels after :func:`read_header`, reporting truncated/corrupt files; 2D becomes one slice."""
    truncated = nifti_truncation(path)
    if truncated:
        out.add(ERROR, KIND_UNREADABLE, path, f"truncated or corrupt: {truncated}", _RE_EXPORT)
        return None
    try:
        image = reader.Execute()
    except RuntimeError as e:
        out.add(ERROR, KIND_UNREADABLE, path, f"truncated or corrupt: cannot read the voxel data ({_reason(e)})",
                _RE_EXPORT)
        return None
    if image.GetPixelID() not in _INTEGER_PIXELS | _FLOAT_PIXELS:
        out.add(ERROR, KIND_IMAGE, path, f"unsupported voxel type {image.GetPixelIDTypeAsString()}",
                "store real-valued (integer or float) voxels")
        return None
    if image.GetDimension() == 2:
        out.add(WARNING, KIND_IMAGE, path, "the image is 2D; it is read as a volume of one slice",
                "store 3D volumes if the data has more slices")
        image = sitk.JoinSeries(image)
    return image


def check_image_file(path: Path, out: _Collector) -> Optional[Geometry]:
    """All checks of one image file; its geometry, or None if it cannot be used.

    Float NIfTI files are scanned as stored (ITK would hide NaN/Inf as 0), which also proves them complete, so
    ITK only reads their header; every other file is read once by ITK and checked on the array."""
    reader = read_header(path, out)
    if reader is None:
        return None
    nifti = read_nifti_header(path)
    if nifti is not None and nifti.float_dtype is not None and reader.GetDimension() == 3:
        scan = scan_nifti_floats(path, nifti)
        if scan.problem:
            out.add(ERROR, KIND_UNREADABLE, path, f"truncated or corrupt: {scan.problem}", _RE_EXPORT)
            return None
        _report_intensities(path, out, scan.n_nan, scan.n_inf, scan.minimum, scan.maximum)
        return Geometry(tuple(int(v) for v in reader.GetSize()), tuple(reader.GetSpacing()),
                        tuple(reader.GetOrigin()), tuple(reader.GetDirection()))
    image = read_voxels(reader, path, out)
    if image is None:
        return None
    arr = sitk.GetArrayViewFromImage(image)
    if arr.dtype.kind == "f":
        finite = np.isfinite(arr)
        n_nan = int(np.isnan(arr).sum())
        n_inf = int(arr.size - finite.sum()) - n_nan
        values = arr[finite] if n_nan or n_inf else arr
    else:
        n_nan = n_inf = 0
        values = arr
    lo, hi = (float(values.min()), float(values.max())) if values.size else (float("nan"), float("nan"))
    _report_intensities(path, out, n_nan, n_inf, lo, hi)
    return Geometry.of(image)


_RE_EXPORT = "re-export or re-copy the file from its source"


def _reason(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else type(e).__name__)[:200]


# ------------------------------------------------------------------------------------------------------------
# geometry
# ------------------------------------------------------------------------------------------------------------
def physical_box(geometry: Geometry) -> Tuple[np.ndarray, np.ndarray]:
    """(centre (3,), half-edge vectors as columns (3, 3)) of the volume covered by the voxels, in mm."""
    d = geometry.direction_matrix
    spacing = np.asarray(geometry.spacing, dtype=np.float64)
    size = np.asarray(geometry.size, dtype=np.float64)
    centre = np.asarray(geometry.origin, dtype=np.float64) + d @ (spacing * (size - 1) / 2.0)
    half_edges = d * (spacing * size / 2.0)[None, :]
    return centre, half_edges


def box_gap_mm(a: Geometry, b: Geometry) -> float:
    """Separation (mm) of two images' physical boxes along the best separating axis; <= 0 means they overlap.

    Separating-axis test for two parallelepipeds: exact for any direction matrices, oblique ones included."""
    ca, ha = physical_box(a)
    cb, hb = physical_box(b)
    axes = [np.cross(h[:, i], h[:, j]) for h in (ha, hb) for i, j in ((0, 1), (1, 2), (0, 2))]
    axes += [np.cross(ha[:, i], hb[:, j]) for i in range(3) for j in range(3)]
    gap = -np.inf
    for axis in axes:
        norm = np.linalg.norm(axis)
        if norm < 1e-9:
            continue
        axis = axis / norm
        ra = np.abs(ha.T @ axis).sum()
        rb = np.abs(hb.T @ axis).sum()
        gap = max(gap, abs(float((cb - ca) @ axis)) - ra - rb)
    return float(gap)


def _direction_problem(geometry: Geometry) -> Optional[str]:
    d = geometry.direction_matrix
    if not np.allclose(d.T @ d, np.eye(3), atol=1e-3):
        return f"direction matrix {tuple(round(x, 4) for x in geometry.direction)} is not orthonormal"
    return None


# ------------------------------------------------------------------------------------------------------------
# content
# ------------------------------------------------------------------------------------------------------------
def _report_intensities(path: Path, out: _Collector, n_nan: int, n_inf: int, lo: float, hi: float) -> None:
    fix = "replace NaN/Inf by finite values (e.g. 0) when exporting; orthonet does not guess what they mean"
    if n_nan:
        out.add(ERROR, KIND_IMAGE, path, f"contains {n_nan} NaN voxel{'s' * (n_nan != 1)}", fix)
    if n_inf:
        out.add(ERROR, KIND_IMAGE, path, f"contains {n_inf} infinite (Inf) voxel{'s' * (n_inf != 1)}", fix)
    if not (n_nan or n_inf) and lo == hi:
        out.add(WARNING, KIND_IMAGE, path, f"the image is constant ({lo:g}): blank or failed export?",
                "check the file; a constant image carries no information")


def _check_label(label: sitk.Image, path: Path, spec: DatasetSpec, out: _Collector, result: CaseResult) -> None:
    arr = sitk.GetArrayViewFromImage(label)
    if label.GetPixelID() in _FLOAT_PIXELS:
        nifti = read_nifti_header(path)  # ITK turns NaN/Inf in NIfTI into 0: look at the stored values
        scan = scan_nifti_floats(path, nifti) if nifti is not None and nifti.float_dtype is not None else None
        if (scan is not None and scan.n_nan + scan.n_inf) or not np.isfinite(arr).all():
            out.add(ERROR, KIND_LABEL_VALUES, path, "the label map contains NaN/Inf",
                    "store integer class values (uint8)")
            return
        fractional = arr != np.round(arr)
        if fractional.any():
            examples = np.unique(arr[fractional])[:5]
            out.add(ERROR, KIND_LABEL_VALUES, path, f"the label map has fractional values (e.g. "
                    f"{', '.join(f'{v:g}' for v in examples)}); labels are integer class values",
                    "the label was probably resampled with linear interpolation: resample with nearest neighbour "
                    "and store it as uint8")
            return
        out.add(WARNING, KIND_LABEL_VALUES, path, f"the label map is stored as {label.GetPixelIDTypeAsString()}",
                "store labels as an integer type (uint8) to save space and avoid rounding surprises")
    values = _unique_ints(arr)
    result.label_values.update(values)
    declared = set(spec.label_values)
    undeclared = sorted(set(values) - declared)
    if undeclared and "labels" in spec.raw:  # without 'labels' the dataset.json error already says it all
        out.add(ERROR, KIND_LABEL_VALUES, path, f"label values {undeclared} are not declared in dataset.json "
                f"'labels' (declared: {sorted(declared)})",
                "fix the label map, or declare the missing structures in dataset.json 'labels'")
    elif values == [0]:
        out.add(WARNING, KIND_LABEL_VALUES, path, "the label map is all background",
                "delete it if the case has no segmentation (it is then diagnosis-only), or fix the export")


def _unique_ints(arr: np.ndarray) -> List[int]:
    flat = np.asarray(arr).reshape(-1)
    if flat.size == 0:
        return []
    lo, hi = flat.min(), flat.max()
    if lo >= 0 and hi < 65536:
        counts = np.bincount(flat.astype(np.int64, copy=False), minlength=int(hi) + 1)
        return [int(v) for v in np.nonzero(counts)[0]]
    return [int(v) for v in np.unique(flat)]


# ------------------------------------------------------------------------------------------------------------
# one case
# ------------------------------------------------------------------------------------------------------------
def check_case(task: CaseTask) -> CaseResult:
    """Every per-file and per-case check of one case. Never raises for data problems."""
    result = CaseResult(task.case, task.split)
    out = _Collector(task.spec.root, result)
    try:
        _check_case(task, out, result)
    except Exception as e:  # a bug or an exotic file: report it instead of losing the whole run
        out.add(ERROR, KIND_UNREADABLE, task.spec.root / task.spec.images_dir(task.split).name,
                f"unexpected failure while checking case '{task.case}': {type(e).__name__}: {e} "
                f"[{traceback.format_exc().strip().splitlines()[-2].strip()[:120]}]",
                "check this case's files by hand; please report this as an orthonet bug")
    return result


def _check_case(task: CaseTask, out: _Collector, result: CaseResult) -> None:
    spec = task.spec
    view_geometry: Dict[str, Tuple[Geometry, Path]] = {}
    for view in spec.views:
        channel_files = task.images.get(view, {})
        ref: Optional[Tuple[Geometry, Path]] = None
        for channel in sorted(channel_files):
            path = channel_files[channel]
            geometry = check_image_file(path, out)
            if geometry is None:
                continue
            problem = _direction_problem(geometry)
            if problem:
                out.add(WARNING, KIND_IMAGE_GEOMETRY, path, problem,
                        "re-export the image; directions are rotations (orthonormal columns)")
            if ref is None:
                ref = (geometry, path)
                continue
            diff = ref[0].differences(geometry)
            if diff:
                out.add(ERROR, KIND_IMAGE_GEOMETRY, path,
                        f"channel {channel} is not on the grid of channel 0 ({out.rel(ref[1])}): {'; '.join(diff)}",
                        "resample all channels of a view onto one grid (each view may have its own grid)")
        if ref is not None and channel_files and min(channel_files) == 0:
            view_geometry[view] = ref

    for (va, (ga, pa)), (vb, (gb, pb)) in itertools.combinations(view_geometry.items(), 2):
        gap = box_gap_mm(ga, gb)
        if gap > OVERLAP_TOLERANCE_MM:
            ca, cb = physical_box(ga)[0], physical_box(gb)[0]
            out.add(ERROR, KIND_IMAGE_GEOMETRY, pb,
                    f"views '{va}' ({out.rel(pa)}) and '{vb}' ({out.rel(pb)}) do not overlap in physical space: "
                    f"they are {gap:.1f} mm apart (centres {_fmt(ca)} and {_fmt(cb)} mm)",
                    "all views of a case must image the same anatomy: fix origin/direction in the header of the "
                    "wrong one (typical causes: origin in cm, RAS/LPS sign flip, a file of another case)")

    if task.label is not None:
        reader = read_header(task.label, out)
        label = read_voxels(reader, task.label, out) if reader is not None else None
        if label is None:
            return
        if spec.segmentation_view in view_geometry:
            ref_geom, ref_path = view_geometry[spec.segmentation_view]
            diff = ref_geom.differences(Geometry.of(label))
            if diff:
                out.add(ERROR, KIND_LABEL_GEOMETRY, task.label,
                        f"the label is not on the grid of its image {out.rel(ref_path)}: {'; '.join(diff)}",
                        f"resample the label onto the {spec.segmentation_view} image's grid (nearest neighbour) or "
                        "copy the image's header (size, spacing, origin, direction) if only the header is wrong")
        _check_label(label, task.label, spec, out, result)


def _fmt(v) -> str:
    return "(" + ", ".join(f"{x:.1f}" for x in v) + ")"
