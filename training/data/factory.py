"""Loaders configured from plans.json — the wiring trainers would otherwise each repeat.

A configuration entry (``plans['views'][view]['configurations'][config]``) gives the patch size, batch size,
spacing and network strides; from those we derive the enlarged sampling patch, pseudo-2D augmentation and the
deep-supervision label pyramid. Every function returns a :class:`~orthonet.training.data.loader.BatchLoader`; pass
``num_workers=0`` to run in-process; extra keyword arguments (``start_method``, ``pin_memory``) go to it.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Set

import numpy as np

from orthonet.training.data.augmentation import (build_pretraining_transforms, build_training_transforms,
                                                 build_validation_transforms, deep_supervision_scales,
                                                 initial_patch_size, resolve_mirror_axes)
from orthonet.training.data.dataset import PreprocessedCaseStore
from orthonet.training.data.loader import BatchLoader
from orthonet.training.data.sources import ImageBatchSource, MultiviewBatchSource, SegBatchSource


def view_configuration(plans: Dict, view: str, configuration: str) -> Dict:
    """The plans entry of one view and configuration, with a clear error when it is missing."""
    from orthonet.planners.plans import configuration as plans_configuration
    return plans_configuration(plans, view, configuration)


def ds_scales_for(config: Dict) -> Optional[list]:
    """Deep-supervision scales from the configuration's network strides (None without strides)."""
    strides = ((config.get("network") or {}).get("kwargs") or {}).get("strides")
    return deep_supervision_scales(strides) if strides else None


def training_mirror_axes(plans: Dict, configuration: str, views: Sequence[str],
                         mirror_axes: Optional[Sequence[int]] = None, segmentation_view: Optional[str] = None,
                         whole_views: Sequence[str] = (), fuse_views: bool = False) -> Dict[str, List[int]]:
    """Per view, the spatial axes the training loaders below mirror, for the model description (nnU-Net's
    ``inference_allowed_mirroring_axes``): prediction must not mirror a view along an axis training never did.

    Nothing for ``--fuse-views`` (:func:`make_aligned_views_loader`: a flip breaks the physical alignment) and
    for views read only as whole volumes (``whole_views`` other than the segmentation view, whose patches are
    still cut and mirrored); else ``mirror_axes`` (None: every axis) within the view's patch dimensions."""
    out: Dict[str, List[int]] = {}
    for v in views:
        if fuse_views or (v in whole_views and v != segmentation_view):
            out[v] = []
        else:
            ndim = len(view_configuration(plans, v, configuration)["patch_size"])
            out[v] = list(resolve_mirror_axes(ndim, mirror_axes))
    return out


def make_seg_loader(store: PreprocessedCaseStore, cases: Sequence[str], plans: Dict, view: str, configuration: str,
                    train: bool = True, deep_supervision: bool = True, batch_size: Optional[int] = None,
                    oversample_foreground: float = 0.33, ignore_label: Optional[int] = None, padding_label: int = 0,
                    mirror_axes: Optional[Sequence[int]] = None, p_elastic: float = 0.0,
                    is_anisotropic: Optional[bool] = None, num_workers: int = 0, seed: int = 12345,
                    sequential: bool = False, timeout_s: float = 900.0, **loader_kwargs) -> BatchLoader:
    """Segmentation patches of ``view``: nnU-Net's sampling and augmentation when ``train``, else random
    foreground-oversampled patches without augmentation (online validation, as nnU-Net)."""
    cfg = view_configuration(plans, view, configuration)
    patch = [int(p) for p in cfg["patch_size"]]
    ds = ds_scales_for(cfg) if deep_supervision else None
    if train:
        sample = initial_patch_size(patch, cfg["spacing"], is_anisotropic)
        transforms = build_training_transforms(patch, cfg["spacing"], is_anisotropic, mirror_axes, ds, ignore_label,
                                               padding_label, p_elastic)
    else:
        sample = patch
        transforms = build_validation_transforms(None, ds, padding_label)
    source = SegBatchSource(store, cases, view, batch_size or int(cfg["batch_size"]), patch, sample, transforms,
                            oversample_foreground, ignore_label, sequential=sequential)
    return BatchLoader(source, num_workers=num_workers, seed=seed, timeout_s=timeout_s, **loader_kwargs)


