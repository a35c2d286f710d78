"""Raw case -> preprocessed arrays: transpose, crop, normalise, resample, sample class locations, store.

Order of operations (export undoes them in reverse): the plan's transpose (thick axis first) -> crop to the nonzero
bounding box -> normalisation -> resampling to the configuration's spacing. Normalising *before* resampling is
nnU-Net's choice and ours: the nonzero mask used by ``use_mask_for_norm`` is exact only on the original grid.
Everything is read from the plans dictionary (that is, from plans.json), never re-derived from the data.

:func:`preprocess_case` is the single-case entry point used at inference on raw test images (no label);
:func:`preprocess_labelled_case` adds a label map; :func:`preprocess_dataset` runs them over imagesTr and
imagesUnlabeled in parallel, skipping finished cases.
"""
from __future__ import annotations

import logging
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from orthonet.dataset import DatasetSpec
from orthonet.errors import OrthoError
from orthonet.fileio import load_json
from orthonet.imageio import Geometry, read_channels
from orthonet.planners.fingerprint import case_seed, read_label
from orthonet.planners.plans import configuration, data_folder, preprocessing_hash, view_plan
from orthonet.preprocessing import storage
from orthonet.preprocessing.crop import crop_to_nonzero
from orthonet.preprocessing.normalize import normalize
from orthonet.preprocessing.parallel import run_parallel
from orthonet.preprocessing.resample import compute_new_shape, policy_from_plan, resample_image, resample_labels

PathLike = Union[str, Path]
ImagesInput = Union[Sequence[PathLike], Mapping[str, Sequence[PathLike]], Tuple[np.ndarray, Geometry]]

#: Class locations kept per class (at least 1% of the class's voxels), as nnU-Net.
CLASS_LOCATION_SAMPLES = 10000
CLASS_LOCATION_MIN_FRACTION = 0.01
#: Splits that are preprocessed to disk (test images never are).
SPLITS = ("Tr", "Unlabeled")


def sample_class_locations(seg: np.ndarray, classes: Sequence[int], seed: int) -> Dict[str, List[List[int]]]:
    """Up to :data:`CLASS_LOCATION_SAMPLES` voxel coordinates (z, y, x) per class, for foreground oversampling."""
    rng = np.random.default_rng(seed)
    seg = seg[0] if seg.ndim == 4 else seg
    out: Dict[str, List[List[int]]] = {}
    for c in classes:
        flat = np.flatnonzero(seg == c)
        if flat.size == 0:
            out[str(c)] = []
            continue
        n = min(CLASS_LOCATION_SAMPLES, flat.size)
        n = max(n, int(np.ceil(flat.size * CLASS_LOCATION_MIN_FRACTION)))
        pick = np.sort(rng.choice(flat.size, n, replace=False))
        coords = np.stack(np.unravel_index(flat[pick], seg.shape), 1)
        out[str(c)] = coords.astype(int).tolist()
    return out


def location_classes(plans: Dict) -> List[int]:
    """Foreground classes to sample; with an ignore label also background (to sample annotated voxels)."""
    labels = plans.get("labels", {})
    values = sorted(v for k, v in labels.items() if k != "ignore")
    if "ignore" in labels:
        return values
    return [v for v in values if v != 0]


def _target_spacing(cfg_spacing: Sequence[float], spacing_t: Sequence[float]) -> List[float]:
    """A 2D configuration keeps the case's own spacing along axis 0 (slices are not resampled)."""
    if len(cfg_spacing) == 2:
        return [float(spacing_t[0])] + [float(s) for s in cfg_spacing]
    return [float(s) for s in cfg_spacing]


