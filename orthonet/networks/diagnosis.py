"""Multi-view, multi-label diagnosis: one encoder per view, pooled per level, fused across views.

State-dict naming shared by every orthonet task model (so checkpoints move between them):

* ``encoders.<view>.*`` — the DNA encoder of each view (same keys as ``build_network(...).encoder``);
* ``decoder.*`` — the DNA UNetDecoder of the segmentation view (segmentation / multitask models only);
* ``diagnosis.poolers.<view>.*``, ``diagnosis.view_heads.<view>.*``, ``diagnosis.fusion.*`` — the diagnosis head;
* ``cross_view.*`` — the optional cross-view bottleneck fusion (``--fuse-views``).

Two ways to feed the diagnosis head (``whole_exam``, recorded in the model description as ``diagnosis_input``):
``True`` (new models) runs each view's encoder over the whole stride-padded volume and pools with per-diagnosis
attention-MIL under validity masks (:mod:`orthonet.networks.whole_exam`); ``False`` is the old centre-crop model,
kept so checkpoints written before whole-exam diagnosis still load and predict as they were trained.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from orthonet.errors import OrthoError
from orthonet.networks.build import build_encoder, cumulative_strides, encoder_output_channels, resolve_levels
from orthonet.networks.fusion import make_fusion, presence_masks
from orthonet.networks.heads import POOLING_MODES, MultiLevelPooling, ViewDiagnosisHead
from orthonet.networks.whole_exam import (coarsen_kernel, coarsen_level, diffusion_noise, encode_tiled, feature_masks,
                                          pad_to_stride, padded_shape, run_encoder, total_stride)

LevelsArg = Union[None, Sequence[int], Dict[str, Optional[Sequence[int]]]]
MISSING_VIEW_POLICIES = ("fusion", "average")


def levels_by_view(specs_by_view: Dict[str, Dict], levels: LevelsArg) -> Dict[str, List[int]]:
    """Resolved (non-negative) encoder levels per view; ``levels`` may be one sequence for all views or a dict."""
    out = {}
    for view, spec in specs_by_view.items():
        lv = levels.get(view) if isinstance(levels, dict) else levels
        out[view] = resolve_levels(lv, len(encoder_output_channels(spec)))
    return out


class DiagnosisHead(nn.Module):
    """Pooling per view and level, per-view auxiliary heads and the cross-view fusion.

    ``forward(features_by_view, present=None)`` takes ``{view: [level feature maps]}`` (the selected levels, in
    order) and returns ``{'logits': (B, D), 'view_logits': {view: (B, D)}}``.

    * ``view_dropout`` (training only): each view of each sample is hidden from the fusion with this probability
      (never all views of a sample), which trains the fusion's 'missing view' path.
    * ``missing_views``: 'fusion' (default) lets the fusion handle missing views (learned missing token / masking);
      'average' replaces the fused logits of samples with a missing view by the mean of their present views'
      auxiliary logits.
    """

    def __init__(self, level_channels_by_view: Dict[str, Sequence[int]], n_diagnoses: int, fusion: str = "concat",
                 pooling: Sequence[str] = POOLING_MODES, hidden: int = 256, dropout: float = 0.2,
                 view_dropout: float = 0.1, missing_views: str = "fusion", fusion_kwargs: Optional[Dict] = None):
        super().__init__()
        if missing_views not in MISSING_VIEW_POLICIES:
            raise ValueError(f"missing_views must be one of {MISSING_VIEW_POLICIES}")
        self.views = list(level_channels_by_view)
        self.n_diagnoses = int(n_diagnoses)
        self.view_dropout = float(view_dropout)
        self.missing_views = missing_views
        self.poolers = nn.ModuleDict({v: MultiLevelPooling(ch, pooling, heads=self.n_diagnoses)
                                      for v, ch in level_channels_by_view.items()})
        dims = {v: p.out_dim for v, p in self.poolers.items()}
        self.view_heads = nn.ModuleDict({v: ViewDiagnosisHead(d, n_diagnoses, hidden, dropout)
                                         for v, d in dims.items()})
        self.fusion = make_fusion(fusion, dims, n_diagnoses, **(fusion_kwargs or {}))

    def _drop_views(self, masks: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        stacked = torch.stack([masks[v] for v in self.views], dim=1)        # (B, V)
        keep = torch.rand(stacked.shape, device=stacked.device) >= self.view_dropout
        dropped = stacked & keep
        none_left = ~dropped.any(dim=1, keepdim=True)
        dropped = torch.where(none_left, stacked, dropped)                  # never hide every view of a sample
        return {v: dropped[:, i] for i, v in enumerate(self.views)}

    def forward(self, features_by_view: Dict[str, Sequence[torch.Tensor]],
                present: Optional[Dict[str, torch.Tensor]] = None,
                masks: Optional[Dict[str, Sequence[torch.Tensor]]] = None) -> Dict:
        unknown = sorted(set(features_by_view) - set(self.views))
        if unknown:
            raise ValueError(f"unknown view(s) {unknown}; this model knows {self.views}")
        masks = masks or {}
        pooled = {v: self.poolers[v](f, masks.get(v)) for v, f in features_by_view.items()}
        view_logits = {v: self.view_heads[v](p) for v, p in pooled.items()}
        masks = presence_masks(self.views, pooled, present)
        fusion_masks = self._drop_views(masks) if self.training and self.view_dropout > 0 else masks
        logits = self.fusion(pooled, fusion_masks)
        if self.missing_views == "average":
            m = torch.stack([masks[v] for v in pooled], dim=1).to(logits.dtype)          # (B, V_given)
            vl = torch.stack([view_logits[v].to(logits.dtype) for v in pooled], dim=1)   # (B, V_given, D)
            avg = (vl * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp(min=1)
            complete = torch.stack([masks[v] for v in self.views], dim=1).all(dim=1, keepdim=True)
            logits = torch.where(complete, logits, avg)
        return {"logits": logits, "view_logits": view_logits}


class WholeExamDiagnosis:
    """Whole-volume diagnosis for models with ``encoders``, ``levels``, ``specs_by_view`` and ``diagnosis``.

    * ``checkpoint_encoders`` (set by the trainer): gradient checkpointing per encoder stage while training: True,
      False, or ``"auto"``: only for batches of more than ``checkpoint_min_voxels`` voxels (batch x volume), where
      the saved activations would crowd memory; below that the recomputation would only cost time (an extra
      encoder forward per step).
    * ``feature_t``: {view: timestep or None}, OrthoDiffusion's diffusion features (input noised to t).
    * ``tile``: with gradients off, volumes larger than ``tile_voxels`` voxels are encoded tile by tile.
    * ``coarsened``: {view: [selected levels]} whose maps (and masks) are max-pooled onto the next coarser encoder
      level's grid before the head (:func:`orthonet.networks.whole_exam.coarsen_level`): fine detail at the
      pooling cost of a coarse level.
    """

    checkpoint_encoders: Union[bool, str] = False
    checkpoint_min_voxels: int = 2 ** 21      # about 2 M voxels: 2 exams of 32 x 180 x 180
    tile_voxels: int = 96 * 192 * 192

    def _checkpoint(self, x: torch.Tensor) -> bool:
        """Whether this training forward checkpoints the encoder stages (see ``checkpoint_encoders``)."""
        if not (self.training and torch.is_grad_enabled()) or not self.checkpoint_encoders:
            return False
        if self.checkpoint_encoders == "auto":
            return x.shape[0] * x[0, 0].numel() > self.checkpoint_min_voxels
        return True

    def _setup_whole_exam(self, whole_exam: bool, feature_t: Optional[Dict[str, Optional[int]]]) -> None:
        self.whole_exam = bool(whole_exam)
        unknown = sorted(set(feature_t or {}) - set(self.specs_by_view))
        if unknown:
            raise ValueError(f"feature_t names unknown view(s) {unknown}; the model has {list(self.specs_by_view)}")
        self.feature_t = {v: (None if t is None else int(t)) for v, t in (feature_t or {}).items()}

    def _setup_coarsening(self, coarsen_levels: Optional[Sequence[int]]) -> None:
        """Resolve ``coarsen_levels`` (as in ``levels``; needs ``self.levels``) per view; each must be a selected
        level with a coarser encoder level after it."""
        self.coarsened = {}
        for v, spec in self.specs_by_view.items():
            n = len(encoder_output_channels(spec))
            chosen = resolve_levels(list(coarsen_levels), n) if coarsen_levels else []
            bad = [lv for lv in chosen if lv not in self.levels[v] or lv == n - 1]
            if bad:
                raise OrthoError(f"coarsen_levels {list(coarsen_levels)}: level(s) {bad} of view '{v}' are not "
                                 f"selected diagnosis levels {self.levels[v]} with a coarser level after them",
                                 fix="name levels of --diagnosis-levels other than the deepest (e.g. -3 with the "
                                     "default -3 -2 -1)")
            self.coarsened[v] = chosen

    def _whole_features(self, view: str, x: torch.Tensor, shape: torch.Tensor,
                        generator: Optional[torch.Generator], tile: Optional[Sequence[int]]):
        spec = self.specs_by_view[view]
        x = pad_to_stride(x, total_stride(spec))
        t = self.feature_t.get(view)
        if t is not None:
            x = diffusion_noise(x, t, shape, generator)
        levels = self.levels[view]
        stride = total_stride(spec)
        sizes = [_encoded_size(s, stride) for s in shape.tolist()]
        largest = [max(sz[a] for sz in sizes) for a in range(x.ndim - 2)]
        if any(n > m for n, m in zip(largest, x.shape[2:])):
            x = pad_to_stride(x, stride, [max(n, m) for n, m in zip(largest, x.shape[2:])])
        if all(sz == list(x.shape[2:]) for sz in sizes):
            feats = self._encode(view, x, tile)
        else:
            # exams of different sizes run one by one on their own extent: instance norm must not see the batch
            # padding (its statistics would change, and with them the logits of the smaller exam)
            per = [self._encode(view, x[(slice(i, i + 1), slice(None)) + tuple(slice(0, n) for n in sz)], tile)
                   for i, sz in enumerate(sizes)]
            feats = []
            for k in range(len(levels)):
                target = [max(p[k].shape[2 + a] for p in per) for a in range(x.ndim - 2)]
                feats.append(torch.cat([pad_to_stride(p[k], [1] * len(target), target) for p in per]))
        strides = [cumulative_strides(spec)[i] for i in levels]
        masks = feature_masks(shape.to(x.device), strides, [f.shape[2:] for f in feats])
        pooled = self.coarsened.get(view, [])
        if pooled:
            fm = [coarsen_level(f, m, coarsen_kernel(spec, lv)) if lv in pooled else (f, m)
                  for f, m, lv in zip(feats, masks, levels)]
            feats, masks = [f for f, _ in fm], [m for _, m in fm]
        return feats, masks

    def _encode(self, view: str, x: torch.Tensor, tile: Optional[Sequence[int]]) -> List[torch.Tensor]:
        """The selected levels' feature maps of stride-padded volumes of one size (tiled when asked or large)."""
        spec, levels = self.specs_by_view[view], self.levels[view]
        big = x[0, 0].numel() > self.tile_voxels
        if not torch.is_grad_enabled() and x.shape[0] == 1 and (tile is not None or big):
            tile = tile or _default_tile(x.shape[2:], self.tile_voxels, total_stride(spec))
            return encode_tiled(self.encoders[view], x, spec, levels, tile)
        skips = run_encoder(self.encoders[view], x, self._checkpoint(x))
        return [skips[i] for i in levels]

    def whole_features(self, inputs: Dict[str, torch.Tensor], shapes: Optional[Dict[str, torch.Tensor]] = None,
                       generator: Optional[torch.Generator] = None, tile: Optional[Sequence[int]] = None):
        """({view: [level maps]}, {view: [level masks]}) of whole (possibly batch-padded) volumes; ``shapes``
        {view: (B, ndim)} gives each sample's unpadded size (default: the tensors' own size)."""
        unknown = sorted(set(inputs) - set(self.encoders))
        if unknown:
            raise ValueError(f"unknown view(s) {unknown}; this model knows {list(self.encoders)}")
        feats, masks = {}, {}
        for v, x in inputs.items():
            shape = (shapes or {}).get(v)
            if shape is None:
                shape = torch.tensor([list(x.shape[2:])] * x.shape[0])
            feats[v], masks[v] = self._whole_features(v, x, torch.as_tensor(shape), generator, tile)
        return feats, masks

    def diagnose_whole(self, inputs: Dict[str, torch.Tensor], present: Optional[Dict[str, torch.Tensor]] = None,
                       shapes: Optional[Dict[str, torch.Tensor]] = None, generator: Optional[torch.Generator] = None,
                       tile: Optional[Sequence[int]] = None) -> Dict:
        feats, masks = self.whole_features(inputs, shapes, generator, tile)
        return self.diagnosis(feats, present, masks)

    def diagnosis_attention(self, inputs: Dict[str, torch.Tensor], generator: Optional[torch.Generator] = None,
                            tile: Optional[Sequence[int]] = None) -> Dict[str, torch.Tensor]:
        """Per view, the attention-MIL weights as a saliency map on the (unpadded) input grid: (B, heads, *spatial)
        (one head per diagnosis), each level's map upsampled and the levels averaged, normalised to max 1."""
        feats, masks = self.whole_features(inputs, None, generator, tile)
        out = {}
        for v, x in inputs.items():
            maps = self.diagnosis.poolers[v].attention_maps(feats[v], masks[v])
            if not maps:
                raise ValueError(f"the diagnosis head of view '{v}' has no attention pooling")
            size = padded_shape(x.shape[2:], total_stride(self.specs_by_view[v]))
            up = [torch.nn.functional.interpolate(m.float(), size=size, mode="trilinear" if m.ndim == 5
                                                  else "bilinear", align_corners=False) for m in maps]
            sal = torch.stack(up).mean(0)[(slice(None), slice(None)) + tuple(slice(0, n) for n in x.shape[2:])]
            peak = sal.flatten(2).amax(-1).clamp(min=1e-12)
            out[v] = sal / peak.reshape(*peak.shape, *([1] * (sal.ndim - 2)))
        return out


