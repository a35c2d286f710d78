"""DICOM series straight from the scanner: find them, split them into volumes, assign them to views.

Why this is more than ``sitk.ReadImage(folder)``: scanners put several volumes into one SeriesInstanceUID
(multi-echo T2 mapping: every slice position once per echo; 3-plane localisers: three orientations), files come in
arbitrary order, and the slice spacing in the header is often the slice *thickness* or missing. orthonet therefore
reads every file's header (cheap, no pixels), groups the slices into volumes by (series, orientation, echo,
temporal position), sorts each volume along its slice normal and computes origin, spacing and direction from the
slice positions themselves. Pixels are read only when a volume is loaded (:meth:`DicomVolume.load`), so a large
folder tree costs memory for one volume at a time.

Geometry is taken from what GDCM reports per file (``ImagePositionPatient``, ``ImageOrientationPatient``,
``PixelSpacing``), which also covers single-frame Enhanced MR files whose position lives in functional groups.
"""
from __future__ import annotations

import hashlib
import os
import re
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk

from orthonet.errors import OrthoError
from orthonet.fileio import atomic_path
from orthonet.imageio import Geometry

PathLike = Union[str, Path]

#: A slice normal further than this from every patient axis is 'ambiguous' (45 deg is exactly between two axes;
#: real oblique sagittal/coronal knee planes are tilted 10-25 deg, so 40 deg leaves them clearly assigned).
AMBIGUOUS_ANGLE_DEG = 40.0
#: Slice gaps deviating from their mean by more than this fraction trigger an "uneven spacing" warning.
UNEVEN_SPACING_RTOL = 0.01
#: Two slices belong to the same orientation when their row and column cosines agree to this (about 0.8 deg).
ORIENTATION_COS_TOL = 1e-4
#: Volumes with fewer slices are localisers/scouts and are not offered as a view.
MIN_SLICES_PER_VIEW = 3
#: Standard views and the LPS axis their slice normal points along.
VIEW_AXES = {"sagittal": 0, "coronal": 1, "axial": 2}

_AXIS_NAMES = ("x (left-right)", "y (anterior-posterior)", "z (inferior-superior)")
_AXIS_VIEW = {axis: view for view, axis in VIEW_AXES.items()}


# ------------------------------------------------------------------------------------------------------------
# view assignment
# ------------------------------------------------------------------------------------------------------------
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


# ------------------------------------------------------------------------------------------------------------
# headers
# ------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DicomSlice:
    """What orthonet needs from one DICOM file's header (no pixels)."""

    path: str
    series_uid: str
    study_uid: str
    patient_id: str
    series_description: str
    series_number: int
    modality: str
    echo_time: Optional[float]
    echo_number: Optional[int]
    temporal_position: Optional[int]
    instance_number: int
    position: Tuple[float, float, float]
    row_cosine: Tuple[float, float, float]
    column_cosine: Tuple[float, float, float]
    pixel_spacing: Tuple[float, float]          # (x = along a row, y = down a column), ITK order
    size: Tuple[int, int]                       # (columns, rows)
    num_frames: int
    slope: str

    @property
    def normal(self) -> np.ndarray:
        n = np.cross(np.asarray(self.row_cosine), np.asarray(self.column_cosine))
        return n / np.linalg.norm(n)


def _tag(reader: sitk.ImageFileReader, key: str, default: str = "") -> str:
    return reader.GetMetaData(key).strip() if reader.HasMetaDataKey(key) else default


def _float(text: str) -> Optional[float]:
    try:
        return float(text.split("\\")[0])
    except (ValueError, IndexError):
        return None


def _int(text: str) -> Optional[int]:
    v = _float(text)
    return None if v is None else int(round(v))


