"""Trainers built for few labels and short schedules: the pyramid segmentation head, and frozen pretrained encoders.

Why: a freshly initialised U-Net decoder learns slowly, and with few labelled cases it has to rediscover through
the decoder what a pretrained encoder already encodes. docs/benchmarks.md ("Label efficiency") has the
measurements that led to these trainers (small synthetic knees, 10 % labels, 1000 iterations: the U-Net learns
femur and tibia only, mean Dice 0.15; the pyramid head 0.46 from scratch and 0.69 from a 9000-step denoiser).

* ``*Pyramid``: segmentation with :class:`~orthonet.networks.pyramid_head.PyramidSegmentationHead` (a per-voxel MLP
  on all encoder levels, upsampled to full resolution; Baranchuk et al. 2022) instead of the U-Net decoder; the
  pretrained encoders are fine-tuned (0.1 x LR warm-up, as every trainer).
* ``*DiffusionFeatures``: the same heads, with every encoder loaded from ``--pretrained`` frozen (it leaves the
  optimizer): the denoiser's features are used as they are, as in a linear probe. Cheaper per step, but behind
  the fine-tuned variant (0.53 vs 0.67 online Dice from the 9000-step denoiser; far behind from a weak one).

With ``--pretrained none`` nothing is frozen and the same architecture trains end to end: the like-for-like scratch
baseline. Pick one with ``-tr``, e.g. ``ortho_train 101 3d_fullres 0 -tr SegTrainerPyramid``.
"""
from __future__ import annotations

from orthonet.training.trainers.diagnosis import DiagTrainer
from orthonet.training.trainers.multitask import MultitaskTrainer
from orthonet.training.trainers.segmentation import SegTrainer


class SegTrainerPyramid(SegTrainer):
    """Segmentation through the pyramid head; pretrained encoder fine-tuned."""

    seg_head = "pyramid"
    deep_supervision = False
    load_pretrained_decoder = False


class MultitaskTrainerPyramid(MultitaskTrainer):
    """Pyramid segmentation head + diagnosis head on shared, fine-tuned pretrained encoders."""

    seg_head = "pyramid"
    deep_supervision = False
    load_pretrained_decoder = False


class SegTrainerDiffusionFeatures(SegTrainerPyramid):
    """Pyramid head on the frozen pretrained encoder."""

    freeze_pretrained_encoders = True


class DiagTrainerDiffusionFeatures(DiagTrainer):
    """Diagnosis heads on frozen pretrained view encoders."""

    freeze_pretrained_encoders = True


class MultitaskTrainerDiffusionFeatures(MultitaskTrainerPyramid):
    """Pyramid segmentation head + diagnosis head on frozen pretrained view encoders."""

    freeze_pretrained_encoders = True
