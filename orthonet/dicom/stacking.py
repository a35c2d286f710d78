"""Grouping slice headers into 3D volumes and computing each volume's geometry from its slice positions.

Why positions: files come in any order, one SeriesInstanceUID may hold several volumes (echoes, temporal
positions, localiser planes), and the slice spacing tags are often the thickness or missing; sorting the slices
along their normal and measuring the gaps gives the true origin, spacing and direction (and the warnings when the
stack is uneven or sheared).
"""
from __future__ import annotations

import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from orthonet.dicom.orientation import assign_view
from orthonet.dicom.reading import DicomSlice, PathLike, list_dicom_files, read_slice_header
from orthonet.errors import OrthoError
from orthonet.imageio import Geometry

#: Slice gaps deviating from their mean by more than this fraction trigger an "uneven spacing" warning.
UNEVEN_SPACING_RTOL = 0.01
#: Two slices belong to the same orientation when their row and column cosines agree to this (about 0.8 deg).
ORIENTATION_COS_TOL = 1e-4


@dataclass
class DicomVolume:
    """One 3D volume inside a DICOM series: sorted files plus the geometry computed from their positions."""

    files: List[str]
    geometry: Geometry
    series_uid: str
    study_uid: str
    patient_id: str
    series_description: str
    series_number: int
    modality: str
    echo_time: Optional[float] = None
    echo_index: int = 0                      # 0 = first (shortest) echo of its series
    num_echoes: int = 1
    temporal_position: Optional[int] = None
    float_pixels: bool = False
    warnings: List[str] = field(default_factory=list)

    @property
    def num_slices(self) -> int:
        return int(self.geometry.size[2])

    @property
    def view(self) -> Tuple[str, float]:
        return assign_view(self.geometry.direction)

    @property
    def label(self) -> str:
        """Short human description for messages: series number, description, echo."""
        text = f"series {self.series_number}"
        if self.series_description:
            text += f" '{self.series_description}'"
        if self.num_echoes > 1:
            te = f", TE {self.echo_time:g} ms" if self.echo_time is not None else ""
            text += f" echo {self.echo_index + 1}/{self.num_echoes}{te}"
        return text

    def load(self) -> sitk.Image:
        """Read the pixels into a 3D image carrying :attr:`geometry` (origin/spacing/direction from positions)."""
        reader = sitk.ImageSeriesReader()
        reader.SetImageIO("GDCMImageIO")
        reader.SetFileNames(list(self.files))
        if self.float_pixels:
            reader.SetOutputPixelType(sitk.sitkFloat32)
        show = sitk.ProcessObject.GetGlobalWarningDisplay()
        sitk.ProcessObject.SetGlobalWarningDisplay(False)  # ITK's spacing warnings: we report our own
        try:
            image = reader.Execute()
        except RuntimeError as e:
            msg = str(e).strip().splitlines()[-1] if str(e).strip() else "unknown reason"
            raise OrthoError(f"cannot read the pixels of DICOM {self.label} ({msg[:160]})", Path(self.files[0]).parent,
                             fix="re-export the series from the scanner/PACS") from None
        finally:
            sitk.ProcessObject.SetGlobalWarningDisplay(show)
        if image.GetDimension() == 2:
            image = sitk.JoinSeries(image)
        if tuple(image.GetSize()) != tuple(self.geometry.size):
            raise OrthoError(f"DICOM {self.label}: pixel data has size {image.GetSize()} but the headers describe "
                             f"{self.geometry.size}", Path(self.files[0]).parent,
                             fix="the series is inconsistent; re-export it")
        return self.geometry.apply_to(image)


def _orientation_groups(slices: Sequence[DicomSlice]) -> List[List[DicomSlice]]:
    groups: List[List[DicomSlice]] = []
    for s in slices:
        for g in groups:
            ref = g[0]
            if (np.dot(s.row_cosine, ref.row_cosine) > 1 - ORIENTATION_COS_TOL
                    and np.dot(s.column_cosine, ref.column_cosine) > 1 - ORIENTATION_COS_TOL
                    and s.size == ref.size and np.allclose(s.pixel_spacing, ref.pixel_spacing, rtol=1e-3)):
                g.append(s)
                break
        else:
            groups.append([s])
    return groups


