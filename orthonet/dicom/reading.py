"""Finding DICOM files and reading one file's header (geometry and identifying tags, no pixels).

Why headers only: a folder tree may hold thousands of files; grouping them into volumes needs only their tags, so
pixels wait until a volume is loaded (:meth:`orthonet.dicom.stacking.DicomVolume.load`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple, Union

import numpy as np
import SimpleITK as sitk

from orthonet.errors import OrthoError

PathLike = Union[str, Path]


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
