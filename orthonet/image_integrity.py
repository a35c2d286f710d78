"""What SimpleITK does not tell: truncated NIfTI files and NaN/Inf voxels in NIfTI files.

Why this exists: ITK's NIfTI reader (nifti1_io) silently zero-fills a ``.nii``/``.nii.gz`` whose data stops early,
and silently replaces NaN and Inf voxels by 0. Both leave a volume that looks valid and quietly poisons training,
so the integrity check reads the NIfTI header itself and compares the bytes on disk with the bytes it promises,
and scans floating-point voxel data as stored. Other formats (NRRD, MetaImage) fail loudly in ITK and keep
NaN/Inf, so plain numpy checks on the ITK array suffice for them.
"""
from __future__ import annotations

import gzip
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Optional, Union

import numpy as np

PathLike = Union[str, Path]

_CHUNK = 1 << 22
#: NIfTI datatype codes of real floating-point voxels -> numpy kind.
_FLOAT_CODES = {16: "f4", 64: "f8"}


@dataclass(frozen=True)
class NiftiHeader:
    """The few NIfTI-1/2 header fields needed to know where the voxel data lies and how long it is."""

    endian: str        # "<" or ">"
    datatype: int
    bitpix: int
    vox_offset: int
    n_voxels: int

    @property
    def expected_size(self) -> int:
        """Uncompressed bytes of a single-file NIfTI: header (+ extensions) and voxel data."""
        return self.vox_offset + self.n_voxels * self.bitpix // 8

    @property
    def float_dtype(self) -> Optional[np.dtype]:
        """numpy dtype of floating-point voxel data, None for integer (or exotic) types."""
        kind = _FLOAT_CODES.get(self.datatype)
        return None if kind is None else np.dtype(self.endian + kind)


def is_nifti(path: PathLike) -> bool:
    name = Path(path).name.lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


def _open(path: Path) -> BinaryIO:
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def parse_nifti_header(header: bytes) -> Optional[NiftiHeader]:
    """Parse the first bytes of a NIfTI-1 or NIfTI-2 file; None if they are not a single-file NIfTI header."""
    for endian in ("<", ">"):
        if len(header) >= 348 and struct.unpack(endian + "i", header[:4])[0] == 348:
            datatype, bitpix = struct.unpack(endian + "2h", header[70:74])
            dims = struct.unpack(endian + "8h", header[40:56])
            vox_offset = int(struct.unpack(endian + "f", header[108:112])[0])
            break
        if len(header) >= 540 and struct.unpack(endian + "i", header[:4])[0] == 540:
            datatype, bitpix = struct.unpack(endian + "2h", header[12:16])
            dims = struct.unpack(endian + "8q", header[16:80])
            vox_offset = struct.unpack(endian + "q", header[168:176])[0]
            break
    else:
        return None
    ndim = dims[0]
    if not 1 <= ndim <= 7 or bitpix <= 0 or vox_offset <= 0:
        return None  # unusual header (or a .hdr/.img pair): leave the judgement to ITK
    n = 1
    for d in dims[1:ndim + 1]:
        n *= max(int(d), 1)
    return NiftiHeader(endian, int(datatype), int(bitpix), int(vox_offset), n)


def read_nifti_header(path: PathLike) -> Optional[NiftiHeader]:
    """The header of a ``.nii``/``.nii.gz`` file, or None (not NIfTI, unreadable, or cut inside the header)."""
    path = Path(path)
    if not is_nifti(path):
        return None
    try:
        with _open(path) as f:
            return parse_nifti_header(f.read(540))
    except (OSError, EOFError, zlib.error, struct.error):
        return None


def _gzip_stream_problem(path: Path) -> Optional[str]:
    """Decompress the whole file; a reason if the stream is cut off or corrupt, else None."""
    try:
        with gzip.open(path, "rb") as f:
            while f.read(_CHUNK):
                pass
    except EOFError:
        return "the compressed stream ends early (file truncated)"
    except (OSError, zlib.error) as e:
        return f"the compressed stream is corrupt ({e})"
    return None


