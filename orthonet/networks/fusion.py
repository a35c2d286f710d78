"""Fusion of the views' pooled features into one logit per diagnosis.

Both modules take ``pooled: {view: (B, D_view)}`` for the views that were given and an optional
``present: {view: (B,) bool}`` mask (views absent from ``pooled`` count as missing for the whole batch). A missing view
never breaks the forward pass:

* :class:`ConcatMLPFusion` (default) substitutes a learned per-view 'missing' token and appends presence flags;
* :class:`CrossViewAttentionFusion` masks the view's token out of the attention;
* :class:`ViewGatingFusion` (per-label view gating) gives each view its own logits and lets each diagnosis learn how
  much to trust each view (a softmax over the present views, per label): the MCL is best judged on coronal, the
  ACL on sagittal. A missing view gets gate weight 0.

Missing tokens enter through ``torch.where`` so they are part of every graph: DistributedDataParallel sees all
parameters used even when no view is missing.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from orthonet.networks.heads import normalized_mlp


def presence_masks(views: Sequence[str], pooled: Dict[str, torch.Tensor],
                   present: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
    """(B,) bool mask per view: given in ``pooled`` and not masked out by ``present``."""
    if not pooled:
        raise ValueError("at least one view is needed")
    ref = next(iter(pooled.values()))
    batch, device = ref.shape[0], ref.device
    out = {}
    for v in views:
        if v not in pooled:
            out[v] = torch.zeros(batch, dtype=torch.bool, device=device)
        elif present is not None and v in present:
            out[v] = present[v].to(device=device, dtype=torch.bool).reshape(batch)
        else:
            out[v] = torch.ones(batch, dtype=torch.bool, device=device)
    return out


def _check_views(views: Sequence[str], pooled: Dict[str, torch.Tensor]) -> None:
    unknown = sorted(set(pooled) - set(views))
    if unknown:
        raise ValueError(f"unknown view(s) {unknown}; this model knows {list(views)}")


class ConcatMLPFusion(nn.Module):
    """Per-view LayerNorm + Linear to ``d_model``, concatenation (missing views -> learned token) with presence
    flags, then an MLP (:func:`normalized_mlp`, which cannot die) to ``n_diagnoses`` logits."""

    def __init__(self, view_dims: Dict[str, int], n_diagnoses: int, d_model: int = 128, hidden: int = 256,
                 dropout: float = 0.2):
        super().__init__()
        self.views = list(view_dims)
        self.proj = nn.ModuleDict({v: nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d_model))
                                   for v, d in view_dims.items()})
        self.missing = nn.ParameterDict({v: nn.Parameter(torch.randn(d_model) * 0.02) for v in self.views})
        n = len(self.views)
        self.mlp = normalized_mlp(n * d_model + n, hidden, n_diagnoses, dropout)

    def forward(self, pooled: Dict[str, torch.Tensor], present: Optional[Dict[str, torch.Tensor]] = None
                ) -> torch.Tensor:
        _check_views(self.views, pooled)
        masks = presence_masks(self.views, pooled, present)
        batch = next(iter(pooled.values())).shape[0]
        parts: List[torch.Tensor] = []
        for v in self.views:
            missing = self.missing[v].unsqueeze(0).expand(batch, -1)
            token = self.proj[v](pooled[v]) if v in pooled else missing
            parts.append(torch.where(masks[v][:, None], token, missing.to(token.dtype)))
        flags = torch.stack([masks[v] for v in self.views], dim=1).to(parts[0].dtype)
        return self.mlp(torch.cat(parts + [flags], dim=1))


class CrossViewAttentionFusion(nn.Module):
    """One token per view (projection + learned view embedding) plus a [CLS] token; a small Transformer encoder
    lets the views attend to each other (missing views are masked out); [CLS] -> LayerNorm -> Linear."""

    def __init__(self, view_dims: Dict[str, int], n_diagnoses: int, d_model: int = 128, n_heads: int = 4,
                 n_layers: int = 1, dropout: float = 0.1):
        super().__init__()
        self.views = list(view_dims)
        self.proj = nn.ModuleDict({v: nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d_model))
                                   for v, d in view_dims.items()})
        self.view_embed = nn.ParameterDict({v: nn.Parameter(torch.randn(d_model) * 0.02) for v in self.views})
        self.cls = nn.Parameter(torch.randn(d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(d_model, n_heads, 2 * d_model, dropout, batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.out = nn.Sequential(nn.LayerNorm(d_model), nn.Linear(d_model, n_diagnoses))

    def forward(self, pooled: Dict[str, torch.Tensor], present: Optional[Dict[str, torch.Tensor]] = None
                ) -> torch.Tensor:
        _check_views(self.views, pooled)
        masks = presence_masks(self.views, pooled, present)
        ref = next(iter(pooled.values()))
        batch = ref.shape[0]
        tokens = [self.cls.unsqueeze(0).expand(batch, -1)]
        for v in self.views:
            embed = self.view_embed[v].unsqueeze(0).expand(batch, -1)
            token = self.proj[v](pooled[v]) + embed if v in pooled else embed
            tokens.append(torch.where(masks[v][:, None], token, embed.to(token.dtype)))
        x = torch.stack(tokens, dim=1)                                  # (B, 1 + V, d)
        ignore = torch.stack([torch.zeros(batch, dtype=torch.bool, device=ref.device)]
                             + [~masks[v] for v in self.views], dim=1)  # True = not attended to
        x = self.encoder(x, src_key_padding_mask=ignore)
        return self.out(x[:, 0])


class ViewGatingFusion(nn.Module):
    """Per-label view gating: per view LayerNorm + Linear to ``d_model`` -> GELU -> (logits (D), gate scores (D));
    the fused logit of diagnosis d is the gate-weighted sum over present views. ``last_gates`` keeps the latest
    (B, V, D) weights so a report can say which view decided each diagnosis."""

    def __init__(self, view_dims: Dict[str, int], n_diagnoses: int, d_model: int = 128, dropout: float = 0.1):
        super().__init__()
        self.views = list(view_dims)
        self.proj = nn.ModuleDict({v: nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d_model), nn.GELU(),
                                                    nn.Dropout(dropout)) for v, d in view_dims.items()})
        self.logit = nn.ModuleDict({v: nn.Linear(d_model, n_diagnoses) for v in self.views})
        self.gate = nn.ModuleDict({v: nn.Linear(d_model, n_diagnoses) for v in self.views})
        self.last_gates: Optional[torch.Tensor] = None

    def forward(self, pooled: Dict[str, torch.Tensor], present: Optional[Dict[str, torch.Tensor]] = None
                ) -> torch.Tensor:
        _check_views(self.views, pooled)
        masks = presence_masks(self.views, pooled, present)
        ref = next(iter(pooled.values()))
        logits, gates, valid = [], [], []
        for v in self.views:
            if v not in pooled:
                continue
            h = self.proj[v](pooled[v])
            logits.append(self.logit[v](h).float())
            gates.append(self.gate[v](h).float())
            valid.append(masks[v])
        lg, gt = torch.stack(logits, 1), torch.stack(gates, 1)                  # (B, V_given, D)
        m = torch.stack(valid, 1)[..., None]                                     # (B, V_given, 1)
        m = m | ~m.any(dim=1, keepdim=True)          # no view present at all: plain average (never NaN)
        w = torch.softmax(gt.masked_fill(~m, -1e4), dim=1)
        self.last_gates = w.detach()
        return (w * lg).sum(1).to(ref.dtype)


FUSIONS = {"concat": ConcatMLPFusion, "attention": CrossViewAttentionFusion, "gating": ViewGatingFusion}


def make_fusion(name: str, view_dims: Dict[str, int], n_diagnoses: int, **kwargs) -> nn.Module:
    if name not in FUSIONS:
        raise ValueError(f"unknown fusion '{name}' (use {sorted(FUSIONS)})")
    return FUSIONS[name](view_dims, n_diagnoses, **kwargs)