def make_multiview_loader(store: PreprocessedCaseStore, cases: Sequence[str], plans: Dict, configuration: str,
                          views: Sequence[str], segmentation_view: Optional[str] = None,
                          diagnoses: Optional[Dict[str, np.ndarray]] = None, n_diagnoses: Optional[int] = None,
                          keep_labels: Optional[Set[str]] = None, train: bool = True, deep_supervision: bool = True,
                          batch_size: Optional[int] = None, oversample_foreground: float = 0.33, jitter: float = 0.1,
                          ignore_label: Optional[int] = None, padding_label: int = 0,
                          mirror_axes: Optional[Sequence[int]] = None, num_workers: int = 0, seed: int = 12345,
                          sequential: Optional[bool] = None, timeout_s: float = 900.0,
                          light_augmentation_views: Sequence[str] = (), whole_views: Sequence[str] = (),
                          max_whole_shape: Optional[Dict[str, Sequence[int]]] = None,
                          whole_intensity_jitter: float = 0.1, fuse_views: bool = False,
                          **loader_kwargs) -> BatchLoader:
    """Multi-view batches (diagnosis / multitask). Batch size defaults to the smallest plan batch of the views.

    Validation (``train=False``) uses deterministic centre crops and, by default, visits each case once in order.
    Views in ``light_augmentation_views`` (never the segmentation view) get mirroring + small intensity jitter only
    (no rotation, scaling, blur or resolution loss): a few-voxel lesion must survive augmentation for diagnosis to
    learn it.

    ``whole_views`` (whole-exam diagnosis) come as whole volumes padded to their encoder's total stride, with
    intensity jitter only in training (no mirroring: a flip swaps medial and lateral, and with them the labels);
    ``max_whole_shape`` caps a view's training volume (a random cut; validation cuts the centre). Patches are then
    cut only for the segmentation view.

    ``fuse_views`` (multitask ``--fuse-views``) adds the other views' crops aligned with the segmentation patch
    (:class:`~orthonet.training.data.sources.AlignedContext`) and keeps the segmentation view's augmentation
    intensity-only, as :func:`make_aligned_views_loader`: a spatial transform would break the physical alignment.
    """
    from orthonet.networks.build import network_spec
    from orthonet.networks.whole_exam import total_stride
    whole_views = list(whole_views)
    patch_views = [v for v in views if v not in whole_views]
    all_views = patch_views + ([segmentation_view] if segmentation_view and segmentation_view not in patch_views
                               else [])
    cfgs = {v: view_configuration(plans, v, configuration) for v in all_views}
    patches = {v: [int(p) for p in cfgs[v]["patch_size"]] for v in all_views}
    samples, transforms = {}, {}
    fused = fuse_views and segmentation_view is not None
    for v in all_views:
        ds = ds_scales_for(cfgs[v]) if (deep_supervision and v == segmentation_view) else None
        if train and fused and v == segmentation_view:
            from orthonet.training.data.augmentation import build_intensity_only_transforms
            samples[v] = patches[v]
            transforms[v] = build_intensity_only_transforms(ds, padding_label)
        elif train and v in light_augmentation_views and v != segmentation_view:
            samples[v] = patches[v]
            transforms[v] = build_pretraining_transforms(resolve_mirror_axes(len(patches[v]), mirror_axes), 0.1)
        elif train:
            samples[v] = initial_patch_size(patches[v], cfgs[v]["spacing"])
            transforms[v] = build_training_transforms(patches[v], cfgs[v]["spacing"], None, mirror_axes, ds,
                                                      ignore_label, padding_label)
        else:
            samples[v] = patches[v]
            transforms[v] = build_validation_transforms(None, ds, padding_label)
    bs = batch_size or min(int(view_configuration(plans, v, configuration)["batch_size"])
                           for v in all_views + whole_views)
    n_diag = n_diagnoses if n_diagnoses is not None else len(plans.get("diagnoses") or [])
    strides = {v: total_stride(network_spec(plans, v, configuration)) for v in whole_views}
    aligned = [v for v in views if v != segmentation_view] if fused else []
    aligned_patches = {v: [int(p) for p in view_configuration(plans, v, configuration)["patch_size"]]
                       for v in aligned}
    source = MultiviewBatchSource(store, cases, all_views, segmentation_view, bs, patches, samples, transforms,
                                  diagnoses, n_diag, keep_labels, oversample_foreground, jitter if train else 0.0,
                                  ignore_label, sequential=(not train) if sequential is None else sequential,
                                  center_crop=not train, whole_views=whole_views, whole_strides=strides,
                                  max_whole_shape=max_whole_shape,
                                  whole_intensity_jitter=whole_intensity_jitter if train else 0.0,
                                  aligned_views=aligned, aligned_patch_sizes=aligned_patches)
    return BatchLoader(source, num_workers=num_workers, seed=seed, timeout_s=timeout_s, **loader_kwargs)