def nifti_truncation(path: PathLike) -> Optional[str]:
    """Why a ``.nii``/``.nii.gz`` file is truncated or corrupt, or None if it holds all the data it promises.

    Cheap in the normal case: a ``.nii`` is compared by file size; a ``.nii.gz`` by the uncompressed length in
    its gzip trailer. Only when the trailer disagrees (multi-member gzip, or a real truncation) is the stream
    decompressed to decide.
    """
    path = Path(path)
    if not is_nifti(path):
        return None
    try:
        if path.name.lower().endswith(".nii"):
            header = read_nifti_header(path)
            actual = path.stat().st_size
            if header is not None and actual < header.expected_size:
                return f"the file has {actual} bytes but its header needs {header.expected_size} (file truncated)"
            return None
        try:
            with gzip.open(path, "rb") as f:
                header = parse_nifti_header(f.read(540))
        except EOFError:
            return "the compressed stream ends inside the header (file truncated)"
        if header is None:
            return None
        size = path.stat().st_size
        if size < 18:
            return "the file is too short to be gzip data (file truncated)"
        with open(path, "rb") as f:
            f.seek(size - 4)
            isize = struct.unpack("<I", f.read(4))[0]
        if isize == header.expected_size % (1 << 32):
            return None
        return _gzip_stream_problem(path)
    except (OSError, zlib.error, struct.error) as e:
        return f"cannot be read as NIfTI ({e})"


@dataclass(frozen=True)
class FloatScan:
    """NaN/Inf counts and the finite range of a NIfTI file's stored float voxels; ``problem`` if unreadable."""

    n_nan: int = 0
    n_inf: int = 0
    minimum: float = float("nan")
    maximum: float = float("nan")
    problem: Optional[str] = None


def scan_nifti_floats(path: PathLike, header: NiftiHeader) -> FloatScan:
    """Stream the stored voxels of a float NIfTI once: count NaN/Inf, find the finite range, detect truncation.

    Reading to the end of a ``.nii.gz`` also verifies the gzip CRC, so this doubles as the integrity check."""
    path = Path(path)
    dtype = header.float_dtype
    if dtype is None:
        raise ValueError("scan_nifti_floats needs a floating-point NIfTI")
    need = header.n_voxels * dtype.itemsize
    n_nan = n_inf = 0
    lo, hi = np.inf, -np.inf
    chunk = (_CHUNK // dtype.itemsize) * dtype.itemsize
    got = 0
    try:
        with _open(path) as f:
            skip = header.vox_offset
            while skip > 0:
                block = f.read(min(skip, _CHUNK))
                if not block:
                    break
                skip -= len(block)
            pending = b""
            while got < need:
                block = f.read(min(chunk, need - got))
                if not block:
                    break
                block = pending + block
                usable = len(block) - len(block) % dtype.itemsize
                pending = block[usable:]
                values = np.frombuffer(block[:usable], dtype=dtype)
                got += usable
                finite = np.isfinite(values)
                if not finite.all():
                    n_nan += int(np.isnan(values).sum())
                    n_inf += int((~finite).sum()) - int(np.isnan(values).sum())
                    values = values[finite]
                if values.size:
                    lo, hi = min(lo, float(values.min())), max(hi, float(values.max()))
            while f.read(_CHUNK):  # to the end: lets gzip check its CRC and length
                pass
    except EOFError:
        return FloatScan(problem="the compressed stream ends early (file truncated)")
    except (OSError, zlib.error) as e:
        return FloatScan(problem=f"the compressed stream is corrupt ({e})")
    if got < need:
        return FloatScan(problem=f"the voxel data stops after {got} of {need} bytes (file truncated)")
    if lo > hi:
        lo = hi = float("nan")
    return FloatScan(n_nan, n_inf, lo, hi)
