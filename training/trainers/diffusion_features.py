"""Trainers that keep the diffusion-pretrained encoders frozen and learn light heads on their features.

Why: the label-efficient way to use diffusion features (Baranchuk et al. 2022; OrthoDiffusion fine-tunes its
encoders at 0.05x the head's LR) is to keep what the denoiser learned and train little on top of it. Fine-tuning a
U-Net whose decoder starts from scratch spends the few labelled cases on rediscovering features the encoder already
has (docs/benchmarks.md, "Label efficiency"). These trainers:

* freeze every encoder loaded from ``--pretrained`` (they leave the optimizer; nothing to warm up);
* segment with :class:`~orthonet.networks.pyramid_head.PyramidSegmentationHead` (a per-voxel MLP on all encoder
  levels, upsampled to full resolution) instead of the U-Net decoder;
* diagnose with the usual pooled multi-level head and view fusion.

With ``--pretrained none`` nothing is frozen: the same architecture trains end to end from scratch, which is the
like-for-like baseline. Pick one with ``-tr SegTrainerDiffusionFeatures`` (or the Diag/Multitask variants).
"""
from __future__ import annotations

from training.trainers.diagnosis import DiagTrainer
from training.trainers.multitask import MultitaskTrainer
from training.trainers.segmentation import SegTrainer


class SegTrainerDiffusionFeatures(SegTrainer):
    """Segmentation from frozen pretrained encoder features through the pyramid head."""

    seg_head = "pyramid"
    deep_supervision = False
    freeze_pretrained_encoders = True
    load_pretrained_decoder = False


class DiagTrainerDiffusionFeatures(DiagTrainer):
    """Diagnosis heads on frozen pretrained view encoders."""

    freeze_pretrained_encoders = True


class MultitaskTrainerDiffusionFeatures(MultitaskTrainer):
    """Both tasks on frozen pretrained view encoders: pyramid segmentation head + diagnosis head."""

    seg_head = "pyramid"
    deep_supervision = False
    freeze_pretrained_encoders = True
    load_pretrained_decoder = False
