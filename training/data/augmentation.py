"""Declarative augmentation pipelines built from batchgeneratorsv2 per-sample torch transforms.

The training pipeline follows nnU-Net v2 (>= 2.6, ``nnUNetTrainer.get_training_transforms``): spatial transform
(rotation and scaling, elastic deformation off by default) that crops the final patch from the enlarged sampled
patch, Gaussian noise, Gaussian blur, multiplicative brightness, contrast, low-resolution simulation, gamma (with
and without inversion), mirroring, ``-1 -> background``, and the deep-supervision label pyramid. Probabilities and
ranges are nnU-Net's. What is ours:

* Pseudo-2D spatial augmentation is decided from the *spacing*: when the thickest axis is at least
  ``ANISO_THRESHOLD`` (3) times coarser than the finest, rotation/scaling happen only in the plane of the two fine
  axes (any axis may be the thick one; it is moved to the front and back), and low-resolution simulation leaves
  the thick axis alone — rotating across 3-6 mm slices would invent structure that was never imaged.
* Label padding value is a parameter (``padding_label``): nnU-Net maps -1 to background; pass -1 to keep such
  voxels out of the loss instead (the losses exclude negative labels).
* A light pipeline for diffusion pretraining: mirroring and small intensity jitter only.

Each builder returns a ``ComposeTransforms``; call it as ``t(image=img, segmentation=seg)`` on one sample
(image float (C, *patch), segmentation int (1, *patch)), which is what the data loader workers do.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
from batchgeneratorsv2.transforms.intensity.contrast import BGContrast, ContrastTransform
from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
from batchgeneratorsv2.transforms.spatial.low_resolution import SimulateLowResolutionTransform
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform
from batchgeneratorsv2.transforms.utils.pseudo2d import Convert2DTo3DTransform, Convert3DTo2DTransform
from batchgeneratorsv2.transforms.utils.random import RandomTransform
from batchgeneratorsv2.transforms.utils.remove_label import RemoveLabelTransform

ANISO_THRESHOLD = 3.0
_DEG = np.pi / 180.0


# ------------------------------------------------------------------------------------------------------------
# configuration derived from the plan
# ------------------------------------------------------------------------------------------------------------
def pseudo2d_axis(spacing: Sequence[float], threshold: float = ANISO_THRESHOLD) -> Optional[int]:
    """The thick axis when ``max(spacing) / min(spacing) >= threshold`` (3-D only), else None."""
    sp = np.asarray(spacing, dtype=float)
    if sp.size != 3 or np.any(sp <= 0):
        return None
    return int(np.argmax(sp)) if sp.max() / sp.min() >= threshold else None


@dataclass(frozen=True)
class SpatialAugmentation:
    """Rotation/scaling settings for one view and configuration (nnU-Net defaults)."""

    patch_size: Tuple[int, ...]
    rotation: Tuple[float, float]  # radians
    pseudo2d_axis: Optional[int] = None
    scaling: Tuple[float, float] = (0.7, 1.4)
    p_rotation: float = 0.2
    p_scaling: float = 0.2
    p_elastic: float = 0.0
    mirror_axes: Tuple[int, ...] = field(default_factory=tuple)

    def initial_patch_size(self) -> Tuple[int, ...]:
        """Size of the patch to sample so that rotation/scaling never reach past it (nnU-Net's get_patch_size,
        which uses the scale range (0.85, 1.25)); the thick axis of pseudo-2D keeps its final size."""
        return initial_patch_size_for(self.patch_size, self.rotation, self.pseudo2d_axis)


def initial_patch_size_for(patch_size: Sequence[int], rotation: Tuple[float, float],
                           pseudo2d: Optional[int] = None, min_scale: float = 0.85) -> Tuple[int, ...]:
    """Bounding box of the final patch rotated by any angle up to the maximum (about each axis in turn; only
    about the thick axis for pseudo-2D), divided by the smallest scale 0.85 — nnU-Net's ``get_patch_size``
    idea, but computed on the box (extent = |R| @ size) at every angle: nnU-Net rotates one corner vector at
    the maximum angle only, which for its +-180 deg pseudo-2D rotation of a square patch gives no margin at all
    and leaves the corners of 45 deg rotations to zero padding."""
    from batchgenerators.augmentations.utils import (create_matrix_rotation_2d, create_matrix_rotation_x_3d,
                                                     create_matrix_rotation_y_3d, create_matrix_rotation_z_3d)
    rot = min(max(abs(rotation[0]), abs(rotation[1])), np.pi / 2)
    size = np.asarray(patch_size, dtype=float)
    final = size.copy()
    makers = (create_matrix_rotation_x_3d, create_matrix_rotation_y_3d, create_matrix_rotation_z_3d)
    for angle in np.append(np.linspace(0.0, rot, 91), rot):
        if len(size) == 3:
            axes = range(3) if pseudo2d is None else (pseudo2d,)
            mats = [makers[a](angle) for a in axes]
        else:
            mats = [create_matrix_rotation_2d(angle)]
        for m in mats:
            final = np.maximum(final, np.abs(m) @ size)
    final = (final / min_scale + 1e-6).astype(int)
    if pseudo2d is not None:
        final[pseudo2d] = patch_size[pseudo2d]
    return tuple(int(v) for v in final)


def spatial_augmentation(patch_size: Sequence[int], spacing: Sequence[float], is_anisotropic: Optional[bool] = None,
                         mirror_axes: Optional[Sequence[int]] = None, p_elastic: float = 0.0) -> SpatialAugmentation:
    """nnU-Net's rotation ranges: 3-D +-30 deg (pseudo-2D: +-180 deg in-plane); 2-D +-180 deg, or +-15 deg for
    elongated patches (aspect > 1.5). ``is_anisotropic`` None decides from the spacing (:func:`pseudo2d_axis`);
    True forces pseudo-2D around the thickest axis, False forbids it."""
    patch = tuple(int(p) for p in patch_size)
    dim = len(patch)
    if dim not in (2, 3):
        raise ValueError(f"patch size must be 2-D or 3-D, got {patch}")
    axis = None
    if dim == 3:
        if is_anisotropic is None:
            axis = pseudo2d_axis(spacing)
        elif is_anisotropic:
            axis = int(np.argmax(np.asarray(spacing, dtype=float)))
        rot = 180.0 if axis is not None else 30.0
    else:
        rot = 15.0 if max(patch) / min(patch) > 1.5 else 180.0
    return SpatialAugmentation(patch, (-rot * _DEG, rot * _DEG), axis, p_elastic=p_elastic,
                               mirror_axes=resolve_mirror_axes(dim, mirror_axes))


def resolve_mirror_axes(ndim: int, mirror_axes: Optional[Sequence[int]] = None) -> Tuple[int, ...]:
    """The spatial axes an ``ndim``-D patch is mirrored along: every one for None (nnU-Net's default), else
    those of ``mirror_axes`` the patch has (a 2D configuration has axes 0 and 1 only).

    One rule for the augmentation and for the axes stored with the model, so test-time mirroring stays within
    what training mirrored."""
    if mirror_axes is None:
        return tuple(range(ndim))
    return tuple(sorted({int(a) for a in mirror_axes if 0 <= int(a) < ndim}))


def initial_patch_size(patch_size: Sequence[int], spacing: Sequence[float],
                       is_anisotropic: Optional[bool] = None) -> Tuple[int, ...]:
    """The enlarged patch size the loader must sample for :func:`build_training_transforms`."""
    return spatial_augmentation(patch_size, spacing, is_anisotropic).initial_patch_size()


def deep_supervision_scales(strides: Sequence[Sequence[int]]) -> List[List[float]]:
    """Relative resolution of each decoder output (full resolution first), from the network's stage strides
    (as nnU-Net: ``1 / cumprod(strides)`` without the bottleneck)."""
    s = np.asarray(strides, dtype=float)
    if s.ndim != 2:
        raise ValueError(f"strides must be a list of per-stage stride lists, got {strides}")
    return [list(map(float, row)) for row in (1.0 / np.cumprod(s, axis=0))[:-1]]


# ------------------------------------------------------------------------------------------------------------
# small transforms we need and batchgeneratorsv2 lacks
# ------------------------------------------------------------------------------------------------------------
class MoveSpatialAxisTransform(BasicTransform):
    """Move spatial axis ``source`` to position ``destination`` in image, segmentation and regression target
    (used to bring the thick axis to the front for pseudo-2D augmentation and back)."""

    def __init__(self, source: int, destination: int):
        super().__init__()
        self.source = int(source)
        self.destination = int(destination)

    def _move(self, t: torch.Tensor) -> torch.Tensor:
        return torch.movedim(t, self.source + 1, self.destination + 1).contiguous()

    def _apply_to_image(self, img: torch.Tensor, **params) -> torch.Tensor:
        return self._move(img)

    def _apply_to_segmentation(self, segmentation: torch.Tensor, **params) -> torch.Tensor:
        return self._move(segmentation)

    def _apply_to_regr_target(self, regression_target, **params) -> torch.Tensor:
        return self._move(regression_target)


class CenterCropTransform(BasicTransform):
    """Deterministic centre crop/pad to ``patch_size`` (image padded with 0, segmentation with ``seg_pad``)."""

    def __init__(self, patch_size: Sequence[int], seg_pad: int = -1):
        super().__init__()
        self.patch_size = tuple(int(p) for p in patch_size)
        self.seg_pad = seg_pad

    def _crop(self, t: torch.Tensor, pad_value) -> torch.Tensor:
        from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd
        shape = t.shape[1:]
        bbox = [[(s - p) // 2, (s - p) // 2 + p] for s, p in zip(shape, self.patch_size)]
        return crop_and_pad_nd(t, bbox, pad_value)

    def _apply_to_image(self, img: torch.Tensor, **params) -> torch.Tensor:
        return self._crop(img, 0)

    def _apply_to_segmentation(self, segmentation: torch.Tensor, **params) -> torch.Tensor:
        return self._crop(segmentation, self.seg_pad)


# ------------------------------------------------------------------------------------------------------------
# pipelines
# ------------------------------------------------------------------------------------------------------------
def _intensity_transforms(low_res_ignore_axes: Optional[Tuple[int, ...]]) -> List[BasicTransform]:
    return [
        RandomTransform(GaussianNoiseTransform(noise_variance=(0, 0.1), p_per_channel=1, synchronize_channels=True),
                        apply_probability=0.1),
        RandomTransform(GaussianBlurTransform(blur_sigma=(0.5, 1.0), synchronize_channels=False,
                                              synchronize_axes=False, p_per_channel=0.5, benchmark=False),
                        apply_probability=0.2),
        RandomTransform(MultiplicativeBrightnessTransform(multiplier_range=BGContrast((0.75, 1.25)),
                                                          synchronize_channels=False, p_per_channel=1),
                        apply_probability=0.15),
        RandomTransform(ContrastTransform(contrast_range=BGContrast((0.75, 1.25)), preserve_range=True,
                                          synchronize_channels=False, p_per_channel=1),
                        apply_probability=0.15),
        RandomTransform(SimulateLowResolutionTransform(scale=(0.5, 1), synchronize_channels=False,
                                                       synchronize_axes=True, ignore_axes=low_res_ignore_axes,
                                                       allowed_channels=None, p_per_channel=0.5),
                        apply_probability=0.25),
        RandomTransform(GammaTransform(gamma=BGContrast((0.7, 1.5)), p_invert_image=1, synchronize_channels=False,
                                       p_per_channel=1, p_retain_stats=1), apply_probability=0.1),
        RandomTransform(GammaTransform(gamma=BGContrast((0.7, 1.5)), p_invert_image=0, synchronize_channels=False,
                                       p_per_channel=1, p_retain_stats=1), apply_probability=0.3),
    ]


def _label_tail(deep_supervision_scales: Optional[Sequence], padding_label: int) -> List[BasicTransform]:
    tail: List[BasicTransform] = []
    if padding_label != -1:
        tail.append(RemoveLabelTransform(-1, padding_label))
    if deep_supervision_scales is not None:
        tail.append(DownsampleSegForDSTransform(ds_scales=[list(s) if isinstance(s, (list, tuple)) else s
                                                           for s in deep_supervision_scales]))
    return tail


def build_training_transforms(patch_size: Sequence[int], spacing: Sequence[float],
                              is_anisotropic: Optional[bool] = None, mirror_axes: Optional[Sequence[int]] = None,
                              deep_supervision_scales: Optional[Sequence] = None, ignore_label: Optional[int] = None,
                              padding_label: int = 0, p_elastic: float = 0.0) -> ComposeTransforms:
    """nnU-Net's training augmentation for one view; input patches at :func:`initial_patch_size`, output at
    ``patch_size``.

    ``mirror_axes`` None mirrors every spatial axis. ``ignore_label`` voxels are carried through unchanged
    (nearest-label resampling never blends them into a class); the loss leaves them out. ``-1`` (outside the
    volume) becomes ``padding_label``. With ``deep_supervision_scales`` the segmentation becomes a list, full
    resolution first.
    """
    aug = spatial_augmentation(patch_size, spacing, is_anisotropic, mirror_axes, p_elastic)
    transforms: List[BasicTransform] = []
    axis = aug.pseudo2d_axis
    if axis is not None:
        if axis != 0:
            transforms.append(MoveSpatialAxisTransform(axis, 0))
        transforms.append(Convert3DTo2DTransform())
        in_plane = tuple(p for i, p in enumerate(aug.patch_size) if i != axis)
        spatial_patch = in_plane
    else:
        spatial_patch = aug.patch_size
    transforms.append(SpatialTransform(
        spatial_patch, patch_center_dist_from_border=0, random_crop=False, p_elastic_deform=aug.p_elastic,
        p_rotation=aug.p_rotation, rotation=aug.rotation, p_scaling=aug.p_scaling, scaling=aug.scaling,
        p_synchronize_scaling_across_axes=1, bg_style_seg_sampling=False, border_mode_seg="constant",
        padding_value_seg=-1))
    if axis is not None:
        transforms.append(Convert2DTo3DTransform())
        if axis != 0:
            transforms.append(MoveSpatialAxisTransform(0, axis))
    transforms.extend(_intensity_transforms((axis,) if axis is not None else None))
    if aug.mirror_axes:
        transforms.append(MirrorTransform(allowed_axes=aug.mirror_axes))
    transforms.extend(_label_tail(deep_supervision_scales, padding_label))
    return ComposeTransforms(transforms)


def build_validation_transforms(patch_size: Optional[Sequence[int]] = None,
                                deep_supervision_scales: Optional[Sequence] = None, padding_label: int = 0
                                ) -> ComposeTransforms:
    """No augmentation: optional centre crop to ``patch_size`` (when the loader sampled larger patches), the
    ``-1`` mapping and the deep-supervision pyramid, so validation losses are comparable with training ones."""
    transforms: List[BasicTransform] = []
    if patch_size is not None:
        transforms.append(CenterCropTransform(patch_size, seg_pad=-1))
    transforms.extend(_label_tail(deep_supervision_scales, padding_label))
    return ComposeTransforms(transforms)


def build_pretraining_transforms(mirror_axes: Optional[Sequence[int]] = (0, 1, 2), intensity_jitter: float = 0.1
                                 ) -> ComposeTransforms:
    """Diffusion pretraining: random mirroring plus small multiplicative brightness / contrast jitter
    (+-``intensity_jitter``). No spatial resampling: the model must learn the true anatomy and noise texture."""
    lo, hi = 1.0 - intensity_jitter, 1.0 + intensity_jitter
    transforms: List[BasicTransform] = []
    if mirror_axes:
        transforms.append(MirrorTransform(allowed_axes=tuple(mirror_axes)))
    if intensity_jitter > 0:
        transforms.append(RandomTransform(MultiplicativeBrightnessTransform(
            multiplier_range=(lo, hi), synchronize_channels=False, p_per_channel=1), apply_probability=0.5))
        transforms.append(RandomTransform(ContrastTransform(
            contrast_range=(lo, hi), preserve_range=True, synchronize_channels=False, p_per_channel=1),
            apply_probability=0.5))
    return ComposeTransforms(transforms)


def build_intensity_only_transforms(deep_supervision_scales: Optional[Sequence] = None, padding_label: int = 0
                                    ) -> ComposeTransforms:
    """nnU-Net's intensity augmentation without any spatial transform or mirroring, for ``--fuse-views`` where
    the segmentation patch must stay aligned with the other views' crops in physical space."""
    return ComposeTransforms(_intensity_transforms(None) + _label_tail(deep_supervision_scales, padding_label))
