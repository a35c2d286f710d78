"""Which preprocessed cases exist, and lazy access to their arrays.

Why lazy: a volume may be large and a training step only needs one patch of it; blosc2 decompresses only the
chunks a slice touches. The store itself holds paths and small property dicts only, so it pickles cheaply into
data-loading workers (also under the 'spawn' start method).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from orthonet.errors import OrthoError
from orthonet.preprocessing import storage

PathLike = Union[str, Path]
Bbox = Sequence[Sequence[int]]


@dataclass
class CaseArrays:
    """One case/view: lazy image (C, z, y, x), lazy seg (1, z, y, x) or None, and its properties."""

    case: str
    view: str
    data: object
    seg: Optional[object]
    properties: Dict
    image_path: Path
    seg_path: Optional[Path]

    @property
    def shape(self) -> Tuple[int, ...]:
        return tuple(int(s) for s in self.data.shape[1:])

    def crop_image(self, bbox: "Bbox") -> np.ndarray:
        """float32 (C, *patch) cut at ``bbox`` (half-open, spatial axes), zero outside the volume."""
        return read_crop(self.data, bbox, 0, np.float32, self.image_path)

    def crop_seg(self, bbox: "Bbox") -> np.ndarray:
        """int16 (1, *patch) label crop, -1 outside the volume (as outside the nonzero region)."""
        if self.seg is None:
            raise ValueError(f"case {self.case} view {self.view} has no segmentation")
        return read_crop(self.seg, bbox, -1, np.int16, self.seg_path)


class PreprocessedCaseStore:
    """The complete cases of one preprocessed folder (``<preprocessed>/DatasetXXX/<data_identifier>/``).

    A case/view is complete when ``orthonet.preprocessing.storage.is_complete`` says so (its properties JSON is written
    last). ``views`` are the views this run needs; ``segmentation_view`` (or None) holds the label maps.
    """

    def __init__(self, folder: PathLike, views: Sequence[str], segmentation_view: Optional[str] = None):
        self.folder = Path(folder)
        self.views = list(views)
        self.segmentation_view = segmentation_view
        if not self.folder.is_dir():
            raise OrthoError("preprocessed data folder not found", self.folder,
                             fix="run `ortho_plan_and_preprocess -d DATASET` for this configuration first")
        if segmentation_view is not None and segmentation_view not in self.views:
            self.views.append(segmentation_view)
        self._props: Dict[Tuple[str, str], Dict] = {}
        self._complete: Dict[str, set] = {v: set() for v in self.views}
        suffixes = {v: f"_{v}.json" for v in self.views}
        for p in sorted(self.folder.glob("*.json")):
            for view, suffix in suffixes.items():
                if p.name.endswith(suffix) and not p.name.startswith("."):
                    case = p.name[: -len(suffix)]
                    if case and storage.is_complete(self.folder, case, view):
                        self._complete[view].add(case)

    # ---- listing -----------------------------------------------------------------------------------------
    def cases(self, split: Optional[str] = None, views: Optional[Sequence[str]] = None,
              require_all: bool = True) -> List[str]:
        """Sorted cases that are complete for all (``require_all``) or any of ``views`` (default: all views),
        optionally only those whose properties say ``split`` ('Tr' or 'Unlabeled')."""
        views = list(views) if views is not None else self.views
        sets = [self._complete.get(v, set()) for v in views]
        if not sets:
            return []
        found = set.intersection(*sets) if require_all else set.union(*sets)
        if split is not None:
            found = {c for c in found if self.split_of(c, views) == split}
        return sorted(found)

    def has_view(self, case: str, view: str) -> bool:
        return case in self._complete.get(view, set())

    def labelled_cases(self) -> List[str]:
        """Cases with a segmentation of the segmentation view."""
        if self.segmentation_view is None:
            return []
        v = self.segmentation_view
        return sorted(c for c in self._complete[v] if storage.seg_file(self.folder, c, v).is_file())

    def split_of(self, case: str, views: Optional[Sequence[str]] = None) -> str:
        for v in views or self.views:
            if self.has_view(case, v):
                return str(self.properties(case, v).get("split", "Tr"))
        raise OrthoError(f"case '{case}' has no complete view in the preprocessed data", self.folder)

    # ---- access ------------------------------------------------------------------------------------------
    def properties(self, case: str, view: str) -> Dict:
        key = (case, view)
        if key not in self._props:
            self._props[key] = _load_properties(self.folder, case, view)
        return self._props[key]

    def has_seg(self, case: str, view: Optional[str] = None) -> bool:
        view = view or self.segmentation_view
        return view is not None and storage.seg_file(self.folder, case, view).is_file()

    def open(self, case: str, view: str, with_seg: bool = True) -> CaseArrays:
        """Open one case/view lazily; a missing or unreadable file raises OrthoError naming it."""
        if not self.has_view(case, view):
            raise OrthoError(f"case '{case}' view '{view}' is not in the preprocessed data",
                             storage.properties_file(self.folder, case, view),
                             fix="rerun `ortho_plan_and_preprocess` (an interrupted run leaves cases out)")
        props = self.properties(case, view)
        ifile = storage.image_file(self.folder, case, view)
        data = storage.open_array(ifile)
        seg = None
        sfile = storage.seg_file(self.folder, case, view)
        if with_seg:
            if sfile.is_file():
                seg = storage.open_array(sfile)
                if tuple(seg.shape[1:]) != tuple(data.shape[1:]):
                    raise OrthoError(f"segmentation shape {tuple(seg.shape)} does not match image shape "
                                     f"{tuple(data.shape)}", sfile,
                                     fix="delete the case's files and rerun `ortho_plan_and_preprocess`")
        return CaseArrays(case, view, data, seg, props, ifile, sfile if seg is not None else None)


def _load_properties(folder: Path, case: str, view: str) -> Dict:
    from orthonet.fileio import load_json
    props = load_json(storage.properties_file(folder, case, view), "preprocessed case properties")
    if not isinstance(props, dict):
        raise OrthoError("preprocessed case properties must be a JSON object",
                         storage.properties_file(folder, case, view),
                         fix="delete the case's files and rerun `ortho_plan_and_preprocess`")
    return props


def read_crop(array, bbox: Bbox, pad_value: float, dtype, path_hint: Path) -> np.ndarray:
    """Cut ``bbox`` (half-open, last len(bbox) axes) out of a (lazy) array, padding outside with ``pad_value``.

    Decompression errors of a damaged file surface here (blosc2 opens some damaged files fine and fails on the
    first slice); they become an OrthoError naming the file.
    """
    from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd
    try:
        out = crop_and_pad_nd(array, [list(b) for b in bbox], pad_value, cast_cropped_to=dtype)
    except OrthoError:
        raise
    except Exception as e:
        raise OrthoError(f"cannot read preprocessed array ({type(e).__name__}: {e})", path_hint,
                         fix="delete it and rerun `ortho_plan_and_preprocess`") from e
    return np.asarray(out, dtype=dtype)
