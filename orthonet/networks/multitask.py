"""Segmentation and multitask models with one naming, and loading of pretrained encoder/decoder weights.

Naming (see :mod:`orthonet.networks.diagnosis`): ``encoders.<view>.*``, ``decoder.*``, ``diagnosis.*``,
``cross_view.*``. The decoder is DNA's ``UNetDecoder`` untouched, so it also registers DNA's alias of its encoder
(``decoder.encoder.*``, the same tensors as ``encoders.<segmentation view>.*``); ``torch.save`` stores shared
tensors once.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from orthonet.networks.build import (build_encoder, build_network, conv_dim, cumulative_strides,
                                     encoder_output_channels, resolve_network_kwargs)
from orthonet.networks.cross_view import CrossViewBottleneckFusion, feature_affine, feature_extent
from orthonet.networks.diagnosis import DiagnosisHead, LevelsArg, WholeExamDiagnosis, levels_by_view
from orthonet.networks.pyramid_head import PyramidSegmentationHead

Inputs = Union[torch.Tensor, Dict[str, torch.Tensor]]
#: per view, (B, 3, 2) ``[lo, hi)`` voxels of its input crop that hold image (:func:`~orthonet.networks.cross_view.
#: crop_extent`); a view without an entry counts as image everywhere in its crop
Extents = Optional[Dict[str, object]]

#: Segmentation heads: the plan's U-Net decoder, or a per-voxel MLP on all encoder levels
#: (:class:`~orthonet.networks.pyramid_head.PyramidSegmentationHead`: for few labels and short schedules).
SEG_HEADS = ("unet", "pyramid")


# ---------------------------------------------------------------------------------------------------------------
# loading pretrained weights
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class LoadReport:
    """What a pretrained-weight load did: keys loaded, target keys without a source (missing), source keys without a
    target (unexpected), and keys present in both with different shapes (not loaded)."""

    loaded: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    shape_mismatch: List[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not (self.missing or self.unexpected or self.shape_mismatch)

    def summary(self) -> str:
        text = (f"loaded {len(self.loaded)} tensors, {len(self.missing)} missing, {len(self.unexpected)} unexpected, "
                f"{len(self.shape_mismatch)} with a different shape")
        for name, keys in (("missing", self.missing), ("unexpected", self.unexpected),
                           ("shape mismatch", self.shape_mismatch)):
            if keys:
                text += f"\n  {name}: {', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''}"
        return text


def _strip(state_dict: Mapping[str, torch.Tensor], prefixes: Sequence[str]) -> Dict[str, torch.Tensor]:
    """Drop DDP's ``module.`` and the first of ``prefixes`` that any key starts with (keys without it are dropped)."""
    sd = {(k[7:] if k.startswith("module.") else k): v for k, v in state_dict.items()}
    for p in prefixes:
        if any(k.startswith(p) for k in sd):
            return {k[len(p):]: v for k, v in sd.items() if k.startswith(p)}
    return dict(sd)


def _load_into(module: nn.Module, source: Mapping[str, torch.Tensor], skip_prefix: Optional[str] = None
               ) -> LoadReport:
    target = module.state_dict()
    if skip_prefix:
        target = {k: v for k, v in target.items() if not k.startswith(skip_prefix)}
        source = {k: v for k, v in source.items() if not k.startswith(skip_prefix)}
    report = LoadReport()
    with torch.no_grad():
        for k, v in target.items():
            if k not in source:
                report.missing.append(k)
            elif tuple(source[k].shape) != tuple(v.shape):
                report.shape_mismatch.append(k)
            else:
                v.copy_(source[k].to(device=v.device, dtype=v.dtype))
                report.loaded.append(k)
    report.unexpected = [k for k in source if k not in target]
    return report


def _encoder_of(model: nn.Module, view: Optional[str]) -> nn.Module:
    encoders = getattr(model, "encoders", None)
    if isinstance(encoders, nn.ModuleDict):
        if view is None:
            if len(encoders) != 1:
                raise ValueError(f"model has encoders for {list(encoders)}: say which view to load")
            view = next(iter(encoders))
        if view not in encoders:
            raise ValueError(f"model has no encoder for view '{view}' (has {list(encoders)})")
        return encoders[view]
    encoder = getattr(model, "encoder", None)
    return encoder if isinstance(encoder, nn.Module) else model


