"""Per-epoch validation metrics accumulated batch by batch (nnU-Net's 'pseudo Dice', and AUC per diagnosis).

Why accumulate counts instead of averaging per-batch Dice: small patches often miss a structure, and the mean of
per-batch Dice values is dominated by those empty patches; summed TP/FP/FN over all validation patches is the
stable signal nnU-Net uses to pick ``checkpoint_best``.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from orthonet.metrics import average_precision, nanmean, roc_auc


class SegmentationCounts:
    """Summed true/false positives and false negatives per foreground class."""

    def __init__(self, class_names: Sequence[str], ignore_label: Optional[int] = None):
        self.class_names = list(class_names)           # background first
        self.ignore_label = ignore_label
        n = len(self.class_names) - 1
        self.tp, self.fp, self.fn = np.zeros(n), np.zeros(n), np.zeros(n)

    def add(self, logits: torch.Tensor, target: torch.Tensor, sample_mask: Optional[torch.Tensor] = None) -> None:
        """``logits`` (B, K, ...), ``target`` (B, 1, ...) with -1 / ignore voxels excluded."""
        with torch.no_grad():
            pred = logits.float().argmax(1)
            tgt = target[:, 0].long() if target.ndim == logits.ndim else target.long()
            valid = tgt >= 0
            if self.ignore_label is not None:
                valid &= tgt != self.ignore_label
            if sample_mask is not None:
                valid &= sample_mask.to(valid.device).view(-1, *([1] * (valid.ndim - 1)))
            for c in range(1, len(self.class_names)):
                p, t = (pred == c) & valid, (tgt == c) & valid
                self.tp[c - 1] += float((p & t).sum())
                self.fp[c - 1] += float((p & ~t).sum())
                self.fn[c - 1] += float((~p & t).sum())

    def dice(self) -> Dict[str, Optional[float]]:
        denom = 2 * self.tp + self.fp + self.fn
        out = {}
        for i, name in enumerate(self.class_names[1:]):
            out[name] = float(2 * self.tp[i] / denom[i]) if denom[i] > 0 else None
        return out

    def mean_dice(self) -> float:
        return nanmean(v for v in self.dice().values() if v is not None)


class DiagnosisCollector:
    """Collects per-case probabilities and labels (NaN unknown) to compute AUC / AP per diagnosis."""

    def __init__(self, diagnoses: Sequence[str]):
        self.diagnoses = list(diagnoses)
        self.probs: List[np.ndarray] = []
        self.labels: List[np.ndarray] = []
        self.keys: List[str] = []

    def add(self, logits: torch.Tensor, labels: torch.Tensor, keys: Sequence[str]) -> None:
        self.probs.append(torch.sigmoid(logits.detach().float()).cpu().numpy())
        self.labels.append(labels.detach().float().cpu().numpy())
        self.keys += list(keys)

    def arrays(self):
        if not self.probs:
            n = len(self.diagnoses)
            return np.zeros((0, n)), np.zeros((0, n))
        return np.concatenate(self.probs), np.concatenate(self.labels)

    def auc(self) -> Dict[str, Optional[float]]:
        p, y = self.arrays()
        out = {}
        for i, d in enumerate(self.diagnoses):
            v = roc_auc(y[:, i], p[:, i]) if len(p) else float("nan")
            out[d] = None if not np.isfinite(v) else float(v)
        return out

    def ap(self) -> Dict[str, Optional[float]]:
        p, y = self.arrays()
        out = {}
        for i, d in enumerate(self.diagnoses):
            v = average_precision(y[:, i], p[:, i]) if len(p) else float("nan")
            out[d] = None if not np.isfinite(v) else float(v)
        return out

    def macro_auc(self) -> float:
        return nanmean(v for v in self.auc().values() if v is not None)
