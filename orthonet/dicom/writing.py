"""Writing a 3D image as a classic DICOM series (tests, demos, round-trip checks).

Why deterministic UIDs: the same image and arguments give the same study, series and instance UIDs, so tests and
demos can be rerun and compared.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import SimpleITK as sitk

from orthonet.dicom.reading import PathLike
from orthonet.fileio import atomic_path
from orthonet.imageio import Geometry


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
