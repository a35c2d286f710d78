"""Turn whatever the user passes as ``-i IN`` into cases: ``discover_inputs(path, spec) -> [InputCase]``.

Accepted inputs (detected automatically, in this order):

1. A folder in the raw naming ``{CASE}_{VIEW}_{CH:04d}{ending}`` (``{CASE}_{CH:04d}{ending}`` for single-view
   nnU-Net datasets) with *any* SimpleITK-readable ending, not only the dataset's ``file_ending``.
   ``{CASE}_{VIEW}{ending}`` (single-channel views) and ``{CASE}_{CH:04d}{ending}`` in a multi-view dataset (view
   taken from the image's direction) are accepted too.
2. A folder tree of DICOM series (one case per StudyInstanceUID, see :mod:`orthonet.dicom`).
3. A single case: one file, or a folder holding one case's files under any names (views from the directions).
4. A folder whose sub-folders are single cases (any of the above).

Problems (missing view, ambiguous orientation, missing channel, unreadable file) are collected *per case* and
never raised for the whole batch. A case without any usable view stays in the list with ``usable == False`` so
the predictor can report it and go on with the others.
"""
from __future__ import annotations

import logging
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import SimpleITK as sitk

from orthonet.dataset import NNUNET_VIEW, DatasetSpec
from orthonet.dicom import (VIEW_AXES, DicomCase, DicomVolume, assign_view, contains_dicom, describe_normal,
                            discover_dicom_cases)
from orthonet.errors import OrthoError
from orthonet.image_integrity import nifti_truncation
from orthonet.imageio import Geometry, read_image

PathLike = Union[str, Path]
#: Where a channel comes from: an image file, an image already in memory, or a lazily read DICOM volume.
ChannelSource = Union[Path, sitk.Image, DicomVolume]

#: File endings treated as images (SimpleITK reads them); matched case-insensitively, longest first.
IMAGE_ENDINGS = (".nii.gz", ".nii", ".seg.nrrd", ".nrrd", ".nhdr", ".mha", ".mhd", ".hdr", ".vtk", ".gipl.gz",
                 ".gipl", ".tiff", ".tif", ".mnc", ".mnc2")

logger = logging.getLogger("orthonet.inference")


@dataclass
class InputCase:
    """One exam to predict: per view the channel sources (channel 0 first), plus what is wrong with it."""

    case_id: str
    views: Dict[str, List[ChannelSource]] = field(default_factory=dict)
    problems: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    kind: str = "files"                       # files | dicom | memory

    @property
    def usable(self) -> bool:
        """False when no view is usable: the case is reported and skipped."""
        return bool(self.views)

    def load_view(self, view: str) -> List[sitk.Image]:
        """The view's channels as 3D images on one grid (OrthoError naming the file otherwise)."""
        images = [load_source(s) for s in self.views[view]]
        ref = Geometry.of(images[0])
        for src, img in zip(self.views[view][1:], images[1:]):
            diff = ref.differences(Geometry.of(img))
            if diff:
                raise OrthoError(f"case {self.case_id}, view {view}: channel is not on the grid of channel 0: "
                                 f"{'; '.join(diff)}", _source_name(src),
                                 fix="resample all channels of a view onto one grid")
        return images

    def summary(self) -> str:
        """One line for logs: views used and the number of problems."""
        views = ", ".join(f"{v} ({len(s)} ch)" for v, s in self.views.items()) or "no usable view"
        text = f"{self.case_id}: {views}"
        if self.problems:
            text += f"; {len(self.problems)} problem(s): " + " | ".join(self.problems)
        return text


def _one_line(error: Exception) -> str:
    """An OrthoError's message and fix on one line (problems are listed one per line in logs and reports)."""
    return str(error).replace("\n  fix: ", "; fix: ").replace("\n", " ")


def _source_name(src: ChannelSource) -> str:
    if isinstance(src, DicomVolume):
        return str(Path(src.files[0]).parent)
    return str(src) if isinstance(src, Path) else "<in-memory image>"


def load_source(src: ChannelSource) -> sitk.Image:
    """Read one channel source into a 3D SimpleITK image (files are checked for truncation first)."""
    if isinstance(src, sitk.Image):
        return sitk.JoinSeries(src) if src.GetDimension() == 2 else src
    if isinstance(src, DicomVolume):
        return src.load()
    problem = nifti_truncation(src)
    if problem:
        raise OrthoError(f"corrupt image: {problem}", src, fix="copy or export the file again")
    return read_image(src)