def read_slice_header(path: PathLike) -> DicomSlice:
    """Header of one DICOM image file. Raises OrthoError for files that are not readable DICOM images."""
    reader = sitk.ImageFileReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else "unknown reason"
        raise OrthoError(f"not a readable DICOM image ({msg[:160]})", path,
                         fix="remove the file or re-export the series from the scanner/PACS") from None
    size = reader.GetSize()
    if reader.GetNumberOfComponents() != 1:
        raise OrthoError("DICOM image is RGB/multi-component (secondary capture?)", path,
                         fix="only greyscale MR series are used; remove this file")
    d = np.asarray(reader.GetDirection(), dtype=np.float64).reshape(len(size), len(size))
    row = tuple(float(v) for v in d[:3, 0]) if d.shape[0] == 3 else (1.0, 0.0, 0.0)
    col = tuple(float(v) for v in d[:3, 1]) if d.shape[0] == 3 else (0.0, 1.0, 0.0)
    origin = tuple(float(v) for v in reader.GetOrigin()) + (0.0,) * (3 - len(size))
    spacing = reader.GetSpacing()
    return DicomSlice(
        path=str(path), series_uid=_tag(reader, "0020|000e") or f"nouid:{Path(path).parent}",
        study_uid=_tag(reader, "0020|000d"), patient_id=_tag(reader, "0010|0020"),
        series_description=_tag(reader, "0008|103e"), series_number=_int(_tag(reader, "0020|0011")) or 0,
        modality=_tag(reader, "0008|0060"), echo_time=_float(_tag(reader, "0018|0081")),
        echo_number=_int(_tag(reader, "0018|0086")), temporal_position=_int(_tag(reader, "0020|0100")),
        instance_number=_int(_tag(reader, "0020|0013")) or 0, position=origin[:3], row_cosine=row,
        column_cosine=col, pixel_spacing=(float(spacing[0]), float(spacing[1])), size=(int(size[0]), int(size[1])),
        num_frames=int(size[2]) if len(size) > 2 else 1, slope=_tag(reader, "0028|1053", "1"))


def _looks_like_dicom(path: Path) -> bool:
    """Cheap test: the 'DICM' magic at byte 128, or a .dcm/.ima name (old files have no preamble)."""
    if path.suffix.lower() in (".dcm", ".ima", ".dicom"):
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def contains_dicom(path: PathLike, max_files: int = 200) -> bool:
    """True if ``path`` is a DICOM file or a folder tree holding DICOM files (looks at up to ``max_files``)."""
    path = Path(path)
    if path.is_file():
        return _looks_like_dicom(path)
    seen = 0
    for dirpath, _, files in os.walk(path):
        for name in sorted(files):
            if _looks_like_dicom(Path(dirpath) / name):
                return True
            seen += 1
            if seen >= max_files:
                return False
    return False


def list_dicom_files(root: PathLike) -> List[str]:
    """All DICOM files SimpleITK/GDCM recognises under ``root`` (recursively), via the GDCM series scanner."""
    root = Path(root)
    if root.is_file():
        return [str(root)]
    out: List[str] = []
    for dirpath, _, files in sorted(os.walk(root)):
        if not files:
            continue
        reader = sitk.ImageSeriesReader()
        for uid in reader.GetGDCMSeriesIDs(dirpath):
            out.extend(reader.GetGDCMSeriesFileNames(dirpath, uid))
    return sorted(dict.fromkeys(out))


# ------------------------------------------------------------------------------------------------------------
# volumes
# ------------------------------------------------------------------------------------------------------------
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


# ------------------------------------------------------------------------------------------------------------
# cases
# ------------------------------------------------------------------------------------------------------------
@dataclass
class DicomCase:
    """One study: its volumes sorted into views, and what is missing or unclear (as text, never an exception)."""

    case_id: str
    study_uid: str
    patient_id: str
    folder: Path
    views: Dict[str, List[DicomVolume]] = field(default_factory=dict)
    ambiguous: List[DicomVolume] = field(default_factory=list)
    skipped: List[DicomVolume] = field(default_factory=list)
    problems: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    @property
    def found_views(self) -> List[str]:
        return [v for v in VIEW_AXES if v in self.views] + sorted(set(self.views) - set(VIEW_AXES))

    def missing_views(self, expected: Iterable[str]) -> List[str]:
        return [v for v in expected if v not in self.views]

    def channels(self, view: str, num_channels: int = 1, channel_names: Optional[Sequence[str]] = None
                 ) -> Tuple[List[DicomVolume], List[str]]:
        """The volumes to use as channels 0..num_channels-1 of ``view`` (see :func:`choose_channel_volumes`)."""
        return choose_channel_volumes(self.views.get(view, []), num_channels, channel_names)