def load_pretrained_encoder(model_or_encoder: nn.Module, encoder_state_dict: Mapping[str, torch.Tensor],
                            view: Optional[str] = None) -> LoadReport:
    """Copy pretrained encoder weights into a model's encoder (for ``view`` in multi-view models) and report.

    ``encoder_state_dict`` may carry the ``encoder.`` prefix (as :meth:`DiffusionUNet.encoder_state_dict` and DNA
    networks give it), an ``encoders.<view>.`` prefix, DDP's ``module.``, or none. Shape mismatches (e.g. a
    different number of input channels) are reported and skipped, never loaded.
    """
    encoder = _encoder_of(model_or_encoder, view)
    prefixes = ["encoder."] + ([f"encoders.{view}."] if view else [])
    return _load_into(encoder, _strip(encoder_state_dict, prefixes))


def load_pretrained_decoder(model: nn.Module, decoder_state_dict: Mapping[str, torch.Tensor]) -> LoadReport:
    """Copy pretrained decoder weights into ``model.decoder`` wherever shapes match (the output layers
    ``seg_layers.*`` usually differ and are reported as shape mismatches). DNA's ``decoder.encoder.*`` alias is
    ignored on both sides: the encoder is loaded by :func:`load_pretrained_encoder`."""
    decoder = getattr(model, "decoder", model)
    return _load_into(decoder, _strip(decoder_state_dict, ["decoder."]), skip_prefix="encoder.")


# ---------------------------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------------------------
def _freeze_unused_seg_layers(decoder: nn.Module) -> None:
    """Without deep supervision only the last output layer runs; freezing the others keeps DDP free of unused
    parameters."""
    if not decoder.deep_supervision:
        for layer in list(decoder.seg_layers)[:-1]:
            layer.requires_grad_(False)


class _SegmentationBase(nn.Module):
    """Encoders per view + the segmentation view's DNA decoder (+ optional cross-view bottleneck fusion)."""

    def _build_segmentation(self, specs_by_view: Dict[str, Dict], channels_by_view: Dict[str, int], seg_view: str,
                            num_classes: int, deep_supervision: bool, fuse_views: bool,
                            encoder_views: Sequence[str], seg_head: str = "unet") -> None:
        if seg_view not in specs_by_view:
            raise ValueError(f"segmentation view '{seg_view}' has no network spec (have {list(specs_by_view)})")
        if seg_head not in SEG_HEADS:
            raise ValueError(f"seg_head must be one of {SEG_HEADS}, got '{seg_head}'")
        if seg_head == "pyramid" and deep_supervision:
            raise ValueError("the pyramid head has a single full-resolution output: use deep_supervision=False")
        self.seg_view = seg_view
        self.seg_head = seg_head
        self.specs_by_view = dict(specs_by_view)
        net = build_network(specs_by_view[seg_view], channels_by_view[seg_view], num_classes, deep_supervision)
        encoders = {}
        for v in encoder_views:
            encoders[v] = net.encoder if v == seg_view else build_encoder(specs_by_view[v], channels_by_view[v])
        self.encoders = nn.ModuleDict(encoders)
        self.decoder: Optional[nn.Module] = None
        self.pyramid: Optional[PyramidSegmentationHead] = None
        if seg_head == "unet":
            self.decoder = net.decoder
            _freeze_unused_seg_layers(self.decoder)
        else:
            spec = specs_by_view[seg_view]
            self.pyramid = PyramidSegmentationHead(encoder_output_channels(spec), num_classes, dims=conv_dim(spec))
        self.fuse_views = bool(fuse_views)
        self.cross_view: Optional[CrossViewBottleneckFusion] = None
        if fuse_views:
            others = {v: encoder_output_channels(specs_by_view[v])[-1] for v in encoder_views if v != seg_view}
            conv_op = resolve_network_kwargs(specs_by_view[seg_view])["conv_op"]
            self.cross_view = CrossViewBottleneckFusion(encoder_output_channels(specs_by_view[seg_view])[-1], others,
                                                        conv_op)

    def bottleneck_affine(self, view: str, input_affine):
        """Affine of ``view``'s bottleneck given the affine of its input array/patch."""
        return feature_affine(input_affine, cumulative_strides(self.specs_by_view[view])[-1])

    def _other_bottleneck(self, view: str, skips: List[torch.Tensor], affine, extents: Extents) -> tuple:
        """(bottleneck, its affine, its image extent or None) of another view, as the cross-view fusion takes it."""
        extent = None
        if extents is not None and view in extents:
            stride = cumulative_strides(self.specs_by_view[view])[-1]
            extent = feature_extent(extents[view], stride)
        return skips[-1], self.bottleneck_affine(view, affine), extent

    def _segment(self, skips: Dict[str, List[torch.Tensor]], affines: Optional[Dict[str, object]],
                 extents: Extents = None):
        seg_skips = list(skips[self.seg_view])
        if self.cross_view is not None:
            if affines is None or self.seg_view not in affines:
                raise ValueError("fuse_views needs the input affines of the views: forward(inputs, affines={view: "
                                 "(B, 4, 4) index->physical}) (see orthonet.networks.cross_view)")
            others = {v: self._other_bottleneck(v, s, affines[v], extents) for v, s in skips.items()
                      if v != self.seg_view and v in affines}
            seg_skips[-1] = self.cross_view(seg_skips[-1], self.bottleneck_affine(self.seg_view,
                                                                                  affines[self.seg_view]), others)
        if self.pyramid is not None:
            first = cumulative_strides(self.specs_by_view[self.seg_view])[0]
            size = [int(n) * int(s) for n, s in zip(seg_skips[0].shape[2:], first)]
            return self.pyramid(seg_skips, size)
        return self.decoder(seg_skips)

    def segment(self, inputs: Inputs, affines: Optional[Dict[str, object]] = None, extents: Extents = None):
        """Segmentation output only (no diagnosis head): what sliding-window inference calls per tile."""
        inputs = self._as_dict(inputs)
        if self.seg_view not in inputs:
            raise ValueError(f"the segmentation view '{self.seg_view}' is missing from the inputs")
        views = [v for v in inputs if v == self.seg_view or self.cross_view is not None]
        skips = {v: self.encoders[v](inputs[v]) for v in views}
        return self._segment(skips, affines, extents)

    def _as_dict(self, inputs: Inputs) -> Dict[str, torch.Tensor]:
        if isinstance(inputs, torch.Tensor):
            return {self.seg_view: inputs}
        unknown = sorted(set(inputs) - set(self.encoders))
        if unknown:
            raise ValueError(f"unknown view(s) {unknown}; this model knows {list(self.encoders)}")
        return dict(inputs)