# ------------------------------------------------------------------------------------------------------------
# naming
# ------------------------------------------------------------------------------------------------------------
def split_ending(name: str) -> Optional[Tuple[str, str]]:
    """('knee_sagittal_0000', '.nii.gz') for an image file name, None for anything else."""
    lower = name.lower()
    for ending in IMAGE_ENDINGS:
        if lower.endswith(ending) and len(name) > len(ending):
            return name[:-len(ending)], name[-len(ending):]
    return None


@dataclass(frozen=True)
class NamedFile:
    path: Path
    case: str
    view: Optional[str]          # None: not in the name (take it from the direction)
    channel: int
    explicit_channel: bool = True  # False for {CASE}_{VIEW}{ending} (channel 0 implied)


def parse_input_name(path: Path, spec: DatasetSpec) -> Optional[NamedFile]:
    """Parse ``{CASE}_{VIEW}_{CH:04d}``, ``{CASE}_{VIEW}`` or ``{CASE}_{CH:04d}`` (+ any image ending)."""
    parts = split_ending(path.name)
    if parts is None:
        return None
    stem = parts[0]
    if not spec.nnunet_format:
        views = "|".join(re.escape(v) for v in sorted(spec.views, key=len, reverse=True))
        m = re.match(rf"^(?P<case>.+)_(?P<view>{views})_(?P<ch>\d{{4}})$", stem)
        if m:
            return NamedFile(path, m["case"], m["view"], int(m["ch"]))
        m = re.match(rf"^(?P<case>.+)_(?P<view>{views})$", stem)
        if m:
            return NamedFile(path, m["case"], m["view"], 0, explicit_channel=False)
    m = re.match(r"^(?P<case>.+)_(?P<ch>\d{4})$", stem)
    if m:
        return NamedFile(path, m["case"], NNUNET_VIEW if spec.nnunet_format else None, int(m["ch"]))
    return None


# ------------------------------------------------------------------------------------------------------------
# headers and per-view checks
# ------------------------------------------------------------------------------------------------------------
def read_header(path: Path) -> Geometry:
    """Geometry from the header only (no pixels); OrthoError naming the file if unreadable."""
    problem = nifti_truncation(path)
    if problem:
        raise OrthoError(f"corrupt image: {problem}", path, fix="copy or export the file again")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else "unknown reason"
        raise OrthoError(f"cannot read image header ({msg[:160]})", path,
                         fix="re-export the image; orthonet reads any format SimpleITK reads") from None
    dim = reader.GetDimension()
    if dim not in (2, 3):
        raise OrthoError(f"image has {dim} dimensions, expected a 3D volume", path,
                         fix="split 4D files into one 3D file per channel (_0000, _0001, ...)")
    if reader.GetNumberOfComponents() != 1:
        raise OrthoError("image has several components per voxel (RGB/vector)", path,
                         fix="store each component as its own channel file")
    if dim == 2:
        return Geometry(tuple(reader.GetSize()) + (1,), tuple(reader.GetSpacing()) + (1.0,),
                        tuple(reader.GetOrigin()) + (0.0,))
    return Geometry(tuple(int(v) for v in reader.GetSize()), tuple(float(v) for v in reader.GetSpacing()),
                    tuple(float(v) for v in reader.GetOrigin()), tuple(float(v) for v in reader.GetDirection()))


def _view_of_file(path: Path, spec: DatasetSpec) -> Tuple[Optional[str], str]:
    """(view or None, explanation) for a file whose name carries no view: from its direction cosines."""
    try:
        geom = read_header(path)
    except OrthoError as e:
        return None, _one_line(e)
    if spec.nnunet_format:
        return NNUNET_VIEW, ""
    view, conf = assign_view(geom.direction, geom.spacing)
    if view == "ambiguous":
        return None, (f"{path.name}: orientation is ambiguous ({describe_normal(geom.direction, geom.spacing)}); "
                      f"not used. Fix: rename it {{CASE}}_<view>_0000{split_ending(path.name)[1]}")
    target = _dataset_view_for_orientation(view, spec)
    if target is None:
        return None, f"{path.name} is a {view} image but the dataset has no {view} view; not used"
    return target, f"{path.name}: view '{target}' taken from its direction (confidence {conf:.2f})"


