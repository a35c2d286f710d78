"""Image reading and writing through SimpleITK, with geometry that survives the round trip.

Conventions used everywhere in orthonet:

* A :class:`Geometry` keeps size, spacing, origin and direction in ITK order (x, y, z), exactly as SimpleITK
  reports them, so writing it back reproduces the header bit for bit.
* Arrays are in numpy order (z, y, x) as ``sitk.GetArrayFromImage`` returns them; ``Geometry.array_spacing``
  gives the spacing in that order. Multi-channel volumes are (C, z, y, x).
* Every read error becomes an :class:`OrthoError` naming the file.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk

from orthonet.errors import OrthoError
from orthonet.fileio import atomic_path

PathLike = Union[str, Path]

#: Default tolerances when deciding whether two images share a grid (relative spacing, absolute mm, cosines).
SPACING_RTOL = 1e-3
ORIGIN_ATOL_MM = 1e-2
DIRECTION_ATOL = 1e-3


@dataclass(frozen=True)
class Geometry:
    """The physical grid of a 3D image, in ITK (x, y, z) order."""

    size: Tuple[int, int, int]
    spacing: Tuple[float, float, float]
    origin: Tuple[float, float, float]
    direction: Tuple[float, ...] = field(default=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))

    @classmethod
    def of(cls, image: sitk.Image) -> "Geometry":
        return cls(tuple(int(s) for s in image.GetSize()), tuple(float(s) for s in image.GetSpacing()),
                   tuple(float(o) for o in image.GetOrigin()), tuple(float(d) for d in image.GetDirection()))

    @classmethod
    def from_dict(cls, d: Dict) -> "Geometry":
        return cls(tuple(int(v) for v in d["size"]), tuple(float(v) for v in d["spacing"]),
                   tuple(float(v) for v in d["origin"]), tuple(float(v) for v in d["direction"]))

    def to_dict(self) -> Dict:
        return {"size": list(self.size), "spacing": list(self.spacing), "origin": list(self.origin),
                "direction": list(self.direction)}

    @property
    def array_shape(self) -> Tuple[int, ...]:
        """Shape of the numpy array (z, y, x)."""
        return tuple(self.size[::-1])

    @property
    def array_spacing(self) -> Tuple[float, ...]:
        """Spacing in numpy (z, y, x) order."""
        return tuple(self.spacing[::-1])

    @property
    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=np.float64).reshape(3, 3)

    def index_to_physical(self) -> np.ndarray:
        """4x4 affine mapping a numpy index (z, y, x, 1) to a physical point (x, y, z, 1) in mm."""
        affine = np.eye(4)
        # physical = origin + D @ diag(spacing) @ (i, j, k) with (i, j, k) in ITK order = reversed numpy index
        m = self.direction_matrix @ np.diag(self.spacing)
        affine[:3, :3] = m[:, ::-1]
        affine[:3, 3] = self.origin
        return affine

    def apply_to(self, image: sitk.Image) -> sitk.Image:
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    def differences(self, other: "Geometry", spacing_rtol: float = SPACING_RTOL,
                    origin_atol: float = ORIGIN_ATOL_MM, direction_atol: float = DIRECTION_ATOL) -> List[str]:
        """Human-readable list of the ways ``other`` is not on the same grid as ``self`` (empty: same grid)."""
        out = []
        if tuple(self.size) != tuple(other.size):
            out.append(f"size {tuple(other.size)} != {tuple(self.size)}")
        if not np.allclose(other.spacing, self.spacing, rtol=spacing_rtol, atol=0):
            out.append(f"spacing {_fmt(other.spacing)} != {_fmt(self.spacing)}")
        if not np.allclose(other.origin, self.origin, rtol=0, atol=origin_atol):
            out.append(f"origin {_fmt(other.origin)} != {_fmt(self.origin)}")
        if not np.allclose(other.direction, self.direction, rtol=0, atol=direction_atol):
            out.append(f"direction {_fmt(other.direction)} != {_fmt(self.direction)}")
        return out


def _fmt(v: Sequence[float]) -> str:
    return "(" + ", ".join(f"{x:.4g}" for x in v) + ")"


def read_image(path: PathLike) -> sitk.Image:
    """Read one 3D image (2D images become one-slice volumes). Raises OrthoError naming the file on failure."""
    path = Path(path)
    if not path.is_file():
        raise OrthoError("image file not found", path, fix="check the file name against the dataset naming "
                         "({CASE}_{VIEW}_{CHANNEL:04d}{file_ending})")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as e:
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else "unknown reason"
        raise OrthoError(f"cannot read image (corrupt, truncated or unsupported format: {reason[:200]})", path,
                         fix="re-export the image from its source; orthonet reads any format SimpleITK reads") \
            from None
    if image.GetDimension() == 2:
        image = sitk.JoinSeries(image)
    if image.GetDimension() != 3:
        raise OrthoError(f"image has {image.GetDimension()} dimensions, expected a 3D volume", path,
                         fix="split 4D files (e.g. multi-echo) into one 3D file per channel "
                             "(_0000, _0001, ...)")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise OrthoError(f"image has {image.GetNumberOfComponentsPerPixel()} components per voxel (RGB/vector)",
                         path, fix="store each component as its own channel file")
    return image


def read_array(path: PathLike, dtype=np.float32) -> Tuple[np.ndarray, Geometry]:
    """Read an image as a numpy array (z, y, x) plus its geometry."""
    image = read_image(path)
    return sitk.GetArrayFromImage(image).astype(dtype, copy=False), Geometry.of(image)


def read_channels(paths: Sequence[PathLike], dtype=np.float32) -> Tuple[np.ndarray, Geometry]:
    """Read the channel files of one view into (C, z, y, x); all channels must share one grid."""
    arrays, ref_geom = [], None
    for p in paths:
        arr, geom = read_array(p, dtype)
        if ref_geom is None:
            ref_geom = geom
        else:
            diff = ref_geom.differences(geom)
            if diff:
                raise OrthoError(f"channel is not on the grid of {Path(paths[0]).name}: {'; '.join(diff)}", p,
                                 fix="resample all channels of a view onto one grid before use")
        arrays.append(arr)
    if ref_geom is None:
        raise OrthoError("no channel files given")
    return np.stack(arrays, 0), ref_geom


def array_to_image(array: np.ndarray, geometry: Geometry) -> sitk.Image:
    """Wrap a (z, y, x) array in the given geometry (shape must match ``geometry.array_shape``)."""
    if tuple(array.shape) != tuple(geometry.array_shape):
        raise ValueError(f"array shape {array.shape} does not match geometry {geometry.array_shape}")
    return geometry.apply_to(sitk.GetImageFromArray(array))


def _extension(path: Path) -> str:
    name = path.name
    for ext in (".nii.gz", ".nrrd", ".nii", ".mha", ".mhd", ".seg.nrrd"):
        if name.endswith(ext):
            return ext
    return path.suffix


def write_image(image: sitk.Image, path: PathLike, compress: bool = True) -> None:
    """Write atomically: a killed process never leaves a truncated image under the final name."""
    path = Path(path)
    with atomic_path(path, suffix=_extension(path)) as tmp:
        sitk.WriteImage(image, str(tmp), compress)


def write_array(array: np.ndarray, geometry: Geometry, path: PathLike, compress: bool = True) -> None:
    write_image(array_to_image(array, geometry), path, compress)
