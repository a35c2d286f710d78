"""DICOM studies as prediction cases: volumes grouped by study, sorted into views, channels chosen per view.

Why it never raises for one bad file or an incomplete study: clinical exams often lack a view or carry an
ambiguous plane; each case lists its problems and still offers the views it has.
"""
from __future__ import annotations

import hashlib
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from orthonet.dicom.orientation import VIEW_AXES, describe_normal
from orthonet.dicom.reading import PathLike
from orthonet.dicom.stacking import DicomVolume, scan_dicom
from orthonet.errors import OrthoError

#: Volumes with fewer slices are localisers/scouts and are not offered as a view.
MIN_SLICES_PER_VIEW = 3


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
