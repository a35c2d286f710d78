"""Global pooling of encoder feature maps and the per-view diagnosis head.

Why global pooling: a diagnosis is a property of the whole exam, and pooling over all voxels makes the heads
independent of the input size, so the same weights work on whole volumes and on patches.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from orthonet.networks.mil import NEG, GatedAttentionMIL, flat_mask

#: Default pooling of every encoder level. Mean pooling alone is weak on DNA encoders: their stages end in
#: InstanceNorm, so the spatial mean of a channel is nearly the same for every exam; max pooling keeps a focal
#: finding undiluted, attention pooling learns where to look.
POOLING_MODES = ("mean", "max", "attention")
#: ``mil``: per-diagnosis gated attention-MIL (:class:`orthonet.networks.mil.GatedAttentionMIL`), the whole-exam
#: models' default (:data:`WHOLE_EXAM_POOLING`).
ALL_POOLING_MODES = POOLING_MODES + ("mil",)
WHOLE_EXAM_POOLING = ("mil",)


def _masked(x: torch.Tensor, mask: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Flattened float features (B, C, N) and their (B, 1, N) validity mask (all True without ``mask``)."""
    return x.flatten(2).float(), flat_mask(mask, x)[:, None]


class MeanPool(nn.Module):
    """Global average over all spatial positions: (B, C, *spatial) -> (B, C)."""

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        f, m = _masked(x, mask)
        return (f * m).sum(-1) / m.sum(-1).clamp(min=1)


class MaxPool(nn.Module):
    """Global maximum over all spatial positions: (B, C, *spatial) -> (B, C). A focal lesion that lights up a few
    voxels of a channel survives max pooling undiluted."""

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        f, m = _masked(x, mask)
        return f.masked_fill(~m, float("-inf")).amax(-1)


class AttentionPool(nn.Module):
    """Learned attention over voxels (Ilse et al. 2018): score_n = w^T tanh(V h_n), softmax over n, then the
    score-weighted sum of h. Lets a small lesion dominate the pooled vector where a mean would dilute it."""

    def __init__(self, channels: int, hidden: int = 0):
        super().__init__()
        hidden = hidden or max(16, channels // 2)
        self.key = nn.Linear(channels, hidden)
        self.score = nn.Linear(hidden, 1)

    def attention(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Attention weights (B, N) over the flattened spatial positions (sum to 1 per sample)."""
        h = x.flatten(2).transpose(1, 2)                       # (B, N, C)
        logits = self.score(torch.tanh(self.key(h))).squeeze(-1).float()
        return torch.softmax(logits.masked_fill(~flat_mask(mask, x), NEG), dim=1)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        w = self.attention(x, mask)
        return torch.bmm(x.flatten(2).float(), w.unsqueeze(-1)).squeeze(-1)


def make_pool(mode: str, channels: int, heads: int = 1) -> nn.Module:
    """A pooling module; ``heads`` is the number of attention heads of ``mil`` (one per diagnosis)."""
    if mode == "mil":
        return GatedAttentionMIL(channels, heads)
    if mode == "mean":
        return MeanPool()
    if mode == "max":
        return MaxPool()
    if mode == "attention":
        return AttentionPool(channels)
    raise ValueError(f"unknown pooling '{mode}' (use {ALL_POOLING_MODES})")


class MultiLevelPooling(nn.Module):
    """Pool each selected encoder level with every mode in ``modes`` and concatenate: (B, out_dim).

    ``forward`` takes the feature maps of the selected levels in order (one per entry of ``channels``) and
    optionally their validity masks ((B, *spatial) bool, True = covers real voxels; see
    :func:`orthonet.networks.whole_exam.feature_masks`), which keep zero padding out of every pool.
    """

    def __init__(self, channels: Sequence[int], modes: Sequence[str] = POOLING_MODES, heads: int = 1):
        super().__init__()
        self.channels = [int(c) for c in channels]
        self.modes = list(modes)
        self.pools = nn.ModuleList(nn.ModuleList(make_pool(m, c, heads) for m in self.modes)
                                   for c in self.channels)
        self.out_dim = sum(getattr(p, "out_dim", c) for c, pools in zip(self.channels, self.pools) for p in pools)

    def forward(self, features: Sequence[torch.Tensor], masks: Optional[Sequence[torch.Tensor]] = None
                ) -> torch.Tensor:
        if len(features) != len(self.channels):
            raise ValueError(f"expected {len(self.channels)} feature levels, got {len(features)}")
        masks = list(masks) if masks is not None else [None] * len(features)
        out: List[torch.Tensor] = []
        for f, m, pools in zip(features, masks, self.pools):
            out.extend(p(f, m) for p in pools)
        return torch.cat(out, dim=1)

    def attention_maps(self, features: Sequence[torch.Tensor], masks: Optional[Sequence[torch.Tensor]] = None
                       ) -> List[torch.Tensor]:
        """Per level, the attention weights (B, heads, *spatial) of its first attention pool (``mil`` heads, or
        the single-head ``attention`` pool); levels without one are skipped."""
        masks = list(masks) if masks is not None else [None] * len(features)
        maps = []
        for f, m, pools in zip(features, masks, self.pools):
            for p in pools:
                if hasattr(p, "attention"):
                    w = p.attention(f, m)
                    maps.append(w if w.ndim == f.ndim else w.reshape(f.shape[0], 1, *f.shape[2:]))
                    break
        return maps


def normalized_mlp(in_dim: int, hidden: int, out_dim: int, dropout: float) -> nn.Sequential:
    """Linear -> LayerNorm -> GELU -> Dropout -> Linear.

    Why the LayerNorm on the hidden pre-activations: it keeps about half of the GELU units active for every input,
    whatever the optimiser does. Without it, SGD with nnU-Net's momentum 0.99 (the multitask trainer's optimiser)
    drove every hidden unit negative after a loss spike in the 10 %-label benchmark, and the head then gave the
    same probabilities for every exam (macro AUC exactly 0.5) for the rest of training.
    """
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Dropout(dropout),
                         nn.Linear(hidden, out_dim))


class ViewDiagnosisHead(nn.Module):
    """Per-view logits: pooled features -> LayerNorm -> :func:`normalized_mlp` -> ``n_diagnoses`` logits.

    The first LayerNorm puts features of different levels and views on one scale before the MLP.
    """

    def __init__(self, in_dim: int, n_diagnoses: int, hidden: int = 256, dropout: float = 0.2):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(in_dim), *normalized_mlp(in_dim, hidden, n_diagnoses, dropout))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.net(pooled)
