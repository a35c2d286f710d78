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

One job per module, each importing only those before it:

* :mod:`.orientation` -- which view (sagittal / coronal / axial / ambiguous) a slice orientation is;
* :mod:`.reading` -- finding DICOM files and reading one file's header (:class:`DicomSlice`);
* :mod:`.stacking` -- grouping headers into volumes with geometry from the slice positions (:class:`DicomVolume`);
* :mod:`.discovery` -- studies into cases, volumes into views, the echo/channel policy (:class:`DicomCase`);
* :mod:`.writing` -- writing a 3D image as a DICOM series (tests, demos, round-trip checks).

This package re-exports the names the rest of orthonet and its tests import (``from orthonet.dicom import X``);
everything else is imported from its module.
"""
from __future__ import annotations

from orthonet.dicom.discovery import DicomCase, discover_dicom_cases
from orthonet.dicom.orientation import AMBIGUOUS_ANGLE_DEG, VIEW_AXES, assign_view, describe_normal
from orthonet.dicom.reading import contains_dicom, read_slice_header
from orthonet.dicom.stacking import DicomVolume, read_dicom_series, scan_dicom
from orthonet.dicom.writing import write_dicom_series

__all__ = ["AMBIGUOUS_ANGLE_DEG", "VIEW_AXES", "DicomCase", "DicomVolume", "assign_view", "contains_dicom",
           "describe_normal", "discover_dicom_cases", "read_dicom_series", "read_slice_header", "scan_dicom",
           "write_dicom_series"]