def _split_duplicates(slices: List[DicomSlice], normal: np.ndarray, tol: float) -> Tuple[List[List[DicomSlice]],
                                                                                           bool]:
    """Split a group whose slices repeat positions (k-th occurrence of each position -> volume k)."""
    by_pos: Dict[int, List[DicomSlice]] = defaultdict(list)
    keys = [float(np.dot(s.position, normal)) for s in slices]
    order = np.argsort(keys, kind="stable")
    cluster, last = -1, None
    for i in order:
        if last is None or keys[i] - last > tol:
            cluster += 1
        last = keys[i]
        by_pos[cluster].append(slices[i])
    counts = {len(v) for v in by_pos.values()}
    if counts == {1}:
        return [slices], False
    n = max(counts)
    out: List[List[DicomSlice]] = [[] for _ in range(n)]
    for members in by_pos.values():
        for k, s in enumerate(sorted(members, key=lambda s: (s.instance_number, s.path))):
            out[k].append(s)
    return out, True


def stack_geometry(slices: Sequence[DicomSlice]) -> Tuple[List[DicomSlice], Geometry, List[str]]:
    """Sort slices along their normal and compute the volume geometry from their positions.

    Returns (sorted slices, geometry, warnings). Spacing along the normal is the mean gap between consecutive
    slices; uneven gaps (missing slices, variable spacing) and sheared stacks (gantry tilt) are reported.
    """
    first = slices[0]
    row, col = np.asarray(first.row_cosine), np.asarray(first.column_cosine)
    normal = first.normal
    dist = np.array([float(np.dot(s.position, normal)) for s in slices])
    order = np.argsort(dist, kind="stable")
    ordered = [slices[i] for i in order]
    dist = dist[order]
    warns: List[str] = []
    if len(ordered) > 1:
        gaps = np.diff(dist)
        spacing_z = float((dist[-1] - dist[0]) / (len(ordered) - 1))
        if np.any(np.abs(gaps - spacing_z) > UNEVEN_SPACING_RTOL * spacing_z + 1e-4):
            warns.append(f"uneven slice spacing (gaps {gaps.min():.3g}-{gaps.max():.3g} mm, using the mean "
                         f"{spacing_z:.4g} mm; missing slices?) — voxel positions may be off by up to "
                         f"{np.max(np.abs(np.cumsum(gaps) - spacing_z * np.arange(1, len(gaps) + 1))):.3g} mm")
        p0 = np.asarray(ordered[0].position)
        inplane = [np.linalg.norm((np.asarray(s.position) - p0) - np.dot(np.asarray(s.position) - p0, normal) * normal)
                   for s in ordered]
        if max(inplane) > 0.05 * max(spacing_z, 1e-6) + 1e-3:
            warns.append(f"slice positions are not stacked along the slice normal (sheared by up to "
                         f"{max(inplane):.3g} mm, gantry tilt?); the volume is treated as unsheared")
    else:
        spacing_z = 1.0
        warns.append("single-slice volume; slice spacing set to 1 mm")
    direction = np.stack([row, col, normal], axis=1)
    geometry = Geometry(size=(first.size[0], first.size[1], len(ordered)),
                        spacing=(first.pixel_spacing[0], first.pixel_spacing[1], max(spacing_z, 1e-6)),
                        origin=tuple(float(v) for v in ordered[0].position),
                        direction=tuple(float(v) for v in direction.reshape(-1)))
    return ordered, geometry, warns


