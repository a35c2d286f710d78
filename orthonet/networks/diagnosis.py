"""Multi-view, multi-label diagnosis: one encoder per view, pooled per level, fused across views.

State-dict naming shared by every orthonet task model (so checkpoints move between them):

* ``encoders.<view>.*`` — the DNA encoder of each view (same keys as ``build_network(...).encoder``);
* ``decoder.*`` — the DNA UNetDecoder of the segmentation view (segmentation / multitask models only);
* ``diagnosis.poolers.<view>.*``, ``diagnosis.view_heads.<view>.*``, ``diagnosis.fusion.*`` — the diagnosis head;
* ``cross_view.*`` — the optional cross-view bottleneck fusion (``--fuse-views``).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from orthonet.networks.build import build_encoder, encoder_output_channels, resolve_levels
from orthonet.networks.fusion import make_fusion, presence_masks
from orthonet.networks.heads import POOLING_MODES, MultiLevelPooling, ViewDiagnosisHead

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
        self.poolers = nn.ModuleDict({v: MultiLevelPooling(ch, pooling) for v, ch in level_channels_by_view.items()})
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
                present: Optional[Dict[str, torch.Tensor]] = None) -> Dict:
        unknown = sorted(set(features_by_view) - set(self.views))
        if unknown:
            raise ValueError(f"unknown view(s) {unknown}; this model knows {self.views}")
        pooled = {v: self.poolers[v](f) for v, f in features_by_view.items()}
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


class MultiViewDiagnosisModel(nn.Module):
    """One DNA encoder per view (built with :func:`build_encoder`, so pretrained encoders load) + :class:`DiagnosisHead`.

    ``forward(inputs: {view: (B, C, *spatial)}, present=None) -> {'logits': (B, D), 'view_logits': {view: (B, D)}}``.
    Any subset of views may be given. Shape-agnostic (global pooling): whole volumes or patches.
    """

    def __init__(self, specs_by_view: Dict[str, Dict], channels_by_view: Dict[str, int], n_diagnoses: int,
                 fusion: str = "concat", levels: LevelsArg = None, **head_kwargs):
        super().__init__()
        self.specs_by_view = dict(specs_by_view)
        self.levels = levels_by_view(specs_by_view, levels)
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

    def forward(self, inputs: Dict[str, torch.Tensor], present: Optional[Dict[str, torch.Tensor]] = None) -> Dict:
        skips = self.encode(inputs)
        return self.diagnosis({v: [s[i] for i in self.levels[v]] for v, s in skips.items()}, present)

    def diagnose(self, inputs: Dict[str, torch.Tensor], present: Optional[Dict[str, torch.Tensor]] = None) -> Dict:
        """Same as ``forward``; the name every diagnosis-capable orthonet model shares."""
        return self.forward(inputs, present)