class SegmentationModel(_SegmentationBase):
    """The plan's U-Net for the segmentation view with orthonet's naming (``encoders.<view>``, ``decoder``).

    ``seg_head="pyramid"`` replaces the decoder by a per-voxel MLP on all encoder levels (``pyramid.*``; see
    :mod:`orthonet.networks.pyramid_head`); it has one output, so ``deep_supervision`` must be False.

    ``forward(inputs)`` takes the segmentation view's tensor (or ``{view: tensor}``) and returns DNA's output
    (a tensor, or a list of tensors from high to low resolution with deep supervision). With ``fuse_views`` the
    other views' encoders run too and their bottlenecks are sampled into the segmentation view's grid:
    ``forward(inputs, affines={view: (B, 4, 4)}, extents={view: (B, 3, 2)})`` (extents: where each crop has image).
    """

    def __init__(self, specs_by_view: Dict[str, Dict], channels_by_view: Dict[str, int], seg_view: str,
                 num_classes: int, deep_supervision: bool = False, fuse_views: bool = False, seg_head: str = "unet"):
        super().__init__()
        views = list(specs_by_view) if fuse_views else [seg_view]
        self._build_segmentation(specs_by_view, channels_by_view, seg_view, num_classes, deep_supervision,
                                 fuse_views, views, seg_head)

    def forward(self, inputs: Inputs, affines: Optional[Dict[str, object]] = None, extents: Extents = None):
        inputs = self._as_dict(inputs)
        if self.seg_view not in inputs:
            raise ValueError(f"the segmentation view '{self.seg_view}' is missing from the inputs")
        skips = {v: self.encoders[v](x) for v, x in inputs.items()}
        return self._segment(skips, affines, extents)