def _multiframe_volume(s: DicomSlice) -> DicomVolume:
    """An enhanced/multi-frame file is one volume by itself; GDCM supplies its geometry."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(s.path)
    reader.ReadImageInformation()
    geom = Geometry(tuple(int(v) for v in reader.GetSize()), tuple(float(v) for v in reader.GetSpacing()),
                    tuple(float(v) for v in reader.GetOrigin()), tuple(float(v) for v in reader.GetDirection()))
    return DicomVolume([s.path], geom, s.series_uid, s.study_uid, s.patient_id, s.series_description,
                       s.series_number, s.modality, s.echo_time, warnings=["multi-frame file: geometry as reported "
                                                                             "by GDCM (not checked per frame)"])


def build_volumes(slices: Sequence[DicomSlice]) -> List[DicomVolume]:
    """Group slice headers into volumes: one per (series, orientation, echo, temporal position)."""
    by_series: Dict[str, List[DicomSlice]] = defaultdict(list)
    volumes: List[DicomVolume] = []
    for s in slices:
        if s.num_frames > 1:
            volumes.append(_multiframe_volume(s))
        else:
            by_series[s.series_uid].append(s)
    for uid, members in by_series.items():
        series_volumes: List[DicomVolume] = []
        for group in _orientation_groups(members):
            sub: Dict[Tuple, List[DicomSlice]] = defaultdict(list)
            for s in group:
                te = None if s.echo_time is None else round(s.echo_time, 2)
                sub[(te, s.echo_number if te is None else None, s.temporal_position)].append(s)
            for part in sub.values():
                normal = part[0].normal
                tol = 1e-3 + 0.05 * min(part[0].pixel_spacing)
                pieces, had_dups = _split_duplicates(part, normal, tol)
                for piece in pieces:
                    ordered, geom, warns = stack_geometry(piece)
                    if had_dups:
                        warns.insert(0, "slice positions repeat without a distinguishing EchoTime/TemporalPosition; "
                                        "split by InstanceNumber order")
                    first = ordered[0]
                    series_volumes.append(DicomVolume(
                        [s.path for s in ordered], geom, uid, first.study_uid, first.patient_id,
                        first.series_description, first.series_number, first.modality, first.echo_time,
                        temporal_position=first.temporal_position,
                        float_pixels=len({s.slope for s in ordered}) > 1, warnings=warns))
        _number_echoes(series_volumes)
        volumes.extend(series_volumes)
    volumes.sort(key=lambda v: (v.study_uid, v.series_number, v.series_uid, v.echo_index,
                                v.temporal_position or 0))
    return volumes


def _number_echoes(volumes: List[DicomVolume]) -> None:
    """Echo index per orientation group: sorted by echo time (volumes without TE keep their order)."""
    groups: Dict[Tuple, List[DicomVolume]] = defaultdict(list)
    for v in volumes:
        key = tuple(np.round(np.asarray(v.geometry.direction), 3)) + (v.temporal_position,)
        groups[key].append(v)
    for members in groups.values():
        members.sort(key=lambda v: (v.echo_time is None, v.echo_time or 0.0))
        for i, v in enumerate(members):
            v.echo_index, v.num_echoes = i, len(members)


def scan_dicom(root: PathLike) -> Tuple[List[DicomVolume], List[str]]:
    """All volumes under ``root`` (a folder tree or one file) plus problems with individual files."""
    problems: List[str] = []
    slices: List[DicomSlice] = []
    for path in list_dicom_files(root):
        try:
            slices.append(read_slice_header(path))
        except OrthoError as e:
            problems.append(str(e))
    return build_volumes(slices), problems


def read_dicom_series(root: PathLike) -> List[sitk.Image]:
    """Every volume under ``root`` loaded as a 3D SimpleITK image (one per series and echo).

    Convenience for scripts and tests; the predictor uses :func:`discover_dicom_cases` and loads lazily.
    """
    volumes, problems = scan_dicom(root)
    if not volumes:
        detail = ("; ".join(problems[:3])) if problems else "no DICOM image files found"
        raise OrthoError(f"no readable DICOM series ({detail})", root,
                         fix="point to the folder that holds the .dcm files of the exam")
    for v in volumes:
        for w in v.warnings:
            warnings.warn(f"{v.label}: {w}", stacklevel=2)
    return [v.load() for v in volumes]