def preprocess_arrays(data: np.ndarray, geometry: Geometry, seg: Optional[np.ndarray], plans: Dict, view: str,
                      config: str, case: str = "", split: str = "Ts") -> Tuple[np.ndarray, Optional[np.ndarray], Dict]:
    """Preprocess (C, z, y, x) ``data`` on ``geometry`` (and an optional (1, z, y, x) label map)."""
    vp = view_plan(plans, view)
    cfg = configuration(plans, view, config)
    if data.ndim == 3:
        data = data[None]
    if data.shape[0] != int(vp["num_input_channels"]):
        raise OrthoError(f"view '{view}' of case '{case}' has {data.shape[0]} channel(s), the plans expect "
                         f"{vp['num_input_channels']}", fix="provide every channel file of the view")
    if seg is not None and seg.ndim == 3:
        seg = seg[None]
    fwd = [int(a) for a in vp["transpose_forward"]]
    data = data.transpose([0] + [a + 1 for a in fwd]).astype(np.float32, copy=False)
    if seg is not None:
        seg = seg.transpose([0] + [a + 1 for a in fwd])
    spacing_t = [float(geometry.array_spacing[a]) for a in fwd]
    shape_before = [int(s) for s in data.shape[1:]]

    data, seg, bbox, mask = crop_to_nonzero(data, seg)
    shape_after_crop = [int(s) for s in data.shape[1:]]
    data = normalize(data, vp["normalization"], mask)

    target = _target_spacing(cfg["spacing"], spacing_t)
    new_shape = compute_new_shape(shape_after_crop, spacing_t, target)
    policy = policy_from_plan(cfg["resampling"], spacing_t, target)
    data = resample_image(data, new_shape, policy["image_order"], policy["order_z"], policy["z_axis"])
    properties = {
        "case": case, "view": view, "split": split, "configuration": config,
        "plans_name": plans.get("plans_name"),
        "preprocessing_hash": preprocessing_hash(plans, view, config),
        "original_geometry": geometry.to_dict(),
        "transpose_forward": fwd,
        "transpose_backward": [int(a) for a in vp["transpose_backward"]],
        "shape_before_crop": shape_before,
        "bbox_used_for_cropping": [[int(a), int(b)] for a, b in bbox],
        "shape_after_crop": shape_after_crop,
        "spacing_after_crop": spacing_t,
        "target_spacing": target,
        "shape_after_resampling": [int(s) for s in new_shape],
        "resampling_used": {"image_order": policy["image_order"], "label_order": policy["label_order"],
                            "order_z": policy["order_z"], "z_axis": policy["z_axis"]},
    }
    if seg is not None:
        seg = resample_labels(seg.astype(np.int16, copy=False), new_shape, policy["label_order"], policy["order_z"],
                              policy["z_axis"])
        properties["class_locations"] = sample_class_locations(seg, location_classes(plans),
                                                               case_seed(case, view))
    return data, seg, properties


def _read_images(images: ImagesInput, view: str) -> Tuple[np.ndarray, Geometry]:
    if isinstance(images, tuple) and len(images) == 2 and isinstance(images[1], Geometry):
        return np.asarray(images[0], dtype=np.float32), images[1]
    if isinstance(images, Mapping):
        if view not in images:
            raise OrthoError(f"no images given for view '{view}' (given: {sorted(images)})")
        images = images[view]
    return read_channels([str(p) for p in images])


def preprocess_case(images: ImagesInput, plans: Dict, view: str, config: str, case: str = "",
                    split: str = "Ts") -> Tuple[np.ndarray, Dict]:
    """Preprocess one image (no label), e.g. a raw test image at inference time.

    ``images``: the view's channel files, ``{view: channel files}`` or ``(array (C, z, y, x), Geometry)``.
    Returns (data float32 (C, z, y, x), properties); :mod:`orthonet.preprocessing.export` maps predictions back with the
    properties.
    """
    data, geometry = _read_images(images, view)
    data, _, properties = preprocess_arrays(data, geometry, None, plans, view, config, case, split)
    return data, properties


def preprocess_labelled_case(images: ImagesInput, label: Union[PathLike, np.ndarray], plans: Dict, view: str,
                             config: str, case: str = "", split: str = "Tr"
                             ) -> Tuple[np.ndarray, np.ndarray, Dict]:
    """Preprocess one image with its label map (a file on the image's grid, or a (z, y, x) array).

    Returns (data float32 (C, z, y, x), seg int16 (1, z, y, x), properties incl. class locations).
    """
    data, geometry = _read_images(images, view)
    if isinstance(label, np.ndarray):
        seg = label.astype(np.int16, copy=False)
        if tuple(seg.shape[-3:]) != tuple(data.shape[-3:]):
            raise OrthoError(f"label shape {seg.shape} does not match image shape {data.shape} (case '{case}')")
    else:
        first = images[view][0] if isinstance(images, Mapping) else \
            (images[0] if not isinstance(images, tuple) else "image")
        seg = read_label(str(label), geometry, str(first))
    return preprocess_arrays(data, geometry, seg, plans, view, config, case, split)


