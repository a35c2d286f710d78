"""Batch sources: how one batch is made (which cases, which patches, which transforms).

A source is a plain, picklable object with ``make_batch(index, rng, tracker) -> dict``; the loader
(:mod:`orthonet.training.data.loader`) runs it in-process or in worker processes. Three kinds:

* :class:`SegBatchSource` — one view's patch + label map (segmentation training), foreground oversampling.
* :class:`MultiviewBatchSource` — per case one patch per view (dict keyed by view, each view its own patch
  size), the segmentation view with foreground oversampling and its labels when the case is labelled, the other
  views centre crops with jitter; plus the diagnosis vector (NaN = unknown) and ``has_seg`` (diagnosis and
  multitask training).
  With ``whole_views`` (whole-exam diagnosis) each of those views instead comes whole: ``whole`` {view: (B, C,
  *S)} zero-padded to the encoder's total stride and the batch's largest exam, ``whole_shape`` {view: (B, ndim)}
  the unpadded sizes (see :mod:`orthonet.networks.whole_exam`).
* :class:`ImageBatchSource` — one view's image patches of labelled and unlabeled cases (diffusion pretraining).

``index`` is the batch number: in ``sequential`` mode it selects the cases (validation: every case once, in
order); in random mode cases are drawn with ``rng``. Every array read happens inside ``tracker.loading(case,
view)`` so that a failure, or a worker killed mid-read, is reported with the case and view it was reading.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Set

import numpy as np
import torch

from orthonet.errors import OrthoError
from orthonet.training.data.dataset import PreprocessedCaseStore
from orthonet.training.data.sampling import (center_bbox, foreground_bbox, need_to_pad, oversample_this_sample,
                                             parse_class_locations, random_bbox)


class LoadTracker:
    """Remembers which case/view is being read. In a worker it mirrors that into shared memory, so the parent can
    name the case even when the worker is killed by a signal."""

    def __init__(self, shared=None):
        self.case: Optional[str] = None
        self.view: Optional[str] = None
        self._shared = shared

    @contextlib.contextmanager
    def loading(self, case: str, view: Optional[str]) -> Iterator[None]:
        self.case, self.view = case, view
        if self._shared is not None:
            self._shared.value = f"{case}\t{view or ''}".encode("utf-8", "replace")[:1000]
        yield  # on an exception we deliberately keep case/view set: that is what the error report names
        self.case, self.view = None, None
        if self._shared is not None:
            self._shared.value = b""


def _collate(samples: List[Any]) -> Any:
    """Stack per-sample tensors into a batch (lists, e.g. deep-supervision pyramids, element-wise)."""
    first = samples[0]
    if isinstance(first, torch.Tensor):
        return torch.stack(samples)
    if isinstance(first, (list, tuple)):
        return [torch.stack([s[i] for s in samples]) for i in range(len(first))]
    raise TypeError(f"cannot collate {type(first).__name__}")


def _fill_like(seg: Any, value: int) -> Any:
    if isinstance(seg, (list, tuple)):
        return [torch.full_like(s, value) for s in seg]
    return torch.full_like(seg, value)


class BatchSource:
    """Base class: case selection (random or sequential) and the batch size."""

    kind = "base"

    def __init__(self, store: PreprocessedCaseStore, cases: Sequence[str], batch_size: int,
                 sequential: bool = False):
        if not cases:
            raise OrthoError(f"no cases to load for this {self.kind} loader", store.folder,
                             fix="check the split, the label fraction and that preprocessing finished")
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1 (got {batch_size})")
        self.store = store
        self.cases = list(cases)
        self.batch_size = int(batch_size)
        self.sequential = sequential

    def num_batches(self) -> Optional[int]:
        """Batches per pass in sequential mode; None (infinite) in random mode."""
        if not self.sequential:
            return None
        return (len(self.cases) + self.batch_size - 1) // self.batch_size

    def cases_for(self, index: int, rng: np.random.Generator) -> List[str]:
        if self.sequential:
            return self.cases[index * self.batch_size:(index + 1) * self.batch_size]
        return [self.cases[i] for i in rng.integers(0, len(self.cases), self.batch_size)]

    def make_batch(self, index: int, rng: np.random.Generator, tracker: Optional[LoadTracker] = None
                   ) -> Dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError


class SegBatchSource(BatchSource):
    """Patches of one view with their label maps; the last third of each batch centred on foreground."""

    kind = "seg"

    def __init__(self, store: PreprocessedCaseStore, cases: Sequence[str], view: str, batch_size: int,
                 patch_size: Sequence[int], sample_patch_size: Optional[Sequence[int]] = None, transforms=None,
                 oversample_foreground: float = 0.33, ignore_label: Optional[int] = None,
                 sequential: bool = False, center_crop: bool = False):
        super().__init__(store, cases, batch_size, sequential)
        missing = [c for c in self.cases if not store.has_seg(c, view)]
        if missing:
            raise OrthoError(f"{len(missing)} case(s) have no segmentation for view '{view}': "
                             f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}", store.folder,
                             fix="segmentation training needs labelled cases; pass only labelled cases")
        self.view = view
        self.patch_size = tuple(int(p) for p in patch_size)
        self.sample_patch_size = tuple(int(p) for p in (sample_patch_size or patch_size))
        # a 2-D configuration samples (1, y, x) slabs of the 3-D volume and drops the slice axis (as nnU-Net)
        self.is_2d = len(self.patch_size) == 2
        if self.is_2d:
            self.patch_size, self.sample_patch_size = (1, *self.patch_size), (1, *self.sample_patch_size)
        self.pad = need_to_pad(self.sample_patch_size, self.patch_size)
        self.transforms = transforms
        self.oversample_foreground = float(oversample_foreground)
        self.exclude = () if ignore_label is None else (int(ignore_label),)
        self.center_crop = center_crop

    def _bbox(self, arrays, j: int, rng: np.random.Generator):
        shape = arrays.shape
        if self.center_crop:
            return center_bbox(shape, self.sample_patch_size)
        if oversample_this_sample(j, self.batch_size, self.oversample_foreground, rng):
            locs = parse_class_locations(arrays.properties, len(shape), exclude=self.exclude)
            bbox = foreground_bbox(shape, self.sample_patch_size, self.pad, locs, rng)
            if bbox is not None:
                return bbox
        return random_bbox(shape, self.sample_patch_size, self.pad, rng)

    def make_batch(self, index, rng, tracker=None):
        tracker = tracker or LoadTracker()
        images, segs, keys = [], [], []
        for j, case in enumerate(self.cases_for(index, rng)):
            with tracker.loading(case, self.view):
                arrays = self.store.open(case, self.view)
                bbox = self._bbox(arrays, j, rng)
                img = torch.from_numpy(arrays.crop_image(bbox))
                seg = torch.from_numpy(arrays.crop_seg(bbox))
                if self.is_2d:
                    img, seg = img[:, 0], seg[:, 0]
                if self.transforms is not None:
                    out = self.transforms(image=img, segmentation=seg)
                    img, seg = out["image"], out["segmentation"]
            images.append(img)
            segs.append(seg)
            keys.append(case)
        return {"data": torch.stack(images).float(), "target": _collate(segs), "keys": keys}


class ImageBatchSource(BatchSource):
    """Random image patches of one view (no labels): diffusion pretraining."""

    kind = "images"

    def __init__(self, store: PreprocessedCaseStore, cases: Sequence[str], view: str, batch_size: int,
                 patch_size: Sequence[int], transforms=None, sequential: bool = False, center_crop: bool = False):
        super().__init__(store, cases, batch_size, sequential)
        self.view = view
        self.patch_size = tuple(int(p) for p in patch_size)
        self.is_2d = len(self.patch_size) == 2
        if self.is_2d:
            self.patch_size = (1, *self.patch_size)
        self.transforms = transforms
        self.center_crop = center_crop

    def make_batch(self, index, rng, tracker=None):
        tracker = tracker or LoadTracker()
        images, keys = [], []
        zero_pad = np.zeros(len(self.patch_size), dtype=int)
        for case in self.cases_for(index, rng):
            with tracker.loading(case, self.view):
                arrays = self.store.open(case, self.view, with_seg=False)
                bbox = center_bbox(arrays.shape, self.patch_size) if self.center_crop else \
                    random_bbox(arrays.shape, self.patch_size, zero_pad, rng)
                img = torch.from_numpy(arrays.crop_image(bbox))
                if self.is_2d:
                    img = img[:, 0]
                if self.transforms is not None:
                    img = self.transforms(image=img)["image"]
            images.append(img)
            keys.append(case)
        return {"data": torch.stack(images).float(), "keys": keys}


class AlignedContext:
    """Per other view, a crop centred on the segmentation patch's physical centre, its index->physical affine and
    its image extent (``--fuse-views``), gathered sample by sample and stacked by :meth:`batch_entries`.

    A view the exam lacks gets a zero crop, the segmentation patch's affine and :data:`EMPTY_EXTENT`, so the fusion
    gives it zeros and coverage 0 exactly as prediction does for a view it is not given.
    """

    def __init__(self, store: PreprocessedCaseStore, seg_view: str, views: Sequence[str],
                 patch_sizes: Dict[str, Sequence[int]], channels_of: Callable[[str], int]):
        self.store, self.seg_view = store, seg_view
        self.views = [v for v in views if v != seg_view]
        self.patch_sizes = {v: tuple(int(p) for p in patch_sizes[v]) for v in self.views}
        self.channels_of = channels_of
        self.context: Dict[str, List[torch.Tensor]] = {v: [] for v in self.views}
        self.present: Dict[str, List[bool]] = {v: [] for v in self.views}
        self.extents: Dict[str, List[np.ndarray]] = {v: [] for v in self.views}
        self.affines: Dict[str, List[np.ndarray]] = {v: [] for v in [seg_view, *self.views]}

    def add(self, case: str, bbox: Optional[Sequence[Sequence[int]]], seg_properties: Optional[Dict],
            tracker: LoadTracker) -> None:
        """One sample: the segmentation patch ``bbox`` of an array with ``seg_properties`` (None: no patch)."""
        from orthonet.networks.cross_view import EMPTY_EXTENT, crop_extent, patch_affine, \
            preprocessed_index_to_physical
        from orthonet.training.data.sampling import aligned_bbox, patch_center_physical
        center, seg_patch = None, np.eye(4)
        if bbox is not None and seg_properties is not None:
            seg_affine = preprocessed_index_to_physical(seg_properties)
            seg_patch = patch_affine(seg_affine, [b[0] for b in bbox])
            center = patch_center_physical(seg_affine, bbox)
        self.affines[self.seg_view].append(seg_patch)
        for v in self.views:
            patch = self.patch_sizes[v]
            if center is None or not self.store.has_view(case, v):
                self.context[v].append(torch.zeros((self.channels_of(v), *patch)))
                self.present[v].append(False)
                self.affines[v].append(seg_patch)
                self.extents[v].append(EMPTY_EXTENT)
                continue
            with tracker.loading(case, v):
                other = self.store.open(case, v, with_seg=False)
                a = preprocessed_index_to_physical(other.properties)
                vb = aligned_bbox(a, center, patch)
                self.context[v].append(torch.from_numpy(other.crop_image(vb)))
                self.present[v].append(True)
                self.affines[v].append(patch_affine(a, [b[0] for b in vb]))
                self.extents[v].append(crop_extent(vb, other.shape))

    def batch_entries(self) -> Dict[str, Any]:
        """``context`` {view: (B, C, *patch)}, ``context_present`` {view: (B,)}, ``affines`` {view: (B, 4, 4)
        float64, the segmentation view included}, ``extents`` {view: (B, 3, 2) int64}."""
        return {"context": {v: torch.stack(t).float() for v, t in self.context.items()},
                "context_present": {v: torch.tensor(p, dtype=torch.bool) for v, p in self.present.items()},
                "affines": {v: torch.from_numpy(np.stack(a)) for v, a in self.affines.items()},
                "extents": {v: torch.from_numpy(np.stack(e)) for v, e in self.extents.items()}}


class MultiviewBatchSource(BatchSource):
    """One patch per view and case, the diagnosis vector and the segmentation of the segmentation view.

    ``patch_sizes``/``sample_patch_sizes``/``transforms`` are dicts keyed by view. ``diagnoses`` maps case ->
    vector (NaN unknown); ``keep_labels`` (label fraction) restricts which cases keep their labels — the others
    get NaN diagnoses and ``has_seg`` False. A case missing a view gets a zero patch and ``present[view]``
    False, so the trainer can learn (and be tested) with missing views. ``center_crop`` makes every crop the
    deterministic centre crop (validation). ``aligned_views`` (``--fuse-views`` multitask) adds, per sample, those
    views' crops centred on the segmentation patch in physical space (:class:`AlignedContext`: ``context``,
    ``context_present``, ``affines``, ``extents``); the segmentation view's transforms must then be intensity-only.
    """

    kind = "multiview"

    def __init__(self, store: PreprocessedCaseStore, cases: Sequence[str], views: Sequence[str],
                 segmentation_view: Optional[str], batch_size: int, patch_sizes: Dict[str, Sequence[int]],
                 sample_patch_sizes: Optional[Dict[str, Sequence[int]]] = None,
                 transforms: Optional[Dict[str, Any]] = None, diagnoses: Optional[Dict[str, np.ndarray]] = None,
                 n_diagnoses: int = 0, keep_labels: Optional[Set[str]] = None, oversample_foreground: float = 0.33,
                 jitter: float = 0.1, ignore_label: Optional[int] = None, sequential: bool = False,
                 center_crop: bool = False, whole_views: Sequence[str] = (),
                 whole_strides: Optional[Dict[str, Sequence[int]]] = None,
                 max_whole_shape: Optional[Dict[str, Sequence[int]]] = None, whole_intensity_jitter: float = 0.0,
                 aligned_views: Sequence[str] = (), aligned_patch_sizes: Optional[Dict[str, Sequence[int]]] = None):
        super().__init__(store, cases, batch_size, sequential)
        if aligned_views and segmentation_view is None:
            raise OrthoError("cross-view fusion (--fuse-views) needs a segmentation view to align the views to")
        self.aligned_views = [v for v in aligned_views if v != segmentation_view]
        self.aligned_patch_sizes = {v: tuple(int(p) for p in (aligned_patch_sizes or patch_sizes)[v])
                                    for v in self.aligned_views}
        self.whole_views = list(whole_views)
        self.whole_strides = {v: tuple(int(s) for s in (whole_strides or {}).get(v, (1, 1, 1)))
                              for v in self.whole_views}
        self.max_whole_shape = {v: tuple(int(s) for s in m) for v, m in (max_whole_shape or {}).items()}
        self.whole_intensity_jitter = float(whole_intensity_jitter)
        # patches are only cut for views not read whole, and for the segmentation view (its loss needs patches)
        self.views = [v for v in views if v not in self.whole_views]
        if segmentation_view is not None and segmentation_view not in self.views:
            self.views.append(segmentation_view)
        self.seg_view = segmentation_view
        self.patch_sizes = {v: tuple(int(p) for p in patch_sizes[v]) for v in self.views}
        if any(len(p) != 3 for p in self.patch_sizes.values()):
            raise OrthoError("multi-view loading needs 3-D patch sizes for every view (use a 3-D configuration)")
        sample = sample_patch_sizes or {}
        self.sample_patch_sizes = {v: tuple(int(p) for p in sample.get(v, self.patch_sizes[v])) for v in self.views}
        self.transforms = transforms or {}
        self.diagnoses = diagnoses or {}
        if self.diagnoses and not n_diagnoses:
            n_diagnoses = len(np.atleast_1d(next(iter(self.diagnoses.values()))))
        self.n_diagnoses = int(n_diagnoses)
        self.keep_labels = None if keep_labels is None else set(keep_labels)
        self.oversample_foreground = float(oversample_foreground)
        self.jitter = float(jitter)
        self.exclude = () if ignore_label is None else (int(ignore_label),)
        self.center_crop = center_crop
        self._channels: Dict[str, int] = {}

    def _labels_kept(self, case: str) -> bool:
        return self.keep_labels is None or case in self.keep_labels

    def _num_channels(self, view: str) -> int:
        if view not in self._channels:
            for c in self.store.cases(views=[view]):
                self._channels[view] = int(self.store.open(c, view, with_seg=False).data.shape[0])
                break
            else:
                raise OrthoError(f"no case has view '{view}' in the preprocessed data", self.store.folder)
        return self._channels[view]

    def _view_sample(self, case: str, view: str, j: int, rng: np.random.Generator, tracker: LoadTracker):
        """(image, label map or None, view present, labels used, (bbox, properties) of the crop or None)."""
        final, sample = self.patch_sizes[view], self.sample_patch_sizes[view]
        is_seg_view = view == self.seg_view
        if not self.store.has_view(case, view):
            # a zero patch pushed through the same transforms, so shapes (and deep-supervision lists) match
            img = torch.zeros((self._num_channels(view), *sample), dtype=torch.float32)
            seg = torch.zeros((1, *sample), dtype=torch.int16) if is_seg_view else None
            t = self.transforms.get(view)
            if t is not None:
                out = t(image=img, segmentation=seg) if seg is not None else t(image=img)
                img, seg = out["image"], out.get("segmentation")
            return torch.zeros_like(img), (_fill_like(seg, -1) if seg is not None else None), False, False, None
        with tracker.loading(case, view):
            use_seg = is_seg_view and self._labels_kept(case) and self.store.has_seg(case, view)
            arrays = self.store.open(case, view, with_seg=use_seg)
            shape = arrays.shape
            bbox = None
            if self.center_crop:
                bbox = center_bbox(shape, sample)
            elif is_seg_view:
                pad = need_to_pad(sample, final)
                if use_seg and oversample_this_sample(j, self.batch_size, self.oversample_foreground, rng):
                    locs = parse_class_locations(arrays.properties, len(shape), exclude=self.exclude)
                    bbox = foreground_bbox(shape, sample, pad, locs, rng)
                if bbox is None:
                    bbox = random_bbox(shape, sample, pad, rng)
            else:
                bbox = center_bbox(shape, sample, self.jitter, rng) if self.jitter > 0 else center_bbox(shape, sample)
            img = torch.from_numpy(arrays.crop_image(bbox))
            seg = None
            if is_seg_view:
                # unlabelled: push a dummy map through the transforms to get the right shapes, then mark all -1
                seg = torch.from_numpy(arrays.crop_seg(bbox)) if use_seg else \
                    torch.zeros((1, *img.shape[1:]), dtype=torch.int16)
            t = self.transforms.get(view)
            if t is not None:
                out = t(image=img, segmentation=seg) if seg is not None else t(image=img)
                img, seg = out["image"], out.get("segmentation")
            if is_seg_view and not use_seg:
                seg = _fill_like(seg, -1)
        return img, seg, True, use_seg, (bbox, arrays.properties)

    def _whole_sample(self, case: str, view: str, rng: np.random.Generator, tracker: LoadTracker):
        """(C, *S) float32 whole volume (cut to ``max_whole_shape`` at a random place in training, centred in
        validation), or None when the case lacks the view."""
        if not self.store.has_view(case, view):
            return None
        with tracker.loading(case, view):
            arrays = self.store.open(case, view, with_seg=False)
            shape = arrays.shape
            cap = self.max_whole_shape.get(view)
            if cap is not None and any(n > c for n, c in zip(shape, cap)):
                size = [min(n, c) for n, c in zip(shape, cap)]
                if self.center_crop:
                    bbox = center_bbox(shape, size)
                else:
                    lo = [int(rng.integers(0, n - k + 1)) for n, k in zip(shape, size)]
                    bbox = [[a, a + k] for a, k in zip(lo, size)]
            else:
                bbox = [[0, n] for n in shape]
            img = torch.from_numpy(arrays.crop_image(bbox))
        if self.whole_intensity_jitter > 0 and not self.center_crop:
            j = self.whole_intensity_jitter
            img = img * float(1.0 + rng.normal(0, j)) + float(rng.normal(0, j))
        return img

    def _whole_batch(self, cases: List[str], rng: np.random.Generator, tracker: LoadTracker) -> Dict[str, Any]:
        from orthonet.networks.whole_exam import pad_to_stride, padded_shape
        whole, shapes, present = {}, {}, {}
        for view in self.whole_views:
            vols = [self._whole_sample(c, view, rng, tracker) for c in cases]
            stride = self.whole_strides[view]
            given = [v for v in vols if v is not None]
            channels = given[0].shape[0] if given else self._num_channels(view)
            sizes = [list(v.shape[1:]) if v is not None else [0, 0, 0] for v in vols]
            target = padded_shape([max(1, max(s[a] for s in sizes)) for a in range(3)], stride)
            batch = torch.zeros((len(cases), channels, *target), dtype=torch.float32)
            for i, v in enumerate(vols):
                if v is not None:
                    batch[i] = pad_to_stride(v[None].float(), stride, target)[0]
            whole[view] = batch
            shapes[view] = torch.tensor(sizes, dtype=torch.long)
            present[view] = torch.tensor([v is not None for v in vols], dtype=torch.bool)
        return {"whole": whole, "whole_shape": shapes, "whole_present": present}

    def make_batch(self, index, rng, tracker=None):
        tracker = tracker or LoadTracker()
        cases = self.cases_for(index, rng)
        data: Dict[str, List[torch.Tensor]] = {v: [] for v in self.views}
        present: Dict[str, List[bool]] = {v: [] for v in self.views}
        segs, has_seg, diag = [], [], []
        aligned = AlignedContext(self.store, self.seg_view, self.aligned_views, self.aligned_patch_sizes,
                                 self._num_channels) if self.aligned_views else None
        for j, case in enumerate(cases):
            case_has_seg = False
            for view in self.views:
                img, seg, ok, used, where = self._view_sample(case, view, j, rng, tracker)
                data[view].append(img)
                present[view].append(ok)
                if view == self.seg_view:
                    segs.append(seg)
                    case_has_seg = used
                    if aligned is not None:
                        bbox, props = where if where is not None else (None, None)
                        aligned.add(case, bbox, props, tracker)
            has_seg.append(case_has_seg)
            vec = np.full(self.n_diagnoses, np.nan, dtype=np.float32)
            if self._labels_kept(case) and case in self.diagnoses:
                vec[:] = np.asarray(self.diagnoses[case], dtype=np.float32)
            diag.append(torch.from_numpy(vec))
        batch: Dict[str, Any] = {
            "data": {v: torch.stack(data[v]).float() for v in self.views},
            "present": {v: torch.tensor(present[v], dtype=torch.bool) for v in self.views},
            "diagnosis": torch.stack(diag) if diag else torch.zeros((0, self.n_diagnoses)),
            "has_seg": torch.tensor(has_seg, dtype=torch.bool),
            "keys": list(cases),
        }
        if self.seg_view is not None:
            batch["target"] = _collate(segs)
        if aligned is not None:
            batch.update(aligned.batch_entries())
        if self.whole_views:
            extra = self._whole_batch(list(cases), rng, tracker)
            batch["whole"], batch["whole_shape"] = extra["whole"], extra["whole_shape"]
            batch["present"].update(extra["whole_present"])
        return batch


class AlignedViewsBatchSource(SegBatchSource):
    """Segmentation patches of the segmentation view plus, per other view, a crop centred on the same physical
    point, and every crop's index->physical affine and image extent (``--fuse-views``, see :class:`AlignedContext`).

    Spatial augmentation would break the physical correspondence between the views, so the transforms given here
    must be intensity-only (see :func:`orthonet.training.data.augmentation.build_intensity_only_transforms`).
    Batch: ``data`` (segmentation view), ``target``, ``context`` {view: (B, C, *patch)}, ``present`` {view: (B,)},
    ``affines`` {view: (B, 4, 4) float64, the segmentation view included}, ``extents`` {view: (B, 3, 2)}, ``keys``.
    """

    kind = "aligned"

    def __init__(self, store: PreprocessedCaseStore, cases: Sequence[str], view: str, other_views: Sequence[str],
                 batch_size: int, patch_size: Sequence[int], other_patch_sizes: Dict[str, Sequence[int]],
                 transforms=None, oversample_foreground: float = 0.33, ignore_label: Optional[int] = None,
                 sequential: bool = False, center_crop: bool = False):
        super().__init__(store, cases, view, batch_size, patch_size, None, transforms, oversample_foreground,
                         ignore_label, sequential, center_crop)
        if self.is_2d:
            raise OrthoError("--fuse-views needs a 3-D configuration")
        self.other_views = [v for v in other_views if v != view]
        self.other_patch_sizes = {v: tuple(int(p) for p in other_patch_sizes[v]) for v in self.other_views}
        self._channels: Dict[str, int] = {}

    def _channels_of(self, view: str) -> int:
        if view not in self._channels:
            case = next(iter(self.store.cases(views=[view])), None)
            if case is None:
                raise OrthoError(f"no case has view '{view}' in the preprocessed data", self.store.folder)
            self._channels[view] = int(self.store.open(case, view, with_seg=False).data.shape[0])
        return self._channels[view]

    def make_batch(self, index, rng, tracker=None):
        tracker = tracker or LoadTracker()
        images, segs, keys = [], [], []
        aligned = AlignedContext(self.store, self.view, self.other_views, self.other_patch_sizes,
                                 self._channels_of)
        for j, case in enumerate(self.cases_for(index, rng)):
            with tracker.loading(case, self.view):
                arrays = self.store.open(case, self.view)
                bbox = self._bbox(arrays, j, rng)
                img = torch.from_numpy(arrays.crop_image(bbox))
                seg = torch.from_numpy(arrays.crop_seg(bbox))
                if self.transforms is not None:
                    out = self.transforms(image=img, segmentation=seg)
                    img, seg = out["image"], out["segmentation"]
            aligned.add(case, bbox, arrays.properties, tracker)
            images.append(img)
            segs.append(seg)
            keys.append(case)
        entries = aligned.batch_entries()
        entries["present"] = entries.pop("context_present")
        return {"data": torch.stack(images).float(), "target": _collate(segs), "keys": keys, **entries}
