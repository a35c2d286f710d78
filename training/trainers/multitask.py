"""Segmentation and diagnosis together: shared view encoders, a decoder on the segmentation view and the fused
diagnosis head. ``seg_loss_weight`` and ``diag_loss_weight`` balance the two (subclass to change them)."""
from __future__ import annotations

from typing import Dict, List, Sequence, Set, Tuple

import numpy as np
import torch

from orthonet.training import distributed as dist
from orthonet.training.online_eval import DiagnosisCollector, SegmentationCounts
from orthonet.training.trainers.diagnosis import DiagTrainer
from orthonet.training.trainers.segmentation import SegTrainer


class MultitaskTrainer(DiagTrainer):
    """Uses every training case with any kept label: segmentation loss on cases with a label map, diagnosis loss on
    known diagnoses. SGD/poly as nnU-Net (the segmentation part dominates the optimisation)."""

    task = "multitask"
    initial_lr: float = 1e-2
    weight_decay: float = 3e-5
    grad_clip: float = 12.0
    seg_loss_weight: float = 1.0
    diag_loss_weight: float = 1.0
    dice_weight: float = 1.0
    ce_weight: float = 1.0
    batch_dice: bool = False

    seg_loss = SegTrainer.seg_loss

    def select_training_cases(self, train: Sequence[str], seg_labelled: Set[str]) -> List[str]:
        def has_diag(c: str) -> bool:
            return c in self.diagnoses and not np.all(np.isnan(self.diagnoses[c]))
        return [c for c in train if c in self.keep_labels and (c in seg_labelled or has_diag(c))]

    def select_validation_cases(self, val: Sequence[str], seg_labelled: Set[str]) -> List[str]:
        return list(val)

    def __init__(self, options):
        super().__init__(options)
        if options.loss_weights is not None:
            self.seg_loss_weight, self.diag_loss_weight = (float(w) for w in options.loss_weights)

    def run_model(self, network, batch: Dict):
        fusion = self.fusion_inputs(batch)
        if self.whole_exam:
            return network(batch["data"], batch["present"], whole=batch["whole"], shapes=batch["whole_shape"],
                           **fusion)
        return network(batch["data"], batch["present"], **fusion)

    def fusion_inputs(self, batch: Dict) -> Dict:
        """--fuse-views: the other views' crops aligned with the segmentation patch, every crop's affine and image
        extent (what prediction's tile predictor passes too); nothing otherwise."""
        if not self.opts.fuse_views:
            return {}
        return {"context": batch["context"], "affines": batch["affines"], "extents": batch["extents"]}

    def build_optimizer(self, model, pretrained_names):
        return super(DiagTrainer, self).build_optimizer(model, pretrained_names)

    def build_train_loader(self):
        self.seg_loss_fn = self.seg_loss()
        return super().build_train_loader()

    def compute_loss(self, batch: Dict, outputs) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        diag, parts = self.diagnosis_terms(batch, outputs)
        seg = self.seg_loss_fn(outputs["seg"], batch["target"])
        parts["seg_loss"] = seg.detach()
        return self.seg_loss_weight * seg + self.diag_loss_weight * diag, parts

    def online_validation(self) -> Dict:
        collector = DiagnosisCollector(self.spec.diagnoses)
        counts = SegmentationCounts(self.spec.class_names, self.spec.ignore_label)
        losses = []
        # rank 0 validates alone: its loss (batch Dice) must not all_gather with ranks waiting at the barrier
        with dist.local_only():
            for batch, out in self.validation_batches():
                losses.append(float(self.compute_loss(batch, out)[0]))
                collector.add(out["logits"], batch["diagnosis"], batch["keys"])
                full = out["seg"][0] if isinstance(out["seg"], (list, tuple)) else out["seg"]
                target = batch["target"][0] if isinstance(batch["target"], (list, tuple)) else batch["target"]
                counts.add(full, target, batch["has_seg"])
        macro = collector.macro_auc()
        mean_dice = counts.mean_dice()
        scores = [s for s in (macro, mean_dice) if np.isfinite(s)]
        return {"val_loss": float(np.mean(losses)) if losses else float("nan"), "auc": collector.auc(),
                "macro_auc": macro, "dice": counts.dice(), "mean_dice": mean_dice,
                "score": float(np.mean(scores)) if scores else None}