def choose_channel_volumes(candidates: Sequence[DicomVolume], num_channels: int = 1,
                           channel_names: Optional[Sequence[str]] = None) -> Tuple[List[DicomVolume], List[str]]:
    """Pick the channel volumes of one view from the series a study holds for it. Returns (volumes, notes).

    Policy (documented in docs/inference.md):

    1. Series with at least ``num_channels`` echoes are preferred; among them one whose SeriesDescription
       contains a channel name of the plan (case-insensitive), then the lowest series number.
    2. One channel: the first (shortest-TE) echo. ``num_channels`` echoes: all of them, in TE order. Fewer
       channels than echoes: the first ``num_channels`` echoes.
    3. If no single series has enough echoes, whole series are taken as channels in series-number order (first
       echo of each), provided they share one grid; otherwise the view is unusable (empty list + a note).
    """
    notes: List[str] = []
    if not candidates:
        return [], notes
    by_series: Dict[str, List[DicomVolume]] = defaultdict(list)
    for v in candidates:
        by_series[v.series_uid].append(v)
    series = sorted(by_series.values(), key=lambda vs: (vs[0].series_number, vs[0].series_uid))
    for vs in series:
        vs.sort(key=lambda v: (v.echo_index, v.temporal_position or 0))
    names = [n.lower() for n in (channel_names or []) if n]

    def named(vs: List[DicomVolume]) -> bool:
        desc = vs[0].series_description.lower()
        return any(n in desc for n in names)

    enough = [vs for vs in series if len(vs) >= num_channels]
    if enough:
        enough.sort(key=lambda vs: (not named(vs), vs[0].series_number))
        chosen = enough[0][:num_channels]
        if len(series) > 1:
            others = ", ".join(vs[0].label for vs in series if vs is not enough[0])
            notes.append(f"several series for this view; using {chosen[0].label.split(' echo')[0]} "
                         f"(not used: {others})")
        if len(enough[0]) > num_channels:
            which = ("the first (shortest TE) echo" if num_channels == 1
                     else f"the first {num_channels} echoes (TE order)")
            notes.append(f"{chosen[0].label.split(' echo')[0]} has {len(enough[0])} echoes; using {which}")
        return chosen, notes
    firsts = [vs[0] for vs in series]
    if len(firsts) >= num_channels:
        chosen = firsts[:num_channels]
        ref = chosen[0].geometry
        if all(not ref.differences(v.geometry) for v in chosen[1:]):
            notes.append("channels taken from separate series: " + ", ".join(v.label for v in chosen))
            return chosen, notes
    notes.append(f"needs {num_channels} channels but the series found here have "
                 f"{', '.join(str(len(vs)) for vs in series)} echo(es) and do not share one grid")
    return [], notes


_SAFE_RE = re.compile(r"[^A-Za-z0-9._-]+")


