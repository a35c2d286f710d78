"""The default planner: one plan per view from the fingerprint and a GPU memory target.

Each decision is one method so that a subclass can change exactly one policy (see ``resenc_planner.py``):

* :meth:`DefaultPlanner.target_spacing` - median spacing; on an anisotropic view (thick axis >= 3x every other)
  the 10th percentile on the thick axis, as nnU-Net does, so that the thinnest-slice cases are not degraded by
  interpolation;
* :meth:`DefaultPlanner.transpose` - the thick (out-of-plane) axis first, so every network sees slices in axis 0;
* :meth:`DefaultPlanner.plan_configuration` - patch size, topology and batch size under the memory budget: start
  from a patch with the aspect ratio of the voxels clipped to the median image, shrink its relatively largest axis
  until the network fits with batch size 2, then spend what is left on the batch (at most 5% of the dataset's voxels);
* :meth:`DefaultPlanner.normalization`, :meth:`DefaultPlanner.resampling` - what preprocessing does.

Configurations: ``3d_fullres`` for every view; ``2d`` for anisotropic views (median spacing); ``3d_lowres`` when the full-resolution
median image holds more than four patches (dropped, with a log line saying why, when it would not be at least two
times smaller than full resolution).
"""
from __future__ import annotations

import logging
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from dynamic_network_architectures.building_blocks.helper import convert_dim_to_conv_op, get_matching_instancenorm
from torch import nn

from orthonet.dataset import DatasetSpec
from orthonet.errors import OrthoError
from orthonet.planners.memory import MemoryReference, estimated_gb, feature_map_count, max_batch_size
from orthonet.planners.network_spec import make_network_entry
from orthonet.planners.plans import DEFAULT_PLANS_NAME
from orthonet.planners.topology import Topology, next_smaller_patch, plan_topology
from orthonet.preprocessing.normalize import MASKABLE, scheme_for_channel
from orthonet.preprocessing.resample import compute_new_shape

_log = logging.getLogger("orthonet.planner")


def _r(x: float, digits: int = 6) -> float:
    return float(round(float(x), digits))