def _orientation_of_view(view: str) -> Optional[str]:
    """'sagittal' for dataset views named 'sagittal', 'sagittalT2', 'sag', ... ; None if the name says nothing."""
    lower = view.lower()
    for orientation in VIEW_AXES:
        if orientation in lower or lower.startswith(orientation[:3]):
            return orientation
    return None


def _dataset_view_for_orientation(orientation: str, spec: DatasetSpec) -> Optional[str]:
    if spec.nnunet_format:
        return NNUNET_VIEW
    for v in spec.views:
        if _orientation_of_view(v) == orientation:
            return v
    return None


def _check_view(case: InputCase, view: str, channels: Dict[int, List[Path]], spec: DatasetSpec,
                check_readable: bool) -> Optional[List[Path]]:
    """The ordered channel files of one view, or None (with the reason added to ``case.problems``)."""
    need = spec.num_channels(view)
    for ch, paths in sorted(channels.items()):
        if len(paths) > 1:
            case.problems.append(f"view {view} channel {ch:04d} has several files "
                                 f"({', '.join(p.name for p in paths)}); using {paths[0].name}")
    missing = [ch for ch in range(need) if ch not in channels]
    if missing:
        names = spec.channels(view)
        case.problems.append(f"view {view}: channel(s) {', '.join(f'{c:04d} ({names[c]})' for c in missing)} "
                             f"missing (the model expects {need}: {', '.join(names)}); view not used")
        return None
    extra = sorted(ch for ch in channels if ch >= need)
    if extra:
        case.notes.append(f"view {view}: extra channel file(s) {', '.join(f'{c:04d}' for c in extra)} ignored "
                          f"(the model expects {need})")
    files = [channels[ch][0] for ch in range(need)]
    if not check_readable:
        return files
    geoms = []
    for p in files:
        try:
            geoms.append(read_header(p))
        except OrthoError as e:
            case.problems.append(f"view {view}: unreadable file — {_one_line(e)}; view not used")
            return None
    for p, g in zip(files[1:], geoms[1:]):
        diff = geoms[0].differences(g)
        if diff:
            case.problems.append(f"view {view}: {p.name} is not on the grid of {files[0].name} "
                                 f"({'; '.join(diff)}); view not used")
            return None
    return files


def missing_view_problems(case: InputCase, spec: DatasetSpec, views: Optional[Sequence[str]] = None,
                          segments: bool = True) -> List[str]:
    """The problems a case's absent views cause for a model that reads ``views`` (default: every view of the
    dataset) and, with ``segments``, writes the segmentation view's label map."""
    views = list(spec.views) if views is None else [v for v in spec.views if v in views]
    missing = [v for v in views if v not in case.views]
    out = [f"view {v} missing" for v in missing
           if not any(p.startswith(f"view {v}") for p in case.problems if p != f"view {v} missing")]
    if segments and spec.segmentation_view and spec.segmentation_view in missing and spec.has_segmentation:
        out.append(f"no segmentation for this case: the segmentation view '{spec.segmentation_view}' is not usable")
    return out


def restrict_to_models(case: InputCase, spec: DatasetSpec, views: Sequence[str], segments: bool) -> InputCase:
    """Keep only the missing-view problems that matter to the selected models: a segmentation-only model given
    just its view must not report the other views as missing (their absence changes nothing)."""
    general = missing_view_problems(case, spec)
    kept = [p for p in case.problems if p not in general]
    case.problems = kept + [p for p in missing_view_problems(case, spec, views, segments) if p not in kept]
    unused = [v for v in spec.views if v not in views and v not in case.views]
    if unused:
        note = f"view(s) {', '.join(unused)} not given; the selected model does not read them"
        if note not in case.notes:
            case.notes.append(note)
    return case


def _finish_case(case: InputCase, spec: DatasetSpec) -> InputCase:
    """Add the missing-view problems and log a case that cannot be predicted."""
    case.problems += [p for p in missing_view_problems(case, spec) if p not in case.problems]
    if not case.usable:
        case.problems.append("no usable view: case skipped")
        logger.warning("case %s skipped: %s", case.case_id, " | ".join(case.problems))
    return case