# ------------------------------------------------------------------------------------------------------------
# whole dataset
# ------------------------------------------------------------------------------------------------------------
def _run_one(paths: List[str], label: Optional[str], plans: Dict, view: str, config: str, case: str, split: str,
             out_folder: str) -> Tuple[int, ...]:
    """Worker: preprocess and store one case/view; returns the stored shape."""
    if label is None:
        data, props = preprocess_case(paths, plans, view, config, case, split)
        seg = None
    else:
        data, seg, props = preprocess_labelled_case(paths, label, plans, view, config, case, split)
    patch = plans["views"][view]["configurations"][config].get("patch_size")
    storage.save_case(out_folder, case, view, data, seg, props, patch)
    return tuple(int(s) for s in data.shape)


def is_up_to_date(folder: Path, case: str, view: str, expected_hash: str, needs_seg: bool) -> bool:
    """Finished and preprocessed with the current plan (a hand-edited plan makes stale cases redo)."""
    if not storage.is_complete(folder, case, view):
        return False
    if needs_seg and not storage.seg_file(folder, case, view).is_file():
        return False
    try:
        props = load_json(storage.properties_file(folder, case, view))
    except OrthoError:
        return False
    return props.get("preprocessing_hash") == expected_hash


@dataclass
class PreprocessSummary:
    """What :func:`preprocess_dataset` did, per configuration."""

    done: Dict[str, int] = field(default_factory=dict)
    skipped: Dict[str, int] = field(default_factory=dict)
    errors: Dict[Tuple[str, str, str], str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors


def preprocess_tasks(spec: DatasetSpec, plans: Dict, preprocessed_dir: Path, configs: Sequence[str],
                     overwrite: bool = False, views: Optional[Sequence[str]] = None) -> Tuple[List, Dict[str, int]]:
    tasks, skipped = [], {}
    for config in configs:
        skipped[config] = 0
        for view in views or spec.views:
            if config not in view_plan(plans, view)["configurations"]:
                continue
            folder = data_folder(preprocessed_dir, plans, view, config)
            expected = preprocessing_hash(plans, view, config)
            for split in SPLITS:
                for case in spec.cases(split):
                    label = None
                    if split == "Tr" and view == spec.segmentation_view and spec.has_label(case):
                        label = str(spec.label_path(case))
                    if not overwrite and is_up_to_date(folder, case, view, expected, label is not None):
                        skipped[config] += 1
                        continue
                    paths = [str(p) for p in spec.image_paths(case, view, split)]
                    tasks.append(((config, view, case),
                                  (paths, label, plans, view, config, case, split, str(folder))))
    return tasks, skipped


def preprocess_dataset(spec: DatasetSpec, plans: Dict, preprocessed_dir: PathLike, configs: Sequence[str],
                       pool: Optional[Executor] = None, overwrite: bool = False, progress: bool = True,
                       logger: Optional[logging.Logger] = None) -> PreprocessSummary:
    """Preprocess imagesTr and imagesUnlabeled of every view for ``configs``; a failing case is reported, not fatal.

    The caller decides what to do with ``summary.errors`` (the CLI exits non-zero after the rest finished).
    """
    log = logger or logging.getLogger("orthonet.preprocess")
    preprocessed_dir = Path(preprocessed_dir)
    tasks, skipped = preprocess_tasks(spec, plans, preprocessed_dir, configs, overwrite)
    summary = PreprocessSummary(skipped=skipped)
    for config in configs:
        n = sum(1 for (c, _, _), _ in tasks if c == config)
        log.info(f"preprocessing {config}: {n} case/view(s) to do, {skipped.get(config, 0)} already done")
    if tasks:
        results, errors = run_parallel(_run_one, tasks, pool, desc="preprocess", progress=progress)
        for (config, _, _) in results:
            summary.done[config] = summary.done.get(config, 0) + 1
        summary.errors = errors
    return summary