def _safe_id(text: str) -> str:
    return _SAFE_RE.sub("-", text).strip("-._") or "case"


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def _case_ids(root: Path, studies: Dict[str, List[DicomVolume]]) -> Dict[str, str]:
    """Readable, unique case ids: the top sub-folder (below root) holding the study when no other study shares it
    (else the full relative folder path), else PatientID, else a hash of the StudyInstanceUID."""
    rels: Dict[str, Optional[Path]] = {}
    for uid, vols in studies.items():
        common = Path(os.path.commonpath([str(Path(f).parent) for v in vols for f in v.files]))
        rels[uid] = common.relative_to(root) if root in common.parents else None
    top_count: Dict[str, int] = defaultdict(int)
    for rel in rels.values():
        if rel is not None:
            top_count[rel.parts[0]] += 1
    ids: Dict[str, str] = {}
    for uid, vols in studies.items():
        rel = rels[uid]
        if rel is not None:
            ids[uid] = _safe_id(rel.parts[0] if top_count[rel.parts[0]] == 1 else "-".join(rel.parts))
        elif len(studies) == 1:
            ids[uid] = _safe_id(root.name)
        elif vols[0].patient_id:
            ids[uid] = _safe_id(vols[0].patient_id)
        else:
            ids[uid] = "study-" + _short_hash(uid)
    seen: Dict[str, int] = defaultdict(int)
    for uid in sorted(ids, key=lambda u: (ids[u], u)):
        base = ids[uid]
        seen[base] += 1
        if seen[base] > 1:
            ids[uid] = f"{base}-{_short_hash(uid)}"
    return ids


def discover_dicom_cases(root: PathLike, expected_views: Sequence[str] = tuple(VIEW_AXES)) -> List[DicomCase]:
    """Walk ``root``, group its DICOM volumes by study (StudyInstanceUID) into cases and sort them into views.

    Never raises for a single bad file or an incomplete study: each case lists its problems (missing view,
    ambiguous orientation, unreadable files) and still carries the views it has. Raises OrthoError only if
    ``root`` holds no readable DICOM image at all.
    """
    root = Path(root).resolve()
    volumes, file_problems = scan_dicom(root)
    if not volumes:
        detail = "; ".join(file_problems[:3]) if file_problems else "no DICOM image files found"
        raise OrthoError(f"no readable DICOM series ({detail})", root,
                         fix="point -i to the folder that holds the exam's .dcm files")
    studies: Dict[str, List[DicomVolume]] = defaultdict(list)
    for v in volumes:
        studies[v.study_uid or f"patient:{v.patient_id}"].append(v)
    ids = _case_ids(root if root.is_dir() else root.parent, studies)
    cases: List[DicomCase] = []
    for uid, vols in studies.items():
        folder = Path(os.path.commonpath([str(Path(f).parent) for v in vols for f in v.files]))
        case = DicomCase(ids[uid], uid, vols[0].patient_id, folder)
        for v in vols:
            if v.num_slices < MIN_SLICES_PER_VIEW:
                case.skipped.append(v)
                case.notes.append(f"{v.label}: {v.num_slices} slice(s), ignored (localiser?)")
                continue
            view, conf = v.view
            if view == "ambiguous":
                case.ambiguous.append(v)
                case.problems.append(f"{v.label}: orientation is ambiguous ({describe_normal(v.geometry.direction)}"
                                     f"); not used. Fix: convert it to NIfTI and name it "
                                     f"{case.case_id}_<view>_0000.nii.gz to use it as that view")
                continue
            case.views.setdefault(view, []).append(v)
            for w in v.warnings:
                case.notes.append(f"{view} {v.label}: {w}")
        for view in case.missing_views(expected_views):
            case.problems.append(f"no {view} series found" + (f" (found: {', '.join(case.found_views)})"
                                                              if case.found_views else ""))
        cases.append(case)
    for p in file_problems:
        for case in cases:
            if str(case.folder) in p:
                case.notes.append(f"skipped file: {p}")
                break
    cases.sort(key=lambda c: c.case_id)
    return cases


# ------------------------------------------------------------------------------------------------------------
# writing (tests, demos, round-trip checks)
# ------------------------------------------------------------------------------------------------------------
def make_uid(*parts: object) -> str:
    """A deterministic DICOM UID (2.25.<decimal>) derived from ``parts``: the same inputs give the same UID."""
    digest = hashlib.sha256("|".join(str(p) for p in parts).encode()).hexdigest()
    return "2.25." + str(int(digest[:30], 16))


