"""On-disk format of preprocessed cases: blosc2 arrays plus one JSON of properties per case and view.

Layout inside ``$ORTHO_preprocessed/DatasetXXX_Name/<data_identifier>/``::

    {case}_{view}.b2nd        float32 (C, z, y, x), normalised image at the plan's spacing and orientation
    {case}_{view}_seg.b2nd    int16 (1, z, y, x) label map (segmentation view of labelled cases only);
                              -1 marks voxels outside the nonzero crop region, as nnU-Net does
    {case}_{view}.json        properties: split, original geometry, transpose, crop box, class locations ...

Why blosc2: compressed, fast, and sliceable without decompressing the whole volume, so a data loader can cut a
patch out of a large case cheaply. Each file is written under a temporary name and renamed, so a killed
preprocessing run never leaves a half-written case that a later run would mistake for a finished one (the JSON is
written last and marks completion).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import blosc2
import numpy as np

from orthonet.errors import OrthoError
from orthonet.fileio import dumps_readable, load_json, save_text

PathLike = Union[str, Path]
_CPARAMS = {"codec": blosc2.Codec.ZSTD, "clevel": 3}


def case_stem(case: str, view: str) -> str:
    return f"{case}_{view}"


def image_file(folder: PathLike, case: str, view: str) -> Path:
    return Path(folder) / f"{case_stem(case, view)}.b2nd"


def seg_file(folder: PathLike, case: str, view: str) -> Path:
    return Path(folder) / f"{case_stem(case, view)}_seg.b2nd"


def properties_file(folder: PathLike, case: str, view: str) -> Path:
    return Path(folder) / f"{case_stem(case, view)}.json"


def save_array(array: np.ndarray, path: PathLike) -> None:
    """Write a blosc2 array atomically (temporary name, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.b2nd")
    try:
        blosc2.asarray(np.ascontiguousarray(array), urlpath=str(tmp), mode="w", cparams=_CPARAMS)
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
        arr = blosc2.open(str(path), mode="r")
    except Exception as e:  # blosc2 raises several types for corrupt files
        raise OrthoError(f"preprocessed array is corrupt ({e})", path,
                         fix="delete it and rerun `ortho_plan_and_preprocess`") from None
    return arr[:] if load else arr


def save_case(folder: PathLike, case: str, view: str, data: np.ndarray, seg: Optional[np.ndarray],
              properties: Dict) -> None:
    """Store one preprocessed case/view. The properties JSON is written last: its presence means 'complete'."""
    save_array(data.astype(np.float32, copy=False), image_file(folder, case, view))
    if seg is not None:
        save_array(seg.astype(np.int16, copy=False), seg_file(folder, case, view))
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
