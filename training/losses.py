"""Losses: Dice + cross-entropy with deep supervision (nnU-Net), masked multi-label BCE, diffusion MSE.

Why our own small versions instead of importing nnU-Net: we need two behaviours nnU-Net does not have in one
place — voxels labelled ``-1`` (outside the image / unlabelled patch) and the dataset's ``ignore`` label are both
excluded from Dice *and* CE (sparse annotation), and diagnosis labels may be unknown (NaN) per case and label.
Everything is computed in float32 so bf16/fp16 autocast does not change the loss value.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def valid_voxel_mask(target: torch.Tensor, ignore_label: Optional[int] = None) -> torch.Tensor:
    """Boolean mask of voxels that count: not negative (padding) and not ``ignore_label``."""
    mask = target >= 0
    if ignore_label is not None:
        mask &= target != ignore_label
    return mask


class SoftDiceLoss(nn.Module):
    """Memory-efficient soft Dice (nnU-Net's ``MemoryEfficientSoftDiceLoss``) returning ``1 - mean Dice``.

    ``batch_dice`` pools the statistics over the batch (and over DDP ranks, gradient-preserving, when ``ddp``;
    inside :func:`orthonet.training.distributed.local_only`, e.g. rank 0's validation, over the local batch only);
    ``do_bg=False`` leaves the background channel out of the mean. ``loss_mask`` (b, 1, ...) zeroes voxels that
    must not count.
    """

    def __init__(self, batch_dice: bool = False, do_bg: bool = False, smooth: float = 1e-5, ddp: bool = False):
        super().__init__()
        self.batch_dice = batch_dice
        self.do_bg = do_bg
        self.smooth = smooth
        self.ddp = ddp

    def forward(self, probs: torch.Tensor, target: torch.Tensor, loss_mask: Optional[torch.Tensor] = None
                ) -> torch.Tensor:
        axes = tuple(range(2, probs.ndim))
        with torch.no_grad():
            onehot = torch.zeros(probs.shape, device=probs.device, dtype=torch.float32)
            onehot.scatter_(1, target.long(), 1)
            if not self.do_bg:
                onehot = onehot[:, 1:]
            if loss_mask is not None:
                onehot = onehot * loss_mask
            sum_gt = onehot.sum(axes)
        if not self.do_bg:
            probs = probs[:, 1:]
        probs = probs.float()
        if loss_mask is not None:
            probs = probs * loss_mask
        intersect = (probs * onehot).sum(axes)
        sum_pred = probs.sum(axes)
        if self.batch_dice:
            if self.ddp:
                from orthonet.training.distributed import all_gather_with_grad
                intersect = all_gather_with_grad(intersect).flatten(0, 1)
                sum_pred = all_gather_with_grad(sum_pred).flatten(0, 1)
                sum_gt = all_gather_with_grad(sum_gt).flatten(0, 1)
            intersect, sum_pred, sum_gt = intersect.sum(0), sum_pred.sum(0), sum_gt.sum(0)
        dc = (2 * intersect + self.smooth) / (sum_gt + sum_pred + self.smooth).clamp_min(1e-8)
        return 1.0 - dc.mean()


class DiceCELoss(nn.Module):
    """``weight_dice * (1 - soft Dice) + weight_ce * CE`` on logits (b, C, ...) and a label map (b, 1, ...).

    Voxels with negative labels or ``ignore_label`` are excluded from both terms; a batch without a single valid
    voxel gives a zero loss that still has a graph (so DDP does not hang waiting for gradients).
    """

    def __init__(self, batch_dice: bool = False, do_bg: bool = False, smooth: float = 1e-5, weight_ce: float = 1.0,
                 weight_dice: float = 1.0, ignore_label: Optional[int] = None, ddp: bool = False):
        super().__init__()
        self.dice = SoftDiceLoss(batch_dice=batch_dice, do_bg=do_bg, smooth=smooth, ddp=ddp)
        self.weight_ce = weight_ce
        self.weight_dice = weight_dice
        self.ignore_label = ignore_label

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if target.ndim == logits.ndim - 1:
            target = target[:, None]
        if target.shape[1] != 1:
            raise ValueError(f"target must be a label map (b, 1, ...), got {tuple(target.shape)}")
        mask = valid_voxel_mask(target, self.ignore_label)
        clean = torch.where(mask, target, torch.zeros_like(target)).long()
        logits32 = logits.float()
        loss = logits32.sum() * 0.0
        if self.weight_dice:
            probs = torch.softmax(logits32, 1)
            loss = loss + self.weight_dice * self.dice(probs, clean, loss_mask=mask.float())
        if self.weight_ce:
            # no `if n_valid > 0`: a Python branch on a device value stalls the GPU once per output; the clamp
            # gives the same zero (still graph-connected) when no voxel is valid
            ce = F.cross_entropy(logits32, clean[:, 0], reduction="none")
            loss = loss + self.weight_ce * (ce * mask[:, 0]).sum() / mask.sum().clamp_min(1)
        return loss


def deep_supervision_weights(n_outputs: int, zero_lowest: bool = True, ddp: bool = False) -> np.ndarray:
    """nnU-Net's weights 1/2^i for outputs from full resolution down, lowest resolution 0, normalised to sum 1.

    Under DDP nnU-Net uses 1e-6 instead of 0 for the lowest output, because a parameter without gradient makes
    DDP complain about unused parameters; ``ddp=True`` does the same.
    """
    w = np.array([1.0 / 2 ** i for i in range(n_outputs)])
    if zero_lowest and n_outputs > 1:
        w[-1] = 1e-6 if ddp else 0.0
    return w / w.sum()


class DeepSupervisionLoss(nn.Module):
    """Weighted sum of ``loss(output_i, target_i)`` over deep-supervision outputs (highest resolution first)."""

    def __init__(self, loss: nn.Module, weights: Sequence[float]):
        super().__init__()
        if not any(w != 0 for w in weights):
            raise ValueError("at least one deep-supervision weight must be non-zero")
        self.loss = loss
        self.weights = tuple(float(w) for w in weights)

    def forward(self, outputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> torch.Tensor:
        if isinstance(outputs, torch.Tensor) or isinstance(targets, torch.Tensor):
            raise TypeError("DeepSupervisionLoss expects lists of outputs and targets (one per resolution)")
        if len(outputs) > len(self.weights) or len(targets) < len(outputs):
            raise ValueError(f"{len(outputs)} outputs, {len(targets)} targets, {len(self.weights)} weights")
        total = None
        for w, o, t in zip(self.weights, outputs, targets):
            if w == 0:
                continue
            term = w * self.loss(o, t)
            total = term if total is None else total + term
        return total


def compute_pos_weight(labels: np.ndarray, max_weight: float = 100.0) -> torch.Tensor:
    """Per-label positive weight = negatives / positives among known (non-NaN) training labels.

    Labels with no positives or no negatives get 1; weights are clipped to ``max_weight`` so one positive case
    cannot dominate the loss.
    """
    labels = np.asarray(labels, dtype=float)
    if labels.ndim != 2:
        raise ValueError(f"labels must be (n_cases, n_labels), got {labels.shape}")
    known = ~np.isnan(labels)
    pos = ((labels > 0.5) & known).sum(0).astype(float)
    neg = ((labels <= 0.5) & known).sum(0).astype(float)
    w = np.where((pos > 0) & (neg > 0), neg / np.maximum(pos, 1), 1.0)
    return torch.tensor(np.clip(w, 1.0 / max_weight, max_weight), dtype=torch.float32)


class MaskedBCEWithLogitsLoss(nn.Module):
    """Multi-label BCE on logits (b, L) with targets (b, L) where NaN means unknown (excluded).

    The mean runs over known entries only; with no known entry the loss is a graph-connected zero.
    """

    def __init__(self, pos_weight: Optional[torch.Tensor] = None):
        super().__init__()
        self.register_buffer("pos_weight", None if pos_weight is None else torch.as_tensor(pos_weight).float())

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if logits.shape != targets.shape:
            raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} differ")
        logits = logits.float()
        targets = targets.to(logits.device).float()
        known = ~torch.isnan(targets)
        clean = torch.where(known, targets, torch.zeros_like(targets))
        pw = None if self.pos_weight is None else self.pos_weight.to(logits.device)
        per = F.binary_cross_entropy_with_logits(logits, clean, pos_weight=pw, reduction="none")
        # the clamp, not `if n == 0`: the same graph-connected zero without a device-to-host read
        return (per * known).sum() / known.sum().clamp_min(1)


def diffusion_mse_loss(prediction: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor] = None
                       ) -> torch.Tensor:
    """Mean squared error in float32 (the ε- or v-prediction objective); ``mask`` restricts it to some voxels."""
    diff = (prediction.float() - target.float()) ** 2
    if mask is None:
        return diff.mean()
    mask = mask.float().expand_as(diff)
    return (diff * mask).sum() / mask.sum().clamp_min(1.0)