# ------------------------------------------------------------------------------------------------------------
# the input kinds
# ------------------------------------------------------------------------------------------------------------
def _drop_bare_names(files: List[NamedFile], case: InputCase) -> List[NamedFile]:
    """``{CASE}_{VIEW}.nii.gz`` next to ``{CASE}_{VIEW}_0000.nii.gz`` is a label map or an earlier prediction
    (ortho_predict writes that name), not an image: keep the explicit channel files."""
    explicit = {f.view for f in files if f.explicit_channel}
    keep = []
    for f in files:
        if not f.explicit_channel and f.view in explicit:
            case.notes.append(f"{f.path.name} ignored (looks like a label map or prediction; the view's channel "
                              f"files are used)")
        else:
            keep.append(f)
    return keep


def _cases_from_named_files(named: Sequence[NamedFile], spec: DatasetSpec, check_readable: bool
                            ) -> List[InputCase]:
    by_case: Dict[str, List[NamedFile]] = defaultdict(list)
    for nf in named:
        by_case[nf.case].append(nf)
    cases = []
    for case_id in sorted(by_case):
        case = InputCase(case_id)
        by_case[case_id] = _drop_bare_names(by_case[case_id], case)
        per_view: Dict[str, Dict[int, List[Path]]] = defaultdict(lambda: defaultdict(list))
        for nf in sorted(by_case[case_id], key=lambda f: f.path.name):
            view = nf.view
            if view is None:
                view, why = _view_of_file(nf.path, spec)
                if view is None:
                    case.problems.append(why)
                    continue
                case.notes.append(why)
            per_view[view][nf.channel].append(nf.path)
        for view in [v for v in spec.views if v in per_view]:
            files = _check_view(case, view, per_view[view], spec, check_readable)
            if files is not None:
                case.views[view] = list(files)
        cases.append(_finish_case(case, spec))
    return cases


def _single_case_from_files(case_id: str, files: Sequence[Path], spec: DatasetSpec, check_readable: bool
                            ) -> InputCase:
    """Files with free names: every file's view from its direction; channels in file-name order."""
    case = InputCase(case_id)
    per_view: Dict[str, List[Path]] = defaultdict(list)
    for p in sorted(files):
        view, why = _view_of_file(p, spec)
        if view is None:
            case.problems.append(why)
            continue
        if why:
            case.notes.append(why)
        per_view[view].append(p)
    for view in [v for v in spec.views if v in per_view]:
        paths = per_view[view]
        need = spec.num_channels(view)
        if len(paths) > need:
            case.notes.append(f"view {view}: {len(paths)} files ({', '.join(p.name for p in paths)}); using "
                              f"the first {need} in file-name order")
        elif len(paths) > 1:
            case.notes.append(f"view {view}: channel order taken from file-name order "
                              f"({', '.join(p.name for p in paths)})")
        files = _check_view(case, view, {i: [p] for i, p in enumerate(paths[:need])}, spec, check_readable)
        if files is not None:
            case.views[view] = list(files)
    return _finish_case(case, spec)


def _dicom_orientation_for(view: str, spec: DatasetSpec, found: Sequence[str]) -> Optional[str]:
    if spec.nnunet_format:
        return found[0] if found else None
    return _orientation_of_view(view)


def input_case_from_dicom(dcase: DicomCase, spec: DatasetSpec) -> InputCase:
    """Map a :class:`orthonet.dicom.DicomCase` onto the dataset's views and channel counts."""
    case = InputCase(dcase.case_id, kind="dicom", notes=list(dcase.notes))
    case.problems.extend(dcase.problems)  # ambiguous series; missing views are derived below per dataset view
    used = set()
    for view in spec.views:
        orientation = _dicom_orientation_for(view, spec, dcase.found_views)
        if orientation is None:
            case.problems.append(f"view {view}: cannot tell which DICOM orientation it is; name dataset views "
                                 f"after sagittal/coronal/axial")
            continue
        if orientation not in dcase.views:
            case.problems.append(f"view {view} missing: no {orientation} series found"
                                 + (f" (found: {', '.join(dcase.found_views)})" if dcase.found_views else ""))
            continue
        vols, notes = dcase.channels(orientation, spec.num_channels(view), spec.channels(view))
        case.notes.extend(f"view {view}: {n}" for n in notes)
        if not vols:
            case.problems.append(f"view {view}: channel(s) missing — {notes[-1] if notes else ''}; view not used")
            continue
        case.views[view] = list(vols)
        used.add(orientation)
        if spec.nnunet_format and len(dcase.found_views) > 1:
            case.notes.append(f"single-view dataset: used the {orientation} series (also found: "
                              f"{', '.join(v for v in dcase.found_views if v != orientation)})")
    for orientation in dcase.found_views:
        if orientation not in used and not spec.nnunet_format:
            case.notes.append(f"{orientation} series not used (the dataset has no {orientation} view)")
    return _finish_case(case, spec)