class MultiTaskModel(WholeExamDiagnosis, _SegmentationBase):
    """Shared per-view encoders, a segmentation decoder on ``seg_view`` and the diagnosis head over all views.

    ``forward(inputs, present=None, affines=None) -> {'seg': DNA output or None (seg view not given),
    'logits': (B, D), 'view_logits': {view: (B, D)}}``. ``head_kwargs`` go to
    :class:`orthonet.networks.diagnosis.DiagnosisHead` (pooling, hidden, dropout, view_dropout, missing_views ...).

    With ``whole_exam`` the diagnosis reads whole volumes: ``forward(patches, present, affines, whole={view:
    volumes}, shapes={view: (B, ndim)})`` segments the patches and diagnoses the whole volumes (the patches'
    skips are not pooled); ``diagnose(volumes, present, shapes)`` diagnoses alone.

    With ``fuse_views`` the segmentation also needs ``affines`` (and ``extents``) of its inputs; ``context={view:
    crops}`` gives the other views' crops aligned with the segmentation patch (``--fuse-views`` training), which the
    segmentation fuses instead of the diagnosis inputs (whole volumes, or centre crops elsewhere in the exam).
    """

    def __init__(self, specs_by_view: Dict[str, Dict], channels_by_view: Dict[str, int], seg_view: str,
                 num_classes: int, n_diagnoses: int, deep_supervision: bool = False, fusion: str = "concat",
                 levels: LevelsArg = None, fuse_views: bool = False, seg_head: str = "unet", whole_exam: bool = False,
                 feature_t: Optional[Dict[str, Optional[int]]] = None,
                 coarsen_levels: Optional[Sequence[int]] = None, **head_kwargs):
        super().__init__()
        self._build_segmentation(specs_by_view, channels_by_view, seg_view, num_classes, deep_supervision,
                                 fuse_views, list(specs_by_view), seg_head)
        self._setup_whole_exam(whole_exam, feature_t)
        self.levels = levels_by_view(specs_by_view, levels)
        self._setup_coarsening(coarsen_levels)
        level_channels = {v: [encoder_output_channels(s)[i] for i in self.levels[v]]
                          for v, s in specs_by_view.items()}
        self.diagnosis = DiagnosisHead(level_channels, n_diagnoses, fusion=fusion, **head_kwargs)

    def diagnose(self, inputs: Inputs, present: Optional[Dict[str, torch.Tensor]] = None,
                 shapes: Optional[Dict[str, torch.Tensor]] = None, **whole_kwargs) -> Dict:
        """Diagnosis outputs only (the decoder does not run): ``{'logits', 'view_logits'}``."""
        inputs = self._as_dict(inputs)
        if self.whole_exam:
            return self.diagnose_whole(inputs, present, shapes, **whole_kwargs)
        skips = {v: self.encoders[v](x) for v, x in inputs.items()}
        return self.diagnosis({v: [s[i] for i in self.levels[v]] for v, s in skips.items()}, present)

    def forward(self, inputs: Inputs, present: Optional[Dict[str, torch.Tensor]] = None,
                affines: Optional[Dict[str, object]] = None, whole: Optional[Dict[str, torch.Tensor]] = None,
                shapes: Optional[Dict[str, torch.Tensor]] = None, context: Optional[Dict[str, torch.Tensor]] = None,
                extents: Extents = None) -> Dict:
        inputs = self._as_dict(inputs)
        context = self._as_dict(context) if context is not None else None
        if self.whole_exam:
            if whole is None:
                raise ValueError("this multitask model diagnoses whole exams: forward(patches, present, affines, "
                                 "whole={view: volumes}, shapes={view: (B, ndim)})")
            out = self.diagnose_whole(self._as_dict(whole), present, shapes)
            out["seg"] = None
            if self.seg_view in inputs:
                seg_inputs = inputs if context is None else {self.seg_view: inputs[self.seg_view], **context}
                out["seg"] = self.segment(seg_inputs, affines, extents)
            return out
        skips = {v: self.encoders[v](x) for v, x in inputs.items()}
        out = self.diagnosis({v: [s[i] for i in self.levels[v]] for v, s in skips.items()}, present)
        if self.seg_view not in skips:
            out["seg"] = None
            return out
        seg_skips = skips if context is None else \
            {self.seg_view: skips[self.seg_view], **{v: self.encoders[v](x) for v, x in context.items()}}
        out["seg"] = self._segment(seg_skips, affines, extents)
        return out
