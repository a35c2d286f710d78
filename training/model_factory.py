"""Which model a task needs, built from plans.json alone, and the description that rebuilds it at inference.

Why a separate description (:class:`ModelConfig`): a checkpoint stores weights; the predictor must rebuild the very
same module without re-running the trainer's logic. The description is plain JSON, saved next to the weights, and
:func:`build_model` is the one function both sides call.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Tuple

from torch import nn

from orthonet.errors import OrthoError
from orthonet.networks import MultiTaskModel, MultiViewDiagnosisModel, SegmentationModel
from orthonet.networks.build import conv_dim, network_spec

TASKS = ("seg", "diag", "multitask")
DIAGNOSIS_INPUTS = ("whole", "crop")


@dataclass
class ModelConfig:
    """Everything :func:`build_model` needs besides the plans."""

    task: str
    configuration: str
    views: List[str]
    segmentation_view: Optional[str]
    channels_by_view: Dict[str, int]
    num_classes: int = 0
    n_diagnoses: int = 0
    deep_supervision: bool = True
    fusion: str = "concat"
    levels: Optional[List[int]] = None
    fuse_views: bool = False
    head_kwargs: Dict = field(default_factory=dict)
    seg_head: str = "unet"          # 'unet' | 'pyramid' (orthonet.networks.SEG_HEADS)
    # 'whole': the diagnosis reads every view's whole volume (attention-MIL); 'crop': the centre-crop model of
    # checkpoints written before whole-exam diagnosis (their descriptions lack the key, so they load as they were)
    diagnosis_input: str = "crop"
    feature_t: Dict[str, Optional[int]] = field(default_factory=dict)   # diffusion-feature timestep per view
    # whole-exam diagnosis levels max-pooled onto the next coarser level's grid (``--diagnosis-coarsen-levels``)
    coarsen_levels: List[int] = field(default_factory=list)
    # per view, the spatial axes training mirrored (nnU-Net's inference_allowed_mirroring_axes), which bound the
    # mirroring TTA; None: a description written before the field, mirrored along every axis as it always was
    allowed_mirroring_axes: Optional[Dict[str, List[int]]] = None

    def to_dict(self) -> Dict:
        return asdict(self)

    def mirror_axes(self, view: str, ndim: int) -> Tuple[int, ...]:
        """The spatial axes test-time augmentation may mirror ``view`` along (an ``ndim``-D patch): a view
        trained without mirroring along an axis is never mirrored there; old descriptions allow every axis."""
        if self.allowed_mirroring_axes is None:
            return tuple(range(ndim))
        return tuple(int(a) for a in self.allowed_mirroring_axes.get(view, ()) if 0 <= int(a) < ndim)

    @classmethod
    def from_dict(cls, d: Dict) -> "ModelConfig":
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise OrthoError(f"the model description has fields this orthonet does not know: {unknown}",
                             fix="predict with the orthonet version that trained the model (or newer)")
        cfg = cls(**d)
        if cfg.diagnosis_input not in DIAGNOSIS_INPUTS:
            raise OrthoError(f"unknown diagnosis_input '{cfg.diagnosis_input}'", fix=f"use one of {DIAGNOSIS_INPUTS}")
        return cfg


def views_for(plans: Dict, configuration: str, task: str) -> List[str]:
    """Views the task's model uses: the segmentation view alone for ``seg`` (unless fusing views), every view that
    has the configuration otherwise. Multi-view tasks need a 3D configuration."""
    views = [v for v, p in plans["views"].items() if configuration in p.get("configurations", {})]
    if not views:
        raise OrthoError(f"configuration '{configuration}' is not planned for any view",
                         fix="pick a planned configuration (see plans.json) or rerun ortho_plan_and_preprocess -c")
    if task != "seg":
        flat = [v for v in views if conv_dim(network_spec(plans, v, configuration)) != 3]
        if flat:
            raise OrthoError(f"the diagnosis and multitask models need a 3D configuration; '{configuration}' is 2D "
                             f"for views {flat}", fix="use --task seg with 2d, or train 3d_fullres for diagnosis")
    return views


def segmentation_view_of(plans: Dict, spec=None) -> Optional[str]:
    """The view segmentation labels live in: the plans' choice (editable), else dataset.json's (``spec``, a
    :class:`orthonet.dataset.DatasetSpec` or None). One rule for the trainer and for ``default_trainer``."""
    return plans.get("segmentation_view") or (spec.segmentation_view if spec is not None else None)


def task_model_views(plans: Dict, configuration: str, task: str, segmentation_view: Optional[str],
                     fuse_views: bool = False) -> List[str]:
    """The views a trainer's model reads (and so the encoders it loads): the segmentation view alone for ``seg``
    without ``--fuse-views``, else :func:`views_for`. One rule for the trainer and for ``default_trainer``, so the
    default head is chosen by the encoders that will really load."""
    views = views_for(plans, configuration, task)
    if task == "seg" and not fuse_views and segmentation_view is not None:
        return [segmentation_view]
    return views


def build_model(plans: Dict, cfg: ModelConfig) -> nn.Module:
    """The task model of ``cfg`` with every encoder built from the plans' network entry of its view."""
    if cfg.task not in TASKS:
        raise OrthoError(f"unknown task '{cfg.task}'", fix=f"use one of {', '.join(TASKS)}")
    specs = {v: network_spec(plans, v, cfg.configuration) for v in cfg.views}
    if cfg.task == "seg":
        return SegmentationModel(specs, cfg.channels_by_view, cfg.segmentation_view, cfg.num_classes,
                                 deep_supervision=cfg.deep_supervision, fuse_views=cfg.fuse_views,
                                 seg_head=cfg.seg_head)
    if cfg.task == "diag":
        return MultiViewDiagnosisModel(specs, cfg.channels_by_view, cfg.n_diagnoses, fusion=cfg.fusion,
                                       levels=cfg.levels, whole_exam=cfg.diagnosis_input == "whole",
                                       feature_t=cfg.feature_t, coarsen_levels=cfg.coarsen_levels,
                                       **cfg.head_kwargs)
    return MultiTaskModel(specs, cfg.channels_by_view, cfg.segmentation_view, cfg.num_classes, cfg.n_diagnoses,
                          deep_supervision=cfg.deep_supervision, fusion=cfg.fusion, levels=cfg.levels,
                          fuse_views=cfg.fuse_views, seg_head=cfg.seg_head,
                          whole_exam=cfg.diagnosis_input == "whole", feature_t=cfg.feature_t,
                          coarsen_levels=cfg.coarsen_levels, **cfg.head_kwargs)


def has_segmentation(cfg: ModelConfig) -> bool:
    return cfg.task in ("seg", "multitask")


def has_diagnosis(cfg: ModelConfig) -> bool:
    return cfg.task in ("diag", "multitask")
