"""Segmentation of the segmentation view: the plan's U-Net, Dice + CE with deep supervision (nnU-Net recipe)."""
from __future__ import annotations

from typing import Dict, List, Sequence, Set, Tuple

import torch

from orthonet.training.data.factory import make_aligned_views_loader, make_seg_loader
from orthonet.training.losses import DeepSupervisionLoss, DiceCELoss, deep_supervision_weights
from orthonet.training.online_eval import SegmentationCounts
from orthonet.training.trainers.base import BaseTrainer
from orthonet.training import distributed as dist


class SegTrainer(BaseTrainer):
    """Segmentation only. Cases without a (kept) label map are not used here (pretraining used their images)."""

    task = "seg"
    dice_weight: float = 1.0
    ce_weight: float = 1.0
    batch_dice: bool = False

    def select_training_cases(self, train: Sequence[str], seg_labelled: Set[str]) -> List[str]:
        return [c for c in train if c in seg_labelled and c in self.keep_labels]

    def select_validation_cases(self, val: Sequence[str], seg_labelled: Set[str]) -> List[str]:
        return [c for c in val if c in seg_labelled]

    # ---- parts -------------------------------------------------------------------------------------------
    def seg_loss(self) -> torch.nn.Module:
        """Dice + CE, ignore label and -1 padding excluded; wrapped for deep supervision."""
        base = DiceCELoss(batch_dice=self.batch_dice, do_bg=False, weight_ce=self.ce_weight,
                          weight_dice=self.dice_weight, ignore_label=self.spec.ignore_label,
                          ddp=dist.is_distributed())
        if not self.deep_supervision:
            return base
        n_outputs = len(self.plans["views"][self.segmentation_view]["configurations"][self.opts.configuration]
                        ["network"]["kwargs"]["strides"])
        return DeepSupervisionLoss(base, deep_supervision_weights(n_outputs, ddp=dist.is_distributed()))

    def _seg_loader(self, cases, train: bool, seed: int):
        workers = self.num_workers if train else 0
        if self.opts.fuse_views:
            return make_aligned_views_loader(self.store, cases, self.plans, self.opts.configuration,
                                             self.segmentation_view, self.model_cfg.views, train=train,
                                             deep_supervision=self.deep_supervision,
                                             oversample_foreground=self.oversample_foreground,
                                             ignore_label=self.spec.ignore_label, num_workers=workers, seed=seed,
                                             **self.loader_options(train))
        return make_seg_loader(self.store, cases, self.plans, self.segmentation_view, self.opts.configuration,
                               train=train, deep_supervision=self.deep_supervision,
                               oversample_foreground=self.oversample_foreground,
                               ignore_label=self.spec.ignore_label, num_workers=self.num_workers if train else 0,
                               seed=seed, mirror_axes=self.mirror_axes, **self.loader_options(train))

    def build_train_loader(self):
        self.loss_fn = self.seg_loss()
        return self._seg_loader(self.train_cases, True, self.opts.seed + 1000 * self.epoch + dist.rank())

    def model_inputs(self, batch: Dict):
        """(inputs, kwargs) for the network: the segmentation patch, plus the aligned views with --fuse-views."""
        if self.opts.fuse_views:
            return ({self.segmentation_view: batch["data"], **batch["context"]},
                    {"affines": batch["affines"], "extents": batch["extents"]})
        return batch["data"], {}

    def forward(self, batch: Dict):
        inputs, kwargs = self.model_inputs(batch)
        return self.network(inputs, **kwargs)

    def compute_loss(self, batch: Dict, outputs) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        return self.loss_fn(outputs, batch["target"]), {}

    # ---- validation --------------------------------------------------------------------------------------
    def online_validation(self) -> Dict:
        if not hasattr(self, "_val_loader"):
            self._val_loader = self._seg_loader(self.val_cases, False, self.opts.seed + 7)
        counts = SegmentationCounts(self.spec.class_names, self.spec.ignore_label)
        losses = []
        # rank 0 validates alone: its loss (batch Dice) must not all_gather with ranks waiting at the barrier
        with torch.no_grad(), dist.local_only():
            for _ in range(self.val_iterations):
                batch = self.to_device(next(self._val_loader))
                inputs, kwargs = self.model_inputs(batch)
                with self._autocast():
                    out = self.model(inputs, **kwargs)
                losses.append(float(self.loss_fn(out, batch["target"])))
                full = out[0] if isinstance(out, (list, tuple)) else out
                target = batch["target"][0] if isinstance(batch["target"], (list, tuple)) else batch["target"]
                counts.add(full, target)
        dice = counts.dice()
        mean = counts.mean_dice()
        return {"val_loss": sum(losses) / max(1, len(losses)), "dice": dice, "mean_dice": mean, "score": mean}

    def _autocast(self):
        from orthonet.training.runtime import autocast
        return autocast(self.device)
