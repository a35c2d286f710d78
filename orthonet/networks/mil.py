"""Attention-MIL pooling of a whole exam's feature map: one attention head per diagnosis, padded voxels masked.

Why multiple-instance learning: an exam label ("medial meniscus tear") is about a few voxels somewhere in the
exam; the exam is a bag of feature positions, and gated attention (Ilse et al. 2018) learns which positions carry
the finding. One head per diagnosis lets each abnormality look at its own anatomy (the ACL notch for ``acl_tear``,
the collateral ligaments at the stack's edge for ``mcl_injury``), and the heads' weights are the saliency map of that
diagnosis (drawn by :mod:`orthonet.inference.explain`).

Padding: whole volumes are zero-padded to the encoder's total stride and to the largest exam of a batch; the
``mask`` (True = a position that covers real voxels) keeps those positions out of every softmax and maximum, so a
batch of differently sized exams pools exactly as each exam alone.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

NEG = -1e4   # masked attention logit (finite: bf16/fp16 safe, softmax weight exp(-1e4) == 0)


def flat_mask(mask: Optional[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """(B, N) bool mask of ``x``'s (B, C, *spatial) positions; all True when ``mask`` is None."""
    b, n = x.shape[0], x[0, 0].numel()
    if mask is None:
        return torch.ones((b, n), dtype=torch.bool, device=x.device)
    m = mask.reshape(b, -1).to(device=x.device, dtype=torch.bool)
    if m.shape[1] != n:
        raise ValueError(f"mask covers {m.shape[1]} positions, the feature map has {n}")
    # a sample without a single valid position (a missing view's zero volume) keeps all: its result is masked later
    return m | ~m.any(dim=1, keepdim=True)


class GatedAttentionMIL(nn.Module):
    """(B, C, *spatial) -> (B, heads * dim + dim): per-head gated-attention pooling of a 1x1 projection, plus the
    masked maximum of the projection (a focal finding survives undiluted even before attention has learned).

    ``attention(x, mask)`` gives the per-head weights (B, heads, *spatial), each summing to 1 over valid positions.

    Without gradients (inference) positions are processed ``chunk`` at a time with a running (online) softmax, so
    a fine feature level of a 40 x 512 x 512 exam never materialises its (N, dim) token matrix.
    """

    chunk: int = 1 << 16

    def __init__(self, channels: int, heads: int, dim: int = 64, hidden: int = 64, dropout: float = 0.0):
        super().__init__()
        self.heads, self.dim = int(heads), int(dim)
        self.proj = nn.Sequential(nn.Linear(channels, dim), nn.LayerNorm(dim), nn.GELU())
        self.value = nn.Linear(dim, hidden)
        self.gate = nn.Linear(dim, hidden)
        self.score = nn.Linear(hidden, self.heads)
        self.drop = nn.Dropout(dropout)
        self.out_dim = self.heads * self.dim + self.dim

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.flatten(2).transpose(1, 2).float())             # (B, N, dim)

    def _weights(self, h: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self._logits(h, m), dim=1)                      # over positions

    def _logits(self, h: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        logits = self.score(self.drop(torch.tanh(self.value(h)) * torch.sigmoid(self.gate(h))))   # (B, n, H)
        return logits.float().masked_fill(~m[..., None], NEG)

    def _chunks(self, x: torch.Tensor, m: torch.Tensor):
        flat = x.flatten(2)
        for s in range(0, flat.shape[2], self.chunk):
            e = min(s + self.chunk, flat.shape[2])
            yield self.proj(flat[:, :, s:e].transpose(1, 2).float()), m[:, s:e]

    def attention(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        m = flat_mask(mask, x)
        if torch.is_grad_enabled():
            w = self._weights(self._tokens(x), m)                             # (B, N, H)
        else:
            w = torch.softmax(torch.cat([self._logits(h, mc) for h, mc in self._chunks(x, m)], dim=1), dim=1)
        return w.transpose(1, 2).reshape(x.shape[0], self.heads, *x.shape[2:])

    def _streaming(self, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """The forward pass chunk by chunk with an online softmax (same result, memory O(chunk))."""
        b = x.shape[0]
        run_max = torch.full((b, self.heads), float("-inf"), device=x.device)
        run_sum = torch.zeros((b, self.heads), device=x.device)
        acc = torch.zeros((b, self.heads, self.dim), device=x.device)
        peak = torch.full((b, self.dim), float("-inf"), device=x.device)
        for h, mc in self._chunks(x, m):
            lg = self._logits(h, mc)                                          # (B, n, H)
            new = torch.maximum(run_max, lg.amax(dim=1))
            scale = torch.exp(run_max - new)
            e = torch.exp(lg - new[:, None])
            run_sum = run_sum * scale + e.sum(1)
            acc = acc * scale[..., None] + torch.einsum("bnh,bnd->bhd", e, h.float())
            run_max = new
            peak = torch.maximum(peak, h.float().masked_fill(~mc[..., None], NEG).amax(dim=1))
        return torch.cat([(acc / run_sum[..., None]).flatten(1), peak], dim=1)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        m = flat_mask(mask, x)
        if not torch.is_grad_enabled() and m.shape[1] > self.chunk:
            return self._streaming(x, m)
        h = self._tokens(x)
        w = self._weights(h, m)
        pooled = torch.einsum("bnh,bnd->bhd", w, h).flatten(1)                # (B, H * dim)
        peak = h.masked_fill(~m[..., None], NEG).amax(dim=1)                  # (B, dim)
        return torch.cat([pooled, peak], dim=1)