def _encoded_size(shape: Sequence[int], stride: Sequence[int]) -> List[int]:
    """The stride-padded extent one sample is encoded on. An absent view (size 0: the exam lacks it) runs on two
    total strides of zeros, so the deepest level keeps more than one position for instance norm; its features are
    masked out (mask all False) and the view is marked absent, yet every encoder parameter stays in the graph (DDP
    expects that of each rank, whatever views its batch lacks)."""
    if any(int(n) <= 0 for n in shape):
        return [2 * int(s) for s in stride]
    return padded_shape([int(n) for n in shape], stride)


def _default_tile(spatial: Sequence[int], voxels: int, stride: Sequence[int]) -> List[int]:
    """A tile of about ``voxels`` voxels: the thick-slice axis kept whole where possible, in-plane axes shrunk."""
    tile = [int(n) for n in spatial]
    while int(np.prod(tile)) > voxels:
        i = int(np.argmax(tile))
        smallest = min(int(spatial[i]), 2 * int(stride[i]))   # the deepest level keeps > 1 position per axis
        nxt = max(smallest, (tile[i] // 2 + int(stride[i]) - 1) // int(stride[i]) * int(stride[i]))
        if nxt == tile[i]:
            break
        tile[i] = nxt
    return tile


class MultiViewDiagnosisModel(WholeExamDiagnosis, nn.Module):
    """One DNA encoder per view (built with :func:`build_encoder`, so pretrained encoders load) + :class:`DiagnosisHead`.

    ``forward(inputs: {view: (B, C, *spatial)}, present=None) -> {'logits': (B, D), 'view_logits': {view: (B, D)}}``.
    Any subset of views may be given. With ``whole_exam`` the inputs are whole volumes (batch-padded, their sizes
    in ``shapes``); without, the old centre-crop model (global pooling of patches).
    """

    def __init__(self, specs_by_view: Dict[str, Dict], channels_by_view: Dict[str, int], n_diagnoses: int,
                 fusion: str = "concat", levels: LevelsArg = None, whole_exam: bool = False,
                 feature_t: Optional[Dict[str, Optional[int]]] = None,
                 coarsen_levels: Optional[Sequence[int]] = None, **head_kwargs):
        super().__init__()
        self.specs_by_view = dict(specs_by_view)
        self._setup_whole_exam(whole_exam, feature_t)
        self.levels = levels_by_view(specs_by_view, levels)
        self._setup_coarsening(coarsen_levels)
        self.encoders = nn.ModuleDict({v: build_encoder(s, channels_by_view[v]) for v, s in specs_by_view.items()})
        level_channels = {v: [encoder_output_channels(s)[i] for i in self.levels[v]]
                          for v, s in specs_by_view.items()}
        self.diagnosis = DiagnosisHead(level_channels, n_diagnoses, fusion=fusion, **head_kwargs)

    def encode(self, inputs: Dict[str, torch.Tensor]) -> Dict[str, List[torch.Tensor]]:
        """All encoder skips per given view."""
        unknown = sorted(set(inputs) - set(self.encoders))
        if unknown:
            raise ValueError(f"unknown view(s) {unknown}; this model knows {list(self.encoders)}")
        return {v: self.encoders[v](x) for v, x in inputs.items()}

    def forward(self, inputs: Dict[str, torch.Tensor], present: Optional[Dict[str, torch.Tensor]] = None,
                shapes: Optional[Dict[str, torch.Tensor]] = None, **whole_kwargs) -> Dict:
        if self.whole_exam:
            return self.diagnose_whole(inputs, present, shapes, **whole_kwargs)
        skips = self.encode(inputs)
        return self.diagnosis({v: [s[i] for i in self.levels[v]] for v, s in skips.items()}, present)

    def diagnose(self, inputs: Dict[str, torch.Tensor], present: Optional[Dict[str, torch.Tensor]] = None,
                 shapes: Optional[Dict[str, torch.Tensor]] = None, **whole_kwargs) -> Dict:
        """Same as ``forward``; the name every diagnosis-capable orthonet model shares."""
        return self.forward(inputs, present, shapes, **whole_kwargs)
