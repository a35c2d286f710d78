"""Global pooling of encoder feature maps and the per-view diagnosis head.

Why global pooling: a diagnosis is a property of the whole exam, and pooling over all voxels makes the heads
independent of the input size, so the same weights work on whole volumes and on patches.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
from torch import nn

#: Default pooling of every encoder level. Mean pooling alone is weak on DNA encoders: their stages end in
#: InstanceNorm, so the spatial mean of a channel is nearly the same for every exam; max pooling keeps a focal
#: finding undiluted, attention pooling learns where to look.
POOLING_MODES = ("mean", "max", "attention")
ALL_POOLING_MODES = POOLING_MODES


class MeanPool(nn.Module):
    """Global average over all spatial positions: (B, C, *spatial) -> (B, C)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).float().mean(-1)


class MaxPool(nn.Module):
    """Global maximum over all spatial positions: (B, C, *spatial) -> (B, C). A focal lesion that lights up a few
    voxels of a channel survives max pooling undiluted."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).float().amax(-1)


class AttentionPool(nn.Module):
    """Learned attention over voxels (Ilse et al. 2018): score_n = w^T tanh(V h_n), softmax over n, then the
    score-weighted sum of h. Lets a small lesion dominate the pooled vector where a mean would dilute it."""

    def __init__(self, channels: int, hidden: int = 0):
        super().__init__()
        hidden = hidden or max(16, channels // 2)
        self.key = nn.Linear(channels, hidden)
        self.score = nn.Linear(hidden, 1)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """Attention weights (B, N) over the flattened spatial positions (sum to 1 per sample)."""
        h = x.flatten(2).transpose(1, 2)                       # (B, N, C)
        logits = self.score(torch.tanh(self.key(h))).squeeze(-1)
        return torch.softmax(logits.float(), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.attention(x)
        return torch.bmm(x.flatten(2).float(), w.unsqueeze(-1)).squeeze(-1)


def make_pool(mode: str, channels: int) -> nn.Module:
    if mode == "mean":
        return MeanPool()
    if mode == "max":
        return MaxPool()
    if mode == "attention":
        return AttentionPool(channels)
    raise ValueError(f"unknown pooling '{mode}' (use {ALL_POOLING_MODES})")


class MultiLevelPooling(nn.Module):
    """Pool each selected encoder level with every mode in ``modes`` and concatenate: (B, out_dim).

    ``forward`` takes the feature maps of the selected levels in order (one per entry of ``channels``).
    """

    def __init__(self, channels: Sequence[int], modes: Sequence[str] = POOLING_MODES):
        super().__init__()
        self.channels = [int(c) for c in channels]
        self.modes = list(modes)
        self.pools = nn.ModuleList(nn.ModuleList(make_pool(m, c) for m in self.modes) for c in self.channels)
        self.out_dim = sum(self.channels) * len(self.modes)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(features) != len(self.channels):
            raise ValueError(f"expected {len(self.channels)} feature levels, got {len(features)}")
        out: List[torch.Tensor] = []
        for f, pools in zip(features, self.pools):
            out.extend(p(f) for p in pools)
        return torch.cat(out, dim=1)


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