class DefaultPlanner:
    """nnU-Net-style planner producing :class:`PlainConvUNet` configurations."""

    network_class = PlainConvUNet
    #: plans name used when the user gives none (different planners must not overwrite each other's plans)
    default_plans_name = DEFAULT_PLANS_NAME
    base_features = 32
    max_features_3d = 320
    max_features_2d = 320
    min_feature_map_edge = 4
    encoder_blocks_per_stage: Sequence[int] = (2,) * 12
    decoder_blocks_per_stage: Sequence[int] = (2,) * 12
    reference_3d = MemoryReference(560e6, 2)
    reference_2d = MemoryReference(85e6, 12)
    min_batch_size = 2
    max_dataset_fraction_per_batch = 0.05
    anisotropy_threshold = 3.0
    initial_patch_voxels_3d = 256 ** 3
    initial_patch_voxels_2d = 2048 ** 2
    lowres_patch_fraction = 0.25
    lowres_min_reduction = 2.0
    lowres_spacing_step = 1.03
    mask_for_norm_threshold = 0.75
    epochs = 1000
    iterations_per_epoch = 250

    def __init__(self, spec: DatasetSpec, fingerprint: Dict, gpu_memory_target_gb: float = 8.0,
                 plans_name: Optional[str] = None, logger: Optional[logging.Logger] = None,
                 base_features: Optional[int] = None):
        if gpu_memory_target_gb <= 0:
            raise OrthoError(f"-gpu_memory_target must be positive (got {gpu_memory_target_gb})")
        if base_features is not None:
            if int(base_features) < 1:
                raise OrthoError(f"--base-features must be at least 1 (got {base_features})")
            self.base_features = int(base_features)   # instance override of the class default (32, as nnU-Net)
        self.spec = spec
        self.fingerprint = fingerprint
        self.gpu_memory_target_gb = float(gpu_memory_target_gb)
        self.plans_name = plans_name or self.default_plans_name
        self.log = logger or _log
        missing = [v for v in spec.views if v not in fingerprint.get("views", {})]
        if missing:
            raise OrthoError(f"the fingerprint has no entry for view(s) {missing}",
                             fix="recompute it with `ortho_plan_and_preprocess -d ID --overwrite`")

    # -------------------------------------------------------------------------------------------------------
    # naming and settings
    # -------------------------------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return type(self).__name__

    def settings(self) -> Dict:
        """Planner inputs recorded in the plans (a rerun with other settings must re-plan)."""
        return {"gpu_memory_target_gb": self.gpu_memory_target_gb, "base_features": self.base_features}

    def data_identifier(self, config: str) -> str:
        return f"{self.plans_name}_{config}"

    def num_segmentation_classes(self) -> int:
        return max(self.spec.num_classes, 2)

    # -------------------------------------------------------------------------------------------------------
    # spacing, transpose, normalisation, resampling
    # -------------------------------------------------------------------------------------------------------
    def _fp(self, view: str) -> Dict:
        return self.fingerprint["views"][view]

    def is_anisotropic(self, spacing: Sequence[float]) -> Tuple[bool, int]:
        """(anisotropic?, thick axis): the coarsest axis is at least ``anisotropy_threshold`` times coarser than
        every other axis. (nnU-Net additionally requires few voxels along that axis; thick-slice MRI stacks
        always have few slices, and a spacing-only rule is easier to predict and to explain.)"""
        spacing = np.asarray(spacing, dtype=np.float64)
        axis = int(np.argmax(spacing))
        others = [a for a in range(len(spacing)) if a != axis]
        aniso = spacing[axis] >= self.anisotropy_threshold * max(spacing[a] for a in others)
        return bool(aniso), axis

    def target_spacing(self, view: str) -> np.ndarray:
        """Target spacing in numpy order, *before* the transpose."""
        fp = self._fp(view)
        spacings = np.asarray(fp["spacings"], dtype=np.float64)
        target = np.median(spacings, axis=0)
        aniso, axis = self.is_anisotropic(target)
        if aniso:
            others_max = max(target[a] for a in range(3) if a != axis)
            thick = float(np.percentile(spacings[:, axis], 10))
            # never go finer than the in-plane spacing: that would only inflate the data
            target[axis] = max(thick, others_max + 1e-5) if thick < others_max else thick
        return np.array([_r(s) for s in target])

    def transpose(self, view: str) -> Tuple[List[int], List[int]]:
        """Thick axis first (identity when no axis is clearly the coarsest, which keeps isotropic data as is)."""
        target = self.target_spacing(view)
        coarsest = float(np.max(target))
        first = next(a for a in range(3) if target[a] >= coarsest * (1 - 1e-3))
        forward = [first] + [a for a in range(3) if a != first]
        backward = [forward.index(a) for a in range(3)]
        return forward, backward

    def normalization(self, view: str) -> Dict:
        fp = self._fp(view)
        names = self.spec.channels(view)
        schemes = [scheme_for_channel(n) for n in names]
        view_scheme = schemes[0]
        use_mask = (float(fp.get("median_relative_size_after_cropping", 1.0)) < self.mask_for_norm_threshold
                    and all(s in MASKABLE for s in schemes))
        per_channel = {}
        for c, scheme in enumerate(schemes):
            stats = fp["foreground_intensity_properties_per_channel"][str(c)]
            entry = {k: stats[k] for k in ("mean", "std", "percentile_00_5", "percentile_99_5")}
            if scheme != view_scheme:
                entry = {"scheme": scheme, **entry}
            per_channel[str(c)] = entry
        return {"scheme": view_scheme, "per_channel": per_channel, "use_mask_for_norm": bool(use_mask)}

    def resampling(self, spacing: Sequence[float]) -> Dict:
        """Orders for images/labels; thick axis resampled separately with order 0 when the target is anisotropic
        (``separate_z`` null: decided per case, nnU-Net's rule)."""
        aniso, axis = self.is_anisotropic(spacing) if len(spacing) == 3 else (False, 0)
        return {"image_order": 3, "label_order": 1, "separate_z": True if aniso else None, "order_z": 0,
                "anisotropy_axis": axis if aniso else None, "anisotropy_threshold": self.anisotropy_threshold}

    # -------------------------------------------------------------------------------------------------------
    # network and configuration
    # -------------------------------------------------------------------------------------------------------
    def features_per_stage(self, n_stages: int, dim: int) -> List[int]:
        cap = self.max_features_3d if dim == 3 else self.max_features_2d
        return [int(min(cap, self.base_features * 2 ** i)) for i in range(n_stages)]

    def network_kwargs(self, topology: Topology, dim: int) -> Dict:
        conv = convert_dim_to_conv_op(dim)
        n = topology.n_stages
        return {
            "n_stages": n,
            "features_per_stage": self.features_per_stage(n, dim),
            "conv_op": conv,
            "kernel_sizes": [list(k) for k in topology.kernel_sizes],
            "strides": [list(s) for s in topology.strides],
            "n_conv_per_stage": [int(b) for b in self.encoder_blocks_per_stage[:n]],
            "n_conv_per_stage_decoder": [int(b) for b in self.decoder_blocks_per_stage[:n - 1]],
            "conv_bias": True,
            "norm_op": get_matching_instancenorm(conv),
            "norm_op_kwargs": {"eps": 1e-05, "affine": True},
            "dropout_op": None,
            "dropout_op_kwargs": None,
            "nonlin": nn.LeakyReLU,
            "nonlin_kwargs": {"inplace": True},
        }

    def network_entry(self, topology: Topology, dim: int) -> Dict:
        return make_network_entry(self.network_class, self.network_kwargs(topology, dim))

    def reference(self, dim: int) -> MemoryReference:
        return self.reference_3d if dim == 3 else self.reference_2d

    def initial_patch_size(self, spacing: Sequence[float], median_shape: Sequence[float]) -> List[int]:
        inv = 1.0 / np.asarray(spacing, dtype=np.float64)
        dim = len(spacing)
        volume = self.initial_patch_voxels_3d if dim == 3 else self.initial_patch_voxels_2d
        patch = inv * (volume / np.prod(inv)) ** (1.0 / dim)
        return [int(max(1, min(round(p), round(m)))) for p, m in zip(patch, median_shape)]

    def plan_configuration(self, view: str, spacing: Sequence[float], median_shape: Sequence[float],
                           dataset_voxels: float, config: str) -> Dict:
        """Patch, topology and batch for one configuration; ``spacing``/``median_shape`` are after the transpose."""
        dim = len(spacing)
        in_ch = self.spec.num_channels(view)
        n_cls = self.num_segmentation_classes()
        ref = self.reference(dim)
        topo = plan_topology(spacing, self.initial_patch_size(spacing, median_shape), self.min_feature_map_edge)
        entry = self.network_entry(topo, dim)
        count = feature_map_count(entry, topo.patch_size, in_ch, n_cls)
        stuck: set = set()  # axes that cannot shrink any further
        while estimated_gb(count, self.min_batch_size, ref) > self.gpu_memory_target_gb:
            # shrink the axis that is largest relative to the median image (the last one on ties, as nnU-Net)
            order = np.argsort([p / m for p, m in zip(topo.patch_size, median_shape)], kind="stable")[::-1]
            axes = [int(a) for a in order if int(a) not in stuck]
            if not axes:
                break
            axis = axes[0]
            smaller = plan_topology(spacing, next_smaller_patch(spacing, topo.patch_size, axis,
                                                                self.min_feature_map_edge), self.min_feature_map_edge)
            if smaller.patch_size[axis] >= topo.patch_size[axis]:
                stuck.add(axis)
                continue
            topo = smaller
            entry = self.network_entry(topo, dim)
            count = feature_map_count(entry, topo.patch_size, in_ch, n_cls)
        fits = max_batch_size(count, self.gpu_memory_target_gb, ref)
        cap = int(round(dataset_voxels * self.max_dataset_fraction_per_batch / float(np.prod(topo.patch_size))))
        batch = max(min(fits, cap), self.min_batch_size)
        est = estimated_gb(count, batch, ref)
        if est > self.gpu_memory_target_gb:
            self.log.info(f"  {view}/{config}: even the smallest patch needs {est:.2f} GB with batch {batch} "
                          f"(target {self.gpu_memory_target_gb} GB)")
        return {
            "data_identifier": self.data_identifier(config),
            "spacing": [_r(s) for s in spacing],
            "median_image_size_in_voxels": [int(round(m)) for m in median_shape],
            "patch_size": [int(p) for p in topo.patch_size],
            "batch_size": int(batch),
            "resampling": self.resampling(spacing),
            "network": entry,
            "estimated_gpu_memory_gb": _r(est, 3),
            "epochs": self.epochs,
            "iterations_per_epoch": self.iterations_per_epoch,
        }

    # -------------------------------------------------------------------------------------------------------
    # per view
    # -------------------------------------------------------------------------------------------------------
    def median_shape_at(self, view: str, spacing_untransposed: Sequence[float]) -> np.ndarray:
        fp = self._fp(view)
        shapes = [compute_new_shape(s, sp, spacing_untransposed)
                  for s, sp in zip(fp["shapes_after_crop"], fp["spacings"])]
        return np.median(np.asarray(shapes, dtype=np.float64), axis=0)

    def plan_lowres(self, view: str, fullres: Dict, median_shape: np.ndarray, n_cases: int) -> Optional[Dict]:
        """3d_lowres: coarser spacing until the patch covers a quarter of the median image (None if not needed)."""
        full_spacing = np.asarray(fullres["spacing"], dtype=np.float64)
        median_voxels = float(np.prod(median_shape))
        patch_voxels = float(np.prod(fullres["patch_size"]))
        if patch_voxels / median_voxels >= self.lowres_patch_fraction:
            self.log.info(f"  {view}: no 3d_lowres - the full-resolution patch {fullres['patch_size']} already "
                          f"covers {100 * patch_voxels / median_voxels:.0f}% of the median image "
                          f"{[int(round(m)) for m in median_shape]}")
            return None
        spacing = full_spacing.copy()
        plan = None
        low_shape = median_shape
        for _ in range(1000):
            if plan is not None and float(np.prod(plan["patch_size"])) / float(np.prod(low_shape)) \
                    >= self.lowres_patch_fraction:
                break
            coarsest = spacing.max()
            fine = coarsest / spacing > 2
            if fine.any():
                spacing[fine] *= self.lowres_spacing_step
            else:
                spacing *= self.lowres_spacing_step
            low_shape = full_spacing / spacing * median_shape
            plan = self.plan_configuration(view, spacing, np.round(low_shape), float(np.prod(low_shape)) * n_cases,
                                           "3d_lowres")
        if plan is None or median_voxels / float(np.prod(low_shape)) < self.lowres_min_reduction:
            self.log.info(f"  {view}: no 3d_lowres - it would be less than {self.lowres_min_reduction:.0f}x smaller "
                          f"than full resolution")
            return None
        return plan

    def plan_view(self, view: str) -> Dict:
        fp = self._fp(view)
        forward, backward = self.transpose(view)
        target = self.target_spacing(view)
        spacing_t = target[forward]
        median_t = self.median_shape_at(view, target)[forward]
        n_cases = int(fp["num_cases"])
        dataset_voxels = float(np.prod(median_t)) * n_cases
        configs: Dict[str, Dict] = {}
        if median_t[0] > 1:
            configs["3d_fullres"] = self.plan_configuration(view, spacing_t, median_t, dataset_voxels, "3d_fullres")
        median_spacing_t = np.median(np.asarray(fp["spacings"], dtype=np.float64), axis=0)[forward]
        aniso, _ = self.is_anisotropic(median_spacing_t)
        if aniso or median_t[0] <= 1:
            configs["2d"] = self.plan_configuration(view, spacing_t[1:], median_t[1:], dataset_voxels, "2d")
        else:
            self.log.info(f"  {view}: no 2d - the median spacing {[_r(s) for s in median_spacing_t]} is not "
                          f"anisotropic (thick axis < {self.anisotropy_threshold:g}x the others)")
        if "3d_fullres" in configs:
            low = self.plan_lowres(view, configs["3d_fullres"], median_t, n_cases)
            if low is not None:
                configs["3d_lowres"] = low
        return {
            "transpose_forward": [int(a) for a in forward],
            "transpose_backward": [int(a) for a in backward],
            "num_input_channels": self.spec.num_channels(view),
            "channel_names": self.spec.channels(view),
            "original_median_spacing": [_r(s) for s in np.median(np.asarray(fp["spacings"]), 0)[forward]],
            "original_median_shape": [int(round(s)) for s in
                                      np.median(np.asarray(fp["shapes_after_crop"]), 0)[forward]],
            "normalization": self.normalization(view),
            "configurations": {k: configs[k] for k in ("3d_fullres", "2d", "3d_lowres") if k in configs},
        }

    def plan(self) -> Dict:
        """The complete plans dictionary (not written)."""
        views = {}
        for view in self.spec.views:
            self.log.info(f"planning view '{view}'")
            views[view] = self.plan_view(view)
            for cname, cfg in views[view]["configurations"].items():
                self.log.info(f"  {view}/{cname}: spacing {cfg['spacing']}, patch {cfg['patch_size']}, batch "
                              f"{cfg['batch_size']}, {cfg['network']['kwargs']['n_stages']} stages, "
                              f"~{cfg['estimated_gpu_memory_gb']} GB")
        return {
            "dataset_name": self.spec.root.name,
            "plans_name": self.plans_name,
            "planner": self.name,
            "planner_settings": self.settings(),
            "transferred_from": None,
            "segmentation_view": self.spec.segmentation_view if self.spec.has_segmentation else None,
            "num_classes": self.spec.num_classes,
            "labels": dict(self.spec.labels),
            "diagnoses": list(self.spec.diagnoses),
            "views": views,
        }