def _image_files(folder: Path) -> List[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and split_ending(p.name) is not None
                  and not p.name.startswith("."))


def discover_inputs(path: PathLike, spec: DatasetSpec, check_readable: bool = True) -> List[InputCase]:
    """All cases under ``path`` (see the module docstring for the accepted layouts), sorted by case id.

    ``check_readable`` reads every file's header once (cheap) so unreadable/corrupt files become per-case
    problems here instead of failures during prediction. Raises OrthoError only when ``path`` does not exist or
    holds nothing that could be a case.
    """
    path = Path(path)
    if not path.exists():
        raise OrthoError("input not found", path, fix="pass an existing file or folder with -i")
    if path.is_file():
        return _discover_file(path, spec, check_readable)
    images = _image_files(path)
    named = [nf for nf in (parse_input_name(p, spec) for p in images) if nf is not None]
    if named:
        unnamed = sorted(set(images) - {nf.path for nf in named})
        if unnamed:
            logger.warning("%s: ignored %d image file(s) not following {CASE}_{VIEW}_{CH:04d}: %s", path,
                           len(unnamed), ", ".join(p.name for p in unnamed[:5]))
        return _cases_from_named_files(named, spec, check_readable)
    if images:
        return [_single_case_from_files(path.name, images, spec, check_readable)]
    if contains_dicom(path):
        return [input_case_from_dicom(d, spec) for d in discover_dicom_cases(path, expected_views=())]
    cases: List[InputCase] = []
    for sub in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if _image_files(sub) or contains_dicom(sub):
            cases.extend(discover_inputs(sub, spec, check_readable))
    if not cases:
        raise OrthoError("no images found (neither files named {CASE}_{VIEW}_{CH:04d}.nii.gz nor DICOM series)",
                         path, fix="check the -i path; see `ortho_predict -h` for the accepted layouts")
    ids = [c.case_id for c in cases]
    dups = sorted({i for i in ids if ids.count(i) > 1})
    if dups:
        raise OrthoError(f"case id(s) {dups} occur in several sub-folders", path,
                         fix="give every case a unique name")
    return sorted(cases, key=lambda c: c.case_id)


def _discover_file(path: Path, spec: DatasetSpec, check_readable: bool) -> List[InputCase]:
    """A single file: DICOM (its whole folder is the series), a named case file (plus its siblings), or a volume."""
    if split_ending(path.name) is None and contains_dicom(path):
        return [input_case_from_dicom(d, spec) for d in discover_dicom_cases(path.parent, expected_views=())]
    nf = parse_input_name(path, spec)
    if nf is not None:
        siblings = [s for s in (parse_input_name(p, spec) for p in _image_files(path.parent))
                    if s is not None and s.case == nf.case]
        return _cases_from_named_files(siblings, spec, check_readable)
    if split_ending(path.name) is None:
        raise OrthoError("not an image file orthonet can read", path,
                         fix=f"use one of {', '.join(IMAGE_ENDINGS[:6])}, ... or a DICOM folder")
    return [_single_case_from_files(split_ending(path.name)[0], [path], spec, check_readable)]


def input_case_from_images(case_id: str, views: Dict[str, Union[sitk.Image, Sequence[sitk.Image]]],
                           spec: DatasetSpec) -> InputCase:
    """Python API: an :class:`InputCase` from SimpleITK images already in memory (one or a list per view)."""
    case = InputCase(case_id, kind="memory")
    for view, images in views.items():
        if view not in spec.views:
            raise OrthoError(f"unknown view '{view}' for case {case_id}; the dataset has {spec.views}")
        images = [images] if isinstance(images, sitk.Image) else list(images)
        need = spec.num_channels(view)
        if len(images) < need:
            case.problems.append(f"view {view}: {len(images)} channel image(s) given, the model expects {need}; "
                                 f"view not used")
            continue
        case.views[view] = images[:need]
    return _finish_case(case, spec)