def make_pretraining_loader(store: PreprocessedCaseStore, cases: Sequence[str], plans: Dict, view: str,
                            configuration: str, batch_size: Optional[int] = None,
                            mirror_axes: Optional[Sequence[int]] = None, intensity_jitter: float = 0.1,
                            num_workers: int = 0, seed: int = 12345, timeout_s: float = 900.0,
                            patch_size: Optional[Sequence[int]] = None, **loader_kwargs) -> BatchLoader:
    """Random image patches of ``view`` from labelled and unlabeled cases with the light pretraining
    augmentation (mirroring every axis by default, small intensity jitter). ``patch_size`` overrides the plan's
    (pretraining on smaller patches: the network is fully convolutional)."""
    cfg = view_configuration(plans, view, configuration)
    patch = [int(p) for p in (patch_size or cfg["patch_size"])]
    source = ImageBatchSource(store, cases, view, batch_size or int(cfg["batch_size"]), patch,
                              build_pretraining_transforms(resolve_mirror_axes(len(patch), mirror_axes),
                                                           intensity_jitter))
    return BatchLoader(source, num_workers=num_workers, seed=seed, timeout_s=timeout_s, **loader_kwargs)


def make_aligned_views_loader(store: PreprocessedCaseStore, cases: Sequence[str], plans: Dict, configuration: str,
                              segmentation_view: str, other_views: Sequence[str], train: bool = True,
                              deep_supervision: bool = True, batch_size: Optional[int] = None,
                              oversample_foreground: float = 0.33, ignore_label: Optional[int] = None,
                              padding_label: int = 0, num_workers: int = 0, seed: int = 12345,
                              timeout_s: float = 900.0, **loader_kwargs) -> BatchLoader:
    """Segmentation patches plus physically aligned crops of the other views (``--fuse-views``).

    Training uses intensity augmentation only (spatial transforms would break the alignment); validation uses
    foreground-oversampled patches without augmentation, as :func:`make_seg_loader`.
    """
    from orthonet.training.data.augmentation import build_intensity_only_transforms
    from orthonet.training.data.sources import AlignedViewsBatchSource
    cfg = view_configuration(plans, segmentation_view, configuration)
    patch = [int(p) for p in cfg["patch_size"]]
    others = {v: [int(p) for p in view_configuration(plans, v, configuration)["patch_size"]]
              for v in other_views if v != segmentation_view}
    ds = ds_scales_for(cfg) if deep_supervision else None
    transforms = build_intensity_only_transforms(ds, padding_label) if train else \
        build_validation_transforms(None, ds, padding_label)
    source = AlignedViewsBatchSource(store, cases, segmentation_view, list(others), batch_size or
                                     int(cfg["batch_size"]), patch, others, transforms, oversample_foreground,
                                     ignore_label)
    return BatchLoader(source, num_workers=num_workers, seed=seed, timeout_s=timeout_s, **loader_kwargs)
