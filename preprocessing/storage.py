"""On-disk format of preprocessed cases: blosc2 arrays plus one JSON of properties per case and view.

Layout inside ``$ORTHO_preprocessed/DatasetXXX_Name/<data_identifier>/``::

    {case}_{view}.b2nd        float32 (C, z, y, x), normalised image at the plan's spacing and orientation
    {case}_{view}_seg.b2nd    int16 (1, z, y, x) label map (segmentation view of labelled cases only);
                              -1 marks voxels outside the nonzero crop region, as nnU-Net does
    {case}_{view}.json        properties: split, original geometry, transpose, crop box, class locations ...

Why blosc2: compressed, fast, and sliceable without decompressing the whole volume, so a data loader can cut a
patch out of a large case cheaply. As nnU-Net does, blocks (blosc2's unit of decompression) are sized to a core's
L1 cache and chunks grown from them towards the plan's patch size (within L3), so a random patch touches few
chunks and decompresses little outside itself; files are opened memory-mapped. Each file is written under a temporary name and renamed, so a killed
preprocessing run never leaves a half-written case that a later run would mistake for a finished one (the JSON is
written last and marks completion).
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import blosc2
import numpy as np

from orthonet.errors import OrthoError
from orthonet.fileio import dumps_readable, load_json, save_text

PathLike = Union[str, Path]
_CPARAMS = {"codec": blosc2.Codec.ZSTD, "clevel": 3}
L1_BYTES = int(32 * 1024 * 0.8)          # per core, with a safety margin
L3_BYTES = int(1.375 * 1024 ** 2 * 0.8)


def blosc2_layout(shape: Sequence[int], patch_size: Sequence[int], itemsize: int) -> Tuple[Tuple[int, ...],
                                                                                          Tuple[int, ...]]:
    """(blocks, chunks) for a (C, *spatial) array read in patches of ``patch_size`` (a 2D patch reads one slice).

    Blocks: the patch rounded up to powers of two, halved along the axis that is largest relative to the patch
    until a block fits L1. Chunks: grown from the block one block at a time along the axis least covered
    relative to the patch (never along an axis the patch reads one slice of), while a chunk fits L3 and stays
    within 1.5x the patch on average.
    """
    channels, spatial = int(shape[0]), [int(n) for n in shape[1:]]
    patch = [1] * (len(spatial) - len(patch_size)) + [int(p) for p in patch_size]
    patch = [max(1, min(p, n)) for p, n in zip(patch, spatial)]
    block = [min(n, 1 << max(0, math.ceil(math.log2(p)))) for p, n in zip(patch, spatial)]

    def nbytes(extent: List[int]) -> int:
        return channels * itemsize * int(np.prod(extent))

    while nbytes(block) > L1_BYTES and max(block) > 1:
        axis = max((a for a in range(len(block)) if block[a] > 1), key=lambda a: block[a] / patch[a])
        block[axis] = 1 << max(0, math.floor(math.log2(block[axis] - 1)))    # the next smaller power of two
    chunk = list(block)
    while True:
        growable = [a for a in range(len(chunk))
                    if chunk[a] < spatial[a] and chunk[a] < patch[a] * 1.5 and patch[a] > 1]
        if not growable:
            break
        axis = min(growable, key=lambda a: chunk[a] / patch[a])
        grown = list(chunk)
        grown[axis] = min(spatial[axis], chunk[axis] + block[axis])
        if nbytes(grown) > L3_BYTES or np.mean([c / p for c, p in zip(grown, patch)]) > 1.5:
            break
        chunk = grown
    return (channels, *block), (channels, *chunk)


def case_stem(case: str, view: str) -> str:
    return f"{case}_{view}"


def image_file(folder: PathLike, case: str, view: str) -> Path:
    return Path(folder) / f"{case_stem(case, view)}.b2nd"


def seg_file(folder: PathLike, case: str, view: str) -> Path:
    return Path(folder) / f"{case_stem(case, view)}_seg.b2nd"


def properties_file(folder: PathLike, case: str, view: str) -> Path:
    return Path(folder) / f"{case_stem(case, view)}.json"


def save_array(array: np.ndarray, path: PathLike, patch_size: Optional[Sequence[int]] = None) -> None:
    """Write a blosc2 array atomically (temporary name, then rename); chunks and blocks sized for reading
    ``patch_size`` patches (:func:`blosc2_layout`) when given, blosc2's defaults otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.b2nd")
    layout = {}
    if patch_size is not None and array.ndim >= 2:
        blocks, chunks = blosc2_layout(array.shape, patch_size, array.dtype.itemsize)
        layout = {"blocks": blocks, "chunks": chunks}
    try:
        blosc2.asarray(np.ascontiguousarray(array), urlpath=str(tmp), mode="w", cparams=_CPARAMS, **layout)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def open_array(path: PathLike, load: bool = False):
    """Open a stored array lazily (slicing decompresses only what is needed) or fully if ``load``."""
    path = Path(path)
    if not path.is_file():
        raise OrthoError("preprocessed array not found", path,
                         fix="run `ortho_plan_and_preprocess` (with --overwrite if the folder is stale)")
    try:
        arr = blosc2.open(str(path), mode="r", mmap_mode="r")
    except Exception as e:  # blosc2 raises several types for corrupt files
        raise OrthoError(f"preprocessed array is corrupt ({e})", path,
                         fix="delete it and rerun `ortho_plan_and_preprocess`") from None
    return arr[:] if load else arr


def save_case(folder: PathLike, case: str, view: str, data: np.ndarray, seg: Optional[np.ndarray],
              properties: Dict, patch_size: Optional[Sequence[int]] = None) -> None:
    """Store one preprocessed case/view (laid out for ``patch_size`` reads). The properties JSON is written last:
    its presence means 'complete'."""
    save_array(data.astype(np.float32, copy=False), image_file(folder, case, view), patch_size)
    if seg is not None:
        save_array(seg.astype(np.int16, copy=False), seg_file(folder, case, view), patch_size)
    save_text(properties_text(properties), properties_file(folder, case, view))


def properties_text(properties: Dict) -> str:
    """Readable JSON: short lists on one line, the long ``class_locations`` lists written compactly.

    Why: 10,000 sampled coordinates per class written one number per line would make every properties file
    megabytes long; the content is the same JSON either way.
    """
    return dumps_readable(properties)


def load_case(folder: PathLike, case: str, view: str, lazy: bool = False
              ) -> Tuple[np.ndarray, Optional[np.ndarray], Dict]:
    """Load (data, seg or None, properties). ``lazy`` returns blosc2 arrays that decompress on slicing."""
    props = load_json(properties_file(folder, case, view), "preprocessed case properties")
    data = open_array(image_file(folder, case, view), load=not lazy)
    sfile = seg_file(folder, case, view)
    seg = open_array(sfile, load=not lazy) if sfile.is_file() else None
    return data, seg, props


def is_complete(folder: PathLike, case: str, view: str) -> bool:
    """A case/view is finished when its properties JSON exists (written after the arrays)."""
    return properties_file(folder, case, view).is_file() and image_file(folder, case, view).is_file()