def _ds(value: float) -> str:
    """DICOM decimal string (max 16 characters)."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return text if len(text) <= 16 else f"{value:.8g}"


def write_dicom_series(image: sitk.Image, out_dir: PathLike, series_description: str = "orthonet",
                       study_uid: Optional[str] = None, series_uid: Optional[str] = None,
                       patient_id: str = "ANONYMOUS", series_number: int = 1, echo_time: Optional[float] = None,
                       echo_number: Optional[int] = None, modality: str = "MR", file_prefix: str = "IM",
                       extra_tags: Optional[Dict[str, str]] = None) -> List[Path]:
    """Write a 3D image as a classic DICOM series, one file per slice, with the usual geometry tags.

    Integer-valued images that fit int16 are stored exactly as MR Image Storage; other float images are stored
    with a rescale slope (GDCM then writes single-frame Enhanced MR files, as some scanners do), so values
    survive to about 1/32000 of their range. UIDs are derived deterministically from the arguments unless given.
    """
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError("write_dicom_series needs a scalar 3D image")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    geom = Geometry.of(image)
    study_uid = study_uid or make_uid("study", patient_id, out_dir.parent.name)
    series_uid = series_uid or make_uid("series", study_uid, series_description, series_number, echo_time,
                                        geom.direction, geom.origin)
    arr = sitk.GetArrayViewFromImage(image)
    tags = {"0008|0060": modality, "0008|103e": series_description, "0008|0008": "ORIGINAL\\PRIMARY",
            "0010|0020": patient_id, "0010|0010": patient_id, "0020|000d": study_uid, "0020|000e": series_uid,
            "0020|0011": str(series_number), "0020|0010": "1", "0008|0020": "20000101", "0008|0030": "000000",
            "0008|0021": "20000101", "0008|0031": "000000",
            "0020|0037": "\\".join(_ds(v) for v in (*geom.direction_matrix[:, 0], *geom.direction_matrix[:, 1])),
            "0018|0050": _ds(geom.spacing[2]), "0018|0088": _ds(geom.spacing[2]),
            "0028|0030": f"{_ds(geom.spacing[1])}\\{_ds(geom.spacing[0])}"}  # row spacing (y) \ column spacing (x)
    if echo_time is not None:
        tags["0018|0081"] = _ds(echo_time)
    if echo_number is not None:
        tags["0018|0086"] = str(echo_number)
    integer_valued = np.all(np.equal(np.mod(arr, 1), 0)) if arr.size else True
    if integer_valued and arr.size and arr.min() >= -32768 and arr.max() <= 32767:
        src = sitk.Cast(image, sitk.sitkInt16)
    else:
        src = sitk.Cast(image, sitk.sitkFloat32)
        peak = float(np.max(np.abs(arr))) if arr.size else 1.0
        tags.update({"0028|1053": _ds(max(peak, 1e-12) / 32000.0), "0028|1052": "0", "0028|0100": "16",
                     "0028|0101": "16", "0028|0102": "15", "0028|0103": "1"})
    tags.update(extra_tags or {})
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    paths: List[Path] = []
    for k in range(image.GetDepth()):
        sl = src[:, :, k]
        for key, value in tags.items():
            sl.SetMetaData(key, value)
        pos = image.TransformIndexToPhysicalPoint((0, 0, k))
        sl.SetMetaData("0020|0032", "\\".join(_ds(v) for v in pos))
        sl.SetMetaData("0020|0013", str(k + 1))
        sl.SetMetaData("0008|0018", make_uid("instance", series_uid, k))
        sl.SetMetaData("0020|1041", _ds(float(np.dot(pos, geom.direction_matrix[:, 2]))))
        target = out_dir / f"{file_prefix}{k + 1:04d}.dcm"
        with atomic_path(target, suffix=".dcm") as tmp:
            writer.SetFileName(str(tmp))
            writer.Execute(sl)
        paths.append(target)
    return paths
